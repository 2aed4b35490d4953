"""A deadline on request bodies, so a client that trickles its upload cannot hold a thread.

gunicorn's gthread worker gives each request a thread, and the thread blocks while the app reads
the body: a client sending one byte a second would hold it for as long as it likes. This WSGI
middleware (no web framework) allows ``grace_seconds`` for the body plus one second for every
``min_rate`` bytes received (Apache's mod_reqtimeout rule ``body=10,MinRate=...``): an honest
slow upload keeps its time, a trickle is cut off. When the deadline passes during a blocked read,
a watchdog thread shuts the socket's read side (gunicorn puts it in ``environ['gunicorn.socket']``)
so the read returns at once; the request then fails with 408 ``request_timeout``. Without a
socket (development server, test client) the deadline is checked after each read.

An app can also ask for the connection to be moved to another worker after an answer
(``MOVE_CONNECTION``).

An error answered before the whole body was read (a request refused by admission, a wrong
Content-Type, a slow body) closes the connection after the response, so the server never reads
megabytes it is going to throw away; a small rest of the body (at most ``DRAIN_BYTES``) that
has already arrived is read instead and the connection kept: closing would read as much
(gunicorn drains up to 64 KiB on close), and a client resending refused requests then costs
no new connection each time.

Slow request heads and clients that do not read their answers are the worker's business
(``common/web/gunicorn_worker.py``); a buffering reverse proxy in front is still the better answer
for deployments (docs/RELIABILITY.md).
"""
from __future__ import annotations

import logging
import socket
import threading
import time

from common.errors import RequestTimeout

log = logging.getLogger(__name__)

CHUNK = 16 * 1024  # reads are split so progress (and the deadline) is updated often
DRAIN_BYTES = 64 * 1024  # the most of an unread body read to keep the connection
DRAIN_WAIT = 0.05  # seconds the rest of a small body may take to arrive
#: An app that sets this WSGI environ key to a sibling worker's pid has the connection handed to
#: that worker after its answer (``gunicorn_worker.Handoff``): the fair share moves a client out
#: of a crowded worker so. Only a connection whose request body was read to its end can move
#: (the next bytes on it are then the next request); any other is closed instead, as it is
#: where the server cannot hand connections over (no ``move_to`` on gunicorn's socket).
MOVE_CONNECTION = "classifier.move_connection"


class _Watchdog:
    """One daemon thread per process that shuts the sockets of bodies past their deadline."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self._streams: set[DeadlineStream] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, stream: "DeadlineStream") -> None:
        with self._lock:
            self._streams.add(stream)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(target=self._run, name="upload-watchdog",
                                                daemon=True)
                self._thread.start()

    def discard(self, stream: "DeadlineStream") -> None:
        with self._lock:
            self._streams.discard(stream)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            now = time.monotonic()
            with self._lock:
                late = [s for s in self._streams if s.deadline() < now]
                for stream in late:
                    self._streams.discard(stream)
            for stream in late:
                stream.expire()


class DeadlineStream:
    """Wraps ``wsgi.input``; raises RequestTimeout once the body is later than its deadline."""

    def __init__(self, stream, sock: socket.socket | None, grace_seconds: float,
                 min_rate: float, watchdog: _Watchdog):
        self._stream = stream
        self._sock = sock
        self.grace = grace_seconds
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.received = 0
        self.expired = False
        self._watchdog = watchdog
        if sock is not None:
            watchdog.add(self)

    def deadline(self) -> float:
        """Start + grace + one second per ``min_rate`` bytes received so far."""
        return self.started + self.grace + self.received / self.min_rate

    def expire(self) -> None:
        """Called by the watchdog: wake the blocked read by closing the socket's read side."""
        self.expired = True
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _late(self) -> bool:
        return self.expired or time.monotonic() > self.deadline()

    def _timeout(self) -> RequestTimeout:
        self.expired = True
        self.done()
        log.warning("request body too slow: %d bytes in %.1f s", self.received,
                    time.monotonic() - self.started)
        return RequestTimeout(
            f"the request body arrived too slowly ({self.received} bytes in "
            f"{time.monotonic() - self.started:.0f} s)")

    def _call(self, method, size: int):
        if self._late():
            raise self._timeout()
        try:
            data = method(size)
        except OSError:
            if self._late():
                raise self._timeout() from None
            raise
        self.received += len(data)
        if self._late():
            raise self._timeout()
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while True:
                part = self._call(self._stream.read, CHUNK)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        return self._call(self._stream.read, min(size, CHUNK))

    def readline(self, size: int = -1) -> bytes:
        return self._call(self._stream.readline, CHUNK if size is None or size < 0 else
                          min(size, CHUNK))

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def done(self) -> None:
        self._watchdog.discard(self)


class UploadDeadline:
    """WSGI middleware installing a DeadlineStream on every request that has a body."""

    def __init__(self, app, *, grace_seconds: float = 10.0, min_rate: float = 16 * 1024):
        self.app = app
        self.grace_seconds = grace_seconds
        self.min_rate = min_rate
        self.watchdog = _Watchdog()

    def __call__(self, environ, start_response):
        has_body = environ.get("CONTENT_LENGTH", "") not in ("", "0") or \
            "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not has_body:
            def start_bodiless(status, headers, exc_info=None):
                if not _may_stay_open(environ, True):
                    _close_after_response(start_response)
                return start_response(status, headers, exc_info)
            return self.app(environ, start_bodiless)
        stream = DeadlineStream(environ["wsgi.input"], environ.get("gunicorn.socket"),
                                self.grace_seconds, self.min_rate, self.watchdog)
        environ["wsgi.input"] = stream
        declared = _declared_length(environ)

        def start(status, headers, exc_info=None):
            if (int(status.split(" ", 1)[0]) >= 400 and not _read_to_end(stream, declared)
                    and not _drain(stream, declared, environ.get("gunicorn.socket"))):
                _close_after_response(start_response)
            elif not _may_stay_open(environ, _read_to_end(stream, declared)):  # drained, perhaps
                _close_after_response(start_response)
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, start)
        finally:
            stream.done()


def movable(environ) -> bool:
    """Whether this request's connection could be handed to another worker after the answer
    (``MOVE_CONNECTION``): HTTP/1.1 kept alive, a body of declared length if any (a chunked
    one's end is not known), and gunicorn's socket able to be handed over. Its body must also
    have been read to its end by then (:func:`_may_stay_open`), or the connection is closed."""
    return (environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
            and "close" not in environ.get("HTTP_CONNECTION", "").lower()
            and "HTTP_TRANSFER_ENCODING" not in environ
            and hasattr(environ.get("gunicorn.socket"), "move_to"))


def _may_stay_open(environ, complete: bool) -> bool:
    """Whether the connection may stay open after the answer: yes when the app asked for no
    move; when it asked (``MOVE_CONNECTION``), mark it to move if it can (its body read to its
    end, ``complete``, and gunicorn's socket able to be handed over), else no: it is closed."""
    pid = environ.get(MOVE_CONNECTION)
    if pid is None:
        return True
    sock = environ.get("gunicorn.socket")
    if not complete or not hasattr(sock, "move_to"):
        return False
    sock.move_to = pid
    return True


def _read_to_end(stream: DeadlineStream, declared: int | None) -> bool:
    return declared is not None and stream.received >= declared


def _declared_length(environ) -> int | None:
    try:
        return int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None  # chunked: the length is unknown until the last chunk


def _drain(stream: DeadlineStream, declared: int | None, sock: socket.socket | None) -> bool:
    """Read the unread rest of a body of ``declared`` bytes when it is small (``DRAIN_BYTES``)
    and arrives within ``DRAIN_WAIT`` (it is normally in the socket's buffer already); True
    when the whole body has been read, so the connection can be kept. Never for a body that
    ran out of time, or without gunicorn's socket."""
    if (sock is None or declared is None or stream.expired
            or declared - stream.received > DRAIN_BYTES):
        return False
    try:
        timeout = sock.gettimeout()
        sock.settimeout(DRAIN_WAIT)
        try:
            while stream.received < declared:
                if not stream.read(declared - stream.received):
                    return False
        finally:
            sock.settimeout(timeout)
    except (OSError, RequestTimeout):  # slow, or gone: the connection is closed instead
        return False
    return True


def _close_after_response(start_response) -> None:
    """An error answered before the body was read (a refused request, a wrong type, a slow
    body): close the connection after the response instead of reading the rest of the body to
    keep it alive. gunicorn passes its Response's bound ``start_response``, whose
    ``force_close`` does that (it then closes gracefully, draining at most 64 KiB); elsewhere
    (development server, test client) nothing happens."""
    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if callable(force_close):
        force_close()
