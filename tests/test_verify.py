"""The auditor in the bundle and `verify`: loading, checksums, verdicts recomputed with torch, derived
seeds, archives that keep only verified images, and the request path over HTTP.

The bundle is `ci` exported with `auditor-ci` (tests/bundle_fixtures.py: ``ci_auditor_bundle``), a
weak 32² auditor, so it rejects enough LCO images at few steps for retries and the bound to happen.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from service.archive.manifest import MARKER_KEY
from service.archive.runner import RunOptions, run_shard
from service.archive.spec import ArchiveSpec
from service.auditor import Auditor
from service.bundle import AUDITOR_FILE, MANIFEST_NAME, BundleError, load_bundle, seal_manifest, verify_bundle
from service.lco import LCOEngine, LCOOptions, SampleRequest
from service.schemas import resolve_labels
from service.sinks import LocalSink
from service.verify import Verifier, generate_accepted, retry_seed
from tests.bundle_fixtures import copy_bundle
from tests.test_service_e2e import BentoServer, call, server_env

FEW_STEPS = LCOOptions(steps=8, candidates=4)  # weak images: the auditor rejects some of them
QUIET = RunOptions(upload_workers=0, progress=False)


@pytest.fixture(scope="module")
def engine(ci_auditor_bundle) -> LCOEngine:
    return LCOEngine(load_bundle(ci_auditor_bundle), FEW_STEPS, max_batch=8)


def samples_for(findings: list[str], per_finding: int, seed: int = 500) -> list[SampleRequest]:
    samples = []
    for number, finding in enumerate(findings):
        spec = resolve_labels([finding], exclusive=False)
        samples += [SampleRequest(spec.target, spec.mask, seed + 100 * number + i, FEW_STEPS) for i in range(per_finding)]
    return samples


def test_a_bundle_with_an_auditor_loads_and_one_without_still_does(ci_bundle, ci_auditor_bundle, ci_auditor):
    from training.classifier.artifact import TrainedClassifier

    plain = load_bundle(ci_bundle)
    assert not plain.has_auditor and plain.manifest.auditor is None and Auditor.of_bundle(plain) is None
    audited = load_bundle(ci_auditor_bundle)
    manifest = audited.manifest
    assert audited.has_auditor and AUDITOR_FILE in manifest.files
    trained = TrainedClassifier.load(ci_auditor)
    assert manifest.auditor.preset == "auditor-ci" and manifest.auditor.seed == trained.seed != 0
    np.testing.assert_allclose(manifest.auditor.threshold_array, trained.thresholds, rtol=1e-6)
    assert manifest.auditor.threshold_array.tolist() != manifest.threshold_array.tolist()


def test_a_tampered_auditor_refuses_to_load_naming_the_file(ci_auditor_bundle, tmp_path):
    bundle = copy_bundle(ci_auditor_bundle, tmp_path / "tampered")
    graph = bundle / AUDITOR_FILE
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{AUDITOR_FILE}: checksum mismatch"):
        load_bundle(bundle)


def test_an_auditor_file_without_its_manifest_section_is_refused(ci_auditor_bundle, tmp_path):
    bundle = copy_bundle(ci_auditor_bundle, tmp_path / "half")
    document = json.loads((bundle / MANIFEST_NAME).read_text())
    document.pop("manifest_sha256")
    document.pop("auditor")
    with pytest.raises(ValueError, match="an auditor section and a files entry for auditor.onnx go together"):
        seal_manifest(document)
    (bundle / AUDITOR_FILE).unlink()
    with pytest.raises(BundleError, match=rf"{AUDITOR_FILE}: missing from the bundle"):
        verify_bundle(bundle)


def test_verified_images_are_ones_the_auditor_agrees_with_and_derived_seeds_reproduce_them(engine, ci_auditor):
    """The service's verdicts (ONNX Runtime, one image per call) recomputed with the torch auditor; an
    image made on a retry is the image its derived seed makes alone; the bound keeps the last attempt."""
    from training.classifier.artifact import TrainedClassifier
    from training.evaluate.labels import auditor_probabilities, met

    verifier = Verifier.of_bundle(engine.bundle)
    samples = samples_for(["Cardiomegaly", "Effusion", "Pneumothorax"], 3)
    accepted = generate_accepted(engine.generate, samples, verifier=verifier, verify_retries=2)
    torch_auditor = TrainedClassifier.load(ci_auditor)
    images = np.stack([a.result.image for a in accepted])
    reference = auditor_probabilities(torch_auditor, images[:, None])
    for sample, item, probabilities in zip(samples, accepted, reference):
        np.testing.assert_allclose(item.verdict.probabilities, probabilities, atol=1e-3)
        agrees = met(probabilities[None], torch_auditor.thresholds, sample.target, sample.mask)[0]
        assert item.verified == agrees
        assert item.attempts == 1 or item.result.seed == retry_seed(sample.seed, item.attempts - 1)
        assert item.verified or item.attempts == 3, "an unverified image is one that used up its retries"
    onnx_auditor = Auditor.of_bundle(engine.bundle)  # as bench_lco_quality --auditor BUNDLE reads it
    np.testing.assert_allclose(auditor_probabilities(onnx_auditor, images[:, None]), reference, atol=1e-3)
    retried = [(s, a) for s, a in zip(samples, accepted) if a.attempts > 1]
    assert retried, "the ci auditor should reject some of these weak images"
    sample, item = retried[0]
    again = engine.generate([SampleRequest(sample.target, sample.mask, item.result.seed, FEW_STEPS)])[0]
    assert np.array_equal(again.image, item.result.image)
    assert item.total_steps >= item.first.steps + item.result.steps
    # verify_retries=0: the first image comes back as it is, with the auditor's (possibly failing) verdict
    bounded = generate_accepted(engine.generate, [sample], verifier=verifier, verify_retries=0)[0]
    assert bounded.attempts == 1 and bounded.verified is False
    assert np.array_equal(bounded.result.image, item.first.image)


def test_an_archive_keeps_only_verified_images_counts_retries_and_reruns_byte_identically(engine, tmp_path):
    from service.archive.runner import ModelInfo

    model = ModelInfo.from_engine(engine)
    groups = [{"labels": ["Mass"], "count": 4}, {"labels": ["Infiltration"], "count": 4}]
    reports, sinks = [], []
    for run in ("a", "b"):
        spec = ArchiveSpec(distribution=groups, seed=3, destination=str(tmp_path / run), chunk_size=4,
                           lco=FEW_STEPS, verify_retries=1)
        reports.append(run_shard(spec, engine, model, options=QUIET))
        sinks.append(LocalSink(str(tmp_path / run)))
    from service.archive.merge import merge_archive

    markers = [merge_archive(sink, progress=False) for sink in sinks]
    a, b = tmp_path / "a", tmp_path / "b"
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files_a:
        if str(name) != MARKER_KEY:  # the marker carries its completion time
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    records = [json.loads(line) for chunk in sorted((a / "manifests").rglob("*.jsonl"))
               for line in chunk.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(8))
    kept = [r for r in records if "dropped" not in r]
    dropped = [r for r in records if "dropped" in r]
    assert all(r["verified"] and r["attempts"] == 1 + r["verify_retries"] for r in kept)
    assert all(r["attempts"] == 2 and not r["verified"] for r in dropped)
    assert sorted(p.name for p in (a / "images").iterdir()) == sorted(Path(r["image"]).name for r in kept)
    verification = markers[0]["verification"]
    assert verification == {"retries": sum(r["verify_retries"] for r in records), "unverified_dropped": len(dropped)}
    assert verification["retries"] > 0 and kept, "the ci auditor rejects some of these weak images, not all"
    assert markers[0]["images"] == len(kept) == reports[0].verified
    assert json.loads((a / "job.json").read_text())["verify"] == {"retries": 1}
    # each kept image's auditor probabilities are the service's verdict on that very PNG's source image
    thresholds = engine.bundle.manifest.auditor.thresholds
    for record in kept:
        for label, wanted in record["requested"].items():
            assert (record["auditor_probabilities"][label] >= thresholds[label]) == wanted


def test_verify_on_a_bundle_without_an_auditor_is_refused(ci_bundle, tmp_path):
    from service.archive.cli import load_engine
    from service.archive.manifest import ArchiveError

    engine, model = load_engine(str(ci_bundle), max_batch=4)
    spec = ArchiveSpec(count=4, destination=str(tmp_path / "x"), verify=True, chunk_size=4)
    with pytest.raises(ArchiveError, match="verify: the bundle has no auditor"):
        run_shard(spec, engine, model, options=QUIET)
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@pytest.fixture(scope="module")
def audited_server(ci_auditor_bundle, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml-audited")
    bento = BentoServer(server_env(ci_auditor_bundle, home, {}), home / "serve.log")
    try:
        yield bento.wait_ready()
    finally:
        bento.stop()


def test_generate_verifies_by_default_and_a_retried_image_is_its_derived_seed(audited_server):
    status, model = call(audited_server, "GET", "/model")
    assert status == 200 and model["verify_default"] and model["auditor"]["preset"] == "auditor-ci"
    thresholds = model["auditor"]["thresholds"]
    # rejection first off: weak images made by a few LCO steps, some of which the auditor rejects
    body = {"labels": ["Pneumothorax"], "count": 4, "seed": 77, "lco": {"steps": 8, "candidates": 4, "rejection_first": False},
            "verify_retries": 2}
    status, first = call(audited_server, "POST", "/generate", body)
    assert status == 200, first
    status, second = call(audited_server, "POST", "/generate", body)
    assert [i["data"] for i in first["images"]] == [i["data"] for i in second["images"]]
    for image in first["images"]:  # every returned image is one the auditor agrees with
        assert image["verified"] is True
        assert image["auditor_probabilities"]["Pneumothorax"] >= thresholds["Pneumothorax"]
    for withheld in first["withheld"]:  # rejected through both retries: described, not returned
        assert withheld["attempts"] == 3 and "data" not in withheld
        assert withheld["auditor_probabilities"]["Pneumothorax"] < thresholds["Pneumothorax"]
    assert first["verified"] == len(first["images"])
    assert sorted(i["index"] for i in first["images"] + first["withheld"]) == [0, 1, 2, 3]
    retried = [image for image in first["images"] if image["attempts"] > 1]
    assert retried, "the ci auditor should reject some of these weak images"
    alone = {**body, "count": 1, "seed": retried[0]["seed"], "verify": False}
    status, remade = call(audited_server, "POST", "/generate", alone)
    assert status == 200 and remade["verified"] is None and remade["images"][0]["verified"] is None
    assert base64.b64decode(remade["images"][0]["data"]) == base64.b64decode(retried[0]["data"])
    # no retries: the images rejected at their first attempt are the ones withheld
    status, unretried = call(audited_server, "POST", "/generate", {**body, "verify_retries": 0})
    assert status == 200 and unretried["withheld"], "the retried images above were rejected at their first attempt"
    first_attempts = {image["index"] for image in first["images"] + first["withheld"] if image["attempts"] > 1}
    assert {w["index"] for w in unretried["withheld"]} == first_attempts
    assert all(w["attempts"] == 1 and w["seed"] == 77 + w["index"] for w in unretried["withheld"])
    assert unretried["verified"] == len(unretried["images"]) == 4 - len(first_attempts)
    status, metrics = call(audited_server, "GET", "/metrics")
    rejections = [line for line in metrics.splitlines() if line.startswith("cxrsynth_verifications_total{")
                  and 'finding="Pneumothorax"' in line and 'verified="false"' in line and 'source="generate"' in line]
    assert rejections and float(rejections[0].split()[-1]) >= len(retried)


def test_bench_verify_writes_the_table_and_chart_per_request(ci_auditor_bundle, ci_auditor, tmp_path):
    """Smoke run of benchmarks/bench_verify.py at one image per request and few LCO steps (the bundle's
    own auditor standing in as the second one, so verified images must agree with it)."""
    from benchmarks.bench_verify import main
    from training.evaluate.labels import default_requests

    out = tmp_path / "verify.md"
    assert main(["--bundle", str(ci_auditor_bundle), "--second-auditor", str(ci_auditor), "--images", "1",
                 "--steps", "8", "--candidates", "4", "--verify-retries", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [title for title, _ in default_requests()]
    for row in rows:
        cells = row.split(" | ")
        if cells[5].startswith("0/"):  # every image returned: the same auditor in torch agrees
            assert cells[7].startswith("100%"), row
    assert out.with_suffix(".png").stat().st_size > 10_000
