"""Archive jobs as BentoML task endpoints on a real `bentoml serve` subprocess, S3 from moto.

The service serves the trained `ci` bundle of tests/bundle_fixtures.py; jobs ask for a short LCO.
"""

from __future__ import annotations

import io
import json
import time

import pydicom
import pytest

from service.labels import LABELS
from service.sinks import S3Sink
from tests.test_archive import FAST_LCO
from tests.test_service_e2e import BentoServer, call, server_env


@pytest.fixture(scope="module")
def server(ci_bundle, s3_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml-archive")
    bento = BentoServer(server_env(ci_bundle, home, s3_server.env), home / "serve.log")
    try:
        yield bento.wait_ready()
    finally:
        bento.stop()


def wait_for(server, task_id: str, timeout: float = 120.0) -> dict:
    """Poll /archive/status until the task leaves in_progress; never longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = call(server, "GET", f"/archive/status?task_id={task_id}")
        assert status == 200, body
        if body["status"] not in ("pending", "in_progress"):
            return body
        time.sleep(0.2)
    pytest.fail(f"task {task_id} still in progress after {timeout:.0f} s")


def submit(server, spec: dict) -> str:
    status, body = call(server, "POST", "/archive/submit", spec)
    assert status == 200, body
    assert body["status"] == "in_progress"
    return body["task_id"]


def test_submit_status_get_round_trip(server, s3_server, ci_bundle):
    bucket = s3_server.new_bucket()
    task_id = submit(server, {"count": 24, "distribution": "balanced", "seed": 1, "chunk_size": 8,
                              "destination": f"s3://{bucket}/task", "lco": FAST_LCO})
    assert wait_for(server, task_id)["status"] == "completed"
    status, result = call(server, "GET", f"/archive/get?task_id={task_id}")
    assert status == 200
    assert (result["images"], result["generated"], result["committed"]) == (24, 24, True)
    assert sum(result["label_counts"].values()) >= 24
    sink = S3Sink(bucket, "task", client=s3_server.client())
    assert len(sink.list("images/")) == 24 and sink.exists("_COMPLETE.json") and sink.exists("Data_Entry.csv")
    manifest = json.loads((ci_bundle / "manifest.json").read_text())
    records = [json.loads(line) for key in sink.list("manifests/") for line in sink.get(key).splitlines() if line]
    assert len(records) == 24 and {r["model_version"] for r in records} == {manifest["version"]}
    status, progress = call(server, "POST", "/archive/progress", {"task_id": task_id})
    assert status == 200 and progress == {"task_id": task_id, "state": "completed", "done": 24, "total": 24,
                                          "destination": f"s3://{bucket}/task", "error": None}


def test_a_failing_task_reports_its_error(server, s3_server):
    task_id = submit(server, {"count": 4, "destination": "s3://no-such-bucket-for-archive/x", "lco": FAST_LCO})
    assert wait_for(server, task_id)["status"] == "failed"
    status, body = call(server, "GET", f"/archive/get?task_id={task_id}")
    assert status == 422
    message = body[0]["error"] if isinstance(body, list) else body["error"]
    assert "NoSuchBucket" in message and "no-such-bucket-for-archive" in message
    progress = call(server, "POST", "/archive/progress", {"task_id": task_id})[1]
    assert progress["state"] == "failed" and "NoSuchBucket" in progress["error"]
    # The service keeps serving.
    assert call(server, "GET", "/readyz")[0] == 200


def test_a_bad_spec_fails_its_task_with_the_validation_message(server):
    # BentoML validates a task's input when the task runs, so the task fails with a 400 and the reason.
    for spec, reason in [
        ({"count": 4, "destination": "s3://bucket-ok/../x"}, "'..'"),
        ({"distribution": [{"labels": ["Tumour"], "count": 2}], "destination": "/tmp/x"}, "unknown label 'Tumour'"),
        ({"count": 4, "destination": "s3://bucket-ok/x", "image_format": "tiff"}, "'png8', 'png16' or 'dicom'"),
        ({"count": 4, "destination": "s3://bucket-ok/x", "pairs": {"findings": ["No Finding"]}},
         "cannot be a pair"),
    ]:
        task_id = submit(server, spec)
        assert wait_for(server, task_id)["status"] == "failed"
        status, body = call(server, "GET", f"/archive/get?task_id={task_id}")
        assert status == 400 and reason in str(body)


def test_a_dicom_job_writes_dcm_files(server, s3_server):
    bucket = s3_server.new_bucket()
    task_id = submit(server, {"count": 4, "seed": 3, "chunk_size": 4, "image_format": "dicom",
                              "destination": f"s3://{bucket}/dicom", "lco": FAST_LCO})
    assert wait_for(server, task_id)["status"] == "completed"
    assert call(server, "GET", f"/archive/get?task_id={task_id}")[1]["committed"]
    sink = S3Sink(bucket, "dicom", client=s3_server.client())
    keys = sink.list("images/")
    assert keys == [f"images/{i:08d}_000.dcm" for i in range(1, 5)]
    studies = {pydicom.dcmread(io.BytesIO(sink.get(key))).StudyInstanceUID for key in keys}
    assert len(studies) == 1
    assert "00000004_000.dcm" in sink.get("Data_Entry.csv").decode()


def test_a_pairs_job_writes_pairs_and_counts_them(server, s3_server):
    bucket = s3_server.new_bucket()
    task_id = submit(server, {"count": 2, "seed": 4, "chunk_size": 2, "destination": f"s3://{bucket}/pairs",
                              "lco": FAST_LCO, "pairs": {"findings": ["Nodule", "Mass"]}})
    assert wait_for(server, task_id)["status"] == "completed"
    result = call(server, "GET", f"/archive/get?task_id={task_id}")[1]
    assert (result["committed"], result["pairs_made"], result["pairs_dropped"]) == (True, 4, 0)
    sink = S3Sink(bucket, "pairs", client=s3_server.client())
    assert sink.list("images/") == [f"images/0000000{i}_00{k}.png" for i in (1, 2) for k in (0, 1, 2)]
    assert len(sink.list("differences/")) == 4
    pairs_csv = sink.get("Pairs.csv").decode().splitlines()
    assert [line.split(",")[:2] for line in pairs_csv[1:]] == [
        ["00000001_001", "Mass"], ["00000001_002", "Nodule"], ["00000002_001", "Mass"], ["00000002_002", "Nodule"]]


def test_local_destinations_are_refused_by_default(server):
    task_id = submit(server, {"count": 4, "destination": "/tmp/somewhere-on-the-server"})
    assert wait_for(server, task_id)["status"] == "failed"
    status, body = call(server, "GET", f"/archive/get?task_id={task_id}")
    assert status == 400 and "s3://bucket/prefix destinations only" in str(body)


def test_stop_ends_a_running_task_and_a_resubmission_resumes(server, s3_server):
    bucket = s3_server.new_bucket()
    # Every finding at once, 4 logits past threshold, is out of this bundle's reach: each sample runs
    # to the 60-step cap, a job slow enough to stop midway.
    spec = {"distribution": [{"labels": list(LABELS), "count": 48}], "seed": 2, "chunk_size": 8, "batch_size": 4,
            "destination": f"s3://{bucket}/stopped", "lco": {"steps": 60, "candidates": 2, "margin": 4.0}}
    task_id = submit(server, spec)
    deadline = time.monotonic() + 60
    while call(server, "POST", "/archive/progress", {"task_id": task_id})[1]["done"] < 16:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, stopping = call(server, "POST", "/archive/stop", {"task_id": task_id})
    assert status == 200 and stopping["state"] == "running"
    assert wait_for(server, task_id)["status"] == "failed"
    status, body = call(server, "GET", f"/archive/get?task_id={task_id}")
    assert status == 409 and "cancelled on request" in str(body)
    done_before = call(server, "POST", "/archive/progress", {"task_id": task_id})[1]["done"]
    assert 16 <= done_before < 48

    resumed = submit(server, spec)
    assert wait_for(server, resumed, timeout=300)["status"] == "completed"
    result = call(server, "GET", f"/archive/get?task_id={resumed}")[1]
    assert result["skipped"] >= 8 and result["skipped"] + result["generated"] == 48 and result["committed"]
