"""What every RPC of our services passes through, as a gRPC server interceptor (``Calls``):
the gRPC side of what ``common/web/routes.py``'s request hooks, ``auth.py`` and
``error_handlers.py`` do for HTTP.

For each unary RPC of a method in ``scopes`` (the others, health and unknown methods, pass
untouched):

1. the request id: metadata ``x-request-id`` when it looks like one, else a new one; sent back
   in the trailing metadata;
2. the API key (when ``API_KEYS``/``API_KEYS_FILE`` is set and the method needs a scope):
   metadata ``authorization: Bearer <key>`` or ``x-api-key: <key>``, checked by
   ``KeyRing.authenticate``; missing or unknown -> ``UNAUTHENTICATED``, without the scope ->
   ``PERMISSION_DENIED``; each refusal an audit record (``key_rejected``), never the key;
3. the request message parsed here (the method's handler takes raw bytes), so a malformed one is
   ``INVALID_ARGUMENT`` instead of gRPC's own ``INTERNAL``;
4. the servicer runs with :func:`current` telling it the client for the fair share, by
   ``common/clients.py``'s rules as for HTTP (``key:<name>``, or ``addr:<ip>``: the peer, or
   from a peer in ``TRUSTED_PROXIES`` the ``x-forwarded-for`` metadata's client; an IPv6
   address by its /64);
5. an ``ApiError`` becomes its status code (:data:`STATUS_CODES`) with the message as details
   and ``error-code`` (and for a refusal to retry, ``retry-after`` in seconds) in the trailing
   metadata; anything else is logged with the request id and answered ``INTERNAL`` without
   details;
6. one JSON access-log line (logger ``classifier.access``, as HTTP's) and the request metrics,
   labelled by the method's full name (a fixed set: only registered methods get here), method
   ``POST`` (gRPC's HTTP/2 method) and the HTTP status the error carries (200 when OK).
"""
from __future__ import annotations

import contextvars
import functools
import ipaddress
import logging
import os
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping

import grpc

from common.audit import Audit
from common.errors import ApiError, BadRequest, InvalidKey, ScopeForbidden, Unauthorized
from common.clients import client_address, client_name, networks
from common.keys import KeyRing
from common.keys import presented_key as read_key
from common.metrics import Metrics

log = logging.getLogger("classifier.access")
errors_log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

#: HTTP status of an ``ApiError`` -> the gRPC status code it is answered with.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 414: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED, 431: grpc.StatusCode.INVALID_ARGUMENT,
    501: grpc.StatusCode.UNIMPLEMENTED, 502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
#: Our codes answered otherwise than their HTTP status says: a refusal to take more work now
#: (admission by expected wait, the decoding budget, feedback at capacity) is the client's
#: RESOURCE_EXHAUSTED with ``retry-after``, as the fair share's 429; the other 503s (a
#: version loading or failed, a model that hung) stay UNAVAILABLE.
CODE_STATUSES = {"overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Call:
    """The RPC being handled: its id, the key's name (None when keys are off), the client for
    the fair share, and what the access log says about the model that served it."""

    request_id: str
    key_name: str | None = None
    client: str | None = None
    model: dict | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict)

    def note(self, classifier, source: str) -> None:
        """The version that served this RPC and the protocol's name, for the access log."""
        self.model = classifier.describe()
        self.source = source


_current: contextvars.ContextVar[Call] = contextvars.ContextVar("rpc_call")


def current() -> Call:
    """The RPC this thread is handling (set by :class:`Calls` around the servicer)."""
    return _current.get()


def presented_key(metadata: Mapping[str, list[str]]) -> tuple[str | None, str | None]:
    """The key gRPC metadata (lower-case names) carries, by :func:`common.keys.presented_key`'s
    rules: one ``authorization: Bearer <key>`` or one ``x-api-key: <key>``."""
    return read_key(metadata.get("authorization", []), metadata.get("x-api-key", []))


def peer_address(peer: str) -> str:
    """gRPC's peer (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, percent-encoded or not) ->
    the address; ``"-"`` for anything else (a Unix socket)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return "-"
    host = urllib.parse.unquote(rest).rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "-"
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class Calls(grpc.ServerInterceptor):
    """The interceptor: ``scopes`` maps each full method name (``/package.Service/Method``)
    this server answers to the key scope it needs (None: open, like the health probes)."""

    def __init__(self, scopes: Mapping[str, str | None], keys: KeyRing, metrics: Metrics,
                 audit: Audit | None = None, trusted_proxies: tuple[str, ...] = ()):
        self.scopes: dict[str, str | None] = {}
        self._services: set[str] = set()
        self.serve(scopes)
        self.keys = keys
        self.metrics = metrics
        self.audit = audit
        self.trusted = networks(tuple(trusted_proxies))
        self.trusted_proxies = tuple(trusted_proxies)

    def serve(self, scopes: Mapping[str, str | None]) -> None:
        """Add a service's methods and their scopes."""
        self.scopes.update(scopes)
        self._services = {method.rsplit("/", 1)[0] for method in self.scopes}

    def intercept_service(self, continuation, details):
        if details.method not in self.scopes:
            if details.method.rsplit("/", 1)[0] in self._services:
                return None  # a method of our services we do not serve: UNIMPLEMENTED
            return continuation(details)  # health, and unknown services (UNIMPLEMENTED)
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            functools.partial(self._handle, details.method, handler),
            request_deserializer=None, response_serializer=handler.response_serializer)

    def _handle(self, method: str, handler, raw: bytes, context: grpc.ServicerContext):
        started = time.perf_counter()
        metadata: dict[str, list[str]] = {}
        for name, value in context.invocation_metadata() or ():
            if isinstance(value, str):
                metadata.setdefault(name.lower(), []).append(value)
        given = (metadata.get("x-request-id") or [""])[0]
        call = Call(given if _REQUEST_ID.match(given) else uuid.uuid4().hex)
        peer = peer_address(context.peer())
        forwarded = metadata.get("x-forwarded-for", [])
        address = client_address(peer, forwarded, self.trusted)  # as the logs name it
        token = _current.set(call)
        self.metrics.request_started()
        status, code, response = 200, grpc.StatusCode.OK, None
        trailing = [("x-request-id", call.request_id)]
        try:
            call.key_name = self._check_key(method, metadata, address, call)
            call.client = client_name(call.key_name, peer, forwarded, self.trusted_proxies)
            request = parse(handler.request_deserializer, raw)
            response = handler.unary_unary(request, context)
            context.set_trailing_metadata(trailing)
            return response
        except ApiError as err:
            status = err.status
            code = CODE_STATUSES.get(err.code) or STATUS_CODES.get(status,
                                                                  grpc.StatusCode.INTERNAL)
            trailing.append(("error-code", err.code))
            if "Retry-After" in err.headers:
                trailing.append(("retry-after", err.headers["Retry-After"]))
            context.set_trailing_metadata(trailing)
            context.abort(code, err.message)
        except Exception:
            status, code = 500, grpc.StatusCode.INTERNAL
            errors_log.exception("unexpected error in %s", method,
                                 extra={"request_id": call.request_id})
            context.set_trailing_metadata(trailing)
            context.abort(code, "internal server error")
        finally:
            _current.reset(token)
            self._finish(method, call, status, code, started, len(raw),
                         response.ByteSize() if response is not None else 0)

    def _check_key(self, method: str, metadata: dict, address: str, call: Call) -> str | None:
        """The key's name, or None when keys are off or the method is open; raises 401/403."""
        scope = self.scopes[method]
        if scope is None or not self.keys.enabled:
            return None
        key, problem = presented_key(metadata)
        if problem == "missing":
            self._refuse(Unauthorized("an API key is needed: send the metadata authorization: "
                                      "Bearer <key> or x-api-key: <key>"),
                         problem, method, address, call)
        entry = self.keys.authenticate(key)  # None for a malformed key too, after the same work
        if entry is None:
            self._refuse(InvalidKey(), problem or "unknown", method, address, call)
        if not entry.allows(scope):
            self._refuse(ScopeForbidden(f"this method needs a key with the {scope!r} scope"),
                         "scope", method, address, call, entry.name)
        return entry.name

    def _refuse(self, err: ApiError, reason: str, method: str, address: str, call: Call,
                name: str | None = None):
        if self.audit is not None:
            self.audit.rejected(key=name, client=address, request_id=call.request_id,
                                reason=reason, method="POST", path=method[:100])
        raise err

    def _finish(self, method: str, call: Call, status: int, code: grpc.StatusCode,
                started: float, bytes_in: int, bytes_out: int) -> None:
        seconds = time.perf_counter() - started
        self.metrics.request_done(method, "POST", status, seconds)
        model = call.model
        log.info("request", extra={
            "request_id": call.request_id, "method": "POST", "route": method,
            "path": method[:100], "status": status, "grpc_status": code.name,
            "latency_ms": round(seconds * 1e3, 1), "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "model": f"{model['name']}/{model['version']}" if model else None,
            "source": call.source, "key": call.key_name, "worker": os.getpid(),
        })


def parse(deserialize: Callable[[bytes], object] | None, raw: bytes):
    """The request message, or 400 (``INVALID_ARGUMENT``) when the bytes are not one."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception:  # protobuf's DecodeError, or a RuntimeWarning-free parse failure
        raise BadRequest("the request is not a valid protobuf message of this method's "
                         "request type") from None
