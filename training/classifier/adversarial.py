"""Projected gradient descent (PGD) on the training images: adversarial (robust) classifier training.

Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks" (ICLR): train on the
worst perturbation of each batch within a small L2 or L∞ ball, found by a few projected gradient
ascent steps on the loss from a random start. A classifier trained so has input gradients that change
what a person would see (perceptually aligned gradients: Santurkar et al. 2019, "Image Synthesis with a
Single (Robust) Classifier", NeurIPS; Kaur et al. 2019, "Are Perceptually-Aligned Gradients a General
Property of Robust Classifiers?"), which is what LCO descends on: one robust CNN can steer it where a
plain one needed an ensemble of nine (docs/lco-quality.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.classifier.config import AdversarialConfig


def _per_image_l2(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of each image of a [B, ...] tensor, shaped [B, 1, 1, 1] for broadcasting."""
    return tensor.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (tensor.dim() - 1)))


def project(delta: torch.Tensor, norm: str, epsilon: float) -> torch.Tensor:
    """``delta`` [B, C, H, W] moved into the ``norm`` ball of radius ``epsilon`` (per image)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    return delta * (epsilon / _per_image_l2(delta)).clamp(max=1.0)


def random_start(images: torch.Tensor, norm: str, epsilon: float, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the ball: uniform per pixel for L∞; a random direction at a uniform radius for L2."""
    if norm == "linf":
        return (torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1) * epsilon
    direction = torch.randn(images.shape, generator=generator, device=images.device)
    radius = torch.rand((images.shape[0],) + (1,) * (images.dim() - 1), generator=generator, device=images.device)
    return direction / _per_image_l2(direction) * radius * epsilon


def pgd_perturb(images: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor], config: AdversarialConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The PGD adversarial images for ``images`` [B, 1, H, W] in [-1, 1] (Madry et al. 2018).

    ``loss_of(images) -> scalar`` is the training loss on a batch (the network and labels bound in);
    ``config.steps`` ascent steps of ``config.resolved_step_size`` (the sign of the gradient for L∞, the
    per-image normalised gradient for L2) from a random start, each projected back into the
    ``config.epsilon`` ball and the [-1, 1] pixel range. Returns detached images of the same shape, each
    within ``epsilon`` of its original under ``config.norm``. Parameter gradients are left untouched.
    Raises ValueError when ``config.norm`` is ``none``.
    """
    if not config.enabled:
        raise ValueError("adversarial.norm is 'none': there is no perturbation to find; use l2 or linf")
    images = images.detach()
    norm, epsilon, step = config.norm, config.epsilon, config.resolved_step_size
    delta = project(random_start(images, norm, epsilon, generator), norm, epsilon)
    delta = (images + delta).clamp(-1.0, 1.0) - images
    for _ in range(config.steps):
        delta.requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss_of(images + delta), delta)
        with torch.no_grad():
            ascent = gradient.sign() if norm == "linf" else gradient / _per_image_l2(gradient)
            delta = project(delta + step * ascent, norm, epsilon)
            delta = (images + delta).clamp(-1.0, 1.0) - images  # a pixel range clamp stays inside the ball
    return (images + delta).detach()
