"""The LCO objective and its gradient as one traceable, ONNX-exportable graph.

LCO (latent class optimisation) moves a latent z so that the classifier, looking at G(z), agrees
with the requested labels. The service runs without torch, so the gradient ∂loss/∂z must live in
the ONNX graph itself. The route:

1. ``LCOObjective`` computes the per-sample loss from (z, target, mask).
2. ``torch.func.grad`` differentiates it with respect to z; the network weights enter through
   ``torch.func.functional_call`` as constants, so only (z, target, mask) are symbolic inputs (weights
   as symbolic inputs would let a weight dimension equal to the example batch pin the batch size).
3. ``make_fx`` records forward and backward as plain aten operations. Backward operations ONNX has no
   counterpart for are decomposed on the way into forward-style ones (``BACKWARD_DECOMPOSITIONS``):
   convolution input gradients become transposed convolutions, average-pool gradients transposed
   depth-wise convolutions, max-pool gradients arg-max masks placed by Pad and Slice (no scatter).
   (The networks themselves avoid operations whose gradient is an index-put: see ``upsample2x`` and
   the classifiers' ``_Resize``.)
4. ``LCOStepModule`` replays the traced graph, which ``torch.onnx.export(dynamo=True)`` then turns into ``lco_step.onnx`` with a dynamic batch dimension.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


class GeneratorGraph(nn.Module):
    """The exported generator: z → image at full resolution, clamped to [-1, 1]."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z).clamp(-1.0, 1.0)


class ClassifierGraph(nn.Module):
    """The exported classifier: image → (logits, embedding)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embedding = self.classifier(image)
        return logits, embedding


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE over the constrained labels, weighted by mask (0 free, 1 constrained, more: weightier).

    A sample with no constrained label has loss 0 and gradient 0.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def image_distance(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared pixel difference [B] of images [B, 1, H, W] in [-1, 1]."""
    return (image - reference).square().mean(dim=(1, 2, 3))


class LCOObjective(nn.Module):
    """(z, target, mask[, reference, image_pull]) → (loss [B], probs [B, 14], image [B, 1, H, W]) through
    G then C.

    The loss is the masked BCE plus image_pull [B, 1] times the mean squared pixel difference between
    G(z) and reference [B, 1, H, W] (POST /edit keeps the edited image near the original; an image
    pull of 0 adds exactly nothing, so plain LCO is unchanged). Without them, the BCE alone.
    """

    def __init__(self, generator: nn.Module, classifier: nn.Module):
        super().__init__()
        self.generator = GeneratorGraph(generator)
        self.classifier = classifier

    def forward(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                reference: torch.Tensor | None = None, image_pull: torch.Tensor | None = None):
        image = self.generator(z)
        logits, _ = self.classifier(image)
        loss = masked_bce(logits, target, mask)
        if reference is not None and image_pull is not None:
            loss = loss + image_pull[:, 0] * image_distance(image, reference)
        return loss, torch.sigmoid(logits), image


def reference_lco_step(objective: LCOObjective, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       reference: torch.Tensor | None = None, image_pull: torch.Tensor | None = None):
    """Eager torch autograd: the ground truth ``lco_step.onnx`` is checked against."""
    z = z.detach().clone().requires_grad_(True)
    loss, probs, image = objective(z, target, mask, reference, image_pull)
    (grad_z,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad_z, probs.detach(), image.detach()


@dataclass(frozen=True)
class GradientAgreement:
    """How far a gradient lies from a reference one (both [B, latent], compared as one vector).

    ``max_error`` is max|g − g_ref| / max|g_ref| (the largest error as a fraction of the largest
    entry), ``relative`` ‖g − g_ref‖₂ / ‖g_ref‖₂ and ``cosine`` the cosine similarity, all in float64.
    """

    max_error: float
    relative: float
    cosine: float

    @classmethod
    def of(cls, gradient: Any, reference: Any) -> GradientAgreement:
        candidate = np.asarray(gradient, dtype=np.float64).ravel()
        truth = np.asarray(reference, dtype=np.float64).ravel()
        if candidate.shape != truth.shape:
            raise ValueError(f"gradient shapes differ: {np.shape(gradient)} vs {np.shape(reference)}")
        scale = np.linalg.norm(truth)
        if scale == 0:
            raise ValueError("the reference gradient is zero: agreement is undefined")
        error = candidate - truth
        return cls(max_error=float(np.abs(error).max() / np.abs(truth).max()),
                   relative=float(np.linalg.norm(error) / scale),
                   cosine=float(candidate @ truth / (np.linalg.norm(candidate) * scale)))

    def __str__(self) -> str:
        return f"max error {self.max_error:.2e} of the largest entry, relative {self.relative:.2e}, cosine {self.cosine:.8f}"


# ---------------------------------------------------------------------------------------------
# Decompositions of backward operations into operations ONNX has.


def _transposed_output_padding(input_size: list[int], output_size: list[int], kernel: list[int],
                               stride: list[int], padding: list[int], dilation: list[int]) -> list[int]:
    """The output_padding a transposed convolution needs to reproduce the forward input size exactly
    (a strided forward convolution maps several input sizes to one output size)."""
    return [
        input_size[i] - ((output_size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + 1)
        for i in range(len(kernel))
    ]


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """Input gradient only (weights are constants in LCO): the transposed convolution.

    For stride 1 without groups (every convolution of PGGAN and most of the classifiers) the same
    gradient is an ordinary convolution with the kernel flipped and its in/out channels swapped,
    which ONNX Runtime runs several times faster than ConvTranspose on CPU.
    """
    if transposed:
        raise NotImplementedError("lco_step export supports gradients of ordinary convolutions only")
    grad_input = None
    kernel = list(weight.shape[2:])
    full_padding = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding)]
    if output_mask[0] and all(s == 1 for s in stride) and groups == 1 and all(p >= 0 for p in full_padding):
        flipped = weight.flip(list(range(2, weight.dim()))).transpose(0, 1)
        grad_input = aten.convolution(grad_output, flipped, None, [1] * len(kernel), full_padding, dilation, False,
                                      [0] * len(kernel), 1)
    elif output_mask[0]:
        pad = _transposed_output_padding(list(input.shape[2:]), list(grad_output.shape[2:]),
                                         list(weight.shape[2:]), list(stride), list(padding), list(dilation))
        grad_input = aten.convolution(grad_output, weight, None, stride, padding, dilation, True, pad, groups)
    return grad_input, None, None


def _avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    """Spread each gradient evenly over its window: a depth-wise transposed convolution of 1/|window|."""
    kernel = list(kernel_size) if len(kernel_size) == 2 else [kernel_size[0]] * 2
    step = list(stride) if stride else kernel
    step = step if len(step) == 2 else [step[0]] * 2
    pad = list(padding) if len(padding) == 2 else [padding[0]] * 2
    if any(pad) and not count_include_pad and divisor_override is None:
        raise NotImplementedError("avg_pool2d gradient with padding excluded from the count is not supported")
    channels = input.shape[1]
    divisor = divisor_override or kernel[0] * kernel[1]
    weight = grad_output.new_ones(channels, 1, kernel[0], kernel[1]) / divisor
    out_pad = _transposed_output_padding(list(input.shape[2:]), list(grad_output.shape[2:]), kernel, step, pad,
                                         [1, 1])
    return aten.convolution(grad_output, weight, None, step, pad, [1, 1], True, out_pad, channels)


def _max_pool2d_with_indices_backward(grad_output, input, kernel_size, stride, padding, dilation, ceil_mode,
                                      indices):
    """Route each window's gradient to its arg-max, as a fixed-order sum of non-overlapping pieces.

    Shapes: ``grad_output`` and ``indices`` [B, C, Ho, Wo] (indices flat into H×W, as torch records
    them), ``input`` [B, C, H, W]; returns [B, C, H, W]. For each kernel offset (ki, kj) the windows
    whose arg-max sits at that offset form one piece, ``where(indices == position, grad, 0)``; no two
    windows of a piece share an input pixel, so a piece is placed on the input grid by spreading it
    over the stride (interleaved zeros) and shifting it by the offset (Pad, Slice). The pieces are added
    in kernel order. The 3×3 stride-2 pool of the DenseNet stem (Huang et al. 2017) overlaps, and the
    usual scatter-add into the arg-max indices (ONNX ScatterElements with reduction add) sums in an
    order that depends on ONNX Runtime's threads; this form has no such operation. Ties go to the index
    the forward pass recorded, exactly as in torch.
    """
    height, width = input.shape[2], input.shape[3]
    kernel = list(kernel_size) if len(kernel_size) == 2 else [kernel_size[0]] * 2
    step = list(stride) if stride else kernel
    step = step if len(step) == 2 else [step[0]] * 2
    pad = list(padding) if len(padding) == 2 else [padding[0]] * 2
    dil = list(dilation) if len(dilation) == 2 else [dilation[0]] * 2
    out_height, out_width = grad_output.shape[2], grad_output.shape[3]
    tiling = kernel == step and not any(pad) and dil == [1, 1]
    if tiling and out_height * step[0] == height and out_width * step[1] == width:
        return _tiling_max_pool_backward(grad_output, input, kernel)
    rows = torch.arange(out_height, device=input.device).view(1, 1, out_height, 1) * step[0] - pad[0]
    columns = torch.arange(out_width, device=input.device).view(1, 1, 1, out_width) * step[1] - pad[1]
    # the padded canvas: input row r sits at canvas row r + pad; large enough for every shifted piece
    canvas = [max((kernel[i] - 1) * dil[i] + out * step[i], pad[i] + size)
              for i, out, size in ((0, out_height, height), (1, out_width, width))]
    zero = grad_output.new_zeros(())
    grad_input = None
    for ki in range(kernel[0]):
        for kj in range(kernel[1]):
            position = (rows + ki * dil[0]) * width + (columns + kj * dil[1])
            piece = _spread_over_stride(torch.where(indices == position, grad_output, zero), step)
            top, left = ki * dil[0], kj * dil[1]
            placed = F.pad(piece, (left, canvas[1] - left - piece.shape[3], top, canvas[0] - top - piece.shape[2]))
            placed = placed[:, :, pad[0]:pad[0] + height, pad[1]:pad[1] + width]
            grad_input = placed if grad_input is None else grad_input + placed
    return grad_input


def _tiling_max_pool_backward(grad_output: torch.Tensor, input: torch.Tensor, kernel: list[int]) -> torch.Tensor:
    """The max-pool gradient for windows that tile the input (2×2, stride 2), without the indices.

    Each window offset (ki, kj) is a strided slice of ``input`` at the pooled size; the first offset in
    the window's row-major order that equals the window's maximum takes the gradient, as torch's
    forward records ties. The pieces are interleaved back onto the input grid. Never reading the
    indices lets ONNX Runtime run its plain MaxPool, and nothing works at full size until the last
    interleave (the LCO step's cost: BENCHMARKS.md).
    """
    offsets = [[input[:, :, ki::kernel[0], kj::kernel[1]] for kj in range(kernel[1])] for ki in range(kernel[0])]
    window_max = functools.reduce(torch.maximum, (view for row in offsets for view in row))
    taken = None
    pieces = []
    for row in offsets:
        pieces.append([])
        for view in row:
            first = view == window_max if taken is None else (view == window_max) & ~taken
            taken = first if taken is None else taken | first
            pieces[-1].append(grad_output * first.to(grad_output.dtype))
    rows = [torch.stack(row, dim=-1).flatten(-2) for row in pieces]  # [B, C, Ho, W]
    return torch.stack(rows, dim=-2).flatten(-3, -2)  # [B, C, H, W]


def _spread_over_stride(x: torch.Tensor, stride: list[int]) -> torch.Tensor:
    """[B, C, h, w] → [B, C, h·sh, w·sw]: each value at the top-left of its stride cell, zeros elsewhere."""
    if stride[1] > 1:
        x = torch.stack([x] + [torch.zeros_like(x)] * (stride[1] - 1), dim=-1).flatten(-2)
    if stride[0] > 1:
        x = torch.stack([x] + [torch.zeros_like(x)] * (stride[0] - 1), dim=-2).flatten(-3, -2)
    return x


def _threshold_backward(grad_output, output, threshold):
    """ReLU's gradient as a product with its 0/1 mask: ONNX Runtime's Where is several times slower
    than Mul on CPU, and every classifier layer has one."""
    return grad_output * (output > threshold).to(grad_output.dtype)


def _leaky_relu_backward(grad_output, input, negative_slope, self_is_result):
    """Leaky ReLU's gradient as products with its 0/1 mask (exactly the values Where would pick)."""
    positive = (input > 0).to(grad_output.dtype)
    return grad_output * positive + (grad_output * negative_slope) * (1 - positive)


def _pow_tensor_scalar(x, exponent):
    """x¹, x², x³ as products: ONNX Runtime's general Pow is several times slower than Mul, and
    PGGAN's pixel norm (x², rsqrt, and x¹ and rsqrt³ in their gradients) runs after every layer."""
    if exponent == 1:
        return x.clone()
    if exponent == 2:
        return x * x
    if exponent == 3:  # the gradient of rsqrt
        return x * x * x
    return NotImplemented  # make_fx keeps the operation as it is


BACKWARD_DECOMPOSITIONS: dict[Any, Callable] = {
    aten.pow.Tensor_Scalar: _pow_tensor_scalar,
    aten.convolution_backward.default: _convolution_backward,
    aten.avg_pool2d_backward.default: _avg_pool2d_backward,
    aten.max_pool2d_with_indices_backward.default: _max_pool2d_with_indices_backward,
    aten.threshold_backward.default: _threshold_backward,
    aten.leaky_relu_backward.default: _leaky_relu_backward,
}


class LCOStepModule(nn.Module):
    """The traced gradient step as a module for ``torch.onnx.export`` (weights are graph constants)."""

    def __init__(self, graph: torch.fx.GraphModule):
        super().__init__()
        self.graph_module = graph

    def forward(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
                image_pull: torch.Tensor):
        loss, grad_z, probs, image = self.graph_module(z, target, mask, reference, image_pull)
        return loss, grad_z, probs, image


def lco_step_example(latent_dim: int, num_labels: int, resolution: int, batch: int) -> tuple[torch.Tensor, ...]:
    """Example inputs (z, target, mask, reference, image_pull) of the LCO step for tracing and export."""
    return (torch.randn(batch, latent_dim), torch.zeros(batch, num_labels), torch.ones(batch, num_labels),
            torch.zeros(batch, 1, resolution, resolution), torch.zeros(batch, 1))


def trace_lco_step(objective: LCOObjective, example_batch: int = 3) -> LCOStepModule:
    """Trace (z, target, mask, reference, image_pull) → (loss, grad_z, probs, image) into one
    forward-only graph.

    ``objective`` must be in eval mode (BatchNorm running statistics, no dropout). The weights enter
    as real tensors (graph constants with static shapes); only the five inputs are symbolic, so
    the batch dimension stays dynamic whatever its example size.
    """
    if objective.training:
        raise ValueError("put the generator and classifier in eval mode before tracing the LCO step")
    weights = {name: tensor.detach() for name, tensor in
               (*objective.named_parameters(), *objective.named_buffers())}

    def step(z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor,
             image_pull: torch.Tensor):
        def loss_of(latent: torch.Tensor):
            loss, probs, image = torch.func.functional_call(objective, weights,
                                                            (latent, target, mask, reference, image_pull))
            return loss.sum(), (loss, probs, image)

        grad_z, (loss, probs, image) = torch.func.grad(loss_of, has_aux=True)(z)
        return loss, grad_z, probs, image

    generator = objective.generator.generator
    example = lco_step_example(_latent_dim(generator), objective.classifier.spec.num_labels,
                               generator_resolution(generator), example_batch)
    graph = make_fx(step, decomposition_table=BACKWARD_DECOMPOSITIONS, tracing_mode="symbolic",
                    _allow_non_fake_inputs=True)(*example)
    return LCOStepModule(graph)


def generator_resolution(generator: nn.Module) -> int:
    """Side of the generator's images (one forward pass of one latent)."""
    with torch.no_grad():
        return int(generator(torch.zeros(1, _latent_dim(generator))).shape[-1])


def _latent_dim(generator: nn.Module) -> int:
    latent_dim = getattr(generator, "latent_dim", None)
    if not isinstance(latent_dim, int):
        raise TypeError("the generator must expose an integer `latent_dim` attribute")
    return latent_dim
