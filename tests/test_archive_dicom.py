"""Archive jobs in DICOM (``image_format: "dicom"``): Secondary Capture files in the shards and the NIH
CSV, one study per job and one series per shard, byte-identical on every rerun, read back by pydicom,
by dciodvfy, by the contact sheet and by the project's own DICOM reader.

One small job (8 images of the trained `ci` bundle, 2 shards, short LCO) is made on the real S3 API
(moto's server on loopback) and again in a local directory; the same job in png16 gives the grey levels
the DICOM files must hold.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from pydicom.uid import UID

from service.archive import ArchivePlan, ArchiveSpec, merge_archive
from service.archive.manifest import CSV_KEY, JOB_KEY, ArchiveUIDs
from service.dicom import read_origin
from service.labels import LABELS, parse_finding_labels
from service.nih_format import DATA_ENTRY_COLUMNS
from service.png import decode_png, to_pixels
from service.sinks import LocalSink, S3Sink
from tests.test_archive import FAST_LCO, ROOT, make, records_of

GROUPS = [{"labels": ["Effusion"], "count": 3}, {"labels": {"Cardiomegaly": True, "Nodule": False}, "count": 2},
          {"labels": ["No Finding"], "count": 3}]
# Two shards of one LCO batch each, two chunks per shard.
JOB = {"distribution": GROUPS, "seed": 21, "shard_count": 2, "chunk_size": 2, "batch_size": 2, "lco": FAST_LCO}


@dataclass
class DicomArchives:
    s3: S3Sink  # the DICOM job on S3
    local: LocalSink  # the same job in a directory, resumed after losing an image
    png16: LocalSink  # the same images as 16-bit PNG
    spec: ArchiveSpec  # the S3 job's shard 0


def run_job(destination: str, sink, engine_and_model, image_format: str = "dicom") -> ArchiveSpec:
    spec = ArchiveSpec(destination=destination, image_format=image_format, **JOB)
    for shard in (1, 0):
        make(spec.model_copy(update={"shard_index": shard}), engine_and_model, sink)
    return spec


@pytest.fixture(scope="module")
def engine_and_model(ci_bundle):
    """The LCO engine and model record of the trained `ci` bundle, as the archive tests use them."""
    from service.archive.cli import load_engine

    return load_engine(str(ci_bundle), max_batch=16)


@pytest.fixture(scope="module")
def archives(s3_server, engine_and_model, tmp_path_factory) -> DicomArchives:
    root = tmp_path_factory.mktemp("dicom-archives")
    s3 = S3Sink(s3_server.new_bucket(), "dicom", client=s3_server.client())
    spec = run_job(s3.uri(), s3, engine_and_model)
    merge_archive(s3, progress=False)

    local = LocalSink(root / "local")
    run_job(str(root / "local"), local, engine_and_model)
    lost = local.list("images/")[1]
    original = local.get(lost)
    local.delete(lost)
    resumed = make(spec.model_copy(update={"destination": str(root / "local")}), engine_and_model, local)
    assert resumed.generated == 2 and resumed.repaired, "the chunk that lost an image was made again"
    assert local.get(lost) == original
    merge_archive(local, progress=False)

    png16 = LocalSink(root / "png16")
    run_job(str(root / "png16"), png16, engine_and_model, image_format="png16")
    return DicomArchives(s3, local, png16, spec)


def datasets(sink) -> dict[str, pydicom.Dataset]:
    return {key: pydicom.dcmread(io.BytesIO(sink.get(key))) for key in sink.list("images/")}


def csv_rows(sink) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(sink.get(CSV_KEY).decode())))


def test_the_shards_and_the_nih_csv_hold_dcm_files_equal_to_the_png16_encoding(archives):
    keys = archives.s3.list("images/")
    assert keys == [f"images/{i:08d}_000.dcm" for i in range(1, 9)]
    rows = csv_rows(archives.s3)
    assert list(rows[0]) == list(DATA_ENTRY_COLUMNS)
    assert [row["Image Index"] for row in rows] == [key.removeprefix("images/") for key in keys]
    head = archives.s3.client.head_object(Bucket=archives.s3.bucket, Key=f"dicom/{keys[0]}")
    assert head["ContentType"] == "application/dicom"
    for key, ds in datasets(archives.s3).items():
        png = archives.png16.get(key.replace(".dcm", ".png"))
        assert ds.pixel_array.dtype == np.uint16
        assert np.array_equal(ds.pixel_array, np.asarray(Image.open(io.BytesIO(png)))), key
        assert ds.pixel_array.std() > 100, "a generated image, not a blank"


def test_one_study_per_job_one_series_per_shard_and_unique_instances(archives):
    by_key = datasets(archives.s3)
    plan = ArchivePlan(archives.spec)
    assert len({ds.StudyInstanceUID for ds in by_key.values()}) == 1
    series = {}
    for shard in range(2):
        in_shard = [by_key[plan.image_key(index)] for index in plan.shard_range(shard)]
        assert len(in_shard) == 4
        assert len({ds.SeriesInstanceUID for ds in in_shard}) == 1
        assert {int(ds.SeriesNumber) for ds in in_shard} == {shard + 1}
        series[shard] = in_shard[0].SeriesInstanceUID
    assert series[0] != series[1]
    instances = [ds.SOPInstanceUID for ds in by_key.values()]
    assert len(set(instances)) == 8
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in by_key.values())
    uids = instances + list(series.values()) + [next(iter(by_key.values())).StudyInstanceUID]
    assert all(UID(uid).is_valid and uid.startswith("2.25.") for uid in uids)
    # The UIDs are the job's: another seed (other images) is another study.
    document = json.loads(archives.s3.get(JOB_KEY))
    same = ArchiveUIDs.of_job(document).placement(0, 0)
    other = ArchiveUIDs.of_job({**document, "spec": {**document["spec"], "seed": 22}}).placement(0, 0)
    assert same.study_uid == by_key["images/00000001_000.dcm"].StudyInstanceUID
    assert other.study_uid != same.study_uid and other.instance_uid != same.instance_uid


def test_a_rerun_elsewhere_and_a_resumed_run_write_the_same_bytes(archives):
    keys = archives.s3.list("images/")
    assert archives.local.list("images/") == keys
    for key in keys:
        assert archives.local.get(key) == archives.s3.get(key), key
    assert archives.local.get(CSV_KEY) == archives.s3.get(CSV_KEY)
    assert records_of(archives.local) == records_of(archives.s3)


def test_every_file_says_it_is_synthetic_and_how_it_was_made(archives):
    records = {record["image"]: record for record in records_of(archives.s3)}
    rows = {row["Image Index"]: row for row in csv_rows(archives.s3)}
    job = json.loads(archives.s3.get(JOB_KEY))
    for key, ds in datasets(archives.s3).items():
        record, row = records[key], rows[key.removeprefix("images/")]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.ConversionType == "SYN"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.Modality == "OT"
        assert "SYNTHETIC" in ds.SeriesDescription and "SYNTHETIC" in ds.ImageComments
        assert ds.PatientID == f"SYNTHETIC-{row['Patient ID']}"
        assert str(ds.PatientName) == f"SYNTHETIC^{row['Patient ID']}"
        assert ds.PatientBirthDate == "" and ds.PatientSex == ""
        assert [float(v) for v in ds.PixelSpacing] == [float(row["OriginalImagePixelSpacing[x"])] * 2
        assert (ds.Rows, ds.Columns) == (int(row["Height]"]), int(row["OriginalImage[Width"]))
        origin = read_origin(ds)
        assert origin.seed == record["seed"] and origin.requested == record["requested"]
        assert (origin.model_name, origin.model_version) == (job["model"]["name"], job["model"]["version"])
        assert origin.lco_options == job["lco"] and origin.synthetic_patient_id == row["Patient ID"]
        assert str(record["seed"]) in ds.ImageComments


def test_dciodvfy_finds_no_error_in_any_file(archives, tmp_path):
    validator = shutil.which("dciodvfy")
    if validator is None:
        pytest.fail("dciodvfy is not installed: `make system-deps` installs Debian's dicom3tools")
    for key in archives.s3.list("images/"):
        path = tmp_path / key.removeprefix("images/")
        path.write_bytes(archives.s3.get(key))
        result = subprocess.run([validator, str(path)], check=False, capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        assert result.returncode == 0 and "Error" not in report and "SCImage" in report, (key, report)


def test_the_contact_sheet_shows_the_dicom_grey_levels(archives, tmp_path):
    from service.archive.contact import write_contact_sheet
    from service.demo import TILE

    sheet_path = write_contact_sheet(archives.s3, tmp_path / "sheet.png", per_row=4)
    with Image.open(sheet_path) as picture:
        sheet = np.asarray(picture.convert("L"))
    assert 3 * TILE < sheet.shape[0] < 4 * TILE, "three label sets, three rows"
    # Every image is on the sheet with its own grey levels (made here from the png16 twin, 8-bit).
    windows = sliding_window_view(sheet, (TILE, TILE))
    for key in archives.png16.list("images/"):
        tile = np.asarray(Image.fromarray(to_pixels(decode_png(archives.png16.get(key)), "png8"))
                          .resize((TILE, TILE), Image.Resampling.NEAREST))
        starts = np.argwhere((windows[:, :, 0, :] == tile[0]).all(axis=-1))
        assert any(np.array_equal(windows[y, x], tile) for y, x in starts), f"{key} is not on the sheet"


def test_the_cli_writes_a_dicom_archive_that_our_dicom_reader_reads_with_its_csv_labels(tmp_path, ci_bundle,
                                                                                        engine_and_model):
    from training.data.factory import open_dataset

    destination = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "service.archive", "run", "--bundle", str(ci_bundle), "--format", "dicom",
         "--distribution", '[{"labels": ["Effusion"], "count": 3}, {"labels": ["No Finding"], "count": 3}]',
         "--seed", "4", "--dest", str(destination), "--chunk-size", "3", "--lco", "steps=10", "--lco",
         "candidates=2", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    side = engine_and_model[1].resolution
    dataset = open_dataset(f"dicom:{destination}", side, split="all", labels_csv=destination / CSV_KEY, min_size=side)
    assert len(dataset) == 6 and not any(dataset.excluded.values()) and dataset.unmatched_label_rows == 0
    rows = csv_rows(LocalSink(destination))
    assert [str(path) for path in dataset.paths] == [f"images/{row['Image Index']}" for row in rows]
    expected = np.stack([parse_finding_labels(row["Finding Labels"]) for row in rows])
    np.testing.assert_array_equal(dataset.labels, expected)
    assert dataset.label_mask.all() and expected[:, LABELS.index("Effusion")].sum() == 3
    for index, row in enumerate(rows):
        image, labels, _ = dataset[index]
        stored = pydicom.dcmread(destination / "images" / row["Image Index"]).pixel_array
        np.testing.assert_allclose(image[0].numpy(), stored / 65535 * 2 - 1, atol=4 / 65535)
        np.testing.assert_array_equal(labels.numpy(), expected[index])
    assert {record.patient_id for record in dataset.records} == {f"SYNTHETIC-{row['Patient ID']}" for row in rows}


def test_an_unknown_format_is_a_usage_error_naming_the_formats(capsys):
    from service.archive.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--dest", "/tmp/x", "--count", "4", "--format", "tiff"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--format" in error and all(name in error for name in ("png8", "png16", "dicom"))
    with pytest.raises(ValueError, match="'png8', 'png16' or 'dicom'"):
        ArchiveSpec(count=4, destination="/tmp/x", image_format="tiff")
