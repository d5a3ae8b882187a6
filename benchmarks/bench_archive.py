"""Archive job throughput with and without upload overlap, and peak memory against archive size.

    python -m benchmarks.bench_archive [--bundle DIR] [--count 400] [--rss-counts 500 5000]
                                       [--lco-steps N] [--candidates K]

S3 is moto's server on loopback (started here), so uploads cost what encoding a PNG and one HTTP PUT
cost on this machine; against a remote bucket, with tens of milliseconds per PUT, overlap matters
more. Without ``--bundle`` the sealed analytic bundle of the test suite is used (real ONNX Runtime
sessions, tiny graphs), which makes LCO cheap and so shows the upload path's share at its largest.

Prints, from one run side by side:
- images/s with uploads in the LCO thread (upload_workers=0) and overlapped (a pool of 4), and the ratio;
- peak RSS of a fresh process making 500 and 5,000 images, and the growth (flat memory: <= 10%).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def analytic_bundle(directory: Path) -> Path:
    """The test suite's analytic bundle, sealed like an exported one."""
    import datetime

    sys.path.insert(0, str(ROOT))
    from service.bundle import seal_manifest, sha256_file
    from service.labels import LABELS
    from tests.test_lco import LATENT, SIDE, build_graphs

    for name, data in build_graphs().items():
        (directory / f"{name}.onnx").write_bytes(data)
    files = {f"{n}.onnx": {"sha256": sha256_file(directory / f"{n}.onnx"), "bytes": (directory / f"{n}.onnx").stat().st_size}
             for n in ("generator", "classifier", "lco_step")}
    document = {
        "schema_version": 1, "name": "analytic", "version": "0.0.1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "labels": list(LABELS), "thresholds": dict.fromkeys(LABELS, 0.5), "resolution": SIDE, "latent_dim": LATENT,
        "embedding_dim": SIDE * SIDE, "opset": 17, "pixel": {"range": [-1.0, 1.0], "channels": 1, "dtype": "float32"},
        "files": files, "provenance": {"dataset": "none", "images_shown": 0, "commit": "bench",
                                       "classifier_dataset": "none", "classifier_arch": "linear", "classifier_auroc": {}},
    }
    (directory / "manifest.json").write_bytes(seal_manifest(document))
    return directory


LCO: dict[str, int] = {}  # LCO options for every run (--lco-steps, --candidates)


def make_archive(bundle: str, dest: str, count: int, workers: int, seed: int = 0, engine_and_model=None) -> float:
    """Seconds to make ``count`` images (one shard, no merge) into ``dest``."""
    from service.archive import ArchiveSpec, RunOptions, run_shard
    from service.archive.cli import load_engine

    engine, model = engine_and_model or load_engine(bundle, max_batch=16)
    spec = ArchiveSpec(count=count, distribution="nih", seed=seed, destination=dest, lco=LCO)
    options = RunOptions(upload_workers=workers, progress=False)
    started = time.perf_counter()
    run_shard(spec, engine, model, options=options)
    return time.perf_counter() - started


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc; elsewhere the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_probe(args: argparse.Namespace) -> None:
    """Child process: load, warm up, then make the archive while sampling RSS every 20 ms.

    The process's lifetime peak (ru_maxrss) is dominated by imports and session creation, so it is
    blind to growth during the run; the sampled peak during the run is what must stay flat.
    """
    import threading

    from service.archive.cli import load_engine

    engine_and_model = load_engine(args.bundle, max_batch=16)
    make_archive(args.bundle, args.dest + "-warm-up", 64, workers=4, engine_and_model=engine_and_model)
    baseline = current_rss_mib()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], current_rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = make_archive(args.bundle, args.dest, args.rss_probe, workers=4, engine_and_model=engine_and_model)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], current_rss_mib())
    print(json.dumps({"count": args.rss_probe, "seconds": seconds, "baseline_rss_mib": baseline,
                      "peak_rss_mib": peak[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", help="bundle directory (default: the analytic test bundle)")
    parser.add_argument("--count", type=int, default=400, help="images per throughput run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rss-counts", type=int, nargs=2, default=[500, 5000])
    parser.add_argument("--lco-steps", type=int, help="cap on LCO steps (default: the engine's)")
    parser.add_argument("--candidates", type=int, help="LCO candidates per image (default: the engine's)")
    parser.add_argument("--rss-probe", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    LCO.update({k: v for k, v in (("steps", args.lco_steps), ("candidates", args.candidates)) if v is not None})
    if args.rss_probe:
        rss_probe(args)
        return

    sys.path.insert(0, str(ROOT))
    from tests.s3_server import MotoS3Server

    work = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    bundle = args.bundle or str(analytic_bundle(work))
    server = MotoS3Server().start()
    import os

    os.environ.update(server.env)
    bucket = server.new_bucket()
    try:
        make_archive(bundle, f"s3://{bucket}/warm-up", 32, workers=4)  # sessions, caches, connections
        rates: dict[str, list[float]] = {"inline": [], "overlapped": []}
        for repeat in range(args.repeats):
            for mode, workers in (("inline", 0), ("overlapped", 4)):
                seconds = make_archive(bundle, f"s3://{bucket}/{mode}-{repeat}", args.count, workers)
                rates[mode].append(args.count / seconds)
        best = {mode: max(values) for mode, values in rates.items()}
        print(f"archive throughput, {args.count} images, S3 = moto on loopback, bundle = {Path(bundle).name}, "
              f"LCO options {LCO or 'defaults'}")
        for mode, rate in best.items():
            print(f"  {mode:<11} {rate:8.1f} images/s   (runs: {', '.join(f'{r:.1f}' for r in rates[mode])})")
        print(f"  overlap speed-up: {best['overlapped'] / best['inline']:.2f}x")

        peaks = {}
        for count in args.rss_counts:
            lco_args = [arg for name, value in LCO.items()
                        for arg in ({"steps": "--lco-steps", "candidates": "--candidates"}[name], str(value))]
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_archive", "--bundle", bundle, "--rss-probe", str(count),
                 "--dest", f"s3://{bucket}/rss-{count}", *lco_args],
                cwd=ROOT, env={**os.environ}, capture_output=True, text=True, check=True,
            )
            peaks[count] = json.loads(result.stdout.strip().splitlines()[-1])
        small, large = (peaks[c]["peak_rss_mib"] for c in args.rss_counts)
        print("RSS of a fresh process making the archive (upload pool of 4), sampled every 20 ms")
        for count in args.rss_counts:
            p = peaks[count]
            print(f"  {count:>6} images: peak {p['peak_rss_mib']:7.1f} MiB during the run, "
                  f"{p['baseline_rss_mib']:7.1f} MiB before it   ({count / p['seconds']:.1f} images/s)")
        print(f"  growth {args.rss_counts[0]} -> {args.rss_counts[1]}: {100 * (large / small - 1):+.1f}% (goal <= +10%)")
        print(json.dumps({"throughput_images_per_s": best, "overlap_ratio": best["overlapped"] / best["inline"],
                          "peak_rss_mib": {str(c): peaks[c]["peak_rss_mib"] for c in args.rss_counts}}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
