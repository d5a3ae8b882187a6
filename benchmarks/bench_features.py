"""Feature extraction throughput (images/s) of the evaluation suite's extractors on this machine.

Each extractor embeds ``--images`` 64² images in batches of ``--batch``, after one warm-up batch. The
torchxrayvision DenseNet-121 and the FID InceptionV3 run with randomly initialised weights of the right
shapes (saved to a temporary state dict and loaded by path as a user's file would be): their cost does
not depend on the values, and no weights are downloaded. Prints a Markdown table for BENCHMARKS.md.

    python -m benchmarks.bench_features --bundle models/demo --auditor runs/demo/auditor
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.evaluate.features import ClassifierFeatures, XRVDenseNetFeatures, extract, make_extractor


def throughput(extractor, images: np.ndarray, batch: int) -> float:
    extract(extractor, images[:batch], batch_size=batch, progress=False)  # warm-up
    started = time.perf_counter()
    extract(extractor, images, batch_size=batch, progress=False)
    return len(images) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_features", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/demo")
    parser.add_argument("--auditor", help="trained classifier directory (skipped when not given)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

    images = np.random.default_rng(0).uniform(-1, 1, (args.images, 1, args.size, args.size)).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        from training.evaluate.inception import FIDInceptionV3, InceptionFeatures
        from training.networks.classifier import DenseNet, densenet121_spec

        xrv_file, inception_file = Path(scratch) / "densenet.pt", Path(scratch) / "inception.pth"
        torch.save(DenseNet(densenet121_spec(224)).state_dict(), xrv_file)
        torch.save(FIDInceptionV3().state_dict(), inception_file)
        extractors = [make_extractor("bundle", bundle=args.bundle)]
        if args.auditor:
            extractors.append(ClassifierFeatures(args.auditor))
        extractors += [XRVDenseNetFeatures(xrv_file), InceptionFeatures(inception_file)]
        for extractor in extractors:
            rate = throughput(extractor, images, args.batch)
            rows.append((extractor.name, extractor.dim, f"{extractor.preprocessing['size']}²", rate))
            print(f"{extractor.name}: {rate:.1f} images/s", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {args.images} images of {args.size}², batch {args.batch}\n")
    print("| extractor | dim | network input | images/s |\n| --- | ---: | ---: | ---: |")
    for name, dim, size, rate in rows:
        print(f"| {name} | {dim} | {size} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
