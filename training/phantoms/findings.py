"""The 14 NIH findings: where each would appear in a given chest, and what it looks like.

``sample_findings`` draws a :class:`FindingPlan` for every seed, whatever the labels, from its own
random stream: the place and shape of each finding (real NIH box positions for the eight findings the
NIH boxes cover, clinical rules for the rest). Rendering then adds only the labelled ones. Each
signature is built to survive downsampling to 64² (a nodule is still 3-5 pixels wide there) and to
differ from the others in kind: shape, texture, place or laterality.

| finding | signature | where |
| --- | --- | --- |
| Atelectasis | plate-like dense band, elevated hemidiaphragm (volume loss) | mid/lower zones (NIH boxes) |
| Cardiomegaly | cardiothoracic ratio 0.56-0.68 (normal 0.39-0.46) | heart; ratio from NIH box widths |
| Consolidation | dense homogeneous lobar opacity, sharp fissure border, air bronchograms | right upper, right middle or a lower lobe |
| Edema | bilateral perihilar bat-wing haze, Kerley B lines at the bases | both hila |
| Effusion | fluid filling the costophrenic angle, meniscus climbing the wall | base; side from NIH boxes, 30 % bilateral |
| Emphysema | hyperlucent lungs, pruned peripheral vessels, low flat diaphragms, apical bullae | both lungs |
| Fibrosis | reticular net, upper-zone predominant | both upper zones |
| Hernia | retrocardiac round sac with an air-fluid level | behind the heart, above the diaphragm |
| Infiltration | ill-defined mottled patch | NIH boxes, above the costophrenic recesses |
| Mass | large lobulated opacity (12-20 % of the film across) | NIH boxes |
| Nodule | small round dense opacity (5.6-7.6 % of the film across) | NIH boxes |
| Pleural_Thickening | smooth thick pleural band along the lateral wall and apex | chest wall, one or both sides |
| Pneumonia | confluent cluster of soft-edged opacities | NIH boxes, mostly lower zones |
| Pneumothorax | lung edge retracted from the wall, lucent rim without markings | apex and lateral wall; side from NIH boxes |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.labels import LABEL_INDEX
from training.phantoms.anatomy import MIDLINE, SIDE_SIGN, Anatomy
from training.phantoms.geometry import (
    Frame,
    band,
    ellipse,
    ellipse_distance,
    lattice_field,
    ring,
    soft_step,
    splat_lines,
)
from training.phantoms.placement import NIH_THORAX, bbox_table

FLUID = 0.78  # attenuation that turns aerated lung into soft-tissue density
PNEUMOTHORAX_RIM = (0.07, 0.1)  # lateral width of the pleural gas, image fractions
CARDIOMEGALY_RATIO = (0.56, 0.68)  # normal hearts are 0.39-0.46 (see anatomy)


@dataclass(frozen=True)
class Opacity:
    """A round or lobulated opacity (nodule, mass)."""

    side: int
    u: float
    v: float
    radius: float
    lobulation: tuple[float, float, float, float]  # amplitudes and phases of 3- and 5-fold bumps


@dataclass(frozen=True)
class Plate:
    """Plate-like atelectasis: a dense band, and the volume loss that lifts the hemidiaphragm."""

    side: int
    u: float
    v: float
    length: float
    angle: float
    thickness: float
    elevation: float


@dataclass(frozen=True)
class Lobe:
    """Lobar consolidation: an ellipse of the lung cut by a straight fissure, with air bronchograms."""

    side: int
    u: float
    v: float
    ru: float
    rv: float
    fissure_angle: float  # direction of the fissure line
    fissure_offset: float  # signed distance of the fissure from the centre; region lies on the + side
    density: float  # a posterior lower lobe fills only part of the chest's depth
    bronchi_starts: np.ndarray
    bronchi_ends: np.ndarray


@dataclass(frozen=True)
class Patches:
    """Ill-defined patchy opacity: a window of soft blobs (pneumonia) or mottled texture (infiltration)."""

    side: int
    u: float
    v: float
    ru: float
    rv: float
    blobs: np.ndarray  # [K, 3] (du, dv, radius) relative to the centre
    texture: np.ndarray  # random lattice for the mottling


@dataclass(frozen=True)
class Effusion:
    sides: tuple[int, ...]
    height: float  # fluid height at the chest wall above the costophrenic angle


@dataclass(frozen=True)
class Pneumothorax:
    side: int
    rim: float  # lateral retraction of the lung edge (apical retraction is 1.3 × rim)


@dataclass(frozen=True)
class PleuralThickening:
    sides: tuple[int, ...]
    thickness: float
    undulation: float


@dataclass(frozen=True)
class Hernia:
    u: float
    v: float
    radius: float
    level: float  # air-fluid level, as a fraction of the radius below the centre


@dataclass(frozen=True)
class Emphysema:
    dome_drop: float
    flattening: float
    bullae: np.ndarray  # [K, 4] (side, u, v, radius)


@dataclass(frozen=True)
class Edema:
    strength: float
    kerley_starts: np.ndarray
    kerley_ends: np.ndarray


@dataclass(frozen=True)
class Fibrosis:
    lattice: np.ndarray
    lower_v: float  # reticulation fades out below this height


@dataclass(frozen=True)
class FindingPlan:
    atelectasis: Plate
    cardiomegaly_ratio: float
    consolidation: Lobe
    edema: Edema
    effusion: Effusion
    emphysema: Emphysema
    fibrosis: Fibrosis
    hernia: Hernia
    infiltration: Patches
    mass: Opacity
    nodule: Opacity
    pleural_thickening: PleuralThickening
    pneumonia: Patches
    pneumothorax: Pneumothorax


# --- placement --------------------------------------------------------------------------------------
def inside_lung(a: Anatomy, side: int, u: float, v: float, margin: float = 0.0) -> bool:
    """Whether (u, v) lies in the lung field of ``side``, at least ``margin`` inside its edges."""
    cu, cv, ru, rv = a.lung_ellipse(side)
    if ellipse_distance(np.float64(u), np.float64(v), cu, cv, ru, rv) > -margin:
        return False
    if v > a.diaphragm_v(side, u) - margin:
        return False
    if SIDE_SIGN[side] * (u - MIDLINE) < a.mediastinum_half_width + margin:
        return False
    hu, hv = a.heart_center
    return ellipse_distance(np.float64(u), np.float64(v), hu, hv, *a.heart_axes) > margin


def _from_nih_box(a: Anatomy, box: np.ndarray) -> tuple[float, float, float, float]:
    """Map an NIH box (image fractions of an average film) onto this chest's thorax."""
    scale_u = a.thorax_half_width / NIH_THORAX["half_width"]
    base = 0.5 * (a.dome_v[0] + a.dome_v[1])
    scale_v = (base - a.apex_v) / (NIH_THORAX["base_v"] - NIH_THORAX["apex_v"])
    u = MIDLINE + (box[0] - 0.5) * scale_u
    v = a.apex_v + (box[1] - NIH_THORAX["apex_v"]) * scale_v
    return u, v, box[2] * scale_u, box[3] * scale_v


def _nih_place(rng, a: Anatomy, finding: str, margin: float, max_v: float = 1.0):
    """A real NIH box of ``finding`` whose centre falls inside a lung of this chest."""
    boxes = bbox_table()[finding]
    for _ in range(40):
        u, v, w, h = _from_nih_box(a, boxes[rng.integers(len(boxes))])
        u += rng.uniform(-0.015, 0.015)
        v += rng.uniform(-0.015, 0.015)
        side = 0 if u < MIDLINE else 1
        if v < max_v and inside_lung(a, side, u, v, margin):
            return side, u, v, w, h
    side = int(rng.integers(2))  # rare: fall back to the middle of a lung
    return side, a.hilum[side][0] + SIDE_SIGN[side] * 0.12, a.hilum[side][1] + 0.05, 0.15, 0.15


def _nih_side(rng, finding: str) -> int:
    """The side of a random real NIH box of ``finding`` (0 = image left)."""
    boxes = bbox_table()[finding]
    return int(boxes[rng.integers(len(boxes)), 0] >= MIDLINE)


def _sample_heart_ratio(rng) -> float:
    """An enlarged heart's cardiothoracic ratio: a real NIH Cardiomegaly box's width over the average
    film's thoracic width (median about 0.65), kept clearly above the 0.5 limit."""
    boxes = bbox_table()["Cardiomegaly"]
    width = boxes[rng.integers(len(boxes)), 2]
    return float(
        np.clip(width / (2 * NIH_THORAX["half_width"]), CARDIOMEGALY_RATIO[0], CARDIOMEGALY_RATIO[1])
    )


def sample_findings(rng: np.random.Generator, a: Anatomy) -> FindingPlan:
    return FindingPlan(
        atelectasis=_sample_atelectasis(rng, a),
        cardiomegaly_ratio=_sample_heart_ratio(rng),
        consolidation=_sample_consolidation(rng, a),
        edema=_sample_edema(rng, a),
        effusion=Effusion(
            sides=(0, 1) if rng.random() < 0.3 else (_nih_side(rng, "Effusion"),),
            height=rng.uniform(0.13, 0.22),
        ),
        emphysema=_sample_emphysema(rng, a),
        fibrosis=Fibrosis(
            lattice=rng.standard_normal((2, 29, 29)).astype(np.float32),
            lower_v=a.hilum[0][1] + rng.uniform(0.0, 0.05),
        ),
        hernia=Hernia(
            u=MIDLINE + rng.uniform(0.0, 0.045),
            v=0.5 * (a.dome_v[0] + a.dome_v[1]) - rng.uniform(0.045, 0.06),
            radius=rng.uniform(0.05, 0.065),
            level=rng.uniform(-0.1, 0.3),
        ),
        infiltration=_sample_patches(rng, a, "Infiltration", blobs=0, min_radius=0.1, max_radius=0.15),
        mass=_sample_opacity(rng, a, "Mass", radius=(0.06, 0.1)),
        nodule=_sample_opacity(rng, a, "Nodule", radius=(0.028, 0.038)),
        pleural_thickening=PleuralThickening(
            sides=_sides(rng, bilateral=0.35),
            thickness=rng.uniform(0.03, 0.042),
            undulation=rng.uniform(0, 2 * np.pi),
        ),
        pneumonia=_sample_patches(rng, a, "Pneumonia", blobs=7, min_radius=0.065, max_radius=0.12),
        pneumothorax=Pneumothorax(side=_nih_side(rng, "Pneumothorax"), rim=rng.uniform(*PNEUMOTHORAX_RIM)),
    )


def _sides(rng, bilateral: float) -> tuple[int, ...]:
    return (0, 1) if rng.random() < bilateral else (int(rng.integers(2)),)


def _sample_opacity(rng, a: Anatomy, finding: str, radius: tuple[float, float]) -> Opacity:
    r = rng.uniform(*radius)
    side, u, v, _, _ = _nih_place(rng, a, finding, margin=r + 0.01)
    return Opacity(
        side,
        u,
        v,
        r,
        (
            rng.uniform(0.04, 0.1),
            rng.uniform(0, 2 * np.pi),
            rng.uniform(0.02, 0.06),
            rng.uniform(0, 2 * np.pi),
        ),
    )


def _sample_atelectasis(rng, a: Anatomy) -> Plate:
    side, u, v, w, _ = _nih_place(rng, a, "Atelectasis", margin=0.04, max_v=min(a.dome_v) - 0.07)
    return Plate(
        side=side,
        u=u,
        v=v,
        length=float(np.clip(w, 0.13, 0.22)),
        angle=rng.uniform(-0.2, 0.2),
        thickness=rng.uniform(0.026, 0.034),
        elevation=rng.uniform(0.035, 0.05),
    )


def _sample_consolidation(rng, a: Anatomy) -> Lobe:
    """Right upper lobe (sharp lower border on the horizontal fissure), right middle lobe (sharp upper
    border) or a lower lobe (sharp oblique upper border), as often as they occur clinically."""
    lobe = rng.choice(["right upper", "right middle", "lower"], p=[0.3, 0.2, 0.5])
    side = 0 if lobe != "lower" else int(rng.integers(2))
    sign = SIDE_SIGN[side]
    hu, hv = a.hilum[side]
    # The lobe lies on the side of the fissure line that its normal (angle) points to.
    if lobe == "right upper":  # above the horizontal fissure
        u, v = hu - 0.08, a.apex_v + 0.13
        ru, rv, angle, offset = 0.14, 0.13, -np.pi / 2 + rng.uniform(-0.1, 0.1), -rng.uniform(0.05, 0.08)
    elif lobe == "right middle":  # below the horizontal fissure, lateral of the right heart border
        u, v = hu - 0.13, hv + 0.12
        ru, rv, angle, offset = 0.09, 0.1, np.pi / 2 + rng.uniform(-0.1, 0.1), -rng.uniform(0.05, 0.07)
    else:  # below the oblique fissure, which runs down and out
        u, v = hu + sign * 0.11, a.dome_v[side] - 0.09
        ru, rv = 0.12, 0.12
        angle, offset = np.pi / 2 + sign * rng.uniform(0.2, 0.45), -rng.uniform(0.04, 0.07)
    # Air bronchograms: a few dark branching tubes heading out from the hilum through the lobe.
    count = 4
    directions = np.arctan2(v - hv, sign * (u - hu)) + rng.uniform(-0.5, 0.5, count)
    starts = np.stack(
        [u - sign * 0.05 + rng.uniform(-0.02, 0.02, count), v + rng.uniform(-0.03, 0.03, count)], 1
    )
    lengths = rng.uniform(0.05, 0.09, count)
    ends = starts + np.stack([sign * np.cos(directions), np.sin(directions)], 1) * lengths[:, None]
    density = 0.45 if lobe == "lower" else 0.62
    return Lobe(side, u, v, ru, rv, float(angle), float(offset), density, starts, ends)


def _sample_patches(
    rng, a: Anatomy, finding: str, blobs: int, min_radius: float, max_radius: float
) -> Patches:
    # Above the costophrenic recesses, where effusions collect.
    max_v = min(a.dome_v) - (0.1 if finding == "Infiltration" else 0.04)
    side, u, v, w, h = _nih_place(rng, a, finding, margin=0.03, max_v=max_v)
    ru, rv = max(min_radius, min(max_radius, w / 2)), max(min_radius, min(max_radius, h / 2))
    offsets = np.stack(
        [
            rng.uniform(-0.7, 0.7, blobs) * ru,
            rng.uniform(-0.7, 0.7, blobs) * rv,
            rng.uniform(0.03, 0.055, blobs),
        ],
        1,
    )
    return Patches(side, u, v, ru, rv, offsets, rng.standard_normal((21, 21)).astype(np.float32))


def _sample_edema(rng, a: Anatomy) -> Edema:
    starts, ends = [], []
    for side in (0, 1):
        cp_v = a.costophrenic_angle(side)[1]
        heights = cp_v - rng.uniform(0.03, 0.16, 5)
        walls = a.lateral_wall_u(side, heights) - SIDE_SIGN[side] * 0.005
        lengths = rng.uniform(0.035, 0.055, 5)
        starts.append(np.stack([walls, heights], 1))
        ends.append(np.stack([walls - SIDE_SIGN[side] * lengths, heights + rng.uniform(-0.004, 0.004, 5)], 1))
    return Edema(
        strength=rng.uniform(0.45, 0.55),
        kerley_starts=np.concatenate(starts),
        kerley_ends=np.concatenate(ends),
    )


def _sample_emphysema(rng, a: Anatomy) -> Emphysema:
    bullae = []
    for _ in range(rng.integers(1, 3)):
        side = int(rng.integers(2))
        r = rng.uniform(0.03, 0.045)
        u = a.lateral_wall_u(side, a.apex_v + 0.08) - SIDE_SIGN[side] * rng.uniform(0.05, 0.1)
        bullae.append((side, u, a.apex_v + rng.uniform(0.06, 0.1), r))
    return Emphysema(
        dome_drop=rng.uniform(0.06, 0.085), flattening=rng.uniform(0.2, 0.35), bullae=np.array(bullae)
    )


# --- anatomy changes --------------------------------------------------------------------------------
def apply_anatomy_changes(a: Anatomy, plan: FindingPlan, present: np.ndarray) -> Anatomy:
    """Findings that change the chest itself: heart size, diaphragm height and shape."""
    dome = list(a.dome_v)
    curvature = list(a.dome_curvature)
    ratio = a.heart_ratio
    if present[LABEL_INDEX["Emphysema"]]:
        e = plan.emphysema
        dome = [d + e.dome_drop for d in dome]
        curvature = [c * e.flattening for c in curvature]
        ratio *= 0.92  # the over-inflated chest narrows the heart shadow
    if present[LABEL_INDEX["Atelectasis"]]:
        dome[plan.atelectasis.side] -= plan.atelectasis.elevation
    if present[LABEL_INDEX["Cardiomegaly"]]:
        ratio = plan.cardiomegaly_ratio
    return a.with_changes(dome_v=tuple(dome), dome_curvature=tuple(curvature), heart_ratio=ratio)


# --- rendering --------------------------------------------------------------------------------------
def render_findings(frame: Frame, a: Anatomy, plan: FindingPlan, present: np.ndarray, layers) -> np.ndarray:
    """The attenuation the labelled findings add (or remove) on top of the normal chest.

    Pleural findings (effusion, thickening, pneumothorax) live in the pleural cavity. Diffuse lung
    findings (emphysema, fibrosis, oedema) show only where there is lung, so a pneumothorax's gas
    carries no pattern or marking; focal ones are drawn where they were placed, even when a
    pneumothorax has collapsed the lung away from there, so that every labelled finding stays visible.
    Airspace opacities also fill the lung behind the heart."""
    density = np.zeros((frame.size, frame.size), dtype=np.float32)

    def has(name: str) -> bool:
        return bool(present[LABEL_INDEX[name]])

    tissue = list(layers.cavity)
    if has("Pneumothorax"):
        change, gas = _pneumothorax(frame, a, plan.pneumothorax, layers)
        density += change
        tissue[plan.pneumothorax.side] = tissue[plan.pneumothorax.side] * (1.0 - gas)
    aerated = tissue[0] + tissue[1]
    deep = [layers.cavity[side] + layers.retrocardiac[side] for side in (0, 1)]
    lungs = layers.cavity[0] + layers.cavity[1]
    if has("Emphysema"):
        density += _emphysema(frame, plan.emphysema, layers, tissue)
    if has("Fibrosis"):
        density += _fibrosis(frame, plan.fibrosis, aerated)
    if has("Edema"):
        density += _edema(frame, a, plan.edema, tissue)
    if has("Infiltration"):
        density += _infiltration(frame, plan.infiltration, deep)
    if has("Pneumonia"):
        density += _pneumonia(frame, plan.pneumonia, deep)
    if has("Consolidation"):
        density += _consolidation(frame, plan.consolidation, deep)
    if has("Atelectasis"):
        density += _atelectasis(frame, plan.atelectasis, layers.cavity)
    if has("Nodule"):
        density += _opacity(frame, plan.nodule, 0.55, lungs)
    if has("Mass"):
        density += _opacity(frame, plan.mass, 0.6, lungs)
    if has("Pleural_Thickening"):
        density += _pleural_thickening(frame, a, plan.pleural_thickening, layers)
    if has("Effusion"):
        density += _effusion(frame, a, plan.effusion, layers)
    if has("Hernia"):
        density += _hernia(frame, plan.hernia)
    return density


def _opacity(frame: Frame, o: Opacity, strength: float, lungs: np.ndarray) -> np.ndarray:
    """A lobulated sphere: bumps of 3- and 5-fold symmetry on the outline, thickest at the centre."""
    amp3, phase3, amp5, phase5 = o.lobulation
    rows, cols = frame.window(o.u, o.v, o.radius * (1 + amp3 + amp5) + frame.edge)
    du, dv = frame.u[rows, cols] - o.u, frame.v[rows, cols] - o.v
    theta = np.arctan2(dv, du)
    radius = o.radius * (1.0 + amp3 * np.sin(3 * theta + phase3) + amp5 * np.sin(5 * theta + phase5))
    rho = np.hypot(du, dv)
    inside = soft_step(rho - radius, frame.edge)
    thickness = np.sqrt(np.clip(1.0 - (rho / radius) ** 2, 0.15, 1.0))
    out = np.zeros((frame.size, frame.size), dtype=np.float32)
    # Mostly over lung, but a mass reaching the mediastinum still shows.
    out[rows, cols] = strength * inside * thickness * (0.4 + 0.6 * np.minimum(lungs[rows, cols], 1.0))
    return out


def _atelectasis(frame: Frame, p: Plate, tissue) -> np.ndarray:
    cos, sin = np.cos(p.angle), np.sin(p.angle)
    du, dv = frame.u - p.u, frame.v - p.v
    along = cos * du + sin * dv
    across = -sin * du + cos * dv
    plate = band(across, p.thickness / 2, frame.edge) * soft_step(
        np.abs(along) - p.length / 2, 3 * frame.edge
    )
    return 0.6 * plate * tissue[p.side]


def _uniform_lines(frame: Frame, starts: np.ndarray, ends: np.ndarray, intensity: float, width: float) -> np.ndarray:
    """``splat_lines`` with one intensity and one width for every segment."""
    return splat_lines(frame, starts, ends, np.full(len(starts), intensity), np.full(len(starts), width))


def _consolidation(frame: Frame, lobe: Lobe, tissue) -> np.ndarray:
    cos, sin = np.cos(lobe.fissure_angle), np.sin(lobe.fissure_angle)
    # Distance from the fissure line, positive on the consolidated side.
    across = cos * (frame.u - lobe.u) + sin * (frame.v - lobe.v) - lobe.fissure_offset
    region = soft_step(-across, frame.edge) * ellipse(frame, lobe.u, lobe.v, lobe.ru, lobe.rv, edge=0.03)
    region *= tissue[lobe.side]
    bronchi = _uniform_lines(frame, lobe.bronchi_starts, lobe.bronchi_ends, intensity=0.3, width=0.01)
    return region * (lobe.density - np.minimum(bronchi, 0.3))


def _infiltration(frame: Frame, p: Patches, tissue) -> np.ndarray:
    mottle = np.clip(lattice_field(p.texture, frame.size) * 0.6 + 0.65, 0.3, 1.0)
    du, dv = (frame.u - p.u) / p.ru, (frame.v - p.v) / p.rv
    window = np.exp(-((du * du + dv * dv) ** 2))  # flat-topped, fading out over the window's edge
    return 0.6 * mottle * window * tissue[p.side]


def _pneumonia(frame: Frame, p: Patches, tissue) -> np.ndarray:
    side = p.side
    cloud = np.zeros((frame.size, frame.size), dtype=np.float32)
    for du, dv, r in p.blobs:
        d2 = ((frame.u - p.u - du) ** 2 + (frame.v - p.v - dv) ** 2) / (r * r)
        cloud += np.exp(-d2)
    return 0.52 * np.tanh(1.3 * cloud) * tissue[side]


def _edema(frame: Frame, a: Anatomy, e: Edema, tissue) -> np.ndarray:
    out = np.zeros((frame.size, frame.size), dtype=np.float32)
    for side in (0, 1):
        hu, hv = a.hilum[side]
        # Bat wing: dense at the hilum, fading out before the periphery.
        du = (frame.u - hu) / 0.13
        dv = (frame.v - hv - 0.03) / 0.15
        out += e.strength * np.exp(-(du * du + dv * dv)) * tissue[side]
    kerley = _uniform_lines(frame, e.kerley_starts, e.kerley_ends, intensity=0.35, width=0.006)
    return out + kerley * (tissue[0] + tissue[1])


def _fibrosis(frame: Frame, f: Fibrosis, lungs: np.ndarray) -> np.ndarray:
    # The zero lines of two independent noise fields cross each other into a mesh of small cells.
    net = np.maximum(
        *(np.clip(1.0 - np.abs(lattice_field(lattice, frame.size)) / 0.45, 0.0, 1.0) for lattice in f.lattice)
    )
    upper = soft_step(frame.v - f.lower_v, 0.08)
    return 0.42 * net * upper * lungs


def _pleural_thickening(frame: Frame, a: Anatomy, p: PleuralThickening, layers) -> np.ndarray:
    out = np.zeros((frame.size, frame.size), dtype=np.float32)
    for side in p.sides:
        cu, cv, ru, rv = a.lung_ellipse(side)
        distance = ellipse_distance(frame.u, frame.v, cu, cv, ru, rv)
        thickness = p.thickness * (1.0 + 0.15 * np.sin(frame.v * 40.0 + p.undulation))
        rim = soft_step(-(distance + thickness), frame.edge)
        cp_v = a.costophrenic_angle(side)[1]
        # Spares the costophrenic angle (that is where effusion shows).
        rim *= soft_step(frame.v - (cp_v - 0.1), 0.04)
        out += 0.7 * rim * layers.cavity[side]
    return out


def _effusion(frame: Frame, a: Anatomy, e: Effusion, layers) -> np.ndarray:
    out = np.zeros((frame.size, frame.size), dtype=np.float32)
    for side in e.sides:
        cp_u, cp_v = a.costophrenic_angle(side)
        lateral = SIDE_SIGN[side] * (frame.u - cp_u)  # > 0 beyond the angle, towards the wall
        closeness = np.clip(1.0 + lateral / (0.7 * a.thorax_half_width), 0.0, 1.0)
        surface = cp_v - e.height * (0.1 + 0.9 * closeness**2)  # meniscus: climbing the chest wall
        fluid = soft_step(surface - frame.v, 2 * frame.edge)
        out += FLUID * fluid * layers.cavity[side]
    return out


def retracted_lung(a: Anatomy, side: int, rim: float) -> tuple[float, float, float, float]:
    """The lung outline pulled ``rim`` away from the lateral wall and 1.3 × ``rim`` from the apex."""
    cu, cv, ru, rv = a.lung_ellipse(side)
    return cu - SIDE_SIGN[side] * rim / 2, cv + 0.65 * rim, ru - rim / 2, rv - 0.65 * rim


def _pneumothorax(frame: Frame, a: Anatomy, p: Pneumothorax, layers) -> tuple[np.ndarray, np.ndarray]:
    """The attenuation change and the gas mask: the lung retracts from the apex and lateral wall."""
    side = p.side
    distance = ellipse_distance(frame.u, frame.v, *retracted_lung(a, side, p.rim))
    gas = layers.cavity[side] * soft_step(-distance, frame.edge)
    pleural_line = band(distance, 0.003, frame.edge) * layers.cavity[side]
    # The pleural space holds no lung: remove parenchyma and vessel markings there.
    return -gas * (layers.lung_tissue + layers.markings + 0.08) + 0.22 * pleural_line, gas


def _emphysema(frame: Frame, e: Emphysema, layers, tissue) -> np.ndarray:
    # Hyperlucent lungs with pruned peripheral vessels.
    out = -0.09 * (tissue[0] + tissue[1]) - 0.55 * layers.peripheral_markings
    for side, u, v, r in e.bullae:
        cavity = tissue[int(side)]
        interior = ellipse(frame, u, v, r, r)
        wall = ring(frame, u, v, r, r, 0.0025)
        out += (-0.06 - layers.markings) * interior * cavity + 0.12 * wall * cavity
    return out


def _hernia(frame: Frame, h: Hernia) -> np.ndarray:
    sac = ellipse(frame, h.u, h.v, h.radius, 0.85 * h.radius)
    wall = ring(frame, h.u, h.v, h.radius, 0.85 * h.radius, 0.004)
    level_v = h.v + h.level * h.radius
    gas = sac * soft_step(frame.v - level_v, frame.edge)
    fluid = sac * (1.0 - soft_step(frame.v - level_v, frame.edge))
    return -0.5 * gas + 0.12 * fluid + 0.2 * wall
