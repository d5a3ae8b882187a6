"""ONNX export of the three bundle graphs, each with a dynamic batch dimension.

Input and output names are the contract in docs/ARCHITECTURE.md (``service.bundle.GRAPH_IO``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from training.export.lco import ClassifierGraph, GeneratorGraph, LCOObjective, trace_lco_step

OPSET = 18
MAX_BATCH = 4096
_EXAMPLE_BATCH = 3  # not 1: torch.export would specialise the batch dimension to a constant


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
            output_names: list[str], path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic_shapes = {name: {0: batch} for name in input_names}
    # The exporter narrates every stage on stdout and warns about torchvision ops we never use.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, example, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
            external_data=False,
        )
    program.save(str(path), external_data=False)


def export_generator(generator: nn.Module, path: Path, opset: int = OPSET) -> None:
    """``generator.onnx``: z [B, latent] → image [B, 1, H, W] in [-1, 1]."""
    graph = GeneratorGraph(generator).eval()
    z = torch.randn(_EXAMPLE_BATCH, generator.latent_dim)
    _export(graph, (z,), ["z"], ["image"], path, opset)


def export_classifier(classifier: nn.Module, resolution: int, path: Path, opset: int = OPSET) -> None:
    """``classifier.onnx``: image [B, 1, H, W] → logits [B, 14], embedding [B, E]."""
    graph = ClassifierGraph(classifier).eval()
    image = torch.rand(_EXAMPLE_BATCH, 1, resolution, resolution) * 2 - 1
    _export(graph, (image,), ["image"], ["logits", "embedding"], path, opset)


def export_lco_step(generator: nn.Module, classifier: nn.Module, path: Path, opset: int = OPSET) -> None:
    """``lco_step.onnx``: (z, target, mask) → loss [B], grad_z [B, latent], probs [B, 14], image."""
    objective = LCOObjective(generator, classifier).eval()
    step = trace_lco_step(objective, example_batch=_EXAMPLE_BATCH)
    num_labels = classifier.spec.num_labels
    example = (
        torch.randn(_EXAMPLE_BATCH, generator.latent_dim),
        torch.zeros(_EXAMPLE_BATCH, num_labels),
        torch.ones(_EXAMPLE_BATCH, num_labels),
    )
    _export(step, example, ["z", "target", "mask"], ["loss", "grad_z", "probs", "image"], path, opset)
