"""Multi-label classifier training loop on top of ``training.runtime``.

One loop serves every data set and both roles (the LCO classifier and the independent auditor):

- loss: binary cross-entropy per label, masked to the labels that are known for each image, with
  each label's positives up-weighted by negatives/positives in the training split (capped), so rare
  findings are not drowned by "absent";
- robustness (``[adversarial]``, off unless set): each batch replaced by its PGD perturbation within
  an L2 or L∞ budget (Madry et al. 2018; training/classifier/adversarial.py);
- schedule: AdamW, linear warm-up then cosine decay, all a function of images shown, so a resumed
  run follows the identical schedule;
- operation: the runtime's atomic checkpoints with RNG states and the resumable sampler position
  (exact resume, mid-epoch included), and its loop skeleton (``training.runtime.loop``): torchrun DDP
  with one gradient all-reduce per step, the non-finite guard, SIGINT/SIGTERM → checkpoint and exit,
  tqdm + TensorBoard + stats.jsonl;
- result: thresholds by Youden's J on the validation split, per-label AUROC with bootstrap 95% CIs
  on the held-out test split (the ``classifier_auroc`` metric, recorded in
  ``<run>/metric-classifier_auroc.jsonl``), a ROC picture, and the classifier saved as
  ``<run>/classifier/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from service.labels import LABELS
from training.classifier.adversarial import pgd_perturb
from training.classifier.artifact import TrainedClassifier
from training.classifier.config import ClassifierTrainConfig, validate
from training.classifier.metrics import LabelAUROC, mean_auroc, youden_thresholds
from training.metrics import MetricResult, compute_metric, report_metric
from training.metrics.builtin import CLASSIFIER_AUROC, label_aurocs
from training.networks.classifier import build_classifier
from training.runtime import (
    ConfigError,
    DistributedContext,
    NonFiniteGuard,
    ResumableBatchSampler,
    StopRequest,
    TrainingMonitor,
    broadcast_module_,
    init_distributed,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    world_size_from_env,
    write_json_atomic,
)
from training.runtime.loop import optimizer_step, run_steps, save_run_checkpoint, shared_run_dir


class InMemoryDataset(Dataset):
    """Items held as tensors: procedural phantoms are rendered once, not once per epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
        self.images, self.labels, self.mask = images, labels, mask

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index].float(), self.labels[index], self.mask[index]


def materialize(dataset: Dataset, workers: int, description: str, batch_size: int = 128) -> InMemoryDataset:
    """Read every item of ``dataset`` once (images kept as float16) with a progress bar."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        persistent_workers=False)
    images, labels, masks = [], [], []
    for image, label, mask in tqdm(loader, desc=description, unit="batch", leave=False):
        images.append(image.to(torch.float16))
        labels.append(label)
        masks.append(mask)
    return InMemoryDataset(torch.cat(images), torch.cat(labels), torch.cat(masks))


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    description: str


def build_splits(config: ClassifierTrainConfig, materialize_workers: int = 0) -> Splits:
    """Train/validation/test data for ``config.data`` (phantoms, nih or chexpert)."""
    data = config.data
    if data.kind == "phantoms":
        from training.data import PhantomDataset

        parts = [PhantomDataset(count, data.resolution, seed=data.seed + offset, prior=data.prior)
                 for offset, count in enumerate((data.train_count, data.val_count, data.test_count))]
        description = f"phantoms-{data.prior}-{data.resolution}px-seed{data.seed}"
    elif data.kind == "nih":
        from training.data import NIHChestXray14

        parts = [NIHChestXray14(data.root, split=split, size=data.resolution) for split in ("train", "val", "test")]
        description = f"nih-chestxray14:{data.root}"
    elif data.kind == "chexpert":
        from training.data import CheXpert

        full = CheXpert(data.root, split="train", size=data.resolution, uncertain=data.uncertain)
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(data.seed)).tolist()
        cut = max(1, len(full) // 20)  # CheXpert's official "valid" split is the held-out test set here
        parts = [Subset(full, order[cut:]), Subset(full, order[:cut]),
                 CheXpert(data.root, split="valid", size=data.resolution, uncertain=data.uncertain)]
        description = f"chexpert-{data.uncertain}:{data.root}"
    else:
        raise ValueError(f"data.kind {data.kind!r} cannot train a classifier; use phantoms, nih or chexpert "
                         "(an unlabelled image folder has no labels to learn)")
    if data.cache_in_memory:
        names = ("train", "val", "test")
        parts = [materialize(part, materialize_workers, f"reading {name} split") for name, part in zip(names, parts)]
    return Splits(*parts, description=description)


def label_statistics(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(positives, known) per label over ``dataset``, without decoding images where possible."""
    if isinstance(dataset, InMemoryDataset):
        labels, mask = dataset.labels.numpy(), dataset.mask.numpy()
    elif isinstance(dataset, Subset) and hasattr(dataset.dataset, "labels"):
        labels = np.asarray(dataset.dataset.labels)[dataset.indices]
        mask = np.asarray(dataset.dataset.label_mask)[dataset.indices]
    elif hasattr(dataset, "labels") and hasattr(dataset, "label_mask"):
        labels, mask = np.asarray(dataset.labels), np.asarray(dataset.label_mask)
    else:
        items = [dataset[i] for i in range(len(dataset))]
        labels = np.stack([item[1].numpy() for item in items])
        mask = np.stack([item[2].numpy() for item in items])
    return (labels * mask).sum(axis=0), mask.sum(axis=0)


def positive_weights(positives: np.ndarray, known: np.ndarray, cap: float) -> torch.Tensor:
    """negatives/positives per label, clipped to [1/cap, cap]; 1 where a label has no positives."""
    negatives = known - positives
    weights = np.where(positives > 0, negatives / np.maximum(positives, 1), 1.0)
    return torch.tensor(np.clip(weights, 1.0 / cap, cap), dtype=torch.float32)


def masked_weighted_bce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                        pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the known (image, label) pairs, positives weighted by ``pos_weight``."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=pos_weight, reduction="none")
    return (bce * mask).sum() / mask.sum().clamp_min(1.0)


def learning_rate(config: ClassifierTrainConfig, images_shown: int) -> float:
    if images_shown < config.warmup_images:
        return config.lr * (images_shown + config.batch_size) / (config.warmup_images + config.batch_size)
    progress = (images_shown - config.warmup_images) / max(1, config.total_images - config.warmup_images)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def predict(network: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256,
            workers: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, labels, mask) as [N, 14] arrays over ``dataset``."""
    network.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    probabilities, labels, masks = [], [], []
    for image, label, mask in loader:
        logits, _ = network(image.to(device, torch.float32))
        probabilities.append(torch.sigmoid(logits.float()).cpu())
        labels.append(label)
        masks.append(mask)
    return torch.cat(probabilities).numpy(), torch.cat(labels).numpy(), torch.cat(masks).numpy()


def evaluate(network: torch.nn.Module, val: Dataset, test: Dataset, device: torch.device,
             bootstrap: int, seed: int, description: str = "") -> tuple[np.ndarray, MetricResult]:
    """Youden-J thresholds [14] on ``val``; the ``classifier_auroc`` metric (per-label AUROC with
    bootstrap CIs, and their mean) on ``test``, whose data ``description`` names in its protocol."""
    val_probs, val_labels, val_mask = predict(network, val, device)
    thresholds = youden_thresholds(val_probs, val_labels, val_mask)
    test_probs, test_labels, test_mask = predict(network, test, device)
    result = compute_metric(CLASSIFIER_AUROC, probabilities=test_probs, labels=test_labels, mask=test_mask,
                            bootstrap=bootstrap, seed=seed, split="test", dataset=description)
    return thresholds, result


def held_out_auroc(network: torch.nn.Module, config: ClassifierTrainConfig) -> tuple[MetricResult, Splits]:
    """The ``classifier_auroc`` metric of ``network`` on ``config``'s test split (phantom presets draw no
    training or validation set for it), and the splits read. For classifiers not trained on those data
    (ensembles, distilled students): their thresholds come from elsewhere."""
    if config.data.kind == "phantoms":
        config = config.override(["data.train_count=1", "data.val_count=1"])
    splits = build_splits(config)
    probabilities, labels, mask = predict(network, splits.test, torch.device("cpu"))
    metric = compute_metric(CLASSIFIER_AUROC, probabilities=probabilities, labels=labels, mask=mask,
                            bootstrap=config.bootstrap, seed=config.seed, split="test", dataset=splits.description)
    return metric, splits


def save_roc_picture(network: torch.nn.Module, test: Dataset, device: torch.device,
                     metrics: dict[str, LabelAUROC], path: Path, title: str) -> None:
    """One ROC curve per label with its AUROC and 95% CI, as a PNG a person can look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs, labels, mask = predict(network, test, device)
    figure, axes = plt.subplots(3, 5, figsize=(15, 9.5))
    for column, (axis, name) in enumerate(zip(axes.flat, LABELS)):
        known = mask[:, column] > 0
        p, y = probs[known, column], labels[known, column] > 0.5
        metric = metrics[name]
        if metric.auroc is not None:
            order = np.argsort(-p)
            tpr = np.r_[0.0, np.cumsum(y[order]) / y.sum()]
            fpr = np.r_[0.0, np.cumsum(~y[order]) / (~y).sum()]
            axis.plot(fpr, tpr, lw=1.5)
            ci = f" [{metric.ci_low:.3f}, {metric.ci_high:.3f}]" if metric.ci_low is not None else ""
            axis.set_title(f"{name}\nAUROC {metric.auroc:.3f}{ci}", fontsize=9)
        else:
            axis.set_title(f"{name}\n(no positives)", fontsize=9)
        axis.plot([0, 1], [0, 1], ls=":", c="grey", lw=0.8)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.tick_params(labelsize=7)
    mean = mean_auroc(metrics)
    axes.flat[-1].axis("off")
    axes.flat[-1].text(0.0, 0.5, f"{title}\nmean AUROC {mean:.3f}" if mean is not None else title, fontsize=11)
    figure.supxlabel("false positive rate")
    figure.supylabel("true positive rate")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    tmp.replace(path)


def resumed_config(run_dir: str | Path) -> ClassifierTrainConfig:
    """The configuration stored in the latest checkpoint of `run_dir`.

    Raises FileNotFoundError when there is none, ConfigError when it holds an unusable table.
    """
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir}/checkpoints")
    return ClassifierTrainConfig.from_dict(read_checkpoint(found).state["config"])


def train_classifier(
    config: ClassifierTrainConfig | None,
    run_dir: str | Path | None = None,
    *,
    runs_root: str | Path = "runs",
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    splits: Splits | None = None,
    stop_after_images: int | None = None,
) -> TrainedClassifier | None:
    """Train (or resume) a classifier; returns it on rank 0 once training finished, else None.

    run_dir: where checkpoints, stats, metric records and the result go; a new numbered directory
      under ``runs_root`` when None. With ``resume`` the latest checkpoint in ``run_dir`` is continued,
      with the configuration stored in it (``config`` may then be None).
    stop_after_images: stop (with a checkpoint) once this many images are shown, as an interruption
      would; used to test exact resumption.
    Raises ConfigError, listing every problem, for a configuration that cannot train with WORLD_SIZE
    processes (``training.classifier.config.problems``), before reading data or joining a process group.
    """
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run directory to continue")
        config = resumed_config(run_dir)
    # Before any data or process group: a value that cannot train is refused now, not mid-run.
    validate(config, world_size_from_env())
    if config.distill.enabled:
        raise ConfigError(f"preset {config.name!r} distils a teacher on generator images ([distill]): run "
                          "`classifier distill TEACHER --generator GAN_RUN` instead of `classifier train`")
    context = init_distributed(config.device)
    run_dir = shared_run_dir(run_dir, runs_root, f"classifier-{config.name}", context)
    run_dir.mkdir(parents=True, exist_ok=True)
    if context.is_main:
        write_json_atomic(run_dir / "config.json", config.to_dict())
    run = ClassifierRun(config, run_dir, context, splits, resume=resume, progress=progress,
                        tensorboard=tensorboard)
    try:
        if not run.train(stop_after_images):
            return None
        return run.finish()
    finally:
        run.monitor.close()


class ClassifierRun:
    """One rank's classifier training: network, optimiser, data, counters and the run directory.

    Building it seeds the RNGs and builds everything in a fixed order (network, data, then the
    checkpoint's RNG states when resuming), which exact resumption depends on.
    """

    def __init__(self, config: ClassifierTrainConfig, run_dir: Path, context: DistributedContext,
                 splits: Splits | None = None, *, resume: bool = False, progress: bool = True,
                 tensorboard: bool = True) -> None:
        self.config, self.run_dir, self.context = config, run_dir, context
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.device = context.device
        self.network = build_classifier(config.model).to(self.device)
        broadcast_module_(self.network)  # every rank starts from rank 0's initialisation
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.guard = NonFiniteGuard(name=f"classifier {config.name}")
        self.splits = splits or build_splits(config, materialize_workers=config.workers)
        positives, known = label_statistics(self.splits.train)
        self.pos_weight = positive_weights(positives, known, config.pos_weight_max).to(self.device)
        self.images_shown = 0
        self.objects = {"network": self.network, "optimizer": self.optimizer, "scaler": self.scaler,
                        "guard": self.guard}
        if resume:
            checkpoint = load_checkpoint(latest_checkpoint(run_dir), objects=self.objects,
                                         map_location=self.device, rank=context.rank)
            self.images_shown = int(checkpoint.state["images_shown"])
        self.loader = self._loader()
        self._batches: Iterator | None = None
        self._tick_losses: list[float] = []  # this tick's losses (this rank's)
        self._tick_start = (time.perf_counter(), self.images_shown)  # when it began, at how many images
        self.monitor = TrainingMonitor(run_dir, total=config.total_images, initial=self.images_shown,
                                       enabled=context.is_main, tensorboard=tensorboard, progress=progress)
        if resume:
            self.monitor.message(f"resumed from {self.images_shown} images shown")

    def _loader(self) -> DataLoader:
        config, train = self.config, self.splits.train
        sampler = ResumableBatchSampler(len(train), config.batch_size, seed=config.seed,
                                        start_position=self.images_shown, rank=self.context.rank,
                                        world_size=self.context.world_size)
        in_memory = isinstance(train, InMemoryDataset)
        return DataLoader(train, batch_sampler=sampler, num_workers=0 if in_memory else config.workers,
                          persistent_workers=not in_memory and config.workers > 0,
                          pin_memory=self.device.type == "cuda")

    def save(self) -> Path | None:
        """Checkpoint at the images shown so far (collective; rank 0 writes)."""
        state = {"images_shown": self.images_shown, "config": self.config.to_dict(),
                 "pos_weight": self.pos_weight.tolist()}
        return save_run_checkpoint(self.context, self.run_dir, self.images_shown, self.objects, state,
                                   keep_last=3)

    def step(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
        """One optimiser step on one batch (its PGD perturbation when ``[adversarial]`` is set; skipped
        when non-finite); returns this rank's loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.config, self.images_shown)
        images, labels, mask = (t.to(self.device, non_blocking=True) for t in (images, labels, mask))
        if self.config.adversarial.enabled:
            images = pgd_perturb(images.float(), lambda batch: self._loss(batch, labels, mask), self.config.adversarial)
        loss = self._loss(images, labels, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        optimizer_step(self.optimizer, self.scaler, self.network.parameters(), self.guard,
                       checked=[loss.detach()], where=f"at {self.images_shown} images")
        self.images_shown += self.config.batch_size
        return float(loss.detach())

    def _loss(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The training loss on one batch (masked, positive-weighted BCE), under autocast on CUDA."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            logits, _ = self.network(images.float())
        return masked_weighted_bce(logits, labels, mask, self.pos_weight)

    def train(self, stop_after_images: int | None = None) -> bool:
        """Train until ``total_images`` (or ``stop_after_images``) or a signal, with a checkpoint at the end.

        Returns whether training is complete.
        """
        config = self.config
        limit = config.total_images
        if stop_after_images is not None:
            limit = min(limit, stop_after_images)
        self._tick_losses, self._tick_start = [], (time.perf_counter(), self.images_shown)
        self.network.train()
        outcome = run_steps(self._train_step, lambda: self.images_shown, limit,
                            tick_every=config.tick_images, checkpoint_every=config.checkpoint_every,
                            tick=self._end_tick, checkpoint=self.save, monitor=self.monitor)
        return not outcome.stopped and self.images_shown >= config.total_images

    def _train_step(self, stop: StopRequest) -> bool:
        """One step on the next batch; returns whether this process was asked to stop."""
        if self._batches is None:  # started under the stop handler, as data workers inherit it
            self._batches = iter(self.loader)
        self._tick_losses.append(self.step(*next(self._batches)))
        self.monitor.advance(self.images_shown, {"loss": f"{self._tick_losses[-1]:.4f}"})
        return stop.requested

    def _end_tick(self) -> None:
        start_time, start_images = self._tick_start
        rate = (self.images_shown - start_images) / (time.perf_counter() - start_time)
        self.monitor.log({"images_shown": self.images_shown, "loss": float(np.mean(self._tick_losses)),
                          "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": rate,
                          "skipped_steps": self.guard.total_skipped}, step=self.images_shown)
        self._tick_losses, self._tick_start = [], (time.perf_counter(), self.images_shown)

    def finish(self) -> TrainedClassifier | None:
        """Evaluate, record the AUROC (``metric-classifier_auroc.jsonl``) and save ``<run>/classifier``;
        returns the classifier on rank 0, None elsewhere."""
        # Parameters agree on every rank (same start, averaged gradients); BatchNorm running statistics
        # come from each rank's own batches, so keep rank 0's.
        for buffer in self.network.buffers():
            if self.context.is_distributed:
                torch.distributed.broadcast(buffer.data, src=0)
        result = None
        if self.context.is_main:
            result = self._evaluate_and_save()
        self.context.barrier()
        return result

    def _evaluate_and_save(self) -> TrainedClassifier:
        config, run_dir, splits = self.config, self.run_dir, self.splits
        thresholds, metric = evaluate(self.network, splits.val, splits.test, self.device, config.bootstrap,
                                      config.seed, description=splits.description)
        artifact = run_dir / "classifier"
        report_metric(metric, run_dir, images_shown=self.images_shown, snapshot=artifact)
        metrics = label_aurocs(metric)
        network = self.network.cpu().eval()
        result = TrainedClassifier(network=network, spec=config.model, thresholds=thresholds, metrics=metrics,
                                   dataset=splits.description, images_shown=self.images_shown,
                                   preset=config.name, seed=config.seed, extra={"source": str(artifact)})
        result.save(artifact)
        summary = {"mean_auroc": result.mean_auroc, "images_shown": self.images_shown,
                   **{f"auroc/{k}": v.auroc for k, v in metrics.items() if v.auroc is not None}}
        self.monitor.log(summary, step=self.images_shown)
        save_roc_picture(network, splits.test, torch.device("cpu"), metrics, run_dir / "roc.png",
                         f"{config.name}: {config.model.arch}, {self.images_shown} images")
        self.monitor.message(f"mean AUROC {result.mean_auroc:.4f} on the held-out split; saved {artifact}")
        return result
