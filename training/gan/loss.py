"""WGAN-GP losses with the PGGAN drift term (Gulrajani et al. 2017; Karras et al. 2018).

    L_D = E[D(fake)] - E[D(real)] + λ · E[(‖∇_x̂ D(x̂)‖₂ - 1)²] + ε_drift · E[D(real)²]
    L_G = -E[D(fake)]

with x̂ = lerp(real, fake, u), u ~ U[0, 1] per sample, λ = 10, ε_drift = 0.001.

Mixed precision: the penalty differentiates D's output with respect to its input inside the graph.
Under a `GradScaler` the output is scaled before `autograd.grad` (so fp16 gradients do not underflow)
and the gradient is unscaled in fp32 before the norm is taken, as in PyTorch's AMP recipe for
gradient penalties; if that gradient overflows, the loss becomes non-finite and the step is skipped
while the scaler backs off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DiscriminatorLoss:
    loss: torch.Tensor  # scalar to backpropagate
    score_real: torch.Tensor  # E[D(real)], detached
    score_fake: torch.Tensor  # E[D(fake)], detached
    penalty: torch.Tensor  # E[(‖∇D(x̂)‖ - 1)²], detached
    drift: torch.Tensor  # E[D(real)²], detached


def gradient_penalty(
    discriminator: nn.Module,
    reals: torch.Tensor,
    fakes: torch.Tensor,
    resolution: int,
    alpha: float,
    mix: torch.Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    target: float = 1.0,
) -> torch.Tensor:
    """E[(‖∇_x̂ D(x̂)‖₂ - target)²] at x̂ = lerp(reals, fakes, mix) (mix ~ U[0,1] per sample if None)."""
    dtype = torch.promote_types(reals.dtype, torch.float32)  # fp32 (or fp64), never half
    if mix is None:
        mix = torch.rand(reals.shape[0], 1, 1, 1, device=reals.device, dtype=dtype)
    mixed = torch.lerp(reals.to(dtype), fakes.to(dtype), mix.to(dtype).reshape(-1, 1, 1, 1)).requires_grad_(
        True
    )
    with torch.autocast(
        mixed.device.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None
    ):
        scores = discriminator(mixed, resolution, alpha)
    scores_sum = scores.to(dtype).sum()
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scores_sum = scaler.scale(scores_sum)
    (gradient,) = torch.autograd.grad(scores_sum, mixed, create_graph=True)
    gradient = gradient.to(dtype)
    if scaling:
        gradient = gradient / scaler.get_scale()
    norms = gradient.flatten(1).norm(2, dim=1)
    return (norms - target).square().mean()


def discriminator_loss(
    discriminator: nn.Module,
    reals: torch.Tensor,
    fakes: torch.Tensor,
    resolution: int,
    alpha: float,
    gp_weight: float = 10.0,
    drift_weight: float = 0.001,
    gp_target: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> DiscriminatorLoss:
    """WGAN-GP critic loss plus drift; `fakes` must already be detached from the generator."""
    with torch.autocast(
        reals.device.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None
    ):
        # Separate passes: minibatch stddev must see groups of reals only and of fakes only.
        score_real = discriminator(reals, resolution, alpha).float()
        score_fake = discriminator(fakes, resolution, alpha).float()
    penalty = gradient_penalty(
        discriminator,
        reals,
        fakes,
        resolution,
        alpha,
        scaler=scaler,
        autocast_dtype=autocast_dtype,
        target=gp_target,
    )
    drift = score_real.square().mean()
    loss = score_fake.mean() - score_real.mean() + gp_weight * penalty + drift_weight * drift
    return DiscriminatorLoss(
        loss=loss,
        score_real=score_real.mean().detach(),
        score_fake=score_fake.mean().detach(),
        penalty=penalty.detach(),
        drift=drift.detach(),
    )


def generator_loss(
    discriminator: nn.Module,
    fakes: torch.Tensor,
    resolution: int,
    alpha: float,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """WGAN generator loss -E[D(G(z))]."""
    with torch.autocast(
        fakes.device.type, dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None
    ):
        scores = discriminator(fakes, resolution, alpha).float()
    return -scores.mean()
