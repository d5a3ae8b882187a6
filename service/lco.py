"""Latent class optimisation (LCO): steer the unconditional generator towards requested findings.

Rejection first (``LCOOptions.rejection_first``, the default): every requested image scores latents
drawn from its own seed, in seed order, with forward passes (generator + classifier); the first that
already meets the request at the rule LCO stops on (``satisfied`` at ``margin``) is returned with 0
steps. Only if none does within the sample's rejection budget does LCO start, from the lowest masked
BCE among the first ``candidates`` latents. The budget follows the request's acceptance rate under
the bundle (service/acceptance.py: at least ``candidates``, more only where drawing is expected to
be cheaper than LCO, at most ``max_candidates``). With ``rejection_first`` off the engine is the one
before it: ``candidates`` latents scored at once, the best returned if it meets the request, else
optimised.

LCO runs Adam on ``z`` against the masked binary cross-entropy between the classifier's logits on
G(z) and the target labels, computed together with its gradient by ``lco_step.onnx``. After every
step ``z`` is projected back onto the sphere of radius sqrt(latent_dim): the PGGAN generator
pixel-normalises its input, so that sphere is where the prior puts its mass. A sample stops as soon
as every constrained label is past its decision threshold (by ``margin`` logits; a label requested
absent by ``absent_margin``, where that is smaller), or when its step cap is reached.

Why the LCO start is the best of the first ``candidates`` and not of every latent scored: the start,
and so every image that needs LCO, stays what it was before rejection first and does not move when
the budget does (a new acceptance table, another ``max_candidates``); the quality measured in
docs/lco-quality.md is of exactly these starts. A larger pool would buy a slightly better start for
the few requests that get a budget beyond ``candidates`` and still find no hit in it.

Fairness: a searching sample scores one chunk of ``compute_batch`` latents per round of the running
batch, beside the one Adam step of every sample already stepping. A round thus never holds more than
a chunk of forward passes per searching sample (a step costs several: the bundle's ``step_cost``), so
a sample with a budget of a thousand latents cannot stall the samples stepping beside it, and no
latent is scored past a sample's first hit beyond its chunk (none at ``compute_batch`` 1, the CPU's).
The price is latency for a long search when the batch is busy, which is the throughput-fair share.

Steer cheap, accept strict: a bundle may steer by a cheaper network than its classifier (a
``steering`` section in its manifest: ``lco_step.onnx`` computes the gradient and the probabilities of
a one-CNN student of the classifier's ensemble). The classifier still decides: candidates are scored
by it, and a stepping sample stops only when the classifier, run forward on the step's image, meets
the request at the margin. It is consulted when the steering network first meets the request, again
every ``RECHECK_STEPS`` steps while that network still does, and at the step cap; the fallback and
best points are chosen among the images it judged. So every image carries the classifier's label,
while a step costs the steering network's passes, not the classifier's (docs/lco-quality.md).

Samples are optimised in a *running batch* (:class:`LCOBatch`): finished samples leave and waiting
ones join between steps, so one slow sample never holds a batch hostage and a server can merge
concurrent requests without waiting for the slowest. Every sample keeps its own Adam state, step
size and step cap, and all of its randomness comes from its own seed: its image does not depend on
what else shares the batch.

The Adam update and the sphere projection run as a small ONNX graph next to ``lco_step.onnx``, bound
with IOBinding, so on CUDA ``z``, the moments and the gradient stay on the device between steps;
only the probabilities (B x 14) and losses come back to the host each step, images only for samples
that finish. Rows are compacted through the host only when the batch's membership changes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol, TypeAlias

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.acceptance import DEFAULT_STEP_COST, AcceptanceTable, prior_rate, rejection_budget
from service.bundle import available_cpus
from service.labels import NUM_LABELS
from service.openapi import openapi_30_nullable
from service.step_graph import reference_shape

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8
# Logits are clipped here when probabilities are turned back into logits for the margin test.
_PROB_EPS = 1e-7


MAX_MARGIN = 4.0  # logits; a sample asked for this margin keeps stepping (warm-up, tests)
# Steps between two of the classifier's checks of a sample the steering network has already steered
# to its request (module docstring); docs/lco-quality.md measures what it costs.
RECHECK_STEPS = 8


class LCOOptions(BaseModel):
    """Knobs of one LCO run, with their bounds: the one model behind the engine, the HTTP request's
    ``lco`` field and the archive spec's ``lco``. ValidationError (a ValueError) names a field out of
    its bounds or unknown. Why each default: docs/lco-quality.md."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False, title="LCO options",
                              json_schema_extra=openapi_30_nullable)

    steps: int = Field(200, ge=0, le=1000, description="cap on Adam steps per sample (0: candidates only)")
    lr: float = Field(0.05, ge=1e-4, le=1.0, description="Adam step size on z, whose norm is sqrt(latent_dim)")
    candidates: int = Field(
        32, ge=1, le=64,
        description="latents drawn per sample and scored with one forward pass; the best is optimised "
        "(one that already leans towards the request leaves LCO less to draw)",
    )
    truncation: float | None = Field(
        None, ge=0.5, le=4.0,
        description="if set, latents come from a normal truncated at this many standard deviations "
        "(entries beyond it are redrawn): less diverse, more typical images",
    )
    margin: float = Field(
        1.8, ge=0.0, le=MAX_MARGIN,
        description="a sample stops once each constrained label's logit is this far past its threshold's "
        "logit (0: at the threshold); 'satisfied' is always judged at the threshold",
    )
    absent_margin: float = Field(
        1.0, ge=0.0, le=MAX_MARGIN,
        description="a label requested absent needs to lie only this far below its threshold's logit (or "
        "the margin in force, margin or fallback_margin, where that is smaller): a classifier of clipped votes "
        "rarely puts every absent label as far below as it puts a present one above",
    )
    fallback_margin: float = Field(
        1.5, ge=0.0, le=MAX_MARGIN,
        description="a sample out of steps before reaching margin returns the earliest point of its "
        "trajectory this far past the threshold (else its best point)",
    )
    patience: int | None = Field(
        None, ge=0, le=1000,
        description="a sample past its fallback_margin stops this many steps later if it has not reached its "
        "margin by then, returning the point it would return at its step cap (null: it steps on to the cap)",
    )
    balance_sides: bool = Field(
        True,
        description="labels requested present weigh as much in the loss, together, as labels requested absent "
        "(each present label #absent/#present): a finding is not one fourteenth of an exclusive request's loss "
        "(false: every constrained label weighs 1; a mask that carries its own weights, POST /edit's, is used as given)",
    )
    rejection_first: bool = Field(
        True,
        description="score the sample's latents in seed order and return the first that meets the request at "
        "margin, with 0 steps; LCO starts, from the best of the first `candidates`, only if none does within the "
        "rejection budget (false: the best of `candidates` is returned or optimised at once)",
    )
    max_candidates: int = Field(
        1024, ge=1, le=65536,
        description="cap on the rejection budget, the latents a sample scores before LCO starts; within it the "
        "budget follows how often the bundle's generator meets the request (at least `candidates`)",
    )

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, values: Any) -> Any:
        unknown = sorted(set(values) - set(cls.model_fields)) if isinstance(values, dict) else []
        if unknown:
            raise ValueError(f"unknown LCO option(s) {', '.join(unknown)}; valid: {', '.join(cls.model_fields)}")
        return values


@dataclass(frozen=True)
class SampleRequest:
    """One image to make: target[14] and mask[14] in ``service.labels.LABELS`` order.

    mask[i] = 1 constrains label i to target[i] (1 present, 0 absent; a value in between steers the
    label's probability towards it); mask[i] = 0 leaves it free. A mask value above 1 is that label's
    weight in the loss (the masked BCE is a weighted mean; POST /edit weighs the labels it changes).
    ``options`` overrides the engine's default options for this sample.

    ``start`` [latent_dim], on the sphere, replaces the candidates and the rejection search: LCO starts
    from it (POST /edit starts from an earlier image's latent), and ``pull`` adds
    (pull / 2) * |z - start|^2 to the loss so that z stays near it. ``reference`` [H, W] in [-1, 1]
    with ``image_pull`` adds image_pull * mean((G(z) - reference)^2) over pixels, computed in the step
    graph (a bundle whose graph takes no reference refuses it: ``LCOEngine.image_proximity``).
    ``judged`` [14] names the labels whose side of the threshold decides "satisfied" and when the
    sample stops (default: ``mask``); labels constrained but not judged are only steered.
    """

    target: np.ndarray
    mask: np.ndarray
    seed: int
    options: LCOOptions | None = None
    start: np.ndarray | None = None
    pull: float = 0.0
    judged: np.ndarray | None = None
    reference: np.ndarray | None = None
    image_pull: float = 0.0

    def loss_weights(self, options: LCOOptions) -> np.ndarray:
        """[14] float32: each label's weight in the masked BCE (``loss_weights``)."""
        return loss_weights(self.target, self.mask, options.balance_sides)

    @property
    def judged_labels(self) -> np.ndarray:
        """[14] float32: the labels that decide "satisfied" (``judged``, else ``mask``)."""
        return np.asarray(self.mask if self.judged is None else self.judged, np.float32).reshape(NUM_LABELS)


@dataclass(frozen=True)
class SampleResult:
    image: np.ndarray  # [H, W] float32 in [-1, 1]
    probabilities: np.ndarray  # [14] float32, classifier probabilities of the returned image
    satisfied: bool  # every judged label on the requested side of its threshold
    steps: int  # Adam steps taken
    seed: int
    latent: np.ndarray  # [latent_dim] float32, the z of the returned image
    accepted_without_steps: bool = False  # a scored latent met the request at the margin; no LCO
    candidates_scored: int = 0  # latents scored for it (up to the accepted one, or the whole budget)


class _ManifestLike(Protocol):
    latent_dim: int


class BundleLike(Protocol):
    """What the engine needs from a loaded bundle (``service.bundle.Bundle`` provides it).

    ``sessions`` holds ONNX Runtime sessions named "generator", "classifier" and "lco_step";
    ``thresholds`` the 14 decision thresholds as probabilities.
    """

    manifest: _ManifestLike
    sessions: dict[str, ort.InferenceSession]

    @property
    def thresholds(self) -> np.ndarray: ...


@dataclass
class EngineStats:
    """Work done, counted in samples pushed through each graph (for cost accounting)."""

    forward_samples: int = 0  # generator + classifier forward passes (candidate scoring)
    step_samples: int = 0  # lco_step evaluations (forward + input gradient)
    checked_samples: int = 0  # classifier forward passes on a step's image (a steering network's bundle)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, forward: int = 0, step: int = 0, checked: int = 0) -> None:
        with self.lock:
            self.forward_samples += forward
            self.step_samples += step
            self.checked_samples += checked


class LatentStream:
    """A sample's latents in seed order (PCG64 from ``seed`` alone), on the sphere of radius sqrt(d):
    ``draw(k)`` gives the next k [k, latent_dim], so drawing 3 then 5 gives the first 8."""

    def __init__(self, seed: int, latent_dim: int, truncation: float | None):
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.latent_dim = latent_dim
        self.truncation = truncation

    def draw(self, count: int) -> np.ndarray:
        latents = np.empty((count, self.latent_dim), dtype=np.float32)
        for row in range(count):
            z = self.rng.standard_normal(self.latent_dim, dtype=np.float32)
            if self.truncation is not None:
                outside = np.abs(z) > self.truncation
                while outside.any():
                    z[outside] = self.rng.standard_normal(int(outside.sum()), dtype=np.float32)
                    outside = np.abs(z) > self.truncation
            latents[row] = z
        return project_to_sphere(latents)


def draw_latents(seed: int, count: int, latent_dim: int, truncation: float | None) -> np.ndarray:
    """``count`` latents [count, latent_dim] from ``seed`` alone, on the sphere of radius sqrt(d).

    The first latents do not depend on ``count``: one candidate is the first of eight.
    """
    return LatentStream(seed, latent_dim, truncation).draw(count)


def project_to_sphere(z: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return (z * (math.sqrt(z.shape[1]) / np.maximum(norm, 1e-12))).astype(np.float32)


def weigh_equally(constrained: np.ndarray, heavy: np.ndarray) -> np.ndarray:
    """[14] float32 loss weights: 1 for each ``constrained`` label, (#constrained others)/#heavy for
    each ``heavy`` one, so the heavy labels together weigh as much as the rest (0 for free labels)."""
    weights = constrained.astype(np.float32)
    if heavy.any() and (constrained & ~heavy).any():
        weights[heavy] = (constrained & ~heavy).sum() / heavy.sum()
    return weights


def loss_weights(target: np.ndarray, mask: np.ndarray, balance_sides: bool) -> np.ndarray:
    """[14] float32: each label's weight in the masked BCE. ``mask`` itself, except that with
    ``balance_sides`` a mask of 0s and 1s constraining labels on both sides weighs the present ones as
    much as the absent ones (``weigh_equally``; ``LCOOptions.balance_sides``)."""
    weights = np.asarray(mask, np.float32).reshape(NUM_LABELS).copy()
    if not balance_sides or weights.max(initial=0.0) > 1.0:
        return weights
    constrained = weights > 0.5
    return weigh_equally(constrained, constrained & (np.asarray(target, np.float32).reshape(NUM_LABELS) > 0.5))


def masked_bce(logits: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-row masked BCE with logits, mean over constrained labels (0 where none): lco_step's loss."""
    per_label = np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))
    count = mask.sum(axis=1)
    return (per_label * mask).sum(axis=1) / np.maximum(count, 1.0)


def labels_off_target(
    probs: np.ndarray, target: np.ndarray, mask: np.ndarray, thresholds: np.ndarray, margin: np.ndarray | float,
    absent_margin: np.ndarray | float | None = None,
) -> np.ndarray:
    """Per row, how many constrained labels are not past their threshold by ``margin`` logits (labels
    requested absent: by ``absent_margin`` where that is smaller; None: ``margin`` for both sides)."""
    logits = _logit(probs)
    threshold_logits = _logit(thresholds)[None, :]
    margin = np.asarray(margin, dtype=np.float32).reshape(-1, 1)
    below = margin if absent_margin is None else np.minimum(margin, np.asarray(absent_margin, np.float32).reshape(-1, 1))
    positive_ok = logits >= threshold_logits + margin
    negative_ok = logits < threshold_logits - below
    ok = np.where(target > 0.5, positive_ok, negative_ok)
    return np.sum(~ok & (mask > 0.5), axis=1)


def satisfied(
    probs: np.ndarray, target: np.ndarray, mask: np.ndarray, thresholds: np.ndarray, margin: np.ndarray | float,
    absent_margin: np.ndarray | float | None = None,
) -> np.ndarray:
    """Rows whose every constrained label lies past its threshold by ``margin`` logits (absent labels:
    ``absent_margin`` where smaller; ``labels_off_target``)."""
    return labels_off_target(probs, target, mask, thresholds, margin, absent_margin) == 0


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _PROB_EPS, 1 - _PROB_EPS)
    return np.log(p) - np.log1p(-p)


ADAM_GRAPH = "data/adam_sphere_step.onnx"  # written by training.export.onnx_graphs.build_adam_sphere_graph


def adam_graph_bytes() -> bytes:
    return resources.files("service").joinpath(ADAM_GRAPH).read_bytes()


def _device_of(session: ort.InferenceSession) -> tuple[str, int]:
    """The (device type, id) that IOBinding should keep tensors on for this session."""
    if session.get_providers()[0] == "CUDAExecutionProvider":
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


# Rows per graph call on CUDA: a GPU runs 16 rows in about the time of one at the demo's size, and a
# shape it has already tuned its kernels for is free of cuDNN's algorithm search (BENCHMARKS.md).
CUDA_COMPUTE_BATCH = 16


Take: TypeAlias = Callable[[int], "list[tuple[SampleRequest, Any]] | None"]
Fail: TypeAlias = Callable[[list[Any], BaseException], None]


@dataclass(frozen=True)
class Graphs:
    """The ONNX Runtime sessions one graph call runs on."""

    generator: Any
    classifier: Any
    lco_step: Any


class LCOEngine:
    """Latent class optimisation over a loaded bundle. Thread-safe: graph calls are serialised.

    Every graph runs on exactly ``compute_batch`` rows per call (the last call of a pass padded with
    copies of its first row). ONNX Runtime picks kernels by input shape, and LCO's hundreds of
    gradient steps amplify their last-bit differences into different pixels; at one fixed shape a
    row's outputs depend on that row alone, whatever the other rows hold and wherever it sits. So an
    image is a function of (bundle, execution provider, ``compute_batch``, seed, labels, options),
    whatever else shares its batch, how many images its request asked for, or the server's load.
    """

    def __init__(self, bundle: BundleLike, options: LCOOptions | None = None, max_batch: int = 64,
                 compute_batch: int | None = None, parallel_chunks: int | None = None):
        """``max_batch``: most samples in one running batch. ``compute_batch``: rows per graph call
        (None: 1 on the CPU, where batching gains nothing on the demo bundle, ``CUDA_COMPUTE_BATCH``
        on CUDA). ``parallel_chunks``: graph calls of one pass run side by side on that many threads
        (None: the CPUs this process may use on the CPU, 1 on CUDA). ValueError if any is below 1."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.bundle = bundle
        self.options = options or LCOOptions()
        self.max_batch = max_batch
        self.latent_dim = int(bundle.manifest.latent_dim)
        self.generator = bundle.sessions["generator"]
        self.classifier = bundle.sessions["classifier"]
        self.lco_step = bundle.sessions["lco_step"]
        # the reference's [H, W] (None: a step graph exported before the image proximity term)
        self.reference_shape = reference_shape(self.lco_step)
        self.image_proximity = self.reference_shape is not None
        self._zero_reference: ort.OrtValue | None = None
        self.thresholds = np.asarray(bundle.thresholds, dtype=np.float32)
        if self.thresholds.shape != (NUM_LABELS,):
            raise ValueError(f"bundle thresholds must have {NUM_LABELS} entries, got {self.thresholds.shape}")
        # A steering network of its own (module docstring): its thresholds, and the classifier checks.
        self.checks_steps = getattr(bundle.manifest, "steering", None) is not None
        self.steering_thresholds = (np.asarray(bundle.steering_thresholds, np.float32) if self.checks_steps
                                    else self.thresholds)
        self.device_type, self.device_id = _device_of(self.lco_step)
        if compute_batch is None:
            compute_batch = CUDA_COMPUTE_BATCH if self.device_type == "cuda" else 1
        if compute_batch < 1:
            raise ValueError(f"compute_batch must be at least 1, got {compute_batch}")
        self.compute_batch = compute_batch
        if parallel_chunks is None:
            parallel_chunks = 1 if self.device_type == "cuda" else available_cpus()
        if parallel_chunks < 1:
            raise ValueError(f"parallel_chunks must be at least 1, got {parallel_chunks}")
        self.parallel_chunks = parallel_chunks
        self._chunk_threads = (ThreadPoolExecutor(parallel_chunks, thread_name_prefix="lco-chunk")
                               if parallel_chunks > 1 else None)
        self.graphs = Graphs(self.generator, self.classifier, self.lco_step)
        # Calls side by side each on one thread: two sessions' threads would contend for the same cores.
        single_thread = getattr(bundle, "single_thread_sessions", None)
        self.parallel_graphs = (Graphs(**single_thread()) if self._chunk_threads is not None
                                and self.device_type == "cpu" and single_thread is not None else self.graphs)
        providers = self.lco_step.get_providers()
        provider_options = [self.lco_step.get_provider_options().get(p, {}) for p in providers]
        self.adam = ort.InferenceSession(
            adam_graph_bytes(),
            providers=providers,
            provider_options=provider_options,
        )
        self.radius_value = self.to_device(np.array([math.sqrt(self.latent_dim)], np.float32))
        # the bundle's acceptance table (None: the NIH prior's rates, service/acceptance.py)
        self.acceptance: AcceptanceTable | None = getattr(bundle, "acceptance", None)
        self.stats = EngineStats()
        self.lock = threading.Lock()

    def acceptance_rate(self, target: np.ndarray, mask: np.ndarray, margin: float,
                        absent_margin: float | None = None) -> float:
        """Share in [0, 1] of the generator's samples that meet target[14] on mask[14] at ``margin``
        (absent labels at ``absent_margin`` where smaller): from the bundle's acceptance table, else the
        request's share of the NIH label table."""
        if self.acceptance is None:
            return prior_rate(target, mask)
        return self.acceptance.rate(target, mask, self.thresholds, margin, absent_margin)

    @property
    def step_cost(self) -> float:
        """One lco_step evaluation in forward passes: the table's measurement, else DEFAULT_STEP_COST."""
        return DEFAULT_STEP_COST if self.acceptance is None else self.acceptance.step_cost

    def rejection_budget(self, sample: SampleRequest) -> int:
        """Latents ``sample`` scores before LCO starts: ``candidates`` with rejection first off, else
        ``service.acceptance.rejection_budget`` of the request's acceptance rate."""
        options = sample.options or self.options
        if not options.rejection_first:
            return options.candidates
        target = np.asarray(sample.target, np.float32).reshape(NUM_LABELS)
        mask = np.asarray(sample.mask, np.float32).reshape(NUM_LABELS)
        rate = self.acceptance_rate(target, mask, options.margin, options.absent_margin)
        return rejection_budget(rate, options.steps, self.step_cost, options.candidates, options.max_candidates)

    def generate(self, samples: Sequence[SampleRequest]) -> list[SampleResult]:
        """Make one image per request, in order, in running batches of at most ``max_batch``."""
        results: list[SampleResult | None] = [None] * len(samples)
        pending = list(enumerate(samples))

        def take(running: int) -> list[tuple[SampleRequest, Any]] | None:
            nonlocal pending
            if not pending and not running:
                return None
            joining, pending = pending[: self.max_batch - running], pending[self.max_batch - running :]
            return [(sample, index) for index, sample in joining]

        def deliver(index: int, result: SampleResult) -> None:
            results[index] = result

        self.drive(take, deliver)
        return [r for r in results if r is not None]

    def drive(self, take: Take, deliver: Callable[[Any, SampleResult], None], fail: Fail | None = None,
              abandoned: Callable[[Any], bool] | None = None, on_step: Callable[[int], None] | None = None) -> None:
        """The one LCO loop, behind ``generate`` and the service's batcher.

        Before every step ``take(running)`` gives the (sample, tag) pairs that join the running batch
        (None: stop once the batch is empty); finished samples go to ``deliver(tag, result)`` as soon as
        they finish. Samples whose ``abandoned(tag)`` turns true leave before the next step and go to
        ``fail`` with a CancelledError. If a step raises, ``fail(tags, error)`` gets every sample in flight
        and the loop goes on with a fresh batch; without ``fail`` the error propagates.
        ``on_step(size)`` is called before each step with the batch's size (metrics).
        """
        batch = LCOBatch(self)
        while (joining := take(len(batch))) is not None:
            try:
                if joining:
                    for tag, result in batch.add([s for s, _ in joining], [t for _, t in joining]):
                        deliver(tag, result)
                if abandoned is not None and fail is not None:
                    leaving = [abandoned(tag) for tag in batch.tags]
                    if any(leaving):
                        fail(batch.discard(leaving), CancelledError("the request for this sample was cancelled"))
                if len(batch):
                    if on_step is not None:
                        on_step(len(batch))
                    for tag, result in batch.step():
                        deliver(tag, result)
            except Exception as error:  # a failing step fails its samples, not the loop
                if fail is None:
                    raise
                fail(list(dict.fromkeys([*batch.tags, *(t for _, t in joining)])), error)
                batch = LCOBatch(self)

    def warm_up(self) -> None:
        """A candidate pass and one LCO step on throwaway samples (allocations, kernel choice)."""
        target = np.zeros(NUM_LABELS, np.float32)
        mask = np.zeros(NUM_LABELS, np.float32)
        target[0] = mask[0] = 1.0
        # margin at its maximum keeps the samples in the batch so the step graph really runs.
        options = LCOOptions(steps=1, candidates=2, margin=MAX_MARGIN, rejection_first=False)
        batch = LCOBatch(self)
        batch.add([SampleRequest(target, mask, seed, options) for seed in range(self.compute_batch)],
                  list(range(self.compute_batch)))
        while len(batch):
            batch.step()

    def padded_rows(self, rows: int) -> int:
        """Rows the graphs compute for ``rows`` samples: a multiple of ``compute_batch``."""
        return -(-rows // self.compute_batch) * self.compute_batch

    def chunks(self, array: np.ndarray) -> list[np.ndarray]:
        """``array`` split into ``compute_batch``-row chunks, the last padded with its first row."""
        size = self.compute_batch
        pieces = [array[start : start + size] for start in range(0, len(array), size)]
        if pieces and len(pieces[-1]) < size:
            last = pieces[-1]
            pieces[-1] = np.concatenate([last, np.repeat(last[:1], size - len(last), axis=0)])
        return pieces

    # -- graph calls -------------------------------------------------------------------------
    def map_chunks(self, function: Callable[..., Any], *chunks: Sequence[Any]) -> list[Any]:
        """``function(graphs, *chunk)`` for the chunks (zipped like ``map``), results in order.

        Several chunks run side by side on ``parallel_chunks`` threads, each on the bundle's
        single-threaded sessions (``parallel_graphs``); a lone chunk on the sessions as loaded, which
        may use every intra-op thread. A chunk's outputs depend on its rows alone (one fixed shape per
        call, no thread-dependent sums in the graphs), so this changes no value. On the 2-core CPU two
        single-threaded calls at once do about 1.7× the work of one call on two threads (BENCHMARKS.md).
        """
        if self._chunk_threads is None or len(chunks[0]) < 2:
            return [function(self.graphs, *chunk) for chunk in zip(*chunks)]
        return list(self._chunk_threads.map(lambda *chunk: function(self.parallel_graphs, *chunk), *chunks))

    def score(self, latents: np.ndarray, keep_images: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """Images [N, H, W] (None unless ``keep_images``) and classifier logits [N, 14] of ``latents``
        (forward passes only). Candidates are scored without keeping their images: at 1024², 32
        candidates for 64 samples would hold 8 GB of pixels."""
        def score_chunk(graphs: Graphs, z: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
            image = graphs.generator.run(["image"], {"z": z})[0]
            return (image[:, 0] if keep_images else None), graphs.classifier.run(["logits"], {"image": image})[0]

        images, logits = zip(*self.map_chunks(score_chunk, self.chunks(latents)))
        self.stats.add(forward=self.padded_rows(len(latents)))
        count = len(latents)
        kept = np.concatenate(images)[:count] if keep_images else None
        return kept, np.concatenate(logits)[:count].astype(np.float32)

    def classify(self, images: np.ndarray) -> np.ndarray:
        """The classifier's logits [N, 14] on images [N, H, W] (forward passes only), at the fixed
        ``compute_batch`` shape like every graph call."""
        logits = self.map_chunks(lambda graphs, image: graphs.classifier.run(["logits"], {"image": image[:, None]})[0],
                                 self.chunks(images))
        self.stats.add(checked=self.padded_rows(len(images)))
        return np.concatenate(logits)[: len(images)].astype(np.float32)

    def render(self, latents: np.ndarray) -> np.ndarray:
        """Images [N, H, W] of ``latents`` (generator only)."""
        images = self.map_chunks(lambda graphs, z: graphs.generator.run(["image"], {"z": z})[0][:, 0],
                                 self.chunks(latents))
        return np.concatenate(images)[: len(latents)]

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def run_step_graph(self, graphs: Graphs, chunk: dict[str, ort.OrtValue]) -> tuple[ort.OrtValue, np.ndarray, ort.OrtValue]:
        """lco_step on one chunk's device tensors: (grad_z on the device, probs [S, 14], image on the device)."""
        binding = graphs.lco_step.io_binding()
        for name in ("z", "target", "mask", *(("reference", "image_pull") if self.image_proximity else ())):
            binding.bind_ortvalue_input(name, chunk[name])
        for name in ("loss", "grad_z", "probs", "image"):
            binding.bind_output(name, self.device_type, self.device_id)
        graphs.lco_step.run_with_iobinding(binding)
        _, grad, probs, image = binding.get_outputs()
        self.stats.add(step=self.compute_batch)
        return grad, probs.numpy(), image

    def check_image_proximity(self, sample: SampleRequest) -> None:
        """ValueError unless ``sample``'s image proximity term can run: a reference [H, W] of the step
        graph's image size with a finite pull ≥ 0, on a bundle whose step graph takes one."""
        if sample.image_pull == 0:
            return
        if not (math.isfinite(sample.image_pull) and sample.image_pull > 0):
            raise ValueError(f"image_pull must be a finite number ≥ 0, got {sample.image_pull}")
        if not self.image_proximity:
            raise ValueError("this bundle's lco_step graph takes no reference image (it was exported before the "
                             "image proximity term): export the bundle again to use image_pull")
        shape = self.reference_shape
        if sample.reference is None or np.shape(sample.reference) != shape:
            got = None if sample.reference is None else list(np.shape(sample.reference))
            raise ValueError(f"image_pull needs a reference image of shape {list(shape)}, got {got}")

    def references(self, images: list[np.ndarray | None]) -> ort.OrtValue:
        """One chunk's reference images [compute_batch, 1, H, W] on the device: zeros where a row has
        none (a chunk without any shares one cached zero tensor, uploaded once)."""
        shape = (self.compute_batch, 1, *self.reference_shape)
        if all(image is None for image in images):
            if self._zero_reference is None:
                self._zero_reference = self.to_device(np.zeros(shape, np.float32))
            return self._zero_reference
        stacked = np.zeros(shape, np.float32)
        for row, image in enumerate(images):
            if image is not None:
                stacked[row, 0] = image
        return self.to_device(stacked)

    def run_adam(self, chunk: dict[str, ort.OrtValue], grad: ort.OrtValue, step_size: np.ndarray,
                 eps_hat: np.ndarray) -> None:
        """One Adam step and sphere projection of a chunk's z, m and v, in place on the device."""
        binding = self.adam.io_binding()
        for name in ("z", "m", "v", "anchor", "pull"):
            binding.bind_ortvalue_input(name, chunk[name])
        binding.bind_ortvalue_input("grad", grad)
        binding.bind_ortvalue_input("step_size", self.to_device(step_size))
        binding.bind_ortvalue_input("eps_hat", self.to_device(eps_hat))
        binding.bind_ortvalue_input("radius", self.radius_value)
        for name in ("z_next", "m_next", "v_next"):
            binding.bind_output(name, self.device_type, self.device_id)
        self.adam.run_with_iobinding(binding)
        chunk["z"], chunk["m"], chunk["v"] = binding.get_outputs()


@dataclass
class _Rows:
    """Host copy of the running batch's per-sample state, one row per sample."""

    tags: list[Any]
    seeds: np.ndarray  # int64 [N]
    scored: np.ndarray  # int64 [N], latents scored before LCO started
    z: np.ndarray  # [N, d]
    m: np.ndarray  # [N, d] Adam first moment
    v: np.ndarray  # [N, d] Adam second moment
    t: np.ndarray  # int64 [N], Adam steps taken
    lr: np.ndarray  # float64 [N]
    cap: np.ndarray  # int64 [N]; lowered to ``t + patience`` when a sample first passes its fallback margin
    patience: np.ndarray  # int64 [N]; ``LCOOptions.patience``, the step cap where null
    margin: np.ndarray  # float32 [N]
    absent_margin: np.ndarray  # float32 [N]
    fallback_margin: np.ndarray  # float32 [N]
    target: np.ndarray  # [N, 14]
    mask: np.ndarray  # [N, 14], the loss weights (SampleRequest.loss_weights)
    judged: np.ndarray  # [N, 14], the labels that decide "satisfied"
    anchor: np.ndarray  # [N, d], the start point the proximity term pulls towards
    pull: np.ndarray  # float32 [N, 1], the proximity weight (0: plain LCO)
    references: list[np.ndarray | None]  # [H, W] images the image proximity term pulls towards
    image_pull: np.ndarray  # float32 [N, 1], its weight (0: plain LCO)
    next_check: np.ndarray  # int64 [N], the first step the classifier may check again (a steering network's bundle)
    # The point returned if the sample runs out of steps: the earliest past the fallback margin
    # (``settled``), else the fewest constrained labels on the wrong side of their thresholds, then
    # the lowest loss.
    settled: np.ndarray  # bool [N]
    best_off: np.ndarray  # int64 [N]
    best_loss: np.ndarray  # float64 [N]
    best_z: np.ndarray  # [N, d]
    best_probs: np.ndarray  # [N, 14]

    @classmethod
    def start(cls, *, tags: list[Any], seeds: np.ndarray, scored: np.ndarray, z: np.ndarray, lr: np.ndarray,
              cap: np.ndarray, patience: np.ndarray, margin: np.ndarray, absent_margin: np.ndarray,
              fallback_margin: np.ndarray, target: np.ndarray,
              mask: np.ndarray, judged: np.ndarray, pull: np.ndarray,
              references: list[np.ndarray | None] | None = None, image_pull: np.ndarray | None = None) -> _Rows:
        """Rows about to take their first step: zero Adam state, no best point yet, anchored where they
        start (no reference image unless given)."""
        n = len(z)
        return cls(tags=tags, seeds=seeds, scored=scored, z=z, m=np.zeros_like(z), v=np.zeros_like(z), t=np.zeros(n, np.int64),
                   lr=lr, cap=cap, patience=patience, margin=margin, absent_margin=absent_margin, fallback_margin=fallback_margin,
                   target=target, mask=mask,
                   judged=judged, anchor=z.copy(), pull=pull, references=references or [None] * n,
                   image_pull=np.zeros((n, 1), np.float32) if image_pull is None else image_pull,
                   next_check=np.zeros(n, np.int64),
                   settled=np.zeros(n, bool), best_off=np.full(n, NUM_LABELS + 1, np.int64),
                   best_loss=np.full(n, np.inf), best_z=z.copy(), best_probs=np.zeros((n, NUM_LABELS), np.float32))

    @classmethod
    def empty(cls, latent_dim: int) -> _Rows:
        labels = np.zeros((0, NUM_LABELS), np.float32)
        return cls.start(tags=[], seeds=np.zeros(0, np.int64), scored=np.zeros(0, np.int64), z=np.zeros((0, latent_dim), np.float32),
                         lr=np.zeros(0), cap=np.zeros(0, np.int64), patience=np.zeros(0, np.int64),
                         margin=np.zeros(0, np.float32),
                         absent_margin=np.zeros(0, np.float32), fallback_margin=np.zeros(0, np.float32), target=labels, mask=labels, judged=labels,
                         pull=np.zeros((0, 1), np.float32))

    def select(self, keep: np.ndarray) -> _Rows:
        index = np.flatnonzero(keep)
        return _Rows(tags=[self.tags[i] for i in index], references=[self.references[i] for i in index],
                     **{f: getattr(self, f)[index] for f in _ARRAY_FIELDS})

    def extend(self, other: _Rows) -> _Rows:
        return _Rows(tags=self.tags + other.tags, references=self.references + other.references,
                     **{f: np.concatenate([getattr(self, f), getattr(other, f)]) for f in _ARRAY_FIELDS})


_ARRAY_FIELDS = ("seeds", "scored", "z", "m", "v", "t", "lr", "cap", "patience", "margin", "absent_margin", "fallback_margin", "target", "mask",
                 "judged", "anchor", "pull", "image_pull", "next_check", "settled", "best_off", "best_loss", "best_z", "best_probs")
_DEVICE_FIELDS = ("z", "m", "v", "target", "mask", "anchor", "pull")


@dataclass
class _Search:
    """A sample scoring its latents in seed order before LCO (rejection first)."""

    tag: Any
    seed: int
    options: LCOOptions
    target: np.ndarray  # [14]
    mask: np.ndarray  # [14], the loss weights (SampleRequest.loss_weights)
    judged: np.ndarray  # [14]
    stream: LatentStream
    budget: int  # latents it may score
    scored: int = 0
    # the lowest masked BCE among the first ``options.candidates`` latents: LCO's start
    best_loss: float = math.inf
    best_z: np.ndarray | None = None
    best_probs: np.ndarray | None = None


class LCOBatch:
    """A running batch: samples join with :meth:`add` and leave when :meth:`step` finishes them.

    Each sample carries an opaque ``tag`` that comes back with its result. Samples with rejection
    first search (score their latents, a chunk per round) before they step. Not thread-safe on its
    own; the engine lock serialises graph calls when several batches share one engine.
    """

    def __init__(self, engine: LCOEngine):
        self.engine = engine
        self.rows = _Rows.empty(engine.latent_dim)
        self.searching: list[_Search] = []
        # Per chunk of compute_batch rows: z, m, v, target, mask, anchor and pull on the device (and the
        # reference images and image_pull, for a step graph that takes them).
        self._device: list[dict[str, ort.OrtValue]] | None = None

    def __len__(self) -> int:
        return len(self.rows.tags) + len(self.searching)

    @property
    def tags(self) -> list[Any]:
        """Every sample's tag: the stepping rows', then the searching samples' (``discard``'s order)."""
        return self.rows.tags + [search.tag for search in self.searching]

    def add(self, samples: Sequence[SampleRequest], tags: Sequence[Any]) -> list[tuple[Any, SampleResult]]:
        """Start ``samples``. Rejection-first ones join the search, scored from the next :meth:`step`;
        the others score their ``candidates`` now, and those already satisfied finish at once."""
        engine = self.engine
        for sample in samples:
            engine.check_image_proximity(sample)
        # a sample with a start, or pulled towards a reference image, skips the search: the first latent
        # to meet the request would ignore both
        searches = [(s.options or engine.options).rejection_first and s.start is None and s.image_pull == 0
                    for s in samples]
        at_once = [(s, t) for s, t, search in zip(samples, tags, searches) if not search]
        for sample, tag, search in zip(samples, tags, searches):
            options = sample.options or engine.options
            if search:
                self.searching.append(_Search(
                    tag=tag, seed=sample.seed, options=options,
                    target=np.asarray(sample.target, np.float32).reshape(NUM_LABELS),
                    mask=sample.loss_weights(options), judged=sample.judged_labels,
                    stream=LatentStream(sample.seed, engine.latent_dim, options.truncation),
                    budget=engine.rejection_budget(sample)))
        return self._add_best_of_candidates([s for s, _ in at_once], [t for _, t in at_once])

    def _add_best_of_candidates(self, samples: Sequence[SampleRequest],
                                tags: Sequence[Any]) -> list[tuple[Any, SampleResult]]:
        """Without rejection first: score every sample's ``candidates`` (or its ``start``) at once, finish
        those whose best (lowest masked BCE) meets the request, start the others from their best."""
        engine = self.engine
        if not samples:
            return []
        options = [s.options or engine.options for s in samples]
        targets = np.stack([np.asarray(s.target, np.float32).reshape(NUM_LABELS) for s in samples])
        masks = np.stack([s.loss_weights(o) for s, o in zip(samples, options)])
        judged = np.stack([s.judged_labels for s in samples])
        counts = [1 if s.start is not None else o.candidates for s, o in zip(samples, options)]
        latents = np.concatenate([
            np.asarray(s.start, np.float32).reshape(1, engine.latent_dim) if s.start is not None
            else draw_latents(s.seed, k, engine.latent_dim, o.truncation)
            for s, k, o in zip(samples, counts, options)
        ])
        with engine.lock:
            _, logits = engine.score(latents, keep_images=False)
        owner = np.repeat(np.arange(len(samples)), counts)
        losses = masked_bce(logits, targets[owner], masks[owner])
        starts = np.cumsum([0, *counts[:-1]])
        best = np.array([start + int(np.argmin(losses[start : start + k])) for start, k in zip(starts, counts)])
        probs = _sigmoid(logits[best])
        margins = np.array([o.margin for o in options], np.float32)
        absent_margins = np.array([o.absent_margin for o in options], np.float32)
        caps = np.array([o.steps for o in options], np.int64)
        accepted = satisfied(probs, targets, judged, engine.thresholds, margins, absent_margins)
        done = accepted | (caps == 0) | (judged.sum(1) == 0)

        finished_rows = np.flatnonzero(done)
        finished = []
        if len(finished_rows):
            with engine.lock:
                images = engine.render(latents[best[finished_rows]])
            finished = [(tags[i], self._result(image, probs[i], targets[i], judged[i], 0, samples[i].seed,
                                               bool(accepted[i]), counts[i], latents[best[i]]))
                        for i, image in zip(finished_rows, images)]
        joining = np.flatnonzero(~done)
        if len(joining):
            self._join(_Rows.start(
                tags=[tags[i] for i in joining],
                seeds=np.array([samples[i].seed for i in joining], np.int64),
                scored=np.array([counts[i] for i in joining], np.int64),
                z=latents[best[joining]],
                lr=np.array([options[i].lr for i in joining], np.float64),
                cap=caps[joining],
                patience=np.array([_patience(options[i]) for i in joining], np.int64),
                margin=margins[joining],
                absent_margin=absent_margins[joining],
                fallback_margin=np.array([options[i].fallback_margin for i in joining], np.float32),
                target=targets[joining],
                mask=masks[joining],
                judged=judged[joining],
                pull=np.array([[samples[i].pull] for i in joining], np.float32),
                references=[samples[i].reference if samples[i].image_pull > 0 else None for i in joining],
                image_pull=np.array([[samples[i].image_pull] for i in joining], np.float32),
            ))
        return finished

    def _join(self, new: _Rows) -> None:
        self._sync_to_host()
        self.rows = self.rows.extend(new)

    def _search(self) -> list[tuple[Any, SampleResult]]:
        """One round of rejection: each searching sample scores its next chunk of up to
        ``compute_batch`` latents. The first latent in seed order that meets the request at the margin
        finishes its sample with 0 steps; a sample whose budget is spent starts LCO from its best of the
        first ``candidates`` (or, with 0 steps allowed, returns it)."""
        engine, searching = self.engine, self.searching
        draws = [search.stream.draw(min(engine.compute_batch, search.budget - search.scored)) for search in searching]
        latents = np.concatenate(draws)
        with engine.lock:
            _, logits = engine.score(latents, keep_images=False)
        owner = np.repeat(np.arange(len(searching)), [len(d) for d in draws])
        targets = np.stack([search.target for search in searching])[owner]
        masks = np.stack([search.mask for search in searching])[owner]
        judged = np.stack([search.judged for search in searching])[owner]
        margins = np.array([search.options.margin for search in searching], np.float32)[owner]
        absent_margins = np.array([search.options.absent_margin for search in searching], np.float32)[owner]
        probs = _sigmoid(logits)
        hits = satisfied(probs, targets, judged, engine.thresholds, margins, absent_margins)
        losses = masked_bce(logits, targets, masks)

        accepted: list[tuple[_Search, np.ndarray, np.ndarray, int]] = []  # search, z, probs, position
        spent: list[_Search] = []
        row = 0
        for search, drawn in zip(searching, draws):
            rows = range(row, row + len(drawn))
            row += len(drawn)
            hit = next((r for r in rows if hits[r]), None)
            for r in rows if hit is None else range(rows.start, hit):
                position = search.scored + r - rows.start
                if position < search.options.candidates and losses[r] < search.best_loss:
                    search.best_loss, search.best_z, search.best_probs = float(losses[r]), latents[r], probs[r]
            if hit is not None:
                accepted.append((search, latents[hit], probs[hit], search.scored + hit - rows.start + 1))
                continue
            search.scored += len(drawn)
            if search.scored >= search.budget:
                spent.append(search)

        finished: list[tuple[Any, SampleResult]] = []
        returned = accepted + [(search, search.best_z, search.best_probs, search.scored) for search in spent
                               if search.options.steps == 0]
        if returned:
            with engine.lock:
                images = engine.render(np.stack([z for _, z, _, _ in returned]))
            finished = [(search.tag, self._result(image, p, search.target, search.judged, 0, search.seed,
                                                  index < len(accepted), scored, z))
                        for index, ((search, z, p, scored), image) in enumerate(zip(returned, images))]
        starting = [search for search in spent if search.options.steps > 0]
        if starting:
            self._join(_Rows.start(
                tags=[search.tag for search in starting],
                seeds=np.array([search.seed for search in starting], np.int64),
                scored=np.array([search.scored for search in starting], np.int64),
                z=np.stack([search.best_z for search in starting]),
                lr=np.array([search.options.lr for search in starting], np.float64),
                cap=np.array([search.options.steps for search in starting], np.int64),
                patience=np.array([_patience(search.options) for search in starting], np.int64),
                margin=np.array([search.options.margin for search in starting], np.float32),
                absent_margin=np.array([search.options.absent_margin for search in starting], np.float32),
                fallback_margin=np.array([search.options.fallback_margin for search in starting], np.float32),
                target=np.stack([search.target for search in starting]),
                mask=np.stack([search.mask for search in starting]),
                judged=np.stack([search.judged for search in starting]),
                pull=np.zeros((len(starting), 1), np.float32),
            ))
        leaving = {id(search) for search, *_ in accepted} | {id(search) for search in spent}
        self.searching = [search for search in searching if id(search) not in leaving]
        return finished

    def step(self) -> list[tuple[Any, SampleResult]]:
        """One round: a chunk of rejection for every searching sample, then one LCO step for every
        sample stepping (those whose search just ended included); returns the samples that finished."""
        finished = self._search() if self.searching else []
        if len(self.rows.tags):
            finished += self._step_rows()
        return finished

    def _step_rows(self) -> list[tuple[Any, SampleResult]]:
        """One LCO step for every stepping sample: run the step graph (loss, gradient, probabilities
        and image at the current z), judge each sample against its margin, record its best point, and
        move z by Adam on the device."""
        engine, rows, count = self.engine, self.rows, len(self.rows.tags)
        device = self._upload()
        with engine.lock:
            outputs = engine.map_chunks(engine.run_step_graph, device)
        probs = np.concatenate([p for _, p, _ in outputs])[:count]
        # the rows whose probabilities are the classifier's, and their images when already fetched
        checked, images = np.ones(count, bool), None
        if engine.checks_steps:
            probs, checked, images = self._check(probs, outputs)

        improved = self._record_best_point(probs, device, checked)  # first, as it may lower a cap (patience)
        finished_ok = checked & satisfied(probs, rows.target, rows.judged, engine.thresholds, rows.margin,
                                          rows.absent_margin)
        finished = finished_ok | (rows.t >= rows.cap)
        # the z each finishing sample's image was made from, before Adam moves it
        z_scored = np.concatenate([chunk["z"].numpy() for chunk in device])[:count] if finished.any() else None

        t_next = rows.t + 1
        correction2 = np.sqrt(1.0 - ADAM_BETA2**t_next)
        step_size = np.zeros((engine.padded_rows(count), 1), np.float32)
        eps_hat = np.ones((engine.padded_rows(count), 1), np.float32)
        step_size[:count, 0] = rows.lr * correction2 / (1.0 - ADAM_BETA1**t_next)
        eps_hat[:count, 0] = ADAM_EPS * correction2
        with engine.lock:
            engine.map_chunks(lambda _, *chunk: engine.run_adam(*chunk), device, [grad for grad, _, _ in outputs],
                              engine.chunks(step_size), engine.chunks(eps_hat))
        rows.t = np.where(finished, rows.t, t_next)

        if not finished.any():
            return []
        if images is None:
            images = np.concatenate([image.numpy()[:, 0] for _, _, image in outputs])[:count]
        # Out of steps past a better point than the last: return that point, drawn again.
        earlier = finished & ~finished_ok & ~improved
        if earlier.any():
            with engine.lock:
                images[earlier] = engine.render(rows.best_z[earlier])
            probs = np.where(earlier[:, None], rows.best_probs, probs)
            z_scored = np.where(earlier[:, None], rows.best_z, z_scored)
        results = [
            (rows.tags[i], self._result(images[i], probs[i], rows.target[i], rows.judged[i], int(rows.t[i]),
                                        int(rows.seeds[i]), False, int(rows.scored[i]), z_scored[i]))
            for i in np.flatnonzero(finished)
        ]
        self._sync_to_host()
        self.rows = self.rows.select(~finished)
        return results

    def discard(self, rows: Sequence[bool]) -> list[Any]:
        """Take the samples marked in ``tags`` order out of the batch unfinished; returns their tags."""
        leaving = np.asarray(rows, bool)
        tags = [tag for tag, gone in zip(self.tags, leaving) if gone]
        stepping = len(self.rows.tags)
        self._sync_to_host()
        self.rows = self.rows.select(~leaving[:stepping])
        self.searching = [search for search, gone in zip(self.searching, leaving[stepping:]) if not gone]
        return tags

    def _check(self, steering_probs: np.ndarray,
               outputs: list[tuple[ort.OrtValue, np.ndarray, ort.OrtValue]]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The classifier's verdict where it checks this step (module docstring: rows the steering
        network has steered to their request, at most every ``RECHECK_STEPS`` steps, and rows at their
        cap). Returns the probabilities [N, 14] (the classifier's on checked rows, the steering
        network's elsewhere), the checked rows [N] and the step's images [N, H, W] (None if none checked)."""
        engine, rows = self.engine, self.rows
        steered = satisfied(steering_probs, rows.target, rows.judged, engine.steering_thresholds, rows.margin,
                            rows.absent_margin)
        due = (steered & (rows.t >= rows.next_check)) | (rows.t >= rows.cap)
        if not due.any():
            return steering_probs, due, None
        images = np.concatenate([image.numpy()[:, 0] for _, _, image in outputs])[: len(rows.tags)]
        probs = steering_probs.copy()
        with engine.lock:
            probs[due] = _sigmoid(engine.classify(images[due]))
        rows.next_check[due] = rows.t[due] + RECHECK_STEPS
        return probs, due, images

    def _record_best_point(self, probs: np.ndarray, device: list[dict[str, ort.OrtValue]],
                           checked: np.ndarray) -> np.ndarray:
        """Keep each unsettled sample's best point so far (the z just scored) among the ``checked`` rows,
        whose probabilities are the classifier's; returns who improved.

        The loss is recomputed here from the probabilities rather than taken from the step graph,
        whose reduction over labels may round differently at another row of the batch.
        """
        rows, engine = self.rows, self.engine
        off = labels_off_target(probs, rows.target, rows.judged, engine.thresholds, 0.0)
        loss = masked_bce(_logit(probs), rows.target, rows.mask)
        settles = satisfied(probs, rows.target, rows.judged, engine.thresholds, rows.fallback_margin,
                            rows.absent_margin)
        improved = checked & ~rows.settled & (settles | (off < rows.best_off)
                                              | ((off == rows.best_off) & (loss < rows.best_loss)))
        if improved.any():
            z_now = np.concatenate([chunk["z"].numpy() for chunk in device])[: len(self.rows.tags)]
            settling = improved & settles
            rows.cap[settling] = np.minimum(rows.cap[settling], rows.t[settling] + rows.patience[settling])
            rows.settled[improved] = settles[improved]
            rows.best_off[improved], rows.best_loss[improved] = off[improved], loss[improved]
            rows.best_z[improved], rows.best_probs[improved] = z_now[improved], probs[improved]
        return improved

    def _upload(self) -> list[dict[str, ort.OrtValue]]:
        """The rows' device tensors, in chunks of compute_batch rows (made when membership changed)."""
        if self._device is None:
            engine = self.engine
            per_field = {name: engine.chunks(getattr(self.rows, name)) for name in _DEVICE_FIELDS}
            self._device = [{name: engine.to_device(per_field[name][i]) for name in _DEVICE_FIELDS}
                            for i in range(len(per_field["z"]))]
            if engine.image_proximity:
                size, references = engine.compute_batch, self.rows.references
                for number, (chunk, pulls) in enumerate(zip(self._device, engine.chunks(self.rows.image_pull))):
                    chunk["image_pull"] = engine.to_device(pulls)
                    rows = references[number * size:(number + 1) * size]
                    chunk["reference"] = engine.references(rows + rows[:1] * (size - len(rows)))
        return self._device

    def _sync_to_host(self) -> None:
        """Bring z and the moments back to host rows before the membership changes."""
        if self._device is not None:
            count = len(self.rows.tags)
            for name in ("z", "m", "v"):
                setattr(self.rows, name, np.concatenate([chunk[name].numpy() for chunk in self._device])[:count])
            self._device = None

    def _result(self, image: np.ndarray, probs: np.ndarray, target: np.ndarray, judged: np.ndarray, steps: int,
                seed: int, accepted_without_steps: bool, candidates_scored: int, latent: np.ndarray) -> SampleResult:
        ok = bool(satisfied(probs[None], target[None], judged[None], self.engine.thresholds, 0.0)[0])
        return SampleResult(
            image=np.clip(image, -1.0, 1.0).astype(np.float32),
            probabilities=probs.astype(np.float32),
            satisfied=ok,
            steps=steps,
            seed=int(seed),
            latent=np.asarray(latent, np.float32).copy(),
            accepted_without_steps=accepted_without_steps,
            candidates_scored=int(candidates_scored),
        )


def _patience(options: LCOOptions) -> int:
    """Steps a sample may take past its fallback margin (``LCOOptions.patience``; null: up to its cap)."""
    return options.steps if options.patience is None else options.patience


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)
