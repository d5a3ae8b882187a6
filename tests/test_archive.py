"""Archive jobs end to end: real LCO engine on a real bundle, real S3 API (moto server on loopback).

The bundle is the `ci` bundle of tests/bundle_fixtures.py: a PGGAN and a classifier trained in this
test session and exported with their ONNX graphs (generator, classifier, LCO step). Jobs run with a
short LCO (``FAST_LCO``) so a few hundred 32² images take seconds on two cores.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.archive import (
    ArchiveConflict,
    ArchiveError,
    ArchiveIncomplete,
    ArchivePlan,
    ArchiveSpec,
    ModelInfo,
    RunOptions,
    merge_archive,
    run_shard,
)
from service.archive.manifest import CSV_KEY, JOB_KEY, MARKER_KEY
from service.labels import LABELS, NO_FINDING, parse_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS
from service.png import decode_png
from service.prior import get_prior
from service.processes import spawn
from service.sinks import LocalSink, S3Sink, sink_from_uri

ROOT = Path(__file__).resolve().parents[1]
QUIET = RunOptions(progress=False, upload_workers=3, max_pending_images=16)
# Short LCO: the archive's labels are its LCO targets whatever the optimiser reaches, so ten steps
# from the better of two candidates exercise every path at a fraction of the default's cost.
FAST_LCO = {"steps": 10, "candidates": 2}
FAST_LCO_ARGS = ["--lco", "steps=10", "--lco", "candidates=2"]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture()
def s3(s3_server, monkeypatch):
    """The shared moto server, with its endpoint and fake credentials in the environment."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def engine_and_model(ci_bundle):
    """The LCO engine and model record of the trained `ci` bundle."""
    from service.archive.cli import load_engine

    return load_engine(str(ci_bundle), max_batch=16)


def make(spec: ArchiveSpec, engine_and_model, sink=None, options: RunOptions = QUIET, **kwargs):
    engine, model = engine_and_model
    return run_shard(spec, engine, model, sink=sink, options=options, **kwargs)


def s3_sink(server, bucket: str, prefix: str, **options) -> S3Sink:
    return S3Sink(bucket, prefix, endpoint_url=server.endpoint_url, region="us-east-1", **options)


def records_of(sink) -> list[dict]:
    records = []
    for key in sink.list("manifests/"):
        records += [json.loads(line) for line in sink.get(key).splitlines() if line.strip()]
    return records


def csv_rows(sink) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(sink.get(CSV_KEY).decode())))


def assert_complete_and_consistent(sink, count: int) -> list[dict]:
    """Exactly ``count`` images, one record each, bytes matching every checksum, CSV agreeing."""
    images = sink.list("images/")
    records = records_of(sink)
    assert len(images) == count and len(set(images)) == count
    assert sorted(r["image"] for r in records) == images, "one record per image, one image per record"
    assert len({r["id"] for r in records}) == count
    for record in records:
        data = sink.get(record["image"])
        assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"]
    rows = csv_rows(sink)
    assert list(rows[0].keys()) == list(DATA_ENTRY_COLUMNS)
    by_index = sorted(records, key=lambda r: r["index"])
    assert [row["Image Index"] for row in rows] == [f"{r['id']}.png" for r in by_index]
    assert [row["Finding Labels"] for row in rows] == [r["finding_labels"] for r in by_index]
    marker = json.loads(sink.get(MARKER_KEY))
    assert marker["images"] == count
    for key, digest in marker["manifests"].items():
        assert hashlib.sha256(sink.get(key)).hexdigest() == digest
    return records


# -- the must-show cases ----------------------------------------------------------------------------
def test_nih_archive_of_200_images_matches_the_prior(s3, engine_and_model):
    bucket = s3.new_bucket()
    sink = s3_sink(s3, bucket, "nih-200")
    spec = ArchiveSpec(count=200, distribution="nih", seed=7, destination=sink.uri(), chunk_size=32, lco=FAST_LCO)
    report = make(spec, engine_and_model, sink)
    assert (report.generated, report.skipped, report.chunks_written) == (200, 0, 7)
    marker = merge_archive(sink, progress=False)
    records = assert_complete_and_consistent(sink, 200)

    # Manifest fields, and the PNGs themselves.
    _, model = engine_and_model
    first = min(records, key=lambda r: r["index"])
    assert first["id"] == "00000001_000" and first["model_version"] == model.version and first["format"] == "png8"
    assert set(first["probabilities"]) == set(LABELS) and isinstance(first["satisfied"], bool)
    assert all(0.0 <= p <= 1.0 for r in records for p in r["probabilities"].values())
    assert len({r["sha256"] for r in records}) == 200, "every seed gives its own picture"
    picture = decode_png(sink.get(first["image"]))
    assert picture.shape == (model.resolution, model.resolution) and picture.std() > 0.01, "a generated image"
    head = s3.client().head_object(Bucket=bucket, Key=f"nih-200/{first['image']}")
    assert head["ContentType"] == "image/png" and head["Metadata"]["sha256"] == first["sha256"]

    # Label frequencies within sampling error (4 standard errors) of the NIH prior's marginals.
    prevalence = get_prior("nih").prevalence()
    counts = marker["label_counts"]
    assert set(counts) == {*LABELS, NO_FINDING}
    for label in (*LABELS, NO_FINDING):
        p = prevalence[label]
        tolerance = 4 * math.sqrt(p * (1 - p) / 200) + 1 / 200
        assert abs(counts[label] / 200 - p) <= tolerance, (label, counts[label], p)
    recount = {label: 0 for label in (*LABELS, NO_FINDING)}
    for record in records:
        vector = parse_finding_labels(record["finding_labels"])
        for i in np.flatnonzero(vector):
            recount[LABELS[i]] += 1
        recount[NO_FINDING] += int(not vector.any())
        assert all(record["requested"][LABELS[i]] == bool(vector[i]) for i in range(len(LABELS)))
    assert recount == counts


def test_three_shards_and_merge_equal_one_run(s3, engine_and_model):
    bucket = s3.new_bucket()
    groups = [{"labels": ["Hernia"], "count": 10}, {"labels": {"Effusion": True, "Mass": False}, "count": 20},
              {"labels": ["No Finding"], "count": 15}, {"labels": ["Nodule", "Mass"], "count": 5, "exclusive": True}]
    # Default LCO batches (16): 50 images are batches 16, 16, 16, 2, and the shards hold 1, 1, 2 of
    # them, so every image is optimised beside the same neighbours as in the single run.
    common = {"distribution": groups, "seed": 3, "chunk_size": 16, "image_format": "png16", "lco": FAST_LCO}
    single = s3_sink(s3, bucket, "single")
    make(ArchiveSpec(destination=single.uri(), **common), engine_and_model, single)
    merge_archive(single, progress=False)

    sharded = s3_sink(s3, bucket, "sharded")
    for shard in (2, 0, 1):  # order does not matter
        spec = ArchiveSpec(destination=sharded.uri(), shard_index=shard, shard_count=3, **common)
        assert spec.batch_size == 16
        report = make(spec, engine_and_model, sharded)
        assert report.images == len(ArchivePlan(spec).shard_range())
    merge_archive(sharded, progress=False)

    assert_complete_and_consistent(sharded, 50)
    assert single.list("images/") == sharded.list("images/")
    for key in single.list("images/"):
        assert single.get(key) == sharded.get(key)
    assert single.get(CSV_KEY) == sharded.get(CSV_KEY)
    in_order = lambda records: sorted(records, key=lambda r: r["index"])
    assert in_order(records_of(single)) == in_order(records_of(sharded))
    finding_counts = {}
    for row in csv_rows(sharded):
        finding_counts[row["Finding Labels"]] = finding_counts.get(row["Finding Labels"], 0) + 1
    assert finding_counts["Hernia"] == 10 and finding_counts["No Finding"] == 15
    assert finding_counts["Mass|Nodule"] == 5


def _cli(*args: str, env: dict[str, str], **popen) -> subprocess.Popen:
    """An archive worker that ends with the test run, should the test not get to stop it."""
    return spawn(
        [sys.executable, "-m", "service.archive", *args],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def test_sigkill_mid_run_then_rerun_gives_exactly_n(s3, ci_bundle):
    bucket = s3.new_bucket()
    dest = f"s3://{bucket}/killed"
    # margin=4 keeps every sample optimising to the step cap: slow enough to be killed mid-run.
    args = ["run", "--bundle", str(ci_bundle), "--count", "240", "--distribution", "balanced", "--seed", "5",
            "--dest", dest, "--chunk-size", "8", "--batch-size", "8", *FAST_LCO_ARGS, "--lco", "margin=4",
            "--no-progress"]
    process = _cli(*args, env=s3.env)
    sink = sink_from_uri(dest, endpoint_url=s3.endpoint_url, region="us-east-1")
    deadline = time.monotonic() + 120
    while len(sink.list("manifests/")) < 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no chunk committed in time"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    committed_before = len(sink.list("manifests/"))
    assert committed_before < 30 and not sink.exists(MARKER_KEY), "killed mid-run"

    rerun = _cli(*args, env=s3.env)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    report = json.loads(out)
    assert report["shard"]["skipped"] >= committed_before * 8, "committed chunks were kept, not redone"
    assert report["shard"]["skipped"] + report["shard"]["generated"] == 240
    assert report["archive"]["images"] == 240
    assert_complete_and_consistent(sink, 240)


def test_s3_outage_fails_clearly_then_resumes(private_s3_server, engine_and_model, monkeypatch):
    for name, value in private_s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = private_s3_server.new_bucket()
    # Short timeouts and few retries so the outage is noticed in seconds, not minutes.
    sink = s3_sink(private_s3_server, bucket, "outage", connect_timeout=1, read_timeout=1, max_attempts=2)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    spec = ArchiveSpec(count=96, distribution="nih", seed=11, destination=sink.uri(), chunk_size=8, lco=FAST_LCO)
    paused = threading.Event()

    def pause_server_at_40(done: int, _total: int) -> None:
        if done >= 40 and not paused.is_set():
            paused.set()
            private_s3_server.pause()

    started = time.monotonic()
    with pytest.raises(ArchiveError) as raised:
        make(spec, engine_and_model, sink, on_progress=pause_server_at_40)
    message = str(raised.value)
    assert message.startswith(f"storage failed: put {sink.uri()}/images/")
    assert "ConnectionError: ReadTimeoutError" in message and "rerun the same command to resume" in message
    assert time.monotonic() - started < 90
    private_s3_server.resume()

    committed = len(sink.list("manifests/"))
    assert 1 <= committed < 12
    report = make(spec, engine_and_model, sink)
    assert report.skipped == committed * 8 and report.skipped + report.generated == 96
    merge_archive(sink, progress=False)
    assert_complete_and_consistent(sink, 96)


def test_merged_csv_read_by_the_nih_reader_gives_the_manifest_label_counts(tmp_path, engine_and_model):
    from training.data.nih import NIHChestXray14

    spec = ArchiveSpec(count=90, distribution="nih", seed=2, destination=str(tmp_path), chunk_size=16, lco=FAST_LCO)
    make(spec, engine_and_model)
    merge_archive(LocalSink(tmp_path), progress=False)
    records = records_of(LocalSink(tmp_path))
    from_manifest = np.zeros(len(LABELS))
    for record in records:
        from_manifest += parse_finding_labels(record["finding_labels"])

    side = engine_and_model[1].resolution
    dataset = NIHChestXray14(tmp_path, split="all", size=side, min_size=side)
    assert len(dataset) == 90
    np.testing.assert_array_equal(dataset.labels.sum(axis=0), from_manifest)
    image, labels, mask = dataset[5]
    assert tuple(image.shape) == (1, side, side) and float(mask.sum()) == len(LABELS)
    first = sorted(records, key=lambda r: r["index"])[5]
    np.testing.assert_array_equal(labels.numpy(), parse_finding_labels(first["finding_labels"]))
    np.testing.assert_allclose(image.numpy()[0], decode_png((tmp_path / first["image"]).read_bytes()), atol=0.02)


# -- resume, repair, refuse -------------------------------------------------------------------------
def test_rerun_of_a_complete_archive_does_nothing(tmp_path, engine_and_model):
    spec = ArchiveSpec(count=20, distribution="balanced", seed=1, destination=str(tmp_path), chunk_size=8, lco=FAST_LCO)
    make(spec, engine_and_model)
    merge_archive(LocalSink(tmp_path), progress=False)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    report = make(spec, engine_and_model)
    assert report.archive_complete and report.generated == 0 and report.skipped == 20
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}


def test_rerun_repairs_a_lost_image_and_a_corrupt_manifest(tmp_path, engine_and_model):
    spec = ArchiveSpec(count=24, distribution="nih", seed=4, destination=str(tmp_path), chunk_size=8, lco=FAST_LCO)
    make(spec, engine_and_model)
    sink = LocalSink(tmp_path)
    original = {key: sink.get(key) for key in sink.list("images/")}
    sink.delete("images/00000003_000.png")  # chunk 0 loses an image
    chunk_2 = sink.list("manifests/")[2]
    sink.put(chunk_2, sink.get(chunk_2)[:50])  # chunk 2 has a truncated manifest
    with pytest.raises(ArchiveIncomplete, match="00000003_000.png is missing"):
        merge_archive(sink, progress=False)
    report = make(spec, engine_and_model)
    assert report.repaired == [sink.list("manifests/")[0], chunk_2]
    assert (report.generated, report.skipped) == (16, 8)
    merge_archive(sink, progress=False)
    assert {key: sink.get(key) for key in sink.list("images/")} == original, "regenerated byte for byte"


def test_merge_refuses_missing_shards_and_foreign_images(tmp_path, engine_and_model):
    spec = ArchiveSpec(count=30, distribution="nih", seed=9, destination=str(tmp_path), shard_count=2, chunk_size=8, lco=FAST_LCO)
    make(spec, engine_and_model)
    sink = LocalSink(tmp_path)
    with pytest.raises(ArchiveIncomplete, match=r"finish shard\(s\) 1 of 2"):
        merge_archive(sink, progress=False)
    assert not sink.exists(MARKER_KEY) and not sink.exists(CSV_KEY)
    make(spec.model_copy(update={"shard_index": 1}), engine_and_model)
    sink.put("images/99999999_000.png", b"not ours")
    with pytest.raises(ArchiveError, match="1 object.*have no manifest record.*99999999_000.png"):
        merge_archive(sink, progress=False)
    sink.delete("images/99999999_000.png")
    assert merge_archive(sink, progress=False)["images"] == 30


def test_a_different_job_in_the_same_destination_is_refused(tmp_path, engine_and_model):
    make(ArchiveSpec(count=8, seed=1, destination=str(tmp_path), lco=FAST_LCO), engine_and_model)
    with pytest.raises(ArchiveConflict, match=r"differs in spec\.seed"):
        make(ArchiveSpec(count=8, seed=2, destination=str(tmp_path), lco=FAST_LCO), engine_and_model)
    engine, model = engine_and_model
    other_model = ModelInfo(model.name, "9.9.9", model.resolution, model.compute_batch)
    with pytest.raises(ArchiveConflict, match=r"model\.version"):
        run_shard(ArchiveSpec(count=8, seed=1, destination=str(tmp_path), lco=FAST_LCO), engine, other_model, options=QUIET)
    assert json.loads(LocalSink(tmp_path).get(JOB_KEY))["spec"]["seed"] == 1


def test_images_do_not_depend_on_the_batch_size_and_the_compute_batch_is_part_of_the_job(tmp_path, ci_bundle,
                                                                                          engine_and_model):
    common = {"count": 8, "distribution": "nih", "seed": 11, "chunk_size": 8, "lco": FAST_LCO}
    images = []
    for batch_size in (8, 2):
        destination = tmp_path / f"batch-{batch_size}"
        make(ArchiveSpec(**common, destination=str(destination), batch_size=batch_size), engine_and_model)
        images.append({p.name: p.read_bytes() for p in (destination / "images").glob("*.png")})
    assert len(images[0]) == 8 and images[0] == images[1]
    from service.bundle import load_bundle
    from service.lco import LCOEngine

    wider = LCOEngine(load_bundle(ci_bundle), max_batch=16, compute_batch=4)
    with pytest.raises(ArchiveConflict, match=r"model\.compute_batch"):
        run_shard(ArchiveSpec(**common, destination=str(tmp_path / "batch-8"), batch_size=8), wider,
                  ModelInfo.from_engine(wider), options=QUIET)


def test_plan_is_deterministic_and_independent_of_sharding():
    one = ArchivePlan(ArchiveSpec(count=1000, distribution="nih", seed=5, destination="/tmp/x"))
    four = [ArchivePlan(ArchiveSpec(count=1000, distribution="nih", seed=5, destination="/tmp/x",
                                    shard_index=i, shard_count=4)) for i in range(4)]
    assert [i for plan in four for i in plan.shard_range()] == list(range(1000))
    for index in (0, 1, 499, 999):
        a, b = one.image(index), four[index // 250].image(index)
        assert a.seed == b.seed and np.array_equal(a.target, b.target) and np.array_equal(a.mask, b.mask)
    assert len({one.image_seed(i) for i in range(1000)}) == 1000
    other_seed = ArchivePlan(ArchiveSpec(count=1000, distribution="nih", seed=6, destination="/tmp/x"))
    assert sum(one.image_seed(i) == other_seed.image_seed(i) for i in range(1000)) == 0
    # Explicit groups: exact counts, spread over the index range rather than in one block.
    groups = ArchivePlan(ArchiveSpec(distribution=[{"labels": ["Hernia"], "count": 25}, {"labels": ["Edema"], "count": 75}],
                                     destination="/tmp/x"))
    hernia = [i for i in range(100) if groups.labels(i)[0][LABELS.index("Hernia")] == 1]
    assert len(hernia) == 25 and 0 < np.mean(hernia) / 100 < 1 and max(hernia) - min(hernia) > 50


def test_an_engine_smaller_than_the_archive_batch_is_refused_before_any_write(tmp_path, ci_bundle):
    from service.archive.cli import load_engine

    engine, model = load_engine(str(ci_bundle), max_batch=8)
    spec = ArchiveSpec(count=16, seed=1, destination=str(tmp_path / "a"), chunk_size=16, lco=FAST_LCO)
    with pytest.raises(ArchiveError, match="batch_size is 16 but the LCO engine runs at most 8"):
        run_shard(spec, engine, model, options=QUIET)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.*"))


@pytest.mark.parametrize(("count", "shards", "chunk_size", "batch_size"), [(50, 3, 16, 16), (1000, 7, 24, 8), (37, 5, 4, 4)])
def test_lco_batches_are_fixed_by_index_whatever_the_sharding(count, shards, chunk_size, batch_size):
    """Each image's LCO batch is the same in every layout: batches of consecutive indices from 0, never
    cut by a shard or chunk boundary."""
    common = {"count": count, "seed": 1, "destination": "/tmp/x", "chunk_size": chunk_size}
    whole = ArchivePlan(ArchiveSpec(**common))
    assert whole.spec.batch_size == batch_size  # the default: the largest divisor of chunk_size up to 16
    expected = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    assert [b for chunk in whole.chunks() for b in whole.batches(chunk)] == expected
    plans = [ArchivePlan(ArchiveSpec(**common, shard_index=i, shard_count=shards)) for i in range(shards)]
    batches = [b for plan in plans for chunk in plan.chunks() for b in plan.batches(chunk)]
    assert batches == expected
    sizes = [len(plan.shard_range()) for plan in plans]
    assert min(sizes) > 0 and max(sizes) - min(sizes) <= 2 * batch_size  # shared out evenly, in whole batches


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"distribution": "nih"}, "count is required"),
        ({"count": 5, "distribution": [{"labels": ["Mass"], "count": 4}]}, "differs from the label groups' total 4"),
        ({"count": 5, "distribution": [{"labels": ["Mass", "Lung Cancer"], "count": 5}]}, "unknown label 'Lung Cancer'"),
        ({"distribution": [{"labels": {"No Finding": True, "Mass": True}, "count": 5}]}, "cannot be combined"),
        ({"distribution": [{"labels": {"Effusion": True, "pleural effusion": False}, "count": 5}]}, "both present"),
        ({"count": 5, "shard_index": 2, "shard_count": 2}, "must be below shard_count"),
        ({"count": 20, "shard_count": 3}, "exceeds the job's 2 LCO batches"),
        ({"count": 20, "batch_size": 16, "chunk_size": 24}, "must be a multiple of batch_size 16"),
        ({"count": 5, "lco": {"stepz": 3}}, "unknown LCO option"),
        ({"count": 5, "lco": {"steps": 100000}}, "less than or equal to 1000"),
        ({"count": 5, "destination": "s3://bucket/../x"}, "'..'"),
        ({"count": 5, "image_format": "jpeg"}, "png8"),
        ({"count": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_specs_say_what_to_fix(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ArchiveSpec(**{"destination": "/tmp/archive", **fields})


def test_cli_bad_input_exits_1_with_a_message(tmp_path, ci_bundle):
    result = subprocess.run(
        [sys.executable, "-m", "service.archive", "run", "--bundle", str(ci_bundle), "--count", "4",
         "--distribution", '[{"labels": ["Tumour"], "count": 4}]', "--dest", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1
    assert "invalid archive spec" in result.stderr and "unknown label 'Tumour'" in result.stderr
    assert "Traceback" not in result.stderr
    merge = subprocess.run([sys.executable, "-m", "service.archive", "merge", "--dest", str(tmp_path / "none")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert merge.returncode == 1 and "holds no archive" in merge.stderr


def test_sigterm_stops_at_the_next_batch_commits_whole_chunks_and_exits_130(s3, ci_bundle):
    bucket = s3.new_bucket()
    dest = f"s3://{bucket}/terminated"
    args = ["run", "--bundle", str(ci_bundle), "--count", "240", "--distribution", "nih", "--seed", "8",
            "--dest", dest, "--chunk-size", "8", "--batch-size", "8", *FAST_LCO_ARGS, "--lco", "margin=4",
            "--no-progress"]
    process = _cli(*args, env=s3.env)
    sink = sink_from_uri(dest, endpoint_url=s3.endpoint_url, region="us-east-1")
    deadline = time.monotonic() + 120
    while not sink.list("manifests/"):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # what Kubernetes sends before evicting a pod
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "cancelled with" in err and "rerun to resume" in err
    committed = sink.list("manifests/")
    records = records_of(sink)
    assert len(records) == 8 * len(committed), "only whole chunks are committed"
    assert all(sink.exists(r["image"]) for r in records)
    rerun = _cli(*args, env=s3.env)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert json.loads(out)["shard"]["skipped"] == len(records)
    assert_complete_and_consistent(sink, 240)


def test_verify_catches_an_image_altered_in_place(tmp_path, engine_and_model):
    spec = ArchiveSpec(count=16, distribution="nih", seed=12, destination=str(tmp_path), chunk_size=8, lco=FAST_LCO)
    make(spec, engine_and_model)
    sink = LocalSink(tmp_path)
    key = "images/00000010_000.png"
    original = sink.get(key)
    sink.put(key, bytes(len(original)))  # same size, other bytes: a listing cannot tell
    with pytest.raises(ArchiveIncomplete, match="00000010_000.png does not match its sha256"):
        merge_archive(sink, verify_images=True, progress=False)
    assert make(spec, engine_and_model).generated == 0, "sizes match: a plain rerun trusts them"
    verified = make(spec, engine_and_model, options=RunOptions(progress=False, verify_existing=True))
    assert verified.generated == 8 and verified.repaired == [sink.list("manifests/")[1]]
    assert sink.get(key) == original
    assert merge_archive(sink, verify_images=True, progress=False)["images"] == 16


class SlowLocalSink(LocalSink):
    """A real directory whose puts take ``delay`` seconds, counting stored images and concurrent puts."""

    def __init__(self, root: Path, delay: float):
        super().__init__(root)
        self.delay = delay
        self.stored = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def put(self, key, data, content_type="application/octet-stream", metadata=None):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return super().put(key, data, content_type, metadata)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.stored += key.startswith("images/")


def test_slow_storage_holds_lco_back_instead_of_queueing_without_bound(tmp_path, engine_and_model):
    # 5 images/s of storage: slower than LCO on the `ci` bundle even on a loaded machine
    sink = SlowLocalSink(tmp_path, delay=0.4)
    options = RunOptions(progress=False, upload_workers=2, max_pending_images=8)
    lags = []
    spec = ArchiveSpec(count=48, distribution="nih", seed=13, destination=str(tmp_path), chunk_size=16, batch_size=4,
                       lco=FAST_LCO)
    make(spec, engine_and_model, sink, options, on_progress=lambda done, _total: lags.append(done - sink.stored))
    # Generated but not yet stored: at most the pending cap plus the batch just made.
    assert max(lags) <= options.max_pending_images + spec.batch_size
    assert max(lags) >= options.max_pending_images, "storage was the bottleneck, so the cap was reached"
    assert sink.most_in_flight <= options.upload_workers
    assert sink.stored == 48 and len(records_of(sink)) == 48


def test_contact_sheet_shows_one_row_per_label_set(tmp_path, engine_and_model):
    from service.archive.contact import write_contact_sheet
    from service.demo import TILE

    groups = [{"labels": ["Hernia"], "count": 3}, {"labels": ["No Finding"], "count": 5}]
    make(ArchiveSpec(distribution=groups, seed=1, destination=str(tmp_path / "a"), chunk_size=4, lco=FAST_LCO), engine_and_model)
    sheet = write_contact_sheet(LocalSink(tmp_path / "a"), tmp_path / "sheet.png", per_row=4)
    from PIL import Image

    with Image.open(sheet) as picture:
        assert picture.mode == "RGB" and 2 * TILE < picture.height < 3 * TILE  # two label sets
        assert picture.width > 4 * TILE


def test_cli_takes_its_shard_from_job_completion_index(tmp_path, ci_bundle):
    """What each pod of the Kubernetes Indexed Job does: the shard comes from JOB_COMPLETION_INDEX."""
    result = subprocess.run(
        [sys.executable, "-m", "service.archive", "run", "--bundle", str(ci_bundle), "--count", "10",
         "--shard-count", "2", "--dest", str(tmp_path), "--chunk-size", "4", *FAST_LCO_ARGS, "--no-progress"],
        cwd=ROOT, env={**os.environ, "JOB_COMPLETION_INDEX": "1"}, capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # LCO batches of 4 (the chunk size): 4 + 4 + 2 images, the first batch for shard 0, two for shard 1.
    assert report["shard"]["shard_index"] == 1 and report["shard"]["generated"] == 6 and "archive" not in report
    assert LocalSink(tmp_path).list("images/") == [f"images/{i:08d}_000.png" for i in range(5, 11)]
