"""Workers hand each other kept-alive connections (common/web/gunicorn_worker.py: Handoff).

The fair share moves a client out of a crowded worker by handing its connection to a sibling
(``deadlines.MOVE_CONNECTION``); the client keeps its connection and the sibling answers its
next request. Here real gunicorn runs this project's worker class with two workers and a small
WSGI app (behind the project's ``UploadDeadline`` middleware) that asks for a move on ``/move``,
so that the hand-over itself is checked without depending on which worker the kernel picks.
"""
import http.client
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from common.web.gunicorn_worker import Handoff
from scripts.liveserver import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

APP = textwrap.dedent('''
    import glob
    import os

    from common.web.deadlines import MOVE_CONNECTION, UploadDeadline

    HANDOFF = os.environ["TEST_HANDOFF_DIR"]


    def _sibling():
        mine = os.path.join(HANDOFF, f"{os.getpid()}.sock")
        return next(int(os.path.basename(p)[:-5])
                    for p in sorted(glob.glob(os.path.join(HANDOFF, "*.sock"))) if p != mine)


    def _app(environ, start_response):
        path = environ["PATH_INFO"]
        if path.startswith("/move"):
            if path != "/move-unread":
                environ["wsgi.input"].read()
            environ[MOVE_CONNECTION] = _sibling()
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body)))])
        return [body]


    app = UploadDeadline(_app)
''')

CONFIG = textwrap.dedent('''
    import os
    worker_class = "common.web.gunicorn_worker.JsonErrorWorker"
    workers = 2
    threads = 4
    keepalive = 30
    control_socket_disable = True


    def post_fork(server, worker):
        worker.handoff_dir = os.environ["TEST_HANDOFF_DIR"]
''')


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("handoff")
    (work / "move_app.py").write_text(APP)
    (work / "conf.py").write_text(CONFIG)
    port = free_port()
    handoff = work / "handoff"
    env = {**os.environ, "TEST_HANDOFF_DIR": str(handoff),
           "PYTHONPATH": os.pathsep.join([str(work), ROOT])}
    log = open(work / "gunicorn.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(work / "conf.py"),
                             "-b", f"127.0.0.1:{port}", "move_app:app"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(list(handoff.glob("*.sock"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, (work / "gunicorn.log"
                                                                     ).read_text()
        time.sleep(0.1)
    yield port, handoff
    proc.terminate()
    proc.wait(30)
    log.close()


def _get(conn: http.client.HTTPConnection, path: str, body: bytes | None = None):
    conn.request("POST" if body is not None else "GET", path, body=body)
    response = conn.getresponse()
    return int(response.read()), response


def test_a_moved_connection_is_answered_by_the_sibling_and_stays_open(server):
    port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    first, _ = _get(conn, "/")
    sock = conn.sock
    local = sock.getsockname()
    moved_from, response = _get(conn, "/move")
    assert moved_from == first and not response.will_close
    second, _ = _get(conn, "/")
    assert second != first  # the sibling answered
    assert _get(conn, "/")[0] == second  # and keeps the connection
    moved_back, _ = _get(conn, "/move", body=b"x" * 100_000)  # a body read to its end
    assert moved_back == second
    assert _get(conn, "/")[0] == first
    assert conn.sock is sock and sock.getsockname() == local  # one connection throughout
    conn.close()


def test_a_connection_whose_body_was_not_read_is_closed_instead(server):
    port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    pid, response = _get(conn, "/move-unread", body=b"x" * 100_000)
    assert response.will_close  # the rest of the body would be read as the next request
    conn.close()


@pytest.mark.parametrize("deep", [False, True])
def test_a_handed_connection_keeps_its_client_and_a_gone_worker_takes_none(tmp_path, deep):
    """Handing to a pid with no socket fails and leaves the connection with its owner; the
    receiver takes the client's address from the connection. ``deep``: a folder whose socket
    paths pass the 107 bytes a Unix socket's path may hold (a deep TMPDIR)."""
    folder = str(tmp_path / ("d" * 120 if deep else "handoff"))
    mine = Handoff(folder, 1)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    served, _ = listener.accept()
    try:
        assert not mine.send(served, 2)
        other = Handoff(folder, 2)
        assert mine.send(served, 2)
        [(sock, peer, local)] = other.receive()
        assert peer == client.getsockname() and local == listener.getsockname()
        served.close()  # the sender's descriptor: the connection lives on in the receiver
        client.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        assert other.receive() == []
        sock.close()
        other.close()
        assert not os.path.exists(Handoff.path_of(folder, 2))
    finally:
        mine.close()
        for s in (client, served, listener):
            s.close()
