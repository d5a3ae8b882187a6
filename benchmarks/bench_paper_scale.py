"""Paper-scale bundles without a GPU: export cost, graph sizes, one CPU step, and gradient parity.

    nice -n 10 python -m benchmarks.bench_paper_scale --gan-config nih-256 --classifier-preset chexnet
    nice -n 10 python -m benchmarks.bench_paper_scale --gan-config paper-1024 --classifier-preset chexnet

The generator of a PGGAN preset (``training/configs/``) and the classifier of a classifier preset
(``training/configs/classifier/``) are built with random weights (BatchNorm statistics drawn as after
training) and their three graphs exported one by one (``training/export``), each timed with the peak
resident memory (RSS) of the exporting process. Then:

- the step graph is searched for operations that sum in a thread-dependent order
  (``order_dependent_sums``), and its outputs at 1 and ``--threads`` intra-op threads compared bit for bit;
- one ``lco_step.onnx`` call per batch size is timed in a fresh process (wall and CPU seconds, peak
  RSS of that process while it ran the step) after a warm-up call;
- its gradient is compared with torch autograd in float32 (the requirement: largest error ≤ 1e-4 of the
  largest entry, cosine ≥ 0.99999) and both with autograd in float64, which tells the rounding of the
  graph from the rounding of float32 itself (see BENCHMARKS.md).

``--torch-only`` skips export and ONNX Runtime: autograd in float32 against float64, whole and per
network (``stage_agreement``), which locates where float32 loses digits at a given size.

Peak RSS is VmHWM from /proc/self/status, reset before each phase through /proc/self/clear_refs (Linux).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from service.labels import NUM_LABELS
from service.step_graph import lco_step_feeds

GIB = 2**30


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss() -> int:
    """Peak resident set size of this process since start or the last ``reset_peak_rss``, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def step_inputs(batch: int, latent_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """z [B, latent] standard normal; every label constrained, about a fifth of them present."""
    rng = np.random.default_rng(seed)
    return {"z": rng.standard_normal((batch, latent_dim)).astype(np.float32),
            "target": (rng.random((batch, NUM_LABELS)) < 0.2).astype(np.float32),
            "mask": np.ones((batch, NUM_LABELS), np.float32)}


def run_steps(path: str, latent_dim: int, batches: list[int], threads: int) -> dict:
    """In a fresh process: time one step per batch size after a warm-up, and compare the outputs at
    1 and ``threads`` intra-op threads (batch ``batches[-1]``). Returns the outputs and figures."""
    import onnxruntime as ort

    from service.bundle import SessionTuning

    def session(intra_op_threads: int):
        tuning = SessionTuning(providers=("CPUExecutionProvider",), intra_op_threads=intra_op_threads)
        return ort.InferenceSession(path, tuning.session_options(), providers=["CPUExecutionProvider"])

    started = time.perf_counter()
    main = session(threads)
    result: dict = {"session_s": time.perf_counter() - started, "session_peak_rss": peak_rss(), "steps": {}}
    for batch in batches:
        inputs = lco_step_feeds(main, **step_inputs(batch, latent_dim))
        main.run(None, inputs)  # warm-up: first-call allocations and kernel choices
        reset_peak_rss()
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = main.run(None, inputs)
        result["steps"][batch] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                                  "peak_rss": peak_rss(), "outputs": outputs}
    last = batches[-1]
    one_thread = session(1)
    single = one_thread.run(None, lco_step_feeds(one_thread, **step_inputs(last, latent_dim)))
    result["threads_identical"] = all(np.array_equal(a, b) for a, b in zip(single, result["steps"][last]["outputs"],
                                                                             strict=True))
    return result


def build_networks(gan_config: str, classifier_preset: str, seed: int = 0):
    """A preset's generator and classifier with random weights, in eval mode (BatchNorm statistics
    drawn as a trained network would have them, so that BatchNorm is not the identity)."""
    import torch

    from training.classifier import get_preset
    from training.gan.config import load_config
    from training.gan.training_loop import build_networks as build_gan
    from training.networks.classifier import build_classifier

    torch.manual_seed(seed)
    generator, _ = build_gan(load_config(gan_config))
    classifier = build_classifier(get_preset(classifier_preset).model)
    with torch.no_grad():
        for module in classifier.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return generator.eval().requires_grad_(False), classifier.eval().requires_grad_(False)


def graph_summary(path: Path) -> dict:
    import onnx

    from training.export import order_dependent_sums

    model = onnx.load(str(path))
    operations: dict[str, int] = {}
    for node in model.graph.node:
        operations[node.op_type] = operations.get(node.op_type, 0) + 1
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    return {"bytes": path.stat().st_size, "nodes": len(model.graph.node), "parameters": parameters,
            "operations": operations, "order_dependent": order_dependent_sums(model)}


def export_all(generator, classifier, directory: Path) -> dict:
    """Export the three graphs one by one; seconds and peak RSS of each."""
    from training.export import export_classifier, export_generator, export_lco_step

    exports = {
        "generator.onnx": lambda path: export_generator(generator, path),
        "classifier.onnx": lambda path: export_classifier(classifier, generator.resolution, path),
        "lco_step.onnx": lambda path: export_lco_step(generator, classifier, path),
    }
    figures = {}
    for name, export in exports.items():
        reset_peak_rss()
        started = time.perf_counter()
        export(directory / name)
        figures[name] = {"export_s": time.perf_counter() - started, "export_peak_rss": peak_rss(),
                         **graph_summary(directory / name)}
        print(f"  {name:<16} {figures[name]['export_s']:7.1f} s  peak RSS {figures[name]['export_peak_rss'] / GIB:5.2f} GiB"
              f"  {figures[name]['bytes'] / 1e6:7.1f} MB  {figures[name]['nodes']:5d} nodes", flush=True)
    return figures


def torch_references(generator, classifier, batch: int, latent_dim: int) -> dict:
    """Autograd's gradient in float32 and in float64, and what may make them differ: the share of
    pixels the generator's clamp cuts off, and windows of the DenseNet stem's max pool whose positive
    maximum is tied (float32; the recorded arg-max decides where the gradient goes)."""
    import copy

    import torch

    from training.export import LCOObjective, reference_lco_step

    inputs = {name: torch.from_numpy(value) for name, value in step_inputs(batch, latent_dim).items()}
    objective = LCOObjective(generator, classifier).eval()
    pool = next((m for m in classifier.modules() if isinstance(m, torch.nn.MaxPool2d)), None)
    seen: dict = {}
    hook = pool.register_forward_hook(lambda m, i, o: seen.update(input=i[0].detach())) if pool else None
    loss, grad, probs, _ = reference_lco_step(objective, inputs["z"], inputs["target"], inputs["mask"])
    if hook:
        hook.remove()
    ties = 0
    if "input" in seen:
        pad = pool.padding
        padded = torch.nn.functional.pad(seen["input"], (pad, pad, pad, pad), value=-float("inf"))
        windows = torch.nn.functional.unfold(padded.flatten(0, 1)[:, None], pool.kernel_size, stride=pool.stride)
        top = windows.max(dim=1, keepdim=True).values
        # after the ReLU a window of zeros ties too, but its gradient dies in the ReLU's backward
        ties = int((((windows == top).sum(dim=1) > 1) & (top[:, 0] > 0)).sum())
    raw = generator(inputs["z"])
    clamped = float(((raw < -1) | (raw > 1)).float().mean())
    objective64 = copy.deepcopy(objective).double()
    _, grad64, _, _ = reference_lco_step(objective64, inputs["z"].double(), inputs["target"].double(),
                                         inputs["mask"].double())
    return {"loss": loss.numpy(), "grad": grad.numpy(), "probs": probs.numpy(), "grad64": grad64.numpy(),
            "clamped": clamped, "tied_windows": ties}


def stage_agreement(generator, classifier, batch: int, latent_dim: int) -> dict:
    """Where float32 loses digits: each network's vector-Jacobian product in float32 against float64,
    fed the same float64 inputs. ``classifier``: ∂loss/∂image at G(z); ``generator``: ∂⟨v, G(z)⟩/∂z
    for v = that image gradient (float64)."""
    import copy

    import torch

    from training.export import GradientAgreement, masked_bce

    inputs = {name: torch.from_numpy(value).double() for name, value in step_inputs(batch, latent_dim).items()}
    generator64, classifier64 = copy.deepcopy(generator).double(), copy.deepcopy(classifier).double()

    def image_gradient(network, image):
        image = image.detach().clone().requires_grad_(True)
        loss = masked_bce(network(image)[0], inputs["target"].to(image), inputs["mask"].to(image)).sum()
        return torch.autograd.grad(loss, image)[0]

    def latent_gradient(network, z, v):
        z = z.detach().clone().requires_grad_(True)
        return torch.autograd.grad((network(z).clamp(-1, 1) * v.to(z)).sum(), z)[0]

    with torch.no_grad():
        image64 = generator64(inputs["z"]).clamp(-1, 1)
    v64 = image_gradient(classifier64, image64)
    return {"classifier": GradientAgreement.of(image_gradient(classifier, image64.float()), v64),
            "generator": GradientAgreement.of(latent_gradient(generator, inputs["z"].float(), v64),
                                              latent_gradient(generator64, inputs["z"], v64))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gan-config", default="nih-256", help="PGGAN preset or TOML path")
    parser.add_argument("--classifier-preset", default="chexnet", help="classifier preset or TOML path")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime and torch intra-op threads")
    parser.add_argument("--keep", help="write the three graphs here (default: a temporary directory, removed)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--torch-only", action="store_true",
                        help="no export: autograd in float32 against float64 alone (where float32 itself stands)")
    args = parser.parse_args()

    import torch

    from training.export import GradientAgreement

    torch.set_num_threads(args.threads)
    generator, classifier = build_networks(args.gan_config, args.classifier_preset)
    def count(network) -> int:
        return sum(p.numel() for p in network.parameters())

    print(f"{args.gan_config} generator ({generator.resolution}², latent {generator.latent_dim}, "
          f"{count(generator) / 1e6:.1f}M parameters) + {args.classifier_preset} classifier "
          f"({count(classifier) / 1e6:.1f}M); {args.threads} threads; load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}", flush=True)
    if args.torch_only:
        for batch in args.batches:
            reference = torch_references(generator, classifier, batch, generator.latent_dim)
            print(f"  batch {batch}: torch fp32 vs fp64: {GradientAgreement.of(reference['grad'], reference['grad64'])}; "
                  f"{100 * reference['clamped']:.2f}% of pixels clamped; {reference['tied_windows']} tied stem "
                  f"max-pool windows", flush=True)
            for stage, agreement in stage_agreement(generator, classifier, batch, generator.latent_dim).items():
                print(f"    {stage} alone, fp32 vs fp64: {agreement}", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench-paper-") as scratch:
        directory = Path(args.keep or scratch)
        directory.mkdir(parents=True, exist_ok=True)
        graphs = export_all(generator, classifier, directory)
        step_ops = graphs["lco_step.onnx"]["operations"]
        print(f"  step graph: {graphs['lco_step.onnx']['order_dependent'] or 'no'} order-dependent sums; "
              f"GatherND {step_ops.get('GatherND', 0)}, Conv {step_ops.get('Conv', 0)}, "
              f"ConvTranspose {step_ops.get('ConvTranspose', 0)}", flush=True)
        context = multiprocessing.get_context("spawn")  # a clean process: its peak RSS is the step's alone
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            ort_run = pool.submit(run_steps, str(directory / "lco_step.onnx"), generator.latent_dim, args.batches,
                                  args.threads).result()
    print(f"  ORT session: {ort_run['session_s']:.1f} s to create, peak RSS {ort_run['session_peak_rss'] / GIB:.2f} GiB;"
          f" outputs at 1 and {args.threads} threads identical: {ort_run['threads_identical']}")
    rows = []
    for batch in args.batches:
        step = ort_run["steps"][batch]
        loss, grad, probs, _ = step.pop("outputs")
        reference = torch_references(generator, classifier, batch, generator.latent_dim)
        versus32 = GradientAgreement.of(grad, reference["grad"])
        versus64 = GradientAgreement.of(grad, reference["grad64"])
        torch32_vs64 = GradientAgreement.of(reference["grad"], reference["grad64"])
        row = {"batch": batch, **step, "loss_error": float(np.abs(loss - reference["loss"]).max()),
               "probs_error": float(np.abs(probs - reference["probs"]).max()),
               "onnx_vs_torch32": vars(versus32), "onnx_vs_torch64": vars(versus64),
               "torch32_vs_torch64": vars(torch32_vs64), "clamped": reference["clamped"],
               "tied_windows": reference["tied_windows"]}
        rows.append(row)
        print(f"  batch {batch}: step {step['wall_s']:.2f} s wall, {step['cpu_s']:.2f} s CPU "
              f"({step['wall_s'] / batch:.2f} s per image), peak RSS {step['peak_rss'] / GIB:.2f} GiB\n"
              f"    ORT vs torch fp32: {versus32}\n    ORT vs torch fp64: {versus64}\n"
              f"    torch fp32 vs fp64: {torch32_vs64}\n"
              f"    loss error {row['loss_error']:.1e}, probs error {row['probs_error']:.1e}; "
              f"{100 * reference['clamped']:.2f}% of pixels clamped; {reference['tied_windows']} tied stem max-pool "
              f"windows", flush=True)
    if args.json:
        summary = {"gan_config": args.gan_config, "classifier_preset": args.classifier_preset, "threads": args.threads,
                   "graphs": graphs, "session_s": ort_run["session_s"], "threads_identical": ort_run["threads_identical"],
                   "steps": rows}
        Path(args.json).write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
