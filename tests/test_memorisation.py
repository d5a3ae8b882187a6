"""The memorisation audit and the near-copy filter (service/nearcopy.py, training/evaluate/memorisation.py).

Real x-rays: tests/data/nih-sample-64 (60 NIH ChestX-ray14 images at 64², one patient each). The
embedding is the `ci` bundle's classifier (tests/bundle_fixtures.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.archive import ArchiveSpec, RunOptions, merge_archive, run_shard
from service.archive.manifest import MARKER_KEY
from service.archive.runner import ArchiveError
from service.lco import LCOOptions, SampleRequest
from service.nearcopy import (
    NearCopyFilter,
    NearCopyIndex,
    NearCopyIndexError,
    embed_images,
    thumbnails,
    zncc_over_shifts,
)
from service.png import decode_png
from service.sinks import LocalSink
from training.evaluate.memorisation import (
    ImageSet,
    jpeg_round_trip,
    load_images,
    main,
    planted_copy_check,
    shifted,
)

NIH_64 = Path(__file__).parent / "data" / "nih-sample-64"
FAST_LCO = LCOOptions(steps=0, candidates=1)


@pytest.fixture(scope="module")
def real_images() -> ImageSet:
    return load_images(f"nih:{NIH_64}", 64, progress=False)


def test_zncc_is_blind_to_shift_brightness_contrast_and_jpeg_but_not_to_another_patient(real_images):
    image, other = real_images.images[0], real_images.images[1]
    disguised = [shifted(image, 3, -4), np.clip(image * 0.8 + 0.15, -1, 1), jpeg_round_trip(image)]
    scores = zncc_over_shifts(image, np.stack(disguised + [other]), max_shift=4)
    assert np.all(scores[:3] > 0.97), scores
    assert scores[3] < scores[:3].min() - 0.03, scores


@pytest.fixture(scope="module")
def planted_audit(ci_bundle, real_images):
    """Calibrated on 15 patients, then 12 planted copies of each kind of 30 training patients' images
    mixed with 15 other patients' images."""
    from service.bundle import load_bundle

    rows = np.arange(len(real_images))  # one patient per image: rows split patients
    train, calibration, heldout = (real_images.subset(rows[part]) for part in (slice(0, 30), slice(30, 45),
                                                                               slice(45, 60)))
    return planted_copy_check(load_bundle(ci_bundle), train, calibration, heldout, copies_per_kind=12,
                              progress=False, false_positive_rate=0.0)


def test_planted_copies_are_caught_and_held_out_patients_are_not(planted_audit):
    planted = planted_audit.planted
    print(f"planted copies caught {planted['catch_rate']:.1%} of {planted['copies']}; held-out real flagged "
          f"{planted['heldout_flag_rate']:.1%} of {planted['heldout_images']}")
    assert planted["copies"] == 60 and planted["heldout_images"] == 15
    assert planted["catch_rate"] >= 0.95, planted
    assert planted["heldout_flagged"] <= 1, planted
    summary = json.loads(json.dumps(planted_audit.to_dict()))
    assert summary["near_copies"] == planted["caught"] + planted["heldout_flagged"]
    assert summary["training_images"] == 30 and summary["reference_images"] == 15
    assert summary["reference_flag_rate"] == 1 / 15  # false_positive_rate 0: the threshold is their maximum
    assert summary["closest_pairs"][0]["similarity"] >= summary["threshold"]


def test_audit_pictures_are_written(planted_audit, tmp_path):
    pairs = planted_audit.write_closest_pairs_png(tmp_path / "pairs.png", count=4)
    histogram = planted_audit.write_distribution_png(tmp_path / "distances.png")
    for path in (pairs, histogram):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_the_written_audit_is_a_section_the_evaluation_report_takes(planted_audit, tmp_path):
    from training.evaluate.commands import read_section
    from training.evaluate.memorisation import _write_report

    _write_report(planted_audit, tmp_path / "audit")
    section = read_section(tmp_path / "audit" / "section.json")
    assert section.title == "Memorisation audit" and len(section.pictures) == 2
    assert all(picture.is_file() for picture in section.pictures)
    assert section.summary == json.loads((tmp_path / "audit" / "memorisation.json").read_text())


def test_index_file_round_trip_and_refusals(ci_bundle, real_images, tmp_path):
    from service.bundle import load_bundle

    bundle = load_bundle(ci_bundle)
    sha = bundle.manifest.files["classifier.onnx"].sha256
    images = real_images.images[:8]
    index = NearCopyIndex.build(embed_images(bundle, images), images, real_images.names[:8], threshold=0.99,
                                classifier_sha256=sha)
    path = index.save(tmp_path / "index.npz")
    loaded = NearCopyIndex.load(path, sha)
    assert loaded.sha256 and len(loaded) == 8 and loaded.threshold == 0.99
    assert np.array_equal(loaded.thumbs, index.thumbs) and list(loaded.names) == real_images.names[:8]
    assert list(loaded.match(embed_images(bundle, images), images).near_copy) == [True] * 8
    with pytest.raises(NearCopyIndexError, match="rebuild the index with this bundle"):
        NearCopyIndex.load(path, "0" * 64)
    (tmp_path / "bad.npz").write_bytes(b"not an index")
    with pytest.raises(NearCopyIndexError, match="is not a near-copy index"):
        NearCopyIndex.load(tmp_path / "bad.npz")
    with pytest.raises(NearCopyIndexError, match="multiple of 64"):
        thumbnails(np.zeros((1, 48, 48)), 64)


def test_cli_refuses_an_existing_report_directory_with_one_line(ci_bundle, tmp_path, capsys):
    status = main(["planted", "--bundle", str(ci_bundle), "--data", f"nih:{NIH_64}", "--size", "64",
                   "--out", str(tmp_path), "--no-progress"])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "exists" in error and "\n" not in error


def test_archive_filter_drops_planted_copies_and_reports_the_count(ci_bundle, tmp_path):
    """The index holds the images the generator itself makes for three of the archive's seeds, so those
    three are copies: each is replaced by its next seed, and the count lands in the report and
    _COMPLETE.json; a rerun elsewhere gives the same bytes."""
    from service.archive.cli import load_engine

    engine, model = load_engine(str(ci_bundle), max_batch=16)
    spec = ArchiveSpec(count=16, distribution="balanced", seed=3, destination=str(tmp_path / "a"), chunk_size=8,
                       lco=FAST_LCO, drop_near_copies=True)
    from service.archive.spec import ArchivePlan

    plan = ArchivePlan(spec)
    planted = [1, 6, 12]
    made = engine.generate([SampleRequest(plan.image(i).target, plan.image(i).mask, plan.image(i).seed, FAST_LCO)
                            for i in range(spec.count)])
    images = np.stack([result.image for result in made])
    embeddings = np.concatenate([embed_images(engine.bundle, image[None]) for image in images])
    index = NearCopyIndex.build(embeddings[planted], images[planted], [f"seed {i}" for i in planted],
                                threshold=0.0, classifier_sha256=engine.bundle.manifest.files["classifier.onnx"].sha256)
    # the threshold between the planted images (1.0) and the closest of the others
    others = [i for i in range(spec.count) if i not in planted]
    closest_other = index.match(embeddings[others], images[others]).similarity.max()
    assert closest_other < 0.999, "the ci generator drew two seeds alike; pick other planted indices"
    path = index.with_threshold((1.0 + closest_other) / 2).save(tmp_path / "index.npz")
    near_copies = NearCopyFilter.open(engine.bundle, path)

    quiet = RunOptions(progress=False, upload_workers=0)
    report = run_shard(spec, engine, model, options=quiet, near_copies=near_copies)
    assert report.near_copies_dropped == len(planted) and report.generated == spec.count
    sink = LocalSink(tmp_path / "a")
    marker = merge_archive(sink, progress=False)
    assert marker["images"] == spec.count and marker["near_copies_dropped"] == len(planted)
    assert json.loads(sink.get(MARKER_KEY))["near_copies_dropped"] == len(planted)
    records = {r["index"]: r for key in sink.list("manifests/") for r in map(json.loads, sink.get(key).splitlines())}
    for i in range(spec.count):
        replaced = i in planted
        assert records[i]["near_copies_dropped"] == int(replaced)
        assert (records[i]["seed"] != plan.image(i).seed) == replaced
    stored = np.stack([decode_png(sink.get(f"images/{records[i]['id']}.png")) for i in planted])
    assert not near_copies.near_copies(stored).any()

    again = run_shard(spec.model_copy(update={"destination": str(tmp_path / "b")}), engine, model, options=quiet,
                      near_copies=near_copies)
    assert again.near_copies_dropped == len(planted)
    assert all((tmp_path / "a" / "images" / p.name).read_bytes() == p.read_bytes()
               for p in (tmp_path / "b" / "images").iterdir())

    with pytest.raises(ArchiveError, match="near-copy index"):
        run_shard(spec.model_copy(update={"destination": str(tmp_path / "c")}), engine, model, options=quiet)


def test_generate_drops_near_copies_counts_them_and_exports_the_metric(ci_bundle, tmp_path_factory):
    """Over HTTP: the index holds the images the service makes for two of a request's seeds; with
    drop_near_copies those two come back from their retry seeds, counted in the response and /metrics."""
    from service.archive.cli import load_engine
    from service.schemas import resolve_labels
    from tests.test_service_e2e import BentoServer, call, server_env

    engine, _ = load_engine(str(ci_bundle), max_batch=16)
    spec, base = resolve_labels(["Effusion"], False), 1234
    made = engine.generate([SampleRequest(spec.target, spec.mask, base + i, FAST_LCO) for i in range(4)])
    images = np.stack([result.image for result in made])
    planted = [1, 3]
    index = NearCopyIndex.build(
        np.concatenate([embed_images(engine.bundle, images[i][None]) for i in planted]), images[planted],
        [f"seed {base + i}" for i in planted], threshold=0.999,
        classifier_sha256=engine.bundle.manifest.files["classifier.onnx"].sha256)
    home = tmp_path_factory.mktemp("bentoml-near-copies")
    index_path = index.save(home / "index.npz")
    server = BentoServer(server_env(ci_bundle, home, {"CXRSYNTH_NEAR_COPY_INDEX": str(index_path)}), home / "serve.log")
    try:
        server.wait_ready()
        body = {"labels": ["Effusion"], "count": 4, "seed": base, "lco": {"steps": 0, "candidates": 1}}
        status, plain = call(server, "POST", "/generate", body)
        assert status == 200 and plain["near_copies_dropped"] == 0
        assert [image["seed"] for image in plain["images"]] == [base + i for i in range(4)]
        status, filtered = call(server, "POST", "/generate", {**body, "drop_near_copies": True})
        assert status == 200, filtered
        assert filtered["near_copies_dropped"] == len(planted) and len(filtered["images"]) == 4
        for i, image in enumerate(filtered["images"]):
            assert (image["seed"] != base + i) == (i in planted) and image["attempts"] == 1 + (i in planted)
        _, metrics = call(server, "GET", "/metrics")
        dropped = [line for line in metrics.splitlines()
                   if line.startswith('cxrsynth_near_copies_dropped_total{source="generate"}')]
        assert dropped and float(dropped[0].split()[-1]) == len(planted)
    finally:
        server.stop()


def test_a_request_to_drop_near_copies_without_an_index_says_what_to_set():
    from pydantic import ValidationError

    from service.schemas import GenerateRequest

    assert GenerateRequest.model_validate({"labels": ["Effusion"]}).drop_near_copies is False
    with pytest.raises(ValidationError, match="CXRSYNTH_NEAR_COPY_INDEX"):
        GenerateRequest.model_validate({"labels": ["Effusion"], "drop_near_copies": True})
    schema = GenerateRequest.model_json_schema()["properties"]["drop_near_copies"]
    assert schema["enum"] == [False]  # the OpenAPI document states it too
