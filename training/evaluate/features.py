"""Feature extractors for the distances, each stating what it is so that numbers stay comparable.

An extractor maps images [B, 1, H, W] float32 in [-1, 1] (the project's pixel convention) to features
[B, D]. Its `protocol` names the network, the sha256 of its weights file and the preprocessing (grey to
channels, resize filter and size, intensity scaling); `extract` adds the sample count. Statistics made
under two protocols are never compared (`training.evaluate.statistics`).

- ``bundle``: the bundle classifier's embedding through ONNX Runtime (`service.bundle.Bundle.classify`),
  always available: an x-ray-specific Fréchet distance.
- ``auditor``: a trained classifier directory's embedding (`TrainedClassifier`; the auditor never steers
  LCO, so it is the fairer judge of images made by LCO).
- ``xrv-densenet``: torchxrayvision's DenseNet-121 (Cohen et al. 2022, "TorchXRayVision: a library of
  chest X-ray datasets and models"), the 1024-d pooled features used for the Fréchet distance by RoentGen
  (Chambon et al. 2022) and MONAI, from a state dict the user gives by path.
- ``inception``: InceptionV3 pool3 features with the FID weights (``pt_inception-2015-12-05``) by path:
  FID proper (`training.evaluate.inception`).

Extractors live apart from the metrics, after stylegan2-ada-pytorch's metrics/ layout.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

EXTRACTORS = ("bundle", "auditor", "xrv-densenet", "inception")


class WeightsError(ValueError):
    """A weights file that is not the network expected; the message names the file."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str | None) -> str:
    """The file's sha256; WeightsError naming the file when `expected` is given and differs."""
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    actual = file_sha256(path)
    if expected is not None and actual != expected.lower():
        raise WeightsError(f"{path}: sha256 {actual} is not the expected {expected.lower()}; "
                           "is this the right weights file?")
    return actual


def load_state_dict(path: Path, hint: str) -> dict[str, torch.Tensor]:
    """The tensors of a torch state dict file (loaded without unpickling code); WeightsError naming the
    file, with `hint` on what to save instead, for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as error:
        raise WeightsError(f"{path}: not a torch state dict ({type(error).__name__}); {hint}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors; {hint}")
    return state


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking, PIL-like) of [B, C, H, W] to size²; identity when equal."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@dataclass(frozen=True)
class FeatureSet:
    """Features [N, D] (float32) of N images and the protocol that made them (extractor, weights
    sha256, preprocessing, `count`, and where the images came from under `source`)."""

    features: np.ndarray
    protocol: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)


class Extractor:
    """Base: `name`, `weights_sha256`, `preprocessing` (a dict), `dim`; `__call__` on one batch."""

    name: str
    weights: str
    weights_sha256: str
    preprocessing: dict[str, Any]
    dim: int

    def __call__(self, images: torch.Tensor) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def protocol(self) -> dict[str, Any]:
        return {"extractor": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "preprocessing": dict(self.preprocessing), "dim": self.dim}


class BundleClassifierFeatures(Extractor):
    """The bundle classifier's embedding [B, E] (ONNX Runtime), images resized to the bundle's resolution."""

    def __init__(self, bundle: Any):
        from service.bundle import load_bundle

        self.bundle = load_bundle(bundle) if isinstance(bundle, (str, Path)) else bundle
        manifest = self.bundle.manifest
        self.name = "bundle"
        self.weights = f"{manifest.name}:{manifest.version}/classifier.onnx"
        self.weights_sha256 = manifest.files["classifier.onnx"].sha256
        self.size = manifest.resolution
        self.dim = manifest.embedding_dim
        self.preprocessing = {"channels": "grey (1)", "resize": "bilinear, antialiased", "size": self.size,
                              "range": "[-1, 1]"}

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.bundle.classify(resize(images, self.size).numpy())[1]


class ClassifierFeatures(Extractor):
    """A trained classifier's embedding [B, E] (`classifier.safetensors` + `classifier.json`), resized by
    the network's own bilinear layer to its input size."""

    def __init__(self, directory: str | Path, name: str = "auditor"):
        from training.classifier.artifact import WEIGHTS_NAME, TrainedClassifier

        self.classifier = TrainedClassifier.load(directory)
        directory = Path(directory)
        weights = directory / WEIGHTS_NAME if (directory / WEIGHTS_NAME).is_file() else \
            directory / "classifier" / WEIGHTS_NAME
        self.name = name
        self.weights = str(weights)
        self.weights_sha256 = file_sha256(weights)
        spec = self.classifier.spec
        with torch.no_grad():
            self.dim = int(self.classifier.network(torch.zeros(1, 1, spec.input_size, spec.input_size))[1].shape[1])
        self.preprocessing = {"channels": "grey (1)", "resize": "bilinear (network's own)", "size": spec.input_size,
                              "range": "[-1, 1]", "arch": spec.arch}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.network(images)[1].numpy()


XRV_SIZE = 224
XRV_RANGE = 1024.0  # torchxrayvision.datasets.normalize maps [0, 255] to [-1024, 1024]


class XRVDenseNetFeatures(Extractor):
    """torchxrayvision DenseNet-121 pooled features [B, 1024] from a state dict file.

    The file is ``torch.save(xrv.models.DenseNet(weights=...).state_dict(), path)`` (torchvision's
    DenseNet-121 key names, a one-channel ``features.conv0``). The network is the project's DenseNet
    (`training.networks.classifier.DenseNet`, torchvision's layout) and the file's ``features.*``
    tensors are loaded in order, each shape checked. Preprocessing as torchxrayvision: one channel,
    intensities scaled to [-1024, 1024], 224² (bilinear); features are ReLU then global average pooling
    (xrv's ``features2``).

    Raises WeightsError naming the file for a missing file, a checksum other than `expected_sha256`, a
    pickled model instead of a state dict, or keys/shapes of another network.
    """

    def __init__(self, weights: str | Path, expected_sha256: str | None = None):
        from training.networks.classifier import DenseNet, densenet121_spec

        path = Path(weights)
        self.weights_sha256 = check_sha256(path, expected_sha256)
        state = load_state_dict(path, "save `model.state_dict()` of the torchxrayvision DenseNet, not the model")
        self.network = DenseNet(densenet121_spec(XRV_SIZE)).eval()
        ours = {k: v for k, v in self.network.state_dict().items() if k.startswith("features.")}
        theirs = [(k, v) for k, v in state.items() if k.startswith("features.")]
        if len(theirs) != len(ours):
            raise WeightsError(f"{path}: {len(theirs)} 'features.*' tensors, a DenseNet-121 has {len(ours)}; "
                               "is this a torchxrayvision DenseNet-121 state dict?")
        mapped = {}
        for (our_key, our_value), (their_key, their_value) in zip(ours.items(), theirs):
            if tuple(our_value.shape) != tuple(their_value.shape):
                raise WeightsError(f"{path}: {their_key} has shape {list(their_value.shape)}, DenseNet-121 "
                                   f"expects {list(our_value.shape)} there")
            mapped[our_key] = their_value
        self.network.load_state_dict(mapped, strict=False)
        self.name = "xrv-densenet"
        self.weights = str(path)
        self.dim = self.network.embedding_dim
        self.preprocessing = {"channels": "grey (1)", "resize": "bilinear", "size": XRV_SIZE,
                              "range": "[-1024, 1024] (torchxrayvision.datasets.normalize)"}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        features = self.network.features(resize(images, XRV_SIZE) * XRV_RANGE)
        return features.mean(dim=(2, 3)).numpy()


def make_extractor(name: str, *, bundle: Any = None, auditor: str | Path | None = None,
                   weights: str | Path | None = None, expected_sha256: str | None = None) -> Extractor:
    """The extractor called `name` (one of EXTRACTORS) with what it needs; ValueError saying what is
    missing."""
    if name == "bundle":
        if bundle is None:
            raise ValueError("the bundle extractor needs --bundle")
        return BundleClassifierFeatures(bundle)
    if name == "auditor":
        if auditor is None:
            raise ValueError("the auditor extractor needs --auditor (a trained classifier directory)")
        return ClassifierFeatures(auditor)
    if name in ("xrv-densenet", "inception"):
        if weights is None:
            raise ValueError(f"the {name} extractor needs --weights PATH (weights are never downloaded; "
                             "see docs/evaluation.md for where to get them)")
        if name == "xrv-densenet":
            return XRVDenseNetFeatures(weights, expected_sha256)
        from training.evaluate.inception import InceptionFeatures

        return InceptionFeatures(weights, expected_sha256)
    raise ValueError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")


def extract(extractor: Extractor, images: np.ndarray | torch.Tensor, *, batch_size: int = 64,
            progress: bool = True, source: str = "", description: str = "features") -> FeatureSet:
    """Features of images [N, 1, H, W] in [-1, 1], in batches with a progress bar.

    `source` (data set, split, generator) goes into the protocol beside the extractor's and the count.
    """
    tensor = torch.as_tensor(np.asarray(images, dtype=np.float32))
    rows = []
    for start in tqdm(range(0, len(tensor), batch_size), desc=f"{description} ({extractor.name})", unit="batch",
                      disable=not progress, leave=False):
        rows.append(np.asarray(extractor(tensor[start:start + batch_size]), dtype=np.float32))
    features = np.concatenate(rows) if rows else np.zeros((0, extractor.dim), np.float32)
    return FeatureSet(features, {**extractor.protocol, "count": len(features), "source": source})
