"""Dynamic batching: concurrent requests of one worker share model calls.

Request threads decode their image and call :meth:`Batcher.predict`; one model thread takes
whatever has queued up (up to ``max_batch_size``) and runs it as one batch. Nothing waits on
purpose when the queue is empty (``max_wait_ms`` = 0), so a lone request goes straight to the
model: batching costs nothing at concurrency 1 and batches form by themselves while the model is
busy. The queue is bounded: when it is full the request is refused at once with 503 and
Retry-After (load shedding) instead of waiting behind work that cannot finish in time. Each
request has a deadline; one that passes it gets 503 and its image is dropped from any batch not
yet started. Batches are padded to a few fixed sizes so the model never sees a new shape after
warm-up. No web framework here.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import ModelFailed, ModelTimeout, Overloaded, ServiceUnavailable

log = logging.getLogger(__name__)

_STOP = object()


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Padded batch sizes: powers of two up to, and including, ``max_batch_size``."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    sizes.append(max_batch_size)
    return tuple(sizes)


@dataclass
class _Job:
    image: np.ndarray
    deadline: float
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters since start (read without a lock: they only grow)."""

    batches: int = 0
    images: int = 0
    shed: int = 0
    expired: int = 0
    sizes: dict = field(default_factory=dict)  # real batch size -> count


class Batcher:
    """One model thread serving many request threads.

    Args:
        predict_fn: float32 ``[n, h, w, 3]`` -> ``[n, num_labels]`` (``Classifier.predict``).
        max_batch_size: most images in one model call.
        max_wait_ms: how long the model thread may wait for more images once it has one
            (0: never wait, run what is queued).
        max_queue: images waiting beyond the running batch before new ones are refused (503).
        timeout: seconds a request may wait for its result before it is answered 503.
        metrics: optional hooks (``common.metrics.Metrics``): ``queue_changed(delta)``,
            ``batch_done(size, seconds)``, ``rejected_request(reason)``.
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray], *,
                 max_batch_size: int = 16, max_wait_ms: float = 0.0, max_queue: int = 32,
                 timeout: float = 15.0, metrics=None):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.predict_fn = predict_fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.timeout = timeout
        self.buckets = bucket_sizes(max_batch_size)
        self.stats = BatchStats()
        self.metrics = metrics
        self.busy_since: float | None = None  # monotonic start of the running model call
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="model-batcher", daemon=True)
        self._thread.start()

    # -- request threads -------------------------------------------------------------------
    def predict(self, image: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Scores of one image (float32 ``[h, w, 3]`` in [0, 1]) -> ``[num_labels]``.

        Raises Overloaded (503) when the queue is full, ModelTimeout (503) after the deadline,
        ServiceUnavailable (503) once the batcher is closed.
        """
        if self._closed:
            raise ServiceUnavailable("the worker is shutting down")
        timeout = self.timeout if timeout is None else timeout
        job = _Job(image, time.monotonic() + timeout)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.shed += 1
            self._event("rejected_request", "overloaded")
            raise Overloaded() from None
        self._event("queue_changed", 1)
        try:
            return job.future.result(timeout=timeout)
        except FutureTimeout:
            job.future.cancel()  # dropped if its batch has not started
            self.stats.expired += 1
            self._event("rejected_request", "model_timeout")
            raise ModelTimeout(f"the model did not answer within {timeout:g} s") from None

    def _event(self, name: str, *args) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name)(*args)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def busy_seconds(self) -> float:
        """How long the running model call has taken so far (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since

    # -- the model thread ------------------------------------------------------------------
    def _collect(self, batch: list[_Job]) -> tuple[list[_Job], bool]:
        """Top ``batch`` up from the queue (waiting at most max_wait); True if told to stop."""
        wait_until = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                remaining = wait_until - time.monotonic()
                job = self._queue.get(timeout=remaining) if remaining > 0 else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return batch, True
            self._event("queue_changed", -1)
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        pending: list[_Job] = []
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                first = self._queue.get()
                if first is _STOP:
                    return
                self._event("queue_changed", -1)
                pending = [first]
            batch, stop = self._collect(pending) if not stopping else (pending, False)
            stopping = stopping or stop
            now = time.monotonic()
            live = [j for j in batch
                    if j.deadline > now and j.future.set_running_or_notify_cancel()]
            pending = []
            if not live:
                continue
            scores, error = self._compute(live)
            if not stopping:
                # Take what queued up meanwhile *before* answering: the clients answered now
                # come straight back, and must find room in the queue rather than a 503.
                pending, stopping = self._collect([]) if self.max_wait == 0 else ([], False)
            for i, job in enumerate(live):
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(scores[i])

    def _compute(self, jobs: list[_Job]):
        """One padded model call; returns (scores, None) or (None, the error)."""
        n = len(jobs)
        size = next(b for b in self.buckets if b >= n)
        images = np.stack([j.image for j in jobs])
        if size > n:  # pad to a warmed-up shape
            images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]),
                                                      images.dtype)])
        self.busy_since = started = time.monotonic()
        try:
            scores = self.predict_fn(images)[:n]
        except Exception as exc:  # every waiting request must hear about it, as a 503
            log.exception("model call failed for a batch of %d", n)
            return None, ModelFailed(f"the model failed on this batch: {type(exc).__name__}")
        finally:
            self.busy_since = None
        self.stats.batches += 1
        self.stats.images += n
        self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1
        self._event("batch_done", n, time.monotonic() - started)
        return scores, None

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish what is queued, and end the model thread."""
        if self._closed:
            return
        self._closed = True
        try:  # behind the queued jobs: they are drained first
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("batcher queue still full at shutdown; model thread left running")
            return
        self._thread.join(timeout)
