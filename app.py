"""The web service: ``create_app()`` builds it; gunicorn serves ``app:create_app()``.

Nothing is loaded or read at import time. Each gunicorn worker calls ``create_app()`` after the
fork, which starts loading the model in the background: ``/healthz`` answers at once, ``/readyz``
and ``/classify`` answer 503 until the model is loaded and warmed up. If loading fails the worker
exits with gunicorn's boot-error status and the whole server stops with a clear message.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from flask import Flask

from common import errors
from common.batching import Batcher, bucket_sizes
from common.classifier import (Classifier, ClassifierHolder, configure_tensorflow,
                               load_classifier)
from common.config import Config
from common.fetch import UrlFetcher
from common.logs import configure_logging
from common.metrics import Metrics
from common.slowclients import UploadDeadline
from common.storage import ImageStore
from common.views import InMemoryUploadRequest, bp

WORKER_BOOT_ERROR = 3  # gunicorn halts the whole server when a worker exits with this
HUNG_MODEL_EXIT = 70  # any other status: gunicorn forks a replacement worker


@dataclass
class ServiceState:
    """What the routes need, attached to the app as ``app.extensions['classifier_service']``."""

    config: Config
    holder: ClassifierHolder
    store: ImageStore
    fetcher: UrlFetcher
    metrics: Metrics
    batcher: Batcher | None = None  # set once the model is ready
    on_hung_model: Callable[[float], None] | None = None

    def start_batcher(self, classifier: Classifier) -> None:
        self.batcher = Batcher(classifier.predict, max_batch_size=self.config.batch_max_size,
                               max_wait_ms=self.config.batch_max_wait_ms,
                               max_queue=self.config.batch_queue_size,
                               timeout=self.config.request_timeout, metrics=self.metrics)
        if self.config.model_hang_timeout > 0 and self.on_hung_model is not None:
            threading.Thread(target=self._watch_model, args=(self.batcher,),
                             name="model-watchdog", daemon=True).start()

    def _watch_model(self, batcher: Batcher) -> None:
        """A model call that runs past MODEL_HANG_TIMEOUT cannot be interrupted (TensorFlow
        has no way to cancel a running op), so the worker gives itself up to be replaced."""
        limit = self.config.model_hang_timeout
        while not batcher.closed:
            time.sleep(min(1.0, limit / 4))
            if batcher.busy_seconds > limit:
                self.on_hung_model(batcher.busy_seconds)
                return

    def model_ready(self, classifier: Classifier) -> None:
        """The holder's on_ready: start batching, then publish the load and warm-up times."""
        self.start_batcher(classifier)
        self.metrics.model_ready(classifier.name, classifier.version, self.holder.load_seconds,
                                 self.holder.warmup_seconds)

    def close(self) -> None:
        """Drain the batcher (gunicorn's worker_exit hook calls this)."""
        if self.batcher is not None:
            self.batcher.close()


def create_app(config: Config | Mapping[str, Any] | None = None,
               classifier: Classifier | None = None) -> Flask:
    """Build the app.

    Args:
        config: a Config, or a mapping of Config field names to override the defaults (tests);
            None reads the environment (``Config.from_env``).
        classifier: an already loaded classifier (tests); None loads ``config.model_path`` in
            the background.
    """
    if config is None:
        config = Config.from_env(os.environ)
    elif not isinstance(config, Config):
        config = Config.from_mapping(config)
    configure_logging(config.log_level)

    app = Flask(__name__)
    app.request_class = InMemoryUploadRequest
    app.json.sort_keys = False  # "labels" keeps the ranked order
    app.config.update(
        MAX_CONTENT_LENGTH=config.max_upload_bytes + 64 * 1024,  # room for multipart framing
        MAX_FORM_MEMORY_SIZE=64 * 1024,
        MAX_FORM_PARTS=16,
    )
    store = ImageStore(config.temp_dir, max_files=config.temp_max_files,
                       max_bytes=config.temp_max_bytes)
    try:
        store.ensure()
    except OSError as exc:
        logging.getLogger(__name__).error("cannot create TEMP_DIR %s: %s", config.temp_dir, exc)
    fetcher = UrlFetcher(max_bytes=config.max_upload_bytes, timeout=config.url_fetch_timeout,
                         connect_timeout=config.url_connect_timeout,
                         max_redirects=config.url_max_redirects,
                         max_url_length=config.max_url_length,
                         allow_hosts=config.url_allow_hosts)
    holder = ClassifierHolder(classifier)
    metrics = Metrics(config.metrics_dir, batch_max_size=config.batch_max_size)
    state = ServiceState(config, holder, store, fetcher, metrics,
                         on_hung_model=None if classifier is not None else _exit_when_hung(config))
    warmup_sizes = bucket_sizes(config.batch_max_size)
    if classifier is None:
        holder.start(lambda: _load(config), warmup_batch_sizes=warmup_sizes,
                     on_failure=_exit_on_failure(config), on_ready=state.model_ready)
    else:
        holder.warmup_seconds = classifier.warm_up(warmup_sizes)
        state.model_ready(classifier)

    app.extensions["classifier_service"] = state
    errors.init_app(app)
    app.register_blueprint(bp)
    app.wsgi_app = UploadDeadline(app.wsgi_app, grace_seconds=config.upload_timeout,
                                  min_rate=config.upload_min_rate_kb * 1024)
    return app


def _load(config: Config) -> Classifier:
    configure_tensorflow(config.tf_intra_op_threads, config.tf_inter_op_threads, config.precision)
    return load_classifier(config.model_path, labels_path=config.labels_path,
                           input_layer=config.input_layer, output_layer=config.output_layer,
                           input_size=config.input_size, input_mean=config.input_mean,
                           input_std=config.input_std)


def _exit_on_failure(config: Config):
    def on_failure(exc: BaseException) -> None:
        if config.exit_on_load_failure:
            logging.getLogger(__name__).critical(
                "cannot serve without a model (MODEL_PATH=%s): %s; exiting", config.model_path, exc)
            logging.shutdown()
            os._exit(WORKER_BOOT_ERROR)
    return on_failure


def _exit_when_hung(config: Config):
    def on_hung_model(seconds: float) -> None:
        logging.getLogger(__name__).critical(
            "one model call has run %.0f s (MODEL_HANG_TIMEOUT=%g s); exiting so that gunicorn "
            "replaces this worker", seconds, config.model_hang_timeout)
        logging.shutdown()
        os._exit(HUNG_MODEL_EXIT)
    return on_hung_model


if __name__ == "__main__":  # development server; production runs gunicorn (see README)
    settings = Config.from_env(os.environ)
    create_app(settings).run(host=settings.host, port=settings.port, threaded=True)
