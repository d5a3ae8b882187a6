"""Analytic read-outs of every finding's signature, from the pixels of a rendered phantom.

Each measurement looks where a radiologist would look for that finding and returns a score that grows
with the finding: the cardiothoracic ratio, the brightness of the costophrenic angles, the lucency of
the lung periphery, the contrast of a blob against its surroundings, and so on. The geometry comes from
the seed's :class:`~training.phantoms.render.Scene`, which does not depend on the labels (the normal
anatomy, and where each finding *would* be); the value is always read from the image. The tests use
them to show that every signature is present where labelled and absent where not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import ndimage

from service.labels import LABELS
from training.phantoms.anatomy import MIDLINE, SIDE_SIGN, Anatomy
from training.phantoms.findings import PNEUMOTHORAX_RIM, retracted_lung
from training.phantoms.geometry import Frame, ellipse_distance
from training.phantoms.render import Scene, lung_fields


@dataclass(frozen=True)
class Measurement:
    """How a finding shows, and the function that reads it from an image (higher = more present)."""

    finding: str
    signature: str
    short: str  # what the value is, for captions
    read: Callable[[MeasurementView], float]


class MeasurementView:
    """An image together with the anatomy-coordinate grid of its pixels and the normal lung fields."""

    def __init__(self, image: np.ndarray, scene: Scene):
        if image.ndim != 2 or image.shape[0] != image.shape[1]:
            raise ValueError(f"expected a square [size, size] image, got shape {image.shape}")
        self.image = image.astype(np.float32)
        self.size = image.shape[0]
        self.anatomy: Anatomy = scene.anatomy
        self.plan = scene.findings
        self.frame = Frame(image.shape[0], scene.anatomy.pose)
        self.u, self.v = self.frame.u, self.frame.v
        fields = lung_fields(self.frame, scene.anatomy)
        self.lung = tuple(cavity > 0.99 for cavity in fields.cavity)
        self.lungs = self.lung[0] | self.lung[1]

    def mean(self, mask: np.ndarray) -> float:
        return self.mean_of(self.image, mask)

    def median(self, mask: np.ndarray) -> float:
        return float(np.median(self.image[mask])) if mask.any() else float("nan")

    @staticmethod
    def mean_of(values: np.ndarray, mask: np.ndarray) -> float:
        """Mean over a region; NaN when the region holds no pixel (it is thinner than one)."""
        return float(values[mask].mean()) if mask.any() else float("nan")

    def lung_reference(self) -> float:
        """Typical aerated-lung brightness: a low percentile of both lung fields, which opacities
        covering less than most of the lungs do not move."""
        return float(np.percentile(self.image[self.lungs], 30))

    def line_profile(self, v: float, u0: float, u1: float, count: int, spread: float = 0.01) -> np.ndarray:
        """Brightness along the horizontal anatomy line ``v`` (averaged over ``v ± spread``)."""
        us = np.linspace(u0, u1, count)
        rows = []
        for dv in (-spread, 0.0, spread):
            x, y = self.frame.to_pixels(us, np.full(count, v + dv))
            rows.append(ndimage.map_coordinates(self.image, [y, x], order=1, mode="nearest"))
        return np.mean(rows, axis=0)

    def column_profile(self, u: float, v0: float, v1: float, count: int, spread: float = 0.01) -> np.ndarray:
        vs = np.linspace(v0, v1, count)
        columns = []
        for du in (-spread, 0.0, spread):
            x, y = self.frame.to_pixels(np.full(count, u + du), vs)
            columns.append(ndimage.map_coordinates(self.image, [y, x], order=1, mode="nearest"))
        return np.mean(columns, axis=0)

    def disc(self, u: float, v: float, r0: float, r1: float) -> np.ndarray:
        rho = np.hypot(self.u - u, self.v - v)
        return (rho >= r0) & (rho <= r1)


def cardiothoracic_ratio(view: MeasurementView) -> float:
    """Transverse heart diameter over the internal thoracic diameter, as read on a PA film.

    On rows through the upper and middle heart, each heart border is the first clear drop in
    brightness going out from the heart's centre (past the spine): a border stays a step even when
    an opacity lies beside or behind the heart. Each border counts at its second-furthest row, so a
    single row confused by a bubble or an abutting opacity does not decide. The thorax is the widest
    span of lung near the hila, wall to wall."""
    a = view.anatomy
    count = 4 * view.size
    us = np.linspace(0.0, 1.0, count)
    step = us[1] - us[0]
    pixel = view.frame.pixel / view.frame.pose.scale  # one pixel in anatomy units
    lung_level = view.lung_reference()
    centre_u, centre_v = a.heart_center
    half_height = a.heart_half_height
    # Rows through the middle of the heart, above a hemidiaphragm lifted by volume loss.
    rows = np.linspace(centre_v - 0.5 * half_height, centre_v + 0.2 * half_height, 5)
    lefts, rights, thresholds = [], [], []
    for v in rows:
        profile = view.line_profile(v, 0.0, 1.0, count, spread=0.006)
        heart_level = float(np.median(profile[np.abs(us - centre_u) < 0.03]))
        thresholds.append(0.5 * (lung_level + heart_level))
        smooth = ndimage.gaussian_filter1d(profile, max(1.0, pixel / step))
        slope = np.gradient(smooth) * (pixel / step)  # brightness change per pixel, rightwards
        drop = 0.07 * max(heart_level - lung_level, 0.05)
        right = _first_drop(-slope, us >= max(centre_u + 0.02, MIDLINE + 0.04), drop)
        left = _first_drop(slope[::-1], (us <= MIDLINE - 0.04)[::-1], drop)
        if right is None or left is None:
            return 1.0  # no lung beside the heart at all
        rights.append(us[right])
        lefts.append(us[count - 1 - left])
    heart_left, heart_right = sorted(lefts)[1], sorted(rights)[-2]
    threshold = float(np.mean(thresholds))
    thorax_width = max(
        _thoracic_width(
            view.line_profile(v, 0.0, 1.0, count, spread=0.01) < threshold, us, int(count * MIDLINE)
        )
        for v in np.linspace(a.lung_center_v - 0.06, a.lung_center_v + 0.04, 4)
    )
    return float((heart_right - heart_left) / max(thorax_width, 1e-6))


def _first_drop(descent: np.ndarray, allowed: np.ndarray, threshold: float) -> int | None:
    """Index of the steepest point of the first run where ``descent`` exceeds ``threshold``."""
    above = allowed & (descent > threshold)
    if not above.any():
        return None
    start = int(np.argmax(above))
    end = start + int(np.argmax(~above[start:])) if not above[start:].all() else len(above)
    return start + int(np.argmax(descent[start:end]))


def _thoracic_width(dark: np.ndarray, us: np.ndarray, mid: int) -> float:
    """Wall to wall: from the midline outward, the chest wall is the first stretch that stays bright
    for 3 % of the film (ribs and vessels crossing the lung are narrower than that)."""
    wall = ndimage.minimum_filter1d((~dark).astype(np.uint8), size=max(3, len(us) // 33), mode="nearest") > 0
    lung_left, lung_right = np.flatnonzero(dark[:mid]), np.flatnonzero(dark[mid:]) + mid
    if len(lung_left) == 0 or len(lung_right) == 0:
        return 0.0
    left_wall = np.flatnonzero(wall[: lung_left[-1]])
    right_wall = np.flatnonzero(wall[lung_right[0] :]) + lung_right[0]
    return (us[right_wall[0]] if len(right_wall) else 1.0) - (us[left_wall[-1]] if len(left_wall) else 0.0)


def costophrenic_opacity(view: MeasurementView) -> float:
    """Brightness of the costophrenic recesses above the normal angle, against aerated lung: fluid
    fills them and blunts the angle. The more opaque side counts."""
    a = view.anatomy
    reference = view.lung_reference()
    scores = []
    for side in (0, 1):
        cp_v = a.costophrenic_angle(side)[1]
        wall = float(np.mean(a.lateral_wall_u(side, np.array([cp_v - 0.11, cp_v - 0.05]))))
        inward = SIDE_SIGN[side] * (wall - view.u)
        region = (view.v > cp_v - 0.11) & (view.v < cp_v - 0.05) & (inward > 0.01) & (inward < 0.08)
        scores.append(view.mean(region & view.lung[side]) - reference)
    return float(np.nanmax(scores))


def peripheral_lucency(view: MeasurementView) -> float:
    """How much darker the apical and lateral rim of a lung is than both the lung inside it and the
    other lung's rim: a pneumothorax leaves gas without lung or vessel markings between the retracted
    lung edge and the wall, on one side. Medians, so a mass in a region does not move it."""
    a = view.anatomy
    rims, inners = [], []
    smallest, largest = PNEUMOTHORAX_RIM
    for side in (0, 1):
        zone = view.lung[side] & (view.v < a.hilum[side][1] + 0.04)

        def within(rim: float, side: int = side) -> np.ndarray:
            return ellipse_distance(view.u, view.v, *retracted_lung(a, side, rim)) < 0

        # Outside the smallest possible retracted lung: always pleural gas when there is a
        # pneumothorax. Inside the largest: always lung.
        rims.append(view.median(zone & within(0.6 * smallest) & ~within(0.95 * smallest)))
        inners.append(view.median(zone & within(1.1 * largest) & ~within(1.6 * largest)))
    return float(max(min(inners[s] - rims[s], rims[1 - s] - rims[s]) for s in (0, 1)))


def blob_contrast(view: MeasurementView, finding: str) -> float:
    """Brightness of a disc at the finding's place against the ring around it (nodule, mass)."""
    opacity = getattr(view.plan, finding)
    r = opacity.radius
    core = view.disc(opacity.u, opacity.v, 0.0, 0.6 * r)
    ring = view.disc(opacity.u, opacity.v, 1.5 * r, 2.3 * r) & view.lungs
    return view.mean(core) - view.mean(ring)


def plate_contrast(view: MeasurementView) -> float:
    """A thin dense band: brightness along the plate's line against parallel lines either side."""
    p = view.plan.atelectasis
    cos, sin = np.cos(p.angle), np.sin(p.angle)
    du, dv = view.u - p.u, view.v - p.v
    along, across = cos * du + sin * dv, -sin * du + cos * dv
    span = np.abs(along) < 0.4 * p.length
    on = span & (np.abs(across) < max(p.thickness / 3, 0.6 * view.frame.pixel))
    beside = span & (np.abs(across) > 1.3 * p.thickness) & (np.abs(across) < 2.3 * p.thickness)
    return view.mean(on) - view.mean(beside)


def fissure_step(view: MeasurementView) -> float:
    """Lobar consolidation ends sharply at a fissure: brightness just on the lobe's side of the fissure
    line minus just beyond it, inside the lung."""
    lobe = view.plan.consolidation
    cos, sin = np.cos(lobe.fissure_angle), np.sin(lobe.fissure_angle)
    across = cos * (view.u - lobe.u) + sin * (view.v - lobe.v) - lobe.fissure_offset  # + on the lobe's side
    along = -sin * (view.u - lobe.u) + cos * (view.v - lobe.v)
    near = np.abs(along) < 0.6 * lobe.ru
    strip = max(0.03, 2.5 * view.frame.pixel)
    inside = near & view.lung[lobe.side] & (across > 0.006) & (across < strip)
    outside = near & view.lung[lobe.side] & (across < -0.006) & (across > -strip)
    return view.mean(inside) - view.mean(outside)


def window_opacity(view: MeasurementView, finding: str) -> float:
    """Mean brightness of the lung inside the finding's window against aerated lung elsewhere
    (pneumonia, infiltration)."""
    p = getattr(view.plan, finding)
    window = ellipse_distance(view.u, view.v, p.u, p.v, 0.6 * p.ru, 0.6 * p.rv) < 0
    return view.mean(window & view.lung[p.side]) - view.lung_reference()


def asymmetric_opacity(view: MeasurementView, finding: str) -> float:
    """Opacity in the finding's window beyond both aerated lung and the mirror-image window in the
    other lung: a patchy infiltrate is asymmetric, where oedema's haze is symmetric."""
    p = getattr(view.plan, finding)
    side = p.side
    window = ellipse_distance(view.u, view.v, p.u, p.v, 0.6 * p.ru, 0.6 * p.rv) < 0
    mirror = ellipse_distance(view.u, view.v, 2 * MIDLINE - p.u, p.v, 0.6 * p.ru, 0.6 * p.rv) < 0
    baseline = np.nanmax([view.mean(mirror & view.lung[1 - side]), view.lung_reference()])
    return view.mean(window & view.lung[side]) - float(baseline)


def perihilar_haze(view: MeasurementView) -> float:
    """Bat-wing oedema is bilateral: the lung beside each hilum against the same lung's outer third
    (medians over tall bands, so a mass or patch in one band does not decide); the less hazy side
    counts."""
    a = view.anatomy
    scores = []
    for side in (0, 1):
        hu, hv = a.hilum[side]
        sign = SIDE_SIGN[side]
        offset = sign * (view.u - hu)
        perihilar = view.lung[side] & (np.abs(view.v - hv - 0.04) < 0.08) & (offset > 0.02) & (offset < 0.09)
        inward = sign * (a.lateral_wall_u(side, view.v) - view.u)
        rows = (view.v > hv - 0.1) & (view.v < hv + 0.18)
        peripheral = view.lung[side] & rows & (inward > 0.04) & (inward < 0.085)
        scores.append(view.median(perihilar) - view.median(peripheral))
    return float(np.nanmin(scores))


def diaphragm_descent(view: MeasurementView) -> float:
    """How far below its normal height the top of the diaphragm lies: over-inflated lungs push the
    diaphragm down and flatten it. Going up from the abdomen along a column, the diaphragm's top is
    where the brightness last stays above halfway between lung and abdomen. Read at the dome and
    further out on each side; the lowest counts, since a basal opacity, fluid or a large heart can
    only lift a column's apparent edge."""
    a = view.anatomy
    reference = view.lung_reference()
    count = 4 * view.size
    descents = []
    for side in (0, 1):
        for offset in (0.42, 0.56, 0.7):
            u = MIDLINE + SIDE_SIGN[side] * offset * a.thorax_half_width
            normal_v = float(a.diaphragm_v(side, u))
            v0, v1 = a.hilum[side][1] + 0.05, normal_v + 0.2
            profile = view.column_profile(u, v0, v1, count, spread=0.015)
            abdomen = float(np.median(profile[-count // 6 :]))
            dark = np.flatnonzero(profile < 0.5 * (reference + abdomen))
            edge = v0 + (v1 - v0) * ((dark[-1] + 1) if len(dark) else 0) / (count - 1)
            descents.append(edge - normal_v)
    return float(np.max(descents))


def upper_zone_reticulation(view: MeasurementView) -> float:
    """Fine-scale texture energy in both upper zones relative to the lower zones of the same lungs: a
    reticular net adds high-frequency structure that normal lung, ribs and noise share everywhere."""
    a = view.anatomy
    sigma = max(0.7, 0.012 * view.size)
    detail = np.abs(view.image - ndimage.gaussian_filter(view.image, sigma))
    interior = ndimage.binary_erosion(view.lungs, iterations=max(1, round(0.015 * view.size)))
    scores = []
    for side in (0, 1):
        zone = interior & view.lung[side]
        upper = zone & (view.v < a.hilum[side][1] - 0.02)
        lower = zone & (view.v > a.hilum[side][1] + 0.08) & (view.v < a.dome_v[side] - 0.05)
        scores.append(view.mean_of(detail, upper) / max(view.mean_of(detail, lower), 1e-3))
    return float(np.nanmin(scores))


def lateral_pleural_band(view: MeasurementView) -> float:
    """A soft-tissue band lining the chest wall: brightness just inside the lateral wall against the
    lung a little further in, at mid-heights (above the costophrenic angle). The thicker side counts."""
    a = view.anatomy
    scores = []
    for side in (0, 1):
        distance = ellipse_distance(view.u, view.v, *a.lung_ellipse(side))
        cp_v = a.costophrenic_angle(side)[1]
        rows = (view.v > a.apex_v + 0.06) & (view.v < cp_v - 0.14)
        lateral = SIDE_SIGN[side] * (view.u - a.lung_ellipse(side)[0]) > 0
        band = view.lung[side] & rows & lateral & (distance > -0.03) & (distance < -0.008)
        inner = view.lung[side] & rows & lateral & (distance > -0.09) & (distance < -0.055)
        scores.append(view.mean(band) - view.mean(inner))
    return float(np.nanmax(scores))


def retrocardiac_gas(view: MeasurementView) -> float:
    """A hiatus hernia's gas cap shows as a dark bubble inside the heart shadow: the surrounding
    shadow's brightness minus the bubble's."""
    h = view.plan.hernia
    level_v = h.v + h.level * h.radius
    gas = view.disc(h.u, h.v, 0.0, 0.75 * h.radius) & (view.v < level_v - 0.15 * h.radius)
    ring = view.disc(h.u, h.v, 1.35 * h.radius, 1.9 * h.radius)
    return view.mean(ring) - view.mean(gas)


MEASUREMENTS: dict[str, Measurement] = {
    m.finding: m
    for m in (
        Measurement("Atelectasis", "plate-like dense band, elevated hemidiaphragm", "band", plate_contrast),
        Measurement("Cardiomegaly", "cardiothoracic ratio above 0.5", "CTR", cardiothoracic_ratio),
        Measurement("Consolidation", "dense lobar opacity ending at a fissure", "fissure step", fissure_step),
        Measurement("Edema", "bilateral perihilar haze", "perihilar", perihilar_haze),
        Measurement(
            "Effusion", "opaque costophrenic angle with a meniscus", "CP angle", costophrenic_opacity
        ),
        Measurement("Emphysema", "low flat diaphragms, hyperlucent lungs", "dome drop", diaphragm_descent),
        Measurement("Fibrosis", "upper-zone reticular net", "upper texture", upper_zone_reticulation),
        Measurement("Hernia", "retrocardiac gas bubble, air-fluid level", "gas", retrocardiac_gas),
        Measurement(
            "Infiltration",
            "ill-defined patchy opacity",
            "opacity",
            partial(asymmetric_opacity, finding="infiltration"),
        ),
        Measurement("Mass", "large round opacity", "contrast", partial(blob_contrast, finding="mass")),
        Measurement("Nodule", "small round opacity", "contrast", partial(blob_contrast, finding="nodule")),
        Measurement(
            "Pleural_Thickening", "pleural band along the chest wall", "wall band", lateral_pleural_band
        ),
        Measurement(
            "Pneumonia",
            "confluent soft-edged opacity",
            "opacity",
            partial(window_opacity, finding="pneumonia"),
        ),
        Measurement(
            "Pneumothorax",
            "lucent rim without markings beyond the lung edge",
            "rim lucency",
            peripheral_lucency,
        ),
    )
}
assert tuple(MEASUREMENTS) == LABELS


def measure(image: np.ndarray, scene: Scene) -> dict[str, float]:
    """Every finding's score for one image of ``scene`` (any size)."""
    view = MeasurementView(image, scene)
    return {name: m.read(view) for name, m in MEASUREMENTS.items()}


def measure_finding(finding: str, image: np.ndarray, scene: Scene) -> float:
    """One finding's score (``finding`` spelled as in ``service.labels.LABELS``)."""
    return MEASUREMENTS[finding].read(MeasurementView(image, scene))
