"""The PGGAN training loop: progressive growing, WGAN-GP, EMA generator, exact resume, data parallel.

One iteration shows one global batch of real images:

1. the phase (resolution, fade-in or stabilise) and alpha follow from the images shown so far;
2. reals at the data's full resolution are average-pooled to the current resolution and, during a
   fade-in, blended with their 2×-coarser version by the same alpha as the networks (Karras et al.);
3. one critic step (WGAN-GP + drift) and one generator step, each with gradients averaged over ranks
   in a single all-reduce that also carries the losses and the stop flag, so every rank takes the same
   decision about non-finite values and interruption;
4. the EMA generator follows the generator.

Everything random comes from the global RNGs (latents, interpolation weights) and from a seeded
sampler whose position is the number of images shown, and every piece of state is in the checkpoint,
so a run resumed from any checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.data import make_loader
from training.gan.config import GanConfig, Phase, ProgressiveSchedule, validate
from training.gan.loss import discriminator_loss, generator_loss
from training.networks.pggan import Discriminator, Generator, downsample2x, upsample2x
from training.runtime import (
    DistributedContext,
    NonFiniteGuard,
    ResumableBatchSampler,
    StopRequest,
    TrainingMonitor,
    broadcast_module_,
    load_checkpoint,
    read_checkpoint,
    save_image_grid,
    write_json_atomic,
)
from training.runtime.loop import optimizer_step, run_steps, save_run_checkpoint

GRID_SEED_OFFSET = 7919  # fixed latents for grids come from their own generator, not the global RNG
FRECHET_SEED_OFFSET = 104729  # and those of the Fréchet distance from another


@dataclass
class TrainResult:
    images_shown: int
    finished: bool  # reached the end of the schedule
    stopped_by_signal: bool
    checkpoint: Path | None


def _summed(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sums` plus `stats`, name by name (`stats` itself when nothing is summed yet)."""
    return {name: sums[name] + value for name, value in stats.items()} if sums else stats


def run_config(config: GanConfig, data_spec: str) -> dict[str, Any]:
    """What a run directory's config.json holds: the resolved configuration and the data it reads."""
    return {"config": config.to_dict(), "data": data_spec}


def build_networks(config: GanConfig) -> tuple[Generator, Discriminator]:
    net = config.network
    channels = net.channel_table()
    generator = Generator(net.resolution, net.latent_dim, channels=channels)
    discriminator = Discriminator(net.resolution, channels=channels, mbstd_group_size=net.mbstd_group_size)
    return generator, discriminator


def real_images_at(reals: torch.Tensor, resolution: int, alpha: float) -> torch.Tensor:
    """Full-resolution reals -> `resolution`, faded with their 2×-coarser version like the networks."""
    factor = reals.shape[-1] // resolution
    images = F.avg_pool2d(reals, factor) if factor > 1 else reals
    if alpha < 1.0 and resolution > 4:
        images = torch.lerp(upsample2x(downsample2x(images)), images, alpha)
    return images


def load_generator(path: str | Path, ema: bool = True, map_location: str | torch.device = "cpu") -> Generator:
    """The (EMA) generator stored in a PGGAN checkpoint, in eval mode, at its configured resolution."""
    checkpoint = read_checkpoint(path, map_location=map_location)
    if "G_ema" not in checkpoint.objects:
        raise ValueError(f"{path} is not a PGGAN checkpoint (no generator in it)")
    config = GanConfig.from_dict(checkpoint.state["config"])
    generator, _ = build_networks(config)
    generator.load_state_dict(checkpoint.objects["G_ema" if ema else "G"])
    return generator.eval().requires_grad_(False)


class PGGANTrainer:
    """Owns the networks, optimisers, data stream and counters of one training run (one rank).

    Raises ConfigError (listing every problem) for a configuration that cannot run at
    `context.world_size`, before anything is built.
    """

    def __init__(
        self,
        config: GanConfig,
        dataset: Dataset,
        run_dir: str | Path,
        context: DistributedContext,
        data_spec: str = "custom",
        progress: bool = True,
        tensorboard: bool = True,
    ) -> None:
        # Refused here too (commands check earlier): a batch the ranks or minibatch stddev cannot
        # split would otherwise fail only when its resolution is reached.
        validate(config, context.world_size)
        self.config = config
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.context = context
        self.data_spec = data_spec
        self.progress = progress
        self.tensorboard = tensorboard
        self.device = context.device
        self.schedule = ProgressiveSchedule(config)
        train = config.train

        self.amp_enabled = train.amp == "on" or (train.amp == "auto" and self.device.type == "cuda")
        # amp=on also works on CPU (slowly): the tests exercise the GradScaler path there.
        self.autocast_dtype = getattr(torch, train.amp_dtype) if self.amp_enabled else None
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format

        # Identical initial weights on every rank (same seed), then per-rank random streams.
        torch.manual_seed(train.seed)
        self.G, self.D = build_networks(config)
        self.G.to(self.device, memory_format=self.memory_format)
        self.D.to(self.device, memory_format=self.memory_format)
        broadcast_module_(self.G)
        broadcast_module_(self.D)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.G_forward = torch.compile(self.G) if train.compile else self.G  # D needs double backward: eager

        betas = tuple(config.optim.betas)
        self.opt_G = torch.optim.Adam(
            self.G.parameters(), lr=config.optim.lr, betas=betas, eps=config.optim.eps
        )
        self.opt_D = torch.optim.Adam(
            self.D.parameters(), lr=config.optim.lr, betas=betas, eps=config.optim.eps
        )
        use_scaler = self.amp_enabled and self.autocast_dtype == torch.float16
        # 2**10 rather than 2**16: WGAN-GP gradients are large, so a high start only costs skipped steps.
        self.scaler_G = torch.amp.GradScaler(self.device.type, init_scale=2.0**10, enabled=use_scaler)
        self.scaler_D = torch.amp.GradScaler(self.device.type, init_scale=2.0**10, enabled=use_scaler)
        # One guard per network: reals that are NaN poison every critic step while generator steps
        # stay finite, and that must still stop the run.
        self.guards = {
            "discriminator": NonFiniteGuard(train.max_nonfinite_steps, name="PGGAN discriminator"),
            "generator": NonFiniteGuard(train.max_nonfinite_steps, name="PGGAN generator"),
        }
        self._seed_rngs(train.seed * 1000 + context.rank + 1)

        self.images_shown = 0
        self.steps = 0
        self.phase_index = 0
        self.grid_latents = torch.randn(
            train.grid_size,
            config.network.latent_dim,
            generator=torch.Generator().manual_seed(train.seed + GRID_SEED_OFFSET),
        ).to(self.device)
        self._batches = None
        self._tick_postfix: dict[str, str] = {}  # last tick's losses, shown on the progress bar
        self._tick_sums: dict[str, torch.Tensor] = {}  # this tick's step statistics, summed by name
        self._tick_steps = 0
        self._tick_start = (time.perf_counter(), 0)  # when the tick began, and at how many images
        self._frechet_measured_at = 0  # images shown at the last Fréchet distance (train.metric_images)
        self._frechet_probe = None  # (extractor, latents, reals), made at the first measurement

    # ------------------------------------------------------------------------------ state

    @staticmethod
    def _seed_rngs(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _stateful(self) -> dict[str, Any]:
        objects: dict[str, Any] = {
            "G": self.G,
            "D": self.D,
            "G_ema": self.G_ema,
            "opt_G": self.opt_G,
            "opt_D": self.opt_D,
            "guard_D": self.guards["discriminator"],
            "guard_G": self.guards["generator"],
        }
        if self.scaler_G.is_enabled():
            objects.update(scaler_G=self.scaler_G, scaler_D=self.scaler_D)
        return objects

    def state(self) -> dict[str, Any]:
        phase, alpha = self.schedule.at(self.images_shown)
        return {
            "kind": "pggan",
            "images_shown": self.images_shown,
            "steps": self.steps,
            "phase_index": self.phase_index,
            "resolution": phase.resolution,
            "phase": phase.kind,
            "alpha": alpha,
            "world_size": self.context.world_size,
            "data": self.data_spec,
            "config": self.config.to_dict(),
        }

    def save(self) -> Path | None:
        """Checkpoint (collective: every rank contributes its RNG state; rank 0 writes)."""
        return save_run_checkpoint(
            self.context,
            self.run_dir,
            self.images_shown,
            self._stateful(),
            self.state(),
            keep_last=self.config.train.keep_checkpoints,
        )

    def resume(self, path: str | Path) -> None:
        """Restore everything from a checkpoint written by `save` (same world size: bit-exact)."""
        header = read_checkpoint(path)
        same_world = header.state.get("world_size") == self.context.world_size
        objects = self._stateful()
        if "scaler_G" not in header.objects:  # an fp32 checkpoint continued under AMP: fresh scalers
            for name in ("scaler_G", "scaler_D"):
                objects.pop(name, None)
        checkpoint = load_checkpoint(
            path, objects=objects, map_location=self.device, rank=self.context.rank if same_world else None
        )
        self.images_shown = int(checkpoint.state["images_shown"])
        self.steps = int(checkpoint.state["steps"])
        self.phase_index = int(checkpoint.state["phase_index"])
        if not same_world:
            # Data order stays identical (it depends only on images shown); latents differ.
            self._seed_rngs(self.config.train.seed * 1000 + self.context.rank + 1 + self.images_shown)
        self._batches = None

    # ------------------------------------------------------------------------------ data

    def _next_reals(self, per_rank: int) -> torch.Tensor:
        if self._batches is None:
            sampler = ResumableBatchSampler(
                len(self.dataset),  # type: ignore[arg-type]
                self.schedule.batch_size_at,
                seed=self.config.train.seed,
                start_position=self.images_shown,
                rank=self.context.rank,
                world_size=self.context.world_size,
            )
            loader = make_loader(
                self.dataset,
                batch_size=per_rank,
                workers=self.config.data.num_workers,
                batch_sampler=sampler,
                seed=self.config.train.seed,
            )
            self._batches = iter(loader)
        images = next(self._batches)[0]
        if images.shape[0] != per_rank:
            raise RuntimeError(f"data stream out of step: got {images.shape[0]} images, expected {per_rank}")
        return images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    # ------------------------------------------------------------------------------ steps

    def _begin_phase(self, phase: Phase) -> None:
        if self.config.optim.reset_on_new_phase:
            self.opt_G.state.clear()
            self.opt_D.state.clear()
        self.phase_index = phase.index

    def _apply(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        module: torch.nn.Module,
        stats: dict[str, torch.Tensor],
        where: str,
    ) -> dict[str, torch.Tensor]:
        """All-reduce gradients and the scalar `stats` in one collective, step or skip when non-finite.

        Returns `stats` averaged over ranks, by the same names.
        """
        guard = self.guards[where]
        stepped, averaged = optimizer_step(
            optimizer,
            scaler,
            module.parameters(),
            guard,
            extra=torch.stack(list(stats.values())),
            where=f"at {self.images_shown:,} images",
        )
        if not stepped and self.monitor is not None:
            overflow = (
                f"; under AMP usually a loss-scale overflow, scale now {scaler.get_scale():g}"
                if scaler.is_enabled()
                else ""
            )
            self.monitor.message(
                f"skipped a non-finite {where} step at {self.images_shown:,} images "
                f"({guard.consecutive} in a row, {guard.total_skipped} in all{overflow})"
            )
        return dict(zip(stats, averaged.unbind()))

    def step(self, stop_requested: bool = False) -> dict[str, torch.Tensor]:
        """One critic and one generator step on one global batch.

        Returns the step's statistics averaged over ranks, scalar tensors by name: loss_d, score_real,
        score_fake, gradient_penalty, drift, stop (1 when some rank asked to stop) and loss_g.
        """
        phase, alpha = self.schedule.at(self.images_shown)
        if phase.index != self.phase_index:
            self._begin_phase(phase)
        resolution = phase.resolution
        per_rank = phase.batch_size // self.context.world_size  # divisible: checked by `validate`
        reals = real_images_at(self._next_reals(per_rank), resolution, alpha)
        latent_dim = self.config.network.latent_dim
        loss_cfg = self.config.loss

        # Critic.
        self.G.requires_grad_(False)
        self.D.requires_grad_(True)
        z = torch.randn(per_rank, latent_dim, device=self.device)
        with (
            torch.no_grad(),
            torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.float16, enabled=self.amp_enabled
            ),
        ):
            fakes = self.G_forward(z, resolution, alpha)
        fakes = fakes.float().contiguous(memory_format=self.memory_format)
        d = discriminator_loss(
            self.D,
            reals,
            fakes,
            resolution,
            alpha,
            gp_weight=loss_cfg.gp_weight,
            drift_weight=loss_cfg.drift_weight,
            gp_target=loss_cfg.gp_target,
            scaler=self.scaler_D,
            autocast_dtype=self.autocast_dtype,
        )
        self.opt_D.zero_grad(set_to_none=True)
        self.scaler_D.scale(d.loss).backward()
        d_stats = {
            "loss_d": d.loss.detach(),
            "score_real": d.score_real,
            "score_fake": d.score_fake,
            "gradient_penalty": d.penalty,
            "drift": d.drift,
            "stop": torch.tensor(float(stop_requested), device=self.device),  # rides along to every rank
        }
        d_stats = self._apply(self.opt_D, self.scaler_D, self.D, d_stats, "discriminator")

        # Generator.
        self.G.requires_grad_(True)
        self.D.requires_grad_(False)
        z = torch.randn(per_rank, latent_dim, device=self.device)
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float16, enabled=self.amp_enabled
        ):
            fakes = self.G_forward(z, resolution, alpha)
        loss_g = generator_loss(
            self.D,
            fakes.contiguous(memory_format=self.memory_format),
            resolution,
            alpha,
            autocast_dtype=self.autocast_dtype,
        )
        self.opt_G.zero_grad(set_to_none=True)
        self.scaler_G.scale(loss_g).backward()
        g_stats = self._apply(self.opt_G, self.scaler_G, self.G, {"loss_g": loss_g.detach()}, "generator")
        self.D.requires_grad_(True)

        self._update_ema()
        self.images_shown += phase.batch_size
        self.steps += 1
        return {**d_stats, **g_stats}

    @torch.no_grad()
    def _update_ema(self) -> None:
        beta = self.config.ema.beta
        if self.config.ema.rampup:
            beta = min(beta, (1.0 + self.steps) / (10.0 + self.steps))
        for ema_param, param in zip(self.G_ema.parameters(), self.G.parameters()):
            ema_param.lerp_(param.detach(), 1.0 - beta)

    # ------------------------------------------------------------------------------ outputs

    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        """EMA samples of the fixed grid latents at the current phase, upsampled to the final size."""
        phase, alpha = self.schedule.at(max(0, self.images_shown - 1))  # the phase just trained
        images = self.G_ema(self.grid_latents, phase.resolution, alpha).float().clamp(-1, 1)
        factor = self.config.network.resolution // phase.resolution
        return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images

    def write_grid(self) -> Path | None:
        if not self.context.is_main:
            return None
        return save_image_grid(
            self.sample_grid(), self.run_dir / "grids" / f"fakes-{self.images_shown:012d}.png"
        )

    # ------------------------------------------------------------------------------ loop

    monitor: TrainingMonitor | None = None

    def train(self, stop_at_images: int | None = None) -> TrainResult:
        """Train until the schedule ends (or `stop_at_images`), a signal asks to stop, or a fault."""
        config, ctx = self.config, self.context
        end = (
            self.schedule.total_images
            if stop_at_images is None
            else min(stop_at_images, self.schedule.total_images)
        )
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "config.json", run_config(config, self.data_spec))
        self.monitor = TrainingMonitor(
            self.run_dir,
            total=self.schedule.total_images,
            initial=self.images_shown,
            enabled=ctx.is_main,
            tensorboard=self.tensorboard,
            progress=self.progress,
        )
        monitor = self.monitor
        monitor.message(
            f"training {config.name} on {self.data_spec}: {self.schedule.total_images:,} images, "
            f"{ctx.world_size} process(es) on {self.device}, from {self.images_shown:,}\n"
            + self.schedule.describe()
        )
        if ctx.is_main and self.images_shown == 0:
            save_image_grid(self._reals_for_grid(), self.run_dir / "grids" / "reals.png")
            self.write_grid()

        self._tick_sums, self._tick_steps, self._tick_postfix = {}, 0, {}
        self._tick_start = (time.perf_counter(), self.images_shown)
        self._frechet_measured_at = self.images_shown  # a resumed run measures where an unbroken one would
        try:
            outcome = run_steps(
                self._train_step,
                lambda: self.images_shown,
                end,
                tick_every=config.train.tick_images,
                checkpoint_every=config.train.checkpoint_images,
                tick=self._end_tick,
                checkpoint=self.save,
                monitor=monitor,
            )
        finally:
            monitor.close()
        finished = self.images_shown >= self.schedule.total_images
        return TrainResult(self.images_shown, finished, outcome.stopped, outcome.checkpoint)

    def _train_step(self, stop: StopRequest) -> bool:
        """One step; returns whether some rank asked to stop (the flag travels with the step's stats)."""
        stats = self.step(stop_requested=stop.requested)
        self._tick_sums = _summed(self._tick_sums, stats)  # on the device: no host sync per step
        self._tick_steps += 1
        phase, alpha = self.schedule.at(self.images_shown - 1)
        self.monitor.advance(
            self.images_shown, {"phase": phase.label, "alpha": f"{alpha:.2f}", **self._tick_postfix}
        )
        return bool(stats["stop"] > 0)

    def _end_tick(self) -> None:
        start_time, start_images = self._tick_start
        rate = (self.images_shown - start_images) / max(time.perf_counter() - start_time, 1e-9)
        self._log_tick({name: total / self._tick_steps for name, total in self._tick_sums.items()}, rate)
        self._tick_sums, self._tick_steps = {}, 0
        self._tick_start = (time.perf_counter(), self.images_shown)

    def _frechet_due(self) -> bool:
        """A Fréchet distance is due at the first tick past each multiple of train.metric_images."""
        every = self.config.train.metric_images
        if every <= 0 or self.images_shown // every <= self._frechet_measured_at // every:
            return False
        self._frechet_measured_at = self.images_shown
        return True

    @torch.no_grad()
    def measure_frechet_distance(self) -> float:
        """The `frechet_distance` metric of `train.metric_samples` EMA samples (fixed latents) against as
        many reals at the phase's resolution, in `train.metric_classifier`'s embedding; appended to
        metric-frechet_distance.jsonl (rank 0 only) and returned."""
        from training.evaluate.features import ClassifierFeatures, extract
        from training.evaluate.metrics import frechet_distance_metric
        from training.metrics.registry import report_metric

        train = self.config.train
        if self._frechet_probe is None:
            count = min(train.metric_samples, len(self.dataset))  # type: ignore[arg-type]
            latents = torch.randn(count, self.config.network.latent_dim,
                                  generator=torch.Generator().manual_seed(train.seed + FRECHET_SEED_OFFSET))
            reals = torch.stack([self.dataset[i][0] for i in range(count)])
            self._frechet_probe = (ClassifierFeatures(train.metric_classifier, name="metric_classifier"), latents, reals)
        extractor, latents, reals = self._frechet_probe
        phase, alpha = self.schedule.at(max(0, self.images_shown - 1))
        fakes = torch.cat([self.G_ema(chunk.to(self.device), phase.resolution, alpha).float().clamp(-1, 1).cpu()
                           for chunk in latents.split(64)])
        source = f"{self.data_spec} first {len(reals)} at {phase.resolution}²"
        real_features = extract(extractor, real_images_at(reals, phase.resolution, alpha), progress=False,
                                source=source)
        fake_features = extract(extractor, fakes, progress=False, source=f"EMA generator at {self.images_shown} images")
        result = frechet_distance_metric(real_features, fake_features, bootstrap=train.metric_bootstrap,
                                         seed=train.seed)
        report_metric(result, self.run_dir, images_shown=self.images_shown)
        return float(result.value)

    def _reals_for_grid(self) -> torch.Tensor:
        count = min(self.config.train.grid_size, len(self.dataset))  # type: ignore[arg-type]
        return torch.stack([self.dataset[i][0] for i in range(count)])

    def _log_tick(self, means: dict[str, torch.Tensor], images_per_second: float) -> None:
        """Log the tick's mean step statistics (`step`'s names, less `stop`) and where training is."""
        values = dict(zip(means, torch.stack(list(means.values())).tolist()))  # one host sync
        phase, alpha = self.schedule.at(max(0, self.images_shown - 1))  # the phase just trained
        stats: dict[str, Any] = {name: value for name, value in values.items() if name != "stop"}
        stats.update(
            wasserstein=values["score_real"] - values["score_fake"],
            images_shown=self.images_shown,
            kimg=self.images_shown / 1000,
            resolution=phase.resolution,
            phase=phase.kind,
            alpha=alpha,
            images_per_second=images_per_second,
            nonfinite_skipped=sum(guard.total_skipped for guard in self.guards.values()),
        )
        if self.scaler_G.is_enabled():
            stats.update(loss_scale_g=self.scaler_G.get_scale(), loss_scale_d=self.scaler_D.get_scale())
        if self.monitor is None:
            return
        if self._frechet_due():
            stats["frechet_distance"] = self.measure_frechet_distance()
        self.monitor.log(stats, step=self.images_shown)
        self._tick_postfix = {"D": f"{stats['loss_d']:.3f}", "G": f"{stats['loss_g']:.3f}"}
        self.write_grid()
