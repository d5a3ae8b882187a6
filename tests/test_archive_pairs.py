"""Counterfactual pairs in archive jobs (service/archive/pairs.py): files, Pairs.csv, reruns, bad specs.

The bundle is `ci` with the weak `auditor-ci` as its auditor (tests/bundle_fixtures.py): the main
archive runs with `verify` off, so every pair is kept and every auditor column filled, and one with it
on drops the pairs the auditor does not verify; the S3 run uses the plain `ci` bundle through the
command line. LCO is short (tests/test_archive.py's FAST_LCO).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.archive import ArchiveSpec, merge_archive, run_shard
from service.archive.manifest import CSV_KEY, MARKER_KEY, PAIRS_CSV_KEY
from service.archive.pairs import PAIR_COLUMNS
from service.auditor import Auditor
from service.bundle import load_bundle
from service.counterfactual import DEFAULT_IMAGE_PULL, DEFAULT_PULL, edit_sample, plan_edit
from service.labels import LABEL_INDEX, parse_finding_labels
from service.lco import LCOEngine, LCOOptions, SampleRequest, satisfied
from service.png import decode_png, encode_png
from service.sinks import LocalSink, S3Sink
from tests.test_archive import FAST_LCO, FAST_LCO_ARGS, QUIET, ROOT, _cli

FINDINGS = ["Nodule", "Effusion"]  # kept in LABELS order: Effusion is follow-up 1, Nodule follow-up 2
COUNT = 4


def pairs_spec(destination: Path | str, **fields) -> ArchiveSpec:
    return ArchiveSpec(**{"count": COUNT, "distribution": "nih", "seed": 21, "destination": str(destination),
                          "chunk_size": 2, "lco": FAST_LCO, "verify": False,
                          "pairs": {"findings": FINDINGS}, **fields})


def records_of(root: Path) -> list[dict]:
    return [json.loads(line) for chunk in sorted((root / "manifests").rglob("*.jsonl"))
            for line in chunk.read_text().splitlines()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def files_of(root: Path) -> dict[str, bytes]:
    """Every file of an archive but the commit marker (it carries its completion time)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MARKER_KEY}


@pytest.fixture(scope="module")
def engine(ci_auditor_bundle) -> LCOEngine:
    return LCOEngine(load_bundle(ci_auditor_bundle), LCOOptions(), max_batch=16)


@pytest.fixture(scope="module")
def archive(engine, tmp_path_factory):
    """One pairs archive, merged: (root, shard report, marker)."""
    from service.archive.runner import ModelInfo

    root = tmp_path_factory.mktemp("pairs") / "a"
    report = run_shard(pairs_spec(root), engine, ModelInfo.from_engine(engine), options=QUIET)
    return root, report, merge_archive(LocalSink(root), progress=False)


def test_every_pair_is_two_decodable_images_side_by_side_with_its_difference_map(archive):
    root = archive[0]
    records = records_of(root)
    assert [r["index"] for r in records] == list(range(COUNT))
    kept = [(r, p) for r in records if "dropped" not in r for p in r["pairs"] if "dropped" not in p]
    assert kept, "the ci edits reach some findings"
    for reference, pair in kept:
        assert pair["image"] == reference["image"].replace("_000.png", f"_{pair['follow_up']:03d}.png")
        assert pair["difference"] == f"differences/{pair['pair_id']}.png"
        before, after = (decode_png((root / key).read_bytes()) for key in (reference["image"], pair["image"]))
        assert before.shape == after.shape == (32, 32)
        with Image.open(root / pair["difference"]) as difference:
            assert difference.mode == "RGB" and difference.size == (32, 32)
        for key, size, digest in [(pair["image"], pair["bytes"], pair["sha256"]),
                                  (pair["difference"], pair["difference_bytes"], pair["difference_sha256"])]:
            data = (root / key).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest)
        # the reference lacks the finding and the counterfactual asks for it, the other constraints unchanged
        finding = LABEL_INDEX[pair["finding"]]
        labels_before, labels_after = (parse_finding_labels(x["finding_labels"]) for x in (reference, pair))
        assert labels_before[finding] == 0 and labels_after[finding] == 1
        assert np.array_equal(np.delete(labels_before, finding), np.delete(labels_after, finding))
        assert pair["requested"] == {**reference["requested"], pair["finding"]: True}
    # nothing stored that no record names, nothing named that is not stored
    named = {key for r, p in kept for key in (r["image"], p["image"], p["difference"])}
    named |= {r["image"] for r in records if "dropped" not in r}
    stored = {str(p.relative_to(root)) for folder in ("images", "differences") for p in (root / folder).iterdir()}
    assert stored == named


def test_pair_manifest_and_counts_equal_what_the_records_and_the_engine_report(archive, engine, ci_auditor_bundle):
    root, report, marker = archive
    records = records_of(root)
    pairs = [(r, p) for r in records for p in r.get("pairs", [])]
    assert len(pairs) == COUNT * len(FINDINGS)
    kept = [(r, p) for r, p in pairs if "dropped" not in p]
    rows = read_csv(root / PAIRS_CSV_KEY)
    assert list(rows[0]) == list(PAIR_COLUMNS)
    assert [row["pair_id"] for row in rows] == [p["pair_id"] for _, p in kept]
    confirmed = sum(p["auditor_confirms"] for _, p in kept)
    assert marker["pairs"] == {"made": len(kept), "auditor_confirmed": confirmed, "dropped": len(pairs) - len(kept)}
    assert (report.pairs_made, report.pairs_confirmed, report.pairs_dropped) == tuple(marker["pairs"].values())
    assert marker["pairs"]["dropped"] == 0, "without verify every pair is kept"
    assert marker["files"][PAIRS_CSV_KEY] == hashlib.sha256((root / PAIRS_CSV_KEY).read_bytes()).hexdigest()
    # Data_Entry.csv: every stored image, counterfactuals as follow-ups of their reference's patient
    entries = read_csv(root / CSV_KEY)
    assert len(entries) == marker["images"] == sum("dropped" not in r for r in records) + len(kept)
    by_name = {row["Image Index"]: row for row in entries}
    auditor = Auditor.of_bundle(load_bundle(ci_auditor_bundle))
    for (reference, pair), row in zip(kept, rows, strict=True):
        entry = by_name[Path(pair["image"]).name]
        assert (entry["Follow-up #"], entry["Patient ID"]) == (str(pair["follow_up"]), str(reference["index"] + 1))
        assert (row["reference_image"], row["counterfactual_image"], row["difference_image"]) == (
            reference["image"], pair["image"], pair["difference"])
        assert (row["reference_labels"], row["counterfactual_labels"]) == (reference["finding_labels"],
                                                                          pair["finding_labels"])
        # The engine, asked again: the reference from its seed, then the edit /edit would make.
        target = np.array([reference["requested"][name] for name in LABEL_INDEX], np.float32)
        mask = np.ones_like(target)
        original = engine.generate([SampleRequest(target, mask, pair["seed"], LCOOptions(**FAST_LCO))])[0]
        edit = plan_edit(target, mask, [pair["finding"]], [])
        edited = engine.generate([edit_sample(edit, original, DEFAULT_PULL, DEFAULT_IMAGE_PULL, LCOOptions(**FAST_LCO))])[0]
        assert encode_png(edited.image, "png8") == (root / pair["image"]).read_bytes()
        finding = LABEL_INDEX[pair["finding"]]
        audit_all = np.concatenate([auditor.probabilities(x.image[None]) for x in (original, edited)])  # one a call
        audit, threshold = audit_all[:, finding], auditor.thresholds[finding]
        verified = [bool(satisfied(audit_all[[i]], t[None], m[None], auditor.thresholds, 0.0)[0])
                    for i, (t, m) in enumerate([(target, mask), (edit.target, edit.judged)])]
        assert float(row["lco_probability_before"]) == pytest.approx(original.probabilities[finding], abs=1e-6)
        assert float(row["lco_probability_after"]) == pytest.approx(edited.probabilities[finding], abs=1e-6)
        assert float(row["auditor_probability_before"]) == pytest.approx(audit[0], abs=1e-5)
        assert float(row["auditor_probability_after"]) == pytest.approx(audit[1], abs=1e-5)
        assert float(row["latent_distance"]) == pytest.approx(np.linalg.norm(edited.latent - original.latent), abs=1e-5)
        assert row["auditor_confirms"] == str(bool(audit[0] < threshold <= audit[1])).lower()
        assert (row["reference_verified"], row["counterfactual_verified"]) == tuple(str(v).lower() for v in verified)
        assert row["lco_satisfied"] == str(edited.satisfied).lower() and int(row["steps"]) == edited.steps


def test_the_contact_sheet_shows_each_reference_beside_its_pairs(archive, tmp_path):
    from service.archive.contact import write_contact_sheet
    from service.demo import TILE

    sheet = write_contact_sheet(LocalSink(archive[0]), tmp_path / "pairs.png", rows=3)
    with Image.open(sheet) as image:
        width, height = image.size
        # three rows; columns: reference + (counterfactual, difference) per finding, one caption column
        assert height > 3 * TILE and height < 4 * TILE and width > (1 + 2 * len(FINDINGS)) * TILE
        reference_tile = np.asarray(image.convert("L"))[6:6 + TILE, 190:190 + TILE]
    assert reference_tile.std() > 5, "the reference tile shows an image, not a blank"


def test_with_verify_only_pairs_the_auditor_verifies_are_kept(engine, tmp_path):
    from service.archive.runner import ModelInfo

    report = run_shard(pairs_spec(tmp_path, verify=True, verify_retries=1), engine, ModelInfo.from_engine(engine),
                       options=QUIET)
    marker = merge_archive(LocalSink(tmp_path), progress=False)
    pairs = [(r, p) for r in records_of(tmp_path) for p in r["pairs"]]
    kept = [p for _, p in pairs if "dropped" not in p]
    dropped = [(r, p) for r, p in pairs if "dropped" in p]
    assert all(p["verified"] and p["reference_verified"] and p["auditor_confirms"] for p in kept)
    for reference, pair in dropped:
        assert pair["dropped"] == ("reference_unverified" if "dropped" in reference else "unverified")
        assert not (tmp_path / "images" / f"{pair['pair_id']}.png").exists()
        assert not (tmp_path / "differences" / f"{pair['pair_id']}.png").exists()
    assert marker["pairs"] == {"made": len(kept), "auditor_confirmed": len(kept), "dropped": len(dropped)}
    assert report.pairs_dropped == len(dropped) and len(pairs) == COUNT * len(FINDINGS)
    assert len(read_csv(tmp_path / PAIRS_CSV_KEY)) == len(kept)


def test_a_rerun_is_byte_identical_and_a_lost_counterfactual_is_remade(archive, engine, tmp_path):
    from service.archive.runner import ModelInfo

    root, _, _ = archive
    model = ModelInfo.from_engine(engine)
    run_shard(pairs_spec(tmp_path / "b"), engine, model, options=QUIET)
    merge_archive(LocalSink(tmp_path / "b"), progress=False)
    assert files_of(tmp_path / "b") == files_of(root)
    # lose one counterfactual and one difference map: the rerun redoes their chunk and only it
    lost = max((tmp_path / "b" / "differences").iterdir())
    lost.unlink()
    (tmp_path / "b" / "images" / lost.name).unlink()
    (tmp_path / "b" / MARKER_KEY).unlink()
    report = run_shard(pairs_spec(tmp_path / "b"), engine, model, options=QUIET)
    assert (report.chunks_skipped, report.chunks_written) == (1, 1) and len(report.repaired) == 1
    merge_archive(LocalSink(tmp_path / "b"), progress=False)
    assert files_of(tmp_path / "b") == files_of(root)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pairs": {"findings": ["Tumour"]}}, "unknown label 'Tumour'"),
        ({"pairs": {"findings": ["No Finding"]}}, "\"No Finding\" cannot be a pair's finding"),
        ({"pairs": {"findings": []}}, "at least 1 item"),
        ({"pairs": {"findings": ["Mass", "mass"]}}, "Mass is named twice"),
        ({"pairs": {"findings": ["Mass"], "proximity": -1}}, "greater than or equal to 0"),
        ({"image_format": "dicom"}, "DICOM pairs are not supported"),
        ({"drop_near_copies": True}, "cannot drop near-copies yet"),
        ({"count": None, "distribution": [{"labels": ["Effusion"], "count": 4}]},
         "label group 1 requests Effusion present"),
    ],
)
def test_bad_pair_specs_say_what_to_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        pairs_spec("/tmp/pairs", **fields)


def test_cli_pairs_to_s3_and_its_bad_input(s3_server, ci_bundle, tmp_path):
    bucket = s3_server.new_bucket()
    dest = f"s3://{bucket}/pairs"
    run = _cli("run", "--bundle", str(ci_bundle), "--count", "2", "--distribution", "balanced", "--seed", "3",
               "--dest", dest, "--chunk-size", "2", *FAST_LCO_ARGS, "--pairs", "pleural effusion",
               "--no-difference-maps", "--no-progress", env=s3_server.env)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert json.loads(out)["archive"]["pairs"] == {"made": 2, "auditor_confirmed": 0, "dropped": 0}
    sink = S3Sink(bucket, "pairs", client=s3_server.client())
    rows = list(csv.DictReader(io.StringIO(sink.get(PAIRS_CSV_KEY).decode())))
    assert [(row["finding"], row["counterfactual_image"]) for row in rows] == [
        ("Effusion", "images/00000001_001.png"), ("Effusion", "images/00000002_001.png")]
    # no auditor in this bundle: its columns are empty, not guessed; no difference maps asked for
    assert {row[c] for row in rows for c in ("auditor_probability_after", "auditor_confirms", "difference_image")} == {""}
    assert not sink.list("differences/") and len(sink.list("images/")) == 4
    for args, message in [(["--pairs", "Tumour"], "unknown label 'Tumour'"),
                          (["--pairs", "Mass", "--format", "dicom"], "DICOM pairs are not supported"),
                          (["--no-difference-maps"], "go with --pairs")]:
        result = subprocess.run([sys.executable, "-m", "service.archive", "run", "--bundle", str(ci_bundle),
                                 "--count", "2", "--dest", str(tmp_path / "x"), *args],
                                cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()
