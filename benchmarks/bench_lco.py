"""LCO cost and serving throughput, measured side by side in one run on one bundle.

1. Cost per satisfied image for three requests: the most common finding, the rarest, and a
   three-label combination (two present, one absent). Four ways to get such an image, all at the
   acceptance rule LCO stops on (every constrained label past its threshold by the LCO margin):
     rejection      draw z, run generator + classifier, keep it if it meets the rule;
     LCO            one latent, then Adam on z (candidates = 1);
     cand+LCO       K latents scored with forward passes, the best one optimised;
     rej-first+LCO  the engine's default: latents scored in seed order up to the request's rejection
                    budget, the first that meets the rule returned; else LCO from the best of K.
   Cost is counted in forward-pass equivalents (FPE: one generator + classifier forward of one
   sample; one lco_step evaluation counts as the measured ratio of its time to a forward's, printed)
   and in seconds, per satisfied image, with ratios to rejection sampling. Where rejection finds no
   hit it draws until its cost bounds the cheapest method's by ``--rejection-bound`` times, so the
   ratio it prints (a lower bound) can show that much.
2. NIH distribution archive: images/s of the engine making images whose labels are drawn from the
   NIH prior exactly as an archive job plans them (service/archive: all 14 labels constrained, the
   job's seeds, batches of its batch_size), one engine after the other on the same images: rejection
   first off with one margin for both sides and every label weighing 1 (the engine before all three),
   rejection first with labels requested absent at ``absent_margin``, and the job's defaults (present
   labels also weighing as much as absent ones, ``balance_sides``); beside each, how often the
   bundle's auditor agrees with its images. The first runs one graph call at a time, as the engine
   did, and with ``--baseline-bundle`` on that bundle's graphs (the same networks exported by an
   earlier revision: same version), so that it is today's engine whole.
3. Throughput (images/s) of the service's batcher with 1, 4 and 16 concurrent clients, each asking
   for one image at a time, with and without cross-request batching.

    python -m benchmarks.bench_lco --bundle models/demo                       # CPU
    python -m benchmarks.bench_lco --bundle models/demo --device cuda --scale 4   # one CUDA GPU
    python -m benchmarks.bench_lco --sections cost,archive --scale 0.25 --archive-images 24  # the 2-core CPU
    python -m benchmarks.bench_lco --sections throughput --json figures.json    # one section, figures as JSON

A bundle exported without an acceptance table (acceptance.npz, service/acceptance.py) gets one
measured here (``--acceptance-samples``), as the export would write it, so that rejection first runs
with the budgets it would have; the output says so.

Only the engine API that every recent revision shares is used here, so that
``benchmarks.compare_revisions`` can run this file against an older checkout's engine.

``--device cuda`` needs onnxruntime-gpu; the engine then keeps z, its Adam moments and the gradient
on the GPU between steps (IOBinding). ``--scale`` multiplies the sample counts of the cost
section (bigger LCO batches keep a GPU busy); the throughput section asks for the same 48 images per
run whatever the scale, since its requests are one image each and a run's length is what matters.
"""

from __future__ import annotations

import argparse
import inspect
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
from service.step_graph import lco_step_feeds

# Older engines (benchmarks.compare_revisions) have no rejection first: its rows are left out there.
REJECTION_FIRST = "rejection_first" in LCOOptions.model_fields
# ... nor a margin of its own for labels requested absent (the rule is then one margin for both sides).
ABSENT_MARGIN = "absent_margin" in LCOOptions.model_fields
# ... nor present labels weighed as much as absent ones in the loss.
BALANCE_SIDES = "balance_sides" in LCOOptions.model_fields

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
    engine.lco_step.run(None, lco_step_feeds(engine.lco_step, z, target, mask))
    start = time.perf_counter()
    for _ in range(repeats):
        engine.score(z)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        engine.lco_step.run(None, lco_step_feeds(engine.lco_step, z, target, mask))
    return (time.perf_counter() - start) / forward


def absent_rule(options: LCOOptions) -> dict[str, float]:
    """The absent labels' margin of ``options`` as keyword arguments of the rule (none on older engines)."""
    return {"absent_margin": options.absent_margin} if ABSENT_MARGIN else {}


def rejection(engine: LCOEngine, target: np.ndarray, mask: np.ndarray, want_hits: int, budget: int, margin: float,
              rule: dict[str, float], batch: int = 256, seed: int = 10_000_000) -> Cost:
    """Draws until ``want_hits`` meet the request ``margin`` logits past each threshold (``rule``: the
    absent labels' margin), or ``budget``."""
    hits = draws = 0
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with tqdm(total=want_hits, desc="  rejection", unit="hit", leave=False) as bar:
        while hits < want_hits and draws < budget:
            z = project_to_sphere(rng.standard_normal((batch, engine.latent_dim), dtype=np.float32))
            _, logits = engine.score(z, keep_images=False)
            probs = 1 / (1 + np.exp(-logits))
            ok = satisfied(probs, np.tile(target, (batch, 1)), np.tile(mask, (batch, 1)), engine.thresholds, margin,
                           **rule)
            draws += batch
            hits += int(ok.sum())
            bar.update(int(ok.sum()))
    return Cost("rejection", draws, hits, float(draws), time.perf_counter() - start)


def lco(engine: LCOEngine, target: np.ndarray, mask: np.ndarray, images: int, candidates: int, ratio: float,
        steps: int, rejection_first: bool = False, seed: int = 20_000_000) -> Cost:
    engine.stats.forward_samples = engine.stats.step_samples = engine.stats.checked_samples = 0
    options = LCOOptions(candidates=candidates, steps=steps,
                         **({"rejection_first": rejection_first} if REJECTION_FIRST else {}))
    samples = [SampleRequest(target, mask, seed + i, options) for i in range(images)]
    start = time.perf_counter()
    results = engine.generate(samples)
    seconds = time.perf_counter() - start
    # a classifier check of a step image (a bundle with a steering network) counted as a whole forward pass
    fpe = engine.stats.forward_samples + engine.stats.checked_samples + ratio * engine.stats.step_samples
    name = "LCO" if candidates == 1 else f"{candidates} cand+LCO"
    if rejection_first:
        name = f"rej-first+LCO ({sum(r.accepted_without_steps for r in results)}/{images} without steps)"
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
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the cost and archive sections' sample counts")
    parser.add_argument("--archive-images", type=int,
                        help="images per engine in the archive section (default: 1000 x --scale)")
    parser.add_argument("--requests", default="common,rarest,combination",
                        help="comma-separated requests of the cost section: common, rarest, combination")
    parser.add_argument("--rejection-bound", type=float, default=25.0,
                        help="without a hit, rejection draws until it costs this many times the cheapest method")
    parser.add_argument("--acceptance-samples", type=int, default=2048,
                        help="samples of the acceptance table measured for a bundle that has none")
    parser.add_argument("--steps", type=int, default=200, help="LCO step cap")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per throughput mode")
    parser.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads per graph (default: all CPUs); "
                        "1 on a machine shared with other jobs, where a parallel step waits on descheduled threads")
    parser.add_argument("--sections", default="cost,archive,throughput",
                        help="comma-separated: cost, archive, throughput")
    parser.add_argument("--baseline-bundle", help="archive section: the same bundle as an earlier revision exported "
                        "it (same version), for the engine before rejection first")
    parser.add_argument("--json", help="also write every figure to this JSON file ({name: value})")
    args = parser.parse_args(argv)
    sections = {name.strip() for name in args.sections.split(",")}
    unknown = sections - {"cost", "archive", "throughput"}
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from cost, archive, throughput")
    if "archive" in sections and not REJECTION_FIRST:
        parser.error("the archive section compares rejection first with the engine before it; this engine has none")
    figures: dict[str, float] = {}

    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if args.device == "cuda" else ("CPUExecutionProvider",)
    bundle = load_bundle(args.bundle, SessionTuning(providers=providers, intra_op_threads=args.intra_op_threads))
    if REJECTION_FIRST and bundle.acceptance is None:
        from service.acceptance import measure_acceptance

        print(f"the bundle has no acceptance table: measuring one here on {args.acceptance_samples} samples, "
              "as the export would")
        bundle.acceptance = measure_acceptance(bundle.generator, bundle.classifier, bundle.lco_session,
                                               bundle.manifest.latent_dim, args.acceptance_samples)
    engine = LCOEngine(bundle, max_batch=int(64 * max(1.0, args.scale)))
    engine.warm_up()

    threads = bundle.sessions["lco_step"].get_session_options().intra_op_num_threads
    print(f"bundle {bundle.manifest.name} {bundle.manifest.version}, {bundle.manifest.resolution}², "
          f"latent {bundle.manifest.latent_dim}, on {bundle.providers[0]} (IOBinding device: {engine.device_type}, "
          f"{threads} intra-op threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")

    ratio = step_cost_ratio(engine)
    figures["lco_step_forward_passes"] = ratio
    print(f"one lco_step evaluation costs {ratio:.2f} forward passes (generator + classifier), measured\n")
    if REJECTION_FIRST:
        print(f"acceptance table: {len(bundle.acceptance.logits)} samples, one step = "
              f"{bundle.acceptance.step_cost:.2f} forward passes where it was measured\n")
    if "cost" in sections:
        chosen = [name.strip() for name in args.requests.split(",")]
        if set(chosen) - {"common", "rarest", "combination"}:
            parser.error(f"--requests takes common, rarest and combination; got {args.requests}")
        cost_section(engine, ratio, args.scale, args.steps, args.candidates, args.rejection_bound, chosen, figures)
    if "archive" in sections:
        baseline = one_call_at_a_time(
            load_bundle(args.baseline_bundle, SessionTuning(providers=providers, intra_op_threads=args.intra_op_threads))
            if args.baseline_bundle else bundle, engine)
        archive_section(engine, baseline, args.archive_images or max(1, round(1000 * args.scale)), figures)
    if "throughput" in sections:
        throughput_section(engine, args.repeats, figures)
    side_by_side(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def common_and_rarest() -> tuple[str, str]:
    prevalence = nih_prior().prevalence()
    findings = {name: p for name, p in prevalence.items() if name in LABEL_INDEX}
    return max(findings, key=findings.get), min(findings, key=findings.get)


def cost_section(engine: LCOEngine, ratio: float, scale: float, steps: int, candidates: int, bound: float,
                 chosen: list[str], figures: dict[str, float]) -> None:
    def n(count: int) -> int:
        return max(1, round(count * scale))

    common, rarest = common_and_rarest()
    requests = {title: constraints for name, title, constraints in (
        ("common", f"{common} (most common)", {common: True}), ("rarest", f"{rarest} (rarest)", {rarest: True}),
        ("combination", "Effusion+Atelectasis -Pneumothorax", COMBINATION)) if name in chosen}

    print("## Cost per satisfied image (FPE = forward-pass equivalents)\n")
    margin, rule = LCOOptions().margin, absent_rule(LCOOptions())
    absent = f", a label requested absent by {rule['absent_margin']}" if rule else ""
    print(f"(acceptance rule: every constrained label past its threshold by {margin} logits{absent}: LCO's own)\n")
    print("| request | method | images | satisfied | FPE / satisfied | s / satisfied | FPE vs rejection | time vs rejection |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for title, constraints in requests.items():
        target, mask = vectors(constraints)
        rows = [lco(engine, target, mask, n(32), 1, ratio, steps),
                lco(engine, target, mask, n(32), candidates, ratio, steps)]
        if REJECTION_FIRST:
            sample = SampleRequest(target, mask, 0, LCOOptions(candidates=candidates, steps=steps))
            budget = engine.rejection_budget(sample)
            # Where rejection pays, an image costs about 1/rate forwards: more images for a steadier mean.
            images = n(256) if budget > candidates else n(32)
            rows.append(lco(engine, target, mask, images, candidates, ratio, steps, rejection_first=True))
            rate = engine.acceptance_rate(target, mask, margin, *rule.values())
            print(f"| {title} | (acceptance rate {rate:.4f} under the bundle, rejection budget {budget}) | | | | | | |")
            figures[f"cost {title} acceptance rate"] = rate
        cheapest = min(row.fpe_per_hit for row in rows)
        budget = max(n(20_000), round(bound * cheapest)) if np.isfinite(cheapest) else n(20_000)
        rows.insert(0, rejection(engine, target, mask, want_hits=n(16), budget=budget, margin=margin, rule=rule))
        base = rows[0]
        # No hit in the whole budget: rejection costs at least the budget per hit (a lower bound).
        base_fpe = base.fpe_per_hit if base.hits else base.fpe
        base_seconds = base.seconds_per_hit if base.hits else base.seconds
        at_least = "" if base.hits else ">"
        for row in rows:
            if row.hits:
                fpe, secs = f"{row.fpe_per_hit:.1f}", f"{row.seconds_per_hit:.3g}"
                gains = (f"{at_least}{base_fpe / row.fpe_per_hit:.1f}x | "
                         f"{at_least}{base_seconds / row.seconds_per_hit:.1f}x")
            else:
                fpe, secs, gains = f">{row.fpe:.0f}", f">{row.seconds:.3g}", "- | -"
            if row is base:
                gains = "1.0x | 1.0x"
            method = row.method.split(" (")[0]
            figures[f"cost {title} {method} FPE/satisfied"] = row.fpe_per_hit if row.hits else float("inf")
            figures[f"cost {title} {method} s/satisfied"] = row.seconds_per_hit if row.hits else float("inf")
            figures[f"cost {title} {method} FPE"], figures[f"cost {title} {method} s"] = row.fpe, row.seconds
            print(f"| {title} | {row.method} | {row.images} | {row.hits} | {fpe} | {secs} | {gains} |")
    print("\n('x' columns: how many times cheaper than rejection sampling; '>': rejection found no hit in its"
          " whole budget, so its cost per hit is at least the budget and the ratios are lower bounds)\n")


def one_call_at_a_time(bundle, engine: LCOEngine) -> LCOEngine:
    """An engine like ``engine`` on ``bundle`` (the same networks, or SystemExit) running its graph calls
    one after another, as engines before ``parallel_chunks`` did."""
    if bundle.manifest.version != engine.bundle.manifest.version:
        raise SystemExit(f"--baseline-bundle is version {bundle.manifest.version}, the bundle "
                         f"{engine.bundle.manifest.version}: it must be the same networks")
    serial = {"parallel_chunks": 1} if "parallel_chunks" in inspect.signature(LCOEngine).parameters else {}
    baseline = LCOEngine(bundle, max_batch=engine.max_batch, **serial)
    baseline.warm_up()
    return baseline


def archive_section(engine: LCOEngine, baseline: LCOEngine, images: int, figures: dict[str, float]) -> None:
    """Images/s for the first ``images`` of a ``distribution: nih`` archive job under the engine before
    rejection first (one margin for both sides, every label weighing 1), rejection first with absent
    labels at ``absent_margin`` (where the engine has it) and the job's default LCO options (present
    labels weighing as much as absent ones, where the engine has it); with the bundle's auditor on each
    engine's images, so that speed bought with labels would show."""
    from service.archive.spec import ArchivePlan, ArchiveSpec

    spec = ArchiveSpec(count=images, distribution="nih", seed=0, destination="s3://bench-only/unused")
    plan = ArchivePlan(spec)
    planned = [plan.image(index) for index in range(images)]
    flat = {"balance_sides": False} if BALANCE_SIDES else {}
    one_margin = {"absent_margin": spec.lco.margin} if ABSENT_MARGIN else {}
    engines = {"today's (rejection first off, one call at a time)": {"rejection_first": False, **one_margin, **flat}}
    if ABSENT_MARGIN:
        engines[f"rejection first, absent labels at {spec.lco.absent_margin}"] = flat
    if BALANCE_SIDES:
        engines["the default: also present labels weighing as much as absent ones"] = {}
    verifier = _verifier(engine)
    print(f"## NIH distribution archive ({images} images per engine, labels from the NIH prior as an archive "
          f"job plans them, all 14 constrained, batches of {spec.batch_size})\n")
    judged = (f" | auditor agrees: image / present labels / absent labels ({verifier.auditor.description})"
              if verifier else "")
    print(f"| engine | images/s | s / image | without steps | mean steps | satisfied | vs today{judged} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---:" + (" | ---:" if verifier else "") + " |")
    rates: dict[str, float] = {}
    for name, update in engines.items():
        options = spec.lco.model_copy(update=update)
        samples = [SampleRequest(p.target, p.mask, p.seed, options) for p in planned]
        results = []
        start = time.perf_counter()
        runner = baseline if not rates else engine
        for batch in tqdm([samples[i : i + spec.batch_size] for i in range(0, images, spec.batch_size)],
                          desc=f"  archive, {name}", unit="batch", leave=False):
            results += runner.generate(batch)
        seconds = time.perf_counter() - start
        rates[name] = images / seconds
        without = sum(r.accepted_without_steps for r in results)
        steps = float(np.mean([r.steps for r in results]))
        gain = rates[name] / next(iter(rates.values()))
        verdict = ""
        if verifier:
            image_share, present, absent = _auditor_agreement(verifier, samples, results)
            verdict = f" | {image_share:.0%} / {present:.0%} / {absent:.1%}"
            figures[f"archive nih {name} auditor agrees"] = image_share
        print(f"| {name} | {rates[name]:.4f} | {seconds / images:.2f} | {without}/{images} | {steps:.1f} | "
              f"{sum(r.satisfied for r in results)}/{images} | {gain:.2f}x{verdict} |")
        figures[f"archive nih {name} img/s"] = rates[name]
        figures[f"archive nih {name} accepted without steps"] = without / images
    # What the mix asks for: the share of requests the bundle's generator meets at the rule.
    for name, update in engines.items():
        options = spec.lco.model_copy(update=update)
        reachable = np.array([engine.acceptance_rate(p.target, p.mask, options.margin, *absent_rule(options).values())
                              for p in planned])
        print(f"\n({name}: mean acceptance rate of the mix under the bundle's table {reachable.mean():.3f}; "
              f"{np.mean(reachable == 0):.0%} of the requests never met in the table, so they go to LCO)")
    print()


def _verifier(engine: LCOEngine):
    """The verifier of the bundle's auditor (service/verify.py), or None when the bundle has none or
    this engine predates it."""
    try:
        from service.verify import Verifier
    except ImportError:
        return None
    return Verifier.of_bundle(engine.bundle) if hasattr(engine, "bundle") else None


def _auditor_agreement(verifier, samples: list[SampleRequest], results: list) -> tuple[float, float, float]:
    """Shares in [0, 1]: images the auditor verifies (every constrained label on the requested side), and,
    over all (image, label) pairs, labels requested present it sees and labels requested absent it does not."""
    verdicts = verifier.judge(samples, results)
    seen = np.stack([v.probabilities for v in verdicts]) >= verifier.auditor.thresholds[None, :]
    target = np.stack([s.target for s in samples]) > 0.5
    mask = np.stack([s.mask for s in samples]) > 0.5
    agree = seen == target
    present, absent = mask & target, mask & ~target
    return (float(np.mean([v.verified for v in verdicts])),
            float(agree[present].mean()) if present.any() else float("nan"), float(agree[absent].mean()))


def side_by_side(figures: dict[str, float]) -> None:
    """The run's headline ratios in one place: rejection first + LCO against plain rejection for each
    request of the cost section (passes, seconds; '>' where rejection found no hit, a lower bound), and
    the archive's default engine against today's (images/s). Prints nothing when neither ran."""
    lines = []
    for key, rejection_passes in figures.items():
        if not (key.startswith("cost ") and key.endswith(" rejection FPE/satisfied")):
            continue
        request = key[len("cost "):-len(" rejection FPE/satisfied")]
        rejection_seconds = figures[f"cost {request} rejection s/satisfied"]
        passes, seconds = (figures.get(f"cost {request} rej-first+LCO {unit}/satisfied") for unit in ("FPE", "s"))
        if passes is None:
            continue
        if np.isfinite(rejection_passes):
            described = f"{passes / rejection_passes:.2f}x rejection's passes, {seconds / rejection_seconds:.2f}x its seconds"
        else:
            described = (f"> {figures[f'cost {request} rejection FPE'] / passes:.1f}x cheaper in passes, "
                         f"> {figures[f'cost {request} rejection s'] / seconds:.1f}x in seconds (rejection found no hit)")
        lines.append(f"- {request}: rejection first + LCO costs {described}")
    rates = [value for key, value in figures.items() if key.startswith("archive nih ") and key.endswith(" img/s")]
    if len(rates) > 1:
        lines.append(f"- NIH distribution archive: the default engine makes {rates[-1] / rates[0]:.2f}x the "
                     "images/s of today's")
    if lines:
        print("## Side by side\n\n" + "\n".join(lines) + "\n")


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
