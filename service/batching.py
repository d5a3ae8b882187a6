"""Cross-request batching: one running LCO batch fed by every concurrent request.

BentoML's adaptive batching groups *calls* of one batchable API and waits for the whole group to
finish, which fits fixed-cost models. An LCO sample's cost varies from 0 to hundreds of steps and a
request can ask for many images that should each be uploaded as soon as it is done, so the service
batches at the level of LCO steps instead: a worker thread owns one :class:`service.lco.LCOBatch`;
requests drop their samples into a queue, waiting samples join the running batch between steps
(no waiting for the slowest sample in flight), and finished samples leave at once. When the worker
is idle it waits at most ``max_wait_s`` after the first arrival for others to join, so a burst of
concurrent requests starts as one batch while a lone request is delayed by that bound only.

With ``enabled=False`` every submission runs in a batch of its own (the request's own samples are
still batched together): the baseline the throughput benchmark compares against.

Cancelling a sample's future (what asyncio does when a request's task is cancelled, for instance
because its client went away) takes a queued sample out of the queue; a sample already in the running
batch leaves it before the next step and its future fails with ``CancelledError``, so an abandoned
request stops costing steps.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from service.lco import LCOEngine, SampleRequest, SampleResult

logger = logging.getLogger(__name__)

BatchObserver = Callable[[int], None]


class SampleFuture(Future[SampleResult]):
    """A sample's future that can also be cancelled while its sample runs."""

    abandoned = False

    def cancel(self) -> bool:
        # Future.cancel() refuses once running; mark it so the worker drops the sample at its next step.
        self.abandoned = True
        return super().cancel()


class Batcher:
    """Runs submitted samples on ``engine`` and resolves one future per sample."""

    def __init__(
        self,
        engine: LCOEngine,
        max_batch: int | None = None,
        max_wait_s: float = 0.01,
        enabled: bool = True,
        on_step: BatchObserver | None = None,
    ):
        self.engine = engine
        self.max_batch = max_batch or engine.max_batch
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self.on_step = on_step  # called with the batch size of every step (metrics)
        self._pending: list[tuple[SampleRequest, Future[SampleResult]]] = []
        self._condition = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None
        self._solo: ThreadPoolExecutor | None = None
        if enabled:
            self._worker = threading.Thread(target=self._run, name="lco-batcher", daemon=True)
            self._worker.start()
        else:
            self._solo = ThreadPoolExecutor(max_workers=64, thread_name_prefix="lco-solo")

    def submit(self, samples: Sequence[SampleRequest]) -> list[Future[SampleResult]]:
        """Queue ``samples``; each future resolves as soon as its sample finishes."""
        futures: list[Future[SampleResult]] = [SampleFuture() for _ in samples]
        if not samples:
            return futures
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if not self.enabled:
            assert self._solo is not None
            self._solo.submit(self._run_alone, list(zip(samples, futures)))
            return futures
        with self._condition:
            self._pending.extend(zip(samples, futures))
            self._condition.notify()
        return futures

    def close(self) -> None:
        """Finish what is queued and in flight, then stop the worker."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        if self._worker is not None:
            self._worker.join()
        if self._solo is not None:
            self._solo.shutdown(wait=True)

    # -- worker --------------------------------------------------------------------------------
    def _take_joining(self, running: int) -> list[tuple[SampleRequest, Future[SampleResult]]] | None:
        """Samples to add before the next step; None once closed and drained."""
        with self._condition:
            while not self._pending and not running and not self._closed:
                self._condition.wait()
            if self._closed and not self._pending and not running:
                return None
            if not running and self._pending:
                # Idle: give concurrent requests a bounded moment to arrive and start together.
                deadline = time.monotonic() + self.max_wait_s
                while len(self._pending) < self.max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
            room = self.max_batch - running
            joining, self._pending = self._pending[:room], self._pending[room:]
            return joining

    def _run(self) -> None:
        def take(running: int) -> list[tuple[SampleRequest, Future[SampleResult]]] | None:
            joining = self._take_joining(running)
            return None if joining is None else [(s, f) for s, f in joining if f.set_running_or_notify_cancel()]

        self.engine.drive(take, _deliver, fail=_fail, abandoned=_abandoned, on_step=self.on_step)

    def _run_alone(self, items: list[tuple[SampleRequest, Future[SampleResult]]]) -> None:
        pending = [(s, f) for s, f in items if f.set_running_or_notify_cancel()]

        def take(running: int) -> list[tuple[SampleRequest, Future[SampleResult]]] | None:
            nonlocal pending
            if not pending and not running:
                return None
            room = self.max_batch - running
            joining, pending = pending[:room], pending[room:]
            return joining

        self.engine.drive(take, _deliver, fail=_fail, abandoned=_abandoned, on_step=self.on_step)


def _abandoned(future: Future[SampleResult]) -> bool:
    return getattr(future, "abandoned", False)


def _fail(futures: list[Future[SampleResult]], error: BaseException) -> None:
    if not isinstance(error, CancelledError):
        logger.error("LCO batch failed; failing %d samples", len(futures), exc_info=error)
    for future in futures:
        if not future.done():
            future.set_exception(error)


def _deliver(future: Future[SampleResult], result: SampleResult) -> None:
    if not future.done():
        future.set_result(result)
