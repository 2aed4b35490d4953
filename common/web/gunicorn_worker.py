"""gunicorn's gthread worker, hardened against slow clients, answering gunicorn's own protocol
errors with the JSON envelope.

gthread hands each readable connection to one of ``THREADS`` request threads, which then reads
the request line and headers, and later writes the answer, with blocking calls; and its main
loop closes each finished connection "gracefully", waiting up to 2 s for the client to close its
side. So a few dozen clients could hold every thread by sending half a request, or by not
reading a large answer, and could stall the main loop by not closing. This worker keeps threads
for complete requests and the main loop never waits on a client:

* **Request heads are read in the main loop** (non-blocking) until the blank line that ends
  them; only then does the connection go to a thread, with the bytes read so far handed to
  gunicorn's parser. A head must be complete within ``HEADER_TIMEOUT`` seconds of the
  connection (of the first byte of the next request, on a kept-alive connection; waiting for
  it is ``keepalive``'s business): else the connection is closed, with a 408 when some of the
  request had come. A head over ``HEAD_LIMIT`` bytes gets 431 (414 when it is all one line):
  what the loop holds per connection stays small. A bare LF is handed over at once, for the
  parser's 400.
* **Writes wait at most ``SEND_TIMEOUT``** seconds for the client to read (``ClientSocket``,
  the rule of nginx's ``send_timeout``: the time between two writes that make progress), and
  at most half the threads may wait so at once: past that, a client that leaves its answer
  unread is dropped at once. Either way the connection is reset and its thread freed.
* **Closing lingers in the main loop**: after the last answer the write side is shut and the
  client's remaining bytes are read as they come (at most ``LINGER_BYTES``, ``LINGER_SECONDS``)
  without blocking, so the client sees the whole answer and cannot stall the loop.

* **A kept-alive connection can move to a sibling worker** (``Handoff``): when the app asked
  for it (``deadlines.MOVE_CONNECTION``, the fair share moving a client out of a crowded
  worker), the answered connection's descriptor is passed to that worker over a Unix socket
  (``SCM_RIGHTS``) instead of going back to this worker's poller. The client sees nothing: its
  next request on the same connection is read and answered by the other worker.

With TLS, HTTP/2 prior knowledge or the PROXY protocol (none used here) heads are read by the
request threads, as gunicorn does, and connections are not moved. ``gunicorn.conf.py`` names
this class.
"""
from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import select
import selectors
import socket
import struct
import threading
import time
from functools import partial

from gunicorn import http, util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import TConn, ThreadWorker

from common import errors
from common.config import Config
from common.web import error_handlers

log = logging.getLogger(__name__)

HEAD_LIMIT = 64 * 1024  # bytes of request line and headers a connection may send
LINGER_SECONDS = 2.0  # what gunicorn's graceful close allows the client to close its side
LINGER_BYTES = 64 * 1024  # the most read from a client after its last answer
FILE_BLOCK = 256 * 1024  # bytes of a file read per write by ClientSocket.sendfile
ACCEPT_DEFER_SECONDS = 0.01  # a crowded worker's pause before it takes a new connection


class WarmWorkers:
    """Which of the server's workers are warm, for ``/readyz``: a file per warm worker in a
    folder of the server's run folder (``gunicorn.conf.py`` marks a worker once its models are
    loaded and warmed up, and forgets it when it exits).

    A worker accepts requests only once warm, so any worker that answers is warm; what
    :meth:`waiting` adds is that the server is not called ready while some of its workers are
    still loading (a load balancer would send it a full share of traffic that a few workers
    serve). Once all were warm together the server stays ready: a worker replaced later takes
    no requests until it is warm, and its siblings serve meanwhile.
    """

    ALL = "all-warm"

    def __init__(self, folder: str, expected: int):
        self.folder = folder
        self.expected = expected
        os.makedirs(folder, exist_ok=True)

    def mark(self, pid: int) -> None:
        open(os.path.join(self.folder, str(pid)), "w").close()
        self.waiting()  # the last one to be warm records that all were

    def forget(self, pid: int) -> None:
        try:
            os.unlink(os.path.join(self.folder, str(pid)))
        except FileNotFoundError:
            pass

    def waiting(self) -> str | None:
        """None once every worker has been warm; else how many are."""
        if os.path.exists(os.path.join(self.folder, self.ALL)):
            return None
        warm = sum(1 for name in os.listdir(self.folder) if name.isdigit())
        if warm >= self.expected:
            open(os.path.join(self.folder, self.ALL), "w").close()
            return None
        return f"{warm} of {self.expected} workers are warm; the others are loading the model"


class OneLoadAtATime:
    """A lock the server's workers share (``flock`` on a file of the run folder): held while
    a worker loads and warms up a version found after start-up at normal priority, so that a
    roll-out loads in one worker after another and the others serve at full speed meanwhile.
    A worker waiting for its turn keeps serving the version it has. A load at ``LOAD_NICE``
    does not take it (``Manager._load_nice``)."""

    def __init__(self, path: str, patience: float = 300.0):
        self.path = path
        self.patience = patience  # a load that hangs holding the turn holds up the others

    @contextlib.contextmanager
    def __call__(self):
        with open(self.path, "a") as fh:
            deadline = time.monotonic() + self.patience
            held = False
            while not held:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.warning("another worker has been loading a model for %.0f s; "
                                    "loading without waiting for it", self.patience)
                        break
                    time.sleep(0.2)
            try:
                yield
            finally:
                if held:
                    fcntl.flock(fh, fcntl.LOCK_UN)


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


class ClientNotReading(TimeoutError):
    """The client left its answer unread for too long, or while too many others did."""


class SendGate:
    """How long a request thread may wait for its client to read (``timeout`` seconds without
    progress), and how many threads may wait so at once (``waiters``): the threads left are
    for everyone else."""

    def __init__(self, timeout: float, waiters: int):
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(waiters)

    def wait_writable(self, sock: socket.socket) -> None:
        """Return once ``sock`` can take more bytes; raise ClientNotReading when no slot is
        free or the client reads nothing within the timeout."""
        if not self._slots.acquire(blocking=False):
            raise ClientNotReading("too many clients are not reading their answers")
        try:
            poll = select.poll()
            poll.register(sock, select.POLLOUT)
            if not poll.poll(self.timeout * 1000):
                raise ClientNotReading(f"the client read nothing for {self.timeout:g} s")
        finally:
            self._slots.release()


class Handoff:
    """This worker's end of the connection hand-over between sibling workers: a Unix datagram
    socket ``<folder>/<pid>.sock`` (``folder`` is in the server's private run folder, mode
    0700, so only the server's own user can send) on which siblings send it connections, one
    descriptor per message (``SCM_RIGHTS``). The receiver takes the client's address from the
    connection itself, as ``accept`` would have given it.

    A socket's path may hold only 107 bytes: a longer one (a deep ``TMPDIR``) is reached
    through the folder's descriptor, ``/proc/self/fd/<n>/<pid>.sock``. Where neither works,
    :class:`Handoff` raises OSError and the worker moves no connection.
    """

    def __init__(self, folder: str, pid: int):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.folder, self.pid = folder, pid
        self._dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path_of(folder, pid))  # a worker of an earlier run with the same pid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            self.sock.bind(self._address(pid))
        except OSError:
            self.sock.close()
            os.close(self._dir_fd)
            raise

    @staticmethod
    def path_of(folder: str, pid: int) -> str:
        return os.path.join(folder, f"{pid}.sock")

    def _address(self, pid: int) -> str:
        path = self.path_of(self.folder, pid)
        if len(os.fsencode(path)) < 108:
            return path
        return f"/proc/self/fd/{self._dir_fd}/{pid}.sock"

    def send(self, sock: socket.socket, pid: int) -> bool:
        """Pass ``sock`` to worker ``pid``; False when it cannot take it (gone, or its queue
        is full): the caller keeps the connection."""
        try:
            # socket.send_fds would drop the address (it calls sendmsg without one)
            self.sock.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [sock.fileno()]))],
                              socket.MSG_DONTWAIT, self._address(pid))
        except OSError as err:
            log.debug("cannot hand a connection to worker %s: %s", pid, err)
            return False
        return True

    def receive(self) -> list[tuple[socket.socket, object, object]]:
        """The connections siblings have sent so far: ``(socket, client address, server
        address)`` each; one whose client has gone already is closed and left out."""
        received = []
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self.sock, 16, 1)
            except BlockingIOError:
                return received
            except OSError as err:
                log.warning("connection hand-over: %s", err)
                return received
            for fd in fds:
                sock = socket.socket(fileno=fd)
                try:
                    received.append((sock, sock.getpeername(), sock.getsockname()))
                except OSError:
                    sock.close()

    def close(self) -> None:
        self.sock.close()
        os.close(self._dir_fd)
        self.forget(self.folder, self.pid)

    @classmethod
    def forget(cls, folder: str, pid: int) -> None:
        """A worker is gone (the master's ``child_exit``): remove its socket."""
        with contextlib.suppress(OSError):
            os.unlink(cls.path_of(folder, pid))


class ClientSocket(socket.socket):
    """A client connection whose writes wait on the client only through its ``SendGate``.

    gunicorn writes answers with ``sendall`` and ``sendfile`` (static files); both are plain
    ``send`` calls that never block here: when the socket's buffer is full, the gate decides
    whether and how long to wait. Reads are the socket's own.
    """

    #: The pid of the sibling worker this connection is to be handed to after the answer
    #: (set through ``deadlines.MOVE_CONNECTION``); None: it stays.
    move_to: int | None = None

    def __init__(self, sock: socket.socket, gate: SendGate):
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.gate = gate

    def sendall(self, data, flags: int = 0) -> None:
        with memoryview(data) as view:
            while len(view):
                try:
                    sent = self.send(view, flags | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    self.gate.wait_writable(self)
                    continue
                view = view[sent:]

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> int:
        """Send ``count`` bytes of ``file`` from ``offset`` (to its end when None) through
        ``sendall``, so the gate applies (the kernel's sendfile would block on the client)."""
        file.seek(offset)
        total = 0
        while count is None or total < count:
            block = file.read(FILE_BLOCK if count is None else min(FILE_BLOCK, count - total))
            if not block:
                break
            self.sendall(block)
            total += len(block)
        return total

    def reset(self) -> None:
        """Drop the connection: its unsent bytes are discarded and the client gets a reset
        once the socket is closed (``SO_LINGER`` 0), rather than waiting to be delivered."""
        try:
            self.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _recv_now(sock: socket.socket, size: int) -> bytes | None:
    """What the socket holds now, at most ``size`` bytes: None when nothing has arrived yet,
    b"" when the client has gone (closed or reset)."""
    try:
        return sock.recv(size, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _head_stop(head: bytearray, old: int) -> int:
    """Where gunicorn's parser can judge ``head`` without reading more: just past the blank line
    that ends it, or just past a bare LF (rejected at once); -1 while neither has come. The
    first ``old`` bytes were checked before."""
    end = head.find(b"\r\n\r\n", max(0, old - 3))
    i = head.find(b"\n", old, len(head) if end < 0 else end)
    while i >= 0:
        if i == 0 or head[i - 1] != ord("\r"):
            return i + 1
        i = head.find(b"\n", i + 1, len(head) if end < 0 else end)
    return -1 if end < 0 else end + 4


class JsonErrorWorker(ThreadWorker):
    """gthread with the slow-client rules of the module doc and JSON bodies for the errors
    gunicorn answers before the app sees a request."""

    def init_process(self):
        settings = Config.from_env(os.environ)
        self.header_timeout = settings.header_timeout
        self.send_gate = SendGate(settings.send_timeout, max(1, self.cfg.threads // 2))
        self.reads_heads = not (self.cfg.is_ssl or self.cfg.proxy_protocol != "off"
                                or getattr(self.cfg, "http2_cleartext", "off") != "off")
        self.heads: dict[TConn, bytearray] = {}  # connections whose request head is arriving
        self.lingering: set[TConn] = set()  # answered connections, closing
        #: Whether this worker is crowded and should let a sibling accept a new connection
        #: first (gunicorn.conf.py sets it to the fair share's ``crowded``).
        self.defer_accept = lambda: False
        #: Where the workers hand each other connections (gunicorn.conf.py's ``post_fork``
        #: names a folder when there are several workers); None: connections never move.
        self.handoff: Handoff | None = None
        folder = getattr(self, "handoff_dir", None)
        if folder and self.reads_heads:
            try:
                self.handoff = Handoff(folder, os.getpid())
            except OSError as err:
                self.log.warning("connections cannot move between workers (%s): a crowded "
                                 "worker keeps the clients it was to move", err)
        super().init_process()

    def run(self):
        if self.handoff is not None:
            self.poller.register(self.handoff.sock, selectors.EVENT_READ, self._take_handed)
        try:
            super().run()
        finally:
            if self.handoff is not None:
                self.handoff.close()

    def handle_error(self, req, client, addr, exc):
        for classes, error_class in _CLIENT_ERRORS:
            if isinstance(exc, classes):
                self.log.warning("invalid request from %s: %s", (addr or ("",))[0], exc)
                try:
                    util.write(client, error_handlers.wire_response(error_class()))
                except OSError:
                    self.log.debug("failed to send error response")
                return
        super().handle_error(req, client, addr, exc)

    # -- connections in the main loop ----------------------------------------------------------
    def accept(self, listener):
        if self.defer_accept():  # let a less crowded sibling take it (common/fairshare.py)
            time.sleep(ACCEPT_DEFER_SECONDS)
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(TConn(self.cfg, ClientSocket(client, self.send_gate), addr,
                               listener.getsockname()))

    def enqueue_req(self, conn):
        """Wait in the main loop for ``conn``'s request head (with what gunicorn's parser
        already read ahead of it), then hand it to a thread."""
        if not self.reads_heads:
            return super().enqueue_req(conn)
        head = bytearray(conn.parser.unreader.take_buffered() if conn.parser else b"")
        conn.sock.setblocking(False)
        self.heads[conn] = head
        conn.timeout = time.monotonic() + self.header_timeout
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_head, conn))
        if head:
            self._check_head(conn, 0)
        if conn in self.heads:  # the head has often arrived already: no wait for the poller
            self._read_head(conn)

    def _read_head(self, conn, _sock=None):
        data = _recv_now(conn.sock, HEAD_LIMIT)
        if data is None:
            return
        if not data:  # the client went away
            self._forget_head(conn)
            self._close(conn)
            return
        head = self.heads[conn]
        old = len(head)
        head += data
        self._check_head(conn, old)

    def _check_head(self, conn, old: int):
        """Hand ``conn`` to a thread once its head can be parsed; refuse one over HEAD_LIMIT."""
        head = self.heads[conn]
        stop = _head_stop(head, old)
        if 0 <= stop <= HEAD_LIMIT:
            self._head_complete(conn)
        elif stop > HEAD_LIMIT or len(head) > HEAD_LIMIT:
            self._refuse_head(conn, errors.HeadersTooLarge() if b"\r\n" in head[2:]
                              else errors.UriTooLong())

    def _head_complete(self, conn):
        head = self._forget_head(conn)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(head))
        conn.data_ready = True  # what gthread's handle() would otherwise wait for
        super().enqueue_req(conn)

    def _forget_head(self, conn) -> bytearray:
        self.poller.unregister(conn.sock)
        return self.heads.pop(conn)

    def _refuse_head(self, conn, error: errors.ApiError):
        """Answer ``error`` to a connection whose head broke a rule, and close it."""
        received = len(self._forget_head(conn))
        self.log.warning("request head refused from %s (%d bytes): %s",
                         (conn.client or ("",))[0], received, error.message)
        try:
            conn.sock.send(error_handlers.wire_response(error), socket.MSG_DONTWAIT)
        except OSError:
            pass
        self._linger(conn)

    def murder_pending(self):
        """Also end the heads past ``HEADER_TIMEOUT`` and the lingering past their time."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.heads if c.timeout <= now]:
            if self.heads[conn].strip():
                self._refuse_head(conn, errors.RequestTimeout(
                    f"the request line and headers did not arrive within "
                    f"{self.header_timeout:g} s"))
            else:  # sent nothing of a request (a blank line at most): nothing to answer
                self._forget_head(conn)
                self._close(conn)
        for conn in [c for c in self.lingering if c.timeout <= now]:
            self._end_linger(conn)

    # -- the end of a connection ---------------------------------------------------------------
    def handle_request(self, req, conn):
        """gthread's, but a client that does not read its answer is dropped, quietly."""
        try:
            return super().handle_request(req, conn)
        except ClientNotReading as exc:
            self.log.info("dropped %s %s for %s: %s", req.method, req.path,
                          (conn.client or ("",))[0], exc)
            conn.sock.reset()
            return False

    def finish_request(self, conn, fs):
        """gthread's, except that a connection to close lingers in the main loop instead of
        blocking it (gunicorn's graceful close waits up to 2 s on the client), and one the app
        asked to move is handed to that sibling (:meth:`_hand_over`)."""
        if self.cfg.is_ssl or fs.cancelled() or fs.exception() is not None or fs.result():
            if not self._hand_over(conn, fs):
                super().finish_request(conn, fs)
            return
        self._linger(conn)

    def _hand_over(self, conn, fs) -> bool:
        """Pass a kept-alive connection that the app asked to move (``ClientSocket.move_to``)
        to that sibling, with nothing of the next request read here yet; True when it went."""
        pid = getattr(conn.sock, "move_to", None)
        if pid is None:
            return False
        conn.sock.move_to = None
        if (self.handoff is None or not self.alive or fs.cancelled()
                or fs.exception() is not None or fs.result() is not True
                or conn.parser is None or conn.parser.unreader.buf.getvalue()
                or not self.handoff.send(conn.sock, pid)):
            return False
        self.nr_conns -= 1
        conn.sock.close()  # this worker's descriptor; the connection lives on in the sibling
        return True

    def _take_handed(self, _sock=None):
        """Connections a sibling handed over: each waits here for its next request as a
        kept-alive connection would."""
        for sock, client, server in self.handoff.receive():
            conn = TConn(self.cfg, ClientSocket(sock, self.send_gate), client, server)
            self.nr_conns += 1
            conn.set_timeout()
            self.keepalived_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_client_socket_readable, conn))

    def _linger(self, conn):
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.timeout = time.monotonic() + LINGER_SECONDS
        conn.lingered = 0
        self.lingering.add(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_linger, conn))

    def _read_linger(self, conn, _sock):
        data = _recv_now(conn.sock, LINGER_BYTES)
        if data is None:
            return
        conn.lingered += len(data)
        if not data or conn.lingered >= LINGER_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn):
        self.lingering.discard(conn)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self._close(conn)

    def _close(self, conn):
        self.nr_conns -= 1
        conn.close()
