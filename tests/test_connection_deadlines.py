"""Slow clients cannot starve others (common/web/gunicorn_worker.py): request heads are read in the
worker's main loop and must be complete within HEADER_TIMEOUT, answers left unread are dropped
after SEND_TIMEOUT (at most half the threads wait on such clients), and closing connections
never wait on the client. Real one-worker servers, raw sockets."""
import json
import os
import shutil
import socket
import statistics
import threading
import time

import imagegen as ig
import pytest
import requests
from helpers import DEMO, post_image, start_server
from PIL import Image
from reliability import record

pytestmark = pytest.mark.server

HEADER_TIMEOUT = 2
SEND_TIMEOUT = 2
THREADS = 8
BIG_FILE_MB = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo model with a 12 MB confusion_matrix.png (a large answer), 8 request threads."""
    work = tmp_path_factory.mktemp("deadlines")
    model = str(work / "demo")
    shutil.copytree(DEMO, model)
    noise = Image.frombytes("RGB", (2000, 2000), os.urandom(2000 * 2000 * 3))
    noise.save(os.path.join(model, "confusion_matrix.png"), compress_level=0)
    srv = start_server(work, {"MODEL_PATH": model, "WORKERS": "1", "THREADS": str(THREADS),
                              "HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                              "SEND_TIMEOUT": str(SEND_TIMEOUT)})
    yield srv
    srv.stop()


def connect(server, data: bytes = b"", rcvbuf: int | None = None) -> socket.socket:
    conn = socket.socket()
    if rcvbuf:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    conn.settimeout(10)
    conn.connect(("127.0.0.1", server.port))
    if data:
        conn.sendall(data)
    return conn


def read_all(conn: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    conn.settimeout(timeout)
    chunks = []
    try:
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def split_response(raw: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


def healthz_seconds(server) -> float:
    started = time.monotonic()
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
    return time.monotonic() - started


def still_open(conn: socket.socket) -> bool:
    """True while the server has neither answered nor closed ``conn``."""
    conn.setblocking(False)
    try:
        conn.recv(1, socket.MSG_PEEK)  # an answer, or the end of the connection
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        conn.setblocking(True)


HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def test_half_sent_heads_hold_no_thread_and_are_closed_at_the_deadline(server):
    """Twice THREADS connections with half a request each, and two that send nothing: the worker
    keeps answering everyone else (heads arriving in pieces, pipelined requests, a malformed
    request's 400 at once), and at HEADER_TIMEOUT the half-sent ones get 408 and the silent
    ones are closed."""
    started = time.monotonic()
    half = [connect(server, HALF_HEAD) for _ in range(2 * THREADS)]
    silent = [connect(server) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert healthz_seconds(server) < 2

        pieces = connect(server)  # a head in 1-byte pieces, within the deadline
        for i in range(len(HEALTHZ)):
            pieces.sendall(HEALTHZ[i:i + 1])
            time.sleep(0.01)
        pieces.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = read_all(pieces)
        assert raw.count(b"HTTP/1.1 200 ") == 2, raw[:300]  # both, the second pipelined

        bare = connect(server, b"GET /healthz HTTP/1.1\nHost: x\n\n")
        assert split_response(read_all(bare))[0] == 400  # parsed at once, not a 408 later

        for conn in half:
            status, head, body = split_response(read_all(conn))
            assert status == 408 and b"application/json" in head, head
            assert json.loads(body)["error"]["code"] == "request_timeout"
        for conn in silent:
            assert read_all(conn) == b""
        closed_after = time.monotonic() - started
        assert HEADER_TIMEOUT - 0.5 < closed_after < HEADER_TIMEOUT + 3
    finally:
        for conn in half + silent:
            conn.close()
    assert healthz_seconds(server) < 2


def test_kept_alive_connection_starts_its_next_head_and_is_held_to_the_deadline(server):
    """After an answer the connection is kept; half of a next request there holds no thread
    either, and gets 408 at HEADER_TIMEOUT from its first byte."""
    conns = []
    try:
        for _ in range(2 * THREADS):
            conn = connect(server, HEALTHZ)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
            conns.append(conn)
        started = time.monotonic()
        for conn in conns:
            conn.sendall(HALF_HEAD)
        time.sleep(0.3)
        assert healthz_seconds(server) < 2
        for conn in conns:
            assert split_response(read_all(conn))[0] == 408
        assert time.monotonic() - started < HEADER_TIMEOUT + 3
    finally:
        for conn in conns:
            conn.close()


def test_request_head_over_64_kib_gets_431(server):
    """90 header fields of 800 bytes each: every field and their number within gunicorn's
    limits, the head over the 64 KiB one connection may make the main loop hold."""
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 800) for i in range(90))
    conn = connect(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    try:
        status, head, body = split_response(read_all(conn))
    finally:
        conn.close()
    assert status == 431 and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "headers_too_large"


def test_clients_that_do_not_read_a_large_answer_are_dropped(server):
    """2 x THREADS clients ask for a 12 MB file and read none of it: /healthz answers within a
    couple of seconds all along; after SEND_TIMEOUT they are dropped, having got only part of
    it (read now, an answer still being sent would arrive whole)."""
    request = b"GET /model/confusion_matrix.png HTTP/1.1\r\nHost: x\r\n\r\n"
    readers = [connect(server, request, rcvbuf=4096) for _ in range(2 * THREADS)]
    try:
        started, slowest = time.monotonic(), 0.0
        while time.monotonic() - started < SEND_TIMEOUT + 1.5:
            slowest = max(slowest, healthz_seconds(server))
            time.sleep(0.2)
        assert slowest < 2
        for conn in readers:
            received = len(read_all(conn, timeout=5))
            assert received < BIG_FILE_MB * 1_000_000 // 2
    finally:
        for conn in readers:
            conn.close()
    assert healthz_seconds(server) < 2


def test_clients_that_never_close_do_not_stall_the_worker(server):
    """40 clients send ``Connection: close`` requests, read their answers, and never close:
    the worker lingers for their close without waiting on each in turn."""
    conns = [connect(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
             for _ in range(40)]
    try:
        time.sleep(0.5)
        assert healthz_seconds(server) < 2  # 40 x 2 s in turn before
        for conn in conns:
            assert split_response(read_all(conn))[0] == 200
    finally:
        for conn in conns:
            conn.close()


def test_normal_upload_while_80_heads_are_half_sent_and_48_bodies_trickle(tmp_path):
    """Slow clients do not slow others: a normal JPEG upload gets 200 within its usual latency
    while 80 clients hold half-sent request heads and 48 trickle their bodies (default THREADS,
    HEADER_TIMEOUT and UPLOAD_TIMEOUT; one worker)."""
    srv = start_server(tmp_path, {"MODEL_PATH": DEMO, "WORKERS": "1"})
    jpeg = ig.encode(ig.noisy(ig.RED, (320, 240), seed=7), "JPEG")
    stop = threading.Event()
    heads, bodies = [], []

    def trickle():
        while not stop.wait(1.0):
            for conn in bodies:
                try:
                    conn.sendall(b"\xff")
                except OSError:
                    pass
    try:
        def upload() -> float:
            t = time.monotonic()
            response = post_image(srv, jpeg, timeout=30)
            assert response.status_code == 200, response.text
            return time.monotonic() - t

        quiet = [upload() for _ in range(7)]
        attack_started = time.monotonic()
        for _ in range(80):
            heads.append(connect(srv, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Type: multipart/form-data; bou"))
        for _ in range(48):
            bodies.append(connect(srv, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: image/jpeg\r\nContent-Length: 100000\r\n"
                                       b"\r\n\xff\xd8\xff\xe0"))
        pump = threading.Thread(target=trickle, daemon=True)
        pump.start()
        time.sleep(0.5)
        during = [upload() for _ in range(7)]
        attack_seconds = time.monotonic() - attack_started
        assert all(still_open(conn) for conn in heads + bodies), \
            "the attack must hold throughout the measurement"
        bound = max(2.0, 5 * statistics.median(quiet))
        assert max(during) < bound, (quiet, during)
        record("slow_connections", {
            "half_sent_heads": len(heads), "trickling_bodies": len(bodies),
            "upload_median_quiet_ms": round(1000 * statistics.median(quiet), 1),
            "upload_median_during_ms": round(1000 * statistics.median(during), 1),
            "upload_max_during_ms": round(1000 * max(during), 1),
            "attack_seconds": round(attack_seconds, 1)})
    finally:
        stop.set()
        for conn in heads + bodies:
            conn.close()
        srv.stop()
