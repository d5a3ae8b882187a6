"""One POST /generate request: its samples through the batcher, strict retries, encoding, uploads
to S3 as each image is done, and the clean-up of a half-written set when anything fails."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse

from service.dicom import DicomPlacement, SyntheticOrigin, random_uid
from service.http import error_response
from service.image_formats import MEDIA_TYPES, SUFFIXES, encode_image
from service.labels import LABELS
from service.lco import LCOOptions, SampleRequest, SampleResult
from service.nearcopy import MAX_REPLACEMENTS, near_copy_limit_message
from service.schemas import (
    MAX_SEED,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    LabelSpec,
    WithheldImage,
)
from service.settings import settings
from service.sinks import S3Sink, SinkError, SinkKeyNotFound
from service.verify import Verdict, Verifier, retry_seed

if TYPE_CHECKING:
    from service.service import CXRSynth

logger = logging.getLogger("bentoml.service.cxrsynth")
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


def s3_error_response(error: SinkError, bucket: str) -> JSONResponse:
    """The caller's answer for an S3 failure: 404/403 for bucket or credentials, else 502."""
    code = s3_error_code(error)
    status = S3_STATUS.get(code, 502)
    if code == "NoSuchBucket":
        message = f"S3 bucket {bucket!r} does not exist; create it or fix the destination"
    elif status == 403:
        message = f"S3 refused access to bucket {bucket!r} with the service's credentials; grant access"
    else:
        message = f"S3 failed while writing to bucket {bucket!r}; no images were kept"
    return error_response(status, message, {"s3_code": code, "s3_message": error.message, "operation": error.operation})


def s3_error_code(error: SinkError) -> str:
    return "NoSuchBucket" if isinstance(error, SinkKeyNotFound) else error.code


class NearCopyLimit(RuntimeError):
    """An image stayed a near-copy of the training set through every replacement."""


class GenerateJob:
    """One /generate request: its samples, strict retries, uploads, and clean-up on failure."""

    def __init__(self, service: CXRSynth, request: GenerateRequest, spec: LabelSpec, options: LCOOptions,
                 request_id: str, base_seed: int, sink: S3Sink | None, verifier: Verifier | None = None):
        """``verifier``: the bundle's auditor when this request verifies (service/verify.py), else None."""
        self.service = service
        self.verifier = verifier
        self.request = request
        self.spec = spec
        self.options = options
        self.request_id = request_id
        self.base_seed = base_seed
        self.sink = sink
        self.uploaded: list[str] = []
        # DICOM: a request is one study holding one series
        self.study_uid, self.series_uid = random_uid(), random_uid()
        self.in_flight: set[asyncio.Future[str]] = set()
        self.upload_slots = asyncio.Semaphore(settings().s3_concurrency)
        self.near_copies_dropped = 0

    async def run(self) -> GenerateResponse | JSONResponse:
        count = self.request.count
        seeds = [(self.base_seed + index) % (MAX_SEED + 1) for index in range(count)]
        futures = self.service.batcher.submit([self._sample(seed) for seed in seeds])
        tasks = [asyncio.create_task(self._image(index, seed, future)) for index, (seed, future)
                 in enumerate(zip(seeds, futures))]
        try:
            outcomes = await asyncio.gather(*tasks)
        except SinkError as error:
            await self._abandon(tasks)
            assert self.sink is not None
            return s3_error_response(error, self.sink.bucket)
        except NearCopyLimit as error:
            await self._abandon(tasks)
            return error_response(422, str(error))
        except BaseException:
            await self._abandon(tasks)
            raise
        images = [outcome for outcome in outcomes if isinstance(outcome, GeneratedImage)]
        return GenerateResponse(
            request_id=self.request_id,
            model=self.service.model_ref,
            format=self.request.format,
            exclusive=self.request.exclusive,
            satisfied=sum(image.satisfied for image in images),
            verified=None if self.verifier is None else len(images),
            withheld=[outcome for outcome in outcomes if isinstance(outcome, WithheldImage)],
            near_copies_dropped=self.near_copies_dropped,
            destination=self.sink.uri() if self.sink else None,
            images=images,
        )

    async def _abandon(self, tasks: list[asyncio.Task[GeneratedImage | WithheldImage]]) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._remove_uploaded()

    def _sample(self, seed: int) -> SampleRequest:
        return SampleRequest(self.spec.target, self.spec.mask, seed, self.options)

    async def _image(self, index: int, seed: int, future: Any) -> GeneratedImage | WithheldImage:
        result: SampleResult = await asyncio.wrap_future(future)
        attempts = 1
        strict_retries = verify_retries = dropped = 0
        near_copies = self.service.near_copies if self.request.drop_near_copies else None
        while True:
            # A near-copy is replaced whatever strict says; strict retries and auditor rejections
            # have budgets of their own. Past its verify budget an image is withheld.
            verdict: Verdict | None = None
            if near_copies is not None and (await asyncio.to_thread(near_copies.near_copies, [result.image]))[0]:
                dropped += 1
                if dropped > MAX_REPLACEMENTS:
                    raise NearCopyLimit(near_copy_limit_message(seed))
            elif self.request.strict and not result.satisfied and strict_retries < self.request.retries:
                strict_retries += 1
            elif self.verifier is not None:
                verdict = (await asyncio.to_thread(self.verifier.judge, [self._sample(result.seed)], [result]))[0]
                if verdict.verified or verify_retries >= self.request.verify_retries:
                    break
                verify_retries += 1
            else:
                break
            retry = self.service.batcher.submit([self._sample(retry_seed(seed, attempts))])[0]
            result = await asyncio.wrap_future(retry)
            attempts += 1
        if dropped:
            self.near_copies_dropped += dropped
            self.service.metrics.near_copies_dropped.labels(source="generate").inc(dropped)
        probabilities = {name: round(float(p), 6) for name, p in zip(LABELS, result.probabilities)}
        if verdict is not None and not verdict.verified:
            return WithheldImage(index=index, seed=result.seed, attempts=attempts, probabilities=probabilities,
                                 auditor_probabilities=verdict.rounded())
        self.service.metrics.record_image(self.spec.positives, bool(self.spec.mask.any()), result.satisfied,
                                          result.steps, result.accepted_without_steps)
        image_id = f"{self.request_id}-{index:04d}"
        origin = SyntheticOrigin(
            model_name=self.service.model_ref.name,
            model_version=self.service.model_ref.version,
            seed=result.seed,
            requested=self.spec.constraints,
            lco_options=self.options.model_dump(),
            synthetic_patient_id=image_id,
        )
        placement = DicomPlacement(self.study_uid, self.series_uid, random_uid(), index + 1)
        data = await asyncio.to_thread(encode_image, result.image, self.request.format, origin, placement)
        image = GeneratedImage(
            id=image_id,
            index=index,
            seed=result.seed,
            labels=self.spec.constraints,
            probabilities=probabilities,
            satisfied=result.satisfied,
            steps=result.steps,
            accepted_without_steps=result.accepted_without_steps,
            candidates_scored=result.candidates_scored,
            attempts=attempts,
            verified=None if verdict is None else verdict.verified,
            auditor_probabilities=None if verdict is None else verdict.rounded(),
            media_type=MEDIA_TYPES[self.request.format],
        )
        if self.sink is None:
            image.data = base64.b64encode(data).decode("ascii")
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
            "accepted_without_steps": image.accepted_without_steps,
            "candidates_scored": image.candidates_scored,
            "attempts": attempts,
            "verified": image.verified,
            "auditor_probabilities": image.auditor_probabilities,
            "format": self.request.format,
            "lco": self.options.model_dump(),
            "model": self.service.model_ref.model_dump(),
            "image": f"{stem}{SUFFIXES[self.request.format]}",
        }
        metadata = {
            "request-id": self.request_id,
            "seed": str(image.seed),
            "labels": ";".join(f"{'' if v else '-'}{k}" for k, v in image.labels.items()) or "unconditional",
            "satisfied": str(image.satisfied).lower(),
            "model-version": f"{self.service.model_ref.name}:{self.service.model_ref.version}",
        }
        image.uri = await self._put(sidecar["image"], data, image.media_type, metadata)
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
