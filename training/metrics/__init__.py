"""Metrics by name, recorded one JSON line per evaluation in `<run>/metric-<name>.jsonl`.

See `training.metrics.registry` for the record and the API, `training.metrics.builtin` for the
metrics: `classifier_auroc` (the classifier trainer reports it after training) and `frechet_distance`
(declared: the export reads it into the bundle's provenance; the evaluation suite computes it).
"""

from training.metrics.registry import (
    Metric,
    MetricResult,
    compute_metric,
    declare_metric,
    get_metric,
    latest_result,
    list_metrics,
    metric_file,
    read_results,
    register_metric,
    report_metric,
)

__all__ = [
    "Metric",
    "MetricResult",
    "compute_metric",
    "declare_metric",
    "get_metric",
    "latest_result",
    "list_metrics",
    "metric_file",
    "read_results",
    "register_metric",
    "report_metric",
]
