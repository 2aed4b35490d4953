"""Dynamic batching with admission: concurrent requests of one worker share model calls, and a
request learns whether it will be served before it does any work. No web framework here.

A request first asks for a :class:`Ticket` (:meth:`Batcher.admit`), before its body is read,
decoded or stored and before a URL is downloaded. The batcher admits it while the *expected
wait* of its images, the time until the batch holding them starts, stays within a budget
(``max_wait_ms``, ``QUEUE_MAX_WAIT_MS``): the running call's remaining time plus one batch time
for every full batch ahead of it, from the batcher's own measured batch times (per padded batch
size, seeded by the warm-up). A slow model so gets a short queue and a fast one a long queue,
and ``Retry-After`` says how long the queue takes to drain. ``max_queue`` is a hard cap on
admitted-but-unstarted images. A refused request gets 503, having done nothing: at once, up to
``refusals_per_second`` (``MAX_REFUSALS_PER_SECOND``) per worker; past that rate each refusal
is held back (sleeping, no CPU) until the rate allows it, at most one second. Clients that
resend a 503 at once would otherwise keep the request threads refusing them as fast as the
CPU allows, and under the GIL that work starves the model thread and the admitted requests
(measured in docs/BENCHMARKS.md); paced, they cost a bounded share of one core.

Admitted requests decode their image and call :meth:`Ticket.submit`; one model thread takes
whatever has queued up (up to ``max_batch_size``) and runs it as one batch. Nothing waits on
purpose when the queue is empty (``batch_wait_ms`` = 0), so a lone request goes straight to the
model. Each request has a deadline; one that passes it gets 503 and its image is dropped from
any batch not yet started. Batches are padded to a few fixed sizes so the model never sees a
new shape after warm-up.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from common.errors import ModelFailed, ModelTimeout, Overloaded, OverShare, ServiceUnavailable

log = logging.getLogger(__name__)

_STOP = object()
_EWMA = 0.3  # weight of the newest measurement in a batch-time estimate
#: The model thread's busy fraction (over about a second) from which the model counts as
#: pressed and a client's fair share applies: near saturation, where queues grow.
PRESSED_BUSY = 0.5
#: The 429s over a fair share answered at once, as a fraction of MAX_REFUSALS_PER_SECOND.
SHARE_REFUSALS = 0.25


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Padded batch sizes: powers of two up to, and including, ``max_batch_size``."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    sizes.append(max_batch_size)
    return tuple(sizes)


def efficient_batch_size(batch_seconds: dict[int, float], limit: int,
                         within: float = 0.98) -> int:
    """The smallest measured batch size (up to ``limit``) whose images per second are within
    ``within`` of the best measured: a larger batch would add latency, not throughput (on a
    CPU an Inception-sized model does about as many images per second at batch 4 as at 8).
    ``limit`` when nothing was measured."""
    rates = {b: b / s for b, s in batch_seconds.items() if s > 0 and b <= limit}
    if not rates:
        return limit
    best = max(rates.values())
    return min(b for b, rate in rates.items() if rate >= within * best)


class BusyFraction:
    """The share of recent time a model thread spent in model calls, exponentially averaged
    with a time constant of ``tau`` seconds (1.0: it has been busy for a long while; 0.0: idle).

    One writer (the model thread: :meth:`change`), any readers (:meth:`value`); the state is
    one tuple, swapped whole."""

    def __init__(self, tau: float = 1.0, now: float | None = None):
        self.tau = tau
        self._state = (0.0, time.monotonic() if now is None else now, False)

    def change(self, busy: bool, now: float | None = None) -> None:
        """The model thread starts (``busy``) or ends a call."""
        now = time.monotonic() if now is None else now
        self._state = (self.value(now), now, busy)

    def value(self, now: float | None = None) -> float:
        value, since, busy = self._state
        now = time.monotonic() if now is None else now
        keep = math.exp(-max(0.0, now - since) / self.tau)
        return value * keep + (1.0 - keep if busy else 0.0)


@dataclass
class _Job:
    image: np.ndarray
    deadline: float
    future: Future = field(default_factory=Future)


class Pacer:
    """Spaces events out to at most ``rate`` per second, after a burst of ``burst`` at once.

    :meth:`delay` says how long the caller must wait before its event: the generic cell rate
    algorithm (a theoretical arrival time advanced by ``1 / rate`` per event, with a tolerance
    of ``burst - 1`` intervals), the wait never longer than ``max_delay``.
    """

    def __init__(self, rate: float, burst: int = 1, max_delay: float = 1.0):
        self.interval = 1.0 / rate
        self.tolerance = (max(1, burst) - 1) * self.interval
        self.max_delay = max_delay
        self._tat = 0.0  # theoretical arrival time of the next event
        self._lock = threading.Lock()

    def delay(self) -> float:
        with self._lock:
            now = time.monotonic()
            tat = min(max(self._tat, now), now + self.tolerance + self.max_delay)
            self._tat = tat + self.interval
            return max(0.0, tat - self.tolerance - now)


class Ticket:
    """Room for ``images`` images in a batcher's queue, reserved before any work.

    Use it as a context manager: room not used by :meth:`submit` is given back on exit.
    """

    def __init__(self, batcher: "Batcher", images: int):
        self._batcher = batcher
        self.left = images

    def submit(self, images: list[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        """Scores of admitted images (each float32 ``[h, w, 3]`` in [0, 1]) -> one ``[labels]``
        row each, in order; queued at once so they can share batches.

        Raises ModelTimeout (503) after the deadline, ModelFailed (503) when the model call
        raised, ServiceUnavailable (503) once the batcher is closed.
        """
        if len(images) > self.left:
            raise RuntimeError("this ticket has no room for that many images")
        self.left -= len(images)
        return self._batcher._enqueue(images, timeout)

    def release(self) -> None:
        """Give back the room not used."""
        if self.left:
            self._batcher._unreserve(self.left)
            self.left = 0

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Batcher:
    """One model thread serving many request threads, with admission by expected wait.

    Args:
        predict_fn: float32 ``[n, h, w, 3]`` -> ``[n, num_labels]`` (``Classifier.predict``).
        max_batch_size: most images in one model call.
        batch_wait_ms: how long the model thread may wait for more images once it has one
            (0: never wait, run what is queued).
        max_queue: hard cap on admitted images whose batch has not started.
        max_wait_ms: admit a request only while its expected wait is within this (0: no
            budget, only the hard cap).
        refusals_per_second: refusals answered at once per second (after a burst of a tenth
            of it); past that, a refusal sleeps until its turn, at most 1 s (0: never wait).
            The 429s of :meth:`refuse_over_share` are paced apart, at ``SHARE_REFUSALS`` of
            that rate.
        timeout: seconds a request may wait for its result before it is answered 503.
        batch_seconds: measured seconds of one call per padded batch size (the warm-up's), the
            first estimates of the batch times.
        metrics: optional hooks (``common.metrics.Metrics``), each called only where it
            exists: ``queue_changed(delta)`` (admitted images whose batch has not started),
            ``work_changed(delta)`` (admitted images not yet answered: queued or in the
            running call), ``batch_done(size, seconds)``, ``rejected_request(reason)``.
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray], *,
                 max_batch_size: int = 16, batch_wait_ms: float = 0.0, max_queue: int = 32,
                 max_wait_ms: float = 0.0, refusals_per_second: float = 0.0,
                 timeout: float = 15.0,
                 batch_seconds: dict[int, float] | None = None, metrics=None):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.predict_fn = predict_fn
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_wait = max_wait_ms / 1000.0
        self.timeout = timeout
        self.pacer = (Pacer(refusals_per_second, burst=int(refusals_per_second // 10))
                      if refusals_per_second > 0 else None)
        # 429s over a client's fair share are paced apart from the 503s, at a quarter of their
        # rate: only a client over its share waits its turn, and the fewer refusals it gets
        # (held up to 1 s) the less CPU they take from the others (docs/BENCHMARKS.md)
        self.share_pacer = (Pacer(refusals_per_second * SHARE_REFUSALS,
                                  burst=int(refusals_per_second * SHARE_REFUSALS // 10))
                            if refusals_per_second > 0 else None)
        self.buckets = bucket_sizes(max_batch_size)
        self.metrics = metrics
        self.busy_since: float | None = None  # monotonic start of the running model call
        self.busy = BusyFraction()
        self._running_bucket = 0
        self._estimates = {b: s for b, s in (batch_seconds or {}).items() if b in self.buckets}
        self._lock = threading.Lock()
        self._waiting = 0  # admitted images whose batch has not started
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="model-batcher", daemon=True)
        self._thread.start()

    # -- admission (request threads, before any work) -----------------------------------------
    def admit(self, images: int = 1) -> Ticket:
        """Reserve room for ``images`` images, or refuse at once.

        Raises Overloaded (503, ``Retry-After`` = the expected drain time) when the expected
        wait would pass the budget or the hard cap would be passed; ServiceUnavailable (503)
        once closed.
        """
        self._reserve(images)
        return Ticket(self, images)

    def check_room(self, images: int = 1) -> None:
        """Refuse now, as :meth:`admit` would, without reserving anything: for a request that
        reads its body before it is admitted (a refused one then reads nothing)."""
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the worker is shutting down")
            refused = self._refuses(images)
        if refused:
            self._refuse()

    def _reserve(self, images: int) -> None:
        with self._lock:
            if self._closed:
                raise ServiceUnavailable("the worker is shutting down")
            refused = self._refuses(images)
            if not refused:
                self._waiting += images
        if refused:
            self._refuse()
        self._event("queue_changed", images)
        self._event("work_changed", images)

    def _refuses(self, images: int) -> bool:
        """Whether ``images`` more would pass the hard cap or the wait budget (under the lock)."""
        return self._waiting + images > self.max_queue or (
            self.max_wait > 0 and self.expected_wait() > self.max_wait)

    def _refuse(self) -> None:
        self._event("rejected_request", "overloaded")
        if self.pacer is not None:
            time.sleep(self.pacer.delay())
        raise Overloaded(retry_after=max(1, math.ceil(self.drain_seconds())))

    def pressed(self) -> bool:
        """Whether the model is near saturation: its thread spent at least ``PRESSED_BUSY``
        of the last second or so in model calls. A client's fair share then applies
        (``common/fairshare.py``); below it every request is taken as it comes."""
        return self.busy.value() >= PRESSED_BUSY

    def refuse_over_share(self) -> None:
        """Refuse a request whose client is over its fair share: OverShare (429,
        ``Retry-After`` = the expected drain time), counted as ``over_fair_share`` and paced
        like a 503 (at most ``SHARE_REFUSALS`` x ``refusals_per_second`` at once; past that
        held back, at most 1 s),
        so that a client resending at once cannot keep the request threads busy refusing it."""
        self._event("rejected_request", "over_fair_share")
        if self.share_pacer is not None:
            time.sleep(self.share_pacer.delay())
        raise OverShare(retry_after=max(1, math.ceil(self.drain_seconds())))

    def expected_wait(self) -> float:
        """Seconds until a new request's first batch would start: the running call's rest plus
        one full batch for every ``max_batch_size`` images admitted before it."""
        full_batches_ahead = self._waiting // self.max_batch_size
        return self._running_remaining() + full_batches_ahead * self.batch_estimate(
            self.max_batch_size)

    def drain_seconds(self) -> float:
        """Seconds until every admitted image's batch has run, as far as the estimates say."""
        batches = math.ceil(self._waiting / self.max_batch_size)
        return self._running_remaining() + batches * self.batch_estimate(self.max_batch_size)

    def batch_estimate(self, size: int) -> float:
        """Expected seconds of one call padded to ``size`` (0 while nothing was measured)."""
        bucket = next(b for b in self.buckets if b >= min(size, self.max_batch_size))
        if bucket in self._estimates:
            return self._estimates[bucket]
        if not self._estimates:
            return 0.0
        known, seconds = min(self._estimates.items(), key=lambda kv: abs(kv[0] - bucket))
        return seconds * bucket / known  # scaled from the nearest measured size

    def _running_remaining(self) -> float:
        """Expected rest of the running call. A call already past its estimate is expected to
        run as much longer again as it has overrun, so a hung model sheds new work."""
        since = self.busy_since
        if since is None:
            return 0.0
        elapsed = time.monotonic() - since
        estimate = self.batch_estimate(self._running_bucket)
        return abs(estimate - elapsed)

    def _unreserve(self, images: int, taken: bool = False) -> None:
        """Give back admitted room: unused, or (``taken``) its image went into a batch, where
        it stays in hand until its call has ended."""
        with self._lock:
            self._waiting -= images
        self._event("queue_changed", -images)
        if not taken:
            self._event("work_changed", -images)

    # -- request threads ----------------------------------------------------------------------
    def _enqueue(self, images: list[np.ndarray], timeout: float | None) -> list[np.ndarray]:
        if not images:
            return []
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        jobs = [_Job(image, deadline) for image in images]
        with self._lock:  # no job may follow close()'s _STOP: none would take it
            closed = self._closed
            if not closed:
                for job in jobs:
                    self._queue.put(job)
        if closed:  # admitted, but the worker began to stop while it decoded
            self._unreserve(len(jobs))
            raise ServiceUnavailable("the worker is shutting down")
        try:
            return [job.future.result(timeout=max(0.0, deadline - time.monotonic()))
                    for job in jobs]
        except FutureTimeout:
            for job in jobs:
                job.future.cancel()  # dropped if its batch has not started
            self._event("rejected_request", "model_timeout")
            raise ModelTimeout(f"the model did not answer within {timeout:g} s") from None

    def _event(self, name: str, *args) -> None:
        """Call hook ``name`` of ``metrics``, where it has one."""
        hook = getattr(self.metrics, name, None) if self.metrics is not None else None
        if hook is not None:
            hook(*args)

    @property
    def busy_seconds(self) -> float:
        """How long the running model call has taken so far (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since

    # -- the model thread ---------------------------------------------------------------------
    def _take(self, block: bool, timeout: float | None = None):
        """One job from the queue (its room leaves the waiting count), _STOP, or None."""
        try:
            job = self._queue.get(block, timeout)
        except queue.Empty:
            return None
        if job is not _STOP:
            self._unreserve(1, taken=True)
        return job

    def _collect(self, batch: list[_Job]) -> tuple[list[_Job], bool]:
        """Top ``batch`` up from the queue (waiting at most batch_wait); True if told to stop."""
        wait_until = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            remaining = wait_until - time.monotonic()
            job = self._take(remaining > 0, remaining if remaining > 0 else None)
            if job is None:
                break
            if job is _STOP:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        pending: list[_Job] = []
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                first = self._take(True)
                if first is _STOP:
                    return
                pending = [first]
            batch, stop = self._collect(pending) if not stopping else (pending, False)
            stopping = stopping or stop
            now = time.monotonic()
            live = [j for j in batch
                    if j.deadline > now and j.future.set_running_or_notify_cancel()]
            pending = []
            if len(live) < len(batch):
                self._event("work_changed", len(live) - len(batch))
            if not live:
                continue
            scores, error = self._compute(live)
            self._event("work_changed", -len(live))
            if not stopping:
                # Take what queued up meanwhile *before* answering: the clients answered now
                # come straight back, and must find room in the queue rather than a 503.
                pending, stopping = self._collect([]) if self.batch_wait == 0 else ([], False)
            for i, job in enumerate(live):
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(scores[i])

    def _compute(self, jobs: list[_Job]):
        """One padded model call; returns (scores, None) or (None, the error)."""
        n = len(jobs)
        size = next(b for b in self.buckets if b >= n)
        images = _padded_batch([j.image for j in jobs], size)
        self._running_bucket = size
        self.busy_since = started = time.monotonic()
        self.busy.change(True, started)
        try:
            scores = self.predict_fn(images)[:n]
        except Exception as exc:  # every waiting request must hear about it, as a 503
            log.exception("model call failed for a batch of %d", n)
            return None, ModelFailed(f"the model failed on this batch: {type(exc).__name__}")
        finally:
            self.busy_since = None
            self.busy.change(False)
        seconds = time.monotonic() - started
        old = self._estimates.get(size)
        self._estimates[size] = seconds if old is None else (1 - _EWMA) * old + _EWMA * seconds
        self._event("batch_done", n, seconds)
        return scores, None

    def close(self, timeout: float = 30.0) -> None:
        """Stop admitting requests, finish what is queued, and end the model thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)  # behind the queued jobs: they are drained first
        self._thread.join(timeout)


def _padded_batch(rows: list[np.ndarray], size: int) -> np.ndarray:
    """``rows`` (each ``[h, w, 3]``, one dtype) as one ``[size, h, w, 3]`` batch whose rows past
    them are zeros (a warmed-up shape), written in place: one copy of each row, where stacking
    and then concatenating the zero rows copied them twice (0.11 against 0.06 ms for three
    224x224 inputs padded to 4, in a thread like the model thread). Encoded images (0-d object
    arrays of bytes, a ``[size]`` batch) are padded with the first image again: a zero is not
    an image the model's decoder reads."""
    batch = np.empty((size, *rows[0].shape), rows[0].dtype)
    np.stack(rows, out=batch[:len(rows)])
    batch[len(rows):] = rows[0] if rows[0].dtype == object else 0
    return batch
