"""ONNX Runtime (the service) vs eager torch (training) for the generator and one LCO step.

    python -m benchmarks.bench_onnx [--bundle DIR --generator CKPT --classifier DIR [--against DIR]]
                                    [--gan-config demo] [--classifier-preset demo]
                                    [--batches 1 16 64] [--rounds 15] [--threads 2]

Without ``--bundle``, the networks of the given presets (demo: 64², latent 128) are built with
fresh weights and exported to a temporary bundle: timing does not depend on what the weights are.
With ``--bundle`` the given bundle is timed against the checkpoint and classifier it came from.

For each batch size, torch and ONNX Runtime run alternately (one call each per round, after a
warm-up), so both see the same machine load; the medians and their ratio are printed. torch uses
``--threads`` intra-op threads and ONNX Runtime the same number. "LCO step" is one evaluation of
loss and ∂loss/∂z (torch: forward + autograd backward; ONNX: one ``lco_step.onnx`` run).

``--against DIR``: a bundle of the same networks exported by another revision (say, the one before a
change to the step graph's export): its ``lco_step.onnx`` is timed against ``--bundle``'s the same
way, and the two graphs' outputs are compared (equal bytes, or the largest difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from service.bundle import SessionTuning, load_bundle
from service.labels import LABELS, NUM_LABELS


def median_times(first: Callable[[], object], second: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median seconds of each callable, alternating them round by round after one warm-up call each."""
    first(), second()
    a, b = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        first()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        second()
        b.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def build_models(args: argparse.Namespace):
    from training.classifier import TrainedClassifier, get_preset
    from training.classifier.metrics import LabelAUROC
    from training.export import GeneratorInfo, export_bundle
    from training.gan.config import load_config
    from training.gan.training_loop import build_networks, load_generator
    from training.networks.classifier import build_classifier

    if args.bundle:
        generator = load_generator(args.generator)
        classifier = TrainedClassifier.load(args.classifier).network.eval()
        return generator, classifier, Path(args.bundle)
    torch.manual_seed(0)
    generator, _ = build_networks(load_config(args.gan_config))
    generator.eval().requires_grad_(False)
    spec = get_preset(args.classifier_preset).model
    network = build_classifier(spec).eval().requires_grad_(False)
    unrated = {label: LabelAUROC(None, None, None, 0, 0) for label in LABELS}
    trained = TrainedClassifier(network, spec, np.full(NUM_LABELS, 0.5, np.float32), unrated, "none", 0)
    directory = Path(tempfile.mkdtemp(prefix="bench-onnx-")) / "bundle"
    print(f"exporting {args.gan_config} generator + {args.classifier_preset} classifier to {directory} ...")
    export_bundle(generator, trained, directory, generator_info=GeneratorInfo("none", 0), name="bench")
    return generator, network, directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", help="an exported bundle (then --generator and --classifier are required)")
    parser.add_argument("--generator", help="the PGGAN checkpoint the bundle came from")
    parser.add_argument("--classifier", help="the classifier directory the bundle came from")
    parser.add_argument("--against", help="with --bundle: a bundle of the same networks from another revision")
    parser.add_argument("--gan-config", default="demo")
    parser.add_argument("--classifier-preset", default="demo")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if args.bundle and not (args.generator and args.classifier):
        parser.error("--bundle needs --generator and --classifier (the torch side to compare with)")
    if args.against and not args.bundle:
        parser.error("--against compares with --bundle: give both")

    from training.export import LCOObjective, reference_lco_step

    torch.set_num_threads(args.threads)
    generator, classifier, bundle_dir = build_models(args)
    tuning = SessionTuning(providers=("CPUExecutionProvider",), intra_op_threads=args.threads)
    bundle = load_bundle(bundle_dir, tuning)
    other = load_bundle(args.against, tuning) if args.against else None
    objective = LCOObjective(generator, classifier).eval()
    latent, resolution = bundle.manifest.latent_dim, bundle.manifest.resolution
    print(f"{resolution}² generator, latent {latent}; {args.threads} thread(s) each; "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print(f"{'batch':>5}  {'what':<14} {'torch ms':>10} {'onnx ms':>10} {'torch/onnx':>10}")
    rng = np.random.default_rng(0)
    for batch in args.batches:
        z = rng.standard_normal((batch, latent)).astype(np.float32)
        target = (rng.random((batch, NUM_LABELS)) < 0.2).astype(np.float32)
        mask = np.ones((batch, NUM_LABELS), np.float32)
        z_t, target_t, mask_t = torch.from_numpy(z), torch.from_numpy(target), torch.from_numpy(mask)

        def torch_generate(z_t=z_t):
            with torch.no_grad():
                return generator(z_t).clamp(-1, 1)

        def torch_step(z_t=z_t, target_t=target_t, mask_t=mask_t):
            return reference_lco_step(objective, z_t, target_t, mask_t)

        cases = [
            ("generator", torch_generate, lambda z=z: bundle.generate(z)),
            ("LCO step", torch_step, lambda z=z, t=target, m=mask: bundle.lco_step(z, t, m)),
        ]
        for what, torch_call, onnx_call in cases:
            torch_s, onnx_s = median_times(torch_call, onnx_call, args.rounds)
            print(f"{batch:>5}  {what:<14} {torch_s * 1e3:>10.2f} {onnx_s * 1e3:>10.2f} {torch_s / onnx_s:>9.2f}×",
                  flush=True)
        if other is not None:
            def other_step(z=z, t=target, m=mask):
                return other.lco_step(z, t, m)

            def this_step(z=z, t=target, m=mask):
                return bundle.lco_step(z, t, m)

            pairs = zip(vars(other_step()).values(), vars(this_step()).values())
            largest = max(float(np.abs(a - b).max()) for a, b in pairs)
            other_s, this_s = median_times(other_step, this_step, args.rounds)
            print(f"{batch:>5}  {'step: against':<14} {other_s * 1e3:>10.2f} {this_s * 1e3:>10.2f} "
                  f"{other_s / this_s:>9.2f}×  (--against ms, --bundle ms; outputs "
                  f"{'equal' if largest == 0 else f'differ by up to {largest:.3g}'})", flush=True)


if __name__ == "__main__":
    main()
