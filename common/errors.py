"""One error hierarchy for the whole service, and the one handler that renders it.

Every error a client can cause is an ``ApiError`` subclass that carries its HTTP status and a
stable machine-readable ``code``; the engine modules raise them without knowing about HTTP
frameworks. ``init_app`` installs the only error handler, which renders the envelope

    {"error": {"code": "...", "message": "...", "status": 415}}

for ApiErrors, for werkzeug's own HTTP errors (404, 405, 413 ...) and, without details, for
anything unexpected (logged with the request id, answered 500).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Base of every error the API answers with; subclasses set ``status`` and ``code``."""

    status = 500
    code = "internal_error"
    message = "internal server error"

    def __init__(self, message: str | None = None, *, headers: dict | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


class BadRequest(ApiError):
    status, code, message = 400, "bad_request", "the request is malformed"


class MissingImage(BadRequest):
    code, message = "missing_image", "send the image as the multipart field 'image'"


class EmptyImage(BadRequest):
    code, message = "empty_image", "the uploaded image is empty"


class InvalidParameter(BadRequest):
    code = "invalid_parameter"


class InvalidUrl(BadRequest):
    code = "invalid_url"


class ForbiddenUrl(ApiError):
    status, code, message = 403, "forbidden_url", "that address is not allowed"


class NotFound(ApiError):
    status, code, message = 404, "not_found", "no such route"


class MethodNotAllowed(ApiError):
    status, code, message = 405, "method_not_allowed", "method not allowed on this route"


class RequestTimeout(ApiError):
    status, code, message = 408, "request_timeout", "the request body arrived too slowly"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"Connection": "close"})


class PayloadTooLarge(ApiError):
    status, code, message = 413, "payload_too_large", "the upload is larger than the limit"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"
    message = "the upload is not an image Pillow can read"


class UndecodableImage(ApiError):
    status, code, message = 422, "undecodable_image", "the image is truncated or corrupt"


class UpstreamError(ApiError):
    status, code, message = 502, "upstream_error", "the remote server failed"


class UpstreamTimeout(ApiError):
    status, code, message = 504, "upstream_timeout", "the remote server timed out"


class ServiceUnavailable(ApiError):
    status, code, message = 503, "unavailable", "the service is unavailable"

    def __init__(self, message: str | None = None, *, retry_after: int = 1,
                 headers: dict | None = None):
        super().__init__(message, headers={"Retry-After": str(retry_after), **(headers or {})})


class ModelNotReady(ServiceUnavailable):
    code, message = "model_not_ready", "the model is still loading"


class Overloaded(ServiceUnavailable):
    code, message = "overloaded", "the service is overloaded, retry later"


class ModelTimeout(ServiceUnavailable):
    code, message = "model_timeout", "the model did not answer in time"


class StorageUnavailable(ServiceUnavailable):
    code, message = "storage_unavailable", "the image store is not writable"


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


def init_app(app) -> None:
    """Install the single error handler on a Flask app."""
    from flask import g, jsonify
    from werkzeug.exceptions import HTTPException

    def render(err: ApiError):
        response = jsonify(err.to_dict())
        response.status_code = err.status
        for key, value in err.headers.items():
            response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def handle(exc):  # the one handler: every error leaves through here
        if isinstance(exc, ApiError):
            return render(exc)
        if isinstance(exc, HTTPException):
            return render(from_http_exception(exc))
        log.exception("unhandled error in request %s", getattr(g, "request_id", "-"))
        return render(ApiError())
