"""The archive's files besides the images: job document, chunk manifests, NIH CSV rows, commit marker.

Layout under the destination::

    job.json                                         the spec, model and LCO options; written first
    images/00000001_000.png                          one file per image (.dcm with image_format dicom)
    manifests/shard-00000-of-00004/chunk-000000.jsonl  one JSON record per image, one object per chunk
    Data_Entry.csv                                   NIH Data_Entry_2017 columns (merge)
    Pairs.csv, differences/                          a pairs job's pair manifest and difference maps
    _COMPLETE.json                                   commit marker: counts and checksums (merge, last)

S3 has no append, so a shard's manifest is a series of whole objects, one per chunk of images, each
written in one PUT after every image it lists is stored. A crash therefore leaves complete chunks
(skipped on rerun) and at most a few images without a record, which the rerun rewrites byte for byte
before it writes their chunk's record.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from service.archive.spec import patient_id
from service.dicom import DicomPlacement, uid_for
from service.labels import LABELS, format_finding_labels, parse_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS, pixel_spacing_mm

ARCHIVE_FORMAT = "cxrsynth-archive/1"
JOB_KEY = "job.json"
CSV_KEY = "Data_Entry.csv"
PAIRS_CSV_KEY = "Pairs.csv"  # a pairs job's pair manifest (service/archive/pairs.py)
MARKER_KEY = "_COMPLETE.json"

# Synthetic patient columns of the merged CSV. Every image is its own synthetic patient (so
# patient-wise splits never put one generator sample on both sides), seen once (follow-up 0). The
# generator is not conditioned on age, sex or view, so those columns carry neutral values that
# ChestX-ray14 loaders accept: age 0, gender "O" (other/unknown), the PA view the NIH loaders keep by
# default. The "original" size is the image itself; the pixel spacing is service.nih_format's.
SYNTHETIC_AGE = 0
SYNTHETIC_GENDER = "O"
SYNTHETIC_VIEW = "PA"


class ArchiveError(RuntimeError):
    """The archive cannot be made or merged as asked; the message says what to do."""


class ArchiveConflict(ArchiveError):
    """The destination already holds a different archive."""


class ArchiveIncomplete(ArchiveError):
    """Merge found chunks missing or invalid; rerun the shards it names."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def job_document(identity: dict[str, Any], model_name: str, model_version: str) -> dict[str, Any]:
    return {"format": ARCHIVE_FORMAT, "spec": identity, "model": {"name": model_name, "version": model_version}}


@dataclass(frozen=True)
class ArchiveUIDs:
    """The DICOM UIDs of an archive's images: one study per job, one series per shard, one instance per
    image, so viewers group them.

    Each is a name-based UID under 2.25 (``service.dicom.uid_for``: a UUID from a hash of a name, as
    DICOM PS3.5 B.2 allows) of the sha256 of the job document (job.json: spec, model, LCO options), so
    every shard, rerun and resumed run of one job writes the same UIDs, and a job that makes other
    images (another seed, model or option) gets others.
    """

    job_sha256: str

    @classmethod
    def of_job(cls, job: dict[str, Any]) -> ArchiveUIDs:
        return cls(sha256_hex(canonical_json(job)))

    def placement(self, shard_index: int, index: int) -> DicomPlacement:
        """Image ``index`` of shard ``shard_index``: SeriesNumber shard + 1, InstanceNumber index + 1."""
        name = f"cxrsynth-archive/{self.job_sha256}"
        return DicomPlacement(
            study_uid=uid_for(f"{name}/study"),
            series_uid=uid_for(f"{name}/series/{shard_index}"),
            instance_uid=uid_for(f"{name}/image/{index}"),
            instance_number=index + 1,
            series_number=shard_index + 1,
        )


def describe_difference(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Which top-level fields of two job documents differ, for the conflict message."""
    names = []
    for section in ("format", "spec", "model", "lco"):
        old, new = existing.get(section), wanted.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            names += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            names.append(section)
    return ", ".join(names) or "unknown fields"


def make_record(
    *,
    index: int,
    image_id: str,
    key: str,
    requested: dict[str, bool],
    target: np.ndarray,
    probabilities: np.ndarray,
    satisfied: bool,
    seed: int,
    steps: int,
    accepted_without_steps: bool,
    candidates_scored: int,
    model_version: str,
    image_format: str,
    data: bytes,
) -> dict[str, Any]:
    return {
        "id": image_id,
        "index": index,
        "image": key,
        "finding_labels": format_finding_labels(target),
        "requested": requested,
        "probabilities": {label: round(float(p), 6) for label, p in zip(LABELS, probabilities)},
        "satisfied": bool(satisfied),
        "seed": int(seed),
        "steps": int(steps),
        "accepted_without_steps": bool(accepted_without_steps),
        "candidates_scored": int(candidates_scored),
        "model_version": model_version,
        "format": image_format,
        "bytes": len(data),
        "sha256": sha256_hex(data),
    }


def dropped_record(*, index: int, image_id: str, requested: dict[str, bool], target: np.ndarray, seed: int,
                   attempts: int, verify_retries: int, auditor_probabilities: dict[str, float],
                   model_version: str) -> dict[str, Any]:
    """The record of an index whose image the auditor rejected through every retry: no image is stored
    and Data_Entry.csv has no row for it; the index stays taken, so every other image keeps its key."""
    return {
        "id": image_id,
        "index": index,
        "dropped": "unverified",
        "finding_labels": format_finding_labels(target),
        "requested": requested,
        "seed": int(seed),  # the last attempt's
        "attempts": int(attempts),
        "verify_retries": int(verify_retries),
        "verified": False,
        "auditor_probabilities": auditor_probabilities,
        "model_version": model_version,
    }


def is_dropped(record: dict[str, Any]) -> bool:
    return "dropped" in record


def stored_files(record: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    """(key, bytes, sha256) of every file a kept record names, in key order within its kind: its image,
    then its pairs' counterfactual images, then their difference maps (a pairs job)."""
    yield record["image"], record["bytes"], record["sha256"]
    kept = [pair for pair in record.get("pairs", []) if not is_dropped(pair)]
    for pair in kept:
        yield pair["image"], pair["bytes"], pair["sha256"]
    for pair in kept:
        if "difference" in pair:
            yield pair["difference"], pair["difference_bytes"], pair["difference_sha256"]


def encode_records(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record, sort_keys=True).encode() + b"\n" for record in records)


def decode_records(data: bytes, where: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ArchiveError(f"{where}:{number}: not a JSON record ({error})") from None
        if not isinstance(record, dict) or not {"id", "index"} <= set(record) or not (
                is_dropped(record) or {"image", "sha256", "bytes"} <= set(record)):
            raise ArchiveError(f"{where}:{number}: record lacks id, index, image, sha256 or bytes")
        records.append(record)
    return records


def csv_header() -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(DATA_ENTRY_COLUMNS)
    return buffer.getvalue().encode()


def csv_row(record: dict[str, Any], resolution: int) -> bytes:
    """One Data_Entry row for an image's record (or a pair's), columns exactly as NIH's (see the module constants)."""
    spacing = f"{pixel_spacing_mm(resolution):.6f}"
    values = {
        "Image Index": record["image"].rpartition("/")[2],  # "00000001_000.png" or ".dcm"
        "Finding Labels": record["finding_labels"],
        "Follow-up #": record.get("follow_up", 0),  # a pairs job's counterfactuals: 1, 2, …
        "Patient ID": patient_id(record["index"]),
        "Patient Age": SYNTHETIC_AGE,
        "Patient Gender": SYNTHETIC_GENDER,
        "View Position": SYNTHETIC_VIEW,
        "OriginalImage[Width": resolution,
        "Height]": resolution,
        "OriginalImagePixelSpacing[x": spacing,
        "y]": spacing,
    }
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([values[column] for column in DATA_ENTRY_COLUMNS])
    return buffer.getvalue().encode()


class LabelCounter:
    """Counts of each finding and of "No Finding" over records' Finding Labels."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(LABELS), np.int64)
        self.no_finding = 0
        self.images = 0
        self.satisfied = 0
        self.accepted_without_steps = 0
        self.near_copies_dropped = 0
        self.verify_retries = 0  # auditor rejections made again, over kept and dropped images
        self.unverified_dropped = 0
        self.pairs_made = 0  # a pairs job's counterfactuals stored
        self.pairs_confirmed = 0  # of those, the auditor sees the finding absent before and present after
        self.pairs_dropped = 0  # edits the auditor did not verify, and the pairs of dropped references

    def add_pairs(self, record: dict[str, Any]) -> None:
        """Count an index's pairs (none outside a pairs job)."""
        for pair in record.get("pairs", []):
            kept = not is_dropped(pair)
            self.pairs_made += int(kept)
            self.pairs_confirmed += int(kept and bool(pair.get("auditor_confirms")))
            self.pairs_dropped += int(not kept)

    def add_dropped(self, record: dict[str, Any]) -> None:
        """Count a dropped index's retries (its attempts, all rejected)."""
        self.unverified_dropped += 1
        self.verify_retries += int(record["verify_retries"])

    def add(self, record: dict[str, Any]) -> None:
        vector = parse_finding_labels(record["finding_labels"])
        self.counts += vector.astype(np.int64)
        self.no_finding += int(not vector.any())
        self.images += 1
        self.satisfied += int(bool(record.get("satisfied")))
        self.accepted_without_steps += int(bool(record.get("accepted_without_steps")))
        self.near_copies_dropped += int(record.get("near_copies_dropped", 0))
        self.verify_retries += int(record.get("verify_retries", 0))

    def as_dict(self) -> dict[str, int]:
        result = {label: int(count) for label, count in zip(LABELS, self.counts)}
        result["No Finding"] = self.no_finding
        return result


def marker_document(
    *,
    job: dict[str, Any],
    counter: LabelCounter,
    shard_count: int,
    manifests: dict[str, str],
    csv_sha256: str,
    image_bytes: int,
    pairs_csv_sha256: str | None = None,
) -> dict[str, Any]:
    """The commit marker; ``pairs_csv_sha256``: Pairs.csv's, in a pairs job (which also gets a ``pairs`` count)."""
    verification = {"verification": {"retries": counter.verify_retries, "unverified_dropped": counter.unverified_dropped}
                    } if "verify" in job else {}
    pairs = {"pairs": {"made": counter.pairs_made, "auditor_confirmed": counter.pairs_confirmed,
                       "dropped": counter.pairs_dropped}} if pairs_csv_sha256 is not None else {}
    files = {CSV_KEY: csv_sha256, **({PAIRS_CSV_KEY: pairs_csv_sha256} if pairs_csv_sha256 is not None else {})}
    return {
        **verification,
        **pairs,
        "format": ARCHIVE_FORMAT,
        "job": job,
        "images": counter.images,
        "satisfied": counter.satisfied,
        "accepted_without_steps": counter.accepted_without_steps,
        "near_copies_dropped": counter.near_copies_dropped,
        "image_bytes": image_bytes,
        "shards": shard_count,
        "label_counts": counter.as_dict(),
        "files": files,
        "manifests": manifests,
        "completed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
