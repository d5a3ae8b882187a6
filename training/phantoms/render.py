"""Render a phantom: anatomy and findings as attenuation maps, then exposure, film response and noise.

The image is built the way a radiograph forms: every structure adds its attenuation (soft tissue 1,
aerated lung much less, bone more) to a density map ``D``; brightness is ``1 - exp(-exposure · D)``
(0 = no attenuation, black; bone and fluid bright), then a film gamma, an anode heel gradient and
quantum noise. Geometry lives in anatomy coordinates, so the same seed gives the same chest at any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.labels import NUM_LABELS
from service.prior import get_prior
from training.phantoms.anatomy import MIDLINE, SIDE_SIGN, Anatomy, sample_anatomy
from training.phantoms.findings import FindingPlan, apply_anatomy_changes, render_findings, sample_findings
from training.phantoms.geometry import Frame, band, ellipse, ellipse_distance, soft_step, splat_line_groups

MIN_SIZE, MAX_SIZE = 32, 1024
# Independent random streams: the anatomy and each finding's placement never depend on the labels, so
# adding a finding to a seed's label set changes that finding's region and nothing else.
_ANATOMY_STREAM, _FINDINGS_STREAM, _NOISE_STREAM = 1, 2, 3
SOFT_TISSUE = 1.0
LUNG_AIR = 0.8  # attenuation the air spaces remove from the soft-tissue baseline


@dataclass(frozen=True)
class Scene:
    """Everything random about one seed, independent of the labels and of the image size.

    ``anatomy`` is the normal chest; ``findings`` says where and how each of the 14 findings would
    appear if labelled. Measurements read pixels at these places.
    """

    seed: int
    anatomy: Anatomy
    findings: FindingPlan


def check_size(size: int) -> int:
    """``size`` as an int, or a clear error unless it is a power of two from 32 to 1024."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an integer power of two from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    size = int(size)
    if size < MIN_SIZE or size > MAX_SIZE or size & (size - 1):
        raise ValueError(f"size must be a power of two from {MIN_SIZE} to {MAX_SIZE}, got {size}")
    return size


def _check_seed(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.float32)
    if labels.shape != (NUM_LABELS,):
        raise ValueError(
            f"labels must be a multi-hot vector of {NUM_LABELS} values in LABELS order, got shape {labels.shape}"
        )
    return labels > 0.5


def make_scene(seed: int) -> Scene:
    """The anatomy and the finding plan of ``seed`` (a non-negative integer)."""
    seed = _check_seed(seed, "seed")
    anatomy = sample_anatomy(np.random.default_rng(np.random.SeedSequence([seed, _ANATOMY_STREAM])))
    findings = sample_findings(
        np.random.default_rng(np.random.SeedSequence([seed, _FINDINGS_STREAM])), anatomy
    )
    return Scene(seed=seed, anatomy=anatomy, findings=findings)


def render_phantom(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A float32 [size, size] chest radiograph phantom in [0, 1] showing the labelled findings.

    ``labels`` is a 14-dim multi-hot vector in ``service.labels.LABELS`` order. Deterministic: the same
    (labels, size, seed) give the same bytes.
    """
    size = check_size(size)
    present = _check_labels(labels)
    return render_scene(make_scene(seed), present, size)


def render_scene(scene: Scene, present: np.ndarray, size: int) -> np.ndarray:
    """Render ``scene`` with the findings marked in the boolean [14] ``present``."""
    anatomy = apply_anatomy_changes(scene.anatomy, scene.findings, present)
    frame = Frame(size, anatomy.pose)
    layers = _anatomy_layers(frame, anatomy)
    density = layers.density
    density += render_findings(frame, anatomy, scene.findings, present, layers)
    return _expose(frame, anatomy, density, scene.seed)


@dataclass(frozen=True)
class LungFields:
    """Soft masks in [0, 1] of one chest at one size."""

    heart: np.ndarray
    above_diaphragm: np.ndarray
    cavity: tuple[np.ndarray, np.ndarray]


def lung_fields(frame: Frame, a: Anatomy) -> LungFields:
    """Soft masks of the heart and of each lung field: the lung outline (apex and lateral wall) above
    the hemidiaphragm, lateral of the mediastinum, outside the heart."""
    u, v, edge = frame.u, frame.v, frame.edge
    du = u - MIDLINE
    heart = ellipse(frame, *a.heart_center, *a.heart_axes)
    diaphragm = np.where(du < 0, a.diaphragm_v(0, u), a.diaphragm_v(1, u))
    above_diaphragm = soft_step(v - diaphragm, edge)
    cavities = []
    for side in (0, 1):
        outline = soft_step(ellipse_distance(u, v, *a.lung_ellipse(side)), edge)
        lateral_of_mediastinum = soft_step(a.mediastinum_half_width - SIDE_SIGN[side] * du, edge)
        cavities.append(outline * lateral_of_mediastinum * above_diaphragm * (1.0 - heart))
    return LungFields(heart=heart, above_diaphragm=above_diaphragm, cavity=(cavities[0], cavities[1]))


@dataclass
class AnatomyLayers:
    """The normal chest's attenuation, and the masks and layers the findings draw on."""

    density: np.ndarray
    cavity: tuple[np.ndarray, np.ndarray]  # each lung field: the pleural cavity, filled with aerated lung
    # Lung behind the heart (the lower lobes are posterior), as a fraction of the chest's depth there:
    # an opacity there shows through the heart shadow, and the heart border stays visible.
    retrocardiac: tuple[np.ndarray, np.ndarray]
    lung_tissue: np.ndarray  # attenuation of the aerated lung itself
    markings: np.ndarray  # vessel markings
    peripheral_markings: np.ndarray  # the outer vessel generations (pruned in emphysema)


def _anatomy_layers(frame: Frame, a: Anatomy) -> AnatomyLayers:
    u, v, edge = frame.u, frame.v, frame.edge
    du = u - MIDLINE
    # Torso: a squarish outline (shoulders) narrowing to the neck at the top.
    torso = soft_step(_superellipse_distance(du, v - 0.7, a.body_half_width, 0.68, 3.0), 3 * edge)
    neck = soft_step(np.abs(du) - 0.09, 2 * edge) * soft_step(v - 0.2, 6 * edge)
    body = np.maximum(torso, neck)
    # The chest is an elliptic cylinder: X-rays cross more tissue near the midline than at the sides.
    depth = np.sqrt(np.clip(1.0 - (du / (a.body_half_width + 0.02)) ** 2, 0.0, 1.0))
    density = SOFT_TISSUE * body * (0.6 + 0.4 * depth)

    fields = lung_fields(frame, a)
    heart, above_diaphragm, cavities = fields.heart, fields.above_diaphragm, fields.cavity
    lungs = cavities[0] + cavities[1]
    density -= LUNG_AIR * lungs
    # Soft tissue overlying the bases (breasts, diaphragm slope) and the apices (muscles) greys them.
    overlay = 0.1 * np.clip((v - 0.45) / 0.3, 0, 1) + 0.08 * np.clip((a.apex_v + 0.08 - v) / 0.08, 0, 1)
    density += overlay * lungs
    tissue = a.lung_density * 0.4 * lungs
    density += tissue

    # Heart and great vessels are thicker than the chest wall; the aortic knob bulges to the image right.
    density += 0.05 * heart
    knob = ellipse(frame, MIDLINE + a.mediastinum_half_width - 0.008, a.hilum[1][1] - 0.1, 0.03, 0.028)
    density += 0.25 * knob * (1.0 - heart)
    # Abdomen under the diaphragm, with the gastric air bubble under the left dome.
    below = (1.0 - above_diaphragm) * body
    density += 0.25 * below
    bubble_u = a.dome_u(1) + 0.03
    bubble = ellipse(frame, bubble_u, a.diaphragm_v(1, bubble_u) + 0.045, 0.045, 0.028)
    density -= 0.45 * bubble * below
    # Trachea: an air column down to the carina.
    carina_v = a.hilum[0][1] - 0.06
    trachea = soft_step(np.abs(du - 0.004) - 0.014, edge) * soft_step(v - carina_v, 3 * edge)
    density -= 0.35 * trachea * body

    density += _bones(frame, a, body)
    # Main bronchi (air, darker) and the vessel tree, drawn in one pass: bronchi, central vessels
    # (the first two generations) and peripheral ones (pruned in emphysema) as three layers.
    vessels = a.vessels
    carina = np.array([[MIDLINE + 0.004, carina_v]] * 2)
    generation_set = np.where(vessels.generation < 2, 1, 2)
    bronchi, central, peripheral = splat_line_groups(
        frame,
        np.concatenate([carina, vessels.starts]),
        np.concatenate([np.array(a.hilum), vessels.ends]),
        np.concatenate([np.full(2, 0.25), 0.24 - 0.03 * vessels.generation]),
        np.concatenate([np.full(2, 0.018), vessels.widths]),
        np.concatenate([np.zeros(2, dtype=int), generation_set]),
        3,
    )
    density -= bronchi
    markings = [central * lungs, peripheral * lungs]
    hila = sum(ellipse(frame, hu, hv, 0.03, 0.045, edge=6 * edge) for hu, hv in a.hilum)
    density += markings[0] + markings[1] + 0.12 * hila * lungs
    return AnatomyLayers(
        density=density,
        cavity=cavities,
        retrocardiac=tuple(
            0.7 * heart * above_diaphragm * soft_step(-SIDE_SIGN[side] * du, edge) for side in (0, 1)
        ),
        lung_tissue=tissue,
        markings=markings[0] + markings[1],
        peripheral_markings=markings[1],
    )


def _bones(frame: Frame, a: Anatomy, body: np.ndarray) -> np.ndarray:
    u, v, edge = frame.u, frame.v, frame.edge
    du = u - MIDLINE
    x = np.abs(du) / a.thorax_half_width  # 0 at the spine, 1 at the chest wall
    # Spine: vertebral bodies with darker disc spaces.
    vertebra = soft_step(np.abs(du) - 0.03, edge)
    discs = 0.75 + 0.25 * np.cos(2 * np.pi * (v - a.rib_top_v) / (a.rib_spacing * 0.95)) ** 8
    bones = 0.22 * vertebra * (1.5 - 0.5 * discs)
    # Posterior ribs: arches that rise slightly from the spine, then fall towards the chest wall.
    arch = v - a.rib_top_v + 0.03 * x - 0.1 * x * x
    t = arch / a.rib_spacing
    phase = t - np.floor(t)
    thickness = 0.42
    rib = soft_step(np.abs(phase - thickness / 2) * a.rib_spacing - thickness / 2 * a.rib_spacing, edge)
    cortex = soft_step(
        np.abs(np.abs(phase - thickness / 2) * a.rib_spacing - thickness / 2 * a.rib_spacing) - edge, edge
    )
    in_range = (
        soft_step(-t, 0.3)
        * soft_step(t - a.rib_count, 0.3)
        * soft_step(x - 1.08, 0.05)
        * soft_step(0.1 - x, 0.05)
    )
    # Ribs finer than about two pixels would alias into moire: fade them as a detector's blur would.
    resolved = float(np.clip((a.rib_spacing / frame.pixel - 1.5) / 2.0, 0.0, 1.0))
    bones += (0.06 * rib + 0.035 * cortex) * in_range * resolved
    # Anterior ribs: fainter, sloping down towards the sternum.
    anterior = (v - a.rib_top_v - 0.12 - 0.16 * (1.0 - x)) / (a.rib_spacing * 1.15)
    phase_a = anterior - np.floor(anterior)
    rib_a = soft_step(np.abs(phase_a - 0.2) - 0.2, 2 * edge / a.rib_spacing)
    in_range_a = (
        soft_step(-anterior, 0.3)
        * soft_step(anterior - 6, 0.3)
        * soft_step(x - 1.05, 0.05)
        * soft_step(0.35 - x, 0.1)
    )
    bones += 0.04 * rib_a * in_range_a * resolved
    # Clavicles: from the sternal notch out and up to the shoulders, gently S-shaped.
    medial_v, lateral_v = a.clavicle_v
    span = np.clip((np.abs(du) - 0.035) / (1.1 * a.thorax_half_width), -0.2, 1.3)
    centre = medial_v + (lateral_v - medial_v) * span + 0.012 * np.sin(2 * np.pi * span)
    clavicle = band(v - centre, 0.014, edge) * soft_step(-span, 0.03) * soft_step(span - 1.05, 0.03)
    bones += 0.35 * clavicle
    return bones * body


def _superellipse_distance(du: np.ndarray, dv: np.ndarray, ru: float, rv: float, power: float) -> np.ndarray:
    au, av = np.abs(du) / ru + 1e-6, np.abs(dv) / rv + 1e-6
    f = au**power + av**power - 1.0
    grad = power * np.hypot(au ** (power - 1) / ru, av ** (power - 1) / rv)
    return f / grad


def _expose(frame: Frame, a: Anatomy, density: np.ndarray, seed: int) -> np.ndarray:
    gain = a.exposure * (1.0 + a.heel * (frame.v - 0.5))
    image = -np.expm1(-gain * np.maximum(density, 0.0))
    image = image ** np.float32(a.gamma)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _NOISE_STREAM, frame.size]))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(a.noise)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def sample_phantom(index: int, size: int, seed: int = 0, prior: str = "nih") -> tuple[np.ndarray, np.ndarray]:
    """The ``index``-th phantom of data set ``seed``: labels drawn from the prior, then the image.

    Returns (image float32 [size, size] in [0, 1], labels float32 [14]).
    """
    size = check_size(size)
    rng = np.random.default_rng(
        np.random.SeedSequence([_check_seed(seed, "seed"), _check_seed(index, "index")])
    )
    labels = get_prior(prior).sample(1, rng)[0].astype(np.float32)
    image_seed = int(rng.integers(0, 2**63 - 1))
    return render_phantom(labels, size, image_seed), labels


def request_phantoms(target: np.ndarray, mask: np.ndarray, count: int, size: int, seed: int = 0,
                     prior: str = "nih") -> tuple[np.ndarray, np.ndarray]:
    """``count`` phantoms that truly meet a request: labels drawn from ``prior`` conditioned on the
    request (every label ``mask`` [14] constrains equal to ``target`` [14]: 1 present, 0 absent), so a
    finding comes in the company the prior gives it. What a judge says of them is what it grants the
    truth of that request (benchmarks/bench_lco_quality.py).

    Returns (images float32 [count, size, size] in [0, 1], labels float32 [count, 14]); deterministic
    in ``seed``. Raises ValueError when no label set of the prior meets the request.
    """
    size = check_size(size)
    rng = np.random.default_rng(_check_seed(seed, "seed"))
    labels = get_prior(prior).given(target, mask).sample(count, rng).astype(np.float32)
    images = [render_phantom(drawn, size, int(rng.integers(0, 2**63 - 1))) for drawn in labels]
    return np.stack(images), labels
