"""The inputs of a bundle's LCO step graph (``lco_step.onnx``), for callers that run it directly.

The graph takes (z, target, mask, reference, image_pull): the masked BCE of the classifier on G(z)
plus image_pull times the mean squared pixel difference between G(z) and reference
(training/export/lco.py, ``LCOObjective``). Bundles exported before the image term take
(z, target, mask) only.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def reference_shape(session: Any) -> tuple[int, int] | None:
    """The [H, W] of the reference image ``session`` (lco_step) takes; None for a graph without the image
    term (exported before it)."""
    shapes = {i.name: i.shape for i in session.get_inputs()}
    return tuple(shapes["reference"][2:]) if "reference" in shapes else None


def lco_step_feeds(session: Any, z: np.ndarray, target: np.ndarray, mask: np.ndarray,
                   reference: np.ndarray | None = None, image_pull: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The feed dict for ``session`` (an ``onnxruntime.InferenceSession`` of lco_step): z [B, d], target
    and mask [B, 14], reference [B, 1, H, W] and image_pull [B, 1] (zeros, the term off, when not given).
    Raises ValueError for a reference or image pull on a graph that takes none."""
    feeds = {name: np.ascontiguousarray(value, np.float32) for name, value in
             (("z", z), ("target", target), ("mask", mask))}
    size = reference_shape(session)
    if size is None:
        if reference is not None or image_pull is not None:
            raise ValueError("this bundle's lco_step graph takes no reference image: export the bundle again")
        return feeds
    rows = len(feeds["z"])
    feeds["reference"] = (np.zeros((rows, 1, *size), np.float32) if reference is None
                          else np.ascontiguousarray(reference, np.float32))
    feeds["image_pull"] = (np.zeros((rows, 1), np.float32) if image_pull is None
                           else np.ascontiguousarray(image_pull, np.float32))
    return feeds
