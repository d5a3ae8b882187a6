"""The evaluation suite: distances against closed forms, protocols, bad input, and on phantoms the trained
generator against an untrained one, LCO fidelity, TSTR and the report opened in headless Chromium."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from service.labels import LABELS
from training.evaluate import (
    FeatureSet,
    ImageFormatError,
    ProtocolMismatch,
    TooFewSamples,
    WeightsError,
    check_comparable,
    frechet_distance,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    load_statistics,
    precision_recall_density_coverage,
    save_statistics,
)
from training.evaluate.features import BundleClassifierFeatures, XRVDenseNetFeatures, extract
from training.evaluate.images import as_image_batch, read_images
from training.evaluate.metrics import distribution_metrics

ROOT = Path(__file__).resolve().parents[1]


# -- distances against closed forms ----------------------------------------------------------------------
def _samples_with_covariance(rng, mean: np.ndarray, basis: np.ndarray, scales: np.ndarray, count: int) -> np.ndarray:
    """`count` rows whose sample mean is `mean` and sample covariance exactly basis·diag(scales²)·basisᵀ."""
    centred = rng.standard_normal((count, len(scales)))
    centred -= centred.mean(axis=0)
    centred = np.concatenate([np.ones((count, 1)), centred], axis=1)
    orthonormal = np.linalg.qr(centred)[0][:, 1:]  # orthonormal columns, each orthogonal to the ones vector
    return mean + np.sqrt(count - 1) * orthonormal @ np.diag(scales) @ basis.T


@pytest.mark.parametrize("count, dim, rank, tiny", [
    (400, 32, 32, 0.0),  # full rank
    (400, 32, 32, 1e-7),  # near-singular: a third of the scales 1e-7
    (20, 64, 19, 0.0),  # N below the feature dimension: rank N − 1
    (20, 64, 19, 1e-6),
])
def test_frechet_distance_matches_the_closed_form(count, dim, rank, tiny):
    # Covariances sharing an eigenbasis V: FD = |mu1 - mu2|² + Σ (s1 - s2)² exactly.
    rng = np.random.default_rng(count + dim)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0]
    s1, s2 = rng.uniform(0.2, 3.0, rank), rng.uniform(0.2, 3.0, rank)
    if tiny:
        s1[: rank // 3] = tiny
        s2[rank // 3: 2 * rank // 3] = tiny
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    x = _samples_with_covariance(rng, mu1, basis, s1, count)
    y = _samples_with_covariance(rng, mu2, basis, s2, count)
    exact = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert frechet_distance(x, y) == pytest.approx(exact, rel=1e-6)


def test_frechet_distance_agrees_with_sqrtm_where_that_is_well_conditioned_and_stays_real_where_it_is_not():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((500, 16)), rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) * 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
    few = rng.standard_normal((10, 128)), rng.standard_normal((12, 128)) + 0.2  # N ≪ D: singular covariances
    value = frechet_distance(*few)
    assert np.isfinite(value) and value > 0


def test_kid_is_unbiased_on_two_draws_of_one_distribution_and_detects_a_shift():
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    mean, sd = kernel_inception_distance(first, second, subsets=30, subset_size=200)
    assert abs(mean) <= sd, (mean, sd)
    shifted_mean, shifted_sd = kernel_inception_distance(first, second + 0.25, subsets=30, subset_size=200)
    assert shifted_mean > 5 * shifted_sd


def test_prdc_separates_a_matching_set_from_a_collapsed_one():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((200, 8))
    matching = precision_recall_density_coverage(real, rng.standard_normal((200, 8)))
    collapsed = precision_recall_density_coverage(real, 0.05 * rng.standard_normal((200, 8)))
    assert matching["recall"] > 0.8 and matching["coverage"] > 0.8
    assert collapsed["recall"] < 0.2 and collapsed["coverage"] < 0.2


# -- protocols, reference statistics, bad input ------------------------------------------------------------
def _protocol(**changes) -> dict:
    protocol = {"extractor": "bundle", "weights": "x", "weights_sha256": "ab" * 32, "dim": 4,
                "preprocessing": {"resize": "bilinear", "size": 32}, "count": 10, "source": "a"}
    return protocol | changes


def test_reference_statistics_are_saved_once_and_protocols_must_agree(tmp_path):
    features = FeatureSet(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), _protocol())
    path = save_statistics(features, tmp_path / "ref.npz")
    loaded = load_statistics(path)
    np.testing.assert_array_equal(loaded.features, features.features)
    assert loaded.protocol == features.protocol
    with pytest.raises(FileExistsError, match="written once"):
        save_statistics(features, path)
    check_comparable(loaded.protocol, _protocol(count=99, source="elsewhere"))  # counts and sources may differ
    other = FeatureSet(features.features, _protocol(preprocessing={"resize": "bilinear", "size": 64}))
    with pytest.raises(ProtocolMismatch, match="'preprocessing.size' is 32 in one and 64"):
        distribution_metrics(loaded, other, bootstrap=0)


def test_too_few_samples_and_mixed_images_say_what_is_needed():
    with pytest.raises(TooFewSamples, match="has 1 images; this metric needs at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(TooFewSamples, match="needs at least 6"):
        precision_recall_density_coverage(np.zeros((5, 4)), np.zeros((9, 4)))
    with pytest.raises(ImageFormatError, match=r"3 of shape \[1, 32, 32\], 2 of shape \[1, 64, 64\]"):
        as_image_batch([np.zeros((1, 32, 32))] * 3 + [np.zeros((1, 64, 64))] * 2)
    with pytest.raises(ImageFormatError, match="4 images have 3 channels"):
        as_image_batch(np.zeros((4, 3, 32, 32)))


def test_xrv_densenet_weights_load_by_path_and_a_wrong_file_is_named(tmp_path):
    from training.networks.classifier import DenseNet, densenet121_spec

    state = DenseNet(densenet121_spec(224)).state_dict()  # torchvision's DenseNet-121 order and shapes
    good = tmp_path / "densenet.pt"
    torch.save(state, good)
    extractor = XRVDenseNetFeatures(good)
    features = extract(extractor, np.zeros((1, 1, 64, 64), np.float32), progress=False)
    assert features.features.shape == (1, 1024) and features.protocol["count"] == 1
    assert features.protocol["preprocessing"]["size"] == 224 and len(features.protocol["weights_sha256"]) == 64

    with pytest.raises(WeightsError, match=f"{good}: sha256 .* is not the expected"):
        XRVDenseNetFeatures(good, expected_sha256="0" * 64)
    wrong = dict(state)
    key = next(k for k in wrong if k.endswith("weight") and wrong[k].ndim == 4 and k != "features.0.weight")
    wrong[key] = torch.zeros(3, 3, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(WeightsError, match=r"wrong.pt: .* has shape \[3, 3, 3, 3\]"):
        XRVDenseNetFeatures(tmp_path / "wrong.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(WeightsError, match="pickled.pt: not a torch state dict"):
        XRVDenseNetFeatures(tmp_path / "pickled.pt")


# -- on phantoms, with the trained `ci` networks --------------------------------------------------------
def test_trained_generator_is_closer_to_phantoms_than_an_untrained_one(ci_models, ci_bundle):
    from service.bundle import load_bundle
    from training.evaluate.images import generate_images
    from training.gan.config import load_config
    from training.gan.training_loop import build_networks

    bundle = load_bundle(ci_bundle)
    extractor = BundleClassifierFeatures(bundle)
    real = read_images("phantoms:256", 32, split="test", progress=False)
    real_features = extract(extractor, real.images, progress=False, source=real.source)
    trained = generate_images(bundle, 256, progress=False)
    torch.manual_seed(0)
    untrained_generator, _ = build_networks(load_config("ci"))
    with torch.no_grad():
        untrained = untrained_generator.eval()(torch.from_numpy(
            np.random.default_rng(0).standard_normal((256, 32)).astype(np.float32)), 32, 1.0).clamp(-1, 1)
    fd = {}
    for name, images in (("trained", trained.images), ("untrained", untrained.numpy())):
        result = distribution_metrics(real_features, extract(extractor, images, progress=False, source=name),
                                      bootstrap=50, kid_subsets=20)
        fd[name] = result["frechet_distance"]
    print(f"x-ray FD (bundle classifier embedding, 256 v 256): trained {fd['trained']}, untrained {fd['untrained']}")
    assert fd["trained"]["ci_high"] < fd["untrained"]["ci_low"]


@pytest.fixture(scope="module")
def gan_run_with_frechet(ci_models, tmp_path_factory) -> Path:
    """The `ci` GAN's first 1,100 images (4² and 8², cheap), with the Fréchet distance every 512 images."""
    from training.gan.config import load_config
    from training.gan.data import build_dataset
    from training.gan.training_loop import PGGANTrainer
    from training.runtime import init_distributed

    config = load_config("ci", overrides=[
        "train.metric_images=512", f"train.metric_classifier={ci_models.classifier_dir}",
        "train.metric_samples=32", "train.metric_bootstrap=10"])
    run = tmp_path_factory.mktemp("gan-frechet")
    trainer = PGGANTrainer(config, build_dataset("phantoms", config, progress=False), run, init_distributed("cpu"),
                           data_spec="phantoms", progress=False, tensorboard=False)
    trainer.train(stop_at_images=1100)
    return run


def test_the_gan_trainer_logs_the_frechet_distance_every_n_images(gan_run_with_frechet):
    from training.metrics import read_results

    records = read_results(gan_run_with_frechet, "frechet_distance")
    shown = [r["images_shown"] for r in records]
    assert len(records) >= 2 and all(b // 512 > a // 512 for a, b in itertools.pairwise(shown)), shown
    assert all(r["value"] > 0 and r["values"]["ci_low"] <= r["value"] <= r["values"]["ci_high"] for r in records)
    assert records[0]["protocol"]["extractor"] == "metric_classifier" and records[0]["protocol"]["real"]["count"] == 32
    stats = [json.loads(line) for line in (gan_run_with_frechet / "stats.jsonl").read_text().splitlines()]
    assert [s["frechet_distance"] for s in stats if "frechet_distance" in s] == [r["value"] for r in records]


def _archive(bundle_path: Path, destination: Path, count: int) -> Path:
    from service.archive import ArchiveSpec, RunOptions, merge_archive, run_shard
    from service.archive.cli import load_engine
    from service.sinks import LocalSink

    engine, model = load_engine(str(bundle_path), max_batch=16)
    spec = ArchiveSpec(count=count, distribution="balanced", seed=5, destination=str(destination), chunk_size=32,
                       lco={"steps": 10, "candidates": 2})
    run_shard(spec, engine, model, options=RunOptions(progress=False, upload_workers=2, max_pending_images=32))
    merge_archive(LocalSink(destination), progress=False)
    return destination


def test_report_end_to_end_opens_in_chromium(ci_models, ci_bundle, gan_run_with_frechet, tmp_path):
    from scripts.screenshot_report import open_report
    from training.evaluate import EvaluationPlan, ReportSection, evaluate_bundle

    archive = _archive(ci_bundle, tmp_path / "archive", 64)
    extra = ReportSection("Nearest training images", {"near_copies": 0}, pictures=[ROOT / "docs" / "lco-quality.png"])
    plan = EvaluationPlan(
        bundle=ci_bundle, real="phantoms:128", samples=64, auditor=ci_models.classifier_dir, fidelity_images=4,
        lco_options={"steps": 10, "candidates": 2}, gan_run=gan_run_with_frechet, archive=archive,
        tstr_overrides=("total_images=384", "warmup_images=64", "bootstrap=20", "checkpoint_every=100000"),
        bootstrap=20, extra_sections=[extra])
    page = evaluate_bundle(plan, tmp_path / "report", progress=False)

    document = json.loads((page.parent / "report.json").read_text())
    results = document["results"]
    assert set(results["distances"]) == {"bundle", "auditor"}
    fd = results["distances"]["bundle"]["frechet_distance"]
    assert fd["ci_low"] <= fd["value"] <= fd["ci_high"] and results["distances"]["bundle"]["protocol"]["fake"]["count"] == 64
    fidelity = {row["request"]: row for row in results["lco_fidelity"]}
    assert set(LABELS) <= set(fidelity)  # LCO fidelity per finding, with Clopper–Pearson intervals
    for row in fidelity.values():
        judged = row["lco_classifier"]
        assert judged["trials"] == 4 and judged["ci_low"] <= judged["value"] <= judged["ci_high"]
    tstr = results["tstr"]["regimes"]
    assert set(tstr) == {"train-on-real", "train-on-synthetic", "real+synthetic"}
    assert all(regime["mean_auroc"] is not None for regime in tstr.values())
    assert set(results["label_distribution"]["Effusion"]) == {"training", "lco_classifier", "auditor"}
    assert len(results["frechet_during_training"]) >= 2
    print("TSTR mean AUROC:", {name: round(r["mean_auroc"], 3) for name, r in tstr.items()})

    state = open_report(page, tmp_path / "report.png")
    assert state["title"].startswith("Evaluation of cxrsynth-ci")
    assert {"Distances to real images", "Label distribution of unconditional samples", "LCO label fidelity",
            "Train on synthetic, test on real (TSTR)", "Fréchet distance during training",
            "Nearest training images"} <= set(state["sections"])
    assert state["images"] >= 5 and state["broken_images"] == []
    assert (tmp_path / "report.png").stat().st_size > 20_000

    with pytest.raises(FileExistsError, match="exists"):
        evaluate_bundle(plan, tmp_path / "report", progress=False)


def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(ci_bundle, tmp_path, capsys):
    from tests.bundle_fixtures import run_command

    existing = tmp_path / "existing"
    existing.mkdir()
    assert run_command("training.evaluate.commands", ["evaluate", "report", "--bundle", str(ci_bundle), "--real",
                                                      "phantoms:64", "--out", str(existing)]) == 1
    assert "exists" in capsys.readouterr().err and list(existing.iterdir()) == []
    out = tmp_path / "xrv.npz"
    assert run_command("training.evaluate.commands", ["evaluate", "stats", "--data", "phantoms:8", "--size", "32",
                                                      "--extractor", "xrv-densenet", "--out", str(out)]) == 1
    assert "needs --weights" in capsys.readouterr().err and not out.exists()
    nih = tmp_path / "nih"
    (nih / "images").mkdir(parents=True)
    header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"
    rows = [f"{i:08d}_000.png,No Finding,0,{i},50,M,PA" for i in range(3)]
    (nih / "Data_Entry_2017_v2020.csv").write_text("\n".join([header, *rows]) + "\n")
    from PIL import Image

    for i in range(2):  # the third image is missing
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(nih / "images" / f"{i:08d}_000.png")
    assert run_command("training.evaluate.commands", ["evaluate", "stats", "--data", f"nih:{nih}", "--size", "32",
                                                      "--extractor", "bundle", "--bundle", str(ci_bundle),
                                                      "--out", str(out)]) == 1
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # after the reader's own warning
    assert last.startswith("evaluate: ") and "1 missing" in last and not out.exists()


def test_inception_weights_are_checked_by_name_digest_and_by_shape(tmp_path):
    from training.evaluate.inception import FIDInceptionV3, InceptionFeatures

    state = FIDInceptionV3().state_dict()
    misnamed = tmp_path / "pt_inception-2015-12-05-6726825d.pth"  # the standard name, other bytes
    torch.save(state, misnamed)
    with pytest.raises(WeightsError, match=f"{misnamed}: sha256 .* does not begin with 6726825d"):
        InceptionFeatures(misnamed)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "inception.pth")
    with pytest.raises(WeightsError, match=r"inception.pth: 1 InceptionV3 tensors missing \(first: Mixed_7c"):
        InceptionFeatures(tmp_path / "inception.pth")
