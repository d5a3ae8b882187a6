"""The LCO step of a paper-scale bundle on a GPU: time per image-step, memory, share of peak FLOP/s.

    python -m benchmarks.bench_lco_gpu                       # paper-1024 + chexnet, random weights, CUDA
    python -m benchmarks.bench_lco_gpu --bundle DIR          # an exported bundle instead
    python -m benchmarks.bench_lco_gpu --device cpu --tiny   # smoke run: ci generator, small DenseNet

Without ``--bundle`` the generator of ``--gan-config`` and the classifier of ``--classifier-preset``
are built with random weights (``benchmarks.bench_paper_scale.build_networks``) and exported as a
bundle (``training.export.export_bundle``, parity check included); timing does not depend on the
weights. Then, for each precision (fp32; fp16 where ONNX Runtime can convert and run the graph:
``onnxruntime.transformers.float16``, inputs and outputs kept float32) and each batch size:

- ``lco_step.onnx`` runs with IOBinding (inputs and outputs stay on the device) after two warm-up calls,
  repeated for ``--seconds``; the median call is reported as ms per image-step;
- peak memory: on CUDA the device memory ONNX Runtime's arena holds after the calls (the arena grows
  to the peak and keeps it; NVML, device-wide, minus what was in use before the session); on the CPU
  the process's peak RSS during the calls;
- the graph's FLOPs per image (Conv, ConvTranspose, MatMul and Gemm, 2 per multiply-add, shapes from
  ONNX shape inference at batch 1) over the call time, as a share of the device's peak for that
  precision (NVIDIA data sheets; ``--peak-tflops`` for another device; none known for CPUs).

Last, end-to-end LCO on the fp32 bundle: ``--hernia`` requests for Hernia through ``service.lco.LCOEngine``
(``--lco-steps`` Adam steps at most, ``--candidates`` candidates, running batch = compute batch =
``--lco-batch``), as images per second. With random weights no image satisfies the request, so every
sample runs to its step cap: the figure is the cost of ``--lco-steps`` steps per image.

On CUDA the machine needs ``onnxruntime-gpu`` (CUDAExecutionProvider) and the project's service
dependencies (pydantic) besides torch and onnx.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_paper_scale import build_networks, peak_rss, reset_peak_rss, step_inputs
from service.labels import LABELS, NUM_LABELS
from service.step_graph import lco_step_feeds

# Dense peak FLOP/s per precision (NVIDIA data sheets; fp32 on CUDA cores, fp16 on tensor cores, no sparsity).
PEAK_FLOPS = {
    "H200": {"fp32": 67e12, "fp16": 989.4e12},
    "H100": {"fp32": 67e12, "fp16": 989.4e12},
    "A100": {"fp32": 19.5e12, "fp16": 312e12},
    "L4": {"fp32": 30.3e12, "fp16": 121e12},
}
COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def graph_flops(model, batch: int = 1) -> tuple[float, int]:
    """Floating-point operations of one run of ``model`` at ``batch`` (2 per multiply-add) in Conv,
    ConvTranspose, MatMul and Gemm nodes, from ONNX shape inference with the batch fixed; returns
    (FLOPs, number of such nodes whose shapes inference could not give, which are left out)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int] | None] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    shapes.update({t.name: list(t.dims) for t in inferred.graph.initializer})
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    shapes[node.output[0]] = list(attribute.t.dims)

    def known(name: str) -> list[int] | None:
        shape = shapes.get(name)
        return shape if shape is not None and all(isinstance(d, int) and d > 0 for d in shape) else None

    total, unknown = 0.0, 0
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        a, b, out = known(node.input[0]), known(node.input[1]), known(node.output[0])
        if a is None or b is None or out is None:
            unknown += 1
        elif node.op_type == "Conv":  # weight [Cout, Cin/g, k...]: each output takes Cin/g·k… products
            total += 2 * math.prod(out) * math.prod(b[1:])
        elif node.op_type == "ConvTranspose":  # weight [Cin, Cout/g, k...]: each input spreads to Cout/g·k…
            total += 2 * math.prod(a) * math.prod(b[1:])
        else:  # MatMul / Gemm: every output entry is a dot product over the shared dimension
            transposed = next((x.i for x in node.attribute if x.name == "transA"), 0)
            inner = a[-2] if transposed else a[-1]
            total += 2 * math.prod(out) * inner
    return total, unknown


def device_peak(device: str, precision: str, override: dict[str, float]) -> tuple[str, float | None]:
    """(device name, peak FLOP/s for ``precision`` or None when not known)."""
    if precision in override:
        return "given", override[precision]
    if device != "cuda":
        return "CPU", None
    import pynvml

    pynvml.nvmlInit()
    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    name = name.decode() if isinstance(name, bytes) else name
    peak = next((table.get(precision) for key, table in PEAK_FLOPS.items() if key in name), None)
    return name, peak


def gpu_memory_used() -> int:
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)


def session_for(model_bytes: bytes, device: str, threads: int | None):
    import onnxruntime as ort

    from service.bundle import SessionTuning

    providers = ("CUDAExecutionProvider",) if device == "cuda" else ("CPUExecutionProvider",)
    tuning = SessionTuning(providers=providers, intra_op_threads=threads)
    return ort.InferenceSession(model_bytes, tuning.session_options(), providers=tuning.resolved_providers())


def time_steps(session, device: str, batch: int, latent_dim: int, seconds: float) -> tuple[float, int]:
    """Median seconds of one IOBinding call of the step graph at ``batch``, and peak memory in bytes."""
    import onnxruntime as ort

    ort_device = "cuda" if device == "cuda" else "cpu"
    binding = session.io_binding()
    for name, value in lco_step_feeds(session, **step_inputs(batch, latent_dim)).items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, ort_device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, ort_device)
    before = gpu_memory_used() if device == "cuda" else 0
    reset_peak_rss()
    for _ in range(2):
        session.run_with_iobinding(binding)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        session.run_with_iobinding(binding)  # returns once the outputs are ready
        times.append(time.perf_counter() - started)
    memory = gpu_memory_used() - before if device == "cuda" else peak_rss()
    return statistics.median(times), memory


def fp16_model(model):
    """The graph with float16 weights and arithmetic, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def export_random_bundle(gan_config: str, classifier_preset: str, directory: Path) -> Path:
    from training.classifier import TrainedClassifier, get_preset
    from training.classifier.metrics import LabelAUROC
    from training.export import GeneratorInfo, export_bundle

    generator, network = build_networks(gan_config, classifier_preset)
    spec = get_preset(classifier_preset).model
    unrated = {label: LabelAUROC(None, None, None, 0, 0) for label in LABELS}
    trained = TrainedClassifier(network, spec, np.full(NUM_LABELS, 0.5, np.float32), unrated, "none", 0)
    return export_bundle(generator, trained, directory / "bundle", generator_info=GeneratorInfo("none", 0),
                         name="bench-gpu")


def hernia_images_per_second(bundle_dir: Path, device: str, threads: int | None, count: int, steps: int,
                             candidates: int, batch: int) -> tuple[float, float]:
    """End-to-end LCO for Hernia: (images per second, mean Adam steps per image)."""
    from service.bundle import SessionTuning, load_bundle
    from service.lco import LCOEngine, LCOOptions, SampleRequest

    providers = ("CUDAExecutionProvider",) if device == "cuda" else ("CPUExecutionProvider",)
    bundle = load_bundle(bundle_dir, SessionTuning(providers=providers, intra_op_threads=threads))
    engine = LCOEngine(bundle, LCOOptions(steps=steps, candidates=candidates), max_batch=batch, compute_batch=batch)
    engine.warm_up()
    hernia = np.zeros(NUM_LABELS, np.float32)
    hernia[LABELS.index("Hernia")] = 1.0
    requests = [SampleRequest(hernia, np.ones(NUM_LABELS, np.float32), seed=i) for i in range(count)]
    started = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - started
    return count / elapsed, statistics.mean(r.steps for r in results)


def parse_peaks(text: str) -> dict[str, float]:
    """"fp32=67,fp16=989" (TFLOP/s) → {"fp32": 6.7e13, "fp16": 9.89e14}."""
    peaks = {}
    for item in filter(None, text.split(",")):
        precision, _, value = item.partition("=")
        if precision not in ("fp32", "fp16") or not value:
            raise argparse.ArgumentTypeError(f"--peak-tflops takes fp32=N,fp16=N (TFLOP/s), got {item!r}")
        peaks[precision] = float(value) * 1e12
    return peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: ci generator + auditor-ci DenseNet, batches 1 2, a few LCO steps")
    parser.add_argument("--bundle", help="an exported bundle (default: export the presets with random weights)")
    parser.add_argument("--gan-config", default="paper-1024")
    parser.add_argument("--classifier-preset", default="chexnet")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "fp16"), default=["fp32", "fp16"])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per (precision, batch)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: all available)")
    parser.add_argument("--hernia", type=int, default=64, help="images asked for Hernia end to end (0: skip)")
    parser.add_argument("--lco-steps", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--lco-batch", type=int, default=32)
    parser.add_argument("--peak-tflops", type=parse_peaks, default={}, help="fp32=N,fp16=N for an unlisted device")
    args = parser.parse_args(argv)
    if args.tiny:
        args.gan_config, args.classifier_preset = "ci", "auditor-ci"
        args.batches, args.seconds = [1, 2], 0.2
        args.hernia, args.lco_steps, args.candidates, args.lco_batch = 2, 3, 2, 1

    import onnx
    import onnxruntime as ort

    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"error: this onnxruntime {ort.__version__} has no CUDAExecutionProvider "
              f"(install onnxruntime-gpu), or run with --device cpu")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-lco-gpu-") as scratch:
        if args.bundle:
            bundle_dir = Path(args.bundle)
        else:
            started = time.perf_counter()
            bundle_dir = export_random_bundle(args.gan_config, args.classifier_preset, Path(scratch))
            print(f"exported {args.gan_config} + {args.classifier_preset} (random weights) in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        from service.bundle import verify_bundle

        manifest = verify_bundle(bundle_dir)
        model = onnx.load(str(bundle_dir / "lco_step.onnx"))
        flops, uncounted = graph_flops(model)
        print(f"bundle {manifest.name} {manifest.version}: {manifest.resolution}², latent {manifest.latent_dim}; "
              f"lco_step {flops / 1e9:.4g} GFLOP per image-step ({uncounted} nodes of unknown shape left out); "
              f"{args.device}, onnxruntime {ort.__version__}, load average {os.getloadavg()[0]:.1f}", flush=True)
        memory_name = "GPU GiB held" if args.device == "cuda" else "peak RSS GiB"
        print(f"{'precision':>9} {'batch':>5} {'ms/image-step':>14} {'TFLOP/s':>8} {'of peak':>8} {memory_name:>13}")
        for precision in args.precisions:
            try:
                graph = model if precision == "fp32" else fp16_model(model)
                session = session_for(graph.SerializeToString(), args.device, args.threads)
            except Exception as error:  # noqa: BLE001 - ORT's own message says what it cannot do
                print(f"{precision:>9}  not run: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                continue
            name, peak = device_peak(args.device, precision, args.peak_tflops)
            for batch in args.batches:
                try:
                    seconds, memory = time_steps(session, args.device, batch, manifest.latent_dim, args.seconds)
                except Exception as error:  # noqa: BLE001 - e.g. out of device memory at a large batch
                    print(f"{precision:>9} {batch:>5}  not run: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
                    continue
                achieved = flops * batch / seconds
                share = f"{100 * achieved / peak:7.1f}%" if peak else f"{'n/a':>8}"
                print(f"{precision:>9} {batch:>5} {1e3 * seconds / batch:>14.2f} {achieved / 1e12:>8.3f} {share} "
                      f"{memory / 2**30:>13.2f}", flush=True)
            print(f"{'':>9} peak for {precision} on {name}: "
                  f"{f'{peak / 1e12:.1f} TFLOP/s' if peak else 'not known (--peak-tflops)'}")
            del session
            gc.collect()
        if args.hernia:
            rate, steps = hernia_images_per_second(bundle_dir, args.device, args.threads, args.hernia, args.lco_steps,
                                                   args.candidates, args.lco_batch)
            print(f"LCO end to end, Hernia: {rate:.3f} images/s ({args.hernia} images, compute batch {args.lco_batch}, "
                  f"{args.candidates} candidates, {steps:.1f} Adam steps per image on average, cap {args.lco_steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
