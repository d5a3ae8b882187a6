"""Counterfactual pairs (POST /edit) on a bundle, judged by an auditor LCO never saw.

For each finding F and ``--pairs`` seeds: the reference is the request {F: absent} at that seed (what
/generate would return), the edit adds F from the reference's latent (service/counterfactual.py, the
code /edit runs). Per finding:

- the change confirmed: the auditor sees F in the edited image (and, stricter, did not see it in the
  reference);
- the rest kept: every label the edit does not name stays on its side of the threshold, per pair
  (all 13) and per label, by the auditor and by the LCO classifier;
- the yardstick: the same numbers for ``--phantom-pairs`` phantoms drawn without and with F
  (training/phantoms: the anatomy and every other finding's placement do not depend on the labels, so
  these are perfect counterfactuals): how often this auditor itself sees a label move when only F
  was added. Their labels come from ``--prior`` (the demo generator's phantom prior) with F absent;
- closeness: SSIM of the pair (torchmetrics, Wang et al. 2004) against the SSIM of two unrelated
  images of the same request (the references of seeds s and s + 1), and the latent distance.

Writes a Markdown table and beside it a contact sheet (same name, .png): per finding three pairs as
reference | edited | difference (red brighter, blue darker).

    python -m benchmarks.bench_edit --bundle models/demo --pairs 16

The auditor is the bundle's own (``auditor.onnx``) unless ``--auditor`` names another: a classifier run
or an exported auditor directory (``training.cli export-auditor``).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm import tqdm

from service.auditor import Auditor
from service.bundle import load_bundle
from service.counterfactual import DEFAULT_IMAGE_PULL, DEFAULT_PULL, difference_png, edit_sample, plan_edit
from service.demo import contact_sheet
from service.labels import LABEL_INDEX, LABELS
from service.lco import LCOEngine, LCOOptions, SampleRequest
from service.prior import get_prior
from service.schemas import resolve_labels
from training.classifier.artifact import TrainedClassifier
from training.evaluate.labels import auditor_probabilities

# The findings LCO reaches in tens of steps on the demo bundle (docs/lco-quality.md): a CPU run stays
# minutes; the others (Cardiomegaly, Edema, Hernia, Nodule: ~200 steps) can be named with --findings.
FINDINGS = ("Atelectasis", "Consolidation", "Effusion", "Emphysema", "Infiltration", "Mass", "Pneumonia")
SHEET_PAIRS = 3


def ssim(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """SSIM per row of two stacks [N, H, W] in [-1, 1] (data range 2)."""
    a, b = (torch.from_numpy(np.ascontiguousarray(x, np.float32))[:, None] for x in (first, second))
    return structural_similarity_index_measure(a, b, data_range=2.0, reduction="none").numpy()


def kept(before: np.ndarray, after: np.ndarray, thresholds: np.ndarray,
         labels: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Share of pairs whose ``labels`` all stay on their side of the threshold, share of (pair, label)
    that do, and per label [len(labels)] the share of pairs it stays in; probabilities [N, 14]."""
    same = (before[:, labels] >= thresholds[labels]) == (after[:, labels] >= thresholds[labels])
    return float(same.all(axis=1).mean()), float(same.mean()), same.mean(axis=0)


class Judge:
    """An auditor read either way: the bundle's or an exported one (ONNX), or a classifier run (torch)."""

    def __init__(self, bundle, path: Path | None):
        if path is None or (path / "auditor.json").is_file():
            onnx = Auditor.of_bundle(bundle) if path is None else Auditor.load(path)
            if onnx is None:
                raise SystemExit(f"{bundle.path} has no auditor: name one with --auditor RUN")
            self.thresholds, self.description = onnx.thresholds, onnx.description
            self.probabilities = onnx.probabilities
        else:
            trained = TrainedClassifier.load(path)
            self.thresholds = trained.thresholds
            self.description = f"{trained.preset} ({trained.spec.arch}, seed {trained.seed})"
            self.probabilities = lambda images: auditor_probabilities(trained, images[:, None])


def count(rows: list[dict], key: str, bar: float) -> str:
    """How many of ``rows`` reach ``bar`` in ``key``, as "k/n" ("–" when none was measured)."""
    if all(np.isnan(r[key]) for r in rows):
        return "–"
    return f"{sum(r[key] >= bar for r in rows)}/{len(rows)}"


def percent(share: float, digits: int = 0) -> str:
    return "–" if np.isnan(share) else f"{share:.{digits}%}"


def phantom_pairs(finding: str, count: int, size: int, prior: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` phantoms [count, size, size] in [-1, 1] drawn without ``finding`` and the same ones with it;
    labels from ``prior`` conditioned on ``finding`` absent (drawn again until it is)."""
    from training.phantoms import render_phantom

    rng = np.random.default_rng(seed)
    index = LABEL_INDEX[finding]
    before, after = [], []
    while len(before) < count:
        labels = get_prior(prior).sample(1, rng)[0].astype(np.float32)
        if labels[index] > 0.5:
            continue
        image_seed = int(rng.integers(0, 2**63 - 1))
        with_finding = labels.copy()
        with_finding[index] = 1.0
        before.append(render_phantom(labels, size, image_seed))
        after.append(render_phantom(with_finding, size, image_seed))
    return np.stack(before) * 2.0 - 1.0, np.stack(after) * 2.0 - 1.0


def to_tile(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.uint8(np.round((np.clip(image, -1, 1) + 1.0) * 127.5)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_edit", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/demo")
    parser.add_argument("--auditor", type=Path, default=None,
                        help="auditor run or exported auditor directory (default: the bundle's auditor)")
    parser.add_argument("--pairs", type=int, default=16, help="pairs per finding")
    parser.add_argument("--findings", nargs="+", default=list(FINDINGS))
    parser.add_argument("--prior", default="nih-boosted", help="label prior of the phantom pairs")
    parser.add_argument("--phantom-pairs", type=int, default=64, help="phantom pairs per finding")
    parser.add_argument("--proximity", type=float, default=DEFAULT_PULL,
                        help="the edit's pull towards the reference's latent")
    parser.add_argument("--image-proximity", type=float, default=DEFAULT_IMAGE_PULL,
                        help="the edit's pull towards the reference's pixels")
    parser.add_argument("--out", type=Path, default=Path("runs/edit-pairs.md"), help="Markdown table; the sheet goes beside it")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    bundle = load_bundle(args.bundle)
    engine = LCOEngine(bundle, LCOOptions())
    auditor = Judge(bundle, args.auditor)
    rows, sheet_rows = [], []
    started = time.perf_counter()
    for number, finding in enumerate(tqdm(args.findings, desc="findings", unit="finding")):
        index = LABEL_INDEX[finding]
        reference = resolve_labels({finding: False}, exclusive=False)
        spec = plan_edit(reference.target, reference.mask, [finding], [])
        seeds = [5_000_000 * (number + 1) + i for i in range(args.pairs + 1)]
        originals = engine.generate([SampleRequest(reference.target, reference.mask, seed) for seed in seeds])
        edited = engine.generate([edit_sample(spec, original, args.proximity, args.image_proximity, None)
                                  for original in originals[:-1]])
        before = np.stack([o.image for o in originals[:-1]])
        after = np.stack([e.image for e in edited])
        audit_before, audit_after = (auditor.probabilities(x) for x in (before, after))
        clf_before = np.stack([o.probabilities for o in originals[:-1]])
        clf_after = np.stack([e.probabilities for e in edited])
        others = np.array([i for i in range(len(LABELS)) if i != index])

        audit_kept_pairs, audit_kept_labels, audit_per_label = kept(audit_before, audit_after, auditor.thresholds, others)
        clf_kept_pairs, clf_kept_labels, _ = kept(clf_before, clf_after, engine.thresholds, others)
        worst = int(np.argmin(audit_per_label))
        truth = dict.fromkeys(("truth_confirmed", "truth_kept_pairs", "truth_kept_labels", "truth_worst",
                               "truth_of_worst"), float("nan"))  # a bundle of real radiographs: no phantom pairs
        if args.phantom_pairs:
            truth_before, truth_after = (auditor.probabilities(x.astype(np.float32)) for x in phantom_pairs(
                finding, args.phantom_pairs, bundle.manifest.resolution, args.prior, seed=seeds[0]))
            truth_kept_pairs, truth_kept_labels, truth_per_label = kept(truth_before, truth_after, auditor.thresholds,
                                                                        others)
            truth = {"truth_confirmed": float((truth_after[:, index] >= auditor.thresholds[index]).mean()),
                     "truth_kept_pairs": truth_kept_pairs, "truth_kept_labels": truth_kept_labels,
                     "truth_worst": float(truth_per_label.min()), "truth_of_worst": float(truth_per_label[worst])}
        present_after = audit_after[:, index] >= auditor.thresholds[index]
        absent_before = audit_before[:, index] < auditor.thresholds[index]
        pair_ssim = ssim(before, after)
        unrelated_ssim = ssim(before, np.stack([o.image for o in originals[1:]]))
        rows.append({
            "finding": finding,
            "lco": float(np.mean([e.satisfied for e in edited])),
            "confirmed": float(present_after.mean()),
            "flipped": float((present_after & absent_before).mean()),
            "audit_kept_pairs": float(audit_kept_pairs), "audit_kept_labels": float(audit_kept_labels),
            "audit_worst": float(audit_per_label[worst]), "audit_worst_label": LABELS[others[worst]],
            **truth,
            "clf_kept_pairs": float(clf_kept_pairs), "clf_kept_labels": float(clf_kept_labels),
            "pair_ssim": float(pair_ssim.mean()), "unrelated_ssim": float(unrelated_ssim.mean()),
            "latent": float(np.mean([np.linalg.norm(e.latent - o.latent) for e, o in zip(edited, originals)])),
            "steps": float(np.mean([e.steps for e in edited])),
        })
        tiles = []
        for i in range(min(SHEET_PAIRS, args.pairs)):
            difference, scale = difference_png(before[i], after[i])
            tiles += [(to_tile(before[i]), f"aud {audit_before[i, index]:.2f}"),
                      (to_tile(after[i]), f"aud {audit_after[i, index]:.2f}"),
                      (Image.open(io.BytesIO(difference)), f"±{scale:.2f}")]
        sheet_rows.append((f"+ {finding}", tiles))
    elapsed = time.perf_counter() - started

    manifest = bundle.manifest
    lines = [
        "# Counterfactual pairs",
        "",
        (f"Bundle `{manifest.name}` {manifest.version}; auditor {auditor.description}. {args.pairs} pairs per finding: reference {{F: absent}}, edit adds F from its latent, "
         f"proximity: latent {args.proximity:g}, image {args.image_proximity:g}; LCO options {engine.options}. Written by `python -m benchmarks.bench_edit` "
         f"in {elapsed:.0f} s."),
        "",
        ("| finding added | LCO satisfied | auditor sees it after (phantom pairs) | absent before, present after "
         "| others kept, all 13: auditor / LCO clf (phantom pairs) | others kept, per label: auditor / LCO clf (phantom pairs) "
         "| label kept least: auditor (phantom pairs) | SSIM pair | SSIM unrelated | latent distance | mean steps |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['finding']} | {r['lco']:.0%} | {r['confirmed']:.0%} ({percent(r['truth_confirmed'])}) "
            f"| {r['flipped']:.0%} "
            f"| {r['audit_kept_pairs']:.0%} / {r['clf_kept_pairs']:.0%} ({percent(r['truth_kept_pairs'])}) "
            f"| {r['audit_kept_labels']:.1%} / {r['clf_kept_labels']:.1%} ({percent(r['truth_kept_labels'], 1)}) "
            f"| {r['audit_worst_label']} {r['audit_worst']:.0%} ({percent(r['truth_of_worst'])}) "
            f"| {r['pair_ssim']:.3f} | {r['unrelated_ssim']:.3f} | {r['latent']:.2f} | {r['steps']:.1f} |")
    lines += [
        "",
        (f"Phantom pairs ({args.phantom_pairs} per finding, labels from the `{args.prior}` prior with the finding "
         "absent): the same phantom drawn without and with the finding, the anatomy and every other finding in "
         "place: perfect counterfactuals, and what this auditor says of them." if args.phantom_pairs else
         "No phantom pairs (--phantom-pairs 0)."),
        "",
        (f"Auditor confirms the change in ≥ 80% of pairs for {count(rows, 'confirmed', 0.8)} findings "
         f"(phantom pairs {count(rows, 'truth_confirmed', 0.8)}). Labels not named on their side in ≥ 90% of pairs: "
         f"every one of them for {count(rows, 'audit_worst', 0.9)} (phantom pairs {count(rows, 'truth_worst', 0.9)}), "
         f"all 13 at once for {count(rows, 'audit_kept_pairs', 0.9)} (phantom pairs "
         f"{count(rows, 'truth_kept_pairs', 0.9)}), per (pair, label) for {count(rows, 'audit_kept_labels', 0.9)} "
         f"(phantom pairs {count(rows, 'truth_kept_labels', 0.9)})."),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, args.out)
    contact_sheet(sheet_rows, args.out.with_suffix(".png"))
    print(f"written to {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
