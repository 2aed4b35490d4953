"""Start the real server exactly as the Docker image does, on loopback and a free port.

Used by the tests and by benchmark.py: the command is read from the Dockerfile's CMD, so what is
tested and measured is what ships.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile_command() -> list[str]:
    """The CMD of the Dockerfile, as a list."""
    with open(os.path.join(ROOT, "Dockerfile")) as fh:
        for line in fh:
            if line.startswith("CMD "):
                return json.loads(line[4:])
    raise RuntimeError("Dockerfile has no CMD line")


class LiveServer:
    """A gunicorn process group on 127.0.0.1:<free port> with the given environment."""

    def __init__(self, env: dict, cwd: str = ROOT):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), **env}
        # The gRPC port too: never the default 8500, which every worker binds with SO_REUSEPORT,
        # so two servers started side by side (tests, benchmark peers) would share it.
        if str(self.env.get("GRPC_PORT", "")).strip().lower() in ("", "8500"):
            self.env["GRPC_PORT"] = str(free_port())
        self.grpc_port = (None if self.env["GRPC_PORT"].strip().lower() in ("0", "off")
                          else int(self.env["GRPC_PORT"]))
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.log_path = None
        self.started_at = 0.0
        self.ready_seconds = None

    def start(self, log_path: str, wait_ready: bool = True, timeout: float = 120.0):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(dockerfile_command(), cwd=self.cwd, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Poll /readyz; returns seconds from start to the first 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    self.ready_seconds = time.monotonic() - self.started_at
                    return self.ready_seconds
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def worker_pids(self) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        if int(fh.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            pids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    continue
        return pids

    def output(self, tail: int | None = 6000) -> str:
        """The server's log (stdout and stderr): its last ``tail`` characters, or all."""
        if self.log and not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as fh:
            text = fh.read().decode(errors="replace")
        return text if tail is None else text[-tail:]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log:
            self.log.close()
