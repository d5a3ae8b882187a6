"""The normal anatomy of a frontal (PA) chest radiograph, as a random but plausible geometry.

Coordinates are anatomy coordinates (see :mod:`training.phantoms.geometry`): ``u`` left to right,
``v`` top to bottom. As on every PA film the patient faces the viewer, so the patient's right lung is
on the image's left. Sides are indexed 0 = image left (right lung), 1 = image right (left lung, heart
side); ``SIDE_SIGN`` turns a side index into the direction away from the midline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from training.phantoms.geometry import Pose

SIDE_SIGN = (-1.0, 1.0)
MIDLINE = 0.5
HEART_TILT = 0.25  # radians; the long axis runs down and to the patient's left


@dataclass(frozen=True)
class VesselTree:
    """Pulmonary vessels as line segments fanning out of the hila (both lungs)."""

    starts: np.ndarray  # [N, 2] (u, v)
    ends: np.ndarray  # [N, 2]
    widths: np.ndarray  # [N] anatomy units
    generation: np.ndarray  # [N] 0 = hilar trunk
    side: np.ndarray  # [N] 0 or 1


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest. All lengths are fractions of the image width."""

    pose: Pose
    thorax_half_width: float  # midline to the inner chest wall at the widest level
    body_half_width: float
    apex_v: float  # top of the lung fields
    lung_center_v: float  # the lung outline is an ellipse cut by the diaphragm and the mediastinum
    dome_v: tuple[float, float]  # top of each hemidiaphragm (right one higher)
    dome_curvature: tuple[float, float]  # drop from the dome to the chest wall
    mediastinum_half_width: float
    heart_ratio: float  # cardiothoracic ratio: heart width / thoracic width
    heart_half_height: float
    hilum: tuple[tuple[float, float], tuple[float, float]]
    rib_top_v: float
    rib_spacing: float
    rib_count: int
    clavicle_v: tuple[float, float]  # medial and lateral end heights
    lung_density: float  # attenuation of aerated lung relative to air-filled space
    exposure: float  # attenuation-to-brightness gain
    gamma: float
    noise: float
    heel: float  # brightness gradient across the film (anode heel effect)
    vessels: VesselTree = field(repr=False)

    # --- derived geometry used by the renderer and by the measurements -------------------------------
    def lung_ellipse(self, side: int) -> tuple[float, float, float, float]:
        """(cu, cv, ru, rv) of the outer lung contour: lateral wall and apex."""
        ru = 0.62 * self.thorax_half_width
        cu = MIDLINE + SIDE_SIGN[side] * (self.thorax_half_width - ru)
        return cu, self.lung_center_v, ru, self.lung_center_v - self.apex_v

    def dome_u(self, side: int) -> float:
        return MIDLINE + SIDE_SIGN[side] * 0.42 * self.thorax_half_width

    def diaphragm_v(self, side: int, u: np.ndarray | float) -> np.ndarray | float:
        """Height of the hemidiaphragm's upper surface below column ``u``."""
        x = (np.asarray(u) - self.dome_u(side)) / self.thorax_half_width
        return self.dome_v[side] + self.dome_curvature[side] * x * x

    def lateral_wall_u(self, side: int, v: np.ndarray | float) -> np.ndarray | float:
        """Column of the inner chest wall at height(s) ``v`` (the lung ellipse's lateral edge)."""
        cu, cv, ru, rv = self.lung_ellipse(side)
        inside = np.clip(1.0 - ((np.asarray(v) - cv) / rv) ** 2, 0.0, None)
        return cu + SIDE_SIGN[side] * ru * np.sqrt(inside)

    def costophrenic_angle(self, side: int) -> tuple[float, float]:
        """Where the diaphragm meets the lateral chest wall: the lung's lowest lateral corner."""
        return self._costophrenic_angles[side]

    @cached_property
    def _costophrenic_angles(self) -> tuple[tuple[float, float], tuple[float, float]]:
        vs = np.linspace(self.lung_center_v, self.lung_center_v + 0.35, 701)
        angles = []
        for side in (0, 1):
            us = self.lateral_wall_u(side, vs)
            below = np.flatnonzero(vs >= self.diaphragm_v(side, us))
            k = int(below[0]) if len(below) else len(vs) - 1
            angles.append((float(us[k]), float(vs[k])))
        return angles[0], angles[1]

    @property
    def heart_half_width(self) -> float:
        """Half the heart's transverse diameter (its widest horizontal extent)."""
        return self.heart_ratio * self.thorax_half_width

    @property
    def heart_axes(self) -> tuple[float, float, float]:
        """(ru, rv, angle) of the heart ellipse, tilted with its apex down to the image right, sized so
        its horizontal half-extent is ``heart_half_width``."""
        angle = HEART_TILT
        rv = self.heart_half_height
        extent = self.heart_half_width
        ru = np.sqrt(max(extent**2 - (rv * np.sin(angle)) ** 2, 1e-6)) / np.cos(angle)
        return float(ru), rv, angle

    @property
    def heart_center(self) -> tuple[float, float]:
        """The heart sits left of the midline (image right) and rests on the diaphragm."""
        return (
            MIDLINE + 0.3 * self.heart_half_width,
            0.5 * (self.dome_v[0] + self.dome_v[1]) - 0.8 * self.heart_half_height,
        )

    def with_changes(self, **changes) -> Anatomy:
        return replace(self, **changes)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random normal chest."""
    thorax = rng.uniform(0.325, 0.37)
    apex = rng.uniform(0.10, 0.15)
    dome_right = rng.uniform(0.67, 0.72)
    dome_left = dome_right + rng.uniform(0.01, 0.035)
    mediastinum = rng.uniform(0.055, 0.07)
    hilum_v = rng.uniform(0.39, 0.43)
    hila = (
        (MIDLINE - mediastinum - rng.uniform(0.025, 0.04), hilum_v + rng.uniform(0.0, 0.02)),
        (MIDLINE + mediastinum + rng.uniform(0.025, 0.04), hilum_v - rng.uniform(0.0, 0.02)),
    )
    pose = Pose(
        angle=float(np.clip(rng.normal(0.0, 0.025), -0.06, 0.06)),
        scale=rng.uniform(0.94, 1.03),
        shift_u=rng.uniform(-0.025, 0.025),
        shift_v=rng.uniform(-0.02, 0.03),
    )
    return Anatomy(
        pose=pose,
        thorax_half_width=thorax,
        body_half_width=thorax + rng.uniform(0.09, 0.13),
        apex_v=apex,
        lung_center_v=rng.uniform(0.5, 0.56),
        dome_v=(dome_right, dome_left),
        dome_curvature=(rng.uniform(0.14, 0.2), rng.uniform(0.14, 0.2)),
        mediastinum_half_width=mediastinum,
        heart_ratio=rng.uniform(0.39, 0.46),
        heart_half_height=rng.uniform(0.11, 0.125),
        hilum=hila,
        rib_top_v=apex + rng.uniform(-0.01, 0.02),
        rib_spacing=rng.uniform(0.058, 0.066),
        rib_count=10,
        clavicle_v=(rng.uniform(0.15, 0.19), rng.uniform(0.08, 0.12)),
        lung_density=rng.uniform(0.23, 0.29),
        exposure=rng.uniform(1.1, 1.35),
        gamma=rng.uniform(0.88, 1.12),
        noise=rng.uniform(0.006, 0.016),
        heel=rng.uniform(-0.06, 0.06),
        vessels=_sample_vessels(rng, hila),
    )


def _sample_vessels(rng: np.random.Generator, hila) -> VesselTree:
    """Each hilum sends out trunks that fork three times, thinning and shortening at every fork."""
    starts, ends, widths, generations, sides = [], [], [], [], []
    for side, (hu, hv) in enumerate(hila):
        sign = SIDE_SIGN[side]
        count = 7
        # Directions from up-medial over lateral to down-medial (angle 0 = lateral, + = downward).
        spread = np.linspace(-1.75, 1.6, count) + rng.uniform(-0.12, 0.12, count)
        # Lower-lobe vessels run further: the lung extends further below the hilum than above.
        length = 0.085 + 0.035 * np.clip(spread, 0, None) + rng.uniform(-0.01, 0.01, count)
        width = np.full(count, 0.013) + rng.uniform(-0.002, 0.002, count)
        origin = np.stack(
            [hu + rng.uniform(-0.015, 0.015, count) + sign * 0.01, hv + 0.5 * np.sin(spread) * 0.04], 1
        )
        for generation in range(4):
            direction = np.stack([sign * np.cos(spread), np.sin(spread)], axis=1)
            tip = origin + direction * length[:, None]
            starts.append(origin)
            ends.append(tip)
            widths.append(width)
            generations.append(np.full(len(origin), generation))
            sides.append(np.full(len(origin), side))
            fork = rng.uniform(0.3, 0.55, len(origin))
            spread = np.concatenate([spread - fork, spread + fork * rng.uniform(0.6, 1.0, len(origin))])
            origin = np.concatenate([tip, tip])
            length = np.concatenate([length, length]) * rng.uniform(0.62, 0.8, 2 * len(tip))
            width = np.concatenate([width, width]) * 0.68
    return VesselTree(
        starts=np.concatenate(starts),
        ends=np.concatenate(ends),
        widths=np.concatenate(widths),
        generation=np.concatenate(generations),
        side=np.concatenate(sides),
    )
