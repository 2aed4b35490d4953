"""HTTP routes: parse the request, call a plain function, answer JSON. Nothing else lives here."""
from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid

from flask import (Blueprint, Request, Response, current_app, g, jsonify, render_template,
                   request, send_file)

from . import service
from .errors import (InvalidParameter, MissingImage, ModelNotReady, ModelTimeout, NotFound,
                     UnsupportedMediaType)

log = logging.getLogger("classifier.access")
bp = Blueprint("api", __name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class InMemoryUploadRequest(Request):
    """Keeps multipart file parts in memory (bounded by MAX_CONTENT_LENGTH) instead of spooling
    them to the system temp folder: nothing is written outside TEMP_DIR."""

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        return io.BytesIO()


def _state():
    return current_app.extensions["classifier_service"]


@bp.before_app_request
def _start_request():
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    _state().metrics.request_started()


@bp.after_app_request
def _finish_request(response):
    """One JSON log line and the metrics of every request (never any image content)."""
    state = _state()
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule else "<unmatched>"
    clf = state.holder.classifier
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    state.metrics.request_done(route, request.method, response.status_code, seconds)
    log.info("request", extra={
        "request_id": g.get("request_id", "-"), "method": request.method, "route": route,
        "path": request.path[:100], "status": response.status_code,
        "latency_ms": round(seconds * 1e3, 1), "bytes_in": request.content_length or 0,
        "bytes_out": response.content_length or 0,
        "model": f"{clf.name}/{clf.version}" if clf else None, "source": g.get("source"),
        "worker": os.getpid(),
    })
    return response


def _classifier():
    clf = _state().holder.classifier
    if clf is None:
        raise ModelNotReady()
    return clf


def _classify(data: bytes):
    state = _state()
    clf = _classifier()
    options = service.parse_options(request.args, state.config.top_k)
    body = service.classify_bytes(data, classifier=clf, store=state.store, options=options,
                                  max_pixels=state.config.max_image_pixels, started=g.started,
                                  predict=state.batcher.predict)
    return jsonify(body)


@bp.post("/classify")
def classify_upload():
    """Multipart field ``image``, or the raw image as the body with an image/* Content-Type."""
    g.source = "upload"
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        upload = request.files.get("image")
        if upload is None:
            raise MissingImage()
        data = upload.read()
    elif mimetype.startswith("image/") or mimetype == "application/octet-stream":
        data = request.get_data(cache=False)
    else:
        raise UnsupportedMediaType(
            f"send multipart/form-data with an 'image' field, or a raw image/* body "
            f"(got {mimetype or 'no Content-Type'})")
    return _classify(data)


@bp.get("/classify")
def classify_url():
    """``?image_url=`` an http(s) URL that the service downloads under the rules in fetch.py."""
    g.source = "url"
    url = request.args.get("image_url")
    if url is None:
        raise InvalidParameter("give image_url=..., or POST the image as the field 'image'")
    _classifier()  # refuse before downloading when the model is not ready
    service.parse_options(request.args)  # validate before downloading
    return _classify(_state().fetcher.fetch(url))


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    holder = _state().holder
    clf = holder.classifier
    if clf is None:
        if holder.state == "failed":
            raise ModelNotReady(f"the model failed to load: {holder.error}")
        raise ModelNotReady()
    batcher, limit = _state().batcher, _state().config.request_timeout
    if batcher is not None and batcher.busy_seconds > limit:  # a hung model call
        raise ModelTimeout(f"one model call has been running for {batcher.busy_seconds:.0f} s "
                           f"(REQUEST_TIMEOUT is {limit:g} s)")
    return jsonify({"status": "ready", "model": clf.describe(), "labels": len(clf.labels),
                    "input_size": list(clf.input_size)})


@bp.get("/metrics")
def metrics():
    """Prometheus text format; under gunicorn the sum over all workers."""
    return Response(_state().metrics.render(), mimetype=None,
                    content_type=_state().metrics.content_type)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 document of this API (common/openapi.json)."""
    return send_file(os.path.join(os.path.dirname(__file__), "openapi.json"),
                     mimetype="application/json", max_age=300)


@bp.get("/model")
def model_info():
    """The loaded model: name, version, labels, metrics and its evaluation summary if any."""
    return jsonify(service.model_summary(_classifier()))


@bp.get("/model/confusion_matrix.png")
def confusion_matrix():
    path = service.report_file(_classifier(), "confusion_matrix.png")
    if path is None:
        raise NotFound("this model has no confusion matrix picture")
    return send_file(path, mimetype="image/png", max_age=300)


@bp.get("/")
def index():
    clf = _state().holder.classifier
    return render_template("index.html", model=clf.describe() if clf else None,
                           max_upload_mb=_state().config.max_upload_mb)
