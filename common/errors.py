"""One error hierarchy for the whole service. No web framework here.

Every error a client can cause is an ``ApiError`` subclass that carries its HTTP status and a
stable machine-readable ``code``; the engine modules raise them without knowing about HTTP
frameworks. Each error knows its envelope

    {"error": {"code": "...", "message": "...", "status": 415}}

(``to_dict``, ``body``); ``common.web.error_handlers`` renders it as an HTTP response, maps
werkzeug's own HTTP errors (404, 405, 413 ...) onto this hierarchy and answers anything
unexpected with 500. ``catalogue()`` gives every code's words for a person (the web page).
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Base of every error the API answers with; subclasses set ``status`` and ``code``."""

    status = 500
    code = "internal_error"
    message = "internal server error"
    #: The same in plain words for a person (the web page shows it; ``catalogue()``).
    plain = "Something went wrong on our side."

    def __init__(self, message: str | None = None, *, headers: dict | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = dict(headers or {})

    def to_dict(self) -> dict:
        """The one error envelope of the API."""
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}

    def body(self) -> bytes:
        """The envelope as the bytes of a JSON response body."""
        return json.dumps(self.to_dict()).encode("utf-8")


class BadRequest(ApiError):
    status, code, message = 400, "bad_request", "the request is malformed"
    plain = "The request was not understood."


class MissingImage(BadRequest):
    code, message = "missing_image", "send the image as the multipart field 'image'"
    plain = "No image was sent."


class EmptyImage(BadRequest):
    code, message = "empty_image", "the uploaded image is empty"
    plain = "That file is empty."


class InvalidParameter(BadRequest):
    code, plain = "invalid_parameter", "The request had a bad setting."


class InvalidUrl(BadRequest):
    code = "invalid_url"
    plain = ("That does not look like a web address. Use one that starts with http:// or "
             "https://.")


class ForbiddenUrl(ApiError):
    status, code, message = 403, "forbidden_url", "that address is not allowed"
    plain = "That address is not allowed. Use a public http(s) address."


class Unauthorized(ApiError):
    """No API key, or one the server does not know (API_KEYS, API_KEYS_FILE)."""

    status, code, message = 401, "unauthorized", "an API key is needed"
    plain = "This service needs an API key."

    def __init__(self, message: str | None = None, *, headers: dict | None = None):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="classifier"',
                                           **(headers or {})})


class InvalidKey(Unauthorized):
    code, message = "invalid_key", "the API key is not valid"
    plain = "The API key was not accepted."


class ScopeForbidden(ApiError):
    status, code, message = 403, "forbidden_scope", "the API key's scopes do not cover this route"
    plain = "Your API key is not allowed to do this."


class NotFound(ApiError):
    status, code, message = 404, "not_found", "no such route"
    plain = "That was not found."


class ModelNotFound(NotFound):
    code, message = "model_not_found", "no such model, version or label"
    plain = "That model is not served here."


class InvalidFilename(BadRequest):
    code, message = "invalid_filename", "filename must be a name a classify answer gave"
    plain = "That is not the name of a picture this service gave."


class ImageNotFound(NotFound):
    code, message = "image_not_found", "no such stored image"
    plain = ("That picture is no longer kept here (only recent uploads are). Classify it "
             "again, then send your answer.")


class InvalidLabel(BadRequest):
    code, message = "invalid_label", "the label cannot be used"
    plain = "That label cannot be used."


class UnknownLabel(InvalidLabel):
    code, message = "unknown_label", "the label is not one of the model's labels"
    plain = "That label is not one of the model's labels."


class FeedbackDisabled(ApiError):
    status, code, message = 403, "feedback_disabled", "feedback is switched off (FEEDBACK_DIR)"
    plain = "This server does not take answers back."


class FeedbackFull(ApiError):
    status, code, message = 507, "feedback_full", "the feedback folder is full"
    plain = ("The feedback folder is full, so your answer was not kept. The people who run "
             "this service need to retrain and make room.")


class HostNotAllowed(BadRequest):
    code, message = "host_not_allowed", "this server does not answer to that Host (ALLOWED_HOSTS)"
    plain = "This server does not answer to that address."


class CrossSiteRequest(ApiError):
    status, code = 403, "cross_site_request"
    message = "a post from another site is refused on this route"
    plain = "That request came from another website, so it was refused."


class OriginNotAllowed(ApiError):
    status, code = 403, "origin_not_allowed"
    message = "cross-origin requests from this origin are not allowed (CORS_ORIGINS)"
    plain = "This website is not allowed to use the service."


class TooManyImages(BadRequest):
    code = "too_many_images"
    plain = "Too many images in one request."


class MethodNotAllowed(ApiError):
    status, code, message = 405, "method_not_allowed", "method not allowed on this route"
    plain = "That kind of request is not allowed here."


class RequestTimeout(ApiError):
    status, code, message = 408, "request_timeout", "the request body arrived too slowly"
    plain = "The upload was too slow. Check your connection and try again."

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"Connection": "close"})


class PayloadTooLarge(ApiError):
    status, code, message = 413, "payload_too_large", "the upload is larger than the limit"
    plain = "That file is too big. Try a smaller one."


class ImageTooLarge(PayloadTooLarge):
    code, plain = "image_too_large", "That image has too many pixels. Try a smaller one."


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"
    message = "the upload is not an image Pillow can read"
    plain = "That file is not an image. Try a JPEG, PNG, GIF, BMP, WebP or TIFF."


class UnsupportedEncoding(UnsupportedMediaType):
    code = "unsupported_encoding"
    message = "the body's Content-Encoding is not one of identity, gzip or deflate"
    plain = "The request was compressed in a way this service does not read."


class CorruptEncoding(BadRequest):
    code, message = "corrupt_encoding", "the compressed body is truncated or corrupt"
    plain = "The compressed request was damaged or incomplete."


class UndecodableImage(ApiError):
    status, code, message = 422, "undecodable_image", "the image is truncated or corrupt"
    plain = "That image is damaged or incomplete, so it could not be read."


class UpstreamError(ApiError):
    status, code, message = 502, "upstream_error", "the remote server failed"
    plain = "The other website did not give us the image."


class UpstreamTimeout(ApiError):
    status, code, message = 504, "upstream_timeout", "the remote server timed out"
    plain = "The other website took too long to answer."


class ServiceUnavailable(ApiError):
    status, code, message = 503, "unavailable", "the service is unavailable"
    plain = "The service is not available right now. Try again in a moment."

    def __init__(self, message: str | None = None, *, retry_after: int = 1,
                 headers: dict | None = None):
        super().__init__(message, headers={"Retry-After": str(retry_after), **(headers or {})})


class OverShare(ServiceUnavailable):
    """429: under overload, this client holds more than its fair share of the queue (a
    refusal to retry later, as the 503s, with ``Retry-After``)."""

    status, code, message = 429, "over_fair_share", \
        "you have more requests waiting than your share while the service is busy; retry later"
    plain = "You are sending more than your share while the service is busy. Try again shortly."


class ModelNotReady(ServiceUnavailable):
    code, message = "model_not_ready", "the model is still loading"
    plain = "The model is still starting. Try again in a moment."


class Overloaded(ServiceUnavailable):
    code, message = "overloaded", "the service is overloaded, retry later"
    plain = "The service is busy right now. Try again in a moment."


class ModelTimeout(ServiceUnavailable):
    code, message = "model_timeout", "the model did not answer in time"
    plain = "The model is taking too long right now. Try again in a moment."


class StorageUnavailable(ServiceUnavailable):
    code, message = "storage_unavailable", "the image store is not writable"
    plain = "The service cannot store images right now. Try again later."


class ModelFailed(ServiceUnavailable):
    code, message = "model_error", "the model failed on this request"
    plain = "The model failed on this image. Try again, or try another image."


# Errors gunicorn answers before the app sees a request (common/web/gunicorn_worker.py).
class UriTooLong(ApiError):
    status, code, message = 414, "uri_too_long", "the request line (URL) is too long"
    plain = "That address is too long."


class HeadersTooLarge(ApiError):
    status, code, message = 431, "headers_too_large", "too many or too large header fields"
    plain = "The request's headers are too large."


class ExpectationFailed(ApiError):
    status, code, message = 417, "expectation_failed", "unsupported Expect header"


class NotImplementedByServer(ApiError):
    status, code, message = 501, "not_implemented", "unsupported Transfer-Encoding"


class MalformedRequest(BadRequest):
    message = "malformed HTTP request"


def catalogue() -> dict[str, str]:
    """Every error code -> its text in plain words (the web page shows these)."""
    found, todo = {}, [ApiError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls.plain)
        todo.extend(cls.__subclasses__())
    return found


