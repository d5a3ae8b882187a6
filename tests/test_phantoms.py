"""Procedural chest x-ray phantoms: determinism, sizes, every finding's measurable signature, NIH layout."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
from PIL import Image

from service.labels import LABELS, NUM_LABELS, labels_to_vector, parse_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS
from training.phantoms import (
    MEASUREMENTS,
    make_scene,
    measure,
    render_phantom,
    render_scene,
    request_phantoms,
    sample_phantom,
    write_contact_sheet,
    write_dataset,
)
from training.phantoms.placement import TABLE_RESOURCE, derive_bbox_table

SIZES = (32, 64, 128, 256, 512, 1024)
SIGNATURE_SIZE = 64  # the size downstream classifiers and GANs train at: signatures must hold here
SEEDS = range(20_000, 20_020)


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    greater = (positives[:, None] > negatives[None, :]).mean()
    ties = (positives[:, None] == negatives[None, :]).mean()
    return float(greater + 0.5 * ties)


def one_hot(*names: str) -> np.ndarray:
    return labels_to_vector(names)


# --- determinism and sizes ------------------------------------------------------------------------
def test_same_seed_same_bytes_and_different_seeds_differ():
    labels = one_hot("Effusion", "Nodule")
    first = render_phantom(labels, 64, seed=11)
    assert first.tobytes() == render_phantom(labels.copy(), 64, seed=11).tobytes()
    assert first.tobytes() != render_phantom(labels, 64, seed=12).tobytes()
    image, vector = sample_phantom(5, 64, seed=3)
    again, vector_again = sample_phantom(5, 64, seed=3)
    assert image.tobytes() == again.tobytes() and np.array_equal(vector, vector_again)
    assert vector.dtype == np.float32 and vector.shape == (NUM_LABELS,)
    assert sample_phantom(6, 64, seed=3)[0].tobytes() != image.tobytes()


@pytest.mark.parametrize("size", SIZES)
def test_every_power_of_two_size_renders(size):
    image = render_phantom(np.ones(NUM_LABELS, dtype=np.float32), size, seed=2)
    assert image.shape == (size, size) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    # A radiograph, not a blank: black air above the shoulders, bright bone and abdomen inside.
    corner = image[: size // 8, : size // 8]
    assert corner.mean() < 0.1 and np.percentile(image, 95) > 0.7


def test_same_chest_at_every_size():
    """Geometry lives in resolution-free coordinates, so 256² averaged down to 64² matches 64²."""
    labels = one_hot("Cardiomegaly", "Mass")
    small = render_phantom(labels, 64, seed=9)
    large = render_phantom(labels, 256, seed=9).reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), large.ravel())[0, 1] > 0.97


@pytest.mark.parametrize("size", [0, 16, 48, 100, 2048, -64])
def test_bad_size_is_a_clear_error(size):
    with pytest.raises(ValueError, match="power of two from 32 to 1024"):
        render_phantom(np.zeros(NUM_LABELS), size, seed=0)


def test_bad_size_type_and_label_shape_are_errors():
    with pytest.raises(TypeError, match="power of two"):
        render_phantom(np.zeros(NUM_LABELS), 64.0, seed=0)
    with pytest.raises(ValueError, match="multi-hot vector of 14"):
        render_phantom(np.zeros(13), 64, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        render_phantom(np.zeros(NUM_LABELS), 64, seed=-1)
    with pytest.raises(ValueError, match="index must be a non-negative integer"):
        sample_phantom(-3, 64)


def test_sample_phantom_draws_from_the_prior():
    vectors = np.stack([sample_phantom(i, 32, seed=1, prior="balanced")[1] for i in range(150)])
    # The balanced prior: "No Finding" or exactly one finding, each about 1/15 of the time.
    assert set(vectors.sum(axis=1)) <= {0.0, 1.0}
    assert (vectors.sum(axis=0) > 0).sum() >= 12
    with pytest.raises(ValueError, match="unknown label prior"):
        sample_phantom(0, 32, prior="uniform")


def test_request_phantoms_meet_the_request_in_the_company_the_prior_gives():
    target, mask = one_hot("Effusion"), one_hot("Effusion", "Pneumothorax")  # Effusion present, no Pneumothorax
    images, labels = request_phantoms(target, mask, 60, 32, seed=5, prior="nih-boosted")
    assert images.shape == (60, 32, 32) and images.dtype == np.float32 and 0.0 <= images.min() <= images.max() <= 1.0
    effusion, pneumothorax = LABELS.index("Effusion"), LABELS.index("Pneumothorax")
    assert (labels[:, effusion] == 1).all() and (labels[:, pneumothorax] == 0).all()
    alone = labels.sum(axis=1) == 1
    assert 0 < alone.sum() < len(labels)  # Effusion alone (the boosted half) and with NIH's company
    again, again_labels = request_phantoms(target, mask, 60, 32, seed=5, prior="nih-boosted")
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert not np.array_equal(images, request_phantoms(target, mask, 60, 32, seed=6, prior="nih-boosted")[0])
    # The balanced prior never draws two findings at once: asking it for two is an error, not an empty batch.
    both = one_hot("Effusion", "Atelectasis")
    with pytest.raises(ValueError, match="no label combination of the 'balanced' prior"):
        request_phantoms(both, both, 4, 32, prior="balanced")


# --- signatures -------------------------------------------------------------------------------------
def _scores(finding: str, cofindings: bool) -> tuple[np.ndarray, np.ndarray]:
    """The finding's measurement on images with and without it, same chests; with ``cofindings``
    both also carry up to two random other findings."""
    index = LABELS.index(finding)
    positives, negatives = [], []
    for seed in SEEDS:
        scene = make_scene(seed)
        present = np.zeros(NUM_LABELS, dtype=bool)
        if cofindings:
            rng = np.random.default_rng([seed, index])
            others = [i for i in range(NUM_LABELS) if i != index]
            present[rng.choice(others, size=rng.integers(0, 3), replace=False)] = True
        with_finding = present.copy()
        with_finding[index] = True
        read = MEASUREMENTS[finding].read
        positives.append(read(_view(render_scene(scene, with_finding, SIGNATURE_SIZE), scene)))
        negatives.append(read(_view(render_scene(scene, present, SIGNATURE_SIZE), scene)))
    return np.array(positives), np.array(negatives)


def _view(image, scene):
    from training.phantoms.measure import MeasurementView

    return MeasurementView(image, scene)


@pytest.mark.parametrize("finding", LABELS)
def test_signature_present_where_labelled_and_absent_where_not(finding):
    """Alone, every finding's measurement puts all 20 images with it above all 20 without it."""
    positives, negatives = _scores(finding, cofindings=False)
    assert np.isfinite(positives).all() and np.isfinite(negatives).all()
    assert positives.min() > negatives.max(), (
        f"{finding}: {MEASUREMENTS[finding].short} with {np.round(positives, 3)}, without {np.round(negatives, 3)}"
    )


@pytest.mark.parametrize("finding", LABELS)
def test_signature_survives_cooccurring_findings(finding):
    """With up to two other findings on the same films, the measurement still ranks the images with
    the finding above those without (AUROC >= 0.95): findings stay distinguishable."""
    positives, negatives = _scores(finding, cofindings=True)
    assert auroc(positives, negatives) >= 0.95, (
        f"{finding}: with {np.round(positives, 3)}, without {np.round(negatives, 3)}"
    )


def test_cardiothoracic_ratio_crosses_one_half():
    """The clinical rule itself: enlarged hearts read above 0.5, normal ones below, at 64² and 256²."""
    for size in (64, 256):
        for seed in range(30_000, 30_006):
            scene = make_scene(seed)
            normal = measure(render_scene(scene, np.zeros(NUM_LABELS, bool), size), scene)["Cardiomegaly"]
            enlarged = measure(render_scene(scene, one_hot("Cardiomegaly") > 0, size), scene)["Cardiomegaly"]
            assert normal < 0.5 < enlarged, (size, seed, normal, enlarged)


def test_signatures_hold_at_full_resolution():
    scene = make_scene(31_000)
    normal = measure(render_scene(scene, np.zeros(NUM_LABELS, bool), 512), scene)
    for index, finding in enumerate(LABELS):
        present = np.zeros(NUM_LABELS, bool)
        present[index] = True
        assert measure(render_scene(scene, present, 512), scene)[finding] > normal[finding], finding


def test_labels_do_not_move_the_anatomy():
    """Adding a finding changes its own region only: the lung apices stay identical under a nodule."""
    scene = make_scene(12)
    nodule = scene.findings.nodule
    plain = render_scene(scene, np.zeros(NUM_LABELS, bool), 128)
    with_nodule = render_scene(scene, one_hot("Nodule") > 0, 128)
    changed = np.argwhere(np.abs(with_nodule - plain) > 1e-6) / 128
    assert len(changed) > 0
    distance = np.hypot(changed[:, 1] - nodule.u, changed[:, 0] - nodule.v)
    assert distance.max() < 2.5 * nodule.radius + 0.05


# --- placement from the real NIH boxes ----------------------------------------------------------------
def test_shipped_bbox_table_matches_the_nih_csv(nih_bbox_csv):
    shipped = json.loads(resources.files("training.phantoms").joinpath(TABLE_RESOURCE).read_text())
    derived = derive_bbox_table(nih_bbox_csv)
    assert derived == shipped
    counts = {name: len(rows) for name, rows in shipped["findings"].items()}
    assert counts == {
        "Atelectasis": 180,
        "Cardiomegaly": 146,
        "Effusion": 153,
        "Infiltration": 123,
        "Mass": 85,
        "Nodule": 79,
        "Pneumonia": 120,
        "Pneumothorax": 98,
    }


def test_placements_follow_the_nih_boxes():
    """Across many chests, placed nodules sit where NIH nodule boxes do (both lungs, mid zones), and
    pneumothoraces take the side the NIH boxes favour."""
    scenes = [make_scene(seed) for seed in range(400)]
    nodule_sides = np.array([s.findings.nodule.side for s in scenes])
    assert 0.35 < nodule_sides.mean() < 0.65
    nodule_v = np.array([(s.findings.nodule.v - s.anatomy.apex_v) for s in scenes])
    assert 0.2 < np.median(nodule_v) < 0.45  # NIH nodule boxes centre at 0.48 of the film height
    masses = np.array([s.findings.mass.radius for s in scenes])
    nodules = np.array([s.findings.nodule.radius for s in scenes])
    assert masses.min() > 1.5 * nodules.max()
    ratios = np.array([s.findings.cardiomegaly_ratio for s in scenes])
    assert ratios.min() > 0.55 and 0.6 < np.median(ratios) < 0.7


# --- data set writer and contact sheet ----------------------------------------------------------------
def test_cli_writes_an_nih_layout_data_set(tmp_path):
    out = tmp_path / "phantoms"
    command = [sys.executable, "-m", "training.phantoms", "write", "--out", str(out), "--count", "24",
               "--size", "32", "--seed", "4", "--prior", "balanced", "--workers", "2"]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(out / "Data_Entry_2017_v2020.csv", newline="") as handle:
        reader = csv.reader(handle)
        assert tuple(next(reader)) == DATA_ENTRY_COLUMNS
        rows = list(reader)
    assert len(rows) == 24
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r[0] for r in rows)
    counts = np.zeros(NUM_LABELS)
    for index, row in enumerate(rows):
        image_name, labels, follow_up, patient, age, gender, view, width, height, sx, sy = row
        assert image_name == f"{int(patient):08d}_{int(follow_up):03d}.png"
        assert view == "PA" and gender in {"M", "F"} and 18 <= int(age) <= 95
        assert (int(width), int(height)) == (32, 32) and float(sx) == float(sy) == pytest.approx(
            0.143 * 2500 / 32
        )
        expected_image, expected_labels = sample_phantom(index, 32, seed=4, prior="balanced")
        assert np.array_equal(parse_finding_labels(labels), expected_labels)
        counts += expected_labels
        with Image.open(out / "images" / image_name) as png:
            assert png.mode == "L" and png.size == (32, 32)
            assert np.array_equal(np.asarray(png), np.round(expected_image * 255).astype(np.uint8))
    csv_counts = np.sum([parse_finding_labels(r[1]) for r in rows], axis=0)
    assert np.array_equal(csv_counts, counts)
    assert not list(out.rglob("*.tmp"))


def test_sixteen_bit_data_set(tmp_path):
    write_dataset(tmp_path, count=3, size=64, seed=8, bit_depth=16, workers=1, progress=False)
    image, _ = sample_phantom(2, 64, seed=8)
    name = sorted((tmp_path / "images").iterdir())[2]
    with Image.open(name) as png:
        assert png.mode.startswith("I;16") or png.mode == "I"
        assert np.array_equal(np.asarray(png).astype(np.int64), np.round(image * 65535).astype(np.int64))


def test_cli_rejects_bad_arguments(tmp_path):
    command = [
        sys.executable,
        "-m",
        "training.phantoms",
        "write",
        "--out",
        str(tmp_path),
        "--count",
        "2",
        "--size",
        "48",
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "power of two" in result.stderr
    assert not (tmp_path / "Data_Entry_2017_v2020.csv").exists()


def test_contact_sheet(tmp_path):
    path = write_contact_sheet(tmp_path / "sheet.png", size=64, seed=1)
    with Image.open(path) as sheet:
        assert sheet.mode == "L" and sheet.width == 5 * 64
        pixels = np.asarray(sheet)
    tile_height = sheet.height // 3
    assert tile_height > 64  # room for the captions
    tiles = [
        pixels[r * tile_height : r * tile_height + 64, c * 64 : (c + 1) * 64]
        for r in range(3)
        for c in range(5)
    ]
    normal = tiles[0].astype(int)
    assert all(np.abs(tile.astype(int) - normal).max() > 40 for tile in tiles[1:])  # each finding shows
