"""ONNX export of the three bundle graphs, each with a dynamic batch dimension, and the builder of the
engine's Adam graph that the service ships.

Input and output names are the contract in docs/ARCHITECTURE.md (``service.bundle.GRAPH_IO``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from service.bundle import GRAPH_IO
from service.lco import ADAM_BETA1, ADAM_BETA2
from training.export.lco import (
    ClassifierGraph,
    GeneratorGraph,
    LCOObjective,
    generator_resolution,
    lco_step_example,
    trace_lco_step,
)

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
    """``lco_step.onnx``: (z, target, mask, reference, image_pull) → loss [B], grad_z [B, latent],
    probs [B, 14], image (training.export.lco.LCOObjective)."""
    objective = LCOObjective(generator, classifier).eval()
    step = trace_lco_step(objective, example_batch=_EXAMPLE_BATCH)
    example = lco_step_example(generator.latent_dim, classifier.spec.num_labels, generator_resolution(generator),
                               _EXAMPLE_BATCH)
    _export(step, example, *map(list, GRAPH_IO["lco_step"]), path, opset)


# Operations whose result ONNX Runtime may add up in an order its threads (or a GPU's blocks) decide:
# scatters add every update that lands on one index, in whatever order they arrive.
ORDER_DEPENDENT_OPS = ("ScatterElements", "ScatterND", "Scatter")


def order_dependent_sums(model: onnx.ModelProto) -> list[str]:
    """The nodes of ``model`` (top-level graph) that may sum in a thread-dependent order, as
    ``"OpType name"``; empty for a graph whose every output is the same on any number of threads."""
    return [f"{node.op_type} {node.name}" for node in model.graph.node if node.op_type in ORDER_DEPENDENT_OPS]


def build_adam_sphere_graph() -> onnx.ModelProto:
    """One Adam step on z followed by projection onto the sphere of radius ``radius``.

    Inputs z, grad, m, v [B, d]; step_size and eps_hat [B, 1] carry each sample's bias-corrected
    learning rate (lr * sqrt(1 - b2^t) / (1 - b1^t)) and epsilon (eps * sqrt(1 - b2^t)); radius [1].
    anchor [B, d] and pull [B, 1] add a proximity term (pull / 2) * |z - anchor|^2 to each sample's
    loss, i.e. pull * (z - anchor) to its gradient (POST /edit keeps an edited latent near the
    original's); pull = 0 leaves the step exactly plain Adam.
    The service ships this graph as service/data/adam_sphere_step.onnx (it needs onnxruntime only);
    this builder needs the ``onnx`` package and is what wrote that file (see tests/test_lco.py).
    """
    def tensor(name: str, *shape: Any) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    def scalar(name: str, value: float) -> Any:
        return helper.make_tensor(name, TensorProto.FLOAT, [], [value])

    nodes = [
        helper.make_node("Sub", ["z", "anchor"], ["offset"]),
        helper.make_node("Mul", ["offset", "pull"], ["proximity_grad"]),
        helper.make_node("Add", ["grad", "proximity_grad"], ["grad_total"]),
        helper.make_node("Mul", ["m", "beta1"], ["m_decay"]),
        helper.make_node("Mul", ["grad_total", "one_minus_beta1"], ["m_new_part"]),
        helper.make_node("Add", ["m_decay", "m_new_part"], ["m_next"]),
        helper.make_node("Mul", ["v", "beta2"], ["v_decay"]),
        helper.make_node("Mul", ["grad_total", "grad_total"], ["grad_sq"]),
        helper.make_node("Mul", ["grad_sq", "one_minus_beta2"], ["v_new_part"]),
        helper.make_node("Add", ["v_decay", "v_new_part"], ["v_next"]),
        helper.make_node("Sqrt", ["v_next"], ["v_root"]),
        helper.make_node("Add", ["v_root", "eps_hat"], ["denominator"]),
        helper.make_node("Div", ["m_next", "denominator"], ["direction"]),
        helper.make_node("Mul", ["direction", "step_size"], ["update"]),
        helper.make_node("Sub", ["z", "update"], ["z_moved"]),
        helper.make_node("ReduceSumSquare", ["z_moved"], ["norm_sq"], axes=[1], keepdims=1),
        helper.make_node("Sqrt", ["norm_sq"], ["norm"]),
        helper.make_node("Max", ["norm", "tiny"], ["norm_safe"]),
        helper.make_node("Div", ["radius", "norm_safe"], ["scale"]),
        helper.make_node("Mul", ["z_moved", "scale"], ["z_next"]),
    ]
    batch, latent = "batch", "latent"
    graph = helper.make_graph(
        nodes,
        "adam_sphere_step",
        [tensor("z", batch, latent), tensor("grad", batch, latent), tensor("m", batch, latent),
         tensor("v", batch, latent), tensor("step_size", batch, 1), tensor("eps_hat", batch, 1), tensor("radius", 1),
         tensor("anchor", batch, latent), tensor("pull", batch, 1)],
        [tensor("z_next", batch, latent), tensor("m_next", batch, latent), tensor("v_next", batch, latent)],
        initializer=[
            scalar("beta1", ADAM_BETA1),
            scalar("one_minus_beta1", 1 - ADAM_BETA1),
            scalar("beta2", ADAM_BETA2),
            scalar("one_minus_beta2", 1 - ADAM_BETA2),
            scalar("tiny", 1e-12),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cxrsynth")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
