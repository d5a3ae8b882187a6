"""On-manifold distillation: one CNN that reads the generator's images as the LCO ensemble does,
hardened against LCO itself (``python -m training.cli classifier distill``).

Why: gradient descent on one ordinary CNN finds pixel patterns only that network reads, so the demo
bundle steers LCO by an ensemble of nine, read on three views: 27 classifier passes per step
(docs/lco-quality.md). Adversarial training in pixel space did not close the gap at this size. But
LCO never shows the classifier an arbitrary image, only what the generator draws, so the steering
classifier has to agree with the ensemble only there: on the generator's manifold (on-manifold
adversarial training, Stutz et al. 2019, "Disentangling Adversarial Robustness and Generalization",
CVPR). The recipe, in the manner of DAgger (Ross et al. 2011, "A Reduction of Imitation Learning and
Structured Prediction to No-Regret Online Learning"), where the student's own mistakes become its
training data:

1. **Pool**: ``pool_images`` unconditional generator samples, labelled by the teacher's logits (for
   the ensemble, its mean clipped vote: 0 at the decision threshold), and ``dataset_images`` images
   of the preset's training data, labelled by the teacher too: the generator rarely draws the rarest
   findings unprompted, and a student that never saw the teacher sure of one cannot steer towards it. The student regresses them
   (mean squared error on logits), so its logits live on the teacher's scale and LCO's margin means
   what it means for the teacher; the student's thresholds are 0.5 (logit 0), as the ensemble's.
2. **Rounds**: LCO, the service's algorithm re-stated in torch (``lco_trajectories``), runs against the
   current student for every single finding, "No Finding" and ``prior_requests`` label sets from the
   data prior. The points of its trajectories (every ``snapshot_every`` steps and where it stops) are
   labelled by the teacher and join the pool, with ``fresh_images`` new unconditional samples: where
   LCO fooled the student, the teacher's logits say so. The student then trains on the whole pool.

With ``output_clip`` = c the student's output is soft-clipped as an ensemble member's vote is,
c·tanh(raw / c) (a one-member, one-view ``ClassifierEnsemble``, so it exports like any classifier), and
the raw output regresses c·atanh(t / c) of the teacher's logit t. The teacher's mean clipped vote
saturates towards ±c, and LCO's margin sits in that saturated region: in plain logits a student
error there is a few hundredths of a logit of squared error yet decides whether LCO stops; unclipped,
the same error weighs as much as one anywhere else.

Only the teacher labels: the auditor never enters, so it stays an independent judge. Each round logs
how often the teacher agrees with what LCO drew against the student (``teacher_agreement``, the
share of samples whose every constrained label the teacher puts on the requested side of its
threshold; ``teacher_agreement_at_fallback_margin`` past the margin LCO's fallback stops at) to
stats.jsonl: a student that stops being fooled drives them towards 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from service.labels import LABELS, NUM_LABELS
from service.lco import LCOOptions, loss_weights
from service.prior import get_prior
from training.classifier.artifact import TrainedClassifier
from training.classifier.config import ClassifierTrainConfig, DistillConfig, validate
from training.export.lco import masked_bce
from training.networks.classifier import ClassifierEnsemble, ClassifierSpec
from training.runtime import ConfigError

# The student's logits are the teacher's centred scale: the decision threshold is logit 0.
STUDENT_THRESHOLD = 0.5
BATCH = 64
# Unclipped targets stop at c·atanh(0.98) (|t| ≤ 0.98 c): past it the teacher is sure either way and
# atanh would give its saturated logits unbounded weight.
UNCLIP_BOUND = 0.98


def unclip(logits: torch.Tensor, clip: float) -> torch.Tensor:
    """c·atanh(t / c) of logits t soft-clipped at ±c (the inverse of c·tanh(raw / c)), |t / c| bounded
    by ``UNCLIP_BOUND``."""
    return clip * torch.atanh((logits / clip).clamp(-UNCLIP_BOUND, UNCLIP_BOUND))


def clipped_student(network: nn.Module, spec: ClassifierSpec, clip: float) -> ClassifierEnsemble:
    """``network`` read as one ensemble member on one view, its output soft-clipped at ±``clip``
    (centre 0: the student's threshold is logit 0). Shares ``network``'s parameters."""
    wrapper = ClassifierEnsemble(ClassifierSpec(arch="ensemble", input_size=spec.input_size, members=(spec,),
                                                shifts=(), vote_clip=float(clip)))
    wrapper.members[0] = network
    return wrapper


@dataclass(frozen=True)
class Request:
    """One LCO request: target [14] in {0, 1} and mask [14] (1 = constrained), as float32 tensors."""

    name: str
    target: torch.Tensor
    mask: torch.Tensor


def round_requests(config: DistillConfig, prior: str, rng: np.random.Generator) -> list[Request]:
    """Every single finding (its label present, the others free), "No Finding" (all 14 absent) and
    ``config.prior_requests`` label sets drawn from ``prior`` with all 14 constrained, as an archive asks."""
    eye = torch.eye(NUM_LABELS)
    requests = [Request(name, eye[index], eye[index]) for index, name in enumerate(LABELS)]
    requests.append(Request("No Finding", torch.zeros(NUM_LABELS), torch.ones(NUM_LABELS)))
    for labels in get_prior(prior).sample(config.prior_requests, rng):
        name = "+".join(LABELS[i] for i in np.flatnonzero(labels)) or "No Finding"
        requests.append(Request(f"prior: {name}", torch.from_numpy(labels.astype(np.float32)), torch.ones(NUM_LABELS)))
    return requests


def to_sphere(z: torch.Tensor) -> torch.Tensor:
    """``z`` [B, d] projected onto the sphere of radius sqrt(d), where the PGGAN prior puts its mass."""
    return z * (math.sqrt(z.shape[1]) / z.norm(dim=1, keepdim=True).clamp_min(1e-12))


def met(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, margin: float,
        absent_margin: float | None = None) -> torch.Tensor:
    """Rows [B] (bool) whose every constrained label is past logit 0 by ``margin`` on its requested side,
    an absent one by ``absent_margin`` where smaller (service.lco.satisfied's rule, for centred logits)."""
    below = margin if absent_margin is None else min(margin, absent_margin)
    good = torch.where(target > 0.5, logits >= margin, logits < -below) | (mask < 0.5)
    return good.all(dim=1)


def lco_trajectories(generator: Callable[[torch.Tensor], torch.Tensor], latent_dim: int, classifier: nn.Module,
                     request: Request, samples: int, steps: int, candidates: int, snapshot_every: int,
                     options: LCOOptions, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LCO against ``classifier`` for ``samples`` samples of ``request``: the service's algorithm
    (service/lco.py: the best of ``candidates`` latents by masked BCE, Adam on z at ``options.lr``, the
    sphere projection, a sample stops past ``options.margin``, one out of steps returns its earliest
    point past ``options.fallback_margin``), in torch on the student being trained.

    Returns (returned latents [samples, d], trajectory latents [K, d]: the starts, every
    ``snapshot_every`` steps of the samples still stepping, and the returned points).
    """
    target = request.target.expand(samples, -1)
    mask = request.mask.expand(samples, -1)
    weights = torch.from_numpy(loss_weights(request.target.numpy(), request.mask.numpy(),
                                            options.balance_sides)).expand(samples, -1)
    with torch.no_grad():
        pool = to_sphere(torch.randn(samples * candidates, latent_dim, generator=rng))
        logits = classifier(generator(pool))[0]
        losses = masked_bce(logits, target.repeat_interleave(candidates, 0), weights.repeat_interleave(candidates, 0))
        best = losses.view(samples, candidates).argmin(dim=1)
        z = pool.view(samples, candidates, latent_dim)[torch.arange(samples), best].clone()
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=options.lr)
    done = torch.zeros(samples, dtype=torch.bool)
    returned = z.detach().clone()
    fallback_reached = torch.zeros(samples, dtype=torch.bool)
    fallback = z.detach().clone()
    kept = [z.detach().clone()]
    for step in range(steps + 1):
        logits = classifier(generator(z))[0]
        with torch.no_grad():
            hit = met(logits, target, mask, options.margin, options.absent_margin) & ~done
            returned[hit] = z.detach()[hit]
            done |= hit
            first_fallback = met(logits, target, mask, options.fallback_margin, options.absent_margin) & ~fallback_reached
            fallback[first_fallback] = z.detach()[first_fallback]
            fallback_reached |= first_fallback
        if done.all() or step == steps:
            break
        loss = (masked_bce(logits, target, weights) * ~done).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            z.copy_(to_sphere(z))
        if (step + 1) % snapshot_every == 0:
            kept.append(z.detach()[~done].clone())
    with torch.no_grad():
        out_of_steps = ~done
        returned[out_of_steps] = torch.where(fallback_reached[out_of_steps, None], fallback[out_of_steps],
                                             z.detach()[out_of_steps])
    return returned, torch.cat([*kept, returned])


class Distillation:
    """The student, the teacher, the generator and the growing pool of (image, teacher logits)."""

    def __init__(self, config: ClassifierTrainConfig, teacher: TrainedClassifier, generator: nn.Module,
                 student: nn.Module, progress: bool = True) -> None:
        """``student``: the CNN trained; LCO steers by ``self.steering`` (the CNN itself, or the CNN with
        its output clipped when ``output_clip`` > 0)."""
        self.config, self.settings = config, config.distill
        self.teacher, self.student = teacher.network.eval(), student
        clip = self.settings.output_clip
        self.steering = clipped_student(student, config.model, clip) if clip > 0 else student
        self.pggan = generator.eval().requires_grad_(False)
        self.options = LCOOptions()
        self.progress = progress
        self.latents = torch.Generator().manual_seed(config.seed)
        self.requests_rng = np.random.default_rng(config.seed)
        self.optimizer = torch.optim.Adam(student.parameters(), lr=self.settings.lr)
        self.images = torch.empty(0, 1, config.model.input_size, config.model.input_size)
        self.logits = torch.empty(0, NUM_LABELS)

    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [N, 1, H, W] for latents [N, d], clamped to [-1, 1] as the exported generator's."""
        return self.pggan(latents).clamp(-1.0, 1.0)

    def draw(self, latents: torch.Tensor) -> torch.Tensor:
        """``generate`` in batches, without gradients."""
        with torch.no_grad():
            return torch.cat([self.generate(latents[i:i + BATCH]) for i in range(0, len(latents), BATCH)])

    def label(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [N, 14] on images [N, 1, H, W]."""
        with torch.no_grad():
            return torch.cat([self.teacher(images[i:i + BATCH])[0] for i in range(0, len(images), BATCH)])

    def add(self, latents: torch.Tensor, title: str) -> None:
        """The images of ``latents`` [N, d] and the teacher's logits on them, into the pool."""
        images, logits = [], []
        for start in tqdm(range(0, len(latents), BATCH), desc=title, unit="batch", disable=not self.progress,
                          leave=False):
            images.append(self.draw(latents[start:start + BATCH]))
            logits.append(self.label(images[-1]))
        self.images = torch.cat([self.images, *images])
        self.logits = torch.cat([self.logits, *logits])

    def add_images(self, images: torch.Tensor, title: str) -> None:
        """``images`` [N, 1, H, W] and the teacher's logits on them, into the pool."""
        logits = [self.label(images[start:start + BATCH])
                  for start in tqdm(range(0, len(images), BATCH), desc=title, unit="batch",
                                    disable=not self.progress, leave=False)]
        self.images = torch.cat([self.images, images])
        self.logits = torch.cat([self.logits, *logits])

    def unconditional(self, count: int) -> torch.Tensor:
        return to_sphere(torch.randn(count, self.pggan.latent_dim, generator=self.latents))

    def fit(self, epochs: int, title: str) -> float:
        """``epochs`` passes over the pool (MSE between the student's raw logits and the teacher's, unclipped
        when ``output_clip`` > 0); the last epoch's loss."""
        self.student.train()
        clip = self.settings.output_clip
        targets = unclip(self.logits, clip) if clip > 0 else self.logits
        loss_sum = 0.0
        for _ in range(epochs):
            order = torch.randperm(len(self.images), generator=self.latents)
            loss_sum = 0.0
            for start in tqdm(range(0, len(order), BATCH), desc=title, unit="batch", disable=not self.progress,
                              leave=False):
                rows = order[start:start + BATCH]
                loss = F.mse_loss(self.student(self.images[rows])[0], targets[rows])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                loss_sum += float(loss.detach()) * len(rows)
        self.recalibrate_batch_norm()
        return loss_sum / max(len(self.images), 1)

    def recalibrate_batch_norm(self) -> None:
        """BatchNorm running statistics recomputed as plain averages over the pool's batches (the
        exponential averages of training lag behind on a small pool or a start from phantom
        statistics); leaves the student in eval mode."""
        norms = [m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
        self.student.train()
        with torch.no_grad():
            for start in range(0, len(self.images), BATCH):
                self.student(self.images[start:start + BATCH])
        for norm in norms:
            norm.momentum = 0.1
        self.student.eval()

    def hard_negatives(self, title: str) -> tuple[torch.Tensor, float, float]:
        """LCO against the student for this round's requests: (trajectory latents [K, d], the shares of
        returned samples the teacher agrees with at its threshold and past LCO's fallback margin)."""
        settings = self.settings
        trajectories, agreed, firm, total = [], 0, 0, 0
        requests = round_requests(settings, self.config.data.prior, self.requests_rng)
        self.student.requires_grad_(False)
        for request in tqdm(requests, desc=title, unit="request", disable=not self.progress, leave=False):
            returned, trajectory = lco_trajectories(
                self.generate, self.pggan.latent_dim, self.steering, request, settings.samples_per_request, settings.lco_steps,
                settings.lco_candidates, settings.snapshot_every, self.options, self.latents)
            teacher = self.label(self.draw(returned))
            agreed += int(met(teacher, request.target, request.mask, 0.0).sum())
            firm += int(met(teacher, request.target, request.mask, self.options.fallback_margin, self.options.absent_margin).sum())
            total += len(returned)
            trajectories.append(trajectory)
        self.student.requires_grad_(True)
        return torch.cat(trajectories), agreed / total, firm / total


def distill(config: ClassifierTrainConfig, teacher: TrainedClassifier, generator: nn.Module, run_dir: Path,
            init: TrainedClassifier | None = None, progress: bool = True) -> TrainedClassifier:
    """Distil ``teacher`` into ``config.model`` on ``generator``'s images (the recipe: module docstring),
    evaluate it on ``config``'s held-out phantom split and save it to ``run_dir``/classifier (with
    ``run_dir``/roc.png and the AUROC record, as ``classifier train`` does).

    ``generator``: the PGGAN generator (training.gan.training_loop.load_generator), drawing images at
    ``config.model.input_size``. ``init``: a trained classifier of the same architecture to start
    from (e.g. one of the teacher's members), else a fresh network. ``log`` receives one dict per
    stage (pool, each round). Raises ConfigError when ``config`` has no ``[distill]`` section or cannot
    train, ValueError when ``init`` has another architecture.
    """
    from training.classifier.trainer import build_splits, held_out_auroc, save_roc_picture
    from training.metrics import report_metric
    from training.metrics.builtin import label_aurocs
    from training.networks.classifier import build_classifier
    from training.runtime.monitor import TrainingMonitor, write_json_atomic

    if not config.distill.enabled:
        raise ConfigError(f"preset {config.name!r} has no [distill] section (distill.pool_images = 0): "
                          "use a distillation preset such as demo-distilled")
    validate(config)
    if init is not None and init.spec != config.model:
        raise ValueError(f"--init is a {init.spec.arch} with another shape than the preset's model; "
                         "start from a classifier trained with the same [model] section")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", config.to_dict())
    torch.manual_seed(config.seed)
    student = build_classifier(config.model)
    if init is not None:
        student.load_state_dict(init.network.state_dict())
    monitor = TrainingMonitor(run_dir, total=config.distill.rounds + 1, unit="stage", tensorboard=False,
                              progress=False)

    def log(record: dict) -> None:
        monitor.log(record, step=len(run.images))
        monitor.message(", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                  for key, value in record.items()))

    run = Distillation(config, teacher, generator, student, progress)
    settings, started = config.distill, time.perf_counter()
    run.add(run.unconditional(settings.pool_images), "pool: teacher labels")
    if settings.dataset_images:
        train = build_splits(config.override([f"data.train_count={settings.dataset_images}", "data.val_count=1",
                                              "data.test_count=1"])).train
        run.add_images(torch.stack([train[index][0].float() for index in range(len(train))]),
                       "pool: training images, teacher labels")
    loss = run.fit(settings.pool_epochs, "pool")
    log({"stage": "pool", "pool": len(run.images), "mse": loss, "seconds": time.perf_counter() - started})
    for number in range(1, settings.rounds + 1):
        trajectories, agreement, firm_agreement = run.hard_negatives(f"round {number}/{settings.rounds}: LCO")
        run.add(torch.cat([trajectories, run.unconditional(settings.fresh_images)]),
                f"round {number}/{settings.rounds}: teacher labels")
        loss = run.fit(settings.round_epochs, f"round {number}/{settings.rounds}: fit")
        log({"stage": f"round {number}", "teacher_agreement": agreement,
             "teacher_agreement_at_fallback_margin": firm_agreement, "pool": len(run.images), "mse": loss,
             "seconds": time.perf_counter() - started})

    steering = run.steering.eval()
    metric, splits = held_out_auroc(steering, config)
    metrics = label_aurocs(metric)
    images_shown = len(run.images) * settings.round_epochs
    result = TrainedClassifier(
        network=steering, spec=steering.spec, thresholds=np.full(NUM_LABELS, STUDENT_THRESHOLD, np.float32),
        metrics=metrics, dataset=f"{len(run.images)} generator images labelled by the teacher",
        images_shown=images_shown, preset=config.name, seed=config.seed,
        extra={"source": str(run_dir / "classifier"), "teacher": str(teacher.extra.get("source", "")),
               "distill": {"pool": len(run.images), "rounds": settings.rounds}},
    )
    result.save(run_dir / "classifier")
    report_metric(metric, run_dir, images_shown=images_shown, snapshot=run_dir / "classifier")
    save_roc_picture(steering, splits.test, torch.device("cpu"), metrics, run_dir / "roc.png",
                     f"{config.name}: distilled from the teacher on generator images")
    monitor.message(f"mean AUROC {result.mean_auroc:.4f} on the held-out split; saved {run_dir / 'classifier'}")
    monitor.close()
    return result
