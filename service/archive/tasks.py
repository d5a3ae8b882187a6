"""Archive jobs as BentoML task endpoints: the logic behind the service's ``@bentoml.task`` methods.

BentoML 1.4 turns ``@bentoml.task(route="/archive")`` into ``POST /archive/submit`` (returns a
task_id), ``GET /archive/status?task_id=`` (pending / in_progress / completed / failed),
``GET /archive/get?task_id=`` (the result, or the error) and ``PUT /archive/cancel``, which on a local
server only marks the task and does not stop it. So the service adds two plain endpoints backed by
:class:`ArchiveJobs`: ``POST /archive/progress`` (images done of total) and ``POST /archive/stop``,
which really stops the job at its next batch, after committing every whole chunk.

Nothing stays in progress for ever: :meth:`ArchiveJobs.run` returns or raises on every path. Errors
are raised as :class:`ArchiveTaskFailed`, a 4xx BentoML exception, because BentoML stores a 4xx
task's message while it replaces a 5xx message with "unexpected error"; the task's status becomes
``failed`` and ``/archive/get`` returns ``{"error": message}``. A watchdog stops a job that outlives
its ``timeout_s`` the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal

from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, Field

from service.archive.manifest import ArchiveConflict, ArchiveError
from service.archive.merge import merge_archive
from service.archive.runner import ArchiveCancelled, Engine, ModelInfo, RunOptions, run_shard
from service.archive.spec import ArchivePlan, ArchiveSpec
from service.sinks import SinkError, sink_from_uri

log = logging.getLogger(__name__)


class ArchiveTaskRequest(ArchiveSpec):
    """An archive job spec, plus how the service should run it."""

    merge: bool = Field(True, description="write Data_Entry.csv and the commit marker after a single-shard run")
    timeout_s: int = Field(86_400, ge=1, le=30 * 86_400, description="stop the job after this long")


class ArchiveTaskResult(BaseModel):
    destination: str
    shard_index: int
    shard_count: int
    images: int
    generated: int
    skipped: int
    satisfied: int
    near_copies_dropped: int = 0
    verified: int = 0  # with verify: images the auditor verified
    verify_retries: int = 0  # images made again because the auditor rejected them
    unverified_dropped: int = 0  # indices left without an image: rejected through every retry
    pairs_made: int = 0  # a pairs job: counterfactuals stored
    pairs_confirmed: int = 0  # of those, the auditor sees the finding absent before and present after
    pairs_dropped: int = 0  # edits the auditor did not verify, and the pairs of dropped references
    seconds: float
    committed: bool  # the archive's commit marker is written
    label_counts: dict[str, int] | None = None


class ArchiveProgress(BaseModel):
    task_id: str
    state: Literal["queued", "running", "completed", "failed", "cancelled", "unknown"]
    done: int = 0
    total: int = 0
    destination: str | None = None
    error: str | None = None


class ArchiveTaskFailed(BentoMLException):
    """An archive task failed; BentoML records the message and marks the task failed."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.UNPROCESSABLE_ENTITY):
        super().__init__(message, error_code=status)


@dataclass
class _Job:
    task_id: str
    destination: str
    total: int
    state: str = "queued"
    done: int = 0
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None

    def progress(self) -> ArchiveProgress:
        return ArchiveProgress(task_id=self.task_id, state=self.state, done=self.done, total=self.total,
                               destination=self.destination, error=self.error)


class ArchiveJobs:
    """The archive jobs of one service process. One runs at a time (it shares the LCO engine with
    /generate); later ones wait as "queued". Finished jobs are remembered for ``keep_s`` seconds."""

    def __init__(self, keep_s: float = 86_400.0, local_root: str | None = None):
        """``local_root``: the one local directory tree archives may be written under (default
        ``CXRSYNTH_ARCHIVE_LOCAL_ROOT``, service/settings.py); unset, the service writes archives to s3:// only, so an API
        caller cannot make the server write into its own file system."""
        if local_root is None:
            from service.settings import settings

            self._local_root = settings().archive_local_root
        else:
            self._local_root = Path(local_root).resolve() if local_root else None
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._one_at_a_time = threading.Lock()
        self._keep_s = keep_s

    def run(self, task_id: str, request: ArchiveTaskRequest, engine: Engine, model: ModelInfo,
            near_copies: Any = None, metrics: Any = None) -> ArchiveTaskResult:
        """Run the job to the end; raise :class:`ArchiveTaskFailed` saying why when it cannot.
        ``near_copies``: the service's NearCopyFilter (service/nearcopy.py), if it has an index;
        ``metrics``: its ServiceMetrics, counting the near-copies dropped and the auditor's verdicts."""
        spec = ArchiveSpec(**request.model_dump(exclude={"merge", "timeout_s"}))
        self._check_destination(spec.destination)
        job = _Job(task_id, spec.destination, total=len(ArchivePlan(spec).shard_range()))
        with self._lock:
            self._forget_old()
            self._jobs[task_id] = job
        watchdog = threading.Timer(request.timeout_s, self._time_out, args=(job, request.timeout_s))
        watchdog.daemon = True
        watchdog.start()
        try:
            with self._one_at_a_time:
                if job.cancel.is_set():
                    raise ArchiveCancelled("cancelled before it started")
                job.state = "running"
                report = run_shard(
                    spec,
                    engine,
                    model,
                    options=RunOptions(progress=False),
                    cancel=job.cancel,
                    on_progress=lambda done, _total: setattr(job, "done", done),
                    near_copies=near_copies,
                    metrics=metrics,
                )
                if metrics is not None and report.near_copies_dropped:
                    metrics.near_copies_dropped.labels(source="archive").inc(report.near_copies_dropped)
                if metrics is not None and report.accepted_without_steps:
                    metrics.accepted_without_steps.labels(source="archive").inc(report.accepted_without_steps)
                job.done = report.images
                marker = None
                if request.merge and spec.shard_count == 1:
                    marker = merge_archive(sink_from_uri(spec.destination), progress=False)
            job.state = "completed"
            return ArchiveTaskResult(
                destination=report.destination,
                shard_index=report.shard_index,
                shard_count=report.shard_count,
                images=report.images,
                generated=report.generated,
                skipped=report.skipped,
                satisfied=report.satisfied,
                near_copies_dropped=report.near_copies_dropped,
                verified=report.verified,
                verify_retries=report.verify_retries,
                unverified_dropped=report.unverified_dropped,
                pairs_made=report.pairs_made,
                pairs_confirmed=report.pairs_confirmed,
                pairs_dropped=report.pairs_dropped,
                seconds=round(report.seconds, 3),
                committed=marker is not None or report.archive_complete,
                label_counts=marker["label_counts"] if marker else None,
            )
        except ArchiveCancelled as error:
            job.state, job.error = "cancelled", job.error or str(error)
            raise ArchiveTaskFailed(f"archive job {task_id} {job.error}", HTTPStatus.CONFLICT) from error
        except ArchiveConflict as error:
            job.state, job.error = "failed", str(error)
            raise ArchiveTaskFailed(str(error), HTTPStatus.CONFLICT) from error
        except (ArchiveError, SinkError, ValueError) as error:
            job.state, job.error = "failed", str(error)
            raise ArchiveTaskFailed(str(error)) from error
        except Exception as error:  # a task must end failed, never hang in progress
            log.exception("archive task %s failed", task_id)
            job.state, job.error = "failed", f"internal error: {type(error).__name__}: {error}"
            raise ArchiveTaskFailed(job.error, HTTPStatus.FAILED_DEPENDENCY) from error
        finally:
            watchdog.cancel()
            job.finished_at = time.monotonic()

    def _check_destination(self, destination: str) -> None:
        if destination.startswith("s3://"):
            return
        if self._local_root is None:
            raise ArchiveTaskFailed(
                "the service writes archives to s3://bucket/prefix destinations only (set "
                "CXRSYNTH_ARCHIVE_LOCAL_ROOT on the server to allow a local directory under it)",
                HTTPStatus.BAD_REQUEST,
            )
        path = Path(destination.removeprefix("file://")).resolve()
        if not path.is_relative_to(self._local_root):
            raise ArchiveTaskFailed(f"local destinations must lie under {self._local_root}", HTTPStatus.BAD_REQUEST)

    def progress(self, task_id: str) -> ArchiveProgress:
        with self._lock:
            job = self._jobs.get(task_id)
        return job.progress() if job else ArchiveProgress(task_id=task_id, state="unknown")

    def stop(self, task_id: str) -> ArchiveProgress:
        """Ask a queued or running job to stop at its next batch (whole chunks stay committed)."""
        with self._lock:
            job = self._jobs.get(task_id)
        if job is None:
            return ArchiveProgress(task_id=task_id, state="unknown")
        if job.finished_at is None:
            job.error = job.error or "cancelled on request"
            job.cancel.set()
        return job.progress()

    def _time_out(self, job: _Job, timeout_s: int) -> None:
        job.error = f"timed out after {timeout_s} s"
        job.cancel.set()

    def _forget_old(self) -> None:
        now = time.monotonic()
        for task_id in [t for t, j in self._jobs.items() if j.finished_at and now - j.finished_at > self._keep_s]:
            del self._jobs[task_id]


def task_id_of(context: Any) -> str:
    """The BentoML task id of the current request (set by BentoML's task runner)."""
    task_id = getattr(context.request.state, "task_id", None)
    if not task_id:
        raise ArchiveTaskFailed("archive jobs run as tasks: POST /archive/submit", HTTPStatus.BAD_REQUEST)
    return str(task_id)
