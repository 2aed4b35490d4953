"""Cross-origin requests from browsers (CORS), for the origins ``CORS_ORIGINS`` lists only:
``init_app(app, config)``.

- **Preflight** (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``), before any
  key is asked for: from an allowed origin 204 with ``Access-Control-Allow-Origin: <that
  origin>``, the methods, the request headers the API and the protocols take
  (``ALLOW_HEADERS``) and ``Access-Control-Max-Age``; from any other origin (or with
  ``CORS_ORIGINS`` empty) 403 ``origin_not_allowed`` in the route's envelope, without any
  ``Access-Control-Allow-*`` header, so the browser stops there and the developer reads why.
- **Actual requests** from an allowed origin get ``Access-Control-Allow-Origin`` and
  ``Access-Control-Expose-Headers`` (``EXPOSE_HEADERS``), errors included, so the page can
  read a 401 or 429. Never ``*``, never ``Access-Control-Allow-Credentials``: keys travel in a
  header, not a cookie. With ``CORS_ORIGINS`` set every answer says ``Vary: Origin``.
- A post from an allowed origin passes the cross-site refusal of ``security.py``.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, request

from common.config import Config
from common.errors import OriginNotAllowed
from common.web.error_handlers import envelope_for, render

ALLOW_METHODS = "GET, HEAD, POST, OPTIONS"
ALLOW_HEADERS = ("Authorization, X-API-Key, Content-Type, Content-Encoding, "
                 "Inference-Header-Content-Length, X-Request-ID")
EXPOSE_HEADERS = ("X-Request-ID, Retry-After, Inference-Header-Content-Length, "
                  "WWW-Authenticate, Repr-Digest")
MAX_AGE = "600"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise(origin: str | None) -> str | None:
    """``HTTPS://App.Example:443/`` -> ``https://app.example``; None when not an http(s)
    origin (``null`` included)."""
    if not origin or len(origin) > 300:
        return None
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    shown_port = "" if port in (None, _DEFAULT_PORTS[parts.scheme]) else f":{port}"
    return f"{parts.scheme}://{host}{shown_port}"


class Origins:
    """The allowlist of ``CORS_ORIGINS`` (exact origins; ``*`` is refused by the config)."""

    def __init__(self, origins: tuple[str, ...]):
        self.allowed = frozenset(filter(None, (normalise(o) for o in origins)))

    def __bool__(self) -> bool:
        return bool(self.allowed)

    def allows(self, origin: str | None) -> bool:
        return normalise(origin) in self.allowed


def is_preflight() -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def init_app(app: Flask, config: Config) -> None:
    """Install the hooks; before ``auth.init_app``, so that a preflight is answered before a
    key is asked for."""
    origins = Origins(config.cors_origins)

    @app.before_request
    def _preflight():
        if not is_preflight() or request.routing_exception is not None:
            return None  # an unknown path's preflight is its 404
        if not origins.allows(request.headers.get("Origin")):
            return render(OriginNotAllowed(), envelope_for(request.path))
        response = Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        response.headers["Access-Control-Max-Age"] = MAX_AGE
        return response

    @app.after_request
    def _allow_origin(response: Response) -> Response:
        if not origins:
            return response
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origins.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = normalise(origin)
            if not is_preflight():
                response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response
