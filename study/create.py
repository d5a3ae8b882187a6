"""Setting a study up: pick real and synthetic images, encode them one way, store them with a blinded,
randomised, seeded case order per reader.

Every served image takes one path whatever its class (``served_png``):

1. pixels at the **synthetic resolution** (the bundle's, or the archive images' side). Real images are
   centre-cropped to a square and downsampled to it by the data set readers' own resize
   (``training.data.images.decode_image``, the filter the generator's training data went through);
   archive images pass the same function at their own size. Upsampling synthetic images to a larger
   display size instead would add interpolation only one class needs; the browser scales both alike.
2. float [-1, 1] -> 8-bit grey by ``service.png.to_pixels`` (16-bit sources are quantised here too);
3. PNG by ``service.png.encode_png`` with zlib level 0: stored blocks, so the byte length is a function
   of the side alone; Pillow writes IHDR, IDAT and IEND only (no text, time, gamma or EXIF chunks).

Real images need ``training.data`` (torch); this module imports it only when real images are read, and
the web app (``study.app``) never imports it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.labels import NUM_LABELS, format_finding_labels
from service.png import encode_png
from study.storage import Assignment, Case, Reader, Study, new_token, token_digest

STUDY_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
SERVED_FORMAT = {"format": "png8", "compress_level": 0, "chunks": ["IHDR", "IDAT", "IEND"]}
SYNTHETIC_KINDS = ("archive", "bundle")


class StudySetupError(ValueError):
    """The study cannot be set up as asked; the message says what to change."""


@dataclass(frozen=True)
class CaseImage:
    """One image for the study: ``image`` [H, W] float32 in [-1, 1] at the study resolution;
    ``finding_labels`` the NIH "Finding Labels" field (truth for real images, the request for synthetic
    ones; "" when unknown); ``source`` where it came from (never shown to readers)."""

    origin: str
    image: np.ndarray
    finding_labels: str
    source: str


@dataclass(frozen=True)
class StudyLinks:
    """The tokens made for a new study; they are stored only as digests, so this is their one copy."""

    name: str
    admin_token: str
    reader_tokens: dict[str, str]

    def urls(self, base_url: str) -> dict[str, str]:
        base = base_url.rstrip("/")
        links = {"admin": f"{base}/studies/{self.name}/admin/{self.admin_token}"}
        links |= {reader: f"{base}/studies/{self.name}/read/{token}" for reader, token in self.reader_tokens.items()}
        return links


def served_png(image: np.ndarray) -> bytes:
    """The bytes a reader receives for a [H, W] image in [-1, 1]: 8-bit grey PNG, zlib level 0."""
    return encode_png(image, SERVED_FORMAT["format"], compress_level=SERVED_FORMAT["compress_level"])


def _labels_field(labels: np.ndarray, mask: np.ndarray) -> str:
    return format_finding_labels(labels) if mask.any() else ""


def split_source(spec: str, kinds: Sequence[str]) -> tuple[str, str]:
    kind, _, location = spec.partition(":")
    if kind not in kinds or not location:
        raise StudySetupError(f"cannot read {spec!r}; write one of {', '.join(k + ':PATH' for k in kinds)}")
    return kind, location


def read_dataset_cases(spec: str, count: int, size: int, rng: np.random.Generator, origin: str,
                       source_prefix: str = "") -> list[CaseImage]:
    """``count`` images drawn without replacement from the data set reader ``spec`` (``nih:PATH``,
    ``chexpert:PATH``, ``folder:PATH``; ``training.data.open_dataset``), at ``size``². Unreadable files
    are passed over (the reader logs why); StudySetupError if too few remain."""
    from training.data import open_dataset
    from training.data.images import ImageSkipped, to_unit

    kind = spec.partition(":")[0]
    if kind == "phantoms":
        raise StudySetupError("phantoms are not real radiographs; give nih:PATH, chexpert:PATH or folder:PATH")
    try:
        dataset = open_dataset(spec, size, split="all" if kind == "nih" else "test")
    except (ValueError, FileNotFoundError) as error:
        raise StudySetupError(f"cannot open {spec!r}: {error}") from None
    if count > len(dataset):
        raise StudySetupError(f"{spec} holds {len(dataset)} images; the study asks for {count} of them")
    cases = []
    for index in tqdm(rng.permutation(len(dataset)), desc=f"{origin} images", unit="img", total=count):
        if len(cases) == count:
            break
        try:
            pixels = dataset.load_image(int(index))
        except ImageSkipped:
            continue
        cases.append(CaseImage(origin, to_unit(pixels) * 2.0 - 1.0,
                               _labels_field(dataset.labels[index], dataset.label_mask[index]),
                               source_prefix + str(dataset.image_path(int(index)))))
    if len(cases) < count:
        raise StudySetupError(f"only {len(cases)} of the {count} images asked from {spec} could be read")
    return cases


def archive_resolution(path: str) -> int:
    """The side of an archive's images (``service.archive`` layout: images/*.png, square)."""
    from PIL import Image

    first = next(iter(sorted((Path(path) / "images").glob("*.png"))), None)
    if first is None:
        raise StudySetupError(f"{path} holds no images/*.png; give the directory of a merged archive")
    with Image.open(first) as image:
        return int(image.size[0])


def bundle_cases(bundle_path: str, count: int, rng: np.random.Generator, prior: str = "nih",
                 lco: dict | None = None) -> list[CaseImage]:
    """``count`` images made by LCO (``service.lco``) from the bundle, with label sets drawn from the
    ``service.prior`` named ``prior``; seeds come from ``rng`` and are recorded in each case's source."""
    from service.bundle import load_bundle
    from service.lco import LCOEngine, LCOOptions, SampleRequest
    from service.prior import get_prior

    bundle = load_bundle(bundle_path)
    engine = LCOEngine(bundle, LCOOptions(**(lco or {})))
    targets = get_prior(prior).sample(count, rng)
    seeds = rng.integers(0, 2**31 - 1, size=count)
    name = f"{bundle.manifest.name} {bundle.manifest.version}"
    cases = []
    for target, seed in tqdm(list(zip(targets, seeds)), desc="synthetic images (LCO)", unit="img"):
        request = SampleRequest(target=target.astype(np.float32), mask=np.ones(NUM_LABELS, np.float32),
                                seed=int(seed))
        result = engine.generate([request])[0]
        cases.append(CaseImage("synthetic", result.image, format_finding_labels(target),
                               f"bundle {name} seed {int(seed)}"))
    return cases


def synthetic_resolution(spec: str) -> int:
    kind, location = split_source(spec, SYNTHETIC_KINDS)
    if kind == "archive":
        return archive_resolution(location)
    from service.bundle import BundleError, read_manifest

    try:
        return int(read_manifest(Path(location)).resolution)
    except (BundleError, OSError) as error:
        raise StudySetupError(f"cannot read the bundle at {location}: {error}") from None


def gather_cases(real: str, synthetic: str, cases: int, synthetic_fraction: float, seed: int,
                 prior: str = "nih", lco: dict | None = None) -> tuple[list[CaseImage], int]:
    """The study's images and their resolution: ``round(cases * synthetic_fraction)`` synthetic ones
    from ``archive:PATH`` or ``bundle:PATH``, the rest real from a data set reader spec."""
    if cases < 2:
        raise StudySetupError(f"a study needs at least 2 cases, got {cases}")
    if not 0.0 < synthetic_fraction < 1.0:
        raise StudySetupError(f"--synthetic-fraction must be between 0 and 1 (exclusive), got {synthetic_fraction}")
    synthetic_count = round(cases * synthetic_fraction)
    if not 0 < synthetic_count < cases:
        raise StudySetupError(f"{cases} cases at fraction {synthetic_fraction} leave one class empty")
    size = synthetic_resolution(synthetic)
    kind, location = split_source(synthetic, SYNTHETIC_KINDS)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2)]
    real_cases = read_dataset_cases(real, cases - synthetic_count, size, rngs[0], "real")
    if kind == "archive":
        made = read_dataset_cases(f"nih:{location}", synthetic_count, size, rngs[1], "synthetic", "archive ")
    else:
        made = bundle_cases(location, synthetic_count, rngs[1], prior, lco)
    return real_cases + made, size


def create_study(sessions, name: str, title: str, cases: Sequence[CaseImage], readers: Sequence[str],
                 seed: int, resolution: int, ask_findings: bool = True, setup: dict | None = None) -> StudyLinks:
    """Store a study in one transaction and return its links' tokens.

    Every reader reads every case (inter-reader agreement needs shared cases), each in an order drawn
    from ``SeedSequence([seed, reader_index])`` and recorded as the reader's ``order_seed``. Cases are
    stored in a shuffled order and readers see only per-reader random keys, so no id says a class.
    StudySetupError for a bad name, duplicate readers, images of the wrong shape, or a taken name.
    """
    if not STUDY_NAME.match(name):
        raise StudySetupError(f"study name {name!r}: use 1-64 lower-case letters, digits and '-'")
    readers = [r.strip() for r in readers]
    if not readers or any(not r or len(r) > 64 for r in readers) or len(set(readers)) != len(readers):
        raise StudySetupError(f"readers must be distinct non-empty names of at most 64 characters, got {readers}")
    for case in cases:
        if case.origin not in ("real", "synthetic"):
            raise StudySetupError(f"unknown origin {case.origin!r}")
        if case.image.shape != (resolution, resolution):
            raise StudySetupError(f"{case.source}: {case.image.shape} is not the study's {resolution}²")
    with sessions.begin() as session:
        if session.query(Study).filter_by(name=name).first() is not None:
            raise StudySetupError(f"a study named {name!r} exists in this database; choose another name")
        admin_token = new_token()
        record = dict(setup or {}, seed=seed, served_image=SERVED_FORMAT, resolution=resolution,
                      cases={o: sum(c.origin == o for c in cases) for o in ("real", "synthetic")})
        study = Study(name=name, title=title, status="open", ask_findings=ask_findings, resolution=resolution,
                      admin_token_sha256=token_digest(admin_token), setup=json.dumps(record, sort_keys=True))
        session.add(study)
        storage_order = np.random.default_rng(np.random.SeedSequence([seed, 2**16])).permutation(len(cases))
        rows = []
        for index in storage_order:
            case = cases[int(index)]
            png = served_png(case.image)
            rows.append(Case(study=study, origin=case.origin, source=case.source,
                             finding_labels=case.finding_labels, png=png,
                             png_sha256=hashlib.sha256(png).hexdigest()))
        session.add_all(rows)
        tokens = {}
        for reader_index, reader_name in enumerate(readers):
            tokens[reader_name] = new_token()
            order_seed = int(np.random.SeedSequence([seed, reader_index]).generate_state(1)[0] >> 1)
            reader = Reader(study=study, name=reader_name, token_sha256=token_digest(tokens[reader_name]),
                            order_seed=order_seed)
            session.add(reader)
            order = np.random.default_rng(order_seed).permutation(len(rows))
            session.add_all(Assignment(key=new_token()[:16], reader=reader, case=rows[int(i)], position=p)
                            for p, i in enumerate(order))
    return StudyLinks(name, admin_token, tokens)
