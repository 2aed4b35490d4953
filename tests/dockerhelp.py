"""Docker for the tests: the engine check, the image build, and one container.

Used by tests/test_docker.py (the image) and tests/test_deploy.py (compose). Everything goes
through the real ``docker`` and ``docker-compose`` commands. Without an engine the docker tests
are skipped, except where ``REQUIRE_DOCKER=1`` (set by ``.ci/run``), where that is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import requests
from helpers import ROOT

IMAGE = os.environ.get("TEST_IMAGE", "image-classifier:test")
NGINX_IMAGE = "image-classifier-nginx:test"


def docker(*args: str, check: bool = True, timeout: float = 120, **kwargs) -> str:
    """Run ``docker ARGS``; its stdout (stripped). Raises with stderr when it fails and
    ``check``."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout.strip()


def require_engine() -> None:
    """Skip (or fail, in CI) when no Docker engine answers."""
    try:
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail("REQUIRE_DOCKER=1 but no Docker engine answers `docker info`")
        pytest.skip("no Docker engine (`docker info` fails); .ci/run starts one")


def build_image(tag: str = IMAGE) -> str:
    """Build the image as users do (`make docker`: the base image first, then the labels)."""
    proc = subprocess.run(["make", "-s", "docker", f"IMAGE={tag}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tag


def base_image() -> str:
    """The immutable reference of the base image (what ``make docker`` builds on)."""
    proc = subprocess.run([os.path.join(ROOT, "scripts", "docker_base.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def build_nginx_image(tag: str = NGINX_IMAGE) -> str:
    """deploy/compose/nginx built on the pinned base (the proxy of compose and of the pod)."""
    docker("build", "-q", "-t", tag, "--build-arg", f"BASE={base_image()}",
           os.path.join(ROOT, "deploy", "compose", "nginx"), timeout=900)
    return tag


def graceful_timeout() -> int:
    """gunicorn.conf.py's graceful_timeout (read, not imported: importing it has effects)."""
    text = open(os.path.join(ROOT, "gunicorn.conf.py")).read()
    return int(re.search(r"^graceful_timeout\s*=\s*(\d+)", text, re.M).group(1))


def readable_copy(folder: str, dest) -> str:
    """A copy of a model folder that the container's user (uid 10001) can read."""
    shutil.copytree(folder, dest)
    for base, dirs, files in os.walk(dest):
        os.chmod(base, 0o755)
        for name in files:
            os.chmod(os.path.join(base, name), 0o644)
    return str(dest)


class Container:
    """One ``docker run -d`` of an image, its ``ports`` published on free loopback ports;
    ``url`` is the first one's (``urls[port]`` each one's). ``command`` replaces the CMD."""

    def __init__(self, image: str, *run_args: str, env: dict | None = None,
                 ports: tuple[int, ...] = (8000,), command: tuple[str, ...] = ()):
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        port_args = [a for p in ports for a in ("-p", f"127.0.0.1::{p}")]
        self.id = docker("run", "-d", *port_args, *env_args, *run_args, image, *command)
        self.urls = {}
        for p in ports:
            host_port = docker("port", self.id, f"{p}/tcp").splitlines()[0].rsplit(":", 1)[1]
            self.urls[p] = f"http://127.0.0.1:{host_port}"
        self.url = self.urls[ports[0]] if ports else ""

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.id)

    def state(self) -> dict:
        return json.loads(self.inspect("{{json .State}}"))

    def exec(self, *cmd: str, check: bool = True) -> str:
        return docker("exec", self.id, *cmd, check=check)

    def logs(self) -> str:
        proc = subprocess.run(["docker", "logs", self.id], capture_output=True, text=True,
                              timeout=60)
        return proc.stdout + proc.stderr

    def wait_ready(self, bound: float = 180) -> float:
        """Seconds until /readyz answered 200; fails past ``bound`` or if the container stops."""
        started = time.monotonic()
        while time.monotonic() - started < bound:
            if not self.state()["Running"]:
                raise AssertionError("container stopped:\n" + self.logs()[-4000:])
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"/readyz not 200 within {bound} s:\n" + self.logs()[-4000:])

    def wait_health(self, want: str = "healthy", bound: float = 120) -> str:
        """Wait for Docker's HEALTHCHECK status to become ``want``; returns the last status."""
        deadline = time.monotonic() + bound
        status = ""
        while time.monotonic() < deadline:
            status = self.state().get("Health", {}).get("Status", "")
            if status == want:
                break
            time.sleep(1)
        return status

    def remove(self) -> None:
        docker("rm", "-f", "-v", self.id, check=False)
