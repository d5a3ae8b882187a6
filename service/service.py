"""The cxrsynth BentoML service: labelled synthetic chest x-rays over HTTP.

    bentoml serve service.service:CXRSynth          # CXRSYNTH_BUNDLE=/path/to/bundle for a directory

Endpoints
- POST /generate  labels in, PNGs out (inline base64, or uploaded to s3://bucket/prefix as each is done)
- GET  /labels    vocabulary, decision thresholds and NIH prevalence
- GET  /model     manifest summary of the loaded bundle
- /livez, /readyz (ready once the bundle is loaded and a warm-up LCO step has run), /metrics

The bundle comes from the directory in ``CXRSYNTH_BUNDLE`` (the embedded default the demo uses) or,
when that is unset, from the BentoML model ``CXRSYNTH_MODEL_TAG``, declared on the class so that
``bentoml build`` packages it. Settings: service/settings.py.

Errors are JSON ``{"error": message, "detail": ...}``. Bad input is a 4xx that says what to fix:
BentoML answers pydantic validation errors (including malformed JSON) with 400; this module adds
415 for a request body not declared as JSON, 413 for oversized bodies, 401 for a missing or wrong
bearer token, and maps S3's answers for the destination bucket to 404 (no such bucket) or 403
(access denied), carrying S3's own message.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import logging
import re
import secrets
import threading
import time
from typing import Any

import bentoml
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.archive.runner import ModelInfo
from service.archive.tasks import (
    ArchiveJobs,
    ArchiveProgress,
    ArchiveTaskRequest,
    ArchiveTaskResult,
    task_id_of,
)
from service.batching import Batcher
from service.bundle import Bundle, load_bundle
from service.labels import LABELS, NO_FINDING
from service.lco import LCOEngine, LCOOptions, SampleRequest, SampleResult
from service.metrics import ServiceMetrics, create_metrics
from service.png import encode_png
from service.prior import nih_prior
from service.schemas import (
    MAX_SEED,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    LabelInfo,
    LabelSpec,
    LabelsResponse,
    ModelRef,
)
from service.settings import settings
from service.sinks import S3Sink, SinkError, SinkKeyNotFound, parse_s3_uri

logger = logging.getLogger("bentoml.service.cxrsynth")
SETTINGS = settings()
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
# S3 error codes that mean "your bucket or your credentials", i.e. the caller's to fix.
S3_STATUS = {
    "NoSuchBucket": 404,
    "AccessDenied": 403,
    "AllAccessDisabled": 403,
    "InvalidAccessKeyId": 403,
    "SignatureDoesNotMatch": 403,
    "ExpiredToken": 403,
    "InvalidToken": 403,
    "NoCredentials": 403,
    "403": 403,
}


def error_response(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


# -- ASGI middlewares ----------------------------------------------------------------------------
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_MEDIA_TYPES = ("application/json", "application/*+json")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# RFC 9110 media-type: type "/" subtype *( OWS ";" OWS [ name "=" ( token / quoted-string ) ] )
_PARAMETER = re.compile(rf"({_TOKEN})=({_TOKEN}|{_QUOTED})")
_MEDIA_TYPE = re.compile(rf"({_TOKEN})/({_TOKEN})((?:[ \t]*;[ \t]*(?:{_PARAMETER.pattern})?)*)[ \t]*")
JSON_HEADER = "Content-Type: application/json"
SEND_JSON = f"send the JSON body with the header {JSON_HEADER!r}"


def json_media_type_problem(content_types: list[str], has_body: bool) -> str | None:
    """Why a request's Content-Type headers do not declare a JSON body, or None if they do.

    ``content_types`` are the values of every Content-Type header. Accepted: ``application/json``
    and ``application/<anything>+json`` (RFC 6839: JSON by another name), in any case, with any
    parameters, provided ``charset`` (if given) is UTF-8, the only encoding JSON has (RFC 8259).
    A request with no body needs no Content-Type: the endpoint's defaults apply.
    """
    if not content_types:
        if not has_body:
            return None
        return f"the request has a body but no Content-Type header; {SEND_JSON}"
    if len(content_types) > 1:
        return f"the request has {len(content_types)} Content-Type headers; send one, {JSON_HEADER!r}"
    value = content_types[0].strip()
    match = _MEDIA_TYPE.fullmatch(value)
    if match is None:
        return f"Content-Type {value!r} is not a valid media type; {SEND_JSON}"
    kind, subtype = match.group(1).lower(), match.group(2).lower()
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        hint = ""
        if (kind, subtype) in (("application", "x-www-form-urlencoded"), ("multipart", "form-data")):
            hint = f" (curl -d and -F send form data: add -H {JSON_HEADER!r}, or use curl --json)"
        return f"Content-Type {kind}/{subtype} is not accepted: request bodies are JSON; {SEND_JSON}{hint}"
    for name, raw in _PARAMETER.findall(match.group(3)):
        charset = raw[1:-1] if raw.startswith('"') else raw
        if name.lower() == "charset" and charset.lower() not in ("utf-8", "utf8"):
            return f"charset {charset!r} is not accepted: JSON is UTF-8; send {JSON_HEADER!r} (charset=utf-8 or none)"
    return None


class JSONContentTypeMiddleware:
    """415 for a request body that is not declared as JSON, before anything reads the body.

    BentoML picks its parser by Content-Type: form data would be parsed as form fields (curl -d's
    default makes the whole JSON document one field name) and multipart without a boundary fails
    with a 500. Every endpoint of this service takes JSON, so anything else is refused here.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        content_types = [value.decode("latin-1") for name, value in headers if name == b"content-type"]
        framing = {name: value for name, value in headers
                   if name in (b"content-length", b"transfer-encoding")}
        has_body = b"transfer-encoding" in framing or framing.get(b"content-length", b"0").strip() != b"0"
        problem = json_media_type_problem(content_types, has_body)
        if problem is not None:
            response = error_response(
                415, problem, {"content_type": content_types[0] if content_types else None,
                               "accepted": list(JSON_MEDIA_TYPES)},
                headers={"Accept": "application/json"},
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes`` (declared or streamed), before anything parses them."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = error_response(
            413, f"request body is larger than {self.max_bytes} bytes; ask for fewer or shorter fields"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerTokenMiddleware:
    """Require ``Authorization: Bearer <token>`` everywhere except probes and /metrics."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
            response = error_response(
                401,
                "missing or wrong bearer token; send the header 'Authorization: Bearer <CXRSYNTH_API_TOKEN>'",
                headers={"WWW-Authenticate": 'Bearer realm="cxrsynth"'},
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def retry_seed(seed: int, attempt: int) -> int:
    """A fresh seed for a strict retry, derived from the image's seed and the attempt number."""
    state = np.random.SeedSequence([seed, attempt]).generate_state(2, np.uint64)
    return int((int(state[0]) << 11 ^ int(state[1])) % (MAX_SEED + 1))


# -- /labels and /model ----------------------------------------------------------------------------
def _service_or_unavailable() -> CXRSynth | JSONResponse:
    service = bentoml.get_current_service()
    if not service.ready.is_set():
        return error_response(503, "the model is loading; retry in a few seconds", headers={"Retry-After": "5"})
    return service


async def labels_view(_: Request) -> JSONResponse:
    service = _service_or_unavailable()
    if isinstance(service, JSONResponse):
        return service
    prevalence = nih_prior().prevalence()
    thresholds = service.bundle.thresholds
    entries = [LabelInfo(name=name, threshold=float(thresholds[i]), prevalence=prevalence[name])
               for i, name in enumerate(LABELS)]
    entries.append(LabelInfo(name=NO_FINDING, threshold=None, prevalence=prevalence[NO_FINDING]))
    return JSONResponse(LabelsResponse(labels=entries).model_dump())


async def model_view(_: Request) -> JSONResponse:
    service = _service_or_unavailable()
    if isinstance(service, JSONResponse):
        return service
    manifest = service.bundle.manifest
    provenance = manifest.provenance
    return JSONResponse({
        "name": manifest.name,
        "version": manifest.version,
        "created": manifest.created,
        "resolution": manifest.resolution,
        "latent_dim": manifest.latent_dim,
        "labels": list(manifest.labels),
        "thresholds": manifest.thresholds,
        "pixel": manifest.pixel.model_dump(),
        "provenance": {
            "dataset": provenance.dataset,
            "images_shown": provenance.images_shown,
            "commit": provenance.commit,
            "classifier_arch": provenance.classifier_arch,
            "classifier_mean_auroc": provenance.classifier_mean_auroc,
            "frechet_distance": provenance.frechet_distance,
        },
        "execution_providers": service.bundle.providers,
        "lco_defaults": service.engine.options.model_dump(),
        "limits": {"max_count": SETTINGS.max_count, "max_retries": SETTINGS.max_retries,
                   "max_body_bytes": SETTINGS.max_body_bytes, "max_batch": SETTINGS.max_batch},
        "compute_batch": service.engine.compute_batch,
        "cross_request_batching": SETTINGS.batching,
    })


info_app = Starlette(routes=[Route("/labels", labels_view, methods=["GET"]),
                             Route("/model", model_view, methods=["GET"])])


def _resources() -> dict[str, Any]:
    return {"cpu": "2", "memory": "4Gi", **({"gpu": SETTINGS.gpus} if SETTINGS.gpus else {})}


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="cxrsynth",
    resources=_resources(),
    workers=1,  # one process owns the bundle and the running LCO batch
    traffic={"timeout": 600, "max_concurrency": 256},
)
class CXRSynth:
    """Latent class optimisation on a PGGAN chest x-ray generator, one running batch per process."""

    if SETTINGS.bundle is None:
        bundle_model = bentoml.models.BentoModel(SETTINGS.model_tag)

    def __init__(self) -> None:
        source = SETTINGS.bundle if SETTINGS.bundle is not None else self.bundle_model
        self.bundle: Bundle = load_bundle(source)
        manifest = self.bundle.manifest
        self.model_ref = ModelRef(name=manifest.name, version=manifest.version)
        self.engine = LCOEngine(self.bundle, LCOOptions(), max_batch=SETTINGS.max_batch,
                                compute_batch=SETTINGS.compute_batch or None)
        self.metrics: ServiceMetrics = create_metrics()
        self.batcher = Batcher(
            self.engine,
            max_wait_s=SETTINGS.batch_wait_ms / 1000.0,
            enabled=SETTINGS.batching,
            on_step=self.metrics.lco_batch_size.observe,
        )
        self.archive_jobs = ArchiveJobs()
        self.ready = threading.Event()
        logger.info("loaded bundle %s %s from %s on %s", manifest.name, manifest.version, self.bundle.path,
                    ", ".join(self.bundle.providers))
        if SETTINGS.api_token is None:
            logger.warning("CXRSYNTH_API_TOKEN is not set: the API is open to anyone who can reach this port")
        else:
            logger.info("bearer-token auth is on for every route except %s", ", ".join(sorted(OPEN_PATHS)))
        threading.Thread(target=self._warm_up, name="lco-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        started = time.perf_counter()
        try:
            self.engine.warm_up()
        except Exception:
            logger.exception("warm-up LCO step failed; the service stays not ready")
            return
        self.ready.set()
        logger.info("warm-up LCO step done in %.2f s; ready", time.perf_counter() - started)

    def __is_ready__(self) -> bool:
        return self.ready.is_set()

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.batcher.close()

    @bentoml.api(route="/generate")
    async def generate(self, request: GenerateRequest, /) -> GenerateResponse:
        """Make ``count`` chest x-rays showing the requested findings (see GenerateRequest)."""
        if not self.ready.is_set():
            return error_response(503, "the model is loading; retry in a few seconds", headers={"Retry-After": "5"})
        spec = request.label_spec()
        options = request.lco
        request_id = secrets.token_hex(8)
        base_seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        sink: S3Sink | None = None
        if request.destination is not None:
            bucket, prefix = parse_s3_uri(request.destination)
            sink = S3Sink(bucket, prefix)
            try:
                await asyncio.to_thread(sink.head_bucket)
            except SinkError as error:
                return self._s3_error(error, bucket)
        job = _GenerateJob(self, request, spec, options, request_id, base_seed, sink)
        return await job.run()

    def _s3_error(self, error: SinkError, bucket: str, counted: bool = False) -> JSONResponse:
        """The caller's answer for an S3 failure: 404/403 for bucket or credentials, else 502."""
        code = "NoSuchBucket" if isinstance(error, SinkKeyNotFound) else error.code
        status = S3_STATUS.get(code, 502)
        if not counted:
            self.metrics.s3_upload_errors.labels(code=code).inc()
        if code == "NoSuchBucket":
            message = f"S3 bucket {bucket!r} does not exist; create it or fix the destination"
        elif status == 403:
            message = f"S3 refused access to bucket {bucket!r} with the service's credentials; grant access"
        else:
            message = f"S3 failed while writing to bucket {bucket!r}; no images were kept"
        return error_response(status, message, {"s3_code": code, "s3_message": error.message, "operation": error.operation})

    # -- archive jobs, as BentoML tasks (logic and error handling: service/archive/tasks.py) ----------
    # Async methods: BentoML runs sync ones one at a time (threads=1), so a running job would block
    # /archive/progress and /archive/stop; the job itself runs in a worker thread of its own.
    @bentoml.task(route="/archive")
    async def archive(self, request: ArchiveTaskRequest, /, ctx: bentoml.Context) -> ArchiveTaskResult:
        """Make (or resume) an archive: POST /archive/submit, then GET /archive/status and /archive/get."""
        task_id = task_id_of(ctx)
        model = ModelInfo.from_engine(self.engine)
        return await asyncio.to_thread(self.archive_jobs.run, task_id, request, self.engine, model)

    @bentoml.api(route="/archive/progress")
    async def archive_progress(self, task_id: str) -> ArchiveProgress:
        """Images done of the shard's total, and the job's state."""
        return self.archive_jobs.progress(task_id)

    @bentoml.api(route="/archive/stop")
    async def archive_stop(self, task_id: str) -> ArchiveProgress:
        """Stop a job at its next batch; whole chunks stay committed and a resubmission resumes."""
        return self.archive_jobs.stop(task_id)


class _GenerateJob:
    """One /generate request: its samples, strict retries, uploads, and clean-up on failure."""

    def __init__(self, service: CXRSynth, request: GenerateRequest, spec: LabelSpec, options: LCOOptions,
                 request_id: str, base_seed: int, sink: S3Sink | None):
        self.service = service
        self.request = request
        self.spec = spec
        self.options = options
        self.request_id = request_id
        self.base_seed = base_seed
        self.sink = sink
        self.uploaded: list[str] = []
        self.in_flight: set[asyncio.Future[str]] = set()
        self.upload_slots = asyncio.Semaphore(SETTINGS.s3_concurrency)

    async def run(self) -> GenerateResponse | JSONResponse:
        count = self.request.count
        seeds = [(self.base_seed + index) % (MAX_SEED + 1) for index in range(count)]
        futures = self.service.batcher.submit([self._sample(seed) for seed in seeds])
        tasks = [asyncio.create_task(self._image(index, seed, future)) for index, (seed, future)
                 in enumerate(zip(seeds, futures))]
        try:
            images = await asyncio.gather(*tasks)
        except SinkError as error:
            await self._abandon(tasks)
            assert self.sink is not None
            return self.service._s3_error(error, self.sink.bucket, counted=True)
        except BaseException:
            await self._abandon(tasks)
            raise
        return GenerateResponse(
            request_id=self.request_id,
            model=self.service.model_ref,
            format=self.request.format,
            exclusive=self.request.exclusive,
            satisfied=sum(image.satisfied for image in images),
            destination=self.sink.uri() if self.sink else None,
            images=list(images),
        )

    async def _abandon(self, tasks: list[asyncio.Task[GeneratedImage]]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._remove_uploaded()

    def _sample(self, seed: int) -> SampleRequest:
        return SampleRequest(self.spec.target, self.spec.mask, seed, self.options)

    async def _image(self, index: int, seed: int, future: Any) -> GeneratedImage:
        result: SampleResult = await asyncio.wrap_future(future)
        attempts = 1
        while self.request.strict and not result.satisfied and attempts <= self.request.retries:
            retry = self.service.batcher.submit([self._sample(retry_seed(seed, attempts))])[0]
            result = await asyncio.wrap_future(retry)
            attempts += 1
        self.service.metrics.record_image(self.spec.positives, bool(self.spec.mask.any()), result.satisfied,
                                          result.steps)
        png = await asyncio.to_thread(encode_png, result.image, self.request.format)
        image = GeneratedImage(
            id=f"{self.request_id}-{index:04d}",
            index=index,
            seed=result.seed,
            labels=self.spec.constraints,
            probabilities={name: round(float(p), 6) for name, p in zip(LABELS, result.probabilities)},
            satisfied=result.satisfied,
            steps=result.steps,
            attempts=attempts,
        )
        if self.sink is None:
            image.data = base64.b64encode(png).decode("ascii")
            return image
        stem = f"{self.request_id}/{index:04d}"
        sidecar = {
            "id": image.id,
            "request_id": self.request_id,
            "index": index,
            "seed": image.seed,
            "labels": image.labels,
            "exclusive": self.request.exclusive,
            "probabilities": image.probabilities,
            "satisfied": image.satisfied,
            "steps": image.steps,
            "attempts": attempts,
            "format": self.request.format,
            "lco": self.options.model_dump(),
            "model": self.service.model_ref.model_dump(),
            "image": f"{stem}.png",
        }
        metadata = {
            "request-id": self.request_id,
            "seed": str(image.seed),
            "labels": ";".join(f"{'' if v else '-'}{k}" for k, v in image.labels.items()) or "unconditional",
            "satisfied": str(image.satisfied).lower(),
            "model-version": f"{self.service.model_ref.name}:{self.service.model_ref.version}",
        }
        image.uri = await self._put(f"{stem}.png", png, "image/png", metadata)
        image.sidecar_uri = await self._put(
            f"{stem}.json", json.dumps(sidecar, indent=2).encode(), "application/json", metadata
        )
        return image

    async def _put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> str:
        assert self.sink is not None
        async with self.upload_slots:
            started = time.perf_counter()
            self.uploaded.append(key)  # recorded first: a put that fails late may still have landed
            upload = asyncio.get_running_loop().run_in_executor(
                None, functools.partial(self.sink.put, key, data, content_type, metadata)
            )
            self.in_flight.add(upload)
            try:
                # shielded: cancelling this request must not orphan a put that is still running
                uri = await asyncio.shield(upload)
            except SinkError as error:
                self.service.metrics.s3_upload_errors.labels(code=error.code).inc()
                raise
            finally:
                self.in_flight.discard(upload)
            self.service.metrics.s3_upload_seconds.observe(time.perf_counter() - started)
            return uri

    async def _remove_uploaded(self) -> None:
        """Delete whatever this request uploaded, so a failed request leaves no partial set."""
        if self.sink is None:
            return
        await asyncio.gather(*self.in_flight, return_exceptions=True)  # let running puts land first
        for key in self.uploaded:
            try:
                await asyncio.to_thread(self.sink.delete, key)
            except SinkError as error:
                logger.warning("could not remove %s after a failed request: %s", key, error)


# The first middleware added is the outermost: unauthenticated callers, then bodies that are not
# JSON, are turned away before the body is read.
if SETTINGS.api_token is not None:
    CXRSynth.add_asgi_middleware(BearerTokenMiddleware, token=SETTINGS.api_token)
CXRSynth.add_asgi_middleware(JSONContentTypeMiddleware)
CXRSynth.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes)
