"""gunicorn's gthread worker, answering gunicorn's own protocol errors with the JSON envelope.

A request line over ``limit_request_line``, too many or too large header fields, a malformed
request line or header never reach the app: gunicorn answers them itself, by default with an
HTML page. This worker answers them like every other error of the service:
``{"error": {"code": ..., "message": ..., "status": ...}}`` with ``Content-Type:
application/json``. Everything else is gunicorn's (``gunicorn.conf.py`` names this class).
"""
from __future__ import annotations

import json

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

# gunicorn's client-error exceptions -> (status, reason, code, message); first match wins.
_CLIENT_ERRORS = [
    (http_errors.LimitRequestLine, 414, "URI Too Long", "uri_too_long",
     "the request line (URL) is too long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large",
     "headers_too_large", "too many or too large header fields"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation_failed",
     "unsupported Expect header"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "not_implemented",
     "unsupported Transfer-Encoding"),
    ((http_errors.InvalidRequestLine, http_errors.InvalidRequestMethod,
      http_errors.InvalidHTTPVersion, http_errors.InvalidHeader, http_errors.InvalidHeaderName,
      http_errors.ObsoleteFolding, http_errors.InvalidSchemeHeaders,
      http_errors.InvalidChunkSize, http_errors.ChunkMissingTerminator,
      http_errors.InvalidChunkExtension), 400, "Bad Request", "bad_request",
     "malformed HTTP request"),
]


def error_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying the JSON error envelope; the connection closes."""
    body = json.dumps({"error": {"code": code, "message": message, "status": status}})
    return (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode("latin-1")


class JsonErrorWorker(ThreadWorker):
    """gthread with JSON bodies for the errors gunicorn answers before the app sees a request."""

    def handle_error(self, req, client, addr, exc):
        for classes, status, reason, code, message in _CLIENT_ERRORS:
            if isinstance(exc, classes):
                self.log.warning("invalid request from %s: %s", (addr or ("",))[0], exc)
                try:
                    util.write(client, error_response(status, reason, code, message))
                except OSError:
                    self.log.debug("failed to send error response")
                return
        super().handle_error(req, client, addr, exc)
