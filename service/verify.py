"""Auditor verification of LCO's images, and the derived seeds every retry of an image draws from.

LCO's label is what the steering classifier believes. A bundle with an ``auditor.onnx`` (another
network, seed and phantom stream, never used by LCO; service/bundle.py) can check it: an image is
*verified* when the auditor, at its own thresholds, puts every constrained label on the requested
side (probability ≥ threshold means present, as in ``service.lco.satisfied`` with no margin). An image
the auditor disagrees with is made again from a derived seed, ``retry_seed(seed, attempt)``, up to a
bound of retries.

This module is the verification step around the engine's results, used by ``POST /generate``
(service/generate.py, inside its asynchronous retry loop), by archive jobs (service/archive/runner.py,
through :func:`generate_accepted`) and by ``benchmarks/bench_verify.py``; the LCO loop itself knows
nothing of it.

Determinism: the auditor reads one image per call, so its verdict on an image depends on that image
alone (ONNX Runtime picks kernels by input shape; a verdict near a threshold must not flip with the
number of images judged together). With the derived seeds that keeps a request, and an archive rerun,
byte-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from service.auditor import Auditor
from service.labels import LABELS

if TYPE_CHECKING:  # service.lco loads ONNX Runtime; the archive CLI imports this module before it needs it
    from service.lco import SampleRequest, SampleResult

MAX_RETRY_SEED = 2**53 - 1  # service.schemas.MAX_SEED: seeds every JSON client round-trips exactly


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of retry ``attempt`` (1, 2, …) of the image of seed ``seed``: a pure function of the two
    (NumPy's SeedSequence over [seed, attempt], two 64-bit words folded into [0, 2**53 − 1]). Strict
    retries, near-copy replacements and auditor rejections share the attempt count of an image, so
    attempt k of an image always draws the same seed whatever made the earlier attempts fail."""
    state = np.random.SeedSequence([seed, attempt]).generate_state(2, np.uint64)
    return int((int(state[0]) << 11 ^ int(state[1])) % (MAX_RETRY_SEED + 1))


@dataclass(frozen=True)
class Verdict:
    """The auditor on one image: its probabilities [14] (label order) and whether it agrees."""

    probabilities: np.ndarray
    verified: bool

    def rounded(self) -> dict[str, float]:
        """The probabilities as {label: p} rounded to 6 decimals, as the API and manifests report them."""
        return {label: round(float(p), 6) for label, p in zip(LABELS, self.probabilities)}


class Verifier:
    """Judges LCO images with a bundle's auditor; counts the verdicts in the service's metrics."""

    def __init__(self, auditor: Auditor, metrics: Any = None, source: str = "generate"):
        """``metrics``: a ``service.metrics.ServiceMetrics`` (None: not counted); ``source``: its label
        ("generate" or "archive")."""
        self.auditor = auditor
        self.metrics = metrics
        self.source = source

    @classmethod
    def of_bundle(cls, bundle: Any, metrics: Any = None, source: str = "generate") -> Verifier | None:
        """The verifier of ``bundle``'s auditor, or None when the bundle has none."""
        auditor = Auditor.of_bundle(bundle)
        return None if auditor is None else cls(auditor, metrics, source)

    def judge(self, samples: Sequence[SampleRequest], results: Sequence[SampleResult]) -> list[Verdict]:
        """One verdict per result: does the auditor see ``samples[i]``'s constraints in ``results[i].image``?

        An unconstrained sample (mask all 0) is verified by definition. Raises ValueError for an image
        that is not [R, R] at the bundle's resolution."""
        from service.lco import satisfied

        verdicts = []
        for sample, result in zip(samples, results, strict=True):
            probabilities = self.auditor.probabilities(np.asarray(result.image, np.float32)[None])[0]
            agrees = bool(satisfied(probabilities[None], sample.target[None], sample.mask[None],
                                    self.auditor.thresholds, 0.0)[0])
            verdicts.append(Verdict(probabilities, agrees))
            if self.metrics is not None:
                self.metrics.record_verification(_positives(sample), bool(sample.mask.any()), agrees, self.source)
        return verdicts


def _positives(sample: SampleRequest) -> list[str]:
    return [LABELS[i] for i in np.flatnonzero((sample.mask > 0.5) & (sample.target > 0.5))]


@dataclass
class Accepted:
    """What became of one requested image after its retries.

    ``result``: the last attempt's (the one kept); ``verdict``: the auditor's on it (None without a
    verifier); ``attempts``: 1 + retries; ``total_steps``: LCO steps over every attempt; ``first``:
    the first attempt's result (what the image would have been without verification);
    ``near_copies_dropped``: attempts replaced as near-copies of the training set.
    """

    result: SampleResult
    verdict: Verdict | None
    attempts: int
    total_steps: int
    first: SampleResult
    first_verdict: Verdict | None
    near_copies_dropped: int = 0

    @property
    def verified(self) -> bool | None:
        return None if self.verdict is None else self.verdict.verified


class NearCopyLimitReached(RuntimeError):
    """An image stayed a near-copy through ``max_near_copy_replacements`` replacements; ``seed`` is its seed."""

    def __init__(self, seed: int):
        self.seed = seed
        super().__init__(seed)


def generate_accepted(
    generate: Callable[[list[SampleRequest]], list[SampleResult]],
    samples: Sequence[SampleRequest],
    *,
    verifier: Verifier | None,
    verify_retries: int,
    is_near_copy: Callable[[list[np.ndarray]], Sequence[bool]] | None = None,
    max_near_copy_replacements: int = 0,
) -> list[Accepted]:
    """Make ``samples`` with ``generate`` (e.g. ``LCOEngine.generate``), then remake each image that is
    a near-copy (``is_near_copy``, images [R, R] → flags) or that ``verifier`` rejects, from
    ``retry_seed(seed, attempt)``, until it passes. Near-copies are always replaced (NearCopyLimitReached
    after ``max_near_copy_replacements``); an auditor rejection is retried at most ``verify_retries``
    times, after which the last attempt is kept with its failing verdict. Retries of a round run
    together; an image's attempts and seeds do not depend on the other samples."""
    results = generate(list(samples))
    accepted = [Accepted(result, None, 1, result.steps, result, None) for result in results]
    rejections = [0] * len(samples)
    todo = list(range(len(samples)))
    while todo:
        copies = list(is_near_copy([accepted[i].result.image for i in todo])) if is_near_copy else [False] * len(todo)
        judged = [i for i, copy in zip(todo, copies) if not copy]
        if verifier is not None:
            for i, verdict in zip(judged, verifier.judge([samples[i] for i in judged],
                                                         [accepted[i].result for i in judged])):
                accepted[i].verdict = verdict
                if accepted[i].attempts == 1:
                    accepted[i].first_verdict = verdict
        retry = []
        for i, copy in zip(todo, copies):
            if copy:
                accepted[i].near_copies_dropped += 1
                if accepted[i].near_copies_dropped > max_near_copy_replacements:
                    raise NearCopyLimitReached(samples[i].seed)
                retry.append(i)
            elif accepted[i].verdict is not None and not accepted[i].verdict.verified and rejections[i] < verify_retries:
                rejections[i] += 1
                retry.append(i)
        if retry:
            remade = generate([replace(samples[i], seed=retry_seed(samples[i].seed, accepted[i].attempts)) for i in retry])
            for i, result in zip(retry, remade, strict=True):
                accepted[i].result, accepted[i].verdict = result, None
                accepted[i].attempts += 1
                accepted[i].total_steps += result.steps
        todo = retry
    return accepted
