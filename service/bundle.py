"""The model bundle: manifest schema, integrity checks, and one ONNX Runtime session per graph.

A bundle is a directory (or the same files as a BentoML model) holding ``manifest.json``,
``generator.onnx``, ``classifier.onnx`` and ``lco_step.onnx`` (docs/ARCHITECTURE.md gives their
inputs and outputs), and optionally ``auditor.onnx``: the independent auditor (its own network,
seed and 14 thresholds, in the manifest's ``auditor`` section) that checks LCO's images and never
steers them (service/verify.py); and optionally ``acceptance.npz`` (service/acceptance.py).
``lco_step.onnx`` steers by the classifier in ``classifier.onnx`` unless the manifest has a
``steering`` section: then by a cheaper network of its own (its thresholds there), and LCO accepts an
image only when ``classifier.onnx`` agrees (service/lco.py, "steer cheap, accept strict").
``training.export`` writes it; this module is the only reader. It imports no
torch: the service image carries onnxruntime, numpy and pydantic only.

Nothing is loaded until everything checks out. ``verify_bundle`` validates the manifest against
its schema, checks the manifest's own digest (so a corrupted manifest is caught, not only corrupted
graphs) and the sha256 of every file; any failure raises a :class:`BundleError` naming the file.
The digests detect corruption and accidental edits; they are not a signature against someone who
can rewrite the manifest too.

Session options (``SessionTuning``), chosen for LCO's pattern of many runs of the same graph:
  - ``ORT_ENABLE_ALL`` graph optimisation: constant folding and conv/BN/activation fusion; the
    ``lco_step`` graph has thousands of small nodes that fold away.
  - intra-op threads = CPUs actually available to this process (affinity mask and cgroup CPU quota,
    so a Kubernetes pod limited to 2 CPUs does not spawn one thread per host core); inter-op 1 with
    sequential execution, since the graphs are chains and parallel node execution only adds contention.
  - CPU memory arena and memory patterns on: the same shapes recur on every LCO step, so buffers are
    reused instead of reallocated. On CUDA the arena grows only by what is requested
    (``kSameAsRequested``) so several sessions share one GPU without reserving it all, and cuDNN
    picks convolution algorithms by exhaustive search once per shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.acceptance import ACCEPTANCE_FILE, AcceptanceTable
from service.labels import LABELS
from service.step_graph import lco_step_feeds

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
GRAPH_FILES = {"generator": "generator.onnx", "classifier": "classifier.onnx", "lco_step": "lco_step.onnx"}
GRAPH_IO = {
    "generator": (("z",), ("image",)),
    "classifier": (("image",), ("logits", "embedding")),
    "lco_step": (("z", "target", "mask", "reference", "image_pull"), ("loss", "grad_z", "probs", "image")),
    "auditor": (("image",), ("logits", "embedding")),
}
# The step graph of bundles exported before its image proximity term (they load; they cannot edit with it).
LEGACY_LCO_STEP_INPUTS = ("z", "target", "mask")
AUDITOR_FILE = "auditor.onnx"  # optional; its inputs and outputs are the classifier's
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(RuntimeError):
    """A bundle that cannot be used; ``file`` names the offending file."""

    def __init__(self, file: str | Path, message: str):
        self.file = str(file)
        super().__init__(f"{self.file}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PixelConvention(_Strict):
    """How image tensors map to pixels: float in [low, high], low = black, ``channels`` channels."""

    range: tuple[float, float] = (-1.0, 1.0)
    channels: Literal[1] = 1
    dtype: Literal["float32"] = "float32"

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError("pixel range must be (low, high) with low < high")
        return value


class FileEntry(_Strict):
    sha256: str
    bytes: int = Field(ge=0)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return value


class LabelMetric(_Strict):
    """A per-label AUROC with its bootstrap 95% confidence interval."""

    auroc: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    positives: int = Field(ge=0)
    negatives: int = Field(ge=0)


class Provenance(_Strict):
    """Where the weights came from. ``classifier_auroc`` is on the classifier's held-out split."""

    dataset: str
    images_shown: int = Field(ge=0)
    commit: str
    classifier_dataset: str
    classifier_arch: str
    classifier_auroc: dict[str, LabelMetric]
    classifier_mean_auroc: float | None = None
    frechet_distance: float | None = None
    generator_source: str = ""
    classifier_source: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)


class AuditorInfo(_Strict):
    """The manifest's ``auditor`` section: the network in ``auditor.onnx`` and its own thresholds
    (probabilities in (0, 1), Youden's J on the auditor's validation split), per-label AUROC on its
    held-out split, and where it came from (preset, architecture, seed, data set)."""

    thresholds: dict[str, float]
    preset: str
    arch: str
    seed: int
    dataset: str
    auroc: dict[str, LabelMetric]
    mean_auroc: float | None = None
    source: str = ""

    @model_validator(mode="after")
    def _thresholds(self) -> AuditorInfo:
        _check_thresholds(self.thresholds, "auditor.thresholds")
        return self

    @property
    def threshold_array(self) -> np.ndarray:
        """Per-label probability thresholds as float32 [14] in label order."""
        return np.array([self.thresholds[label] for label in LABELS], dtype=np.float32)


class SteeringInfo(AuditorInfo):
    """The manifest's ``steering`` section, for a bundle whose ``lco_step.onnx`` steers by another
    network than ``classifier.onnx`` (a one-CNN student of an ensemble, training/classifier/distill.py):
    that network's thresholds and origin as for the auditor, and ``passes``, the classifier passes
    (members × views) one evaluation of it costs."""

    passes: int = Field(ge=1)

    @model_validator(mode="after")
    def _thresholds(self) -> SteeringInfo:
        _check_thresholds(self.thresholds, "steering.thresholds")
        return self


def _check_thresholds(thresholds: dict[str, float], field: str) -> None:
    if set(thresholds) != set(LABELS):
        missing = sorted(set(LABELS) - set(thresholds))
        extra = sorted(set(thresholds) - set(LABELS))
        raise ValueError(f"{field} must name every label once (missing {missing}, unknown {extra})")
    for label, value in thresholds.items():
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise ValueError(f"{field} for {label} must be a probability in (0, 1), got {value}")


class Manifest(_Strict):
    """``manifest.json``: everything the service needs to know about a bundle."""

    schema_version: Literal[1]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    created: str
    labels: tuple[str, ...]
    thresholds: dict[str, float]
    resolution: int = Field(ge=4)
    latent_dim: int = Field(ge=1)
    embedding_dim: int = Field(ge=1)
    opset: int = Field(ge=1)
    pixel: PixelConvention
    files: dict[str, FileEntry]
    provenance: Provenance
    auditor: AuditorInfo | None = None  # present exactly when files lists auditor.onnx
    steering: SteeringInfo | None = None  # lco_step.onnx's own classifier; None: classifier.onnx's
    classifier_passes: int | None = Field(default=None, ge=1)  # members × views of classifier.onnx; None: not recorded
    manifest_sha256: str

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(value) != LABELS:
            raise ValueError(f"labels must be the 14 NIH labels in order {list(LABELS)}, got {list(value)}")
        return value

    @field_validator("resolution")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"resolution must be a power of two, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        _check_thresholds(self.thresholds, "thresholds")
        missing_files = sorted(set(GRAPH_FILES.values()) - set(self.files))
        if missing_files:
            raise ValueError(f"files must list every graph; missing {missing_files}")
        if (self.auditor is None) == (AUDITOR_FILE in self.files):
            raise ValueError(f"an auditor section and a files entry for {AUDITOR_FILE} go together; "
                             "the manifest has only one of them")
        for name in self.files:
            if name == MANIFEST_NAME or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"files may only name plain files beside the manifest, got {name!r}")
        return self

    @property
    def threshold_array(self) -> np.ndarray:
        """Per-label probability thresholds as float32 [14] in label order."""
        return np.array([self.thresholds[label] for label in LABELS], dtype=np.float32)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_manifest_bytes(document: dict[str, Any]) -> bytes:
    """The one byte form a manifest is written in (sorted keys, 2-space indent, final newline)."""
    return (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode()


def manifest_digest(document: dict[str, Any]) -> str:
    """sha256 of the canonical manifest without its own ``manifest_sha256`` field."""
    body = {key: value for key, value in document.items() if key != "manifest_sha256"}
    return hashlib.sha256(canonical_manifest_bytes(body)).hexdigest()


def seal_manifest(document: dict[str, Any]) -> bytes:
    """Add ``manifest_sha256`` and return the bytes to write; validates against the schema first."""
    sealed = dict(document)
    sealed["manifest_sha256"] = manifest_digest(document)
    Manifest.model_validate(sealed)
    return canonical_manifest_bytes(sealed)


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate ``manifest.json`` in ``directory``, including its own digest."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(path, "missing: not a model bundle (no manifest.json)")
    raw = path.read_bytes()
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(path, f"corrupted: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise BundleError(path, "corrupted: the manifest must be a JSON object")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(path, f"schema_version {version!r} is not supported (this service reads {SCHEMA_VERSION})")
    try:
        manifest = Manifest.model_validate(document)
    except ValidationError as error:
        raise BundleError(path, f"does not match the manifest schema:\n{error}") from None
    if manifest_digest(document) != manifest.manifest_sha256 or canonical_manifest_bytes(document) != raw:
        raise BundleError(path, "checksum mismatch: the manifest was modified or corrupted after export")
    return manifest


def verify_bundle(directory: str | Path) -> Manifest:
    """Check the manifest and every file's size and sha256; return the manifest.

    Raises :class:`BundleError` naming the first missing, corrupted or tampered file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(directory, "not a directory; pass a bundle directory or a BentoML model tag")
    manifest = read_manifest(directory)
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise BundleError(path, "missing from the bundle (listed in manifest.json)")
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(path, f"corrupted: {size} bytes, manifest.json says {entry.bytes}")
        if sha256_file(path) != entry.sha256:
            raise BundleError(path, "checksum mismatch: the file is corrupted or was modified after export")
    return manifest


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:
        count = os.cpu_count() or 1
    quota = None
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        try:
            limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if limit > 0:
                quota = limit / period
        except (OSError, ValueError):
            pass
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


@dataclass(frozen=True)
class SessionTuning:
    """ONNX Runtime settings; see the module docstring for why each default."""

    providers: tuple[str, ...] | None = None  # None: CUDA when available, then CPU
    intra_op_threads: int | None = None  # None: available_cpus()
    device_id: int = 0
    cudnn_conv_algo_search: str = "EXHAUSTIVE"
    log_severity: int = 3  # errors only; ORT warns about every unused initializer otherwise

    def resolved_providers(self) -> list[Any]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = list(self.providers) if self.providers else [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise RuntimeError(f"execution providers {unknown} are not available; this onnxruntime offers {available}")
        result: list[Any] = []
        for provider in wanted:
            if provider == "CUDAExecutionProvider":
                result.append((provider, {
                    "device_id": self.device_id,
                    "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
                    "do_copy_in_default_stream": True,
                }))
            else:
                result.append(provider)
        return result

    def session_options(self) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.intra_op_threads or available_cpus()
        options.inter_op_num_threads = 1
        # The same request must give the same image (and an archive rerun the same bytes): CUDA
        # then uses deterministic kernels only (cuDNN algorithms without atomics).
        options.use_deterministic_compute = True
        options.enable_cpu_mem_arena = True
        options.enable_mem_pattern = True
        options.log_severity_level = self.log_severity
        return options


@dataclass
class LCOStepOutput:
    loss: np.ndarray  # [B]
    grad_z: np.ndarray  # [B, latent]
    probs: np.ndarray  # [B, 14]
    image: np.ndarray  # [B, 1, H, W]


@dataclass
class Bundle:
    """A verified bundle with one ONNX Runtime session per graph."""

    path: Path
    manifest: Manifest
    sessions: dict[str, Any]
    providers: list[str] = field(default_factory=list)
    # the optional acceptance table (service/acceptance.py); None: rates from the NIH prior
    acceptance: AcceptanceTable | None = None
    tuning: SessionTuning = field(default_factory=SessionTuning)  # what the sessions were opened with
    _single_thread: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def generator(self) -> Any:
        return self.sessions["generator"]

    @property
    def classifier(self) -> Any:
        return self.sessions["classifier"]

    @property
    def lco_session(self) -> Any:
        return self.sessions["lco_step"]

    @property
    def thresholds(self) -> np.ndarray:
        return self.manifest.threshold_array

    @property
    def steering_thresholds(self) -> np.ndarray:
        """The thresholds [14] of the classifier ``lco_step.onnx`` steers by: the steering section's,
        else the classifier's."""
        steering = self.manifest.steering
        return self.thresholds if steering is None else steering.threshold_array

    @property
    def has_auditor(self) -> bool:
        return "auditor" in self.sessions

    def single_thread_sessions(self) -> dict[str, Any]:
        """Sessions of the generator, classifier and step graphs with one intra-op thread each (made on
        first use, then kept), for calls that run side by side on the CPU (service.lco.LCOEngine)."""
        if self._single_thread is None and (self.tuning.intra_op_threads or available_cpus()) == 1:
            self._single_thread = {graph: self.sessions[graph] for graph in ("generator", "classifier", "lco_step")}
        if self._single_thread is None:
            import onnxruntime as ort

            options = replace(self.tuning, intra_op_threads=1).session_options()
            self._single_thread = {graph: ort.InferenceSession(str(self.path / GRAPH_FILES[graph]), sess_options=options,
                                                               providers=self.sessions[graph].get_providers())
                                   for graph in ("generator", "classifier", "lco_step")}
        return self._single_thread

    def generate(self, z: np.ndarray) -> np.ndarray:
        """z [B, latent] → images [B, 1, H, W] in [-1, 1]."""
        return self.generator.run(["image"], {"z": self._latents(z)})[0]

    def classify(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images [B, 1, H, W] in [-1, 1] → (logits [B, 14], embedding [B, E])."""
        logits, embedding = self.classifier.run(["logits", "embedding"], {"image": np.ascontiguousarray(image, np.float32)})
        return logits, embedding

    def lco_step(self, z: np.ndarray, target: np.ndarray, mask: np.ndarray, reference: np.ndarray | None = None,
                 image_pull: np.ndarray | None = None) -> LCOStepOutput:
        """One LCO gradient evaluation: masked BCE of the classifier on G(z) (plus image_pull [B, 1] times
        the mean squared difference to reference [B, 1, H, W], zeros if not given), and its gradient in z."""
        feeds = lco_step_feeds(self.lco_session, self._latents(z), target, mask, reference, image_pull)
        loss, grad_z, probs, image = self.lco_session.run(["loss", "grad_z", "probs", "image"], feeds)
        return LCOStepOutput(loss, grad_z, probs, image)

    def _latents(self, z: np.ndarray) -> np.ndarray:
        z = np.ascontiguousarray(z, np.float32)
        if z.ndim != 2 or z.shape[1] != self.manifest.latent_dim:
            raise ValueError(f"z must be [B, {self.manifest.latent_dim}], got {list(z.shape)}")
        return z


def resolve_bundle_path(source: str | Path | Any) -> Path:
    """A bundle directory from a path, a BentoML model (stored, or a ``BentoModel`` reference) or a tag."""
    if not isinstance(source, (str, Path)) and not hasattr(source, "path") and hasattr(source, "resolve"):
        source = source.resolve()  # bentoml.models.BentoModel -> the stored model
    if hasattr(source, "path") and not isinstance(source, (str, Path)):
        return Path(source.path)
    path = Path(source)
    if path.exists():
        return path
    text = str(source)
    if os.sep in text or text.startswith("."):
        raise BundleError(path, "no such bundle directory")
    import bentoml  # a tag such as "cxrsynth-demo:latest": look in the local BentoML model store
    from bentoml.exceptions import BentoMLException

    try:
        return Path(bentoml.models.get(text).path)
    except (BentoMLException, ValueError) as error:  # NotFound, or not a valid tag
        raise BundleError(text, f"neither a bundle directory nor a model in the BentoML store ({error})") from None


def load_bundle(source: str | Path | Any, tuning: SessionTuning | None = None) -> Bundle:
    """Verify the bundle at ``source`` (directory, BentoML model or tag) and open its sessions."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    load_errors = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf, ort_errors.NoSuchFile,
                   ort_errors.NotImplemented, ort_errors.InvalidArgument, RuntimeError)
    path = resolve_bundle_path(source)
    manifest = verify_bundle(path)
    tuning = tuning or SessionTuning()
    providers = tuning.resolved_providers()
    sessions: dict[str, Any] = {}
    graphs = {**GRAPH_FILES, **({"auditor": AUDITOR_FILE} if manifest.auditor is not None else {})}
    for graph, filename in graphs.items():
        file = path / filename
        try:
            session = ort.InferenceSession(str(file), sess_options=tuning.session_options(), providers=providers)
        except load_errors as error:
            raise BundleError(file, f"ONNX Runtime cannot load this graph: {error}") from None
        inputs = tuple(i.name for i in session.get_inputs())
        outputs = tuple(o.name for o in session.get_outputs())
        legacy = graph == "lco_step" and inputs == LEGACY_LCO_STEP_INPUTS
        if (inputs, outputs) != GRAPH_IO[graph] and not (legacy and outputs == GRAPH_IO[graph][1]):
            raise BundleError(file, f"expected inputs {GRAPH_IO[graph][0]} and outputs {GRAPH_IO[graph][1]}, "
                                    f"found {inputs} and {outputs}")
        sessions[graph] = session
    active = list(sessions["lco_step"].get_providers())
    acceptance = None
    if ACCEPTANCE_FILE in manifest.files:
        try:
            acceptance = AcceptanceTable.from_bytes((path / ACCEPTANCE_FILE).read_bytes())
        except ValueError as error:
            raise BundleError(path / ACCEPTANCE_FILE, str(error)) from None
    return Bundle(path=path, manifest=manifest, sessions=sessions, providers=active, acceptance=acceptance,
                  tuning=tuning)
