"""InceptionV3 pool3 features with the FID weights: FID as Heusel et al. (2017) and pytorch-fid compute it.

Why a port: the kept libraries that carry this network all import torchvision, and PyPI's torchvision
does not import beside the project's CPU torch: torch-fidelity's package ``__init__`` imports its CLIP,
VGG16 and DINOv2 extractors and datasets (torchvision), torchmetrics' FID needs torch-fidelity, and
pytorch-fid's ``inception.py`` imports torchvision. So this module is pytorch-fid's ``FIDInceptionA/C/E``
and torchvision's ``Inception3`` layout (Szegedy et al. 2016), nothing more, with their parameter names,
so the standard weights load as they are.

Weights (never downloaded): ``pt_inception-2015-12-05-6726825d.pth``, the TensorFlow FID graph's weights
converted by pytorch-fid, from https://github.com/mseitzer/pytorch-fid/releases/tag/fid_weights. Its name
carries the first hex digits of its sha256 (torch.hub's convention), which is checked.
Preprocessing as pytorch-fid: grey repeated to 3 channels, bilinear resize to 299² (align_corners=False),
values in [-1, 1]; features are the 2048-d global average pool before the classifier.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.evaluate.features import Extractor, WeightsError, check_sha256, load_state_dict

INCEPTION_SIZE = 299
STANDARD_FILE = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average(x: torch.Tensor) -> torch.Tensor:
    # The TensorFlow FID graph averages over the valid pixels only (pytorch-fid's FIDInception blocks).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_average(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), double,
                          self.branch_pool(_average(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """The last blocks; `max_pool` is pytorch-fid's FIDInceptionE_2 (the TF graph's Mixed_7c pools by max)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _average(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(three), self.branch3x3_2b(three),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 up to the 2048-d pool3 features, torchvision's parameter names."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def load_inception_state(network: FIDInceptionV3, path: Path) -> None:
    """Load the FID weights into `network`: every parameter and BatchNorm statistic present with its shape
    (the file's classifier `fc.*` is left out). WeightsError naming the file otherwise."""
    state = load_state_dict(path, f"give the state dict file {STANDARD_FILE}")
    wanted = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise WeightsError(f"{path}: {len(missing)} InceptionV3 tensors missing (first: {missing[0]}); is this "
                           f"{STANDARD_FILE}?")
    for key, value in wanted.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise WeightsError(f"{path}: {key} has shape {list(state[key].shape)}, InceptionV3 expects "
                               f"{list(value.shape)}")
    network.load_state_dict({k: state[k] for k in wanted}, strict=False)


class InceptionFeatures(Extractor):
    """FID's InceptionV3 pool3 features [B, 2048] from the weights file at `weights`.

    The file's sha256 must equal `expected_sha256` when given, and begin with the hex digits its name
    carries after the last '-' (``…-6726825d.pth``) when it has them. WeightsError names the file.
    """

    def __init__(self, weights: str | Path, expected_sha256: str | None = None):
        path = Path(weights)
        self.weights_sha256 = check_sha256(path, expected_sha256)
        prefix = re.search(r"-([0-9a-f]{8,})\.pth?$", path.name)
        if prefix and not self.weights_sha256.startswith(prefix.group(1)):
            raise WeightsError(f"{path}: sha256 {self.weights_sha256} does not begin with {prefix.group(1)} as its "
                               "name says; the file is damaged or not the FID weights")
        self.network = FIDInceptionV3().eval()
        load_inception_state(self.network, path)
        self.name = "inception"
        self.weights = str(path)
        self.dim = 2048
        self.preprocessing = {"channels": "grey repeated to 3", "resize": "bilinear (align_corners=False)",
                              "size": INCEPTION_SIZE, "range": "[-1, 1]"}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        resized = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.network(resized.repeat(1, 3, 1, 1)).numpy()
