"""WGAN-GP: the gradient penalty against a direct Jacobian, under loss scaling, and the full critic loss."""

from __future__ import annotations

import pytest
import torch

from training.gan.loss import discriminator_loss, generator_loss, gradient_penalty
from training.networks.pggan import Discriminator

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _critic() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(16, channel_base=64, channel_max=8).double()


def test_gradient_penalty_equals_direct_autograd_jacobian():
    critic = _critic()
    reals = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    fakes = torch.randn(4, 1, 16, 16, dtype=torch.float64)
    mix = torch.rand(4, dtype=torch.float64)
    penalty = gradient_penalty(critic, reals.float().double(), fakes, 16, 1.0, mix=mix)

    mixed = reals + mix.reshape(-1, 1, 1, 1) * (fakes - reals)
    jacobian = torch.autograd.functional.jacobian(lambda x: critic(x, 16, 1.0), mixed)  # [B, B, 1, H, W]
    # The penalty differentiates sum_j D(x̂)_j (minibatch stddev couples the samples) w.r.t. each x̂_i.
    gradients = jacobian.sum(dim=0).flatten(1)
    direct = ((gradients.norm(dim=1) - 1) ** 2).mean()
    assert torch.allclose(penalty.double(), direct, rtol=1e-5)


def test_gradient_penalty_is_differentiable_in_the_critic_weights():
    critic = _critic()
    penalty = gradient_penalty(
        critic, torch.randn(4, 1, 16, 16).double(), torch.randn(4, 1, 16, 16).double(), 16, 1.0
    )
    penalty.backward()
    grads = [p.grad for p in critic.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_gradient_penalty_is_unchanged_by_loss_scaling():
    torch.manual_seed(1)
    critic = Discriminator(16, channel_base=64, channel_max=8)
    reals, fakes, mix = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16), torch.rand(4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    plain = gradient_penalty(critic, reals, fakes, 16, 1.0, mix=mix)
    scaled = gradient_penalty(critic, reals, fakes, 16, 1.0, mix=mix, scaler=scaler)
    assert torch.allclose(plain, scaled, rtol=1e-4)


def test_discriminator_loss_is_wgan_plus_penalty_plus_drift():
    torch.manual_seed(2)
    critic = Discriminator(16, channel_base=64, channel_max=8)
    reals, fakes = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    torch.manual_seed(3)
    result = discriminator_loss(critic, reals, fakes, 16, 0.7, gp_weight=10.0, drift_weight=0.001)
    score_real, score_fake = critic(reals, 16, 0.7), critic(fakes, 16, 0.7)
    torch.manual_seed(3)
    penalty = gradient_penalty(critic, reals, fakes, 16, 0.7)
    expected = score_fake.mean() - score_real.mean() + 10.0 * penalty + 0.001 * score_real.square().mean()
    assert torch.allclose(result.loss, expected, atol=1e-5)
    assert torch.allclose(result.drift, score_real.square().mean())
    assert torch.allclose(generator_loss(critic, fakes, 16, 0.7), -score_fake.mean())
