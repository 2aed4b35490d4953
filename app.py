"""The web service: ``create_app()`` builds it; gunicorn serves ``app:create_app()``.

Nothing is loaded or read at import time. Each gunicorn worker calls ``create_app()`` after the
fork, which starts loading the model in the background: ``/healthz`` answers at once, ``/readyz``
and ``/classify`` answer 503 until the model is loaded and warmed up. If loading fails the worker
exits with gunicorn's boot-error status and the whole server stops with a clear message.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

from flask import Flask

from common.audit import Audit
from common.config import Config
from common.dataplane import DataPlane
from common.fetch import UrlFetcher
from common.inference.classifier import Classifier
from common.inference.loader import RuntimeOptions, load_classifier, load_starts_threads
from common.keys import KeyRing
from common.logs import configure_logging
from common.machine import worker_seat
from common.metrics import Metrics
from common.storage import ImageStore
from common.versions.manager import Manager
from common.web import auth, cors, error_handlers, routes
from common.web import clients as web_clients
from common.web import security as web_security
from common.web.deadlines import UploadDeadline
from common.web.protocols import kserve, repository, tfserving
from common.web.routes import InMemoryUploadRequest

WORKER_BOOT_ERROR = 3  # gunicorn halts the whole server when a worker exits with this
HUNG_MODEL_EXIT = 70  # any other status: gunicorn forks a replacement worker


def create_app(config: Config | Mapping[str, Any] | None = None,
               classifier: Classifier | Callable[[], Classifier] | None = None) -> Flask:
    """Build the app.

    Args:
        config: a Config, or a mapping of Config field names to override the defaults (tests);
            None reads the environment (``Config.from_env``).
        classifier: a loaded classifier, or a zero-argument callable that loads one in the
            background (tests); None serves ``MODEL_REPOSITORY``'s models (or the one model
            ``MODEL_PATH`` names), loaded in the background and kept in step with the disk.
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
        MAX_FORM_PARTS=max(16, config.max_images_per_request + 8),
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
    metrics = Metrics(config.metrics_dir, batch_max_size=config.batch_max_size)
    keys = KeyRing.from_config(config)  # a malformed API_KEYS(_FILE) stops here, before loading
    trail = Audit.from_config(config)
    own_model = classifier is None
    seat = worker_seat()
    if seat is not None:
        seat.on_alone = metrics.call_alone
    options = RuntimeOptions.from_config(config, seat=seat)
    manager = Manager(
        config, lambda folder: load_classifier(folder, options), metrics=metrics,
        may_lower=lambda folder: not load_starts_threads(folder, options),
        on_failure=_exit_on_failure(config) if own_model else None,
        on_hung=_exit_when_hung(config) if own_model else None,
        classifier=classifier, audit=trail).start()

    dataplane = DataPlane(config, manager, store, fetcher, metrics).attach(app)
    error_handlers.init_app(app)
    app.register_blueprint(routes.blueprint(dataplane))
    app.register_blueprint(tfserving.blueprint(dataplane))  # TF Serving's REST API, /v1
    app.register_blueprint(kserve.blueprint(dataplane))  # Open Inference Protocol (KServe v2)
    app.register_blueprint(repository.blueprint(dataplane))  # /v2/repository (admin scope)
    web_security.init_app(app, config)  # after the blueprints: see its docstring
    cors.init_app(app, config)  # preflights answered before any key is asked for
    auth.init_app(app, config, keys, trail)  # API keys and scopes (off without keys)
    # crowded workers move their clients
    web_clients.init_app(app, dataplane.share, dataplane.metrics, config.trusted_proxies)
    app.wsgi_app = UploadDeadline(app.wsgi_app, grace_seconds=config.upload_timeout,
                                  min_rate=config.upload_min_rate_kb * 1024)
    return app


def _exit_on_failure(config: Config):
    """The manager's on_failure for an essential source (``MODEL_PATH``): with
    ``EXIT_ON_LOAD_FAILURE`` the worker exits with the boot-error status, which stops gunicorn
    with the load error in the log."""
    def on_failure(exc: BaseException) -> None:
        if config.exit_on_load_failure:
            logging.getLogger(__name__).critical(
                "cannot serve without a model (MODEL_PATH=%s): %s; exiting", config.model_path, exc)
            logging.shutdown()
            os._exit(WORKER_BOOT_ERROR)
    return on_failure


def _exit_when_hung(config: Config):
    """Every served version's on_hung: the worker exits so that gunicorn replaces it."""
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
