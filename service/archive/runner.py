"""Run one shard of an archive job: LCO in the calling thread, encoding (PNG or DICOM) and uploads in a pool.

Ordering guarantees (what makes a crash at any instant harmless):

1. ``job.json`` is written (or checked) before anything else, so shards of different jobs never mix.
2. An image is stored before any record of it exists.
3. A chunk's manifest object is written, in one atomic PUT, only after every image it lists is stored.
4. A rerun skips exactly the chunks whose manifest is valid and whose images exist with the recorded
   sizes (and, with ``verify_existing``, the recorded sha256), and regenerates the others: same index,
   same seed, same labels, so the same bytes under the same keys.

Uploads overlap LCO through a bounded number of in-flight images (a semaphore): when storage is slower
than generation, ``submit`` blocks and LCO waits, so memory stays flat whatever the count.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from service.archive.manifest import (
    JOB_KEY,
    MARKER_KEY,
    ArchiveConflict,
    ArchiveError,
    ArchiveUIDs,
    canonical_json,
    decode_records,
    describe_difference,
    dropped_record,
    encode_records,
    is_dropped,
    job_document,
    make_record,
    sha256_hex,
    stored_files,
)
from service.archive.pairs import Pair, make_pairs
from service.archive.spec import ArchivePlan, ArchiveSpec, PlannedImage, difference_key, labels_of, patient_id
from service.counterfactual import difference_png
from service.dicom import SyntheticOrigin
from service.image_formats import MEDIA_TYPES, encode_image
from service.nearcopy import MAX_REPLACEMENTS, NearCopyFilter, near_copy_limit_message
from service.sinks import S3Sink, Sink, SinkError, SinkKeyNotFound, sink_from_uri
from service.verify import Accepted, NearCopyLimitReached, Verifier, generate_accepted

log = logging.getLogger(__name__)


class ArchiveCancelled(ArchiveError):
    """The run was asked to stop; what was committed stays and a rerun resumes from there."""


class Engine(Protocol):
    def generate(self, samples: Sequence[Any]) -> list[Any]: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the archive records about the model that made it."""

    name: str
    version: str
    resolution: int
    compute_batch: int  # the engine's rows per graph call: images depend on it (service/lco.py)

    @classmethod
    def from_engine(cls, engine: Any) -> ModelInfo:
        manifest = engine.bundle.manifest
        return cls(name=manifest.name, version=manifest.version, resolution=int(manifest.resolution),
                   compute_batch=int(engine.compute_batch))


@dataclass
class RunOptions:
    """How to run (not what to make: changing these never changes the archive's bytes)."""

    upload_workers: int = 4  # 0: encode and upload in the LCO thread, one after the other
    max_pending_images: int = 64  # images generated but not yet stored; bounds memory
    verify_existing: bool = False  # re-hash the images of complete chunks instead of trusting sizes
    progress: bool = True  # tqdm bar on stderr

    def __post_init__(self) -> None:
        if self.upload_workers < 0 or self.max_pending_images < 1:
            raise ValueError("max_pending_images must be >= 1, upload_workers >= 0")


@dataclass
class ShardReport:
    destination: str
    shard_index: int
    shard_count: int
    images: int  # images in this shard
    generated: int = 0
    skipped: int = 0
    satisfied: int = 0  # among generated
    accepted_without_steps: int = 0  # among generated: a scored latent met the request, no LCO steps
    chunks_written: int = 0
    chunks_skipped: int = 0
    seconds: float = 0.0
    archive_complete: bool = False  # the commit marker was already there: nothing to do
    repaired: list[str] = field(default_factory=list)  # chunks found present but invalid, and redone
    near_copies_dropped: int = 0  # among generated: images replaced because they copied a training image
    verified: int = 0  # among generated, with verify: images the auditor verified (kept)
    verify_retries: int = 0  # among generated: images made again because the auditor rejected them
    unverified_dropped: int = 0  # among generated: indices left without an image, rejected through every retry
    pairs_made: int = 0  # among generated, in a pairs job: counterfactuals stored
    pairs_confirmed: int = 0  # of those, the auditor sees the finding absent before and present after
    pairs_dropped: int = 0  # pairs not stored: the auditor did not verify the edit, or its reference was dropped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[int, int], None]


def wanted_job(spec: ArchiveSpec, model: ModelInfo, near_copy_index: str | None = None,
               verifying: bool = False) -> dict[str, Any]:
    """The job document (job.json) of this job: everything its images depend on (``near_copy_index``:
    the sha256 of the index file a job that drops near-copies runs with, since another index drops others;
    ``verifying``: the job keeps only images the bundle's auditor verifies, with ``spec.verify_retries``)."""
    wanted = job_document(spec.identity(), model.name, model.version)
    wanted["model"]["resolution"] = model.resolution
    wanted["model"]["compute_batch"] = model.compute_batch
    if near_copy_index is not None:
        wanted["near_copy_index_sha256"] = near_copy_index
    if verifying:  # only when on, so jobs written before verification existed still resume
        wanted["verify"] = {"retries": spec.verify_retries}
    # The options in force, defaults included: new defaults would make different images.
    wanted["lco"] = spec.lco.model_dump()
    return wanted


def ensure_job(sink: Sink, wanted: dict[str, Any]) -> dict[str, Any]:
    """Write job.json, or check that the one there is ``wanted`` (:func:`wanted_job`)."""
    try:
        existing = json.loads(sink.get(JOB_KEY))
    except SinkKeyNotFound:
        sink.put(JOB_KEY, canonical_json(wanted), "application/json")
        return wanted
    except ValueError as error:
        raise ArchiveError(f"{sink.uri(JOB_KEY)} is not valid JSON ({error}); remove it or pick a new destination") from None
    if existing != wanted:
        raise ArchiveConflict(
            f"{sink.uri()} already holds a different archive job (differs in {describe_difference(existing, wanted)}); "
            "rerun with the same spec and model to resume it, or choose another destination"
        )
    return existing


class _Uploader:
    """A thread pool with a cap on work in flight; ``submit`` blocks while the cap is reached."""

    def __init__(self, workers: int, max_pending: int):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="archive-upload") if workers else None
        self._slots = threading.Semaphore(max_pending)
        self.error: BaseException | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None:
            future: Future = Future()
            try:
                future.set_result(fn(*args))
            except Exception as error:  # noqa: BLE001 - kept on the future, like an executor does
                future.set_exception(error)
                self.error = self.error or error
            return future
        self._slots.acquire()
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        self._slots.release()
        if future.exception() is not None and self.error is None:
            self.error = future.exception()

    def close(self, cancel_pending: bool = False) -> None:
        """Wait for the work in flight; on failure, drop what has not started (a rerun redoes it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel_pending)


class ShardRunner:
    """Makes the images of one shard that are not yet committed. One instance per run."""

    def __init__(
        self,
        spec: ArchiveSpec,
        engine: Engine,
        model: ModelInfo,
        *,
        sink: Sink | None = None,
        options: RunOptions | None = None,
        cancel: threading.Event | None = None,
        on_progress: ProgressCallback | None = None,
        near_copies: NearCopyFilter | None = None,
        metrics: Any = None,
    ):
        """``metrics``: the service's ServiceMetrics, counting the auditor's verdicts (None: not counted)."""
        self.spec = spec
        self.plan = ArchivePlan(spec)
        self.engine = engine
        self.model = model
        self.sink = sink or sink_from_uri(spec.destination)
        self.options = options or RunOptions()
        self.cancel = cancel or threading.Event()
        self.on_progress = on_progress
        self.lco = spec.lco
        if spec.drop_near_copies and near_copies is None:
            raise ArchiveError("drop_near_copies needs the training set's near-copy index: pass --near-copy-index "
                               "PATH (or set CXRSYNTH_NEAR_COPY_INDEX for the service)")
        self.near_copies = near_copies if spec.drop_near_copies else None
        bundle = getattr(engine, "bundle", None)
        auditor = Verifier.of_bundle(bundle, metrics, source="archive") if bundle is not None else None
        if spec.verify and auditor is None:
            raise ArchiveError("verify: the bundle has no auditor; leave verify out (or false), or use a bundle "
                               "exported with --auditor")
        self.verifier = auditor if spec.verify is not False else None
        # Pairs report the auditor's view of both images whenever the bundle has one; verify decides drops.
        self.pair_judge = self.verifier or (Verifier(auditor.auditor) if auditor is not None else None)
        self.job = wanted_job(spec, model, self.near_copies.index.sha256 if self.near_copies is not None else None,
                              verifying=self.verifier is not None)
        self.uids = ArchiveUIDs.of_job(self.job)

    # -- resume ------------------------------------------------------------------------------
    def _stored_image_sizes(self) -> dict[str, int]:
        """Sizes of the stored images of this shard, listed once (a key range, not the whole bucket)."""
        shard = self.plan.shard_range()
        # The next index's reference key sorts after every follow-up of the shard's last index.
        first, last = self.plan.image_key(shard.start), self.plan.image_key(shard.stop)
        start_after = self.plan.image_key(shard.start - 1) if shard.start > 0 else ""
        sizes: dict[str, int] = {}
        for key, size in self.sink.list_sizes("images/", start_after=start_after):
            if key > last:
                break
            if key >= first:
                sizes[key] = size
        if self.spec.pairs is not None:
            first, last = difference_key(shard.start, 0), difference_key(shard.stop, 0)
            for key, size in self.sink.list_sizes("differences/", start_after=first):
                if key > last:
                    break
                sizes[key] = size
        return sizes

    def _chunk_is_complete(self, key: str, chunk: range, stored: dict[str, int]) -> str | None:
        """None when the chunk's manifest and images are all there; else why it must be redone."""
        try:
            records = decode_records(self.sink.get(key), self.sink.uri(key))
        except ArchiveError as error:
            return str(error)
        if [record["index"] for record in records] != list(chunk):
            return "its records do not list exactly the chunk's images"
        for record in records:
            if is_dropped(record):
                continue  # no image: the auditor rejected it through every retry
            if record["image"] != self.plan.image_key(record["index"]):
                return f"record {record['id']} names {record['image']!r}"
            if [pair["follow_up"] for pair in record.get("pairs", [])] != self.plan.follow_ups():
                return f"record {record['id']} does not list the job's pairs"
            for file_key, size, digest in stored_files(record):
                if stored.get(file_key) != size:
                    return f"{file_key} is missing or has the wrong size"
                if self.options.verify_existing and sha256_hex(self.sink.get(file_key)) != digest:
                    return f"{file_key} does not match its sha256"
        return None

    # -- generation ----------------------------------------------------------------------------
    def _store(self, planned: PlannedImage, accepted: Accepted, pairs: list[Pair]) -> dict[str, Any]:
        """Store the image (and its pairs') and return its record; with verify, an image the auditor still
        rejects is not stored and its record says it was dropped."""
        result, verdict = accepted.result, accepted.verdict
        verify_retries = accepted.attempts - 1 - accepted.near_copies_dropped
        requested = labels_of(planned.target, planned.mask)
        if verdict is not None and not verdict.verified:
            record = dropped_record(index=planned.index, image_id=planned.id, requested=requested,
                                    target=planned.target, seed=result.seed, attempts=accepted.attempts,
                                    verify_retries=verify_retries, auditor_probabilities=verdict.rounded(),
                                    model_version=self.model.version)
            if self.spec.pairs is not None:
                record["pairs"] = [pair.record(planned.index) for pair in pairs]
            return record
        # What DICOM writes in its private block and patient module; PNG ignores both.
        origin = SyntheticOrigin(
            model_name=self.model.name,
            model_version=self.model.version,
            seed=result.seed,
            requested=requested,
            lco_options=self.lco.model_dump(),
            synthetic_patient_id=str(patient_id(planned.index)),
        )
        placement = self.uids.placement(self.spec.shard_index, planned.index)
        data = encode_image(result.image, self.spec.image_format, origin, placement)
        record = make_record(
            index=planned.index,
            image_id=planned.id,
            key=planned.key,
            requested=requested,
            target=planned.target,
            probabilities=result.probabilities,
            satisfied=result.satisfied,
            seed=result.seed,  # the planned seed, or the retry seed of a replaced or rejected image
            steps=result.steps,
            accepted_without_steps=result.accepted_without_steps,
            candidates_scored=result.candidates_scored,
            model_version=self.model.version,
            image_format=self.spec.image_format,
            data=data,
        )
        if self.near_copies is not None:
            record["near_copies_dropped"] = accepted.near_copies_dropped
        if verdict is not None:
            record.update(attempts=accepted.attempts, verify_retries=verify_retries, verified=True,
                          auditor_probabilities=verdict.rounded())
        metadata = {
            "sha256": record["sha256"],
            "seed": str(record["seed"]),
            "finding-labels": record["finding_labels"],
            "model-version": self.model.version,
        }
        self.sink.put(planned.key, data, MEDIA_TYPES[self.spec.image_format], metadata)
        if self.spec.pairs is not None:
            record["pairs"] = [self._store_pair(planned, pair) for pair in pairs]
        return record

    def _store_pair(self, planned: PlannedImage, pair: Pair) -> dict[str, Any]:
        """Store a kept pair's counterfactual (and difference map) and return the pair's record."""
        record = pair.record(planned.index)
        if pair.dropped is not None:
            return record
        key = self.plan.image_key(planned.index, pair.follow_up)
        data = encode_image(pair.result.image, self.spec.image_format, None, None)  # PNG: no DICOM origin
        record.update(image=key, format=self.spec.image_format, bytes=len(data), sha256=sha256_hex(data))
        self.sink.put(key, data, MEDIA_TYPES[self.spec.image_format],
                      {"sha256": record["sha256"], "seed": str(record["seed"]),
                       "finding-labels": record["finding_labels"], "model-version": self.model.version})
        if self.spec.pairs.difference_maps:
            difference, scale = difference_png(pair.reference.image, pair.result.image)
            record.update(difference=difference_key(planned.index, pair.follow_up), difference_bytes=len(difference),
                          difference_sha256=sha256_hex(difference), difference_scale=round(scale, 6))
            self.sink.put(record["difference"], difference, "image/png", {"sha256": record["difference_sha256"]})
        return record

    def _requests(self, batch: list[PlannedImage]) -> list[Any]:
        from service.lco import SampleRequest

        return [SampleRequest(p.target, p.mask, p.seed, self.lco) for p in batch]

    def _pairs(self, batch: list[PlannedImage], accepted: list[Accepted]) -> list[list[Pair]]:
        if self.spec.pairs is None:
            return [[] for _ in batch]
        return make_pairs(self.engine.generate, batch, accepted, self.spec.pairs, self.lco, self.pair_judge,
                          verifying=self.verifier is not None)

    def _accept(self, batch: list[PlannedImage]) -> list[Accepted]:
        """The batch's images, each near-copy and each image the auditor rejects made again from the next
        retry seed (service/verify.py); the seeds are a pure function of the planned seed and the attempt."""
        try:
            return generate_accepted(
                self.engine.generate, self._requests(batch), verifier=self.verifier,
                verify_retries=self.spec.verify_retries,
                is_near_copy=self.near_copies.near_copies if self.near_copies is not None else None,
                max_near_copy_replacements=MAX_REPLACEMENTS)
        except NearCopyLimitReached as error:
            raise ArchiveError(near_copy_limit_message(error.seed)) from None

    def _commit(self, uploader: _Uploader, chunk_key: str, futures: list[Future]) -> Future:
        """Once every image of a chunk is stored, write its manifest (through the pool)."""
        records = [future.result() for future in futures]  # raises the first upload error
        return uploader.submit(self.sink.put, chunk_key, encode_records(records), "application/x-ndjson")

    @staticmethod
    def _drop_finished(writes: list[Future]) -> list[Future]:
        """The writes still running; raises the error of one that failed."""
        running = []
        for future in writes:
            if future.done():
                future.result()
            else:
                running.append(future)
        return running

    def run(self) -> ShardReport:
        started = time.monotonic()
        spec, plan = self.spec, self.plan
        report = ShardReport(self.sink.uri(), spec.shard_index, spec.shard_count, len(plan.shard_range()))
        try:
            if isinstance(self.sink, S3Sink):
                self.sink.head_bucket()  # a clear NoSuchBucket/AccessDenied before any work
            max_batch = getattr(self.engine, "max_batch", spec.batch_size)
            if max_batch < spec.batch_size:
                raise ArchiveError(f"the archive's batch_size is {spec.batch_size} but the LCO engine runs at most "
                                   f"{max_batch} images per batch; raise the engine's maximum batch")
            ensure_job(self.sink, self.job)
            if self.sink.exists(MARKER_KEY):
                report.archive_complete, report.skipped = True, report.images
                return report
            pending = self._pending_chunks(report)
            self._generate(pending, report)
        except SinkError as error:
            raise ArchiveError(
                f"storage failed: {error}. Committed chunks are kept: fix the cause and rerun the same command to resume."
            ) from error
        finally:
            report.seconds = time.monotonic() - started
        return report

    def _pending_chunks(self, report: ShardReport) -> list[tuple[str, range]]:
        shard = self.spec.shard_index
        present = set(self.sink.list(self.plan.shard_dir(shard) + "/"))
        stored = self._stored_image_sizes() if present else {}
        pending = []
        for number, chunk in enumerate(self.plan.chunks()):
            key = self.plan.chunk_key(shard, number)
            if key in present:
                problem = self._chunk_is_complete(key, chunk, stored)
                if problem is None:
                    report.chunks_skipped += 1
                    report.skipped += len(chunk)
                    continue
                log.warning("redoing %s: %s", self.sink.uri(key), problem)
                report.repaired.append(key)
            pending.append((key, chunk))
        return pending

    def _generate(self, pending: list[tuple[str, range]], report: ShardReport) -> None:
        from tqdm import tqdm

        options = self.options
        uploader = _Uploader(options.upload_workers, options.max_pending_images)
        bar = tqdm(
            total=report.images,
            initial=report.skipped,
            unit="img",
            desc=f"shard {self.spec.shard_index + 1}/{self.spec.shard_count}",
            disable=not options.progress,
            dynamic_ncols=True,
        )
        previous: tuple[str, list[Future]] | None = None
        manifest_writes: list[Future] = []
        cancelled = False
        failed = True
        try:
            for chunk_key, chunk in pending:
                futures: list[Future] = []
                for indices in self.plan.batches(chunk):
                    if self.cancel.is_set():
                        cancelled = True
                        break
                    if uploader.error is not None:
                        raise uploader.error
                    batch = [self.plan.image(i) for i in indices]
                    references = self._accept(batch)
                    for planned, accepted, pairs in zip(batch, references, self._pairs(batch, references), strict=True):
                        futures.append(uploader.submit(self._store, planned, accepted, pairs))
                        report.pairs_made += sum(pair.dropped is None for pair in pairs)
                        report.pairs_confirmed += sum(pair.dropped is None and bool(pair.auditor_confirms)
                                                      for pair in pairs)
                        report.pairs_dropped += sum(pair.dropped is not None for pair in pairs)
                        report.satisfied += int(bool(accepted.result.satisfied))
                        report.accepted_without_steps += int(accepted.result.accepted_without_steps)
                        report.near_copies_dropped += accepted.near_copies_dropped
                        report.verify_retries += accepted.attempts - 1 - accepted.near_copies_dropped
                        report.verified += int(bool(accepted.verified))
                        report.unverified_dropped += int(accepted.verified is False)
                    report.generated += len(batch)
                    bar.update(len(batch))
                    bar.set_postfix(satisfied=f"{report.satisfied / report.generated:.0%}",
                                    without_steps=f"{report.accepted_without_steps / report.generated:.0%}",
                                    refresh=False)
                    if self.on_progress is not None:
                        self.on_progress(report.skipped + report.generated, report.images)
                if cancelled:
                    break  # this chunk is partial: no manifest; a rerun rewrites its images
                # The previous chunk's uploads had this whole chunk's LCO time to finish.
                if previous is not None:
                    manifest_writes.append(self._commit(uploader, *previous))
                    report.chunks_written += 1
                    manifest_writes = self._drop_finished(manifest_writes)  # flat memory
                previous = (chunk_key, futures)
            if previous is not None:
                manifest_writes.append(self._commit(uploader, *previous))
                report.chunks_written += 1
            for future in manifest_writes:
                future.result()
            failed = False
        finally:
            uploader.close(cancel_pending=failed)
            bar.close()
        if cancelled:
            committed = report.skipped + sum(len(chunk) for _, chunk in pending[: report.chunks_written])
            raise ArchiveCancelled(
                f"cancelled with {committed} of {report.images} images committed; rerun to resume"
            )


def run_shard(spec: ArchiveSpec, engine: Engine, model: ModelInfo, **how: Any) -> ShardReport:
    """Make (or finish) shard ``spec.shard_index`` of the archive at ``spec.destination``; ``how`` takes
    :class:`ShardRunner`'s keyword arguments (sink, options, cancel, on_progress)."""
    return ShardRunner(spec, engine, model, **how).run()
