"""Request and response models of the HTTP API, with validation that says what to fix."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from service.counterfactual import (
    DEFAULT_IMAGE_PULL,
    DEFAULT_PULL,
    MAX_IMAGE_PULL,
    MAX_PULL,
    EditSpec,
    plan_edit,
)
from service.image_formats import ImageFormat
from service.labels import LABEL_INDEX, LABELS, NO_FINDING, NUM_LABELS, UnknownLabelError, parse_label
from service.lco import LCOOptions
from service.openapi import openapi_30_nullable
from service.settings import settings
from service.sinks import parse_s3_uri

# Seeds stay below 2**53 so every JSON client (JavaScript included) round-trips them exactly.
MAX_SEED = 2**53 - 1

# -- the OpenAPI document ---------------------------------------------------------------------------
# BentoML 1.4 publishes these models' JSON schemas as an OpenAPI 3.0 document (/docs.json), keeping
# only the first branch of a top-level anyOf. So every constraint the validators below enforce is
# also stated in 3.0 terms: a schema-valid request is a valid request, and clients generated from
# the document (or fuzzers driven by it) send what the service accepts.
_SEGMENT = r"(?!\.\.?(?:/|$))[^\x00-\x1f\x7f/\\]+"  # not "." or "..", no control characters
# The pattern is searched, as JSON Schema does; "$(?!\n)" is the end of the string both to ECMA-262 and
# to Python, whose "$" also matches before a final newline.
S3_URI_PATTERN = (
    r"^s3://[a-z0-9](?:[a-z0-9-]|\.(?!\.)){1,61}[a-z0-9]"  # bucket: 3-63 characters, no ".."
    rf"(?:/+(?:{_SEGMENT}(?:/{_SEGMENT})*)?/*)?$(?!\n)"  # prefix: no empty, "." or ".." segments
)


def _labels_schema(schema: dict) -> None:
    """The label vocabulary and the "No Finding" rules (OpenAPI 3.0 has no propertyNames).

    Canonical names only: the aliases and case-insensitive spellings the service also accepts are
    for people typing requests, not for generated clients.
    """
    schema.pop("anyOf")
    findings = {name: {"type": "boolean"} for name in LABELS}
    schema["oneOf"] = [
        {"type": "object", "properties": findings, "additionalProperties": False},
        {"type": "object", "required": [NO_FINDING], "additionalProperties": False,
         "properties": {NO_FINDING: {"type": "boolean", "enum": [True]},
                        **{name: {"type": "boolean", "enum": [False]} for name in LABELS}}},
        {"type": "array", "items": {"type": "string", "enum": list(LABELS)}},
        {"type": "array", "items": {"type": "string", "enum": [NO_FINDING]}, "minItems": 1},
    ]


def _count_bounds(schema: dict) -> None:
    schema.update(minimum=1, maximum=settings().max_count)


def _retries_bound(schema: dict) -> None:
    schema["maximum"] = settings().max_retries


def _near_copy_option(schema: dict) -> None:
    if settings().near_copy_index is None:
        schema["enum"] = [False]  # true needs an index this service does not have


@functools.cache
def _served_bundle_has_auditor() -> bool | None:
    """Whether the bundle directory this process serves (CXRSYNTH_BUNDLE) has an auditor; None when
    there is none to read here (a BentoML model tag: the service still refuses `verify` on a bundle
    without an auditor, with a 400)."""
    from service.bundle import BundleError, read_manifest

    bundle = settings().bundle
    try:
        return None if bundle is None else read_manifest(bundle).auditor is not None
    except (BundleError, OSError):
        return None


def _verify_option(schema: dict) -> None:
    if _served_bundle_has_auditor() is False:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "boolean":
                branch["enum"] = [False, None]  # true needs an auditor this bundle does not have; null: the default


def _destination_pattern(schema: dict) -> None:
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "string":
            branch["pattern"] = S3_URI_PATTERN


@dataclass(frozen=True)
class LabelSpec:
    """The constraints a request puts on the 14 labels."""

    target: np.ndarray  # [14] float32
    mask: np.ndarray  # [14] float32, 1 = constrained

    @property
    def constraints(self) -> dict[str, bool]:
        """Every constrained label and its requested value."""
        return {LABELS[i]: bool(self.target[i] > 0.5) for i in np.flatnonzero(self.mask)}

    @property
    def positives(self) -> list[str]:
        return [LABELS[i] for i in np.flatnonzero(self.mask * self.target)]

    @property
    def description(self) -> str:
        """Short human caption: "Effusion+Mass -Edema", "No Finding", or "unconditional"."""
        if not self.mask.any():
            return "unconditional"
        positives = self.positives
        negatives = [LABELS[i] for i in np.flatnonzero(self.mask * (1 - self.target))]
        if not positives and len(negatives) == NUM_LABELS:
            return NO_FINDING
        text = "+".join(positives)
        if len(negatives) == NUM_LABELS - len(positives):
            return f"{text} only" if text else NO_FINDING
        return " ".join([text, *(f"-{n}" for n in negatives)]).strip()


def resolve_labels(labels: dict[str, bool] | list[str], exclusive: bool) -> LabelSpec:
    """Turn the request's labels into target and mask vectors, or raise ValueError saying what to fix.

    ``labels`` is {name: true/false} or a list of present findings. Names take any case and the
    usual aliases. "No Finding" means every finding absent and cannot stand beside a positive.
    With ``exclusive`` every label not named is absent.
    """
    items = [(name, True) for name in labels] if isinstance(labels, list) else list(labels.items())
    wanted: dict[str, bool] = {}
    no_finding = False
    for raw_name, value in items:
        try:
            name = parse_label(raw_name)
        except UnknownLabelError as error:
            raise ValueError(str(error)) from None
        if name == NO_FINDING:
            if not value:
                raise ValueError(
                    '"No Finding": false cannot be expressed as constraints; name the findings you '
                    "want present instead"
                )
            no_finding = True
            continue
        if name in wanted and wanted[name] != value:
            raise ValueError(f"label {name} is requested both present and absent; ask for it once")
        wanted[name] = value
    if no_finding and any(wanted.values()):
        present = ", ".join(name for name, value in wanted.items() if value)
        raise ValueError(f'"No Finding" cannot be combined with present findings ({present}); drop one of them')
    target = np.zeros(NUM_LABELS, np.float32)
    mask = np.full(NUM_LABELS, 1.0 if (exclusive or no_finding) else 0.0, np.float32)
    for name, value in wanted.items():
        target[LABEL_INDEX[name]] = 1.0 if value else 0.0
        mask[LABEL_INDEX[name]] = 1.0
    return LabelSpec(target, mask)


def _labels_field() -> Any:
    return Field(
        default_factory=dict,
        description='{"Effusion": true, "Mass": false} or a list of present findings ["Effusion"]. Names as '
        'GET /labels lists them (any case and common aliases such as "pleural effusion" are accepted '
        'too); "No Finding" means every finding absent and stands alone or beside absent findings.',
        examples=[{"Effusion": True, "Pneumothorax": False}],
        json_schema_extra=_labels_schema,
    )


class GenerateRequest(BaseModel):
    """POST /generate body."""

    # the title names the body in validation errors ("1 validation error for POST /generate body")
    model_config = ConfigDict(extra="forbid", strict=True, title="POST /generate body",
                              json_schema_extra=openapi_30_nullable)

    labels: dict[str, bool] | list[str] = _labels_field()
    exclusive: bool = Field(False, description="labels not named are absent")
    count: int = Field(1, description="images to make, 1 up to the configured maximum",
                       json_schema_extra=_count_bounds)
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED,
        description="image i gets seed + i; random if left out. An image is a function of its seed, its labels "
        "and options and the serving model (GET /model: version, execution_providers, compute_batch) alone: "
        "the same seed gives the same bytes whatever the count, its place in the request or other requests "
        "in flight",
    )
    format: ImageFormat = Field(
        "png8", description="png8 / png16: grey PNG of that bit depth; dicom: DICOM Secondary Capture, 16-bit "
        "MONOCHROME2, marked SYNTHETIC, with the model, seed, labels and LCO options in a private block")
    destination: str | None = Field(
        None, description="s3://bucket/prefix to upload to (bucket: 3-63 lowercase letters, digits, dots or "
        "hyphens; prefix: '/'-separated, no '.' or '..' segments); absent: inline base64",
        json_schema_extra=_destination_pattern,
    )
    strict: bool = Field(False, description="retry unsatisfied images with new seeds")
    drop_near_copies: bool = Field(
        False, description="replace images that nearly copy a training image by images of new seeds (needs the "
        "service's near-copy index, CXRSYNTH_NEAR_COPY_INDEX); the response counts those dropped",
        json_schema_extra=_near_copy_option)
    retries: int = Field(3, ge=0, description="retries per image when strict, up to the configured maximum",
                         json_schema_extra=_retries_bound)
    verify: bool | None = Field(
        None, description="check each image with the bundle's independent auditor at its own thresholds and make "
        "an image it disagrees with again from a derived seed (up to verify_retries times; past that the image "
        "is withheld: listed under withheld, not returned, so every returned image is verified). Left out: on "
        "when the bundle has an auditor (GET /model: auditor); true on a bundle without one is a 400",
        json_schema_extra=_verify_option)
    verify_retries: int = Field(3, ge=0, description="retries per image the auditor rejects, up to the configured "
                                "maximum (CXRSYNTH_MAX_RETRIES)", json_schema_extra=_retries_bound)
    lco: LCOOptions = Field(default_factory=LCOOptions, description="LCO options; those left out take their defaults")

    @field_validator("count")
    @classmethod
    def _count_in_range(cls, count: int) -> int:
        limit = settings().max_count
        if not 1 <= count <= limit:
            raise ValueError(f"count must be between 1 and {limit}; got {count}")
        return count

    @field_validator("retries", "verify_retries")
    @classmethod
    def _retries_in_range(cls, retries: int, info: ValidationInfo) -> int:
        limit = settings().max_retries
        if retries > limit:
            raise ValueError(f"{info.field_name} must be at most {limit}; got {retries}")
        return retries

    @field_validator("drop_near_copies")
    @classmethod
    def _near_copy_index_configured(cls, drop: bool) -> bool:
        if drop and settings().near_copy_index is None:
            raise ValueError("this service has no near-copy index of its training set; start it with "
                             "CXRSYNTH_NEAR_COPY_INDEX=PATH or leave drop_near_copies out")
        return drop

    @field_validator("destination")
    @classmethod
    def _destination_is_s3(cls, destination: str | None) -> str | None:
        if destination is not None:
            parse_s3_uri(destination)
        return destination

    @model_validator(mode="after")
    def _labels_consistent(self) -> GenerateRequest:
        resolve_labels(self.labels, self.exclusive)
        return self

    def label_spec(self) -> LabelSpec:
        return resolve_labels(self.labels, self.exclusive)


class ModelRef(BaseModel):
    name: str
    version: str


class GeneratedImage(BaseModel):
    id: str = Field(description="request id and index")
    index: int
    seed: int = Field(description="reproduces this image, byte for byte, with the same labels and options on "
                      "the same model (/model)")
    labels: dict[str, bool] = Field(description="every constrained label and its requested value")
    probabilities: dict[str, float] = Field(description="the LCO classifier's probability for each of the 14 labels")
    satisfied: bool
    steps: int = Field(description="Adam steps LCO took on this image (0: a scored latent was returned)")
    accepted_without_steps: bool = Field(
        description="the image is a scored latent that already met the request at the LCO margin, returned "
        "without LCO steps (rejection first)")
    candidates_scored: int = Field(
        description="latents scored for this image before it was accepted or LCO started (lco.rejection_first, "
        "lco.max_candidates)")
    attempts: int = Field(description="1, or more when strict, verify or the near-copy filter retried with new seeds")
    verified: bool | None = Field(None, description="the auditor agrees with every constrained label (null: the "
                                  "request did not verify)")
    auditor_probabilities: dict[str, float] | None = Field(
        None, description="the auditor's probability for each of the 14 labels (null: the request did not verify)")
    uri: str | None = Field(None, description="s3:// URI of the image when a destination was given")
    sidecar_uri: str | None = None
    data: str | None = Field(None, description="base64 image (PNG or DICOM, see media_type) when no destination "
                             "was given")
    media_type: str = Field("image/png", description="image/png or application/dicom")


class WithheldImage(BaseModel):
    """An image the auditor rejected through every verify retry: not returned, only described."""

    index: int
    seed: int = Field(description="the last attempt's seed: the same request with verify false and this seed "
                      "makes the image the auditor rejected")
    attempts: int = Field(description="1 + verify_retries (and any strict or near-copy retries)")
    probabilities: dict[str, float] = Field(description="the LCO classifier's probability for each of the 14 "
                                            "labels on the last attempt")
    auditor_probabilities: dict[str, float] = Field(description="the auditor's, on the last attempt")


class GenerateResponse(BaseModel):
    request_id: str
    model: ModelRef
    format: str
    exclusive: bool
    satisfied: int = Field(description="how many of the images are satisfied")
    verified: int | None = Field(None, description="how many of the images the auditor verified: all those returned "
                                 "(null: not verified)")
    withheld: list[WithheldImage] = Field(
        default_factory=list, description="with verify: the indices the auditor rejected through every retry, "
        "not returned (count = returned + withheld)")
    near_copies_dropped: int = Field(0, description="images dropped as near-copies of the training set and replaced")
    destination: str | None = None
    images: list[GeneratedImage]


class LabelInfo(BaseModel):
    name: str
    threshold: float | None = Field(description="decision threshold on the LCO classifier's probability")
    prevalence: float = Field(description="share of NIH ChestX-ray14 images with this label")


class LabelsResponse(BaseModel):
    labels: list[LabelInfo]
    aliases_accepted: bool = True



class ImageReference(BaseModel):
    """An earlier image, named by what made it: LCO is deterministic, so these recompute it exactly."""

    model_config = ConfigDict(extra="forbid", strict=True, title="reference image", json_schema_extra=openapi_30_nullable)

    model_version: str = Field(description="the model version that made it (its response's model.version)")
    seed: int = Field(ge=0, le=MAX_SEED, description="the image's own seed (its response's images[i].seed)")
    labels: dict[str, bool] | list[str] = _labels_field()
    exclusive: bool = Field(False, description="as in the request that made it")
    lco: LCOOptions = Field(default_factory=LCOOptions, description="the LCO options of the request that made it")

    @model_validator(mode="after")
    def _labels_consistent(self) -> ImageReference:
        resolve_labels(self.labels, self.exclusive)
        return self

    def label_spec(self) -> LabelSpec:
        return resolve_labels(self.labels, self.exclusive)


class LabelChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, title="label change")

    add: list[str] = Field(default_factory=list, description="findings the edited image shows")
    remove: list[str] = Field(default_factory=list, description="findings the edited image does not show")


class EditRequest(BaseModel):
    """POST /edit body."""

    model_config = ConfigDict(extra="forbid", strict=True, title="POST /edit body",
                              json_schema_extra=openapi_30_nullable)

    reference: ImageReference
    change: LabelChange = Field(description='e.g. {"add": ["Effusion"], "remove": ["Nodule"]}')
    proximity: float = Field(DEFAULT_PULL, ge=0.0, le=MAX_PULL, allow_inf_nan=False,
                             description="weight of |z - z_reference|^2 / 2 in the edit's loss (latent proximity)")
    image_proximity: float = Field(DEFAULT_IMAGE_PULL, ge=0.0, le=MAX_IMAGE_PULL, allow_inf_nan=False,
                                   description="weight of the mean squared pixel difference to the reference "
                                   "image in the edit's loss: higher keeps more of the original and changes "
                                   "it less (0: off; a bundle exported before this term needs 0)")
    lco: LCOOptions = Field(default_factory=LCOOptions, description="LCO options of the edit (steps, lr, margin)")
    format: ImageFormat = Field("png8", description="png8, png16 or dicom, as for /generate")

    @model_validator(mode="after")
    def _change_applies(self) -> EditRequest:
        self.edit_spec()
        return self

    def edit_spec(self) -> EditSpec:
        """The edited constraints; ValueError (EditError) saying what to fix."""
        reference = self.reference.label_spec()
        return plan_edit(reference.target, reference.mask, self.change.add, self.change.remove)


class EditedImage(BaseModel):
    data: str = Field(description="base64 image (PNG or DICOM, see the response's media_type)")
    labels: dict[str, bool] = Field(description="the constraints it was made to meet")
    probabilities: dict[str, float] = Field(description="the LCO classifier's probability for each of the 14 labels")
    auditor_probabilities: dict[str, float] | None = Field(
        None, description="the bundle's auditor's probability for each label (none without an auditor)")
    satisfied: bool
    steps: int


class EditResponse(BaseModel):
    request_id: str
    model: ModelRef
    format: str
    media_type: str
    add: list[str]
    remove: list[str]
    before: EditedImage = Field(description="the reference image, made again")
    after: EditedImage = Field(description="the edited image")
    difference: str = Field(description="base64 RGB PNG of after - before: red brighter, blue darker, white equal")
    difference_scale: float = Field(description="the largest |after - before| (pixel units of [-1, 1]): full colour")
    latent_distance: float = Field(description="|z_after - z_before| (latents lie on the sphere of radius "
                                   "sqrt(latent_dim))")
