"""gunicorn's gthread worker, answering gunicorn's own protocol errors with the JSON envelope.

A request line over ``limit_request_line``, too many or too large header fields, a malformed
request line or header never reach the app: gunicorn answers them itself, by default with an
HTML page. This worker answers them like every other error of the service, with the envelope and
classes of ``common/errors.py``. Everything else is gunicorn's (``gunicorn.conf.py`` names this
class).
"""
from __future__ import annotations

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from . import errors

# gunicorn's client-error exceptions -> our error class; first match wins.
_CLIENT_ERRORS = [
    (http_errors.LimitRequestLine, errors.UriTooLong),
    (http_errors.LimitRequestHeaders, errors.HeadersTooLarge),
    (http_errors.ExpectationFailed, errors.ExpectationFailed),
    (http_errors.UnsupportedTransferCoding, errors.NotImplementedByServer),
    ((http_errors.InvalidRequestLine, http_errors.InvalidRequestMethod,
      http_errors.InvalidHTTPVersion, http_errors.InvalidHeader, http_errors.InvalidHeaderName,
      http_errors.ObsoleteFolding, http_errors.InvalidSchemeHeaders,
      http_errors.InvalidChunkSize, http_errors.ChunkMissingTerminator,
      http_errors.InvalidChunkExtension), errors.MalformedRequest),
]


class JsonErrorWorker(ThreadWorker):
    """gthread with JSON bodies for the errors gunicorn answers before the app sees a request."""

    def handle_error(self, req, client, addr, exc):
        for classes, error_class in _CLIENT_ERRORS:
            if isinstance(exc, classes):
                self.log.warning("invalid request from %s: %s", (addr or ("",))[0], exc)
                try:
                    util.write(client, errors.wire_response(error_class()))
                except OSError:
                    self.log.debug("failed to send error response")
                return
        super().handle_error(req, client, addr, exc)
