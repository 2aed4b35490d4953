"""One served model version: its classifier, batcher, health and hang watchdog, built, warmed up
and closed together. No web framework here.

Its health is one value, :class:`Health`, computed from what the unit holds: ``loading`` until
the model is loaded and warmed up, then ``ready``; ``hung`` while one model call has run longer
than ``REQUEST_TIMEOUT``; ``failed`` with the reason when loading failed; ``stopped`` once closed.
``/readyz``, gunicorn's ``post_worker_init`` and the watchdog all read it.
"""
from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np

from common.config import Config
from common.errors import ModelNotReady, ModelTimeout, ServiceUnavailable
from common.inference.batcher import Batcher, Ticket, bucket_sizes, efficient_batch_size
from common.inference.classifier import Classifier

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    HUNG = "hung"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Health:
    """A served version's health: its state, why (for ``failed`` and ``hung``), and how long the
    running model call has taken so far (0 when idle)."""

    state: State
    reason: str | None = None
    busy_seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def error(self) -> ServiceUnavailable | None:
        """The 503 a request gets from a version in this state (None when ready)."""
        if self.state is State.READY:
            return None
        if self.state is State.HUNG:
            return ModelTimeout(self.reason)
        if self.state is State.FAILED:
            return ModelNotReady(f"the model failed to load: {self.reason}")
        if self.state is State.STOPPED:
            return ServiceUnavailable("the worker is shutting down")
        return ModelNotReady()


@dataclass(frozen=True)
class Running:
    """What a ready version holds; set in one assignment, so readers never see half of it."""

    classifier: Classifier
    batcher: Batcher


class Statistics:
    """One served version's inference statistics, the counters of the Open Inference
    Protocol's statistics extension (``common/oip.py`` writes them in Triton's shape).

    Counted in this process only: under gunicorn each worker counts the requests it served.
    Per request (one :class:`TimedTicket`, from its lease to its answer): ``success`` or
    ``fail`` (count, total ns), and for a success ``compute_input`` (lease to the model queue:
    decoding and preprocessing), ``queue`` and ``compute_infer`` (in the model queue: the
    model call that answered it, the rest waiting; a request whose images spanned several
    calls counts the last one as its compute time) and ``compute_output`` (the answer to the
    release: ranking). Per model call (the batcher's ``batch_done``): ``execution_count``,
    ``inference_count`` (images) and, by its batch size, the calls and their ns.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        #: The last model call's duration (ns), read by the request it answered.
        self.last_batch_ns = 0
        self._durations: dict[str, list[int]] = {}
        self._batches: dict[int, list[int]] = {}

    def batch_done(self, size: int, seconds: float) -> None:
        """One model call of ``size`` images (not counting padding) that took ``seconds``."""
        ns = int(seconds * 1e9)
        with self._lock:
            self.execution_count += 1
            self.inference_count += size
            self.last_batch_ns = ns
            entry = self._batches.setdefault(size, [0, 0])
            entry[0] += 1
            entry[1] += ns

    def request_done(self, ok: bool, **durations_ns: int) -> None:
        """One request answered (``ok``) or failed, with its durations in ns by Triton's
        names (``success``/``fail``, ``queue``, ``compute_input``, ...)."""
        with self._lock:
            if ok:
                self.last_inference_ms = int(time.time() * 1000)
            for key, ns in durations_ns.items():
                entry = self._durations.setdefault(key, [0, 0])
                entry[0] += 1
                entry[1] += max(0, int(ns))

    def snapshot(self) -> dict:
        """``{"inference_count", "execution_count", "last_inference" (ms since the epoch, 0
        before the first), "durations": {name: {"count", "ns"}}, "batches": {size: (count,
        ns)}}``, read under one lock."""
        with self._lock:
            return {"inference_count": self.inference_count,
                    "execution_count": self.execution_count,
                    "last_inference": self.last_inference_ms,
                    "durations": {k: {"count": c, "ns": ns}
                                  for k, (c, ns) in self._durations.items()},
                    "batches": {size: (c, ns) for size, (c, ns) in self._batches.items()}}


class TimedTicket:
    """A :class:`~common.inference.batcher.Ticket` that times its request for
    :class:`Statistics`: made when the request is admitted, submitted once its images are
    preprocessed, released when the request ends (the lease's exit), answered or not."""

    def __init__(self, ticket: Ticket, statistics: Statistics):
        self._ticket = ticket
        self._statistics = statistics
        self._admitted = time.perf_counter_ns()
        self._submitted: int | None = None
        self._answered: int | None = None
        self._infer_ns = 0
        self._counted = False

    @property
    def left(self) -> int:
        return self._ticket.left

    def submit(self, images: list[np.ndarray], timeout: float | None = None) -> list[np.ndarray]:
        """As :meth:`Ticket.submit` (each image as the model takes it -> its ``[labels]``
        scores), timed."""
        self._submitted = time.perf_counter_ns()
        scores = self._ticket.submit(images, timeout)
        self._answered = time.perf_counter_ns()
        self._infer_ns = self._statistics.last_batch_ns if images else 0
        return scores

    def release(self) -> None:
        """Give back the room not used, and count the request (once)."""
        self._ticket.release()
        if self._counted:
            return
        self._counted = True
        now = time.perf_counter_ns()
        if self._answered is None:  # failed: preprocessing, the model, or its deadline
            self._statistics.request_done(False, fail=now - self._admitted)
            return
        waited = self._answered - self._submitted
        infer = min(self._infer_ns, waited)
        self._statistics.request_done(
            True, success=now - self._admitted, compute_input=self._submitted - self._admitted,
            queue=waited - infer, compute_infer=infer, compute_output=now - self._answered)

    def __enter__(self) -> "TimedTicket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class CountingBatcher(Batcher):
    """A :class:`~common.inference.batcher.Batcher` whose tickets are timed and whose model
    calls are counted in ``statistics``, its images in hand on the worker's ``seat`` (if any);
    the metrics hooks, if any, still get every event they have."""

    def __init__(self, predict_fn, *, statistics: Statistics, metrics=None, seat=None,
                 **settings):
        self.statistics = statistics
        super().__init__(predict_fn, metrics=_Hooks(statistics, metrics, seat), **settings)

    def admit(self, images: int = 1) -> TimedTicket:
        return TimedTicket(super().admit(images), self.statistics)


class _Hooks:
    """The batcher's event hooks: ``batch_done`` counted in the statistics, ``work_changed``
    on the worker's seat (if any: ``Classifier.seat``), every other event passed on to the
    version's metrics hooks (none: dropped)."""

    def __init__(self, statistics: Statistics, metrics, seat=None):
        self._statistics = statistics
        self._metrics = metrics
        self._seat = seat

    def batch_done(self, size: int, seconds: float) -> None:
        self._statistics.batch_done(size, seconds)
        if self._metrics is not None:
            self._metrics.batch_done(size, seconds)

    def work_changed(self, delta: int) -> None:
        if self._seat is not None:
            self._seat.in_hand(delta)

    def __getattr__(self, name: str):
        if self._metrics is None:
            return lambda *args: None
        return getattr(self._metrics, name)


class ServedVersion:
    """Loads a classifier (in the background when given a loader), warms it up, batches it.

    Args:
        source: a loaded Classifier, or a zero-argument callable that loads one (run in a
            background thread by :meth:`start`).
        config: batching and timeout settings (``BATCH_*``, ``REQUEST_TIMEOUT``,
            ``MODEL_HANG_TIMEOUT``).
        metrics: ``common.metrics.Metrics`` (or None); the version's series are labelled with
            its name and version once loaded.
        on_failure: called with the exception when loading fails.
        on_hung: called with the seconds of a model call that ran past ``MODEL_HANG_TIMEOUT``
            (None: no watchdog).
        identity: ``(name, version)`` the version is served as (the source's model name and
            version number); None keeps the classifier's own, and the version is number 1 (a
            classifier given in memory).
        turn: a context manager held while the version loads and warms up (the manager's
            ``load_turn`` for a roll-out: under gunicorn, one worker loads at a time).
        apart: load and warm up in a thread of its own (the manager's, for a roll-out: its
            source may lower that thread's priority, ``LOAD_NICE``).
    """

    def __init__(self, source: Classifier | Callable[[], Classifier], config: Config, *,
                 metrics=None, on_failure: Callable[[BaseException], None] | None = None,
                 on_hung: Callable[[float], None] | None = None,
                 identity: tuple[str, int] | None = None,
                 turn: Callable[[], ContextManager] = contextlib.nullcontext,
                 apart: bool = False):
        self._source = source
        self._turn = turn
        self._apart = apart
        self.identity = identity
        self.version_metrics = None  # the metrics hooks labelled with this version, once loaded
        self._holds = 0  # leases (and lookups about to lease) not yet finished
        self._holds_lock = threading.Lock()
        self.config = config
        self.metrics = metrics
        self.on_failure = on_failure
        self.on_hung = on_hung
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        #: This worker's inference statistics of this version (the statistics extension).
        self.statistics = Statistics()
        self._running: Running | None = None
        self._error: str | None = None
        self._stopped = False
        self._settled = threading.Event()  # set once loading ended, either way

    # -- life cycle -----------------------------------------------------------------------------
    def start(self, background: bool = True) -> "ServedVersion":
        """Load (unless given a classifier), warm up, start batching; in a thread if asked."""
        if background and not isinstance(self._source, Classifier):
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        else:
            self._load()
        return self

    def _load(self) -> None:
        try:
            with self._turn():
                if self._stopped:  # retired while it waited for its turn
                    return
                clf = (_in_own_thread(self._load_and_warm_up) if self._apart
                       else self._load_and_warm_up())
            if self.metrics is not None:
                self.version_metrics = self.metrics.for_version(clf.name, clf.version)
            batch_size = efficient_batch_size(clf.batch_seconds, self.config.batch_max_size)
            batcher = CountingBatcher(
                clf.predict, statistics=self.statistics, max_batch_size=batch_size,
                batch_wait_ms=self.config.batch_max_wait_ms,
                max_queue=self.config.queue_limit(clf.image_bytes(self.config.max_upload_bytes)),
                max_wait_ms=self.config.queue_max_wait_ms,
                refusals_per_second=self.config.max_refusals_per_second,
                timeout=self.config.request_timeout, batch_seconds=clf.batch_seconds,
                metrics=self.version_metrics, seat=clf.seat)
            if self._stopped:  # retired while it loaded
                batcher.close()
                return
            self._running = Running(clf, batcher)
            if self.version_metrics is not None:
                self.version_metrics.model_ready(self.load_seconds, self.warmup_seconds)
            log.info("model %s v%s ready: loaded in %.2f s, warmed up in %.2f s; batches of up "
                     "to %d (BATCH_MAX_SIZE %d: larger batches measured no faster)", clf.name,
                     clf.version, self.load_seconds, self.warmup_seconds, batch_size,
                     self.config.batch_max_size)
            if self.on_hung is not None and self.config.model_hang_timeout > 0:
                threading.Thread(target=self._watch, name="model-watchdog", daemon=True).start()
        except BaseException as exc:  # report every failure; the process must not limp on
            self._error = str(exc) or type(exc).__name__
            log.critical("model failed to load: %s", self._error)
            if self.on_failure is not None:
                self.on_failure(exc)
        finally:
            self._settled.set()

    def _load_and_warm_up(self) -> Classifier:
        """The classifier, loaded (unless given) and warmed up. With ``apart`` it runs in a
        thread of its own, which the source may lower in priority (``LOAD_NICE``): the
        batcher's model thread is started after, by the thread that waits for this one, so it
        keeps normal priority."""
        t0 = time.perf_counter()
        clf = self._source if isinstance(self._source, Classifier) else self._source()
        if self.identity is not None:
            clf.name, clf.version = self.identity
        self.load_seconds = time.perf_counter() - t0
        self.warmup_seconds = clf.warm_up(bucket_sizes(self.config.batch_max_size))
        return clf

    def _watch(self) -> None:
        """A model call running past MODEL_HANG_TIMEOUT cannot be interrupted (TensorFlow has
        no way to cancel a running op), so the worker gives itself up to be replaced."""
        limit = self.config.model_hang_timeout
        while True:
            time.sleep(min(1.0, limit / 4))
            health = self.health()
            if health.state is State.STOPPED:
                return
            if health.state is State.HUNG and health.busy_seconds > limit:
                self.on_hung(health.busy_seconds)
                return

    def close(self) -> None:
        """Stop taking requests and answer what is queued (gunicorn's worker_exit)."""
        self._stopped = True
        running = self._running
        if running is not None:
            running.batcher.close()
        if self.version_metrics is not None and running is not None:
            self.version_metrics.model_unloaded()

    def hold(self) -> None:
        """Count one request that has found this version and is about to be admitted (the
        manager calls it under its lock, so :meth:`retire` never misses one; the request's
        :class:`~common.versions.manager.Lease` calls :meth:`unhold`)."""
        with self._holds_lock:
            self._holds += 1

    def unhold(self) -> None:
        with self._holds_lock:
            self._holds -= 1

    def retire(self, patience: float) -> None:
        """Unload gracefully: wait (at most ``patience`` seconds) until every request that
        holds this version has been answered, then close it and drop the classifier so its
        memory can go. The caller has already stopped routing new requests here."""
        deadline = time.monotonic() + patience
        while self._holds > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._holds > 0:
            log.warning("unloading %s with %d requests still holding it", self.identity,
                        self._holds)
        self.close()
        self._running = None
        self._source = None

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> Health:
        """The one value every reader of this version's health uses."""
        running = self._running
        if self._stopped:
            return Health(State.STOPPED)
        if self._error is not None:
            return Health(State.FAILED, self._error)
        if running is None:
            return Health(State.LOADING)
        busy = running.batcher.busy_seconds
        if busy > self.config.request_timeout:
            return Health(State.HUNG, f"one model call has been running for {busy:.0f} s "
                                      f"(REQUEST_TIMEOUT is {self.config.request_timeout:g} s)",
                          busy)
        return Health(State.READY, busy_seconds=busy)

    def wait(self, timeout: float | None = None) -> Health:
        """Block until loading has ended (or ``timeout``); returns the health then."""
        self._settled.wait(timeout)
        return self.health()

    # -- serving --------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The number this version is served and routed as."""
        return self.identity[1] if self.identity else 1

    @property
    def classifier(self) -> Classifier:
        """The loaded classifier; ModelNotReady (503) while loading or after a failure."""
        running = self._running
        if running is None:
            raise self.health().error() or ModelNotReady()
        return running.classifier

    def describe(self) -> dict | None:
        """``{"name", "version"}`` once loaded, else None."""
        running = self._running
        return running.classifier.describe() if running else None

    def running(self) -> Running:
        """The classifier and batcher a request is served with; the 503 of a version that is
        not ready (loading, failed, stopped)."""
        running = self._running
        if running is None or self._stopped:
            raise self.health().error() or ModelNotReady()
        return running


def _in_own_thread(work: Callable[[], Classifier]) -> Classifier:
    """``work()`` run in a new thread, waited for; its exception is raised here. A daemon
    thread, not ``concurrent.futures``': that module joins its threads at exit, so a hung load
    would hold up the worker's exit."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = work()
        except BaseException as exc:  # handed to the waiting thread, which reports it
            out["error"] = exc

    thread = threading.Thread(target=run, name="model-loader-apart", daemon=True)
    thread.start()
    thread.join()
    error = out.pop("error", None)
    if error is not None:
        try:
            raise error
        finally:  # no cycle through this frame: a failed load's objects go at once
            error = None
    return out["value"]
