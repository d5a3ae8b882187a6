"""PGGAN training configuration: TOML presets in training/configs/, command-line overrides, schedule.

A preset is a TOML file (see training/configs/demo.toml for every key with comments), read, inherited
(`extends`) and overridden by the grammar every trainer shares (training/runtime/presets.py):
`--set schedule.batch_size.64=32 --set optim.lr=2e-3`. Per-resolution
tables (`channels`, `fade_images`, `stable_images`, `batch_size`) map a resolution to a value with
`default` for every resolution not listed.

The progressive schedule is a pure function of the number of images shown, so a checkpoint only needs
that number to know the resolution, phase and alpha it was taken at.

`load_config` and `build_config` refuse a configuration that cannot run (`problems`), listing every
bad value by its dotted key; given the world size they also check each batch against the ranks and
the discriminator's minibatch-stddev group, so such a run fails at start-up rather than at the first
step of the resolution concerned.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.prior import PRIOR_NAMES
from training.networks.pggan import channels_for, mbstd_group, resolutions_up_to
from training.runtime import presets
from training.runtime.validation import Checks, ConfigError, is_int, show

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEDULE_TABLES = ("fade_images", "stable_images", "batch_size")
AMP_MODES = ("auto", "on", "off")
AMP_DTYPES = ("float16", "bfloat16")


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
    # Fréchet distance of EMA samples to reals every this many images shown (0: never), in the embedding of a
    # trained classifier directory (metric_classifier); logged to metric-frechet_distance.jsonl, stats.jsonl
    # and TensorBoard (training/evaluate).
    metric_images: int = 0
    metric_classifier: str = ""
    metric_samples: int = 256  # EMA samples and reals per measurement
    metric_bootstrap: int = 50  # bootstrap resamples for its confidence interval


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
    def from_dict(cls, raw: Mapping[str, Any], world_size: int | None = None) -> GanConfig:
        """A checked configuration from its table (a checkpoint's `config`, `to_dict()`'s output).

        Raises ConfigError listing every problem (see `problems`).
        """
        return build_config(raw, world_size=world_size)


def preset_path(name_or_path: str) -> Path:
    """A preset name (ci, demo, nih-256, paper-1024) or a path to a TOML file."""
    return presets.preset_path(CONFIG_DIR, name_or_path)


def read_preset(name_or_path: str) -> dict[str, Any]:
    """The table of a preset or TOML file (see `preset_path`), named after the file unless it says."""
    return presets.read_preset(CONFIG_DIR, name_or_path)


def load_config(name_or_path: str, overrides: Iterable[str] = (), world_size: int | None = None) -> GanConfig:
    """A preset or TOML file with `--set` overrides, checked; raises ConfigError listing every problem."""
    return build_config(read_preset(name_or_path), overrides, world_size)


def build_config(
    base: Mapping[str, Any],
    overrides: Iterable[str] = (),
    world_size: int | None = None,
    resume: bool = False,
) -> GanConfig:
    """`base` (a preset's or a checkpoint's table) with `--set` overrides applied, checked.

    Beyond `problems`, an override of a per-resolution entry this run never uses is refused (it would
    change nothing), and with `resume` (base is a checkpoint's configuration) so is an override that
    changes the networks' shapes, which the checkpoint's weights fix. Entries that `base` itself holds
    for resolutions outside the run are ignored, so `--set network.resolution=16` can shrink a preset.
    Raises ConfigError listing every problem, each with its dotted key.
    """
    overrides = list(overrides)
    config = presets.build(GanConfig, presets.apply_overrides(base, overrides, GanConfig))
    found = problems(config, world_size) + _unused_override_problems(overrides, config)
    if resume:
        found += _resume_problems(presets.build(GanConfig, base), config)
    if found:
        raise ConfigError(found)
    return config


def validate(config: GanConfig, world_size: int | None = None) -> None:
    """Raise ConfigError listing every problem of `config` (see `problems`); return if there is none."""
    found = problems(config, world_size)
    if found:
        raise ConfigError(found)


def problems(config: GanConfig, world_size: int | None = None) -> list[str]:
    """Every value of `config` that cannot run, one message each, starting with its dotted key.

    world_size: the number of processes about to train (WORLD_SIZE). With it, each resolution's batch
    must split evenly over the ranks into per-rank batches the minibatch-stddev layer can group, and a
    CUDA device must be present. None skips those checks, as when a checkpoint's configuration is read
    to sample or export.
    """
    checks = Checks()
    resolutions = _check_network(config.network, checks)
    trained = _check_schedule(config, resolutions, checks)
    if world_size is not None:
        _check_batches(config, trained, world_size, checks)
    loss, optim = config.loss, config.optim
    checks.number("loss.gp_weight", loss.gp_weight, 0.0, above=True)  # the critic's only Lipschitz bound
    checks.number("loss.gp_target", loss.gp_target, 0.0)
    checks.number("loss.drift_weight", loss.drift_weight, 0.0)
    checks.number("optim.lr", optim.lr, 0.0, above=True)
    if len(optim.betas) != 2:
        checks.add(f"optim.betas={optim.betas} must hold two numbers (Adam's beta1, beta2)")
    for index, beta in enumerate(optim.betas[:2]):
        checks.number(f"optim.betas[{index}]", beta, 0.0, below=1.0)
    checks.number("optim.eps", optim.eps, 0.0, above=True)
    checks.number("ema.beta", config.ema.beta, 0.0, below=1.0)
    data, train = config.data, config.train
    checks.integer("data.phantom_count", data.phantom_count, 1)
    checks.choice("data.phantom_prior", data.phantom_prior, PRIOR_NAMES)
    checks.integer("data.phantom_seed", data.phantom_seed, 0)
    checks.integer("data.num_workers", data.num_workers, 0)
    checks.integer("train.seed", train.seed, 0, 2**32 - 1)  # numpy's seed range
    checks.integer("train.tick_images", train.tick_images, 1)
    checks.integer("train.checkpoint_images", train.checkpoint_images, 1)
    checks.integer("train.keep_checkpoints", train.keep_checkpoints, 1)
    checks.integer("train.grid_size", train.grid_size, 1)
    checks.integer("train.max_nonfinite_steps", train.max_nonfinite_steps, 1)
    checks.choice("train.amp", train.amp, AMP_MODES)
    checks.choice("train.amp_dtype", train.amp_dtype, AMP_DTYPES)
    checks.device("train.device", train.device, on_this_machine=world_size is not None)
    checks.integer("train.cpu_threads", train.cpu_threads, 0)
    if checks.integer("train.metric_images", train.metric_images, 0) and train.metric_images > 0:
        checks.integer("train.metric_samples", train.metric_samples, 2)
        checks.integer("train.metric_bootstrap", train.metric_bootstrap, 0)
        if not (Path(train.metric_classifier) / "classifier.json").is_file() and not (
                Path(train.metric_classifier) / "classifier" / "classifier.json").is_file():
            checks.add(f"train.metric_classifier={train.metric_classifier!r} must be a trained classifier directory "
                       "(holding classifier.json) when train.metric_images > 0")
    return checks.problems


def _is_resolution(value: Any) -> bool:
    """A power of two ≥ 4, the resolutions the networks grow through."""
    return is_int(value) and value >= 4 and not value & (value - 1)


def _is_resolution_key(key: str) -> bool:
    return key.isdigit() and _is_resolution(int(key))


def _check_network(net: NetworkConfig, checks: Checks) -> list[int]:
    """Checks the network section; returns its resolutions ([] when network.resolution is unusable)."""
    resolutions = []
    if _is_resolution(net.resolution):
        resolutions = resolutions_up_to(net.resolution)
    else:
        checks.add(f"network.resolution={show(net.resolution)} must be a power of two ≥ 4, as 64 or 1024")
    checks.integer("network.latent_dim", net.latent_dim, 1)
    checks.integer("network.channel_base", net.channel_base, 1)
    checks.integer("network.channel_max", net.channel_max, 1)
    checks.integer("network.mbstd_group_size", net.mbstd_group_size, 1)
    for key, value in net.channels.items():
        if key == "default":
            checks.add(
                "network.channels.default is not used: resolutions not listed get "
                "min(network.channel_max, network.channel_base / resolution); set those instead"
            )
        elif not _is_resolution_key(key):
            checks.add(f"network.channels.{key}: {key!r} is not a power-of-two resolution ≥ 4")
        checks.integer(f"network.channels.{key}", value, 1)
    return resolutions


def _check_schedule(config: GanConfig, resolutions: list[int], checks: Checks) -> list[int]:
    """Checks the schedule section; returns the resolutions the run trains (start..final)."""
    sched = config.schedule
    trained = [r for r in resolutions if r >= sched.start_resolution]
    if resolutions and sched.start_resolution not in resolutions:
        checks.add(
            f"schedule.start_resolution={show(sched.start_resolution)} must be one of the network's "
            f"resolutions {', '.join(map(str, resolutions))}"
        )
        trained = []
    for name in SCHEDULE_TABLES:
        table = getattr(sched, name)
        for key, value in table.items():
            if key != "default" and not _is_resolution_key(key):
                checks.add(
                    f"schedule.{name}.{key}: {key!r} is neither 'default' nor a power-of-two resolution ≥ 4"
                )
            checks.integer(f"schedule.{name}.{key}", value, 1 if name == "batch_size" else 0)
        needed = trained[1:] if name == "fade_images" else trained  # the start resolution does not fade in
        for r in needed:
            if str(r) not in table and "default" not in table:
                checks.add(f"schedule.{name} has no entry for {r}² and no default; set schedule.{name}.{r}")
    if trained:
        final = trained[-1]
        key = _source(sched.stable_images, final)
        if key is not None and sched.stable_images[key] == 0:
            checks.add(
                f"schedule.stable_images.{key}=0 leaves no training at the final resolution {final}²; "
                "set at least 1"
            )
    return trained


def _check_batches(config: GanConfig, trained: list[int], world_size: int, checks: Checks) -> None:
    """Each batch-size entry the run uses splits over `world_size` ranks into groupable per-rank batches."""
    group_size = config.network.mbstd_group_size
    keys = dict.fromkeys(key for r in trained if (key := _source(config.schedule.batch_size, r)) is not None)
    for key in keys:
        name, batch = f"schedule.batch_size.{key}", config.schedule.batch_size[key]
        if not is_int(batch) or batch < 1:
            continue  # already reported
        per_rank = checks.world_batch(name, batch, world_size)
        if per_rank is None or not is_int(group_size) or group_size < 1:
            continue
        try:
            mbstd_group(per_rank, group_size)
        except ValueError:
            checks.add(
                f"{name}={batch} gives per-rank batches of {per_rank} (world size {world_size}), which "
                f"minibatch-stddev group size {group_size} (network.mbstd_group_size) does not divide; use "
                f"a multiple of {group_size * world_size} (or fewer than {group_size} per rank)"
            )


def _source(table: Mapping[str, Any], resolution: int) -> str | None:
    """The key of a per-resolution table that gives `resolution`'s value (None when none does)."""
    if str(resolution) in table:
        return str(resolution)
    return "default" if "default" in table else None


def _unused_override_problems(overrides: Iterable[str], config: GanConfig) -> list[str]:
    """`--set` entries of per-resolution tables for resolutions the run never uses."""
    net, sched = config.network, config.schedule
    if not _is_resolution(net.resolution):
        return []  # the resolution itself is reported
    resolutions = resolutions_up_to(net.resolution)
    trained = [r for r in resolutions if r >= sched.start_resolution]
    used = {  # table -> (the resolutions it applies to, what the run does at them)
        ("network", "channels"): (resolutions, "builds"),
        ("schedule", "batch_size"): (trained, "trains"),
        ("schedule", "stable_images"): (trained, "trains"),
        ("schedule", "fade_images"): (trained[1:], "fades in"),  # the start resolution does not fade
    }
    found = []
    for text in overrides:
        keys, value = presets.parse_override(text, GanConfig)
        table = tuple(keys[:2])
        if table not in used or not trained:
            continue
        if len(keys) == 3:
            entries = [keys[2]]
        elif len(keys) == 2 and isinstance(value, Mapping):
            entries = [str(k) for k in value]
        else:
            continue
        applies, verb = used[table]
        for entry in entries:
            if _is_resolution_key(entry) and int(entry) not in applies:
                span = f"{applies[0]}²..{applies[-1]}²" if applies else "none"
                found.append(
                    f"{'.'.join(table)}.{entry} (--set) names {entry}², which this run never {verb} "
                    f"({span}), so it would change nothing"
                )
    return found


def _resume_problems(saved: GanConfig, config: GanConfig) -> list[str]:
    """Overrides that change the shapes of the networks a checkpoint holds."""
    found = []
    for name in ("resolution", "latent_dim"):
        old, new = getattr(saved.network, name), getattr(config.network, name)
        if old != new:
            found.append(
                f"network.{name}={show(new)} differs from the checkpoint's {show(old)}; its weights have "
                "that shape, so a resumed run keeps it"
            )
    if not found and _is_resolution(config.network.resolution):
        old_table, new_table = saved.network.channel_table(), config.network.channel_table()
        for r, channels in new_table.items():
            if old_table.get(r) != channels:
                found.append(
                    f"network.channels.{r}={channels} (from network.channels, channel_base, channel_max) "
                    f"differs from the checkpoint's {old_table.get(r)}; a resumed run keeps the saved shapes"
                )
    return found


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
