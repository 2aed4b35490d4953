"""API keys on the Flask side: ``init_app(app, config)`` installs the check every request
passes, after the request id is set (``routes._start_request``), the Host and cross-site
checks (``security.py``) and CORS preflights (``cors.py``).

Off when neither ``API_KEYS`` nor ``API_KEYS_FILE`` is set. Otherwise a request presents its
key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (one of them, once), and the
key's scopes must cover the path (:func:`scope_for`): a missing key is 401 ``unauthorized``, a
malformed or unknown one 401 ``invalid_key`` (both with ``WWW-Authenticate``), a key without
the scope 403 ``forbidden_scope``; in the protocols' ``{"error": "..."}`` on ``/v1`` and
``/v2`` paths, routed or not, and our envelope elsewhere. Every refusal of a presented or
missing key is an audit record (``key_rejected``, rate-limited), with the key's name when it
was known, the client address and the request id; the key itself goes nowhere.

For the code after it the check sets ``g.key_name`` (the key's name; None when keys are off
or the path is open) and ``g.client`` (the client address, ``X-Forwarded-For`` believed only
from ``TRUSTED_PROXIES``).
"""
from __future__ import annotations


from flask import Flask, current_app, g, request

from common.audit import Audit
from common.config import Config
from common.errors import ApiError, InvalidKey, ScopeForbidden, Unauthorized
from common.keys import KeyRing
from common.keys import presented_key as keys_presented
from common.web.clients import request_address
from common.web.cors import is_preflight
from common.web.error_handlers import envelope_for, render

#: Open whatever the keys: the probes, the page and what it loads (so it can load and ask
#: for a key), and the API's description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/",
                        "/openapi.json", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
#: Paths (exact, or a prefix ending in ``/``) that need a scope other than ``classify``, the
#: scope of everything else (our classify and model routes, both protocols' inference and
#: metadata, and unknown paths, so that a path's existence is not told without a key).
SCOPED = (("/feedback", "feedback"), ("/v2/repository/", "admin"), ("/v2/repository", "admin"),
          ("/review/", "admin"), ("/review", "admin"), ("/admin/", "admin"))
_INVALID = {"WWW-Authenticate": 'Bearer realm="classifier", error="invalid_token"'}


def scope_for(path: str, metrics_auth: bool = False) -> str | None:
    """The scope ``path`` needs; None when it is open. ``/metrics`` needs ``metrics`` with
    ``METRICS_AUTH`` and is open without."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None
    if path == "/metrics":
        return "metrics" if metrics_auth else None
    for prefix, scope in SCOPED:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return scope
    return "classify"


def presented_key(headers) -> tuple[str | None, str | None]:
    """The key a request's headers carry, by :func:`common.keys.presented_key`'s rules."""
    return keys_presented(headers.getlist("Authorization"), headers.getlist("X-API-Key"))


def audit(event: str, **details) -> None:
    """One audit record for this request (its key's name, client address and request id)."""
    trail = current_app.extensions.get("audit")
    if trail is not None:
        trail.record(event, key=g.get("key_name"), client=g.get("client"),
                     request_id=g.get("request_id"), **details)


def init_app(app: Flask, config: Config, keys: KeyRing | None = None,
             trail: Audit | None = None) -> KeyRing:
    """Install the check (after ``security.init_app`` and ``cors.init_app``); returns the key
    ring, which raises ``KeyConfigError`` here when API_KEYS or API_KEYS_FILE is malformed."""
    keys = keys if keys is not None else KeyRing.from_config(config)
    trail = trail if trail is not None else Audit.from_config(config)
    app.extensions["keyring"] = keys
    app.extensions["audit"] = trail

    def refuse(err: ApiError, reason: str, name: str | None = None):
        trail.rejected(key=name, client=g.client, request_id=g.get("request_id"),
                       reason=reason, method=request.method, path=request.path[:100])
        return render(err, envelope_for(request.path))

    @app.before_request
    def _check_key():
        g.key_name = None
        g.client = request_address(config.trusted_proxies)
        if not keys.enabled or is_preflight():
            return None
        scope = scope_for(request.path, config.metrics_auth)
        if scope is None:
            return None
        key, problem = presented_key(request.headers)
        if problem == "missing":
            return refuse(Unauthorized("an API key is needed: send Authorization: Bearer "
                                       "<key> or X-API-Key: <key>"), problem)
        entry = keys.authenticate(key)  # None for a malformed key too, after the same work
        if entry is None:
            return refuse(InvalidKey(headers=_INVALID), problem or "unknown")
        g.key_name = entry.name
        if not entry.allows(scope):
            return refuse(ScopeForbidden(f"this route needs a key with the {scope!r} scope"),
                          "scope", entry.name)
        return None

    return keys
