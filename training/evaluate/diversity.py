"""Diversity: mean pairwise MS-SSIM within a set of images (Odena et al. 2017 used it to flag mode collapse).

MS-SSIM is Wang, Simoncelli and Bovik's multi-scale SSIM (2003), computed by torchmetrics with an 11-pixel
Gaussian window (σ = 1.5) on images in [-1, 1] (data range 2). Higher mean pairwise MS-SSIM means more
alike: a generator whose images of one finding are more alike than real images of that finding has lost
variety. The standard five scales need images larger than 160²; smaller images use the most scales that
fit (torchmetrics' condition: side > 10·(scales − 1)² and side ≥ 2^scales: 3 at 64², 2 at 32²), with the
first weights of Wang et al.'s (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) renormalised to sum to 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.evaluate.distances import TooFewSamples

WANG_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
KERNEL_SIZE = 11


def ms_ssim_scales(side: int) -> int:
    """How many MS-SSIM scales an image of side² pixels allows (1–5)."""
    for scales in range(len(WANG_BETAS), 0, -1):
        if side > (KERNEL_SIZE - 1) * max(1, scales - 1) ** 2 and side >= 2**scales:
            return scales
    raise ValueError(f"images of {side}² are too small for an {KERNEL_SIZE}-pixel SSIM window")


def mean_pairwise_ms_ssim(images: np.ndarray, *, max_pairs: int = 200, seed: int = 0) -> dict[str, Any]:
    """Mean MS-SSIM over up to `max_pairs` distinct random pairs of images [N, 1, S, S] in [-1, 1].

    Returns {"mean", "sd", "pairs", "scales", "betas"}. Raises TooFewSamples below 2 images.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if len(images) < 2:
        raise TooFewSamples(f"MS-SSIM diversity needs at least 2 images of a set, got {len(images)}")
    count = len(images)
    rng = np.random.default_rng(seed)
    all_pairs = count * (count - 1) // 2
    if all_pairs <= max_pairs:
        first, second = np.triu_indices(count, k=1)
    else:
        first = rng.integers(0, count, max_pairs * 2)
        second = rng.integers(0, count, max_pairs * 2)
        keep = first != second
        first, second = first[keep][:max_pairs], second[keep][:max_pairs]
    scales = ms_ssim_scales(images.shape[-1])
    betas = tuple(float(b) for b in np.asarray(WANG_BETAS[:scales]) / sum(WANG_BETAS[:scales]))
    tensor = torch.as_tensor(np.asarray(images, np.float32))
    values = multiscale_structural_similarity_index_measure(
        tensor[first], tensor[second], data_range=2.0, kernel_size=KERNEL_SIZE, betas=betas, reduction="none")
    values = values.numpy().astype(np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "pairs": len(values), "scales": scales, "betas": list(betas)}
