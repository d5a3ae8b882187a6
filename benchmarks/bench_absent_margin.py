"""How far below its threshold must a label be before the auditor agrees it is absent?

The yardstick behind ``LCOOptions.absent_margin`` (service/lco.py). On the unconditional generator
samples of the bundle's acceptance table (service/acceptance.py: latents from seeds
``ACCEPTANCE_SEED + i``, the LCO classifier's logits stored), the bundle's auditor reads each image.
For each absent margin m in ``--margins``, per label: the samples whose LCO-classifier logit lies
below the label's threshold logit by more than m, and the share of them in which the auditor does
not see the label either. For "No Finding" (all 14 absent at m): how often the generator meets it
unprompted (what rejection first can accept) and how often the auditor then sees none of the 14.

Prints a Markdown table and writes a plot (``--out``, PNG) of both against m. Forward passes only:
seconds on a CPU.

    python -m benchmarks.bench_absent_margin --bundle models/demo --out runs/absent-margin.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.acceptance import ACCEPTANCE_SEED
from service.auditor import Auditor
from service.bundle import load_bundle
from service.labels import LABELS
from service.lco import LCOOptions, draw_latents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_absent_margin", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/demo", help="bundle directory with an acceptance table and an auditor")
    parser.add_argument("--margins", default="0,0.5,1.0,1.5,1.8", help="comma-separated absent margins, logits")
    parser.add_argument("--samples", type=int, help="the table's first N samples (default: all)")
    parser.add_argument("--out", default="runs/absent-margin.png", help="plot (PNG)")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    auditor = Auditor.of_bundle(bundle)
    if bundle.acceptance is None or auditor is None:
        parser.error(f"{args.bundle} needs an acceptance table and an auditor (export with both)")
    margins = [float(m) for m in args.margins.split(",")]
    logits = bundle.acceptance.logits[: args.samples]
    count = len(logits)
    latents = np.concatenate([draw_latents(ACCEPTANCE_SEED + i, 1, bundle.manifest.latent_dim, None) for i in range(count)])
    seen = np.zeros((count, len(LABELS)), bool)
    for start in tqdm(range(0, count, 64), desc="generator + auditor", unit="batch"):
        images = bundle.generate(latents[start : start + 64])[:, 0]
        seen[start : start + 64] = auditor.probabilities(images) >= auditor.thresholds[None, :]
    below = bundle.thresholds.astype(np.float64)
    below = (np.log(below / (1 - below)))[None, :] - logits  # logits below each threshold's logit

    print(f"bundle {bundle.manifest.name} {bundle.manifest.version}; auditor {auditor.description}; "
          f"{count} unconditional samples of the acceptance table; default absent_margin "
          f"{LCOOptions().absent_margin}, margin {LCOOptions().margin}\n")
    print("Auditor agrees a label is absent, among samples the LCO classifier puts more than m logits below "
          "its threshold (samples):\n")
    print("| label | " + " | ".join(f"m = {m:g}" for m in margins) + " |")
    print("| --- |" + " ---: |" * len(margins))
    for j, label in enumerate(LABELS):
        cells = []
        for m in margins:
            chosen = below[:, j] > m
            cells.append(f"{(~seen[chosen, j]).mean():.1%} ({chosen.sum()})" if chosen.any() else "– (0)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    rates, agreement = [], []
    for m in margins:
        chosen = (below > m).all(axis=1)
        rates.append(chosen.mean())
        agreement.append((~seen[chosen]).all(axis=1).mean() if chosen.any() else np.nan)
    print("| **No Finding: met unprompted** | " + " | ".join(f"{r:.1%}" for r in rates) + " |")
    print("| **No Finding: auditor sees none of the 14** | "
          + " | ".join("–" if np.isnan(a) else f"{a:.1%}" for a in agreement) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    axis.plot(margins, np.array(rates) * 100, "o-", label='"No Finding" met by unconditional samples')
    axis.plot(margins, np.array(agreement) * 100, "s-", label="auditor sees none of the 14 in them")
    worst = [min((~seen[below[:, j] > m, j]).mean() for j in range(len(LABELS)) if (below[:, j] > m).any())
             for m in margins]
    axis.plot(margins, np.array(worst) * 100, "^--", label="worst label: auditor agrees it is absent")
    axis.axvline(LCOOptions().absent_margin, color="grey", linestyle=":", label="default absent_margin")
    axis.set_xlabel("absent margin m (logits below the threshold)")
    axis.set_ylabel("%")
    axis.set_ylim(0, 101)
    axis.set_title(f"{bundle.manifest.name}: absent labels under the auditor", fontsize=10)
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
