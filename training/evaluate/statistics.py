"""Reference statistics: a real set's features, mean and covariance, saved once as `.npz` and reused.

The file holds ``features`` [N, D] float32 (for KID and PRDC), ``mu`` [D] and ``sigma`` [D, D]
float64 (for the Fréchet distance) and ``protocol``: the JSON of the extractor's protocol (name,
weights sha256, preprocessing, dim) plus ``count`` and ``source``. Two sets are comparable only when
every protocol field but ``count`` and ``source`` agrees; `check_comparable` names the first that
differs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate.distances import mean_and_covariance
from training.evaluate.features import FeatureSet

FORMAT = "cxrsynth-feature-statistics/1"
PER_SET_FIELDS = ("count", "source")  # may differ between the sets compared


class ProtocolMismatch(ValueError):
    """Two feature sets made under different protocols; the message names the field."""


def flatten(protocol: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in protocol.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_comparable(first: dict[str, Any], second: dict[str, Any]) -> None:
    """Raise ProtocolMismatch naming the first field (dotted) whose value differs, counts and sources
    aside."""
    a, b = flatten(first), flatten(second)
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in PER_SET_FIELDS:
            continue
        if a.get(key) != b.get(key):
            raise ProtocolMismatch(f"feature sets were made under different protocols: {key!r} is "
                                   f"{a.get(key)!r} in one and {b.get(key)!r} in the other")


def save_statistics(features: FeatureSet, path: str | Path) -> Path:
    """Write `features` (and its mean, covariance and protocol) to `path` (.npz), atomically.

    Raises FileExistsError when `path` exists: reference statistics are made once.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; reference statistics are written once (remove it to remake them)")
    mu, sigma = mean_and_covariance(features.features)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(temporary, features=features.features.astype(np.float32), mu=mu, sigma=sigma,
                 protocol=np.array(json.dumps({"format": FORMAT, **features.protocol}, sort_keys=True)))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def load_statistics(path: str | Path) -> FeatureSet:
    """The FeatureSet saved by `save_statistics` (ValueError naming the file for anything else)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            protocol = json.loads(str(data["protocol"]))
            features = np.array(data["features"])
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not a reference statistics file ({error})") from None
    if protocol.pop("format", None) != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return FeatureSet(features, protocol)
