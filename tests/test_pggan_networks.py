"""PGGAN building blocks and networks: equalised LR, pixel norm, minibatch stddev, fade-in, shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.networks.pggan import (
    PAPER_CHANNELS,
    Discriminator,
    EqualizedConv2d,
    EqualizedLinear,
    Generator,
    channels_for,
    minibatch_stddev,
    pixel_norm,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_equalized_conv_effective_weight_is_he_scaled_and_bias_is_not():
    torch.manual_seed(0)
    layer = EqualizedConv2d(6, 5, kernel_size=3, gain=math.sqrt(2))
    fan_in = 6 * 3 * 3
    expected_weight = layer.weight * math.sqrt(2) / math.sqrt(fan_in)
    assert torch.allclose(layer.effective_weight, expected_weight)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(5.0))
    x = torch.randn(2, 6, 7, 7)
    assert torch.allclose(layer(x), F.conv2d(x, expected_weight, torch.arange(5.0), padding=1), atol=1e-6)
    # The stored weights are N(0, 1); the run-time scale carries the He constant.
    big = EqualizedConv2d(256, 256, kernel_size=3)
    assert abs(big.weight.std().item() - 1.0) < 0.01 and abs(big.weight.mean().item()) < 0.01


def test_equalized_linear_effective_weight_and_gain():
    torch.manual_seed(1)
    layer = EqualizedLinear(40, 3, gain=0.5)
    expected = layer.weight * 0.5 / math.sqrt(40)
    assert torch.allclose(layer.effective_weight, expected)
    x = torch.randn(4, 40)
    assert torch.allclose(layer(x), x @ expected.T, atol=1e-6)


def test_pixel_norm_gives_unit_rms_per_pixel_and_is_scale_invariant():
    x = torch.randn(3, 16, 5, 5) * torch.rand(3, 1, 5, 5) * 10
    y = pixel_norm(x)
    rms = y.square().mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-5)
    assert torch.allclose(pixel_norm(7.0 * x), y, atol=1e-5)
    manual = x / torch.sqrt((x**2).mean(dim=1, keepdim=True) + 1e-8)
    assert torch.allclose(y, manual, atol=1e-6)


def test_minibatch_stddev_matches_a_direct_computation():
    torch.manual_seed(2)
    x = torch.randn(8, 3, 4, 4)
    out = minibatch_stddev(x, group_size=4)
    assert out.shape == (8, 4, 4, 4)
    assert torch.equal(out[:, :3], x)
    # Groups take samples i, i + 2, i + 4, i + 6 (N/G = 2 groups interleaved).
    for first in range(2):
        members = x[first::2]
        expected = members.std(dim=0, unbiased=False).mean()
        for index in range(first, 8, 2):
            feature = out[index, 3]
            assert torch.allclose(feature, torch.full_like(feature, expected.item()), atol=1e-5)
    # Identical samples have (almost) zero spread; a batch smaller than the group uses itself.
    same = minibatch_stddev(torch.ones(4, 2, 4, 4))
    assert same[:, 2].abs().max() < 1e-3
    assert minibatch_stddev(torch.randn(2, 2, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="multiple"):
        minibatch_stddev(torch.randn(6, 2, 4, 4))


def test_fade_in_at_alpha_zero_equals_previous_resolution_upsampled():
    torch.manual_seed(3)
    generator = Generator(64, latent_dim=16, channel_base=256, channel_max=16)
    discriminator = Discriminator(64, channel_base=256, channel_max=16)
    z = torch.randn(4, 16)
    for resolution in (8, 16, 32, 64):
        coarse = generator(z, resolution // 2, alpha=1.0)
        faded = generator(z, resolution, alpha=0.0)
        assert torch.allclose(faded, F.interpolate(coarse, scale_factor=2, mode="nearest"), atol=1e-6)
        # alpha moves the output continuously towards the new resolution's image.
        full = generator(z, resolution, alpha=1.0)
        half = generator(z, resolution, alpha=0.5)
        assert torch.allclose(half, 0.5 * (faded + full), atol=1e-5)
        # The discriminator mirrors it: alpha = 0 sees only the 2×-pooled image.
        image = torch.randn(4, 1, resolution, resolution)
        assert torch.allclose(
            discriminator(image, resolution, alpha=0.0),
            discriminator(F.avg_pool2d(image, 2), resolution // 2),
            atol=1e-5,
        )


def test_shapes_at_every_resolution_up_to_1024():
    torch.manual_seed(4)
    channels = {r: 4 if r < 256 else 2 for r in PAPER_CHANNELS}  # small: the shapes are what matters
    generator = Generator(1024, latent_dim=8, channels=channels)
    discriminator = Discriminator(1024, channels=channels)
    assert generator.resolution == 1024 and generator.latent_dim == 8
    z = torch.randn(2, 8)
    with torch.no_grad():
        for resolution in (4, 8, 16, 32, 64, 128, 256, 512, 1024):
            alpha = 0.5 if resolution < 1024 else 1.0  # fade-in paths up to 512², the plain path at 1024²
            images = generator(z, resolution, alpha)
            assert images.shape == (2, 1, resolution, resolution)
            assert torch.isfinite(images).all()
            assert discriminator(images, resolution, alpha).shape == (2,)
        assert generator(z[:1]).shape == (1, 1, 1024, 1024)  # default: the final resolution
    with pytest.raises(ValueError, match="resolution"):
        generator(z, 12)


def test_paper_channel_defaults():
    assert {r: channels_for(r) for r in PAPER_CHANNELS} == PAPER_CHANNELS
    generator = Generator(1024)
    assert generator.channels == PAPER_CHANNELS
    assert generator.latent_dim == 512


def test_generator_traces_for_export():  # symbolically, as the LCO step export traces it
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(5)
    generator = Generator(32, latent_dim=16, channel_base=128, channel_max=16).eval()
    z = torch.randn(3, 16)
    traced = make_fx(lambda latents: generator(latents), tracing_mode="symbolic", _allow_non_fake_inputs=True)(z)
    other = torch.randn(5, 16)
    assert torch.allclose(traced(other), generator(other), atol=1e-6)
