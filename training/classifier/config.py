"""Classifier training configuration, its presets and its start-up checks.

Presets are TOML files in training/configs/classifier/ (each says what it is for), read, inherited
(``extends``) and overridden field by field (``--set lr=3e-4``) by the grammar every trainer shares
(training/runtime/presets.py):

- ``ci``, ``auditor-ci``: 32² phantoms, seconds; the test suite's classifier and its auditor.
- ``demo``, ``demo-2`` … ``demo-9`` (``DEMO_MEMBERS``): the demo bundle's LCO ensemble, 64² phantoms.
- ``demo-robust`` (``DEMO_STEERING``): one CNN trained adversarially (``[adversarial]``,
  training/classifier/adversarial.py) as the steering classifier instead of the ensemble
  (``python -m training.demo_bundle --classifier robust``; how it compares: docs/lco-quality.md).
- ``demo-distilled`` (``DEMO_DISTILLED``): one CNN distilled from that ensemble on the demo generator's
  images and LCO's hard negatives (``[distill]``, ``classifier distill``, training/classifier/distill.py).
- ``auditor``: the independent auditor for ``demo``, never used inside LCO.
- ``chexnet``: DenseNet-121 at 224² on NIH ChestX-ray14.
- ``nih-sample``, ``nih-sample-2``, ``nih-sample-3`` (``NIH_SAMPLE_MEMBERS``) and ``auditor-nih-sample``:
  ``make demo-real``'s LCO ensemble and auditor, 64² real radiographs of the 705-image NIH sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service.labels import NUM_LABELS
from service.prior import PRIOR_NAMES
from training.networks.classifier import ClassifierSpec, feature_size
from training.runtime import presets
from training.runtime.validation import Checks, ConfigError, show

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "classifier"
DATASETS = ("phantoms", "nih", "chexpert")  # labelled; an image folder has nothing to learn from
TRAINABLE_ARCHITECTURES = ("small_cnn", "densenet")  # ensembles are built from trained members
DENSENET_STEMS = ("imagenet", "compact")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split.

    phantoms: ``train_count``/``val_count``/``test_count`` items drawn from ``prior`` with seeds
    ``seed``, ``seed + 1``, ``seed + 2`` (disjoint streams). nih/chexpert: ``root`` with the data set's
    own CSV and official splits. ``resolution``: the size images are read at.
    """

    kind: str = "phantoms"
    root: str = ""
    resolution: int = 64
    prior: str = "balanced"
    seed: int = 1000
    train_count: int = 6000
    val_count: int = 1000
    test_count: int = 1500
    uncertain: str = "ignore"  # CheXpert's −1 labels: ignore (mask 0), zeros or ones
    cache_in_memory: bool = True  # render procedural phantoms once instead of every epoch


ADVERSARIAL_NORMS = ("none", "l2", "linf")
# Budgets past these change what a radiograph shows rather than how a network reads it: an L∞ step of
# 0.25 is an eighth of the [-1, 1] range on every pixel, and an L2 radius of 0.25·side a root-mean-square
# change of 0.25 per pixel.
MAX_LINF_EPSILON = 0.25
MAX_L2_EPSILON_PER_SIDE = 0.25
MAX_ADVERSARIAL_STEPS = 20


@dataclass(frozen=True)
class AdversarialConfig:
    """Adversarial (robust) training: each batch is replaced by its PGD perturbation (Madry et al. 2018).

    ``norm``: ``none`` (off, the default), ``l2`` or ``linf``. ``epsilon``: the perturbation budget in
    pixel units of the [-1, 1] image: L∞ in (0, 0.25]; L2 in (0, 0.25·input_size] (a root-mean-square
    change of at most 0.25 per pixel). ``steps``: PGD iterations, 1–20. ``step_size``: per iteration,
    in (0, epsilon]; 0 picks 2.5·epsilon/steps (Madry et al.'s rule). training/classifier/adversarial.py
    runs it.
    """

    norm: str = "none"
    epsilon: float = 0.0
    steps: int = 3
    step_size: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.norm != "none"

    @property
    def resolved_step_size(self) -> float:
        return self.step_size if self.step_size > 0 else 2.5 * self.epsilon / self.steps


@dataclass(frozen=True)
class DistillConfig:
    """On-manifold distillation of a trained (ensemble) teacher into this preset's network, hardened by
    LCO's own hard negatives (``classifier distill``; training/classifier/distill.py has the recipe).

    ``pool_images``: unconditional generator samples the teacher labels first (0: off, the default).
    ``dataset_images``: images of the preset's training split (phantoms), labelled by the teacher too.
    ``pool_epochs``: epochs on that pool before the first round. ``rounds``: rounds of LCO against the
    current student, each adding its trajectories, labelled by the teacher, and ``fresh_images`` new
    unconditional samples to the pool, then ``round_epochs`` epochs on the whole pool.
    ``samples_per_request``: LCO samples per request and round (the requests: every single finding,
    "No Finding", and ``prior_requests`` label sets drawn from ``data.prior`` with all 14 labels
    constrained). ``lco_steps``, ``lco_candidates``: LCO's step cap and latents scored for its start
    (its step size and margins are the service's, service.lco.LCOOptions). ``snapshot_every``: steps
    between trajectory points kept. ``lr``: Adam's step size on the student. ``output_clip``: c > 0
    soft-clips the student's output to c·tanh(raw / c), the scale of the ensemble's clipped votes, and
    regresses the raw output on the teacher's logits unclipped (c·atanh(t / c)), so the region near the
    margin, which the clip compresses, weighs in the loss as much as the rest (0: the raw output
    regresses the teacher's logits).
    """

    pool_images: int = 0
    dataset_images: int = 0
    pool_epochs: int = 4
    rounds: int = 3
    samples_per_request: int = 16
    prior_requests: int = 16
    lco_steps: int = 100
    lco_candidates: int = 8
    snapshot_every: int = 15
    fresh_images: int = 512
    round_epochs: int = 3
    lr: float = 1e-3
    output_clip: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.pool_images > 0


@dataclass(frozen=True)
class ClassifierTrainConfig:
    name: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ClassifierSpec = field(default_factory=ClassifierSpec)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    batch_size: int = 64  # global, split over ranks
    total_images: int = 60_000
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_images: int = 2_000
    pos_weight_max: float = 10.0  # caps the imbalance weight for labels with very few positives
    checkpoint_every: int = 20_000  # images
    tick_images: int = 2_000  # progress/stat interval
    bootstrap: int = 1000
    workers: int = 2
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierTrainConfig:
        """A configuration from its table (a preset's, a checkpoint's, `to_dict()`'s); missing keys keep
        their defaults. Raises ConfigError naming an unknown or mistyped key."""
        return presets.build(cls, data)

    def override(self, assignments: Iterable[str]) -> ClassifierTrainConfig:
        """This configuration with `KEY=VALUE` overrides (training/runtime/presets.py), e.g.
        ``data.train_count=2000``, ``model.channels=8,16``. Raises ConfigError naming a bad key or value."""
        table = presets.apply_overrides(self.to_dict(), assignments, ClassifierTrainConfig)
        return ClassifierTrainConfig.from_dict(table)


def validate(config: ClassifierTrainConfig, world_size: int | None = None) -> None:
    """Raise ConfigError listing every problem of ``config`` (see ``problems``); return if there is none."""
    found = problems(config, world_size)
    if found:
        raise ConfigError(found)


def problems(config: ClassifierTrainConfig, world_size: int | None = None) -> list[str]:
    """Every value of ``config`` that cannot train, one message each, starting with its dotted key.

    world_size: the number of processes about to train (WORLD_SIZE). With it the batch must split
    evenly over the ranks, and the data root and a CUDA device must exist on this machine; None
    skips those checks.
    """
    checks = Checks()
    _check_data(config.data, world_size, checks)
    final_size = _check_model(config.model, checks)
    _check_adversarial(config.adversarial, config.model.input_size, checks)
    _check_distill(config.distill, checks)
    checks.integer("seed", config.seed, 0, 2**32 - 1)  # numpy's seed range
    per_rank = None
    if checks.integer("batch_size", config.batch_size, 1) and world_size is not None:
        per_rank = checks.world_batch("batch_size", config.batch_size, world_size)
    # SmallCNN normalises before its last pool (≥ 2×2 values); DenseNet's last BatchNorm after it.
    if per_rank == 1 and config.model.arch == "densenet" and final_size == 1:
        checks.add(
            f"batch_size={config.batch_size} leaves one image per rank (world size {world_size}) and the "
            "DenseNet's last feature map is 1×1, so its BatchNorm sees one value per channel and cannot "
            "train; use at least 2 images per rank or a larger model.input_size"
        )
    checks.integer("total_images", config.total_images, 1)
    checks.number("lr", config.lr, 0.0, above=True)
    checks.number("weight_decay", config.weight_decay, 0.0)
    checks.integer("warmup_images", config.warmup_images, 0)
    checks.number("pos_weight_max", config.pos_weight_max, 1.0)  # weights are clipped to [1/max, max]
    checks.integer("checkpoint_every", config.checkpoint_every, 1)
    checks.integer("tick_images", config.tick_images, 1)
    checks.integer("bootstrap", config.bootstrap, 0)
    checks.integer("workers", config.workers, 0)
    checks.device("device", config.device, on_this_machine=world_size is not None)
    return checks.problems


def _check_data(data: DataConfig, world_size: int | None, checks: Checks) -> None:
    from training.data.chexpert import UNCERTAIN_POLICIES
    from training.phantoms.render import MAX_SIZE, MIN_SIZE

    if data.kind == "folder":
        checks.add("data.kind='folder' has no labels to learn from; use phantoms, nih or chexpert")
    else:
        checks.choice("data.kind", data.kind, DATASETS)
    if data.kind == "phantoms":
        if checks.integer("data.resolution", data.resolution, MIN_SIZE, MAX_SIZE) and (
            data.resolution & (data.resolution - 1)
        ):
            checks.add(f"data.resolution={data.resolution} must be a power of two (phantoms: 32², 64², …)")
    elif data.kind in DATASETS:
        checks.integer("data.resolution", data.resolution, 1)
        if not data.root:
            checks.add(f"data.root='' must name the directory of the {data.kind} data set")
        elif world_size is not None and not Path(data.root).is_dir():
            checks.add(f"data.root={data.root!r} is not a directory")
    checks.choice("data.prior", data.prior, PRIOR_NAMES)
    checks.integer("data.seed", data.seed, 0)
    for name in ("train_count", "val_count", "test_count"):
        checks.integer(f"data.{name}", getattr(data, name), 1)
    checks.choice("data.uncertain", data.uncertain, UNCERTAIN_POLICIES)


def _check_adversarial(adversarial: AdversarialConfig, side: int, checks: Checks) -> None:
    if not checks.choice("adversarial.norm", adversarial.norm, ADVERSARIAL_NORMS) or not adversarial.enabled:
        return
    limit = MAX_LINF_EPSILON if adversarial.norm == "linf" else MAX_L2_EPSILON_PER_SIDE * side
    what = "L∞ budget" if adversarial.norm == "linf" else f"L2 budget (0.25 × input side {side})"
    if checks.number("adversarial.epsilon", adversarial.epsilon, 0.0, above=True) and adversarial.epsilon > limit:
        checks.add(f"adversarial.epsilon={show(adversarial.epsilon)} is past the {what} of {limit:g}; "
                   "a larger perturbation changes what the image shows")
    checks.integer("adversarial.steps", adversarial.steps, 1, MAX_ADVERSARIAL_STEPS)
    if checks.number("adversarial.step_size", adversarial.step_size, 0.0) and adversarial.step_size > adversarial.epsilon:
        checks.add(f"adversarial.step_size={show(adversarial.step_size)} must be at most adversarial.epsilon="
                   f"{show(adversarial.epsilon)} (0 picks 2.5·epsilon/steps)")


def _check_distill(distill: DistillConfig, checks: Checks) -> None:
    checks.integer("distill.pool_images", distill.pool_images, 0)
    if not distill.enabled:
        return
    for key in ("dataset_images", "pool_epochs", "rounds", "prior_requests", "fresh_images", "round_epochs"):
        checks.integer(f"distill.{key}", getattr(distill, key), 0)
    for key in ("samples_per_request", "lco_steps", "lco_candidates", "snapshot_every"):
        checks.integer(f"distill.{key}", getattr(distill, key), 1)
    checks.number("distill.lr", distill.lr, 0.0, above=True)
    checks.number("distill.output_clip", distill.output_clip, 0.0)


def _check_model(model: ClassifierSpec, checks: Checks) -> int | None:
    """Checks the model section; returns the side of its last feature map when that can be known."""
    if model.arch == "ensemble":
        checks.add("model.arch='ensemble' is built from trained members by `classifier ensemble`, not trained")
        return None
    if not checks.choice("model.arch", model.arch, TRAINABLE_ARCHITECTURES):
        return None
    if model.num_labels != NUM_LABELS:
        checks.add(f"model.num_labels={show(model.num_labels)} must be {NUM_LABELS}, one logit per finding")
    sized = checks.integer("model.input_size", model.input_size, 1)
    layers = "channels" if model.arch == "small_cnn" else "block_config"
    values = getattr(model, layers)
    if not values or not all(isinstance(v, int) and v >= 1 for v in values):
        checks.add(f"model.{layers}={','.join(map(str, values))} must list one or more positive integers")
        sized = False
    if model.arch == "densenet":
        for name in ("growth_rate", "init_features", "bn_size"):
            checks.integer(f"model.{name}", getattr(model, name), 1)
        sized = checks.choice("model.stem", model.stem, DENSENET_STEMS) and sized
    checks.number("model.dropout", model.dropout, 0.0, below=1.0)
    if not sized:
        return None
    final = feature_size(model)
    if final < 1:
        smallest = next(size for size in range(1, 2**16) if feature_size(replace(model, input_size=size)))
        checks.add(
            f"model.input_size={model.input_size} is too small for this {model.arch}: its pooling leaves "
            f"no pixels; use at least {smallest}"
        )
    return final


# The one-CNN steering classifier `python -m training.demo_bundle --classifier robust` trains: read
# once per LCO step instead of 27 passes; below the ensemble's label fidelity so far (docs/lco-quality.md).
DEMO_STEERING = "demo-robust"

# The one-CNN steering classifier distilled from the demo ensemble (`python -m training.demo_bundle
# --classifier distilled`, training/classifier/distill.py), and the member whose weights it starts from
# (the preset extends that member's).
DEMO_DISTILLED = "demo-distilled"
DEMO_DISTILLED_INIT = "demo-3"

# The demo bundle's LCO ensemble: `demo` and the presets that extend it, each on its own phantom stream
# and seed, the two widths alternating (why nine: docs/lco-quality.md). service/demo.py trains these.
DEMO_MEMBERS: tuple[str, ...] = ("demo", *(f"demo-{number}" for number in range(2, 10)))

# `make demo-real`'s LCO ensemble on the NIH sample: three small CNNs (two seeds of the narrow one, one
# wide), a third of the demo's: every member's pass is paid at each LCO step on the CPU.
NIH_SAMPLE_MEMBERS: tuple[str, ...] = ("nih-sample", "nih-sample-2", "nih-sample-3")


def preset_names() -> list[str]:
    """The shipped classifier presets: the TOML files of training/configs/classifier/."""
    return presets.preset_names(PRESET_DIR)


def get_preset(name_or_path: str) -> ClassifierTrainConfig:
    """A classifier preset by name, or a TOML file by path, resolved (`extends`) and typed.

    Raises ConfigError (a ValueError) for an unknown preset or a file with unknown or mistyped keys.
    """
    return ClassifierTrainConfig.from_dict(presets.read_preset(PRESET_DIR, name_or_path))
