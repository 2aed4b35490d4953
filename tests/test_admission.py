"""Admission on the real server: a request the batcher will not take is refused before any work.

A colour model that spins for seconds on a magenta image makes the one worker's model busy far
past its measured batch time, so the expected wait of any new request passes
QUEUE_MAX_WAIT_MS: new requests are refused at once, without their body being read, their URL
downloaded, or anything stored.
"""
import os
import socket
import threading
import time

import pytest
import requests

import imagegen as ig
import webservers as ws
from helpers import assert_envelope, post_image, start_server
from tiny_models import TRAP, save_colour_model

pytestmark = pytest.mark.server

HANG_SECONDS = 10.0


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory):
    """One worker whose model is stuck in a long call, with requests being refused."""
    work = tmp_path_factory.mktemp("admission")
    model = save_colour_model(str(work / "hang"), hang_seconds=HANG_SECONDS)
    server = start_server(work, {"MODEL_PATH": model, "WORKERS": "1", "URL_ALLOW_HOSTS":
                                 "127.0.0.1", "QUEUE_MAX_WAIT_MS": "200",
                                 "REQUEST_TIMEOUT": "60", "MODEL_HANG_TIMEOUT": "0"})
    trap = threading.Thread(target=lambda: post_image(server, ig.png(TRAP), timeout=90),
                            daemon=True)
    trap.start()
    refused = None
    for _ in range(200):  # until the stuck call has overrun the budget
        try:  # an admitted request waits behind the stuck call: give up on it, try again
            response = post_image(server, ig.png(ig.RED), timeout=(5, 0.5))
        except requests.Timeout:
            continue
        if response.status_code == 503:
            refused = response
            break
    assert refused is not None, "the server never started refusing"
    assert_envelope(refused, 503, "overloaded")
    server.stored_before = sorted(os.listdir(server.temp_dir))
    yield server
    server.stop()


def read_response(sock: socket.socket) -> tuple[str, bytes]:
    """Head and body of one HTTP response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    head = head.decode("latin-1")
    length = int(next(line.split(":", 1)[1] for line in head.split("\r\n")
                      if line.lower().startswith("content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


@pytest.mark.parametrize("path, content_type", [
    ("/classify", "image/png"),
    ("/models/colours/classify", "multipart/form-data; boundary=b"),
    ("/v1/models/colours:predict", "application/json"),  # TF Serving REST
    ("/v2/models/colours/infer", "application/octet-stream"),  # Open Inference Protocol
])
def test_a_refused_upload_is_answered_before_its_body_and_the_connection_closes(busy_server,
                                                                                path,
                                                                                content_type):
    declared, sent = 8_000_000, 64 * 1024
    with socket.create_connection(("127.0.0.1", busy_server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode() + b"\0" * sent)
        started = time.monotonic()
        head, body = read_response(sock)  # the other 7.9 MB are never sent
        answered = time.monotonic() - started
        rest = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
        except ConnectionResetError:
            pass
    assert head.startswith("HTTP/1.1 503"), head
    assert "retry-after:" in head.lower() and "connection: close" in head.lower()
    assert b"overloaded" in body and rest == b""
    assert answered < 10  # answered without the body (the socket timeout would have hit)
    assert sorted(os.listdir(busy_server.temp_dir)) == busy_server.stored_before


def test_a_refused_small_upload_keeps_its_connection(busy_server):
    """A small body that has arrived whole is read after the refusal (closing would read as
    much) and the connection serves the client's next request."""
    body = ig.encode(ig.noisy(ig.BLUE, seed=7), "PNG")
    assert len(body) < 64 * 1024
    with socket.create_connection(("127.0.0.1", busy_server.port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head, answer = read_response(sock)
            assert head.startswith("HTTP/1.1 503") and b"overloaded" in answer, head
            assert "connection: close" not in head.lower()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = read_response(sock)
        assert head.startswith("HTTP/1.1 200"), head
    assert sorted(os.listdir(busy_server.temp_dir)) == busy_server.stored_before


def test_a_refused_upload_whose_body_is_late_is_closed(busy_server):
    """Half of a small body sent: the refusal does not wait for the rest; it closes."""
    body = ig.encode(ig.noisy(ig.BLUE, seed=8), "PNG")
    with socket.create_connection(("127.0.0.1", busy_server.port), timeout=10) as sock:
        sock.sendall(f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        head, _ = read_response(sock)
        assert head.startswith("HTTP/1.1 503") and "connection: close" in head.lower(), head


def test_a_refused_url_request_downloads_nothing(busy_server):
    host = ws.Recorder("127.0.0.1", {"/cat.jpg": ws.body(ig.jpeg(ig.BLUE))})
    try:
        response = requests.get(busy_server.url + "/classify",
                                params={"image_url": host.base + "/cat.jpg"}, timeout=30)
    finally:
        host.close()
    assert_envelope(response, 503, "overloaded")
    assert response.headers["Retry-After"].isdigit()
    assert host.hits == []
    assert sorted(os.listdir(busy_server.temp_dir)) == busy_server.stored_before


def test_refused_uploads_store_nothing_and_health_answers(busy_server):
    for seed in range(5):
        response = post_image(busy_server, ig.encode(ig.noisy(ig.GREEN, seed=seed), "PNG"))
        assert_envelope(response, 503, "overloaded")
    assert requests.get(busy_server.url + "/healthz", timeout=5).status_code == 200
    assert sorted(os.listdir(busy_server.temp_dir)) == busy_server.stored_before


def _thread_nice(pid: int) -> dict[int, tuple[str, int]]:
    """Per thread of ``pid``: (name, nice) from /proc/<pid>/task/<tid>/stat."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                head, _, rest = fh.read().rpartition(")")
            out[int(tid)] = (head.split("(", 1)[1], int(rest.split()[16]))
        except OSError:
            continue
    return out


def test_request_threads_run_below_the_model_threads(demo_server):
    """REQUEST_NICE (default 10): a thread that served a request has lowered its priority; the
    main thread and the model's threads (the batcher, the runtime's pools) keep theirs (0)."""
    assert post_image(demo_server, ig.png(ig.RED)).status_code == 200
    (pid,) = demo_server.worker_pids()
    threads = _thread_nice(pid)
    assert 10 in {nice for _, nice in threads.values()}, threads
    assert threads[pid][1] == 0
    assert any(nice == 0 for tid, (_, nice) in threads.items() if tid != pid), threads
    assert all(nice == 0 for name, nice in threads.values() if name.startswith("tf_")), threads
