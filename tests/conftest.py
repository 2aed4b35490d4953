"""Fixtures: a tiny real SavedModel, the app built around it, and the real gunicorn server."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tiny_models import save_colour_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile_command() -> list[str]:
    """The CMD of the Dockerfile, so tests start the server exactly as the image does."""
    with open(os.path.join(ROOT, "Dockerfile")) as fh:
        for line in fh:
            if line.startswith("CMD "):
                return json.loads(line[4:])
    raise AssertionError("Dockerfile has no CMD line")


@pytest.fixture(scope="session")
def colour_model_dir(tmp_path_factory) -> str:
    return save_colour_model(str(tmp_path_factory.mktemp("models") / "colours"))


@pytest.fixture(scope="session")
def classifier(colour_model_dir):
    from common.classifier import load_classifier
    clf = load_classifier(colour_model_dir)
    clf.warm_up()
    return clf


@pytest.fixture
def temp_dir(tmp_path) -> str:
    return str(tmp_path / "temp")


@pytest.fixture
def app(classifier, temp_dir):
    from app import create_app
    return create_app({"temp_dir": temp_dir, "url_allow_hosts": ("127.0.0.1",)},
                      classifier=classifier)


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    """A gunicorn process started with the Dockerfile's command on 127.0.0.1 and a free port."""

    def __init__(self, env: dict, cwd: str = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), **env}
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self, log_path: str, wait_ready: bool = True, timeout: float = 90.0):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(dockerfile_command(), cwd=self.cwd, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as fh:
            return fh.read().decode(errors="replace")[-6000:]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __repr__(self):
        return f"LiveServer({shlex.join(dockerfile_command())} on {self.url})"


@pytest.fixture(scope="session")
def live_server(colour_model_dir, tmp_path_factory):
    """The real server, as the Dockerfile runs it, serving the colour model."""
    work = tmp_path_factory.mktemp("live")
    server = LiveServer({
        "MODEL_PATH": colour_model_dir,
        "TEMP_DIR": str(work / "temp"),
        "URL_ALLOW_HOSTS": "127.0.0.1",
        "WORKERS": "2",
        "THREADS": "8",
        "MAX_UPLOAD_MB": "2",
    })
    server.temp_dir = str(work / "temp")
    server.start(str(work / "server.log"))
    yield server
    server.stop()
