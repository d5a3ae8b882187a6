"""Counterfactual pairs in archive jobs: one reference per index, one edit per requested finding.

A pairs job (``ArchiveSpec.pairs``) plans each index as usual except that its reference lacks every
finding named (``ArchivePlan.labels``). The reference goes through the same retries as any archive image
(``service.verify.generate_accepted``); then, for each finding F, the edit that POST /edit would make
(``service.counterfactual.plan_edit`` + ``edit_sample``: LCO from the reference's latent with the
proximity pull, the reference's constraints judged, the other labels held at its probabilities) adds F.
An edit has no seed of its own to retry from: it is a pure function of the reference, so it is made
once, judged by the bundle's auditor (when it has one), and with ``verify`` a pair whose edited image
the auditor does not verify is dropped (no file, a record saying so), as is every pair of a reference
dropped as unverified.

Files, beside the ordinary archive's::

    images/00000001_000.png        the reference (its Data_Entry row says what it was asked to lack)
    images/00000001_001.png        the reference edited to show pairs.findings[0]: follow-up 1 of patient 1
    differences/00000001_001.png   the pair's signed difference map (red brighter, blue darker)
    Pairs.csv                      one row per pair kept (PAIR_COLUMNS), written by merge

The counterfactuals are follow-ups of their reference's synthetic patient, so Data_Entry.csv lists every
image with its labels for ChestX-ray14 loaders, and a patient-wise split keeps each pair on one side.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.archive.spec import PairsOptions, PlannedImage, image_id, labels_of
from service.counterfactual import EditSpec, edit_sample, plan_edit, probabilities_by_label
from service.labels import LABEL_INDEX, format_finding_labels
from service.lco import LCOOptions, SampleRequest, SampleResult
from service.verify import Accepted, Verdict, Verifier

# One row per pair kept. Probabilities are of the pair's finding; "verified": the auditor puts every
# constraint of that image on its requested side; "auditor_confirms": absent in the reference and
# present in the counterfactual by the auditor's thresholds. Auditor columns are empty without an auditor.
PAIR_COLUMNS = (
    "pair_id", "finding", "reference_image", "counterfactual_image", "difference_image", "seed",
    "reference_labels", "counterfactual_labels", "lco_probability_before", "lco_probability_after",
    "auditor_probability_before", "auditor_probability_after", "latent_distance", "auditor_confirms",
    "reference_verified", "counterfactual_verified", "lco_satisfied", "steps",
)


@dataclass(frozen=True)
class Pair:
    """One finding's edit of one reference; ``result`` None when the reference itself was dropped."""

    finding: str
    follow_up: int  # the counterfactual's follow-up number: the finding's position in pairs.findings + 1
    edit: EditSpec
    reference: SampleResult
    result: SampleResult | None
    reference_verdict: Verdict | None
    verdict: Verdict | None
    thresholds: np.ndarray | None  # the auditor's [14]
    verifying: bool  # verify is on: a pair the auditor does not verify is dropped

    @property
    def dropped(self) -> str | None:
        """Why no counterfactual is stored: "reference_unverified", "unverified", or None (kept)."""
        if self.result is None:
            return "reference_unverified"
        if self.verifying and self.verdict is not None and not self.verdict.verified:
            return "unverified"
        return None

    @property
    def auditor_confirms(self) -> bool | None:
        """The auditor sees the finding absent in the reference and present in the counterfactual."""
        if self.verdict is None or self.reference_verdict is None or self.thresholds is None:
            return None
        index, threshold = LABEL_INDEX[self.finding], self.thresholds[LABEL_INDEX[self.finding]]
        return bool(self.reference_verdict.probabilities[index] < threshold <= self.verdict.probabilities[index])

    def record(self, index: int) -> dict[str, Any]:
        """The pair's manifest fields (the runner adds the stored files' keys, sizes and sha256)."""
        record: dict[str, Any] = {"pair_id": image_id(index, self.follow_up), "index": index,
                                  "follow_up": self.follow_up, "finding": self.finding}
        if self.result is None:
            return {**record, "dropped": "reference_unverified"}
        finding = LABEL_INDEX[self.finding]
        record.update(
            finding_labels=format_finding_labels(self.edit.target),
            requested=labels_of(self.edit.target, self.edit.judged),
            probabilities=probabilities_by_label(self.result.probabilities),
            satisfied=bool(self.result.satisfied),
            steps=int(self.result.steps),
            seed=int(self.reference.seed),
            latent_distance=round(float(np.linalg.norm(self.result.latent - self.reference.latent)), 6),
            lco_probability_before=round(float(self.reference.probabilities[finding]), 6),
            lco_probability_after=round(float(self.result.probabilities[finding]), 6),
            auditor_confirms=self.auditor_confirms,
            reference_verified=None if self.reference_verdict is None else self.reference_verdict.verified,
            verified=None if self.verdict is None else self.verdict.verified,
        )
        if self.verdict is not None and self.reference_verdict is not None:
            record.update(auditor_probability_before=round(float(self.reference_verdict.probabilities[finding]), 6),
                          auditor_probability_after=round(float(self.verdict.probabilities[finding]), 6),
                          auditor_probabilities=self.verdict.rounded())
        if self.dropped is not None:
            record["dropped"] = self.dropped
        return record


def make_pairs(
    generate: Callable[[list[SampleRequest]], list[SampleResult]],
    batch: Sequence[PlannedImage],
    accepted: Sequence[Accepted],
    options: PairsOptions,
    lco: LCOOptions,
    judge: Verifier | None,
    verifying: bool,
) -> list[list[Pair]]:
    """Every pair of a batch of references, one list per index in ``options.findings`` order.

    ``accepted``: the references after their retries; ``judge``: the bundle's auditor (None: none), which
    drops pairs only when ``verifying``. The edits of a batch run together; each is a function of its
    reference, finding, options and the engine's compute shape only (service/lco.py), so reruns match."""
    edits: list[tuple[int, int, str, EditSpec]] = []
    for row, (planned, reference) in enumerate(zip(batch, accepted, strict=True)):
        for follow_up, finding in enumerate(options.findings, start=1):
            edits.append((row, follow_up, finding, plan_edit(planned.target, planned.mask, [finding], [])))
    kept = [edit for edit in edits if accepted[edit[0]].verified is not False]
    results = generate([edit_sample(spec, accepted[row].result, options.proximity, options.image_proximity, lco) for row, _, _, spec in kept])
    verdicts: list[Verdict | None] = [None] * len(kept)
    reference_verdicts: list[Verdict | None] = [a.verdict for a in accepted]
    if judge is not None:
        # The edit is judged on the constraints it was made to meet (the soft targets it only steered are not).
        verdicts = list(judge.judge([SampleRequest(spec.target, spec.judged, accepted[row].result.seed)
                                     for row, _, _, spec in kept], results))
        unjudged = [row for row, verdict in enumerate(reference_verdicts) if verdict is None]
        for row, verdict in zip(unjudged, judge.judge(
                [SampleRequest(batch[row].target, batch[row].mask, accepted[row].result.seed) for row in unjudged],
                [accepted[row].result for row in unjudged])):
            reference_verdicts[row] = verdict
    made = {(row, follow_up): (result, verdict)
            for (row, follow_up, _, _), result, verdict in zip(kept, results, verdicts, strict=True)}
    thresholds = None if judge is None else judge.auditor.thresholds
    pairs: list[list[Pair]] = [[] for _ in batch]
    for row, follow_up, finding, spec in edits:
        result, verdict = made.get((row, follow_up), (None, None))
        pairs[row].append(Pair(finding, follow_up, spec, accepted[row].result, result, reference_verdicts[row],
                               verdict, thresholds, verifying))
    return pairs


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def pairs_csv_header() -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(PAIR_COLUMNS)
    return buffer.getvalue().encode()


def pairs_csv_row(reference: dict[str, Any], pair: dict[str, Any]) -> bytes:
    """One Pairs.csv row for a kept pair record and its reference's record."""
    values = {
        "pair_id": pair["pair_id"], "finding": pair["finding"], "reference_image": reference["image"],
        "counterfactual_image": pair["image"], "difference_image": pair.get("difference"), "seed": pair["seed"],
        "reference_labels": reference["finding_labels"], "counterfactual_labels": pair["finding_labels"],
        "lco_probability_before": pair["lco_probability_before"], "lco_probability_after": pair["lco_probability_after"],
        "auditor_probability_before": pair.get("auditor_probability_before"),
        "auditor_probability_after": pair.get("auditor_probability_after"),
        "latent_distance": pair["latent_distance"], "auditor_confirms": pair["auditor_confirms"],
        "reference_verified": pair["reference_verified"], "counterfactual_verified": pair["verified"],
        "lco_satisfied": pair["satisfied"], "steps": pair["steps"],
    }
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([_cell(values[column]) for column in PAIR_COLUMNS])
    return buffer.getvalue().encode()
