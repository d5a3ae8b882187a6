"""The metric registry (training/metrics): metrics by name, one JSON line per evaluation per run, and
the export reading the generator's Fréchet distance from that record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.labels import LABELS, NUM_LABELS
from training.classifier.metrics import mean_auroc, per_label_auroc
from training.export.commands import generator_info
from training.metrics import (
    MetricResult,
    compute_metric,
    declare_metric,
    latest_result,
    list_metrics,
    metric_file,
    read_results,
    register_metric,
    report_metric,
)
from training.metrics import registry as registry_module
from training.metrics.builtin import CLASSIFIER_AUROC, FRECHET_DISTANCE, label_aurocs
from training.runtime import checkpoint_path


def _scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((200, NUM_LABELS)) < 0.3).astype(np.float32)
    return labels * 0.5 + rng.random(labels.shape), labels, np.ones_like(labels)


def test_the_project_metrics_are_registered():
    assert {CLASSIFIER_AUROC, FRECHET_DISTANCE} <= set(list_metrics())


def test_classifier_auroc_is_the_classifiers_own_auroc_with_its_protocol():
    scores, labels, mask = _scores()
    result = compute_metric(CLASSIFIER_AUROC, probabilities=scores, labels=labels, mask=mask, bootstrap=50,
                            seed=3, dataset="phantoms-test")
    direct = per_label_auroc(scores, labels, mask, bootstrap=50, seed=3)
    assert label_aurocs(result) == direct  # the same numbers, bootstrap intervals included
    assert result.value == mean_auroc(direct) and set(result.values) == set(LABELS)
    assert result.protocol == {"split": "test", "dataset": "phantoms-test", "images": 200, "bootstrap": 50,
                               "confidence": 0.95, "seed": 3}


def test_a_reported_result_appends_one_line_to_its_run_file(tmp_path):
    scores, labels, mask = _scores()
    result = compute_metric(CLASSIFIER_AUROC, probabilities=scores, labels=labels, mask=mask, bootstrap=0)
    report_metric(result, tmp_path, images_shown=512, snapshot=tmp_path / "checkpoints" / "c.pt")
    report_metric(result, tmp_path, images_shown=1024, snapshot="/elsewhere/classifier")
    path = tmp_path / "metric-classifier_auroc.jsonl"
    assert metric_file(tmp_path, CLASSIFIER_AUROC) == path
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert set(first) == {"metric", "value", "values", "images_shown", "snapshot", "timestamp", "protocol"}
    assert first["metric"] == CLASSIFIER_AUROC and first["value"] == result.value
    assert first["values"]["Hernia"] == result.values["Hernia"] and first["protocol"] == result.protocol
    assert first["snapshot"] == "checkpoints/c.pt"  # relative inside the run, so the run can move
    assert lines[1]["snapshot"] == "/elsewhere/classifier" and lines[1]["timestamp"] >= first["timestamp"]
    assert read_results(tmp_path, CLASSIFIER_AUROC) == lines
    assert latest_result(tmp_path, CLASSIFIER_AUROC)["images_shown"] == 1024
    assert latest_result(tmp_path, CLASSIFIER_AUROC, images_shown=512) == first
    assert latest_result(tmp_path, CLASSIFIER_AUROC, images_shown=4) is None


def test_an_unknown_metric_is_a_clear_error(tmp_path):
    for call in (lambda: compute_metric("fid50k"), lambda: read_results(tmp_path, "fid50k"),
                 lambda: report_metric(MetricResult("fid50k", 1.0), tmp_path, images_shown=0)):
        with pytest.raises(ValueError, match=r"unknown metric 'fid50k'; metrics: .*classifier_auroc"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_a_declared_metric_records_results_until_something_computes_it(tmp_path, monkeypatch):
    # a name of the test's own: the project's metrics get their computations when their modules load
    monkeypatch.setattr(registry_module, "_METRICS", dict(registry_module._METRICS))  # undone after the test
    name = "declared_in_test"
    declare_metric(name, "a distance nothing computes yet")
    with pytest.raises(ValueError, match=f"'{name}' is declared .* but nothing computes it yet"):
        compute_metric(name)
    assert latest_result(tmp_path, name) is None  # no file yet
    report_metric(MetricResult(name, 1.5), tmp_path, images_shown=10)
    assert latest_result(tmp_path, name)["value"] == 1.5

    @register_metric(name, "filled")
    def distance(value: float) -> MetricResult:
        return MetricResult(name, value, protocol={"features": "test"})

    assert compute_metric(name, value=2.5).value == 2.5
    with pytest.raises(ValueError, match="registered twice"):
        register_metric(name, "again")(distance)


def test_a_record_cut_short_by_a_crash_is_read_up_to_the_cut(tmp_path):
    report_metric(MetricResult(FRECHET_DISTANCE, 3.0), tmp_path, images_shown=10)
    path = metric_file(tmp_path, FRECHET_DISTANCE)
    with open(path, "a") as handle:
        handle.write('{"metric": "frechet_dist')
    assert [r["value"] for r in read_results(tmp_path, FRECHET_DISTANCE)] == [3.0]
    path.write_text('{"broken\n' + path.read_text())
    with pytest.raises(ValueError, match=r"metric-frechet_distance\.jsonl:1: not a JSON object"):
        read_results(tmp_path, FRECHET_DISTANCE)


def test_a_value_json_cannot_hold_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        report_metric(MetricResult(FRECHET_DISTANCE, float("nan")), tmp_path, images_shown=0)
    assert not metric_file(tmp_path, FRECHET_DISTANCE).exists()


def test_the_export_takes_the_frechet_distance_of_the_exported_checkpoint(tmp_path):
    checkpoint = checkpoint_path(tmp_path, 2048)
    state = {"images_shown": 2048, "data": "phantoms",
             "config": {"data": {"phantom_prior": "nih", "phantom_count": 512, "phantom_seed": 0}}}
    unmeasured = generator_info(checkpoint, state)
    assert unmeasured.frechet_distance is None and unmeasured.extra == {}
    protocol = {"features": "inception-v3", "fakes": 50_000}
    report_metric(MetricResult(FRECHET_DISTANCE, 12.5, protocol=protocol), tmp_path, images_shown=2048,
                  snapshot=checkpoint)
    report_metric(MetricResult(FRECHET_DISTANCE, 11.0, protocol=protocol), tmp_path, images_shown=2048,
                  snapshot=checkpoint)
    report_metric(MetricResult(FRECHET_DISTANCE, 9.0), tmp_path, images_shown=4096)  # a later checkpoint's
    info = generator_info(checkpoint, state)
    assert info.frechet_distance == 11.0  # the latest measurement of this checkpoint
    assert info.extra == {"frechet_distance_protocol": protocol}
    assert info.images_shown == 2048 and info.dataset == "phantoms-nih-512-seed0"
    outside = generator_info(tmp_path / "loose.pt", state)  # a checkpoint outside any run directory
    assert outside.frechet_distance is None
