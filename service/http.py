"""HTTP plumbing of the service: JSON error responses, the ASGI middlewares (bearer token, JSON
Content-Type, body size) and the two plain Starlette views, /labels and /model.

Errors are JSON ``{"error": message, "detail": ...}``. Bad input is a 4xx that says what to fix:
BentoML answers pydantic validation errors (including malformed JSON) with 400; this module adds
415 for a request body not declared as JSON, 413 for oversized bodies and 401 for a missing or wrong
bearer token; service/generate.py maps S3's answers for a destination bucket to 404 or 403.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.labels import LABELS, NO_FINDING
from service.prior import nih_prior
from service.schemas import LabelInfo, LabelsResponse
from service.settings import Settings, settings

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


def error_response(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def loading_response() -> JSONResponse:
    """503 while the bundle loads and the warm-up step runs."""
    return error_response(503, "the model is loading; retry in a few seconds", headers={"Retry-After": "5"})


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


def install_middlewares(service_class: Any, config: Settings) -> None:
    """The first middleware added is the outermost: unauthenticated callers, then bodies that are not
    JSON, are turned away before the body is read."""
    if config.api_token is not None:
        service_class.add_asgi_middleware(BearerTokenMiddleware, token=config.api_token)
    service_class.add_asgi_middleware(JSONContentTypeMiddleware)
    service_class.add_asgi_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)


# -- /labels and /model ----------------------------------------------------------------------------
def _service_or_unavailable() -> Any:
    service = bentoml.get_current_service()
    if not service.ready.is_set():
        return loading_response()
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
    config = settings()
    return JSONResponse({
        "name": manifest.name,
        "version": manifest.version,
        "created": manifest.created,
        "resolution": manifest.resolution,
        "latent_dim": manifest.latent_dim,
        "labels": list(manifest.labels),
        "thresholds": manifest.thresholds,
        # the independent auditor that `verify` checks images with (service/verify.py); null: none
        "auditor": None if manifest.auditor is None else {
            "thresholds": manifest.auditor.thresholds, "preset": manifest.auditor.preset,
            "arch": manifest.auditor.arch, "seed": manifest.auditor.seed, "dataset": manifest.auditor.dataset,
            "mean_auroc": manifest.auditor.mean_auroc},
        "verify_default": manifest.auditor is not None,
        # the network LCO steers by when it is not the classifier (service/lco.py); null: the classifier
        "steering": None if manifest.steering is None else {
            "thresholds": manifest.steering.thresholds, "preset": manifest.steering.preset,
            "arch": manifest.steering.arch, "passes": manifest.steering.passes,
            "mean_auroc": manifest.steering.mean_auroc},
        "classifier_passes": manifest.classifier_passes,
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
        "limits": {"max_count": config.max_count, "max_retries": config.max_retries,
                   "max_body_bytes": config.max_body_bytes, "max_batch": config.max_batch},
        "compute_batch": service.engine.compute_batch,
        "cross_request_batching": config.batching,
    })


info_app = Starlette(routes=[Route("/labels", labels_view, methods=["GET"]),
                             Route("/model", model_view, methods=["GET"])])
