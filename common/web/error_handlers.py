"""Errors leaving the service: the one place an ``ApiError`` becomes an HTTP response.

``init_app`` installs the app-wide handler, writing the envelope of ``common.errors``, or on
any ``/v1`` or ``/v2`` path (routed or not: an unknown route, a method a route does not take)
the protocols' ``{"error": "<message>"}``; a protocol's blueprint installs the same handler
with its own envelope (``install_handler(bp, "message")``: TF Serving and the Open Inference
Protocol answer ``{"error": "<message>"}``). werkzeug's own HTTP errors are mapped onto the
hierarchy; anything unexpected is logged with the request id and answered 500 without details.
``wire_response`` writes the same envelope straight to a socket, for the gunicorn worker's
refusals of malformed requests.
"""
from __future__ import annotations

import logging

from common.errors import ApiError, MethodNotAllowed, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)


def wire_response(err: ApiError) -> bytes:
    """A complete HTTP/1.1 response carrying the envelope, for code that writes to a socket
    itself (gunicorn's protocol errors); the connection closes after it."""
    body = err.body()
    reason = _REASONS.get(err.status, "Error")
    return (f"HTTP/1.1 {err.status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode("latin-1") + body


_REASONS = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long",
            417: "Expectation Failed", 431: "Request Header Fields Too Large",
            501: "Not Implemented"}


# werkzeug's HTTPException codes that map onto our own classes; others keep werkzeug's status.
_HTTP_EXCEPTION_MAP = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}


def from_http_exception(exc) -> ApiError:
    """Turn a werkzeug HTTPException into an ApiError with the same status and headers."""
    cls = _HTTP_EXCEPTION_MAP.get(exc.code)
    headers = {k: v for k, v in exc.get_headers() if k.lower() not in ("content-type",)}
    if cls is not None:
        return cls(headers=headers)
    err = ApiError(exc.description or exc.name, headers=headers)
    err.status = exc.code or 500
    err.code = (exc.name or "error").lower().replace(" ", "_")
    return err


#: How an ApiError is written on the wire, by protocol: our own API's envelope, and the one of
#: TensorFlow Serving's REST API and of the Open Inference Protocol (KServe v2), which both
#: answer ``{"error": "<message>"}``. The status and headers (Retry-After) are the same in all.
ENVELOPES = {
    "api": ApiError.to_dict,
    "message": lambda err: {"error": err.message},
}


def as_api_error(exc: BaseException) -> ApiError:
    """Any exception a request raised -> the ApiError to answer with: ApiErrors as they are,
    werkzeug's HTTP errors mapped, anything else logged (with the request id) and answered 500
    without details."""
    from werkzeug.exceptions import HTTPException

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, HTTPException):
        return from_http_exception(exc)
    from flask import g
    log.exception("unhandled error in request %s", getattr(g, "request_id", "-"))
    return ApiError()


#: Paths whose errors take the protocols' shape (``"message"``), routed or not.
PROTOCOL_PREFIXES = ("/v1/", "/v2/")


def envelope_for(path: str) -> str:
    """The envelope an error on ``path`` is written in, for code that answers before a route
    is chosen (request hooks: keys, CORS): the protocols' on ``/v1`` and ``/v2`` paths."""
    return "message" if path in ("/v1", "/v2") or path.startswith(PROTOCOL_PREFIXES) else "api"


def render(err: ApiError, envelope: str = "api"):
    """``err`` as a Flask response in ``ENVELOPES[envelope]``, with its status and headers."""
    from flask import jsonify

    response = jsonify(ENVELOPES[envelope](err))
    response.status_code = err.status
    for key, value in err.headers.items():
        response.headers[key] = value
    return response


def install_handler(target, envelope: str = "api") -> None:
    """Install the error handler on a Flask app (every route) or a blueprint (its routes
    only, e.g. a standard protocol's), writing errors as ``ENVELOPES[envelope]``."""
    ENVELOPES[envelope]  # noqa: B018 - an unknown envelope fails here, not per request

    def handle(exc):
        return render(as_api_error(exc), envelope)

    target.register_error_handler(Exception, handle)


def init_app(app) -> None:
    """Install the app-wide error handler: every error leaves as our API's envelope, except on
    the routes of a blueprint that installs its own (the protocols': ``install_handler``) and
    on any other ``/v1`` or ``/v2`` path, routed or not (:func:`envelope_for`): an unknown
    route (404), a method a route does not take (405) or an error before routing there is
    answered ``{"error": "<message>"}``, as TF Serving's and Triton's clients read it."""
    from flask import request

    def handle(exc):
        return render(as_api_error(exc), envelope_for(request.path))

    app.register_error_handler(Exception, handle)

