"""Our own HTTP API (DESIGN.md): parse the request, make one call of the DataPlane, answer
JSON. ``blueprint(dataplane)`` builds the routes and the hooks every request passes around the
DataPlane it is handed."""
from __future__ import annotations

import functools
import io
import logging
import os
import re
import time
import uuid
import zlib

from flask import (
    Blueprint,
    Request,
    Response,
    g,
    jsonify,
    render_template,
    request,
    send_file,
)

from common import errors
from common.dataplane import DataPlane, digest_b64
from common.errors import (
    CorruptEncoding,
    InvalidParameter,
    MissingImage,
    PayloadTooLarge,
    UnsupportedEncoding,
    UnsupportedMediaType,
)
from common.modelfolder import CONFUSION_MATRIX, ONNX, PUBLIC_FILES
from common.versions.manager import Route
from common.web import auth
from common.web.binding import Views
from common.web.clients import client_id

log = logging.getLogger("classifier.access")
views = Views()

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
FEEDBACK_BODY_LIMIT = 16 * 1024  # a feedback body is a few short fields


class InMemoryUploadRequest(Request):
    """Keeps multipart file parts in memory (bounded by MAX_CONTENT_LENGTH) instead of spooling
    them to the system temp folder: nothing is written outside TEMP_DIR."""

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        return io.BytesIO()


def body_bytes(limit: int | None = None) -> bytes:
    """The request body, at most ``limit`` bytes (default ``MAX_CONTENT_LENGTH``), whatever
    its transfer encoding; 413 past it. A Content-Length over the limit is refused before
    reading; a chunked body has none, and werkzeug stops reading it at the limit without a
    word, so one byte more is read and a body that has it is refused rather than used cut
    short. The body is cached for ``request.form`` and ``request.get_json``.

    A body sent with ``Content-Encoding: gzip`` or ``deflate`` is inflated (:func:`inflate`),
    the limit applying to the inflated bytes too (413 once inflating passes it, having
    inflated no more than the limit); another encoding is 415, corrupt data 400. The
    inflated body is kept for the rest of the request, so a second call inflates nothing."""
    limit = request.max_content_length if limit is None else limit
    inflated = g.get("inflated_body")
    if inflated is not None:
        if limit is not None and len(inflated) > limit:
            raise PayloadTooLarge(f"the inflated body is larger than the limit ({limit} bytes)")
        return inflated
    encoding = content_encoding()
    if limit is None:
        data = request.get_data(cache=True)
    else:
        if (request.content_length or 0) > limit:
            raise PayloadTooLarge(f"the body is larger than the limit ({limit} bytes)")
        request.max_content_length = limit + 1
        data = request.get_data(cache=True)
        if len(data) > limit:
            raise PayloadTooLarge(f"the body is larger than the limit ({limit} bytes)")
    if encoding == "identity":
        return data
    g.inflated_body = inflate(data, encoding, limit)
    return g.inflated_body


#: Content-Encodings a request body may have -> zlib's ``wbits`` for them (``deflate`` is
#: zlib-wrapped, RFC 9110; a raw deflate stream, as some clients send it, is read too).
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
             "deflate": zlib.MAX_WBITS}


#: Most bytes one step of :func:`inflate` makes: what a refused bomb costs past the limit.
INFLATE_STEP = 1 << 20


def content_encoding() -> str:
    """The request's ``Content-Encoding`` (lower case, ``identity`` when none); 415
    ``unsupported_encoding`` for anything but identity, gzip or deflate (one coding)."""
    given = request.headers.get("Content-Encoding", "").strip().lower()
    if given in ("", "identity"):
        return "identity"
    if given not in ENCODINGS:
        raise UnsupportedEncoding(f"Content-Encoding {given[:40]!r} is not supported: send "
                                  f"identity, gzip or deflate")
    return given


def inflate(data: bytes, encoding: str, limit: int | None) -> bytes:
    """A gzip (``gzip``, ``x-gzip``; members one after another) or deflate body -> its bytes,
    inflated ``INFLATE_STEP`` bytes at a time, never past what is left under ``limit`` (None:
    no limit), so that a compression bomb costs no more than ``limit`` + 1 bytes before it is
    refused (413);
    truncated or corrupt data is 400 ``corrupt_encoding``."""
    wbits = ENCODINGS[encoding]
    if encoding == "deflate" and data[:1] and (data[0] & 0x0F != 8 or
                                               int.from_bytes(data[:2], "big") % 31):
        wbits = -zlib.MAX_WBITS  # no zlib header: a raw deflate stream
    out, total, pending = [], 0, data
    try:
        while True:
            inflater = zlib.decompressobj(wbits)
            while not inflater.eof:
                room = INFLATE_STEP if limit is None else min(INFLATE_STEP, limit + 1 - total)
                chunk = inflater.decompress(pending, room)
                total += len(chunk)
                if limit is not None and total > limit:
                    raise PayloadTooLarge(f"the inflated body is larger than the limit "
                                          f"({limit} bytes)")
                out.append(chunk)
                tail = inflater.unconsumed_tail
                if not chunk and len(tail) == len(pending):
                    break  # no progress: the data ends before the stream does
                pending = tail
            if not inflater.eof:
                raise CorruptEncoding(f"the {encoding} body ends before its compressed data")
            pending = inflater.unused_data
            if not pending or wbits != ENCODINGS["gzip"]:
                break  # one deflate stream; or the last gzip member
    except zlib.error as exc:
        raise CorruptEncoding(f"the body is not valid {encoding} data ({exc})") from None
    if pending:
        raise CorruptEncoding(f"{len(pending)} bytes follow the {encoding} data")
    return b"".join(out)


def blueprint(dataplane: DataPlane) -> Blueprint:
    """Our API's routes, and the hooks every request of the app passes, over ``dataplane``."""
    bp = Blueprint("api", __name__)
    bp.before_app_request(functools.partial(_start_request, dataplane))
    bp.after_app_request(functools.partial(_finish_request, dataplane))
    return views.bind(bp, dataplane)


def _start_request(dataplane: DataPlane) -> None:
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    dataplane.metrics.request_started()


def _finish_request(dataplane: DataPlane, response: Response) -> Response:
    """One JSON log line and the metrics of every request (never any image content)."""
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    route = request.url_rule.rule if request.url_rule else "<unmatched>"
    model = g.get("model")
    response.headers["X-Request-ID"] = g.get("request_id", "-")
    dataplane.metrics.request_done(route, request.method, response.status_code, seconds)
    log.info("request", extra={
        "request_id": g.get("request_id", "-"), "method": request.method, "route": route,
        "path": request.path[:100], "status": response.status_code,
        "latency_ms": round(seconds * 1e3, 1), "bytes_in": request.content_length or 0,
        "bytes_out": response.content_length or 0,
        "model": f"{model['name']}/{model['version']}" if model else None,
        "source": g.get("source"), "key": g.get("key_name"), "worker": os.getpid(),
    })
    return response


@views.post("/classify")
@views.post("/models/<name>/classify")
@views.post("/models/<name>/versions/<int:version>/classify")
@views.post("/models/<name>/labels/<label>/classify")
def classify_upload(dataplane: DataPlane, **route):
    """Multipart field ``image`` (several ``image`` parts: one result per image), or the raw
    image as the body with an image/* Content-Type; the default model, or the model, version
    or label in the path. The body is read only once the DataPlane has admitted the request."""
    g.source = "upload"
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        read = _multipart_images
    elif mimetype.startswith("image/") or mimetype == "application/octet-stream":
        read = _body_image
    else:
        raise UnsupportedMediaType(
            f"send multipart/form-data with an 'image' field, or a raw image/* body "
            f"(got {mimetype or 'no Content-Type'})")
    answer = dataplane.classify(read, request.args, Route(**route), g.started,
                                client_id(dataplane.config.trusted_proxies))
    g.model = answer["model"]
    return jsonify(answer)


def _body_image() -> list[bytes]:
    return [body_bytes()]


def _multipart_images() -> list[bytes]:
    uploads = request.files.getlist("image")
    if not uploads:
        raise MissingImage()
    return [upload.read() for upload in uploads]


@views.get("/classify")
@views.get("/models/<name>/classify")
@views.get("/models/<name>/versions/<int:version>/classify")
@views.get("/models/<name>/labels/<label>/classify")
def classify_url(dataplane: DataPlane, **route):
    """``?image_url=`` an http(s) URL that the DataPlane's fetcher downloads under the rules in
    fetch.py."""
    g.source = "url"
    url = request.args.get("image_url")
    if url is None:
        raise InvalidParameter("give image_url=..., or POST the image as the field 'image'")
    answer = dataplane.classify(lambda: [dataplane.fetcher.fetch(url)], request.args,
                                Route(**route), g.started,
                                client_id(dataplane.config.trusted_proxies))
    g.model = answer["model"]
    return jsonify(answer)


@views.post("/feedback")
def feedback(dataplane: DataPlane):
    """The right label for an answer: a JSON object or a form with ``filename`` (from the
    classify answer) and ``label``, optionally ``model``, ``version``, ``predicted``, ``score``.
    201 when kept, 200 when this image already had this label.

    At most ``FEEDBACK_BODY_LIMIT`` bytes of the body are taken, whatever its transfer
    encoding (413 past them: :func:`body_bytes`), read like every body in one of the
    DataPlane's ``BODIES_IN_FLIGHT`` slots."""
    answer, created = dataplane.record_feedback(_feedback_fields)
    g.model = answer["model"]
    if created:  # 200: this image already had this label, nothing changed
        auth.audit("feedback_written", filename=answer.get("filename"),
                   label=answer.get("label"), model=answer["model"].get("name"),
                   version=answer["model"].get("version"), moved_from=answer.get("moved_from"))
    return jsonify(answer), 201 if created else 200


def _feedback_fields() -> dict:
    body_bytes(FEEDBACK_BODY_LIMIT)  # cached: the JSON or form is parsed from these bytes
    if request.mimetype == "application/json":
        fields = request.get_json(silent=True)
    elif request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        fields = request.form.to_dict()
    else:
        fields = None
    if not isinstance(fields, dict):
        raise InvalidParameter("send a JSON object (or a form) with 'filename' and 'label'")
    return fields


@views.get("/models")
def models(dataplane: DataPlane):
    """Every model: versions with their state and error, labels, version policy."""
    return jsonify(dataplane.models())


@views.get("/healthz")
def healthz(dataplane: DataPlane):
    return jsonify({"status": "ok"})


@views.get("/readyz")
def readyz(dataplane: DataPlane):
    return jsonify(dataplane.readiness())


@views.get("/metrics")
def metrics(dataplane: DataPlane):
    """Prometheus text format; under gunicorn the sum over all workers."""
    return Response(dataplane.metrics.render(), mimetype=None,
                    content_type=dataplane.metrics.content_type)


@views.get("/openapi.json")
def openapi(dataplane: DataPlane):
    """The OpenAPI 3 document of this API (common/openapi.json)."""
    return send_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "openapi.json"),
                     mimetype="application/json", max_age=300)


@views.get("/model")
def model_info(dataplane: DataPlane):
    """The loaded model: name, version, labels, metrics and its evaluation summary if any."""
    return jsonify(dataplane.model_summary())


@views.get("/model/confusion_matrix.png")
def confusion_matrix(dataplane: DataPlane):
    return send_file(dataplane.model_file(CONFUSION_MATRIX),
                     mimetype=PUBLIC_FILES[CONFUSION_MATRIX], max_age=300)


@views.get("/model/model.onnx")
def model_onnx(dataplane: DataPlane):
    """The verified model.onnx for onnxruntime-web (the page's in-browser mode): cached, with
    its SHA-256 as ETag and Repr-Digest (the page checks it as Subresource Integrity)."""
    path, sha256 = dataplane.onnx_file()
    response = send_file(path, mimetype=PUBLIC_FILES[ONNX], max_age=86400, etag=sha256)
    response.headers["Repr-Digest"] = f"sha-256=:{digest_b64(sha256)}:"
    return response


@views.get("/")
def index(dataplane: DataPlane):
    return render_template("index.html", model=dataplane.model.describe(),
                           feedback=dataplane.feedback.enabled,
                           max_upload_mb=dataplane.config.max_upload_mb,
                           error_messages=errors.catalogue())
