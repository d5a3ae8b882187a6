"""Classifier training configuration and presets.

Presets (``PRESETS``), all overridable field by field (``--set lr=3e-4``):

- ``ci``: 32² phantoms, a tiny CNN; seconds. Pairs with the GAN's ``ci`` preset in tests.
- ``demo``: 64² phantoms, a small CNN; about a minute of CPU time (mean AUROC ≈ 0.97 on the
  phantom hold-out). The demo presets draw phantoms from the ``nih-boosted`` prior, like the demo
  generator: NIH's co-occurring findings, with every finding common enough to learn from 3,000 images.
- ``demo-2`` … ``demo-9``: the same on other phantom seeds, some wider (``DEMO_MEMBERS``). The demo
  bundle's LCO classifier is the ensemble of the nine (``classifier ensemble``, evaluated on ``demo``'s
  hold-out, which none of them trained on).
- ``auditor-ci`` / ``auditor``: the independent auditors for ``ci`` and ``demo``: another
  architecture (a small DenseNet) and another seed, trained on a disjoint phantom seed. Used only to
  judge label fidelity in evaluation and tests, never inside LCO.
- ``chexnet``: DenseNet-121 at 224² on NIH ChestX-ray14 (Rajpurkar et al. 2017): Adam 1e-3, batch 16
  in the paper; here 32 per GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service.labels import NUM_LABELS
from service.prior import PRIOR_NAMES
from training.networks.classifier import ClassifierSpec, feature_size
from training.runtime.validation import Checks, ConfigError, show

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


@dataclass(frozen=True)
class ClassifierTrainConfig:
    name: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    model: ClassifierSpec = field(default_factory=ClassifierSpec)
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
    def from_dict(cls, data: dict[str, Any]) -> ClassifierTrainConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown classifier config fields: {sorted(unknown)}")
        data["data"] = DataConfig(**data.get("data", {}))
        data["model"] = ClassifierSpec.from_dict(data.get("model", {}))
        return cls(**data)

    def override(self, assignments: list[str]) -> ClassifierTrainConfig:
        """Apply ``key=value`` overrides; nested fields as ``data.train_count=2000``, ``model.channels=8,16``."""
        document = self.to_dict()
        for assignment in assignments:
            if "=" not in assignment:
                raise ValueError(f"override {assignment!r} must look like key=value")
            key, text = assignment.split("=", 1)
            *parents, leaf = key.strip().split(".")
            node = document
            for parent in parents:
                if parent not in node or not isinstance(node[parent], dict):
                    raise ValueError(f"unknown config section {parent!r} in {assignment!r}")
                node = node[parent]
            if leaf not in node:
                raise ValueError(f"unknown config field {key!r}; fields here: {sorted(node)}")
            node[leaf] = _parse_like(node[leaf], text, key)
        return ClassifierTrainConfig.from_dict(document)


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


def _parse_like(current: Any, text: str, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(float(text)) if "e" in text.lower() else int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (tuple, list)):
            return tuple(int(v) for v in text.split(",") if v.strip())
        return text
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected a value like {current!r}") from None


def _small_cnn(resolution: int, channels: tuple[int, ...]) -> ClassifierSpec:
    return ClassifierSpec(arch="small_cnn", input_size=resolution, channels=channels)


def _small_densenet(resolution: int, block_config: tuple[int, ...], growth: int, init: int) -> ClassifierSpec:
    """DenseNet-BC with the DenseNet-121 stem, fewer and thinner layers."""
    return ClassifierSpec(arch="densenet", input_size=resolution, block_config=block_config, growth_rate=growth,
                          init_features=init, bn_size=2, stem="imagenet")


# The demo bundle's LCO ensemble: (preset, phantom seed, seed, widths). Nine members, not three:
# LCO exploits what one member alone reads as a finding, and each member added dilutes it (the
# auditor's agreement on Pleural_Thickening and Pneumothorax rose from 28/12% with three to 66/34% with
# seven and 72/59% with nine, at LCO's old 1.5-logit margin; 91/94% at its 1.8: docs/lco-quality.md).
_NARROW, _WIDE = (8, 16, 32, 64), (16, 32, 48, 64)
DEMO_MEMBERS: tuple[tuple[str, int, int, tuple[int, ...]], ...] = (
    ("demo", 1000, 0, _NARROW),
    ("demo-2", 3000, 1, _NARROW),
    ("demo-3", 4000, 2, _WIDE),
    ("demo-4", 5000, 3, _NARROW),
    ("demo-5", 6000, 4, _WIDE),
    ("demo-6", 7000, 5, _NARROW),
    ("demo-7", 8000, 6, _WIDE),
    ("demo-8", 9000, 7, _NARROW),
    ("demo-9", 10000, 8, _WIDE),
)


def _demo(name: str, data_seed: int, seed: int, channels: tuple[int, ...]) -> ClassifierTrainConfig:
    """The demo CNN; its ensemble siblings differ in phantom stream, seed and width only."""
    return ClassifierTrainConfig(
        name=name,
        data=DataConfig(resolution=64, prior="nih-boosted", seed=data_seed, train_count=3000, val_count=600,
                        test_count=900),
        model=_small_cnn(64, channels),
        seed=seed, batch_size=64, total_images=12_000, lr=3e-3, warmup_images=1_000,
        checkpoint_every=6_000, tick_images=3_000,
    )


PRESETS: dict[str, ClassifierTrainConfig] = {
    "ci": ClassifierTrainConfig(
        name="ci",
        data=DataConfig(resolution=32, seed=1000, train_count=2000, val_count=400, test_count=600),
        model=_small_cnn(32, (8, 16, 32)),
        seed=0, batch_size=64, total_images=12_000, lr=3e-3, warmup_images=1_000,
        checkpoint_every=6_000, tick_images=2_000, bootstrap=200,
    ),
    "auditor-ci": ClassifierTrainConfig(
        name="auditor-ci",
        data=DataConfig(resolution=32, seed=2000, train_count=2000, val_count=400, test_count=600),
        model=_small_densenet(32, (2, 2, 2), growth=8, init=16),
        seed=1, batch_size=64, total_images=12_000, lr=3e-3, warmup_images=1_000,
        checkpoint_every=6_000, tick_images=2_000, bootstrap=200,
    ),
    **{name: _demo(name, data_seed, seed, channels) for name, data_seed, seed, channels in DEMO_MEMBERS},
    "auditor": ClassifierTrainConfig(
        name="auditor",
        data=DataConfig(resolution=64, prior="nih-boosted", seed=2000, train_count=6000, val_count=600,
                        test_count=900),
        model=_small_densenet(64, (3, 3, 3), growth=12, init=24),
        seed=1, batch_size=64, total_images=40_000, lr=3e-3, warmup_images=1_000,
        checkpoint_every=20_000, tick_images=5_000,
    ),
    "chexnet": ClassifierTrainConfig(
        name="chexnet",
        data=DataConfig(kind="nih", resolution=256, prior="nih", cache_in_memory=False),
        model=ClassifierSpec(arch="densenet", input_size=224, block_config=(6, 12, 24, 16), growth_rate=32,
                             init_features=64, bn_size=4),
        seed=0, batch_size=32, total_images=1_000_000, lr=1e-3, weight_decay=1e-5, warmup_images=20_000,
        checkpoint_every=50_000, tick_images=10_000, workers=8,
    ),
}


def get_preset(name: str) -> ClassifierTrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown classifier preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
