"""What `verify` costs and what it buys: retries per finding, and a second auditor's opinion.

For each single finding, "No Finding" and the combination of benchmarks/bench_lco_quality.py, LCO makes
``--images`` images with the service's default options (request r, image i: seed 1e6·(r+1) + i, as
there) and the bundle's auditor verifies them as ``POST /generate`` does (service/verify.py: a rejected
image is made again from ``retry_seed(seed, attempt)``, up to ``--verify-retries`` times). Per request:

- how many images needed a retry, the mean attempts, and the extra cost in LCO steps (steps of every
  attempt after the first, per image and as a share of the first attempts' steps);
- the share the bundle's auditor verified at the first attempt, and the images withheld (rejected
  through every retry: ``POST /generate`` does not return them, an archive drops them), so every
  image returned is verified;
- a *second* auditor (``--second-auditor``: a classifier run trained on another phantom stream and
  seed, e.g. the `auditor-2` preset, in no bundle): its agreement with the first attempts' images
  (what LCO returns without verify) and with the verified images, side by side.

Writes a Markdown table (``--out``) and beside it (same name, .png) a bar chart of the second auditor's
agreement per request, unverified against verified.

    python -m training.cli classifier train --preset auditor-2 --run-dir runs/demo/auditor-2
    python -m benchmarks.bench_verify --bundle models/demo-audited --second-auditor runs/demo/auditor-2 --images 32
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from service.bundle import load_bundle
from service.lco import LCOEngine, LCOOptions, SampleRequest
from service.schemas import resolve_labels
from service.verify import Verifier, generate_accepted
from training.classifier.artifact import TrainedClassifier
from training.evaluate.labels import auditor_probabilities, default_requests, met


def measure(engine: LCOEngine, verifier: Verifier, second: TrainedClassifier, images: int, verify_retries: int,
            seed: int = 1_000_000) -> list[dict]:
    """One row per request of ``default_requests()`` (see the module docstring for the columns)."""
    rows = []
    for number, (title, constraints) in enumerate(tqdm(default_requests(), desc="verified requests", unit="request")):
        spec = resolve_labels(constraints, exclusive=False)
        samples = [SampleRequest(spec.target, spec.mask, seed * (number + 1) + i) for i in range(images)]
        accepted = generate_accepted(engine.generate, samples, verifier=verifier, verify_retries=verify_retries)
        attempts = np.array([a.attempts for a in accepted])
        first_steps = np.array([a.first.steps for a in accepted])
        extra_steps = np.array([a.total_steps - a.first.steps for a in accepted])
        verified = np.array([bool(a.verified) for a in accepted])
        first_agree = met(auditor_probabilities(second, np.stack([a.first.image for a in accepted])[:, None]),
                          second.thresholds, spec.target, spec.mask)
        final = [a for a in accepted if a.verified]
        verified_agree = met(auditor_probabilities(second, np.stack([a.result.image for a in final])[:, None]),
                             second.thresholds, spec.target, spec.mask) if final else np.zeros(0, bool)
        rows.append({
            "request": title,
            "images": images,
            "retried": int((attempts > 1).sum()),
            "mean_attempts": float(attempts.mean()),
            "extra_steps_per_image": float(extra_steps.mean()),
            "extra_steps_share": float(extra_steps.sum() / max(first_steps.sum(), 1)),
            "withheld": int((~verified).sum()),
            "first_verified": float(np.mean([bool(a.first_verdict and a.first_verdict.verified) for a in accepted])),
            "second_unverified": float(first_agree.mean()),
            "second_verified": float(verified_agree.mean()) if final else float("nan"),
            "verified_images": len(final),
        })
    return rows


def table(rows: list[dict], caption: str) -> str:
    lines = [caption, "",
             ("| request | needed a retry | mean attempts | extra LCO steps / image (share) | bundle auditor agrees "
              "at the first attempt | withheld (rejected through every retry) | second auditor: unverified (first "
              "attempts) | second auditor: verified (returned) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(
            f"| {row['request']} | {row['retried']}/{row['images']} | {row['mean_attempts']:.2f} | "
            f"{row['extra_steps_per_image']:.0f} ({row['extra_steps_share']:.0%}) | {row['first_verified']:.0%} | "
            f"{row['withheld']}/{row['images']} | {row['second_unverified']:.0%} | {row['second_verified']:.0%} "
            f"(n={row['verified_images']}) |")
    at_least = sum(row["second_verified"] >= row["second_unverified"] for row in rows)
    lines += ["", (f"The second auditor agrees with verified images at least as often as with unverified ones "
                   f"for {at_least}/{len(rows)} requests.")]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.arange(len(rows))
    figure, axes = plt.subplots(figsize=(12, 4.5))
    axes.bar(positions - 0.2, [r["second_unverified"] for r in rows], 0.4, label="unverified (first attempts)")
    axes.bar(positions + 0.2, [r["second_verified"] for r in rows], 0.4, label="verified")
    axes.set_xticks(positions, [r["request"] for r in rows], rotation=45, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("second auditor agrees")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_verify", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/demo-audited", help="a bundle exported with --auditor")
    parser.add_argument("--second-auditor", required=True,
                        help="classifier run or directory trained on another phantom stream and seed (e.g. auditor-2)")
    parser.add_argument("--images", type=int, default=32, help="images per request")
    parser.add_argument("--verify-retries", type=int, default=3, help="the request option verify_retries")
    parser.add_argument("--steps", type=int, help="LCO steps (default: the service's)")
    parser.add_argument("--candidates", type=int, help="LCO candidates (default: the service's)")
    parser.add_argument("--out", type=Path, default=Path("runs/verify.md"), help="Markdown table; the chart goes beside it")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    bundle = load_bundle(args.bundle)
    verifier = Verifier.of_bundle(bundle)
    if verifier is None:
        parser.error(f"{args.bundle} has no auditor: export it with `python -m training.cli export ... --auditor RUN`")
    overrides = {k: v for k, v in (("steps", args.steps), ("candidates", args.candidates)) if v is not None}
    engine = LCOEngine(bundle, LCOOptions(**overrides))
    second = TrainedClassifier.load(args.second_auditor)
    started = time.perf_counter()
    rows = measure(engine, verifier, second, args.images, args.verify_retries)
    manifest = bundle.manifest
    caption = (f"Bundle `{manifest.name}` {manifest.version}: bundle auditor {verifier.auditor.description}; second "
               f"auditor `{second.preset}` ({second.spec.arch}, seed {second.seed}, {second.dataset}). "
               f"{args.images} images per request, verify_retries {args.verify_retries}, LCO options "
               f"{engine.options.model_dump()}; {time.perf_counter() - started:.0f} s.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = table(rows, caption)
    args.out.write_text(text)
    chart(rows, args.out.with_suffix(".png"), f"Second auditor ({second.preset}) on {manifest.name} images")
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
