"""Metrics by name, and one JSON line per evaluation in the run directory.

After stylegan2-ada-pytorch's metrics/metric_main.py: a metric is registered under a name
(`register_metric`), computed by name (`compute_metric`), and each evaluation is appended by
`report_metric` to `<run>/metric-<name>.jsonl` as one JSON object:

    {"metric": "classifier_auroc", "value": 0.97, "values": {...}, "images_shown": 12032,
     "snapshot": "classifier", "timestamp": 1760000000.0, "protocol": {"split": "test", ...}}

`value` is the headline number (None when undefined), `values` the details (per label, ...),
`snapshot` the weights measured (relative to the run directory when inside it), `protocol` the
settings that make the number comparable (data, split, sample counts, seeds). The files are the
record that later steps read (the export's provenance: `latest_result`).

A metric may be declared before anything in the project computes it (`declare_metric`): its name and
file exist, results can be reported and read, and `register_metric` on that name adds the computation.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modules whose import registers metrics; imported on the first lookup, as training.cli does commands.
METRIC_MODULES: list[str] = ["training.metrics.builtin", "training.evaluate.metrics"]


@dataclass(frozen=True)
class MetricResult:
    """One evaluation of metric `metric`: the headline `value`, details in `values` (JSON-able), and
    the `protocol` (settings) it was measured under."""

    metric: str
    value: float | None
    values: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    name: str
    summary: str  # what it measures, and which way is better
    compute: Callable[..., MetricResult] | None  # None: declared, not computed here yet


_METRICS: dict[str, Metric] = {}
_loaded = False


Compute = Callable[..., MetricResult]


def register_metric(name: str, summary: str) -> Callable[[Compute], Compute]:
    """Decorator: register the function as metric `name` (filling a declared one).

    Raises ValueError when `name` already has a computation.
    """

    def decorate(compute: Compute) -> Compute:
        existing = _METRICS.get(name)
        if existing is not None and existing.compute is not None:
            raise ValueError(f"metric {name!r} is registered twice ({existing.compute.__module__})")
        _METRICS[name] = Metric(name, summary, compute)
        return compute

    return decorate


def declare_metric(name: str, summary: str) -> None:
    """Name a metric whose computation comes later; a registered computation is kept."""
    _METRICS.setdefault(name, Metric(name, summary, None))


def list_metrics() -> list[str]:
    """Every metric name, declared or registered, sorted."""
    _load()
    return sorted(_METRICS)


def get_metric(name: str) -> Metric:
    """The metric called `name`; ValueError listing the known names when there is none."""
    _load()
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; metrics: {', '.join(sorted(_METRICS))}")
    return _METRICS[name]


def compute_metric(name: str, **arguments: Any) -> MetricResult:
    """Evaluate metric `name` with its own keyword arguments.

    Raises ValueError for an unknown name, or a declared metric nothing computes yet.
    """
    metric = get_metric(name)
    if metric.compute is None:
        raise ValueError(f"metric {name!r} is declared ({metric.summary}), but nothing computes it yet")
    return metric.compute(**arguments)


def metric_file(run_dir: str | os.PathLike[str], name: str) -> Path:
    """`<run_dir>/metric-<name>.jsonl` for a known metric (ValueError for an unknown one)."""
    return Path(run_dir) / f"metric-{get_metric(name).name}.jsonl"


def report_metric(
    result: MetricResult,
    run_dir: str | os.PathLike[str],
    *,
    images_shown: int | None,
    snapshot: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Append `result` as one line to its metric file in `run_dir`; returns the line's object.

    images_shown: the training length of the weights measured. snapshot: their file or directory.
    Raises ValueError for a result of an unknown metric or a value JSON cannot hold (NaN, infinity),
    TypeError for one that is not JSON at all; either way nothing is written.
    """
    path = metric_file(run_dir, result.metric)
    line = {
        "metric": result.metric,
        "value": result.value,
        "values": result.values,
        "images_shown": images_shown,
        "snapshot": _relative(snapshot, Path(run_dir)),
        "timestamp": time.time(),
        "protocol": result.protocol,
    }
    text = json.dumps(line, sort_keys=True, allow_nan=False)  # before opening: a bad value writes nothing
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(text + "\n")
    return line


def read_results(run_dir: str | os.PathLike[str], name: str) -> list[dict[str, Any]]:
    """Every recorded evaluation of metric `name` in `run_dir`, oldest first ([] when none).

    A last line cut short (a crash mid-write) is passed over; any other unreadable line raises
    ValueError naming the file and line.
    """
    path = metric_file(run_dir, name)
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")
    results = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            results.append(json.loads(text))
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: the write did not finish
                break
            raise ValueError(f"{path}:{number}: not a JSON object ({error})") from None
    return results


def latest_result(
    run_dir: str | os.PathLike[str], name: str, *, images_shown: int | None = None
) -> dict[str, Any] | None:
    """The last recorded evaluation of `name` in `run_dir` (of the weights at `images_shown` when
    given), or None."""
    results = read_results(run_dir, name)
    if images_shown is not None:
        results = [r for r in results if r.get("images_shown") == images_shown]
    return results[-1] if results else None


def _relative(snapshot: str | os.PathLike[str] | None, run_dir: Path) -> str | None:
    if snapshot is None:
        return None
    try:
        return str(Path(snapshot).resolve().relative_to(run_dir.resolve()))
    except ValueError:  # outside the run directory
        return str(snapshot)


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in METRIC_MODULES:
            importlib.import_module(module)
