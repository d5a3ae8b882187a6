"""Memorisation audit: which synthetic images nearly copy a training image, judged against real pairs.

For every synthetic image its nearest training images by the bundle classifier's embedding, then a
shift-tolerant pixel check on those candidates (:mod:`service.nearcopy`, the same code the service's
near-copy filter runs). The check's score is a similarity (ZNCC, 1 = the same picture), so the
"distance" a person reads in the plots is ``1 − similarity``.

The threshold is calibrated on real data: the similarity of each image of held-out patients to its
closest training image (training and held-out split by patient, so a patient's other films never
count as copies) is what two different x-rays score; the threshold is that distribution's
(1 − ``false_positive_rate``) quantile. The planted-copy check then measures both error rates on
images the calibration never saw: training images slipped into a "synthetic" set as they are,
shifted, with noise, brightness/contrast changed or JPEG re-encoded (caught: should be ≥ 95%), and
the images of a second group of held-out patients (flagged: should be ≤ 2%).

    python -m training.evaluate.memorisation planted --bundle models/demo \\
        --data nih:../shared/data/nih-sample --size 256 --out runs/memorisation
    python -m training.evaluate.memorisation index --bundle models/demo \\
        --data nih:../shared/data/nih-sample --size 256 --out nih-sample.near-copy.npz
    python -m training.evaluate.memorisation audit --bundle models/demo --index nih-sample.near-copy.npz \\
        --synthetic folder:archive/images --out runs/audit
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from service.nearcopy import (
    DEFAULT_COMPARE_SIZE,
    DEFAULT_MAX_SHIFT_PX,
    DEFAULT_NEIGHBOURS,
    Matches,
    NearCopyIndex,
    NearCopyIndexError,
    embed_images,
    smoothed,
    thumbnails,
)

DEFAULT_FALSE_POSITIVE_RATE = 0.01
EMBED_BATCH = 64
PLANTED_KINDS = ("as is", "shifted", "noise", "brightness/contrast", "JPEG")
# Planted perturbations, in the units of images in [-1, 1] at their loaded resolution.
NOISE_SIGMA = 0.1  # Gaussian, 5% of the full range
CONTRAST_RANGE = (0.75, 1.25)
BRIGHTNESS_RANGE = (-0.2, 0.2)
JPEG_QUALITY = 75  # Pillow's default


@dataclass
class ImageSet:
    """Images [N, H, W] float32 in [-1, 1] and their names."""

    images: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, rows: np.ndarray) -> ImageSet:
        return ImageSet(self.images[rows], [self.names[i] for i in rows])


def load_images(spec: str, size: int, split: str = "all", *, seed: int = 0, val_fraction: float = 0.2,
                test_fraction: float = 0.2, progress: bool = True) -> ImageSet:
    """Every image of a data set split (``training.data.open_dataset`` spec) at ``size``²; unreadable
    images are left out, as the readers skip them."""
    from tqdm import tqdm

    from training.data import open_dataset
    from training.data.images import ImageSkipped, to_tensor

    options = {"val_fraction": val_fraction, "test_fraction": test_fraction} if spec.startswith("nih:") else {}
    dataset = open_dataset(spec, size, split=split, seed=seed, **options)
    images, names = [], []
    for i in tqdm(range(len(dataset)), desc=f"read {split}", unit="img", disable=not progress):
        try:
            images.append(to_tensor(dataset.load_image(i))[0].numpy())
        except ImageSkipped:
            continue
        names.append(Path(dataset.image_path(i)).name)
    return ImageSet(np.stack(images), names)


def embed(bundle: Any, images: np.ndarray, progress: bool = True) -> np.ndarray:
    """:func:`service.nearcopy.embed_images` of images [N, H, W] in batches, with a progress bar."""
    from tqdm import tqdm

    chunks = [embed_images(bundle, images[start:start + EMBED_BATCH])
              for start in tqdm(range(0, len(images), EMBED_BATCH), desc="embed", unit="batch", disable=not progress)]
    return np.concatenate(chunks)


def calibrate_threshold(similarities: np.ndarray, false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE) -> float:
    """The (1 − rate) quantile of real-to-real nearest-neighbour similarities (the next higher sample)."""
    if not 0 <= false_positive_rate < 1:
        raise ValueError(f"false_positive_rate must be in [0, 1); got {false_positive_rate}")
    if len(similarities) < 1:
        raise ValueError("calibration needs at least one held-out real image")
    return float(np.quantile(similarities, 1 - false_positive_rate, method="higher"))


def build_index(bundle: Any, train: ImageSet, calibration: ImageSet, *, source: str = "",
                false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE, neighbours: int = DEFAULT_NEIGHBOURS,
                compare_size: int = DEFAULT_COMPARE_SIZE, max_shift_px: int = DEFAULT_MAX_SHIFT_PX,
                progress: bool = True) -> tuple[NearCopyIndex, Matches]:
    """The training set's index, its threshold calibrated on held-out real images (other patients).

    Returns the index and the calibration images' matches (their real-to-real similarities).
    """
    index = NearCopyIndex.build(
        embed(bundle, train.images, progress), train.images, train.names, threshold=np.inf,
        classifier_sha256=bundle.manifest.files["classifier.onnx"].sha256, source=source, neighbours=neighbours,
        compare_size=compare_size, max_shift_px=max_shift_px)
    reference = index.match(embed(bundle, calibration.images, progress), calibration.images)
    index = index.with_threshold(calibrate_threshold(reference.similarity, false_positive_rate))
    return index, replace(reference, near_copy=reference.similarity >= index.threshold)


@dataclass
class MemorisationAudit:
    """Each synthetic image's closest training image, against the real-to-real reference.

    ``synthetic`` and ``reference`` are :class:`service.nearcopy.Matches` of the synthetic images and
    of the held-out real images the threshold was calibrated on.
    """

    index: NearCopyIndex
    synthetic_set: ImageSet
    synthetic: Matches
    reference: Matches
    planted: dict[str, Any] = field(default_factory=dict)  # filled by the planted-copy check

    @property
    def near_copies(self) -> int:
        return int(self.synthetic.near_copy.sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: method, threshold, rates, counts and similarity quantiles."""
        quantiles = (0.0, 0.5, 0.9, 0.99, 1.0)

        def summary(values: np.ndarray) -> dict[str, float]:
            return {f"q{int(q * 100)}": round(float(np.quantile(values, q)), 6) for q in quantiles}

        order = np.argsort(-self.synthetic.similarity)[:8]
        return {
            "method": "embedding kNN (bundle classifier, scikit-learn NearestNeighbors) then max ZNCC over shifts",
            "threshold": self.index.threshold,
            "compare_size": self.index.compare_size,
            "max_shift_thumbnail_px": self.index.max_shift,
            "neighbours": self.index.neighbours,
            "training_images": len(self.index),
            "synthetic_images": len(self.synthetic_set),
            "near_copies": self.near_copies,
            "near_copy_rate": self.near_copies / len(self.synthetic_set),
            "reference_images": len(self.reference.similarity),
            "reference_flag_rate": float(self.reference.near_copy.mean()),
            "synthetic_similarity": summary(self.synthetic.similarity),
            "reference_similarity": summary(self.reference.similarity),
            "closest_pairs": [
                {"synthetic": self.synthetic_set.names[i], "training": str(self.index.names[self.synthetic.neighbour[i]]),
                 "similarity": round(float(self.synthetic.similarity[i]), 6),
                 "embedding_distance": round(float(self.synthetic.embedding_distance[i]), 6)}
                for i in order
            ],
            **({"planted": self.planted} if self.planted else {}),
        }

    def write_closest_pairs_png(self, path: str | Path, count: int = 8) -> Path:
        """The ``count`` synthetic images most like a training image, each above that training image
        (the smoothed thumbnails the pixel check compares), captioned with the similarity and whether it
        is flagged."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        order = np.argsort(-self.synthetic.similarity)[:count]
        size = self.index.compare_size
        figure, axes = plt.subplots(2, len(order), figsize=(1.9 * len(order), 4.4), squeeze=False)
        for column, i in enumerate(order):
            row = self.synthetic.neighbour[i]
            pairs = ((smoothed(thumbnails(self.synthetic_set.images[i:i + 1], size))[0], self.synthetic_set.names[i]),
                     (self.index.thumbs[row].astype(np.float32) / 127.5 - 1, str(self.index.names[row])))
            for line, (image, name) in enumerate(pairs):
                axis = axes[line, column]
                axis.imshow(image, cmap="gray", vmin=-1, vmax=1)
                axis.set_xticks([])
                axis.set_yticks([])
                axis.set_xlabel(name[:22], fontsize=6)
            flag = "NEAR-COPY" if self.synthetic.near_copy[i] else "not a copy"
            axes[0, column].set_title(f"{self.synthetic.similarity[i]:.3f}\n{flag}", fontsize=7,
                                      color="firebrick" if self.synthetic.near_copy[i] else "black")
        axes[0, 0].set_ylabel("synthetic", fontsize=8)
        axes[1, 0].set_ylabel("closest training", fontsize=8)
        figure.suptitle(f"Closest pairs as the pixel check compares them ({size}² thumbnails, smoothed); "
                        f"max ZNCC over shifts, threshold {self.index.threshold:.3f}", fontsize=9)
        figure.tight_layout()
        figure.savefig(path, dpi=130)
        plt.close(figure)
        return Path(path)

    def write_distribution_png(self, path: str | Path) -> Path:
        """Histograms of nearest-training distance (1 − ZNCC, log scale): real held-out vs synthetic,
        with the threshold."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        floor = 1e-5
        distance = {"held-out real (calibration)": 1 - self.reference.similarity,
                    "synthetic set": 1 - self.synthetic.similarity}
        everything = np.concatenate(list(distance.values()))
        bins = np.logspace(np.log10(floor), np.log10(max(2.0, everything.max())), 60)
        figure, axis = plt.subplots(figsize=(7, 3.6))
        for (label, values), colour in zip(distance.items(), ("tab:blue", "tab:orange")):
            axis.hist(np.clip(values, floor, None), bins=bins, alpha=0.6, label=f"{label} (n={len(values)})",
                      color=colour)
        axis.axvline(1 - self.index.threshold, color="firebrick", linestyle="--",
                     label=f"threshold 1 − {self.index.threshold:.3f}")
        axis.set_xscale("log")
        axis.set_xlabel("distance to the closest training image (1 − max ZNCC over shifts)")
        axis.set_ylabel("images")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=130)
        plt.close(figure)
        return Path(path)


def audit_memorisation(bundle: Any, index: NearCopyIndex, synthetic: ImageSet, reference: Matches,
                       progress: bool = True) -> MemorisationAudit:
    """Match every synthetic image against the index (see :class:`MemorisationAudit`)."""
    matches = index.match(embed(bundle, synthetic.images, progress), synthetic.images)
    return MemorisationAudit(index, synthetic, matches, reference)


# -- planted copies ---------------------------------------------------------------------------------
def clopper_pearson(successes: int, trials: int) -> list[float]:
    """Exact (Clopper–Pearson) 95% interval of a proportion, by scipy.stats.binomtest."""
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(0.95, method="exact")
    return [round(float(interval.low), 4), round(float(interval.high), 4)]


def jpeg_round_trip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """An image [H, W] in [-1, 1] encoded as 8-bit JPEG by Pillow and decoded again."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint((image + 1) * 127.5), 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())), np.float32) / 127.5 - 1


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved by (dy, dx) pixels, the uncovered border filled by its edge pixels."""
    pad = max(abs(dy), abs(dx))
    padded = np.pad(image, pad, mode="edge")
    size = image.shape[0]
    return padded[pad - dy:pad - dy + size, pad - dx:pad - dx + size]


def plant_copies(train: ImageSet, copies_per_kind: int, seed: int = 0,
                 max_shift_px: int = DEFAULT_MAX_SHIFT_PX) -> tuple[ImageSet, np.ndarray, list[str]]:
    """Training images disguised as synthetic: ``copies_per_kind`` of each of :data:`PLANTED_KINDS`.

    Returns the copies, the training row each came from, and each copy's kind.
    """
    rng = np.random.default_rng(seed)
    images, rows, kinds = [], [], []
    for kind in PLANTED_KINDS:
        for row in rng.choice(len(train), min(copies_per_kind, len(train)), replace=False):
            image = train.images[row]
            if kind == "shifted":
                dy, dx = 0, 0
                while dy == dx == 0:
                    dy, dx = (int(v) for v in rng.integers(-max_shift_px, max_shift_px + 1, 2))
                image = shifted(image, dy, dx)
            elif kind == "noise":
                image = image + rng.normal(0, NOISE_SIGMA, image.shape)
            elif kind == "brightness/contrast":
                image = image * rng.uniform(*CONTRAST_RANGE) + rng.uniform(*BRIGHTNESS_RANGE)
            elif kind == "JPEG":
                image = jpeg_round_trip(image)
            images.append(np.clip(image, -1, 1).astype(np.float32))
            rows.append(int(row))
            kinds.append(kind)
    names = [f"planted {kind} of {train.names[row]}" for kind, row in zip(kinds, rows)]
    return ImageSet(np.stack(images), names), np.array(rows), kinds


def planted_copy_check(bundle: Any, train: ImageSet, calibration: ImageSet, heldout: ImageSet, *,
                       copies_per_kind: int = 100, seed: int = 0, progress: bool = True,
                       **index_options: Any) -> MemorisationAudit:
    """Calibrate on ``calibration``, then audit planted copies of ``train`` mixed with ``heldout``.

    The three sets must hold different patients. The result's ``planted`` section holds the catch rate
    (overall and per kind, with how often the copy's own source was the match), the flag rate on
    ``heldout`` and the counts; ``MemorisationAudit.to_dict`` carries it.
    """
    index, reference = build_index(bundle, train, calibration, progress=progress, **index_options)
    copies, sources, kinds = plant_copies(train, copies_per_kind, seed)
    mixed = ImageSet(np.concatenate([copies.images, heldout.images]), copies.names + heldout.names)
    audit = audit_memorisation(bundle, index, mixed, reference, progress)
    caught = audit.synthetic.near_copy[:len(copies)]
    flagged = audit.synthetic.near_copy[len(copies):]
    kinds_array = np.array(kinds)
    audit.planted = {
        "copies": len(copies),
        "caught": int(caught.sum()),
        "catch_rate": float(caught.mean()),
        "catch_rate_ci95": clopper_pearson(int(caught.sum()), len(copies)),
        "source_found_rate": float((audit.synthetic.neighbour[:len(copies)] == sources).mean()),
        "by_kind": {kind: {"copies": int((kinds_array == kind).sum()), "catch_rate": float(caught[kinds_array == kind].mean())}
                    for kind in PLANTED_KINDS},
        "heldout_images": len(heldout),
        "heldout_flagged": int(flagged.sum()),
        "heldout_flag_rate": float(flagged.mean()),
        "heldout_flag_rate_ci95": clopper_pearson(int(flagged.sum()), len(heldout)),
    }
    return audit


# -- command line -------------------------------------------------------------------------------------
def _load_bundle(path: str) -> Any:
    from service.bundle import load_bundle

    return load_bundle(path)


def _write_report(audit: MemorisationAudit, out: Path) -> None:
    """memorisation.json, the two pictures and a report section (section.json), written beside ``out`` and
    renamed into place whole."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        (staging / "memorisation.json").write_text(json.dumps(audit.to_dict(), indent=2) + "\n")
        audit.write_distribution_png(staging / "memorisation_distances.png")
        audit.write_closest_pairs_png(staging / "memorisation_closest_pairs.png")
        # a report section `python -m training.cli evaluate report --section OUT/section.json` takes
        section = {"title": "Memorisation audit", "summary": audit.to_dict(),
                   "pictures": ["memorisation_distances.png", "memorisation_closest_pairs.png"],
                   "note": "nearest training images of each generated one: embedding kNN, then shift-tolerant "
                           "normalised cross-correlation against a threshold calibrated on held-out patients"}
        (staging / "section.json").write_text(json.dumps(section, indent=2) + "\n")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate.memorisation", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("planted", "planted-copy check on real data: catch rate and held-out flag rate"),
                       ("index", "write the training set's near-copy index (threshold calibrated) for the service"),
                       ("audit", "audit a synthetic image set against an index")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--bundle", required=True, help="model bundle directory (its classifier embeds)")
        command.add_argument("--out", type=Path, required=True,
                             help="index file (index) or report directory (planted, audit)")
        command.add_argument("--no-progress", action="store_true")
        if name == "audit":
            command.add_argument("--index", type=Path, required=True, help="near-copy index file (.npz)")
            command.add_argument("--synthetic", required=True, help="data set spec of the synthetic images, "
                                 "e.g. folder:archive/images")
            command.add_argument("--reference", required=True, help="real data set whose test split (patients "
                                 "the index command left out, same --seed) is the real-to-real reference")
            command.add_argument("--seed", type=int, default=0, help="patient split seed the index was built with")
        else:
            command.add_argument("--data", required=True, help="real data set with patient IDs, e.g. nih:PATH")
            command.add_argument("--seed", type=int, default=0, help="patient split seed")
            command.add_argument("--false-positive-rate", type=float, default=DEFAULT_FALSE_POSITIVE_RATE)
            command.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS)
            command.add_argument("--compare-size", type=int, default=DEFAULT_COMPARE_SIZE)
        command.add_argument("--size", type=int, default=256, help="side the images are read at (px)")
        if name == "planted":
            command.add_argument("--copies-per-kind", type=int, default=100)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    try:
        if args.command != "index" and args.out.exists():
            raise FileExistsError(f"{args.out} exists; choose a new report directory")
        bundle = _load_bundle(args.bundle)
        if args.command == "audit":
            index = NearCopyIndex.load(args.index, bundle.manifest.files["classifier.onnx"].sha256)
            synthetic = load_images(args.synthetic, args.size, progress=progress)
            real = load_images(args.reference, args.size, "test", seed=args.seed, progress=progress)
            reference = index.match(embed(bundle, real.images, progress), real.images)
            audit = audit_memorisation(bundle, index, synthetic, reference, progress)
            _write_report(audit, args.out)
            print(f"near-copies: {audit.near_copies} of {len(synthetic)} synthetic images "
                  f"({audit.near_copies / len(synthetic):.2%}) at threshold {index.threshold:.4f}")
            return 0
        options = {"false_positive_rate": args.false_positive_rate, "neighbours": args.neighbours,
                   "compare_size": args.compare_size, "source": args.data}
        train = load_images(args.data, args.size, "train", seed=args.seed, progress=progress)
        calibration = load_images(args.data, args.size, "val", seed=args.seed, progress=progress)
        if args.command == "index":
            index, reference = build_index(bundle, train, calibration, progress=progress, **options)
            index.save(args.out)
            print(f"wrote {args.out}: {len(index)} training images, threshold {index.threshold:.4f} "
                  f"(held-out real flag rate {reference.near_copy.mean():.2%} on {len(calibration)} images)")
            return 0
        heldout = load_images(args.data, args.size, "test", seed=args.seed, progress=progress)
        audit = planted_copy_check(bundle, train, calibration, heldout, copies_per_kind=args.copies_per_kind,
                                   progress=progress, **options)
        _write_report(audit, args.out)
        planted = audit.planted
        print(f"planted copies caught: {planted['caught']}/{planted['copies']} = {planted['catch_rate']:.2%} "
              f"(95% CI {planted['catch_rate_ci95'][0]:.2%}–{planted['catch_rate_ci95'][1]:.2%})")
        for kind, row in planted["by_kind"].items():
            print(f"  {kind:<20} {row['catch_rate']:.2%} of {row['copies']}")
        print(f"held-out real images flagged: {planted['heldout_flagged']}/{planted['heldout_images']} = "
              f"{planted['heldout_flag_rate']:.2%} (95% CI {planted['heldout_flag_rate_ci95'][0]:.2%}–"
              f"{planted['heldout_flag_rate_ci95'][1]:.2%}; threshold {audit.index.threshold:.4f})")
        return 0
    except (NearCopyIndexError, FileExistsError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
