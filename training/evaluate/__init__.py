"""The evaluation suite: how good are generated x-rays, measured the same way every time.

Layout after stylegan2-ada-pytorch's metrics/: feature extractors (`features`, `inception`) apart from
the metrics on features (`distances`: Fréchet distance, KID, PRDC, bootstrap CIs), reference statistics
saved with their protocol (`statistics`), the registered `frechet_distance` metric (`metrics`), label
checks (`labels`: label distribution, LCO fidelity), diversity (`diversity`: MS-SSIM), train on
synthetic / test on real (`tstr`), image sets (`images`), the report (`report`), one run of everything
(`suite`) and the commands `python -m training.cli evaluate …` (`commands`). See docs/evaluation.md.
"""

from training.evaluate.distances import (
    TooFewSamples,
    bootstrap_interval,
    frechet_distance,
    frechet_distance_from_statistics,
    kernel_inception_distance,
    precision_recall_density_coverage,
)
from training.evaluate.features import FeatureSet, WeightsError, extract, make_extractor
from training.evaluate.images import ImageFormatError, ImageSet, generate_images, patient_halves, read_images
from training.evaluate.metrics import distribution_metrics, frechet_distance_metric
from training.evaluate.report import ReportSection, ReportWriter
from training.evaluate.statistics import ProtocolMismatch, check_comparable, load_statistics, save_statistics
from training.evaluate.suite import EvaluationPlan, evaluate_bundle

__all__ = [
    "EvaluationPlan",
    "FeatureSet",
    "ImageFormatError",
    "ImageSet",
    "ProtocolMismatch",
    "ReportSection",
    "ReportWriter",
    "TooFewSamples",
    "WeightsError",
    "bootstrap_interval",
    "check_comparable",
    "distribution_metrics",
    "evaluate_bundle",
    "extract",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "frechet_distance_metric",
    "generate_images",
    "kernel_inception_distance",
    "load_statistics",
    "make_extractor",
    "patient_halves",
    "precision_recall_density_coverage",
    "read_images",
    "save_statistics",
]
