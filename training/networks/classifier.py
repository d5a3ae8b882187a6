"""Multi-label pathology classifiers: a small CNN (CI, demo, auditor) and DenseNet-121 (CheXNet).

Every classifier maps a single-channel image in [-1, 1] to 14 logits (``service.labels.LABELS``
order) and a penultimate embedding: ``forward(image) -> (logits [B, 14], embedding [B, E])``.
Images of another size than ``input_size`` are resized bilinearly inside the network, so a
classifier trained at 224² can score a 1024² generator.

The networks use only operations whose input gradients export to ONNX through
``training.export.lco`` (convolution, eval-mode BatchNorm, ReLU, max/average pooling, bilinear
resize, concatenation, global mean), because LCO differentiates the classifier with respect to its
input inside one ONNX graph. Written in plain torch (no torchvision) to keep the training extra small.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.labels import NUM_LABELS

ARCHITECTURES = ("small_cnn", "densenet", "ensemble")


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild a classifier; stored beside its weights.

    ``arch`` is ``small_cnn`` (``channels`` per stage, two 3×3 convolutions each, then 2×2 max pool)
    or ``densenet`` (``block_config``, ``growth_rate``, ``init_features``, ``bn_size``; DenseNet-121 is
    (6, 12, 24, 16), 32, 64, 4). The DenseNet ``stem`` is ``imagenet`` (7×7 stride-2 convolution, 3×3
    stride-2 max pool: 4× down, for 224² and up) or ``compact`` (3×3 convolution, 2×2 max pool: 2× down,
    so that small findings in 32²–64² images survive the stem).
    """

    arch: str = "small_cnn"
    input_size: int = 64
    num_labels: int = NUM_LABELS
    channels: tuple[int, ...] = (16, 32, 64, 96)
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    growth_rate: int = 32
    init_features: int = 64
    bn_size: int = 4
    stem: str = "imagenet"
    dropout: float = 0.0
    members: tuple[ClassifierSpec, ...] = ()  # ensemble only: the members' specs
    shifts: tuple[tuple[int, int], ...] = ()  # ensemble only: extra views, (rows, columns) circular shifts
    vote_clip: float = 0.0  # ensemble only: each member's vote soft-clipped to ±vote_clip logits (0: not clipped)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierSpec:
        data = dict(data)
        for key in ("channels", "block_config"):
            if key in data:
                data[key] = tuple(int(v) for v in data[key])
        data["members"] = tuple(cls.from_dict(member) for member in data.get("members", ()))
        data["shifts"] = tuple((int(rows), int(columns)) for rows, columns in data.get("shifts", ()))
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown classifier spec fields: {sorted(unknown)}")
        return cls(**data)


def densenet121_spec(input_size: int = 224) -> ClassifierSpec:
    """CheXNet's network (Rajpurkar et al. 2017) with a single-channel stem."""
    return ClassifierSpec(arch="densenet", input_size=input_size, block_config=(6, 12, 24, 16),
                          growth_rate=32, init_features=64, bn_size=4)


def linear_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """[size_out, size_in]: 1-D linear interpolation (align_corners=False), one output pixel per row."""
    eye = torch.eye(size_in)[:, None, :]  # size_in signals, one impulse each
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[:, 0, :].T


class _Resize(nn.Module):
    """Bilinear resize to ``size``² when the input differs; identity otherwise.

    Written as two matrix products (bilinear is separable), which gives ``F.interpolate``'s values
    but a gradient of two more matrix products. ``F.interpolate``'s gradient becomes an index-put in
    the exported LCO step (ONNX ScatterND with add): slow, and summed in a varying order on several
    threads or on a GPU, so the same request would not give the same image twice.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2], image.shape[-1]
        if height == self.size and width == self.size:
            return image
        rows = linear_resize_matrix(height, self.size).to(image)  # constants when traced
        columns = linear_resize_matrix(width, self.size).to(image)
        return rows @ image @ columns.T


class SmallCNN(nn.Module):
    """VGG-style stages (two conv-BN-ReLU, then 2×2 max pool), global mean pool, linear head."""

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        self.spec = spec
        self.resize = _Resize(spec.input_size)
        layers: list[nn.Module] = []
        in_channels = 1
        for out_channels in spec.channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.embedding_dim = in_channels
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(in_channels, spec.num_labels)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.resize(image))
        embedding = features.mean(dim=(2, 3))
        return self.head(self.dropout(embedding)), embedding


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, dim=1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class _DenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size) for i in range(num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, dim=1)


class _Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) with a single-channel stem, as torchvision lays it out."""

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        self.spec = spec
        self.resize = _Resize(spec.input_size)
        channels = spec.init_features
        if spec.stem == "imagenet":
            stem: list[nn.Module] = [
                nn.Conv2d(1, channels, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        elif spec.stem == "compact":
            stem = [
                nn.Conv2d(1, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        else:
            raise ValueError(f"unknown DenseNet stem {spec.stem!r}; choose imagenet or compact")
        blocks: list[nn.Module] = []
        for i, num_layers in enumerate(spec.block_config):
            blocks.append(_DenseBlock(num_layers, channels, spec.growth_rate, spec.bn_size))
            channels += num_layers * spec.growth_rate
            if i != len(spec.block_config) - 1:
                blocks.append(_Transition(channels, channels // 2))
                channels //= 2
        self.features = nn.Sequential(*stem, *blocks, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.embedding_dim = channels
        self.dropout = nn.Dropout(spec.dropout)
        self.head = nn.Linear(channels, spec.num_labels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.resize(image))
        embedding = features.mean(dim=(2, 3))
        return self.head(self.dropout(embedding)), embedding


class ClassifierEnsemble(nn.Module):
    """Several trained classifiers read as one, for LCO to steer by.

    A member's vote is the mean over views (the image and its ``shifts``) of its logits minus its own
    decision threshold (as a logit), so every member votes on the same scale; with ``vote_clip`` = c
    the vote is soft-clipped to c·tanh(vote / c). The logits are the mean vote. Gradient descent on a
    single classifier finds pixel patterns that this one network reads as a finding and nothing else
    does; patterns that move several independently trained networks at once, and survive a shift of a
    few pixels, are much more often the finding itself. Clipping keeps one member that is sure from
    outvoting the others: the mean only passes a margin when most members lean the same way, and the
    gradient goes to the members not yet convinced (measured in docs/lco-quality.md against an
    auditor that is none of the members). The embedding is the members' embeddings of the image,
    concatenated.
    """

    def __init__(self, spec: ClassifierSpec):
        super().__init__()
        if not spec.members or any(member.arch == "ensemble" for member in spec.members):
            raise ValueError("an ensemble needs one or more members, none of them an ensemble")
        self.spec = spec
        self.members = nn.ModuleList(build_classifier(member) for member in spec.members)
        # Each member's thresholds as logits; set from the trained members (saved with the weights).
        self.register_buffer("centres", torch.zeros(len(spec.members), spec.num_labels))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = [image] + [torch.roll(image, shifts=shift, dims=(2, 3)) for shift in self.spec.shifts]
        clip = self.spec.vote_clip
        total, embeddings = 0.0, []
        for member, centre in zip(self.members, self.centres):
            vote = 0.0
            for number, view in enumerate(views):
                logits, embedding = member(view)
                vote = vote + (logits - centre)
                if number == 0:
                    embeddings.append(embedding)
            vote = vote / len(views)
            total = total + (clip * torch.tanh(vote / clip) if clip > 0 else vote)
        return total / len(self.members), torch.cat(embeddings, dim=1)


def classifier_passes(network: nn.Module) -> int:
    """Passes of one CNN over one image that a forward pass of ``network`` costs: members × views for a
    ``ClassifierEnsemble`` (the image and its shifted copies), 1 for a single classifier."""
    if isinstance(network, ClassifierEnsemble):
        return len(network.members) * (1 + len(network.spec.shifts))
    return 1


def feature_size(spec: ClassifierSpec) -> int:
    """Side of the last feature map of a small_cnn or densenet for an ``input_size``² image.

    Follows the layers: one 2× max pool per SmallCNN stage; DenseNet's stem (4× down for
    ``imagenet``, 2× for ``compact``) and one 2× average pool per transition. 0 means some pooling
    step had less than 2×2 to pool, so the network cannot run at that size. Raises ValueError for
    other architectures.
    """
    size = spec.input_size
    if spec.arch == "small_cnn":
        return size // 2 ** len(spec.channels)
    if spec.arch == "densenet":
        if spec.stem == "imagenet":
            size = (size - 1) // 2 + 1  # 7×7 convolution, stride 2, padding 3
            size = (size - 1) // 2 + 1  # 3×3 max pool, stride 2, padding 1
        else:
            size //= 2
        return size // 2 ** max(0, len(spec.block_config) - 1)  # transitions sit between blocks
    raise ValueError(f"feature_size covers small_cnn and densenet, not {spec.arch!r}")


def build_classifier(spec: ClassifierSpec) -> nn.Module:
    """The network ``spec`` describes, freshly initialised."""
    if spec.arch == "small_cnn":
        return SmallCNN(spec)
    if spec.arch == "densenet":
        return DenseNet(spec)
    if spec.arch == "ensemble":
        return ClassifierEnsemble(spec)
    raise ValueError(f"unknown classifier architecture {spec.arch!r}; choose one of {ARCHITECTURES}")
