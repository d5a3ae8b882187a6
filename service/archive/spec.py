"""What an archive job makes: the spec, and the deterministic plan derived from it.

Everything about image ``index`` (its id, its requested labels, its LCO seed, its LCO batch, its shard
and chunk) is a pure function of the spec and ``index``. That is what makes a job resumable and
shardable: any pod, any rerun, computes the same plan for the same index and so writes the same bytes
under the same key.

The LCO engine makes each image from its seed, labels and options alone, at one fixed compute shape
(service/lco.py), so however the job is split, resumed or rerun, each image comes out with the same
bytes. ``batch_size`` is how many consecutive indices are handed to the engine at once; shard and chunk
boundaries fall on batch boundaries.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.counterfactual import DEFAULT_IMAGE_PULL, DEFAULT_PULL, MAX_IMAGE_PULL, MAX_PULL
from service.image_formats import SUFFIXES, ImageFormat
from service.labels import LABEL_INDEX, LABELS, NO_FINDING, NUM_LABELS, UnknownLabelError, parse_label
from service.lco import LCOOptions
from service.prior import get_prior
from service.schemas import resolve_labels
from service.sinks import parse_s3_uri, sink_from_uri

MAX_COUNT = 100_000_000
MAX_SEED = 2**63 - 1
MAX_BATCH_SIZE = 256
DEFAULT_BATCH_SIZE = 16
MAX_VERIFY_RETRIES = 16
# Independent random streams per index (SeedSequence spawn keys): one for labels, one for LCO.
_LABEL_STREAM = 1
_IMAGE_STREAM = 2
_PERMUTATION_STREAM = 3


class LabelGroup(BaseModel):
    """``count`` images asking for ``labels``.

    ``labels`` is either {name: present?} or a list of present findings; unnamed labels are free
    unless ``exclusive``, and "No Finding" asks for every label absent.
    """

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, bool] | list[str]
    count: int = Field(ge=1, le=MAX_COUNT)
    exclusive: bool = False

    def target_and_mask(self) -> tuple[np.ndarray, np.ndarray]:
        return labels_to_target(self.labels, self.exclusive)

    @model_validator(mode="after")
    def _check_labels(self) -> LabelGroup:
        self.target_and_mask()
        return self


def labels_to_target(labels: dict[str, bool] | list[str], exclusive: bool) -> tuple[np.ndarray, np.ndarray]:
    """target[14] and mask[14] for a group, parsed as /generate parses its labels.

    An archive group must constrain something: its "Finding Labels" are written from the targets,
    and an unconstrained sample would be written as "No Finding" without having been asked to be.
    """
    if not labels and not exclusive:
        raise ValueError('a label group needs at least one label (or "No Finding", or exclusive: true)')
    spec = resolve_labels(labels, exclusive)
    return spec.target, spec.mask


class PairsOptions(BaseModel):
    """Counterfactual pairs (service/counterfactual.py): each index's reference lacks every one of
    ``findings``, and one edit per finding adds it from the reference's latent.

    ``findings`` are NIH labels (any case, the usual aliases), kept in ``service.labels.LABELS`` order:
    the counterfactual adding ``findings[k]`` is follow-up k + 1 of the reference's synthetic patient.
    """

    model_config = ConfigDict(extra="forbid")

    findings: list[str] = Field(min_length=1, max_length=NUM_LABELS,
                                description="the findings each reference is edited to show, one pair each")
    proximity: float = Field(DEFAULT_PULL, ge=0.0, le=MAX_PULL, allow_inf_nan=False,
                             description="weight of |z - z_reference|^2 / 2 in each edit's loss, as POST /edit's")
    image_proximity: float = Field(DEFAULT_IMAGE_PULL, ge=0.0, le=MAX_IMAGE_PULL, allow_inf_nan=False,
                                   description="weight of the mean squared pixel difference to the reference in "
                                   "each edit's loss, as POST /edit's")
    difference_maps: bool = Field(True, description="also write each pair's signed difference map (RGB PNG)")

    @field_validator("findings")
    @classmethod
    def _canonical_findings(cls, findings: list[str]) -> list[str]:
        names = []
        for raw in findings:
            try:
                name = parse_label(raw)
            except UnknownLabelError as error:
                raise ValueError(str(error)) from None
            if name == NO_FINDING:
                raise ValueError('"No Finding" cannot be a pair\'s finding: a pair adds a finding to a reference '
                                 "without it; name findings such as Effusion")
            if name in names:
                raise ValueError(f"{name} is named twice in pairs.findings; name it once")
            names.append(name)
        return sorted(names, key=LABEL_INDEX.__getitem__)

    def indices(self) -> list[int]:
        """The findings' positions in ``LABELS``."""
        return [LABEL_INDEX[name] for name in self.findings]


class ArchiveSpec(BaseModel):
    """One archive job. Shards of one job share every field except ``shard_index``."""

    model_config = ConfigDict(extra="forbid")

    count: int | None = Field(None, ge=1, le=MAX_COUNT, description="images in the whole archive")
    distribution: Literal["nih", "balanced"] | list[LabelGroup] = Field(
        "nih", description="'nih' (real co-occurrence prior), 'balanced' (each finding equally), or groups"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED)
    destination: str = Field(description="s3://bucket/prefix or a local directory")
    shard_index: int = Field(0, ge=0)
    shard_count: int = Field(1, ge=1, le=100_000)
    image_format: ImageFormat = Field(
        "png8", description="png8, png16 or dicom (Secondary Capture, the png16 grey levels, one study per job and "
        "one series per shard: service/dicom.py)",
    )
    lco: LCOOptions = Field(default_factory=LCOOptions, description="LCO options (defaults for those left out)")
    chunk_size: int = Field(64, ge=1, le=10_000, description="images per manifest object")
    drop_near_copies: bool = Field(
        False, description="replace images that nearly copy a training image (the near-copy index: "
        "service/nearcopy.py) by images of the next retry seed; the count dropped goes in _COMPLETE.json",
    )
    verify: bool | None = Field(
        None, description="keep only images the bundle's auditor verifies (service/verify.py): one it rejects is "
        "made again from the next retry seed, up to verify_retries times, then dropped (no image, a record marked "
        "dropped). Left out: on when the bundle has an auditor; true on a bundle without one is an error",
    )
    verify_retries: int = Field(3, ge=0, le=MAX_VERIFY_RETRIES, description="retries per image the auditor rejects")
    pairs: PairsOptions | None = Field(
        None, description="counterfactual pairs: each index's image is a reference without the findings named, "
        "and one edited image per finding adds it (images/<id>_00k.png, a pair row in Pairs.csv)",
    )
    batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH_SIZE,
        description="images handed to the LCO engine at once, a divisor of chunk_size "
        f"(default: the largest such up to {DEFAULT_BATCH_SIZE}); it does not change the images",
    )

    @field_validator("destination")
    @classmethod
    def _check_destination(cls, value: str) -> str:
        if value.startswith("s3://"):
            parse_s3_uri(value)
        else:
            sink_from_uri(value)
        return value

    @model_validator(mode="after")
    def _check_counts(self) -> ArchiveSpec:
        if isinstance(self.distribution, list):
            if not self.distribution:
                raise ValueError("an explicit distribution needs at least one label group")
            total = sum(group.count for group in self.distribution)
            if self.count is None:
                self.count = total
            elif self.count != total:
                raise ValueError(f"count {self.count} differs from the label groups' total {total}; drop count or fix it")
        elif self.count is None:
            raise ValueError(f"count is required with the {self.distribution!r} distribution")
        if self.batch_size is None:
            self.batch_size = math.gcd(self.chunk_size, DEFAULT_BATCH_SIZE)
        if self.chunk_size % self.batch_size:
            raise ValueError(f"chunk_size {self.chunk_size} must be a multiple of batch_size {self.batch_size}")
        if self.shard_index >= self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} must be below shard_count {self.shard_count}")
        if self.pairs is not None:
            self._check_pairs(self.pairs)
        batches = -(-self.count // self.batch_size)
        if self.shard_count > batches:
            raise ValueError(f"shard_count {self.shard_count} exceeds the job's {batches} LCO batches "
                             f"({self.count} images / batch_size {self.batch_size}); use fewer shards or a smaller batch_size")
        return self

    def _check_pairs(self, pairs: PairsOptions) -> None:
        """What a pairs job cannot be combined with, each saying what to change."""
        if self.image_format == "dicom":
            raise ValueError("pairs are written as png8 or png16; DICOM pairs are not supported: drop image_format "
                             "dicom or pairs")
        if self.drop_near_copies:
            raise ValueError("pairs cannot drop near-copies yet (an edited image has no retry seed to replace it "
                             "from): drop drop_near_copies or pairs")
        if isinstance(self.distribution, list):
            for number, group in enumerate(self.distribution, start=1):
                target, mask = group.target_and_mask()
                present = [name for name, i in zip(pairs.findings, pairs.indices()) if mask[i] > 0.5 and target[i] > 0.5]
                if present:
                    raise ValueError(f"label group {number} requests {', '.join(present)} present, but a pair's "
                                     "reference lacks the finding its edit adds: drop it from the group or from pairs")

    def identity(self) -> dict[str, Any]:
        """The fields that determine the archive's content (shared by all shards, any destination), less the
        LCO options, which job.json records in a section of their own."""
        # drop_near_copies only when on, so jobs written before the option existed still resume
        # verify and verify_retries go in a section of their own (the effective verify depends on the bundle)
        unchanged = ({"shard_index", "destination", "lco", "verify", "verify_retries"}
                     | (set() if self.drop_near_copies else {"drop_near_copies"})
                     | (set() if self.pairs else {"pairs"}))
        return self.model_dump(mode="json", exclude=unchanged)


def patient_id(index: int) -> int:
    """The synthetic patient of image ``index`` (the NIH CSV's Patient ID): one patient per image, from 1."""
    return index + 1


def image_id(index: int, follow_up: int = 0) -> str:
    """NIH-style image name stem: the synthetic patient of ``index`` and the follow-up ("00000001_000");
    a pairs job's counterfactuals are follow-ups 1, 2, … of their reference's patient."""
    return f"{patient_id(index):08d}_{follow_up:03d}"


def image_key(index: int, image_format: str, follow_up: int = 0) -> str:
    """The image's key under the destination: "images/00000001_000.png", or ".dcm" for DICOM."""
    return f"images/{image_id(index, follow_up)}{SUFFIXES[image_format]}"


def difference_key(index: int, follow_up: int) -> str:
    """The key of a pair's difference map (RGB PNG): "differences/00000001_001.png"."""
    return f"differences/{image_id(index, follow_up)}.png"


@dataclass(frozen=True)
class PlannedImage:
    index: int
    seed: int
    target: np.ndarray  # [14] float32
    mask: np.ndarray  # [14] float32
    key: str  # image_key(index, the spec's image_format)

    @property
    def id(self) -> str:
        return image_id(self.index)


class ArchivePlan:
    """Index -> (seed, target, mask); shard and chunk ranges. O(groups) memory, whatever the count."""

    def __init__(self, spec: ArchiveSpec):
        self.spec = spec
        self.count = int(spec.count or 0)
        if isinstance(spec.distribution, str):
            self._prior = get_prior(spec.distribution)
            self._groups: list[tuple[np.ndarray, np.ndarray]] = []
            self._group_ends: list[int] = []
        else:
            self._prior = None
            self._groups = [group.target_and_mask() for group in spec.distribution]
            self._group_ends = list(np.cumsum([group.count for group in spec.distribution]))
            # Groups fill contiguous positions of a permutation of the indices, so every shard and
            # every chunk gets a fair mix of groups (and of LCO cost).
            self._multiplier, self._offset = _affine_permutation(spec.seed, self.count)

    def _rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.spec.seed, spawn_key=(stream, index)))

    def image_seed(self, index: int) -> int:
        state = np.random.SeedSequence(self.spec.seed, spawn_key=(_IMAGE_STREAM, index)).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))  # 63 bits: fits every signed 64-bit consumer

    def labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """target[14], mask[14] of image ``index``; in a pairs job, the reference's: every pair finding absent."""
        target, mask = self._drawn_labels(index)
        if self.spec.pairs is not None:
            target, mask = target.copy(), mask.copy()
            target[self.spec.pairs.indices()], mask[self.spec.pairs.indices()] = 0.0, 1.0
        return target, mask

    def _drawn_labels(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._prior is not None:
            target = self._prior.sample(1, self._rng(_LABEL_STREAM, index))[0].astype(np.float32)
            # A prior draw is a whole label set: the named findings present, every other one absent.
            return target, np.ones(NUM_LABELS, np.float32)
        position = (self._multiplier * index + self._offset) % self.count
        return self._groups[bisect_right(self._group_ends, position)]

    def image(self, index: int) -> PlannedImage:
        if not 0 <= index < self.count:
            raise IndexError(f"image index {index} outside 0..{self.count - 1}")
        target, mask = self.labels(index)
        return PlannedImage(index, self.image_seed(index), target, mask, self.image_key(index))

    def image_key(self, index: int, follow_up: int = 0) -> str:
        return image_key(index, self.spec.image_format, follow_up)

    def follow_ups(self) -> list[int]:
        """The follow-up numbers of each index's counterfactuals (none outside a pairs job)."""
        return list(range(1, len(self.spec.pairs.findings) + 1)) if self.spec.pairs is not None else []

    # -- layout --------------------------------------------------------------------------------
    def shard_range(self, shard_index: int | None = None) -> range:
        """The shard's indices: whole LCO batches, shared out as evenly as batches allow."""
        shard = self.spec.shard_index if shard_index is None else shard_index
        n, size = self.spec.shard_count, self.spec.batch_size
        batches = -(-self.count // size)
        return range(shard * batches // n * size, min((shard + 1) * batches // n * size, self.count))

    def chunks(self, shard_index: int | None = None) -> list[range]:
        """The shard's indices cut into manifest chunks of ``chunk_size`` (whole LCO batches)."""
        shard = self.shard_range(shard_index)
        size = self.spec.chunk_size
        return [range(start, min(start + size, shard.stop)) for start in range(shard.start, shard.stop, size)]

    def batches(self, chunk: range) -> list[range]:
        """The LCO batches of a chunk: ``batch_size`` consecutive indices, the archive's last one shorter."""
        size = self.spec.batch_size
        return [range(start, min(start + size, chunk.stop)) for start in range(chunk.start, chunk.stop, size)]

    def chunk_key(self, shard_index: int, chunk_number: int) -> str:
        return f"{self.shard_dir(shard_index)}/chunk-{chunk_number:06d}.jsonl"

    def shard_dir(self, shard_index: int) -> str:
        return f"manifests/shard-{shard_index:05d}-of-{self.spec.shard_count:05d}"


def _affine_permutation(seed: int, count: int) -> tuple[int, int]:
    """(a, b) with gcd(a, count) = 1, so i -> (a*i + b) mod count is a bijection on 0..count-1."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PERMUTATION_STREAM,)))
    if count <= 2:
        return 1, 0
    multiplier = int(rng.integers(count // 3, max(count // 3 + 1, 2 * count // 3))) | 1
    while math.gcd(multiplier, count) != 1:
        multiplier += 1
    return multiplier, int(rng.integers(0, count))


def labels_of(target: np.ndarray, mask: np.ndarray) -> dict[str, bool]:
    """The constrained labels of a request as {name: present}."""
    return {LABELS[i]: bool(target[i] > 0.5) for i in range(NUM_LABELS) if mask[i] > 0.5}
