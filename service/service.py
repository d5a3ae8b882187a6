"""The cxrsynth BentoML service: labelled synthetic chest x-rays over HTTP.

    bentoml serve service.service:CXRSynth          # CXRSYNTH_BUNDLE=/path/to/bundle for a directory

Endpoints
- POST /generate  labels in, PNGs out (inline base64, or uploaded to s3://bucket/prefix as each is done)
- POST /edit      an earlier image with findings added or removed: the pair and their difference
- GET  /labels    vocabulary, decision thresholds and NIH prevalence
- GET  /model     manifest summary of the loaded bundle
- /livez, /readyz (ready once the bundle is loaded and a warm-up LCO step has run), /metrics

The bundle comes from the directory in ``CXRSYNTH_BUNDLE`` (the embedded default the demo uses) or,
when that is unset, from the BentoML model ``CXRSYNTH_MODEL_TAG``, declared on the class so that
``bentoml build`` packages it. Settings: service/settings.py.

Errors, middlewares and the /labels and /model views: service/http.py; one /generate request:
service/generate.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from typing import Any

import bentoml

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
from service.edit import run_edit
from service.generate import GenerateJob, s3_error_code, s3_error_response
from service.http import OPEN_PATHS, error_response, info_app, install_middlewares, loading_response
from service.lco import LCOEngine, LCOOptions
from service.metrics import ServiceMetrics, create_metrics
from service.nearcopy import NearCopyFilter
from service.schemas import MAX_SEED, EditRequest, EditResponse, GenerateRequest, GenerateResponse, ModelRef
from service.settings import settings
from service.sinks import S3Sink, SinkError, parse_s3_uri
from service.verify import Verifier

logger = logging.getLogger("bentoml.service.cxrsynth")
SETTINGS = settings()


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
                                compute_batch=SETTINGS.compute_batch or None,
                                parallel_chunks=SETTINGS.parallel_chunks or None)
        self.metrics: ServiceMetrics = create_metrics()
        self.verifier = Verifier.of_bundle(self.bundle, self.metrics, source="generate")  # None: no auditor
        self.batcher = Batcher(
            self.engine,
            max_wait_s=SETTINGS.batch_wait_ms / 1000.0,
            enabled=SETTINGS.batching,
            on_step=self.metrics.lco_batch_size.observe,
        )
        self.archive_jobs = ArchiveJobs()
        self.near_copies = (NearCopyFilter.open(self.bundle, SETTINGS.near_copy_index)
                            if SETTINGS.near_copy_index is not None else None)
        if self.near_copies is not None:
            index = self.near_copies.index
            logger.info("near-copy index %s: %d training images, threshold %.4f", SETTINGS.near_copy_index,
                        len(index), index.threshold)
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
            return loading_response()
        if request.verify and self.verifier is None:
            return error_response(400, f"verify: this service's bundle ({self.model_ref.name} {self.model_ref.version}) "
                                       "has no auditor; leave verify out or serve a bundle exported with --auditor")
        verifier = self.verifier if request.verify is not False else None
        spec = request.label_spec()
        request_id = secrets.token_hex(8)
        base_seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        sink: S3Sink | None = None
        if request.destination is not None:
            bucket, prefix = parse_s3_uri(request.destination)
            sink = S3Sink(bucket, prefix)
            try:
                await asyncio.to_thread(sink.head_bucket)
            except SinkError as error:
                self.metrics.s3_upload_errors.labels(code=s3_error_code(error)).inc()
                return s3_error_response(error, bucket)
        job = GenerateJob(self, request, spec, request.lco, request_id, base_seed, sink, verifier)
        return await job.run()

    @bentoml.api(route="/edit")
    async def edit(self, request: EditRequest, /) -> EditResponse:
        """The same synthetic patient with findings added or removed (see EditRequest, service/edit.py)."""
        if not self.ready.is_set():
            return loading_response()
        return await run_edit(self, request)

    # -- archive jobs, as BentoML tasks (logic and error handling: service/archive/tasks.py) ----------
    # Async methods: BentoML runs sync ones one at a time (threads=1), so a running job would block
    # /archive/progress and /archive/stop; the job itself runs in a worker thread of its own.
    @bentoml.task(route="/archive")
    async def archive(self, request: ArchiveTaskRequest, /, ctx: bentoml.Context) -> ArchiveTaskResult:
        """Make (or resume) an archive: POST /archive/submit, then GET /archive/status and /archive/get."""
        task_id = task_id_of(ctx)
        model = ModelInfo.from_engine(self.engine)
        return await asyncio.to_thread(self.archive_jobs.run, task_id, request, self.engine, model,
                                       self.near_copies, self.metrics)

    @bentoml.api(route="/archive/progress")
    async def archive_progress(self, task_id: str) -> ArchiveProgress:
        """Images done of the shard's total, and the job's state."""
        return self.archive_jobs.progress(task_id)

    @bentoml.api(route="/archive/stop")
    async def archive_stop(self, task_id: str) -> ArchiveProgress:
        """Stop a job at its next batch; whole chunks stay committed and a resubmission resumes."""
        return self.archive_jobs.stop(task_id)


install_middlewares(CXRSynth, SETTINGS)
