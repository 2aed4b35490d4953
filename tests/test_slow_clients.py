"""Slow clients: a body trickled one byte a second is cut off with 408 and holds one thread for
a bounded time, never the worker; an honest slow upload above the minimum rate gets through."""
import json
import socket
import threading
import time

import imagegen as ig
import pytest
import requests
from helpers import start_server
from reliability import record

pytestmark = pytest.mark.server

GRACE = 2  # UPLOAD_TIMEOUT for these tests
MIN_RATE_KB = 16


@pytest.fixture(scope="module")
def server(colour_model_dir, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("slow"), {
        "MODEL_PATH": colour_model_dir, "WORKERS": "1", "THREADS": "8",
        "UPLOAD_TIMEOUT": str(GRACE), "UPLOAD_MIN_RATE_KB": str(MIN_RATE_KB)})
    yield srv
    srv.stop()


def _head(length: int, content_type="image/png") -> bytes:
    return (f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def trickle_body(server, body: bytes, interval: float, give_up: float) -> tuple[bytes, float]:
    """Send the headers, then ``body`` one byte per ``interval`` until the server answers."""
    conn = socket.create_connection(("127.0.0.1", server.port))
    conn.sendall(_head(len(body)))
    conn.settimeout(interval)
    started, response = time.monotonic(), b""
    try:
        for i in range(len(body)):
            if time.monotonic() - started > give_up:
                break
            try:
                conn.sendall(body[i:i + 1])
            except OSError:  # the server closed the connection
                break
            try:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                response += chunk
                if b"\r\n\r\n" in response:
                    break
            except socket.timeout:
                continue
        conn.settimeout(5)
        try:
            while chunk := conn.recv(65536):
                response += chunk
        except OSError:
            pass
    finally:
        conn.close()
    return response, time.monotonic() - started


def test_one_byte_a_second_gets_408_while_others_are_served(server):
    body = ig.encode(ig.noisy(ig.RED, seed=1), "PNG")
    results = {}
    slow = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, trickle_body(server, body, interval=1.0, give_up=60))) for i in range(3)]
    for th in slow:
        th.start()
    time.sleep(0.5)
    served = []
    for i in range(10):  # meanwhile the worker serves everyone else
        served.append(requests.post(server.url + "/classify", files={
            "image": ("g.png", ig.encode(ig.noisy(ig.GREEN, seed=100 + i), "PNG"))},
            timeout=10).status_code)
    for th in slow:
        th.join(90)
    assert served == [200] * 10
    for response, seconds in results.values():
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), response[:200]
        error = json.loads(payload)["error"]
        assert error["code"] == "request_timeout" and "too slowly" in error["message"]
        assert seconds < 30  # cut off at the deadline, not after the whole body
    record("slow_client", {"upload_timeout_s": GRACE, "min_rate_kb_s": MIN_RATE_KB,
                           "trickle_cut_after_s": round(max(s for _, s in results.values()), 1),
                           "other_requests_during": len(served)})


def test_stalled_body_is_cut_off_too(server):
    """A client that sends headers and then nothing at all."""
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    started = time.monotonic()
    try:
        conn.sendall(_head(5000) + b"\x89PNG")
        response = conn.recv(65536)
    finally:
        conn.close()
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert time.monotonic() - started < 20


def test_honest_slow_upload_above_the_minimum_rate_succeeds(server):
    """>120 KB at ~40 KiB/s: longer than the grace period, but faster than the minimum rate."""
    picture = ig.noisy(ig.BLUE, (300, 240), seed=3, amount=120)
    body = ig.encode(picture, "PNG")
    assert len(body) > 120_000
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    started = time.monotonic()
    try:
        conn.sendall(_head(len(body)))
        for i in range(0, len(body), 4096):
            conn.sendall(body[i:i + 4096])
            time.sleep(0.1)
        response = b""
        while b"\r\n\r\n" not in response or not response.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            response += chunk
    finally:
        conn.close()
    assert time.monotonic() - started > GRACE
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    assert json.loads(response.partition(b"\r\n\r\n")[2])["predictions"][0]["label"] == "blue"


def test_slow_headers_do_not_hold_the_worker(server):
    """Clients sending their headers slowly tie up no request thread, and never the worker
    (the header deadline itself: tests/test_connection_deadlines.py)."""
    conns = []
    try:
        for _ in range(3):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            conns.append(conn)
        time.sleep(1.0)
        for conn in conns:
            conn.sendall(b"a")
        for i in range(5):
            response = requests.post(server.url + "/classify", files={
                "image": ("r.png", ig.encode(ig.noisy(ig.RED, seed=200 + i), "PNG"))}, timeout=10)
            assert response.status_code == 200
    finally:
        for conn in conns:
            conn.close()
