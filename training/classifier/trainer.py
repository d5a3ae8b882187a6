"""Multi-label classifier training loop on top of ``training.runtime``.

One loop serves every data set and both roles (the LCO classifier and the independent auditor):

- loss: binary cross-entropy per label, masked to the labels that are known for each image, with
  each label's positives up-weighted by negatives/positives in the training split (capped), so rare
  findings are not drowned by "absent";
- schedule: AdamW, linear warm-up then cosine decay, all a function of images shown, so a resumed
  run follows the identical schedule;
- operation: the runtime's atomic checkpoints with RNG states and the resumable sampler position
  (exact resume, mid-epoch included), torchrun DDP with one gradient all-reduce per step, the
  non-finite guard, SIGINT/SIGTERM → checkpoint and exit, tqdm + TensorBoard + stats.jsonl;
- result: thresholds by Youden's J on the validation split, per-label AUROC with bootstrap 95% CIs
  on the held-out test split, a ROC picture, and the classifier saved as ``<run>/classifier/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from service.labels import LABELS
from training.classifier.artifact import TrainedClassifier
from training.classifier.config import ClassifierTrainConfig, validate
from training.classifier.metrics import LabelAUROC, mean_auroc, per_label_auroc, youden_thresholds
from training.networks.classifier import build_classifier
from training.runtime import (
    NonFiniteGuard,
    ResumableBatchSampler,
    StopRequest,
    TrainingMonitor,
    all_finite,
    average_gradients_,
    broadcast_module_,
    checkpoint_path,
    create_run_dir,
    gather_rng_states,
    init_distributed,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    world_size_from_env,
    write_json_atomic,
)


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
             bootstrap: int, seed: int) -> tuple[np.ndarray, dict[str, LabelAUROC]]:
    """Youden-J thresholds on ``val``; per-label AUROC with bootstrap CIs on ``test``."""
    val_probs, val_labels, val_mask = predict(network, val, device)
    thresholds = youden_thresholds(val_probs, val_labels, val_mask)
    test_probs, test_labels, test_mask = predict(network, test, device)
    metrics = per_label_auroc(test_probs, test_labels, test_mask, bootstrap=bootstrap, seed=seed)
    return thresholds, metrics


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

    run_dir: where checkpoints, stats and the result go; a new numbered directory under
      ``runs_root`` when None. With ``resume`` the latest checkpoint in ``run_dir`` is continued,
      with the configuration stored in it (``config`` may then be None).
    stop_after_images: stop (with a checkpoint) once this many images are shown, as an interruption
      would; used to test exact resumption.
    Raises ConfigError, listing every problem, for a configuration that cannot train with WORLD_SIZE
    processes (``training.classifier.config.problems``), before reading data or joining a process group.
    """
    if resume:
        if run_dir is None:
            raise ValueError("resume needs the run directory to continue")
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint to resume in {run_dir}/checkpoints")
        config = ClassifierTrainConfig.from_dict(read_checkpoint(found).state["config"])
    # Before any data or process group: a value that cannot train is refused now, not mid-run.
    validate(config, world_size_from_env())
    context = init_distributed(config.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is None:
        run_dir = create_run_dir(runs_root, f"classifier-{config.name}") if context.is_main else None
        if context.is_distributed:
            holder = [str(run_dir) if run_dir else None]
            torch.distributed.broadcast_object_list(holder, src=0)
            run_dir = Path(holder[0])
    run_dir.mkdir(parents=True, exist_ok=True)
    if context.is_main:
        write_json_atomic(run_dir / "config.json", config.to_dict())

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = context.device
    network = build_classifier(config.model).to(device)
    broadcast_module_(network)  # every rank starts from rank 0's initialisation
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    guard = NonFiniteGuard(name=f"classifier {config.name}")

    splits = splits or build_splits(config, materialize_workers=config.workers)
    positives, known = label_statistics(splits.train)
    pos_weight = positive_weights(positives, known, config.pos_weight_max).to(device)

    images_shown = 0
    objects = {"network": network, "optimizer": optimizer, "scaler": scaler, "guard": guard}
    if resume:
        checkpoint = load_checkpoint(latest_checkpoint(run_dir), objects=objects, map_location=device,
                                     rank=context.rank)
        images_shown = int(checkpoint.state["images_shown"])

    sampler = ResumableBatchSampler(len(splits.train), config.batch_size, seed=config.seed,
                                    start_position=images_shown, rank=context.rank,
                                    world_size=context.world_size)
    in_memory = isinstance(splits.train, InMemoryDataset)
    loader = DataLoader(splits.train, batch_sampler=sampler, num_workers=0 if in_memory else config.workers,
                        persistent_workers=not in_memory and config.workers > 0,
                        pin_memory=device.type == "cuda")
    monitor = TrainingMonitor(run_dir, total=config.total_images, initial=images_shown, enabled=context.is_main,
                              tensorboard=tensorboard, progress=progress)
    if resume:
        monitor.message(f"resumed from {images_shown} images shown")

    def write_checkpoint() -> None:
        rng = gather_rng_states()
        if context.is_main:
            save_checkpoint(checkpoint_path(run_dir, images_shown), objects=objects,
                            state={"images_shown": images_shown, "config": config.to_dict(),
                                   "pos_weight": pos_weight.tolist()},
                            rng=rng, keep_last=3)

    tick_start, tick_images, tick_losses = time.perf_counter(), 0, []
    next_checkpoint = (images_shown // config.checkpoint_every + 1) * config.checkpoint_every
    limit = config.total_images if stop_after_images is None else min(config.total_images, stop_after_images)
    interrupted = False
    with StopRequest() as stop:
        network.train()
        for images, labels, mask in loader:
            if images_shown >= limit:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, images_shown)
            images, labels, mask = (t.to(device, non_blocking=True) for t in (images, labels, mask))
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits, _ = network(images.float())
            loss = masked_weighted_bce(logits, labels, mask, pos_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            average_gradients_(network.parameters())
            scaler.unscale_(optimizer)
            grads = [p.grad for p in network.parameters() if p.grad is not None]
            if guard.check(all_finite([loss.detach(), *grads]), where=f"at {images_shown} images"):
                scaler.step(optimizer)
            scaler.update()
            images_shown += config.batch_size
            tick_images += config.batch_size
            tick_losses.append(float(loss.detach()))
            monitor.advance(images_shown, {"loss": f"{tick_losses[-1]:.4f}"})
            if tick_images >= config.tick_images:
                elapsed = time.perf_counter() - tick_start
                monitor.log({"images_shown": images_shown, "loss": float(np.mean(tick_losses)),
                             "lr": optimizer.param_groups[0]["lr"], "img_per_s": tick_images / elapsed,
                             "skipped_steps": guard.total_skipped}, step=images_shown)
                tick_start, tick_images, tick_losses = time.perf_counter(), 0, []
            if images_shown >= next_checkpoint and images_shown < config.total_images:
                write_checkpoint()
                next_checkpoint += config.checkpoint_every
            if stop.requested:
                monitor.message(f"{stop.signal_name}: writing a checkpoint at {images_shown} images and exiting")
                interrupted = True
                break
    write_checkpoint()
    if interrupted or images_shown < config.total_images:
        monitor.close()
        return None

    # Parameters agree on every rank (same start, averaged gradients); BatchNorm running statistics
    # come from each rank's own batches, so keep rank 0's.
    for buffer in network.buffers():
        if context.is_distributed:
            torch.distributed.broadcast(buffer.data, src=0)
    result = None
    if context.is_main:
        thresholds, metrics = evaluate(network, splits.val, splits.test, device, config.bootstrap, config.seed)
        network = network.cpu().eval()
        result = TrainedClassifier(network=network, spec=config.model, thresholds=thresholds, metrics=metrics,
                                   dataset=splits.description, images_shown=images_shown, preset=config.name,
                                   seed=config.seed, extra={"source": str(run_dir / "classifier")})
        result.save(run_dir / "classifier")
        summary = {"mean_auroc": result.mean_auroc, "images_shown": images_shown,
                   **{f"auroc/{k}": v.auroc for k, v in metrics.items() if v.auroc is not None}}
        monitor.log(summary, step=images_shown)
        save_roc_picture(network, splits.test, torch.device("cpu"), metrics, run_dir / "roc.png",
                         f"{config.name}: {config.model.arch}, {images_shown} images")
        monitor.message(f"mean AUROC {result.mean_auroc:.4f} on the held-out split; saved {run_dir / 'classifier'}")
    context.barrier()
    monitor.close()
    return result
