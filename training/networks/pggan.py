"""Progressive Growing GAN networks for single-channel images (Karras et al., ICLR 2018).

Both networks are built at full size up front, as in the official implementation; `resolution` and
`alpha` arguments select how much of them a forward pass uses:

- Generator: latent z (pixel-normalised) -> dense 4×4 block -> per resolution: nearest 2× upsampling,
  two 3×3 convolutions, each followed by leaky ReLU and pixel norm. A 1×1 "to-gray" convolution per
  resolution turns features into an image; during fade-in the image of resolution r is
  `lerp(upsample(to_gray[r/2](x_{r/2})), to_gray[r](x_r), alpha)`.
- Discriminator: the mirror: a 1×1 "from-gray" per resolution, two 3×3 convolutions and 2× average
  pooling per resolution, minibatch standard deviation (group 4), a 3×3 convolution and two dense layers
  at 4×4. During fade-in the input enters through `lerp(from_gray[r/2](avgpool(x)), block_r(from_gray[r](x)), alpha)`.

Every weight is drawn from N(0, 1) and multiplied at run time by gain / sqrt(fan_in) (equalised
learning rate); biases start at zero and are not scaled. The generator's forward is free of
tensor-dependent Python control flow and in-place ops on its input, so `torch.onnx.export` and
`torch.fx.experimental.proxy_tensor.make_fx` trace it as is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2
HE_GAIN = math.sqrt(2.0)

#: Segal et al. (2021) channel counts for 1024² chest x-rays, resolution -> feature maps.
PAPER_CHANNELS: dict[int, int] = {
    4: 512,
    8: 512,
    16: 512,
    32: 512,
    64: 256,
    128: 128,
    256: 64,
    512: 32,
    1024: 16,
}


def channels_for(resolution: int, channel_base: int = 16384, channel_max: int = 512) -> int:
    """Default feature maps at `resolution`: min(channel_max, channel_base / resolution) (PAPER_CHANNELS)."""
    return max(1, min(channel_max, channel_base // resolution))


def resolutions_up_to(resolution: int) -> list[int]:
    """[4, 8, ..., resolution]; raises for anything that is not a power of two ≥ 4."""
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two ≥ 4, got {resolution}")
    return [2**k for k in range(2, int(math.log2(resolution)) + 1)]


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise each pixel's feature vector to unit root-mean-square (over dim 1)."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def mbstd_group(batch: int, group_size: int) -> int:
    """The group `minibatch_stddev` forms for `batch` samples: G = min(group_size, batch).

    A batch smaller than `group_size` is one group; a larger one must be a multiple of `group_size`
    (ValueError otherwise, and for a group size below 1). Training configurations are checked with
    this same rule before a run starts.
    """
    if group_size < 1:
        raise ValueError(f"the minibatch-stddev group size must be at least 1, got {group_size}")
    group = min(group_size, batch)
    if batch % group:
        raise ValueError(f"batch size {batch} must be a multiple of the minibatch-stddev group {group}")
    return group


def minibatch_stddev(x: torch.Tensor, group_size: int = 4, eps: float = 1e-8) -> torch.Tensor:
    """Append one feature map: the mean over features and pixels of the std over each sample's group.

    Samples i, i + N/G, i + 2N/G, ... form a group of G = min(group_size, N) (the official layout).
    x: [N, C, H, W] -> [N, C + 1, H, W]; ValueError when G does not divide N (see `mbstd_group`).
    """
    batch, channels, height, width = x.shape
    group = mbstd_group(batch, group_size)
    y = x.reshape(group, -1, channels, height, width).float()
    y = y - y.mean(dim=0)
    y = torch.sqrt(y.square().mean(dim=0) + eps)  # [N/G, C, H, W]
    y = y.mean(dim=(1, 2, 3)).to(x.dtype)  # [N/G]
    y = y.reshape(-1, 1, 1, 1).repeat(group, 1, height, width)  # [N, 1, H, W]
    return torch.cat([x, y], dim=1)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2× upsampling as a broadcast, not ``F.interpolate``: the same values, but its
    gradient is a plain sum over each 2×2 block. ``F.interpolate``'s decomposes into an index-put
    (ONNX ScatterND with add), which ONNX Runtime runs slowly and, on several threads, in a varying
    order, so the exported LCO step would not give the same image twice."""
    _, c, h, w = x.shape  # the batch stays -1: traced graphs keep a dynamic batch
    return x[:, :, :, None, :, None].expand(-1, -1, -1, 2, -1, 2).reshape(-1, c, 2 * h, 2 * w)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2)


class EqualizedConv2d(nn.Module):
    """Conv2d with equalised learning rate: weight ~ N(0, 1), used as weight · gain / sqrt(fan_in)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = HE_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight.to(x.dtype), self.bias.to(x.dtype), padding=self.padding)

    def extra_repr(self) -> str:
        out_channels, in_channels, k, _ = self.weight.shape
        return f"{in_channels}, {out_channels}, kernel_size={k}, scale={self.scale:.4g}"


class EqualizedLinear(nn.Module):
    """Linear layer with equalised learning rate."""

    def __init__(self, in_features: int, out_features: int, gain: float = HE_GAIN) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.weight * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight.to(x.dtype), self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"{in_features}, {out_features}, scale={self.scale:.4g}"


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def _channel_table(
    resolution: int, channels: Mapping[int, int] | None, channel_base: int, channel_max: int
) -> dict[int, int]:
    table = {r: channels_for(r, channel_base, channel_max) for r in resolutions_up_to(resolution)}
    if channels is not None:
        unknown = sorted({int(r) for r in channels} - set(table))
        if unknown:
            raise ValueError(f"channels given for resolutions {unknown} outside 4..{resolution}")
        table.update({int(r): int(c) for r, c in channels.items()})
    return table


class GeneratorBlock(nn.Module):
    """One resolution of the generator: (dense 4×4 | upsample), then 3×3 conv(s), lrelu, pixel norm."""

    def __init__(self, in_channels: int, out_channels: int, first: bool) -> None:
        super().__init__()
        self.first = first
        if first:
            # The latent becomes a 4×4 map through a dense layer (gain sqrt(2)/4 as in the original).
            self.dense = EqualizedLinear(in_channels, out_channels * 16, gain=HE_GAIN / 4)
            self.conv0 = None
        else:
            self.dense = None
            self.conv0 = EqualizedConv2d(in_channels, out_channels, 3)
        self.conv1 = EqualizedConv2d(out_channels, out_channels, 3)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = self.dense(x).reshape(-1, self.out_channels, 4, 4)
        else:
            x = self.conv0(upsample2x(x))
        x = pixel_norm(_lrelu(x))
        return pixel_norm(_lrelu(self.conv1(x)))


class Generator(nn.Module):
    """z [B, latent_dim] -> image [B, image_channels, r, r] in the [-1, 1] convention (unbounded).

    resolution:   final (largest) resolution the generator grows to.
    channels:     feature maps per resolution; defaults to min(channel_max, channel_base / r).
    """

    def __init__(
        self,
        resolution: int = 1024,
        latent_dim: int = 512,
        channels: Mapping[int, int] | None = None,
        channel_base: int = 16384,
        channel_max: int = 512,
        image_channels: int = 1,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.latent_dim = latent_dim
        self.image_channels = image_channels
        self.channels = _channel_table(resolution, channels, channel_base, channel_max)
        self.resolutions = resolutions_up_to(resolution)
        self.blocks = nn.ModuleDict()
        self.to_gray = nn.ModuleDict()
        previous = latent_dim
        for r in self.resolutions:
            self.blocks[str(r)] = GeneratorBlock(previous, self.channels[r], first=r == 4)
            self.to_gray[str(r)] = EqualizedConv2d(self.channels[r], image_channels, 1, gain=1.0)
            previous = self.channels[r]

    def forward(self, z: torch.Tensor, resolution: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        resolution = self.resolution if resolution is None else resolution
        if resolution not in self.resolutions:
            raise ValueError(f"resolution {resolution} not in {self.resolutions}")
        x = pixel_norm(z)
        previous = x
        for r in self.resolutions:
            previous = x
            x = self.blocks[str(r)](x)
            if r == resolution:
                break
        image = self.to_gray[str(resolution)](x)
        if alpha < 1.0 and resolution > 4:
            coarse = upsample2x(self.to_gray[str(resolution // 2)](previous))
            image = torch.lerp(coarse, image, alpha)
        return image


class Discriminator(nn.Module):
    """image [B, image_channels, r, r] -> critic score [B] (WGAN: unbounded)."""

    def __init__(
        self,
        resolution: int = 1024,
        channels: Mapping[int, int] | None = None,
        channel_base: int = 16384,
        channel_max: int = 512,
        image_channels: int = 1,
        mbstd_group_size: int = 4,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.mbstd_group_size = mbstd_group_size
        self.channels = _channel_table(resolution, channels, channel_base, channel_max)
        self.resolutions = resolutions_up_to(resolution)
        self.from_gray = nn.ModuleDict(
            {str(r): EqualizedConv2d(image_channels, self.channels[r], 1) for r in self.resolutions}
        )
        self.blocks = nn.ModuleDict()
        for r in self.resolutions[1:]:
            self.blocks[str(r)] = nn.ModuleList(
                [
                    EqualizedConv2d(self.channels[r], self.channels[r], 3),
                    EqualizedConv2d(self.channels[r], self.channels[r // 2], 3),
                ]
            )
        c4 = self.channels[4]
        self.final_conv = EqualizedConv2d(c4 + 1, c4, 3)
        self.final_dense = EqualizedLinear(c4 * 16, c4)
        self.output = EqualizedLinear(c4, 1, gain=1.0)

    def _block(self, r: int, x: torch.Tensor) -> torch.Tensor:
        conv0, conv1 = self.blocks[str(r)]
        return downsample2x(_lrelu(conv1(_lrelu(conv0(x)))))

    def forward(self, image: torch.Tensor, resolution: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        resolution = image.shape[-1] if resolution is None else resolution
        if resolution not in self.resolutions or tuple(image.shape[-2:]) != (resolution, resolution):
            raise ValueError(
                f"discriminator expects square images at one of {self.resolutions}, got {tuple(image.shape)}"
            )
        x = _lrelu(self.from_gray[str(resolution)](image))
        if resolution > 4:
            x = self._block(resolution, x)
            if alpha < 1.0:
                coarse = _lrelu(self.from_gray[str(resolution // 2)](downsample2x(image)))
                x = torch.lerp(coarse, x, alpha)
            for r in reversed(self.resolutions[1 : self.resolutions.index(resolution)]):
                x = self._block(r, x)
        x = minibatch_stddev(x, self.mbstd_group_size)
        x = _lrelu(self.final_conv(x))
        x = _lrelu(self.final_dense(x.flatten(1)))
        return self.output(x).squeeze(1)
