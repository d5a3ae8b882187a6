"""Resolution-independent drawing primitives for the phantoms (vectorised numpy, no per-pixel loops).

Everything is described in *anatomy coordinates*: ``u`` runs left to right across the image and ``v``
top to bottom, both in [0, 1], so a phantom's geometry does not depend on the size it is rendered at.
A :class:`Frame` maps them to pixels for one render and carries the patient's pose (rotation, scale,
shift). Edges are anti-aliased over about one pixel, so the same scene renders cleanly from 32² to 1024².
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Pose:
    """Where the patient stands in the image: rotation (radians), scale and shift (image fractions)."""

    angle: float = 0.0
    scale: float = 1.0
    shift_u: float = 0.0
    shift_v: float = 0.0


class Frame:
    """Anatomy coordinates of every pixel centre of a ``size``² image, for one pose."""

    def __init__(self, size: int, pose: Pose):
        self.size = size
        self.pose = pose
        self.pixel = 1.0 / size  # one pixel, in anatomy units (before scaling)
        centres = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        cos, sin = np.cos(pose.angle), np.sin(pose.angle)
        x = centres[None, :] - pose.shift_u
        y = centres[:, None] - pose.shift_v
        # Inverse pose: rotate by -angle, divide by scale.
        self.u = ((cos * x + sin * y) / pose.scale + 0.5).astype(np.float32)
        self.v = ((-sin * x + cos * y) / pose.scale + 0.5).astype(np.float32)
        # Anti-aliasing width: a little more than one pixel, in anatomy units.
        self.edge = np.float32(1.25 / (size * pose.scale))

    def window(self, cu: float, cv: float, reach: float) -> tuple[slice, slice]:
        """Rows and columns of the pixels within ``reach`` (anatomy units) of (cu, cv): drawing a
        small shape touches only these, which keeps large renders fast."""
        x, y = self.to_pixels(
            np.array([cu - reach, cu + reach, cu - reach, cu + reach]),
            np.array([cv - reach, cv - reach, cv + reach, cv + reach]),
        )
        x0, x1 = max(0, int(np.floor(x.min())) - 1), min(self.size, int(np.ceil(x.max())) + 2)
        y0, y1 = max(0, int(np.floor(y.min())) - 1), min(self.size, int(np.ceil(y.max())) + 2)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def to_pixels(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates (x = column, y = row, continuous, 0 at the first pixel's centre)."""
        cos, sin = np.cos(self.pose.angle), np.sin(self.pose.angle)
        du = (np.asarray(u, dtype=np.float64) - 0.5) * self.pose.scale
        dv = (np.asarray(v, dtype=np.float64) - 0.5) * self.pose.scale
        x = cos * du - sin * dv + 0.5 + self.pose.shift_u
        y = sin * du + cos * dv + 0.5 + self.pose.shift_v
        return x * self.size - 0.5, y * self.size - 0.5


def soft_step(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, a linear ramp ``edge`` wide across the boundary."""
    ramp = 0.5 - signed_distance / np.float32(edge)
    return np.minimum(np.maximum(ramp, 0.0, out=ramp), 1.0, out=ramp)


def ellipse_distance(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float, angle: float = 0.0
) -> np.ndarray:
    """Approximate signed distance to an ellipse's boundary (first-order: f / |grad f|)."""
    du, dv = u - cu, v - cv
    if angle:
        cos, sin = np.cos(angle), np.sin(angle)
        du, dv = cos * du + sin * dv, -sin * du + cos * dv
    qu, qv = du / (ru * ru), dv / (rv * rv)
    q = du * qu + dv * qv
    return (q - 1.0) / (2.0 * np.sqrt(qu * qu + qv * qv) + 1e-6)


def ellipse(frame: Frame, cu: float, cv: float, ru: float, rv: float, angle: float = 0.0, edge=None):
    """Soft mask of a filled ellipse."""
    edge = edge or frame.edge
    mask = np.zeros((frame.size, frame.size), dtype=np.float32)
    rows, cols = frame.window(cu, cv, max(ru, rv) + edge)
    u, v = frame.u[rows, cols], frame.v[rows, cols]
    mask[rows, cols] = soft_step(ellipse_distance(u, v, cu, cv, ru, rv, angle), edge)
    return mask


def ring(frame: Frame, cu: float, cv: float, ru: float, rv: float, half_width: float) -> np.ndarray:
    """Soft mask of an ellipse's outline, ``2 × half_width`` thick (a cyst or sac wall)."""
    mask = np.zeros((frame.size, frame.size), dtype=np.float32)
    rows, cols = frame.window(cu, cv, max(ru, rv) + half_width + frame.edge)
    distance = ellipse_distance(frame.u[rows, cols], frame.v[rows, cols], cu, cv, ru, rv)
    mask[rows, cols] = band(distance, half_width, frame.edge)
    return mask


def band(distance: np.ndarray, half_width: float, edge: float) -> np.ndarray:
    """Soft mask of the points within ``half_width`` of a curve, given their distance to it."""
    return soft_step(np.abs(distance) - half_width, edge)


@lru_cache(maxsize=64)
def _interpolation_matrix(cells: int, size: int) -> np.ndarray:
    """[size, cells + 3] cubic B-spline weights: pixel centres as smooth blends of lattice values."""
    t = (np.arange(size, dtype=np.float64) + 0.5) / size * cells
    base = np.floor(t).astype(int)
    f = t - base
    weights = np.stack(
        [(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6],
        axis=1,
    )
    matrix = np.zeros((size, cells + 3), dtype=np.float32)
    for k in range(4):
        np.add.at(matrix, (np.arange(size), base + k), weights[:, k])
    return matrix


def lattice_field(lattice: np.ndarray, size: int) -> np.ndarray:
    """Band-limited noise from a square lattice of standard normals (``cells + 3`` per side): about
    ``cells`` features across the image, roughly unit variance, the same pattern at every size."""
    matrix = _interpolation_matrix(lattice.shape[0] - 3, size)
    return (matrix @ lattice @ matrix.T) / np.float32(0.55)  # the B-spline shrinks the spread to ~0.55


def splat_lines(
    frame: Frame,
    starts: np.ndarray,
    ends: np.ndarray,
    weights: np.ndarray,
    widths: np.ndarray,
) -> np.ndarray:
    """Draw line segments (anatomy coordinates, [N, 2]) with per-segment density and width.

    Points are laid along each segment half a pixel apart and splatted bilinearly, then blurred with a
    Gaussian whose width follows the segments' width; the result integrates to ``weight`` × ``width``
    across a line, like a projected cylinder. Segments are grouped into a few width classes so each
    class is blurred once.
    """
    return splat_line_groups(frame, starts, ends, weights, widths, np.zeros(len(starts), dtype=int), 1)[0]


def splat_line_groups(
    frame: Frame,
    starts: np.ndarray,
    ends: np.ndarray,
    weights: np.ndarray,
    widths: np.ndarray,
    groups: np.ndarray,
    group_count: int,
) -> list[np.ndarray]:
    """:func:`splat_lines` for several sets of segments at once (``groups`` numbers each segment's
    set), one image per set: the per-point work is shared, which matters for small images."""
    size = frame.size
    result = [np.zeros((size, size), dtype=np.float32) for _ in range(group_count)]
    if len(starts) == 0:
        return result
    x0, y0 = frame.to_pixels(starts[:, 0], starts[:, 1])
    x1, y1 = frame.to_pixels(ends[:, 0], ends[:, 1])
    lengths = np.hypot(x1 - x0, y1 - y0)
    counts = np.maximum(2, np.ceil(lengths / 0.5).astype(int))
    segment = np.repeat(np.arange(len(starts)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    t = (offsets + 0.5) / np.repeat(counts, counts)
    xs = x0[segment] + t * (x1 - x0)[segment]
    ys = y0[segment] + t * (y1 - y0)[segment]
    # Each point carries the density of a piece of line `length / count` pixels long.
    widths_px = widths * size * frame.pose.scale
    mass = (weights * widths_px * lengths / counts)[segment]
    # One blur per (set, width class).
    classes = groups * 4 + np.digitize(widths_px, [1.5, 3.0, 6.0])
    for key in np.unique(classes):
        chosen = classes[segment] == key
        layer = _bilinear_splat(xs[chosen], ys[chosen], mass[chosen], size)
        sigma = max(0.5, float(np.median(widths_px[classes == key])) * 0.42)
        # Blur only the box the lines occupy (plus the kernel's reach).
        reach = int(np.ceil(3 * sigma)) + 2
        top, bottom = max(0, int(ys[chosen].min()) - reach), min(size, int(ys[chosen].max()) + reach + 1)
        left, right = max(0, int(xs[chosen].min()) - reach), min(size, int(xs[chosen].max()) + reach + 1)
        if bottom > top and right > left:
            box = layer[top:bottom, left:right]
            result[key // 4][top:bottom, left:right] += ndimage.gaussian_filter(
                box, sigma, mode="constant", truncate=3.0
            )
    return result


def _bilinear_splat(xs: np.ndarray, ys: np.ndarray, mass: np.ndarray, size: int) -> np.ndarray:
    ix, iy = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - ix, ys - iy
    image = np.zeros(size * size, dtype=np.float64)
    for dx, dy, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        px, py = ix + dx, iy + dy
        keep = (px >= 0) & (px < size) & (py >= 0) & (py < size)
        image += np.bincount(py[keep] * size + px[keep], weights=(mass * w)[keep], minlength=size * size)
    return image.reshape(size, size)
