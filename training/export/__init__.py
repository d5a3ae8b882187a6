"""Export trained networks as a model bundle, the only contract between training and the service.

``export_bundle`` writes generator.onnx, classifier.onnx, lco_step.onnx and a sealed manifest.json
(docs/ARCHITECTURE.md); ``save_to_model_store`` puts the same files into the BentoML model store.
"""

from training.export.bundle import ExportCheckError, GeneratorInfo, check_parity, export_bundle, git_commit
from training.export.lco import (
    GradientAgreement,
    LCOObjective,
    masked_bce,
    reference_lco_step,
    trace_lco_step,
)
from training.export.model_store import model_tag, save_to_model_store
from training.export.onnx_graphs import (
    ORDER_DEPENDENT_OPS,
    export_classifier,
    export_generator,
    export_lco_step,
    order_dependent_sums,
)

__all__ = [
    "ORDER_DEPENDENT_OPS",
    "ExportCheckError",
    "GeneratorInfo",
    "GradientAgreement",
    "LCOObjective",
    "check_parity",
    "export_bundle",
    "export_classifier",
    "export_generator",
    "export_lco_step",
    "git_commit",
    "masked_bce",
    "model_tag",
    "order_dependent_sums",
    "reference_lco_step",
    "save_to_model_store",
    "trace_lco_step",
]
