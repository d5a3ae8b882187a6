"""`make demo-real`'s wiring, without its 45-minute run: the real-data steps name presets that validate
(--dry-run) on an NIH-layout folder, every step parses as a training command, `--data` is refused
with a one-line usage error when it cannot be read, and the auditor goes from torch to ONNX Runtime
(service/auditor.py) with its held-out real images and thresholds intact."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service import demo
from service.auditor import Auditor, AuditorError
from service.bundle import load_bundle
from service.labels import LABELS, NO_FINDING
from service.nih_format import DATA_ENTRY_COLUMNS
from service.png import decode_png, encode_png
from training import cli, demo_bundle
from training.classifier import TrainedClassifier
from training.data import NIHChestXray14
from training.export.auditor import NIH_DATASET_PREFIX, export_auditor

FINDINGS = ("No Finding", "Pneumonia", "Effusion|Pneumonia", "Edema|Infiltration|Pneumonia")


@pytest.fixture
def nih_folder(tmp_path: Path) -> Path:
    """A small folder in the NIH layout: 40 patients, one 48² image each, the findings cycled."""
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(DATA_ENTRY_COLUMNS)
        for patient in range(1, 41):
            name = f"{patient:08d}_000.png"
            Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(root / "images" / name)
            writer.writerow([name, FINDINGS[patient % len(FINDINGS)], 0, patient, 50, "F", "PA", 48, 48, 0.143, 0.143])
    return root


def test_real_steps_use_the_real_presets_and_each_validates(nih_folder: Path, tmp_path: Path) -> None:
    steps = demo_bundle.training_steps(tmp_path / "bundle", tmp_path / "runs", f"nih:{nih_folder}",
                                       tmp_path / "auditor")
    titles = [title for title, _, _ in steps]
    assert titles[-2:] == ["auditor", "auditor export"]
    parser = cli.build_parser()
    presets = []
    for _, _, arguments in steps:
        parser.parse_args(arguments)  # every step is a command the training CLI knows
        if arguments[:1] == ["train"] or arguments[:2] == ["classifier", "train"]:
            presets.append(arguments[arguments.index("--config" if arguments[0] == "train" else "--preset") + 1])
            assert cli.main([*arguments, "--dry-run"]) == 0, arguments
    assert presets == ["nih-sample-64", "nih-sample", "nih-sample-2", "nih-sample-3", "auditor-nih-sample"]
    # the phantom demo ends with the export (its auditor trained before it and bundled)
    assert [title for title, _, _ in demo_bundle.training_steps(tmp_path / "b", tmp_path / "r")][-1] == "bundle export"


@pytest.mark.parametrize(("spec", "message"), [
    ("nih:{missing}", "is not a directory"),
    ("nih:{empty}", "holds no Data_Entry"),
    ("{folder}", "expected nih:PATH"),
    ("chexpert:{folder}", "expected nih:PATH"),
])
def test_demo_refuses_data_it_cannot_read(spec: str, message: str, nih_folder: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    data = spec.format(missing=tmp_path / "missing", empty=tmp_path / "empty", folder=nih_folder)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--data", data, "--exit"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_demo_reads_an_nih_folder_and_the_bundle_step_needs_the_auditor_path(
        nih_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.nih_folder(f"nih:{nih_folder}") == nih_folder.resolve()
    with pytest.raises(SystemExit) as exit_info:
        demo_bundle.main(["--data", f"nih:{nih_folder}"])
    assert exit_info.value.code == 2
    assert "--auditor DIR" in capsys.readouterr().err


@pytest.fixture
def ci_auditor(ci_models, nih_folder: Path) -> TrainedClassifier:
    """The `ci` classifier (32²) as if trained on ``nih_folder``: its held-out split is that folder's."""
    return dataclasses.replace(ci_models.classifier, dataset=f"{NIH_DATASET_PREFIX}{nih_folder}")


def test_auditor_export_round_trip(ci_auditor: TrainedClassifier, nih_folder: Path, tmp_path: Path) -> None:
    trained = ci_auditor
    written = export_auditor(trained, tmp_path / "auditor")
    with pytest.raises(FileExistsError):
        export_auditor(trained, tmp_path / "auditor")
    auditor = Auditor.load(written)

    test_split = NIHChestXray14(nih_folder, split="test", size=auditor.resolution)
    assert [image.name for image in auditor.held_out] == list(test_split.image_names)
    assert len(auditor.held_out) > 0
    np.testing.assert_array_equal(auditor.thresholds, trained.thresholds)

    # ONNX Runtime on the stored PNGs = torch on the same pixels; the pixels are the reader's, 8-bit
    pixels = np.stack([decode_png(image.path.read_bytes()) for image in auditor.held_out])
    reader = np.stack([test_split[i][0][0].numpy() for i in range(len(test_split))])
    np.testing.assert_allclose(pixels, reader, atol=1 / 127.5 + 1e-6)
    expected = trained.predict(torch.from_numpy(pixels[:, None]))
    np.testing.assert_allclose(auditor.probabilities(pixels), expected, atol=1e-4)

    # examples pick by label; agreement is at the auditor's own thresholds
    edema = auditor.examples("Edema", 99)  # the test split holds patients 3 and 15, both with Edema
    assert len(edema) == 2 and all(image.labels[LABELS.index("Edema")] == 1 for image, _ in edema)
    assert all(not image.labels.any() for image, _ in auditor.examples(NO_FINDING, 99))
    probabilities = np.tile(auditor.thresholds, (2, 1))
    probabilities[1] -= 1e-3
    assert auditor.agrees(probabilities, "Edema").tolist() == [True, False]
    assert auditor.agrees(probabilities, NO_FINDING).tolist() == [False, True]

    graph = written / "classifier.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(AuditorError, match="sha256"):
        Auditor.load(written)


def test_real_contact_sheet_rows_and_agreement(ci_bundle: Path, ci_auditor: TrainedClassifier, tmp_path: Path) -> None:
    """judge_rows on the `ci` bundle's own images (as /generate would answer): LCO tiles then held-out
    real ones, each captioned with both probabilities; agreement counted at the auditor's thresholds."""
    auditor_dir = export_auditor(ci_auditor, tmp_path / "auditor")
    bundle = load_bundle(ci_bundle)
    images = bundle.generate(np.random.default_rng(0).standard_normal((3, bundle.manifest.latent_dim)))[:, 0]
    probabilities = 1 / (1 + np.exp(-bundle.classify(images[:, None])[0]))
    results = [{"finding": finding, "images": [
        {"png": encode_png(image), "satisfied": index == 0, "steps": 5,
         "probabilities": dict(zip(LABELS, map(float, p)))} for index, (image, p) in enumerate(zip(images, probabilities))]}
        for finding in (NO_FINDING, "Edema")]
    rows, agreement = demo.judge_rows(ci_bundle, auditor_dir, results, count=2)

    auditor = Auditor.load(auditor_dir)
    audited = auditor.probabilities(np.stack([decode_png(encode_png(image)) for image in images]))
    for (caption, tiles), row, finding in zip(rows, agreement, (NO_FINDING, "Edema")):
        assert caption.startswith(finding)
        assert len(tiles) == 3 + 2  # the test split has 3 No Finding and 2 Edema images
        assert tiles[0][1].startswith("LCO ok 5 st\nclf ") and tiles[1][1].startswith("LCO unsat")
        assert all(label.startswith("real ") for _, label in tiles[3:])
        assert f"aud {demo.shown_probability(audited[0], finding):.2f}" in tiles[0][1]
        assert row["lco_satisfied"] == 1 and row["images"] == 3
        assert row["auditor_agrees"] == int(auditor.agrees(audited, finding).sum())
        assert row["held_out_real"] == len(auditor.examples(finding, 99))
    sheet = tmp_path / "sheet.png"
    demo.contact_sheet(rows, sheet)
    assert Image.open(sheet).size[1] > 2 * 160
