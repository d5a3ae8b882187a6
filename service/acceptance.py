"""How often the generator already makes what a request asks for, and what that buys: the rejection
budget of rejection-first LCO (service/lco.py).

A bundle may carry ``acceptance.npz`` (written by the export, listed and checksummed in the
manifest): the classifier's logits on ``samples`` unconditional generator samples drawn from fixed
seeds, and the measured cost of one ``lco_step`` evaluation in forward passes (generator +
classifier) on the exporting machine. A request's *acceptance rate* is the share of those samples
that meet it at LCO's acceptance rule (``service.lco.satisfied`` at the margin): a pure function of
the bundle and the request, so the budget it sets, and with it every image, stays a function of
(bundle, seed, labels, options). Bundles without the file fall back to the request's share of the
NIH ChestX-ray14 label table (``service.prior.nih_prior``) and to ``DEFAULT_STEP_COST``.

The budget is the ski-rental rule (Karlin, Manasse, Rudolph & Sleator, "Competitive snoopy
caching", Algorithmica 3, 1988): rejection is tried only when its expected cost, 1/rate
forward passes, is below LCO's cost at its step cap (``steps`` × step cost), and then for at most
that many draws, capped by ``max_candidates``. If the rate misleads, a sample spends at most LCO's
own cost on candidates before LCO starts: never more than twice LCO alone. Rare requests score only
the ``candidates`` pool LCO starts from.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.labels import NUM_LABELS
from service.step_graph import lco_step_feeds

ACCEPTANCE_FILE = "acceptance.npz"
# Latents of the table come from seeds ACCEPTANCE_SEED + i, one per sample (service.lco.draw_latents).
ACCEPTANCE_SEED = 7_000_000_000
DEFAULT_ACCEPTANCE_SAMPLES = 2048
# One gradient by reverse-mode differentiation costs a small multiple of the function, about 3 in
# practice (the "cheap gradient principle", Griewank & Walther, Evaluating Derivatives, 2008, sec. 4.6).
DEFAULT_STEP_COST = 3.0


@dataclass(frozen=True)
class AcceptanceTable:
    """The bundle classifier's logits [N, 14] on N unconditional generator samples, and one
    ``lco_step`` evaluation's cost in forward passes (> 0)."""

    logits: np.ndarray  # float32 [N, 14]
    step_cost: float

    def rate(self, target: np.ndarray, mask: np.ndarray, thresholds: np.ndarray, margin: float,
             absent_margin: float | None = None) -> float:
        """Share in [0, 1] of the samples meeting target[14] on mask[14] past each threshold by
        ``margin`` logits, absent labels by ``absent_margin`` where smaller (``service.lco.satisfied``)."""
        from service.lco import satisfied

        count = len(self.logits)
        probs = 1.0 / (1.0 + np.exp(-self.logits.astype(np.float64)))
        hits = satisfied(probs, np.broadcast_to(target, (count, NUM_LABELS)), np.broadcast_to(mask, (count, NUM_LABELS)),
                         thresholds, margin, absent_margin)
        return float(hits.mean())

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, logits=self.logits.astype(np.float32), step_cost=np.float64(self.step_cost))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> AcceptanceTable:
        """Raises ValueError for a file that is not an acceptance table."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                logits, step_cost = arrays["logits"], float(arrays["step_cost"])
        except (OSError, KeyError, ValueError) as error:
            raise ValueError(f"not an acceptance table ({error})") from None
        if logits.ndim != 2 or logits.shape[1] != NUM_LABELS or not len(logits) or not np.isfinite(logits).all():
            raise ValueError(f"logits must be finite [N >= 1, {NUM_LABELS}], got {list(logits.shape)}")
        if not (math.isfinite(step_cost) and step_cost > 0):
            raise ValueError(f"step_cost must be a positive number, got {step_cost}")
        return cls(logits.astype(np.float32), step_cost)


def prior_rate(target: np.ndarray, mask: np.ndarray) -> float:
    """Share in [0, 1] of NIH ChestX-ray14 images whose labels agree with target[14] on mask[14]."""
    from service.prior import nih_prior

    prior = nih_prior()
    constrained = mask > 0.5
    agree = np.all((prior.combinations[:, constrained] > 0.5) == (target[constrained] > 0.5), axis=1)
    return float(prior.probabilities[agree].sum())


def rejection_budget(rate: float, steps: int, step_cost: float, candidates: int, max_candidates: int) -> int:
    """Latents a sample may score before LCO starts (at least ``candidates``).

    ``rate``: the request's acceptance rate in [0, 1]; ``steps``: LCO's step cap; ``step_cost``: one
    step in forward passes. Rejection runs when 1/rate < steps × step_cost, for that many draws
    (ski rental: module docstring), capped at ``max_candidates``; otherwise only the ``candidates``
    pool LCO starts from is scored.
    """
    lco_cost = steps * step_cost
    if rate <= 0 or 1.0 / rate >= lco_cost:
        return candidates
    return max(candidates, min(max_candidates, math.ceil(lco_cost)))


def measure_acceptance(generator: Any, classifier: Any, lco_step: Any, latent_dim: int,
                       samples: int = DEFAULT_ACCEPTANCE_SAMPLES, rows: int = 16, progress: bool = True) -> AcceptanceTable:
    """Score ``samples`` latents (seeds ``ACCEPTANCE_SEED + i``) with the generator and classifier
    ONNX Runtime sessions, and time ``lco_step`` against a forward pass on the same ``rows`` latents
    (the median of three). ValueError if ``samples`` < 1."""
    from tqdm import tqdm

    from service.lco import draw_latents

    if samples < 1:
        raise ValueError(f"an acceptance table needs at least one sample, got {samples}")
    latents = np.concatenate([draw_latents(ACCEPTANCE_SEED + i, 1, latent_dim, None) for i in range(samples)])

    def forward(z: np.ndarray) -> np.ndarray:
        return classifier.run(["logits"], {"image": generator.run(["image"], {"z": z})[0]})[0]

    logits = []
    for start in tqdm(range(0, samples, rows), desc="acceptance table", unit="batch", disable=not progress):
        logits.append(forward(latents[start : start + rows]))
    probe = latents[:rows]
    target = np.zeros((len(probe), NUM_LABELS), np.float32)
    mask = np.ones_like(target)

    def seconds(run: Any) -> float:
        run()  # warm: kernel choice and allocations
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    step_cost = (seconds(lambda: lco_step.run(None, lco_step_feeds(lco_step, probe, target, mask)))
                 / seconds(lambda: forward(probe)))
    return AcceptanceTable(np.concatenate(logits).astype(np.float32), step_cost)
