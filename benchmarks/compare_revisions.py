"""Run one benchmark against two revisions of the engine, alternating, and print each figure's ratio.

    python -m benchmarks.compare_revisions --before b9c1bc7 --after HEAD --rounds 2 -- \
        -m benchmarks.bench_lco --bundle models/demo --sections throughput

The benchmark script itself always comes from this checkout; ``service/`` and ``training/`` come from
each revision (``git archive`` into a temporary directory placed first on PYTHONPATH), so the same
measurement code times both engines. The benchmark must accept ``--json PATH`` and write
``{figure: number}`` there (``bench_lco`` does). Rounds alternate before/after so that drifting machine
load hits both alike; the table shows each figure's median and after/before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "training")


def export_revision(revision: str, directory: Path) -> str:
    """The packages of ``revision`` under ``directory``; returns the resolved commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit, *PACKAGES], cwd=ROOT, check=True,
                             capture_output=True).stdout
    directory.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return commit


def run_once(tree: Path, command: list[str], out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT)])}
    subprocess.run([sys.executable, *command, "--json", str(out)], cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_revisions", description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the baseline")
    parser.add_argument("--after", default="WORKTREE", help="git revision, or WORKTREE for this checkout as it is")
    parser.add_argument("--rounds", type=int, default=2, help="alternating before/after runs")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark's python arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark after --, e.g. -- -m benchmarks.bench_lco --sections throughput")
    with tempfile.TemporaryDirectory(prefix="compare-revisions-") as scratch:
        root = Path(scratch)
        trees = {"before": root / "before", "after": ROOT if args.after == "WORKTREE" else root / "after"}
        commits = {"before": export_revision(args.before, trees["before"]),
                   "after": "working tree" if args.after == "WORKTREE" else export_revision(args.after, trees["after"])}
        runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
        for round_index in range(args.rounds):
            for side in ("before", "after"):
                print(f"\n### round {round_index + 1}/{args.rounds}: {side} ({commits[side]})", flush=True)
                runs[side].append(run_once(trees[side], command, root / f"{side}-{round_index}.json"))
    print(f"\n## {' '.join(command)}: after ({commits['after']}) vs before ({commits['before']}), "
          f"median of {args.rounds} alternating rounds\n")
    print("| figure | before | after | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for name in runs["before"][0]:
        if all(name in run for run in runs["after"]):
            before = statistics.median(run[name] for run in runs["before"])
            after = statistics.median(run[name] for run in runs["after"])
            ratio = f"{after / before:.2f}" if before not in (0, float("inf")) else "-"
            print(f"| {name} | {before:.4g} | {after:.4g} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
