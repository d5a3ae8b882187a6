"""One evaluation run of a bundle against real images: every measurement of the suite, and its report.

    from training.evaluate import EvaluationPlan, evaluate_bundle
    evaluate_bundle(EvaluationPlan(bundle="models/demo", real="phantoms:1024", real_options={"prior": "nih-boosted"},
                                   auditor="runs/demo/auditor"), "reports/demo-1")

Sections, each in the HTML/JSON report: distances (FD with bootstrap CI, KID, PRDC) per extractor,
label distribution of unconditional samples, LCO label fidelity, diversity (MS-SSIM within findings),
generated beside real images per finding, the Fréchet distance during the GAN's training (when the GAN
run is given), TSTR (when an archive is given) and any extra sections (the memorisation audit's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.labels import LABELS, NO_FINDING
from training.evaluate.diversity import mean_pairwise_ms_ssim
from training.evaluate.features import Extractor, FeatureSet, extract, make_extractor
from training.evaluate.images import ImageSet, generate_images, read_images
from training.evaluate.labels import (
    auditor_probabilities,
    bundle_probabilities,
    default_requests,
    label_distribution,
    lco_fidelity,
)
from training.evaluate.metrics import distribution_metrics
from training.evaluate.report import (
    ReportSection,
    ReportWriter,
    interval_text,
    plot_frechet_during_training,
    plot_label_prevalence,
    plot_samples_beside_reals,
)
from training.evaluate.statistics import check_comparable, load_statistics, save_statistics


@dataclass
class EvaluationPlan:
    """What to measure. `real`: a data set spec (`training.data.open_dataset`) read at the bundle's
    resolution, split `real_split` (held-out patients); `train_data`: the generator's training set for
    the label prevalence (default: `real` split "train"). Optional parts run when their input is given."""

    bundle: str | Path
    real: str
    real_split: str = "test"
    real_options: dict[str, Any] = field(default_factory=dict)
    train_data: str | None = None
    samples: int = 512  # unconditional samples and at most this many real images
    auditor: str | Path | None = None
    extractors: tuple[str, ...] = ("bundle", "auditor")
    weights: dict[str, str] = field(default_factory=dict)  # extractor -> weights file (xrv-densenet, inception)
    fidelity_images: int = 16  # LCO images per request; 0 skips fidelity, diversity and sample grids
    lco_options: dict[str, Any] = field(default_factory=dict)
    gan_run: str | Path | None = None
    archive: str | Path | None = None  # TSTR's synthetic training set
    tstr_preset: str = "ci"
    tstr_overrides: tuple[str, ...] = ()
    reference_dir: str | Path | None = None  # reference statistics saved once and reused
    bootstrap: int = 200
    seed: int = 0
    extra_sections: list[ReportSection] = field(default_factory=list)


def reference_features(extractor: Extractor, real: ImageSet, reference_dir: Path | None, *,
                       progress: bool) -> FeatureSet:
    """The real set's features, from `reference_dir` when saved there before (protocol checked), else
    computed (and saved there when given)."""
    if reference_dir is None:
        return extract(extractor, real.images, progress=progress, source=real.source, description="real")
    key = hashlib.sha256(json.dumps([extractor.protocol, real.source, len(real)], sort_keys=True).encode())
    path = Path(reference_dir) / f"{extractor.name}-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        saved = load_statistics(path)
        check_comparable(saved.protocol, extractor.protocol | {"count": 0, "source": ""})
        return saved
    features = extract(extractor, real.images, progress=progress, source=real.source, description="real")
    save_statistics(features, path)
    return features


def evaluate_bundle(plan: EvaluationPlan, out: str | Path, *, progress: bool = True) -> Path:
    """Measure `plan` and write the report to `out` (refused when it exists); returns report.html's path."""
    from service.bundle import load_bundle
    from training.classifier.artifact import TrainedClassifier
    from training.data import open_dataset

    with ReportWriter(out, f"Evaluation of {Path(plan.bundle).name} against {plan.real}") as report:
        bundle = load_bundle(plan.bundle)
        size = bundle.manifest.resolution
        auditor = TrainedClassifier.load(plan.auditor) if plan.auditor is not None else None
        extractors = [make_extractor(name, bundle=bundle, auditor=plan.auditor, weights=plan.weights.get(name))
                      for name in plan.extractors if name != "auditor" or plan.auditor is not None]
        real = read_images(plan.real, size, split=plan.real_split, limit=plan.samples, seed=plan.seed,
                           progress=progress, **plan.real_options)
        generated = generate_images(bundle, plan.samples, seed=plan.seed, progress=progress)
        report.add(ReportSection("Data", {"bundle": str(plan.bundle), "bundle name": bundle.manifest.name,
                                          "resolution": size, "real images": real.source, "real count": len(real),
                                          "generated": generated.source, "generated count": len(generated)}))

        distances = {}
        for extractor in extractors:
            real_features = reference_features(extractor, real, plan.reference_dir and Path(plan.reference_dir),
                                               progress=progress)
            fake_features = extract(extractor, generated.images, progress=progress, source=generated.source,
                                    description="generated")
            distances[extractor.name] = distribution_metrics(real_features, fake_features, bootstrap=plan.bootstrap,
                                                             seed=plan.seed, progress=progress)
        report.add(distance_section(distances), "distances", distances)

        train_spec = plan.train_data or plan.real
        train_set = open_dataset(train_spec, size, split="train", seed=plan.seed, **plan.real_options)
        training_labels = getattr(train_set, "labels", None)
        if training_labels is None:
            training_labels = read_images(train_spec, size, split="train", limit=plan.samples, seed=plan.seed,
                                          progress=progress, **plan.real_options).labels
        lco_probs = bundle_probabilities(bundle, generated.images)
        audit_probs = auditor_probabilities(auditor, generated.images) if auditor is not None else None
        prevalence = label_distribution(lco_probs, bundle.thresholds, audit_probs,
                                        None if auditor is None else auditor.thresholds, np.asarray(training_labels))
        prevalence_png = report.picture("label-prevalence.png", lambda path: plot_label_prevalence(
            prevalence, path, f"{len(generated)} unconditional samples vs {len(training_labels)} training images"))
        report.add(ReportSection(
            "Label distribution of unconditional samples",
            note=("Per label, the share of unconditional samples each classifier calls positive at its own "
                  "thresholds, beside the share in the training set (95% Clopper–Pearson intervals)."),
            tables=[(["label", "training", "LCO classifier", "auditor"],
                     [[name, interval_text(row["training"], percent=True),
                       interval_text(row["lco_classifier"], percent=True),
                       interval_text(row["auditor"], percent=True)] for name, row in prevalence.items()])],
            pictures=[prevalence_png]), "label_distribution", prevalence)

        if plan.fidelity_images > 0:
            add_fidelity_sections(report, plan, bundle, auditor, real)
        if plan.gan_run is not None:
            add_training_curve_section(report, Path(plan.gan_run))
        if plan.archive is not None:
            add_tstr_section(report, plan, size, progress=progress)
        for section in plan.extra_sections:
            report.add(section)
        return report.finish()


def distance_section(distances: dict[str, dict[str, Any]]) -> ReportSection:
    rows = []
    for name, result in distances.items():
        protocol = result["protocol"]
        prdc = result["prdc"]
        rows.append([name, interval_text(result["frechet_distance"], 4),
                     f"{result['kid']['mean']:.4g} ± {result['kid']['sd']:.2g}",
                     *(interval_text(prdc[m], 3) for m in ("precision", "recall", "density", "coverage")),
                     protocol["real"]["count"], protocol["fake"]["count"], protocol["weights_sha256"][:12],
                     f"{protocol['preprocessing']['resize']} to {protocol['preprocessing']['size']}²"])
    return ReportSection(
        "Distances to real images",
        note=("Fréchet distance with a 95% percentile-bootstrap CI, KID (unbiased MMD², mean ± SD over "
              "subsets), precision/recall/density/coverage (k = 5) with 80%-subsampling intervals."),
        tables=[(["extractor", "Fréchet distance", "KID", "precision", "recall", "density", "coverage", "N real",
                  "N generated", "weights sha256", "preprocessing"], rows)])


def add_fidelity_sections(report: ReportWriter, plan: EvaluationPlan, bundle, auditor, real: ImageSet) -> None:
    from service.lco import LCOEngine, LCOOptions

    engine = LCOEngine(bundle, LCOOptions(**plan.lco_options))
    rows = lco_fidelity(engine, auditor, default_requests(), plan.fidelity_images, progress=False)
    report.add(ReportSection(
        "LCO label fidelity",
        note=(f"{plan.fidelity_images} LCO images per request: the share the LCO classifier reports satisfied, and "
              "the share on which the independent auditor agrees (95% Clopper–Pearson intervals)."),
        tables=[(["request", "LCO classifier", "auditor agrees", "mean steps"],
                 [[row.request, interval_text(row.lco_classifier.to_dict(), percent=True),
                   interval_text(row.auditor.to_dict() if row.auditor else None, percent=True),
                   f"{row.mean_steps:.1f}"] for row in rows])]),
        "lco_fidelity", [row.to_dict() for row in rows])

    diversity, grid_rows = {}, []
    names = [*LABELS, NO_FINDING]
    for row in rows:
        if row.request not in names:
            continue
        column = names.index(row.request)
        of_label = real.labels[:, column] > 0.5 if row.request != NO_FINDING else ~(real.labels > 0.5).any(axis=1)
        real_images = real.images[of_label]
        entry = {"generated": mean_pairwise_ms_ssim(row.images[:, None], seed=plan.seed), "real": None,
                 "real_images": int(of_label.sum())}
        if len(real_images) >= 2:
            entry["real"] = mean_pairwise_ms_ssim(real_images, seed=plan.seed)
        diversity[row.request] = entry
        grid_rows.append((row.request, row.images[:6], real_images[:6, 0]))
    report.add(ReportSection(
        "Diversity within each requested finding",
        note=("Mean pairwise MS-SSIM among LCO images of one finding against the same among real images of "
              "that finding (higher is more alike: generated above real flags mode collapse). "
              f"Scales used: {next(iter(diversity.values()))['generated']['scales']} (image size limits them)."),
        tables=[(["finding", "generated MS-SSIM", "real MS-SSIM", "real images"],
                 [[name, f"{d['generated']['mean']:.3f} ± {d['generated']['sd']:.3f}",
                   "—" if d["real"] is None else f"{d['real']['mean']:.3f} ± {d['real']['sd']:.3f}",
                   d["real_images"]] for name, d in diversity.items()])]), "diversity", diversity)
    grid = report.picture("samples-per-finding.png", lambda path: plot_samples_beside_reals(grid_rows, path))
    report.add(ReportSection("Generated beside real, per finding", pictures=[grid],
                             note="Left: LCO images asking for the finding. Right: real images carrying it."))


def add_training_curve_section(report: ReportWriter, gan_run: Path) -> None:
    from training.metrics.builtin import FRECHET_DISTANCE
    from training.metrics.registry import read_results

    results = [r for r in read_results(gan_run, FRECHET_DISTANCE) if r.get("value") is not None]
    if not results:
        report.add(ReportSection("Fréchet distance during training",
                                 note=f"{gan_run} holds no Fréchet distance record (set train.metric_images)."))
        return
    picture = report.picture("frechet-during-training.png", lambda path: plot_frechet_during_training(
        results, path, f"{gan_run.name}: {results[-1]['protocol'].get('extractor', '')} features"))
    report.add(ReportSection("Fréchet distance during training", pictures=[picture],
                             summary={"records": len(results), "last images shown": results[-1]["images_shown"],
                                      "last value": results[-1]["value"]}), "frechet_during_training", results)


def add_tstr_section(report: ReportWriter, plan: EvaluationPlan, size: int, *, progress: bool) -> None:
    import tempfile

    from training.classifier import get_preset
    from training.data import open_dataset
    from training.evaluate.tstr import open_archive, plot_roc_curves, train_on_synthetic_test_on_real

    config = get_preset(plan.tstr_preset).override(plan.tstr_overrides)
    real = {split: open_dataset(plan.real, size, split=split, seed=plan.seed, **plan.real_options)
            for split in ("train", "val", "test")}
    synthetic = open_archive(plan.archive, size)
    with tempfile.TemporaryDirectory(prefix="tstr-") as runs:
        results = train_on_synthetic_test_on_real(config, real["train"], real["val"], real["test"], synthetic, runs,
                                                  progress=progress)
    picture = report.picture("tstr-roc.png", lambda path: plot_roc_curves(results, path))
    regimes = results["regimes"]
    rows = [[label, *(interval_text({"value": regimes[r]["per_label"][label]["auroc"],
                                     "ci_low": regimes[r]["per_label"][label]["ci_low"],
                                     "ci_high": regimes[r]["per_label"][label]["ci_high"]}) for r in regimes)]
            for label in LABELS]
    rows.append(["mean", *(f"{regimes[r]['mean_auroc']:.3f}" if regimes[r]["mean_auroc"] is not None else "—"
                           for r in regimes)])
    report.add(ReportSection(
        "Train on synthetic, test on real (TSTR)",
        note=(f"Classifier preset {plan.tstr_preset!r}; archive {plan.archive}; tested on "
              f"{results['test_images']} real held-out images. AUROC with 95% bootstrap CIs."),
        tables=[(["label", *regimes], rows)], pictures=[picture]),
        "tstr", {"regimes": regimes, "test_images": results["test_images"]})
