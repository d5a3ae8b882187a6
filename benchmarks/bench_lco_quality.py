"""Does LCO make what was asked? Label fidelity on a bundle, judged by the LCO classifier and the auditor.

For each single finding, for "No Finding", and for a two-present-one-absent combination, LCO makes
``--images`` images with the service's default options. Two judges:

- the LCO classifier (the one LCO optimised against): share of images with every constraint met;
- the independent auditor (another architecture and seed, never used by LCO): share of the same
  images on which it agrees that every constraint is met, at its own thresholds.

Beside them, how often each request is met without LCO: the NIH ChestX-ray14 prevalence, and the
rate among unconditional samples of the generator under each judge; and what the auditor grants the
truth: its agreement on ``--truth`` phantoms that really meet the request (labels from the
generator's phantom prior with the request's labels set: training/phantoms ``request_phantoms``).
Writes a Markdown table, and beside it (same name, .png) a contact sheet: the first images of each
request, each captioned with the auditor's verdict. The cost column is classifier passes (one CNN
over one image) per LCO step: the steering network's per step evaluation, plus the classifier's
checks of step images on a bundle with a steering network (service/lco.py), from the manifest's
pass counts.

    python -m benchmarks.bench_lco_quality --bundle models/demo --auditor runs/demo/auditor --images 32
    python -m benchmarks.bench_lco_quality --bundle B --auditor models/demo   # judged by a bundle's auditor.onnx
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.bundle import load_bundle
from service.demo import contact_sheet
from service.labels import LABELS
from service.lco import LCOEngine, LCOOptions, draw_latents
from service.prior import nih_prior
from service.schemas import resolve_labels
from training.classifier.artifact import TrainedClassifier
from training.evaluate.labels import auditor_probabilities, default_requests, lco_fidelity, met
from training.phantoms import request_phantoms

SHEET_COLUMNS = 8
TRUTH_SEED = 70_000_000


def passes_per_step(manifest, step_evaluations: int, checks: int) -> float | None:
    """Classifier passes per LCO step: the steering network's passes per step evaluation plus the
    classifier's per check; None when the manifest does not record a count needed (bundles exported
    before the counts) or no step ran."""
    if not step_evaluations:
        return None
    if manifest.steering is None:
        return None if manifest.classifier_passes is None else float(manifest.classifier_passes)
    if checks and manifest.classifier_passes is None:
        return None
    return (step_evaluations * manifest.steering.passes + checks * (manifest.classifier_passes or 0)) / step_evaluations


def _passes(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _share(value: float) -> str:
    return "—" if np.isnan(value) else f"{value:.0%}"


def nih_rate(constraints: dict[str, bool] | list[str]) -> float:
    """Share of NIH ChestX-ray14 images whose labels meet the request."""
    prior = nih_prior()
    spec = resolve_labels(constraints, exclusive=False)
    ok = met(prior.combinations, np.full(len(LABELS), 0.5), spec.target, spec.mask)
    return float(prior.probabilities[ok].sum())


def load_auditor(path: Path):
    """(auditor, caption) from a training run or classifier directory (torch) or a bundle directory (its
    auditor.onnx on ONNX Runtime: the auditor a bundle ships); SystemExit for a bundle without one."""
    if (path / "manifest.json").is_file():
        from service.auditor import Auditor

        auditor = Auditor.of_bundle(load_bundle(path))
        if auditor is None:
            raise SystemExit(f"--auditor {path}: this bundle has no auditor.onnx; give an auditor run instead")
        return auditor, f"{auditor.description}, the auditor.onnx of {path}"
    auditor = TrainedClassifier.load(path)
    return auditor, f"`{auditor.preset}` ({auditor.spec.arch}, seed {auditor.seed})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lco_quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/demo")
    parser.add_argument("--auditor", default="runs/demo/auditor",
                        help="auditor run or classifier directory, or a bundle directory: its auditor.onnx")
    parser.add_argument("--images", type=int, default=32, help="images per request")
    parser.add_argument("--unconditional", type=int, default=512, help="unconditional samples for the baseline")
    parser.add_argument("--truth", type=int, default=128,
                        help="phantoms per request that meet it, judged by the auditor (0: none, as for a bundle "
                             "trained on real radiographs)")
    parser.add_argument("--prior", default="nih-boosted", help="label prior of those phantoms (the demo generator's)")
    parser.add_argument("--margin", type=float, help="LCO margin in logits (default: the service's)")
    parser.add_argument("--rejection-first", action=argparse.BooleanOptionalAction,
                        help="accept the first candidate in seed order that meets the request (default: the "
                             "service's, on); --no-rejection-first starts LCO from the best candidate as before it")
    parser.add_argument("--out", type=Path, default=Path("runs/lco-quality.md"), help="Markdown table; the sheet goes beside it")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    bundle = load_bundle(args.bundle)
    chosen = {"margin": args.margin, "rejection_first": args.rejection_first}
    engine = LCOEngine(bundle, LCOOptions(**{name: value for name, value in chosen.items() if value is not None}))
    auditor, judged_by = load_auditor(Path(args.auditor))

    # Unconditional baseline: the generator alone, judged by both classifiers.
    latents = np.concatenate([draw_latents(90_000_000 + i, 1, engine.latent_dim, None) for i in range(args.unconditional)])
    free_images, free_logits = engine.score(latents)
    free_lco = 1 / (1 + np.exp(-free_logits))
    free_audit = auditor_probabilities(auditor, free_images[:, None])

    requests = default_requests()
    started = time.perf_counter()
    fidelity = lco_fidelity(engine, auditor, requests, args.images)  # request r, sample i: seed 1e6·(r+1) + i
    rows, sheet_rows = [], []
    for (title, constraints), result in zip(requests, fidelity):
        spec = resolve_labels(constraints, exclusive=False)
        sheet_rows.append((title if len(title) <= 24 else title[:22] + "…", [
            (Image.fromarray(np.uint8(np.round((image + 1.0) * 127.5))), "auditor: yes" if ok else "auditor: no")
            for image, ok in zip(result.images[:SHEET_COLUMNS], result.auditor_flags)]))
        rows.append({
            "request": title,
            "nih": nih_rate(constraints),
            "free_lco": float(met(free_lco, engine.thresholds, spec.target, spec.mask).mean()),
            "free_audit": float(met(free_audit, auditor.thresholds, spec.target, spec.mask).mean()),
            "truth": float("nan") if not args.truth else float(met(auditor_probabilities(
                auditor, request_phantoms(spec.target, spec.mask, args.truth, bundle.manifest.resolution,
                                          seed=TRUTH_SEED, prior=args.prior)[0][:, None] * 2.0 - 1.0),
                auditor.thresholds, spec.target, spec.mask).mean()),
            "lco": result.lco_classifier.value,
            "audit": result.auditor.value,
            "steps": result.mean_steps,
            "passes": passes_per_step(bundle.manifest, result.step_evaluations, result.checks),
        })
    elapsed = time.perf_counter() - started

    manifest = bundle.manifest
    lines = [
        "# LCO label fidelity",
        "",
        (f"Bundle `{manifest.name}` {manifest.version} ({manifest.resolution}², latent {manifest.latent_dim}, "
         f"generator trained on {manifest.provenance.dataset}); auditor {judged_by}. {args.images} images "
         f"per request, LCO options "
         f"{engine.options}; unconditional rates from {args.unconditional} generator samples. "
         f"Written by `python -m benchmarks.bench_lco_quality` in {elapsed:.0f} s."),
        "",
        ("| request | NIH prevalence | unconditional (LCO classifier) | unconditional (auditor) "
         "| auditor on phantoms that meet it | LCO satisfied | auditor agrees | mean steps | classifier passes per step |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row['request']} | {row['nih']:.1%} | {row['free_lco']:.1%} | {row['free_audit']:.1%} "
                     f"| {_share(row['truth'])} | {row['lco']:.0%} | {row['audit']:.0%} | {row['steps']:.1f} | {_passes(row['passes'])} |")
    singles = rows[: len(LABELS)]
    lines += [
        "",
        (f"Single findings: LCO satisfied ≥ 90% for {sum(r['lco'] >= 0.9 for r in singles)}/{len(singles)}, "
         f"auditor agrees ≥ 70% for {sum(r['audit'] >= 0.7 for r in singles)}/{len(singles)}, "
         f"≥ 90% for {sum(r['audit'] >= 0.9 for r in singles)}/{len(singles)}. "
         f"Combination: LCO {rows[-1]['lco']:.0%}, auditor {rows[-1]['audit']:.0%}. "
         f"Classifier passes per LCO step over the table: "
         f"{_passes(passes_per_step(manifest, sum(r.step_evaluations for r in fidelity), sum(r.checks for r in fidelity)))}."),
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
