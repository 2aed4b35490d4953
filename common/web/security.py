"""HTTP-level safety of every answer, on the Flask side: ``init_app(app, config)``.

- **Headers on every answer**: ``X-Content-Type-Options: nosniff``, ``Referrer-Policy:
  no-referrer``, ``X-Frame-Options: DENY`` and a Content-Security-Policy: the page's allows
  scripts, styles and connections to this origin only (no inline script, ``'wasm-unsafe-eval'``
  for onnxruntime-web's WebAssembly) and no framing; every other answer gets ``default-src
  'none'``.
- **Subresource Integrity**: the sha384 of every script and stylesheet under ``static/``,
  computed once at start-up; the page's template reads it with ``integrity(filename)``.
- **No redirect built from Host**: werkzeug's slash-merging redirect is off and any other
  routing redirect is answered 404, so no answer carries a ``Location`` naming another host.
- **Host allowlist** (``ALLOWED_HOSTS``, against DNS rebinding): a request to a route whose
  ``Host`` is not allowed is answered 400, except the probes, which Kubernetes sends with the
  pod's IP; a path no route matches is 404 whatever the ``Host``.
- **Cross-site posts refused** (CSRF): a browser's post to a state-changing route from another
  origin is answered 403, unless ``CORS_ORIGINS`` allows that origin (``cors.py``); a request
  with neither ``Origin`` nor ``Sec-Fetch-Site`` is not a browser's and passes.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from urllib.parse import urlsplit

from flask import Flask, Response, request
from werkzeug.routing import RequestRedirect

from common.config import Config
from common.errors import CrossSiteRequest, HostNotAllowed, NotFound
from common.web.cors import Origins

#: The page: everything from this origin only; onnxruntime-web compiles its .wasm
#: ('wasm-unsafe-eval'), the preview shows the picked file as an object URL (blob:).
PAGE_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self' 'wasm-unsafe-eval'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
#: Every other answer (JSON, pictures, scripts) loads nothing and is never framed.
ANSWER_POLICY = "default-src 'none'; frame-ancestors 'none'"

#: Kubernetes' probes send the pod's IP as Host: the allowlist does not apply to them.
PROBES = frozenset({"/healthz", "/readyz"})
#: Routes that change state on the server: a browser may post to them only from this origin.
SAME_ORIGIN_ONLY = frozenset({"/feedback"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
INTEGRITY_SUFFIXES = (".js", ".mjs", ".css")


def init_app(app: Flask, config: Config) -> None:
    """Install the hooks. Call it after the blueprints are registered: its checks then run
    after the routes' request hook (``routes._start_request``), so a refused request is still
    counted and logged."""
    app.url_map.merge_slashes = False  # its 308 would name the client's Host
    hosts = HostAllowlist(config.allowed_hosts, loopback_only=is_loopback(config.host))
    origins = Origins(config.cors_origins)
    scripts = static_integrity(app.static_folder)
    app.jinja_env.globals["integrity"] = lambda filename: scripts.get(filename, "")

    @app.before_request
    def _check_request() -> None:
        if isinstance(request.routing_exception, RequestRedirect):
            raise NotFound()
        if request.routing_exception is not None:
            return  # no route: its 404 or 405 answers, naming nothing whatever the Host
        if request.path not in PROBES and not hosts.allows(request.host):
            raise HostNotAllowed()
        if (request.path in SAME_ORIGIN_ONLY and request.method not in SAFE_METHODS
                and is_cross_site(request.headers, request.host)
                and not origins.allows(request.headers.get("Origin"))):
            raise CrossSiteRequest()

    @app.after_request
    def _security_headers(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Content-Security-Policy",
                           PAGE_POLICY if response.mimetype == "text/html" else ANSWER_POLICY)
        return response


def static_integrity(folder: str | None) -> dict[str, str]:
    """``{"app.js": "sha384-...", "vendor/onnxruntime-web/ort.wasm.min.js": ...}`` for every
    script and stylesheet under ``folder``: the browser refuses a file that differs."""
    found: dict[str, str] = {}
    for root, _, files in os.walk(folder or ""):
        for name in files:
            if name.endswith(INTEGRITY_SUFFIXES):
                path = os.path.join(root, name)
                with open(path, "rb") as fh:
                    digest = base64.b64encode(hashlib.sha384(fh.read()).digest()).decode()
                found[os.path.relpath(path, folder).replace(os.sep, "/")] = f"sha384-{digest}"
    return found


def hostname(host: str) -> str | None:
    """``"Example.com:8000"`` -> ``"example.com"``, ``"[::1]:80"`` -> ``"::1"``; None when
    malformed or empty (werkzeug gives ``request.host`` as ``""`` for invalid characters)."""
    try:
        return urlsplit("//" + host).hostname or None
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip(name: str):
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostAllowlist:
    """Which ``Host`` names the service answers to.

    With entries (``ALLOWED_HOSTS``): a name equal to one, a subdomain of one written with a
    leading dot (``.example.com``), an IP address inside one given as an address or network, or
    anything for ``*``. Without entries, on a loopback ``HOST``: any name that DNS rebinding
    cannot use, i.e. an IP address, ``localhost`` and ``*.localhost``, or a name without a dot
    (public DNS names, which an attacker can point at 127.0.0.1, all have one). Otherwise any.
    """

    def __init__(self, entries: tuple[str, ...], loopback_only: bool):
        self.any = "*" in entries or not (entries or loopback_only)
        self.loopback_only = not entries and loopback_only
        self.networks, self.names = [], []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.append(entry)

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        name = hostname(host)
        if name is None:
            return False
        address = _ip(name)
        if self.loopback_only:
            return address is not None or "." not in name or name.endswith(".localhost")
        if address is not None:
            return any(address in network for network in self.networks)
        return any(name == entry or (entry.startswith(".") and name.endswith(entry))
                   for entry in self.names)


def is_cross_site(headers, host: str) -> bool:
    """True for a browser's request from another origin: ``Sec-Fetch-Site`` other than
    ``same-origin``/``none``, or an ``Origin`` (``null`` included) whose host and port are not
    this request's ``Host``. The scheme is not compared: behind a TLS proxy the page is https
    while the proxied request is http."""
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = headers.get("Origin")
    return origin is not None and not _same_host(origin, host)


def _same_host(origin: str, host: str) -> bool:
    try:
        theirs = urlsplit(origin)
        ours = urlsplit("//" + host)
        default = DEFAULT_PORTS.get(theirs.scheme)
        return (default is not None and theirs.hostname is not None
                and theirs.hostname == ours.hostname
                and (theirs.port or default) == (ours.port or default))
    except ValueError:  # a malformed port or address
        return False
