"""PGGAN training configuration: TOML presets in training/configs/, command-line overrides, schedule.

A preset is a TOML file (see training/configs/demo.toml for every key with comments). Overrides use
dotted paths and TOML values: `--set schedule.batch_size.64=32 --set optim.lr=2e-3`. Per-resolution
tables (`channels`, `fade_images`, `stable_images`, `batch_size`) map a resolution to a value with
`default` for every resolution not listed.

The progressive schedule is a pure function of the number of images shown, so a checkpoint only needs
that number to know the resolution, phase and alpha it was taken at.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from service.prior import PRIOR_NAMES
from training.networks.pggan import channels_for, resolutions_up_to

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message says what to change."""


def _per_resolution(table: Mapping[str, Any], name: str) -> dict[str, int]:
    result = {}
    for key, value in table.items():
        if key != "default" and not (key.isdigit() and int(key) >= 4 and int(key) & (int(key) - 1) == 0):
            raise ConfigError(f"{name}: key {key!r} is neither 'default' nor a power-of-two resolution ≥ 4")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name}.{key} must be a non-negative integer, got {value!r}")
        result[key] = value
    return result


def lookup(table: Mapping[str, int], resolution: int, name: str) -> int:
    """Value for `resolution` in a per-resolution table, falling back to `default`."""
    if str(resolution) in table:
        return table[str(resolution)]
    if "default" in table:
        return table["default"]
    raise ConfigError(f"{name} has no entry for {resolution} and no default")


@dataclass
class NetworkConfig:
    resolution: int = 1024  # final resolution
    latent_dim: int = 512
    channel_base: int = 16384  # channels(r) = min(channel_max, channel_base // r) unless listed
    channel_max: int = 512
    channels: dict[str, int] = field(default_factory=dict)
    mbstd_group_size: int = 4

    def channel_table(self) -> dict[int, int]:
        return {
            r: self.channels.get(str(r), channels_for(r, self.channel_base, self.channel_max))
            for r in resolutions_up_to(self.resolution)
        }


@dataclass
class ScheduleConfig:
    start_resolution: int = 4
    fade_images: dict[str, int] = field(default_factory=lambda: {"default": 800_000})
    stable_images: dict[str, int] = field(default_factory=lambda: {"default": 800_000})
    batch_size: dict[str, int] = field(default_factory=lambda: {"default": 16})


@dataclass
class LossConfig:
    gp_weight: float = 10.0
    gp_target: float = 1.0
    drift_weight: float = 0.001


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    eps: float = 1e-8
    # The official PGGAN resets Adam's moments whenever a fade-in or stabilisation phase begins.
    reset_on_new_phase: bool = True


@dataclass
class EmaConfig:
    beta: float = 0.999  # per optimiser step
    # Ramp-up: beta_t = min(beta, (1 + t) / (10 + t)) so early samples are not dominated by the
    # random initialisation (TensorFlow's ExponentialMovingAverage num_updates rule).
    rampup: bool = True


@dataclass
class DataConfig:
    phantom_count: int = 4096  # phantom data set size (--data phantoms)
    phantom_prior: str = "nih"
    phantom_seed: int = 0
    cache_in_memory: bool = True  # materialise phantoms once (they are procedural and cheap to hold)
    cache_dir: str = ""  # resize cache for nih:/folder: data ("" = none)
    num_workers: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    tick_images: int = 10_000  # log, grid every this many images
    checkpoint_images: int = 100_000  # checkpoint every this many images (and at the end)
    keep_checkpoints: int = 3
    grid_size: int = 16  # fixed latents for the per-tick grid
    max_nonfinite_steps: int = 20
    amp: str = "auto"  # auto (on for CUDA) | on | off
    amp_dtype: str = "float16"  # float16 | bfloat16
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    # Intra-op threads per process on CPU (0: torch's default, all cores). Small networks run fastest
    # with 1 thread per process; oversubscribed cores slow every process down by an order of magnitude.
    cpu_threads: int = 0


@dataclass
class GanConfig:
    name: str = "custom"
    description: str = ""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GanConfig:
        config = _build(cls, raw, "")
        config.validate()
        return config

    def validate(self) -> None:
        net, sched = self.network, self.schedule
        resolutions_up_to(net.resolution)
        if sched.start_resolution not in resolutions_up_to(net.resolution):
            raise ConfigError(
                f"schedule.start_resolution {sched.start_resolution} not in 4..{net.resolution}"
            )
        for name in ("fade_images", "stable_images", "batch_size"):
            setattr(sched, name, _per_resolution(getattr(sched, name), f"schedule.{name}"))
        net.channels = _per_resolution(net.channels, "network.channels")
        for r in resolutions_up_to(net.resolution):
            if r >= sched.start_resolution and lookup(sched.batch_size, r, "schedule.batch_size") < 1:
                raise ConfigError(f"schedule.batch_size for {r} must be at least 1")
        if lookup(sched.stable_images, net.resolution, "schedule.stable_images") < 1:
            raise ConfigError("schedule.stable_images at the final resolution must be positive")
        if len(self.optim.betas) != 2:
            raise ConfigError("optim.betas must hold two numbers")
        if self.train.amp not in ("auto", "on", "off"):
            raise ConfigError(f"train.amp must be auto, on or off, got {self.train.amp!r}")
        if self.train.amp_dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"train.amp_dtype must be float16 or bfloat16, got {self.train.amp_dtype!r}")
        if self.data.phantom_prior not in PRIOR_NAMES:
            raise ConfigError(f"data.phantom_prior must be one of {', '.join(PRIOR_NAMES)}")
        if not 0.0 <= self.ema.beta < 1.0:
            raise ConfigError("ema.beta must be in [0, 1)")


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + k for k in unknown]}; known: {sorted(prefix + k for k in fields)}"
        )
    values = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, f"{prefix}{name}.")
        elif isinstance(default, dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{name} must be a table")
            values[name] = {str(k): v for k, v in value.items()}
        else:
            values[name] = _coerce(value, default, prefix + name)
    return cls(**values)


def _coerce(value: Any, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [float(v) for v in value]
    if type(value) is not type(default):
        raise ConfigError(f"{name} must be {type(default).__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """'schedule.batch_size.64=32' -> (['schedule', 'batch_size', '64'], 32); values are TOML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, raw_value = text.split("=", 1)
    keys = [k.strip() for k in path.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"value = {raw_value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()  # bare words are strings: train.device=cpu
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a table")
        node[keys[-1]] = value
    return raw


def preset_path(name_or_path: str) -> Path:
    """A preset name (ci, demo, nih-256, paper-1024) or a path to a TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    preset = CONFIG_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"no preset or TOML file {name_or_path!r}; presets: {available}")


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> GanConfig:
    path = preset_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from error
    raw.setdefault("name", path.stem)
    return GanConfig.from_dict(apply_overrides(raw, overrides))


# ------------------------------------------------------------------------------------ schedule


@dataclass(frozen=True)
class Phase:
    index: int
    resolution: int
    kind: str  # "fade" (alpha rises 0 -> 1) or "stable" (alpha = 1)
    start: int  # images shown when the phase begins
    length: int  # images in the phase
    batch_size: int  # global batch size

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def label(self) -> str:
        return f"{self.resolution}² {self.kind}"


class ProgressiveSchedule:
    """Phases [start: stable] [8²: fade, stable] ... [final: fade, stable], by images shown."""

    def __init__(self, config: GanConfig) -> None:
        sched = config.schedule
        self.phases: list[Phase] = []
        start = 0
        for r in resolutions_up_to(config.network.resolution):
            if r < sched.start_resolution:
                continue
            batch = lookup(sched.batch_size, r, "schedule.batch_size")
            kinds = ["stable"] if r == sched.start_resolution else ["fade", "stable"]
            for kind in kinds:
                table = sched.fade_images if kind == "fade" else sched.stable_images
                length = lookup(table, r, f"schedule.{kind}_images")
                if length > 0:
                    self.phases.append(Phase(len(self.phases), r, kind, start, length, batch))
                    start += length
        self.total_images = start

    def phase_at(self, images_shown: int) -> Phase:
        for phase in self.phases:
            if images_shown < phase.end:
                return phase
        return self.phases[-1]

    def at(self, images_shown: int) -> tuple[Phase, float]:
        """The phase and fade-in alpha at `images_shown`."""
        phase = self.phase_at(images_shown)
        if phase.kind == "fade":
            return phase, min(1.0, (images_shown - phase.start) / phase.length)
        return phase, 1.0

    def batch_size_at(self, images_shown: int) -> int:
        return self.phase_at(images_shown).batch_size

    def describe(self) -> str:
        return "\n".join(
            f"  {p.index:2d}  {p.label:>12s}  images {p.start:>11,d} .. {p.end:>11,d}  batch {p.batch_size}"
            for p in self.phases
        )
