"""LCO cost and serving throughput, measured side by side in one run on one bundle.

1. Cost per satisfied image for three requests: the most common finding, the rarest, and a
   three-label combination (two present, one absent). Three ways to get such an image:
     rejection  draw z, run generator + classifier, keep it if the classifier agrees;
     LCO        one latent, then Adam on z (candidates = 1);
     cand+LCO   K latents scored with one forward pass, best one optimised.
   Cost is counted in forward-pass equivalents (FPE: one generator + classifier forward of one
   sample; one lco_step evaluation counts as the measured ratio of its time to a forward's, printed)
   and in seconds, per satisfied image, with ratios to rejection sampling.
2. Throughput (images/s) of the service's batcher with 1, 4 and 16 concurrent clients, each asking
   for one image at a time, with and without cross-request batching.

    python -m benchmarks.bench_lco --bundle models/demo                       # CPU
    python -m benchmarks.bench_lco --bundle models/demo --device cuda --scale 4   # one CUDA GPU
    python -m benchmarks.bench_lco --sections throughput --json figures.json    # one section, figures as JSON

Only the engine API that every recent revision shares is used here, so that
``benchmarks.compare_revisions`` can run this file against an older checkout's engine.

``--device cuda`` needs onnxruntime-gpu; the engine then keeps z, its Adam moments and the gradient
on the GPU between steps (IOBinding). ``--scale`` multiplies the sample counts of the cost
section (bigger LCO batches keep a GPU busy); the throughput section asks for the same 48 images per
run whatever the scale, since its requests are one image each and a run's length is what matters.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.bundle import SessionTuning, load_bundle
from service.labels import LABEL_INDEX, NUM_LABELS
from service.lco import LCOEngine, LCOOptions, SampleRequest, draw_latents, project_to_sphere, satisfied
from service.prior import nih_prior

COMBINATION = {"Effusion": True, "Atelectasis": True, "Pneumothorax": False}


@dataclass
class Cost:
    method: str
    images: int
    hits: int
    fpe: float
    seconds: float

    @property
    def fpe_per_hit(self) -> float:
        return self.fpe / self.hits if self.hits else float("inf")

    @property
    def seconds_per_hit(self) -> float:
        return self.seconds / self.hits if self.hits else float("inf")


def vectors(constraints: dict[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros(NUM_LABELS, np.float32)
    mask = np.zeros(NUM_LABELS, np.float32)
    for name, value in constraints.items():
        mask[LABEL_INDEX[name]] = 1.0
        target[LABEL_INDEX[name]] = float(value)
    return target, mask


def step_cost_ratio(engine: LCOEngine, batch: int = 32, repeats: int = 5) -> float:
    """Time of one lco_step evaluation over one generator + classifier forward, per sample."""
    z = draw_latents(0, batch, engine.latent_dim, None)
    target = np.zeros((batch, NUM_LABELS), np.float32)
    mask = np.ones_like(target)
    engine.score(z)
    engine.lco_step.run(None, {"z": z, "target": target, "mask": mask})
    start = time.perf_counter()
    for _ in range(repeats):
        engine.score(z)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        engine.lco_step.run(None, {"z": z, "target": target, "mask": mask})
    return (time.perf_counter() - start) / forward


def rejection(engine: LCOEngine, target: np.ndarray, mask: np.ndarray, want_hits: int, budget: int,
              batch: int = 256, seed: int = 10_000_000) -> Cost:
    hits = draws = 0
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with tqdm(total=want_hits, desc="  rejection", unit="hit", leave=False) as bar:
        while hits < want_hits and draws < budget:
            z = project_to_sphere(rng.standard_normal((batch, engine.latent_dim), dtype=np.float32))
            _, logits = engine.score(z)
            probs = 1 / (1 + np.exp(-logits))
            ok = satisfied(probs, np.tile(target, (batch, 1)), np.tile(mask, (batch, 1)), engine.thresholds, 0.0)
            draws += batch
            hits += int(ok.sum())
            bar.update(int(ok.sum()))
    return Cost("rejection", draws, hits, float(draws), time.perf_counter() - start)


def lco(engine: LCOEngine, target: np.ndarray, mask: np.ndarray, images: int, candidates: int, ratio: float,
        steps: int, seed: int = 20_000_000) -> Cost:
    engine.stats.forward_samples = engine.stats.step_samples = 0
    options = LCOOptions(candidates=candidates, steps=steps)
    samples = [SampleRequest(target, mask, seed + i, options) for i in range(images)]
    start = time.perf_counter()
    results = engine.generate(samples)
    seconds = time.perf_counter() - start
    fpe = engine.stats.forward_samples + ratio * engine.stats.step_samples
    name = "LCO" if candidates == 1 else f"{candidates} cand+LCO"
    return Cost(name, images, sum(r.satisfied for r in results), fpe, seconds)


def throughput(engine: LCOEngine, clients: int, batching: bool, requests_per_client: int,
               target: np.ndarray, mask: np.ndarray) -> float:
    """Images/s when ``clients`` threads each ask for one image at a time."""
    from service.batching import Batcher

    batcher = Batcher(engine, max_wait_s=0.005, enabled=batching)
    counter = iter(range(10**9))
    lock = threading.Lock()

    def client() -> None:
        for _ in range(requests_per_client):
            with lock:
                seed = 30_000_000 + next(counter)
            batcher.submit([SampleRequest(target, mask, seed)])[0].result()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    batcher.close()
    return clients * requests_per_client / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lco", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/demo", help="bundle directory or BentoML model tag")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the cost section's sample counts")
    parser.add_argument("--steps", type=int, default=200, help="LCO step cap")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per throughput mode")
    parser.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads per graph (default: all CPUs); "
                        "1 on a machine shared with other jobs, where a parallel step waits on descheduled threads")
    parser.add_argument("--sections", default="cost,throughput", help="comma-separated: cost, throughput")
    parser.add_argument("--json", help="also write every figure to this JSON file ({name: value})")
    args = parser.parse_args(argv)
    sections = {name.strip() for name in args.sections.split(",")}
    unknown = sections - {"cost", "throughput"}
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from cost, throughput")
    figures: dict[str, float] = {}

    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if args.device == "cuda" else ("CPUExecutionProvider",)
    bundle = load_bundle(args.bundle, SessionTuning(providers=providers, intra_op_threads=args.intra_op_threads))
    engine = LCOEngine(bundle, max_batch=int(64 * max(1.0, args.scale)))
    engine.warm_up()

    threads = bundle.sessions["lco_step"].get_session_options().intra_op_num_threads
    print(f"bundle {bundle.manifest.name} {bundle.manifest.version}, {bundle.manifest.resolution}², "
          f"latent {bundle.manifest.latent_dim}, on {bundle.providers[0]} (IOBinding device: {engine.device_type}, "
          f"{threads} intra-op threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")

    ratio = step_cost_ratio(engine)
    figures["lco_step_forward_passes"] = ratio
    print(f"one lco_step evaluation costs {ratio:.2f} forward passes (generator + classifier), measured\n")
    if "cost" in sections:
        cost_section(engine, ratio, args.scale, args.steps, args.candidates, figures)
    if "throughput" in sections:
        throughput_section(engine, args.repeats, figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def common_and_rarest() -> tuple[str, str]:
    prevalence = nih_prior().prevalence()
    findings = {name: p for name, p in prevalence.items() if name in LABEL_INDEX}
    return max(findings, key=findings.get), min(findings, key=findings.get)


def cost_section(engine: LCOEngine, ratio: float, scale: float, steps: int, candidates: int,
                 figures: dict[str, float]) -> None:
    def n(count: int) -> int:
        return max(1, round(count * scale))


    common, rarest = common_and_rarest()
    requests = {f"{common} (most common)": {common: True}, f"{rarest} (rarest)": {rarest: True},
                "Effusion+Atelectasis -Pneumothorax": COMBINATION}

    print("## Cost per satisfied image (FPE = forward-pass equivalents)\n")
    print("| request | method | images | satisfied | FPE / satisfied | s / satisfied | FPE vs rejection | time vs rejection |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for title, constraints in requests.items():
        target, mask = vectors(constraints)
        rows = [rejection(engine, target, mask, want_hits=n(16), budget=n(20_000)),
                lco(engine, target, mask, n(32), 1, ratio, steps),
                lco(engine, target, mask, n(32), candidates, ratio, steps)]
        base = rows[0]
        # No hit in the whole budget: rejection costs at least the budget per hit (a lower bound).
        base_fpe = base.fpe_per_hit if base.hits else base.fpe
        base_seconds = base.seconds_per_hit if base.hits else base.seconds
        bound = "" if base.hits else ">"
        for row in rows:
            if row.hits:
                fpe, secs = f"{row.fpe_per_hit:.1f}", f"{row.seconds_per_hit:.3g}"
                gains = f"{bound}{base_fpe / row.fpe_per_hit:.1f}x | {bound}{base_seconds / row.seconds_per_hit:.1f}x"
            else:
                fpe, secs, gains = f">{row.fpe:.0f}", f">{row.seconds:.3g}", "- | -"
            if row is base:
                gains = "1.0x | 1.0x"
            figures[f"cost {title} {row.method} FPE/satisfied"] = row.fpe_per_hit if row.hits else float("inf")
            figures[f"cost {title} {row.method} s/satisfied"] = row.seconds_per_hit if row.hits else float("inf")
            print(f"| {title} | {row.method} | {row.images} | {row.hits} | {fpe} | {secs} | {gains} |")
    print("\n('x' columns: how many times cheaper than rejection sampling; '>': rejection found no hit in its"
          " whole budget, so its cost per hit is at least the budget and the ratios are lower bounds)\n")


def throughput_section(engine: LCOEngine, repeats: int, figures: dict[str, float]) -> None:
    print("## Throughput of the service batcher (one image per request)\n")
    print(f"(median of {repeats} alternating runs of each mode)\n")
    print("| clients | without cross-request batching (img/s) | with (img/s) | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    target, mask = vectors({common_and_rarest()[0]: True})
    for clients in (1, 4, 16):
        per_client = max(2, 48 // clients)
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):  # alternate the modes so drifting machine load hits both alike
            for batching in (False, True):
                runs[batching].append(throughput(engine, clients, batching, per_client, target, mask))
        alone, merged = float(np.median(runs[False])), float(np.median(runs[True]))
        print(f"| {clients} | {alone:.2f} | {merged:.2f} | {merged / alone:.2f}x |")
        figures[f"throughput {clients} clients without batching img/s"] = alone
        figures[f"throughput {clients} clients with batching img/s"] = merged


if __name__ == "__main__":
    raise SystemExit(main())
