"""Prometheus metrics with prometheus_client, correct under several gunicorn workers.

Under gunicorn, ``gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR`` at an empty folder
before any worker starts, so prometheus_client keeps every worker's values in memory-mapped
files there and ``render()`` sums them (prometheus_client's multiprocess mode): a scrape that
lands on any worker reports the whole server. Counters of workers that died still count; gauges
are summed (or listed) over live workers only (``child_exit`` marks dead ones). Without that
variable (development server, tests in one process) each ``Metrics`` has its own registry.

No web framework here: the web layer calls ``request_started`` and ``request_done``; each served
version gets a :class:`VersionMetrics` (``Metrics.for_version``) whose hooks its batcher
(``queue_changed``, ``batch_done``, ``rejected_request``) and its ServedVersion (``model_ready``,
``model_unloaded``) call, so the model-side series carry ``model`` and ``version`` labels.
"""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from common.inference.batcher import bucket_sizes

#: The HTTP methods counted by name (RFC 9110's); any other is counted as ``other``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                     "PATCH"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MODEL_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """The service's metrics; one instance per app (per worker process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str | None = None, batch_max_size: int = 8):
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("classifier_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("classifier_request_duration_seconds",
                                 "Time from request start to response, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("classifier_requests_in_flight", "Requests being handled",
                               multiprocess_mode="livesum", registry=r)
        mv = ["model", "version"]
        self.batch_size = Histogram("classifier_batch_size", "Images per model call", mv,
                                    buckets=bucket_sizes(batch_max_size), registry=r)
        self.model_seconds = Histogram("classifier_model_call_duration_seconds",
                                       "Duration of one (batched) model call", mv,
                                       buckets=MODEL_SECONDS_BUCKETS, registry=r)
        self.queue_depth = Gauge("classifier_queue_depth",
                                 "Images waiting for the model, summed over live workers", mv,
                                 multiprocess_mode="livesum", registry=r)
        # reason: overloaded | over_fair_share | model_timeout
        self.rejected = Counter("classifier_rejected", "Requests refused by the batcher",
                                mv + ["reason"], registry=r)
        self.moved = Counter("classifier_fair_share_moves",
                             "Kept-alive connections asked to move to another worker after "
                             "the answer (a client out of a crowded worker, or one client's "
                             "connections evened between workers); one whose body was not "
                             "read to its end is closed instead", registry=r)
        self.alone = Counter("classifier_model_calls_alone",
                             "Model calls run on RUNTIME_THREADS_ALONE threads because no other "
                             "worker had work in hand when they started", registry=r)
        self.load_seconds = Gauge("classifier_model_load_seconds",
                                  "Seconds the worker took to load a model version", mv,
                                  multiprocess_mode="liveall", registry=r)
        self.warmup_seconds = Gauge("classifier_model_warmup_seconds",
                                    "Seconds the worker took to warm a model version up", mv,
                                    multiprocess_mode="liveall", registry=r)
        self.model_info = Gauge("classifier_model_info",
                                "1 for each model version a live worker serves", mv,
                                multiprocess_mode="liveall", registry=r)

    def for_version(self, model: str, version: int) -> "VersionMetrics":
        """The hooks of one served version, its series labelled ``model`` and ``version``."""
        return VersionMetrics(self, model, str(version))

    # -- hooks -----------------------------------------------------------------------------
    def request_started(self) -> None:
        self.in_flight.inc()

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """``route`` must be a route pattern (bounded cardinality), never a raw path; a method
        outside ``METHODS`` counts as ``other`` and a status outside 100-599 as ``other``, so
        no request can add a series of its own."""
        self.in_flight.dec()
        self.requests.labels(route, method if method in METHODS else "other",
                             str(status) if 100 <= status <= 599 else "other").inc()
        self.latency.labels(route).observe(seconds)

    def client_moved(self) -> None:
        self.moved.inc()

    def call_alone(self) -> None:
        self.alone.inc()

    # -- exposition ------------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition format: all workers' values in multiprocess mode."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)


class VersionMetrics:
    """One served version's hooks (batcher and ServedVersion), bound to its labels."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self.metrics = metrics
        self.labels = (model, version)

    def queue_changed(self, delta: int) -> None:
        self.metrics.queue_depth.labels(*self.labels).inc(delta)

    def batch_done(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(*self.labels).observe(size)
        self.metrics.model_seconds.labels(*self.labels).observe(seconds)

    def rejected_request(self, reason: str) -> None:
        self.metrics.rejected.labels(*self.labels, reason).inc()

    def model_ready(self, load_seconds: float, warmup_seconds: float) -> None:
        m = self.metrics
        m.load_seconds.labels(*self.labels).set(load_seconds)
        m.warmup_seconds.labels(*self.labels).set(warmup_seconds)
        m.model_info.labels(*self.labels).set(1)

    def model_unloaded(self) -> None:
        """The version is gone from this worker: its gauges read 0."""
        m = self.metrics
        for gauge in (m.model_info, m.queue_depth, m.load_seconds, m.warmup_seconds):
            gauge.labels(*self.labels).set(0)


def mark_process_dead(pid: int, multiprocess_dir: str) -> None:
    """Drop a dead worker's live gauges (gunicorn's child_exit hook)."""
    multiprocess.mark_process_dead(pid, multiprocess_dir)
