"""Multi-label pathology classifiers: training, evaluation, and the independent auditor.

The LCO classifier and the auditor come out of the same trainer (``train_classifier``) with different
presets: another architecture, another seed and a disjoint phantom stream for the auditor, which is
used only to judge label fidelity and never inside LCO.
"""

from training.classifier.artifact import TrainedClassifier
from training.classifier.config import (
    DEMO_MEMBERS,
    ClassifierTrainConfig,
    DataConfig,
    get_preset,
    preset_names,
)
from training.classifier.metrics import LabelAUROC, auroc, mean_auroc, per_label_auroc, youden_thresholds
from training.classifier.trainer import build_splits, evaluate, predict, train_classifier

__all__ = [
    "DEMO_MEMBERS",
    "ClassifierTrainConfig",
    "DataConfig",
    "LabelAUROC",
    "TrainedClassifier",
    "auroc",
    "build_splits",
    "evaluate",
    "get_preset",
    "mean_auroc",
    "per_label_auroc",
    "predict",
    "preset_names",
    "train_classifier",
    "youden_thresholds",
]
