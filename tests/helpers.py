"""What several test files share: paths, the real server, uploads, the error envelope, metrics.

Tests import from here (and from the data helpers ``imagegen``, ``tiny_models``,
``webservers``, ``fuzzing``, ``reliability``), never from another test file.
"""
from __future__ import annotations

import os
import re

import requests

from scripts.liveserver import LiveServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "tf_files", "demo")

__all__ = ["ROOT", "DEMO", "LiveServer", "start_server", "post_image", "assert_envelope",
           "metric", "PeakMemory"]


def start_server(work, env: dict, name: str = "server", wait_ready: bool = True) -> LiveServer:
    """Start the real server with ``env``, its TEMP_DIR (``server.temp_dir``), FEEDBACK_DIR and
    log under the folder ``work``; returns once it is ready (unless ``wait_ready`` is False)."""
    server = LiveServer({"TEMP_DIR": str(work / "temp"), "FEEDBACK_DIR": str(work / "feedback"),
                         **env})
    server.temp_dir = str(work / "temp")
    return server.start(str(work / f"{name}.log"), wait_ready=wait_ready)


def post_image(server, data: bytes, name: str = "photo.jpg", content_type: str = "image/jpeg",
               query: str = "", timeout: float = 30) -> requests.Response:
    """POST ``data`` as the multipart field ``image`` to the server's /classify."""
    return requests.post(server.url + "/classify" + query,
                         files={"image": (name, data, content_type)}, timeout=timeout)


def assert_envelope(response, status: int, code: str | None = None) -> dict:
    """The response is DESIGN.md's error envelope with this status (and code); returns it.

    Works for ``requests`` responses and Flask test-client responses alike.
    """
    text = response.text if hasattr(response, "text") else response.get_data(as_text=True)
    body = response.json() if callable(getattr(response, "json", None)) else response.get_json()
    assert response.status_code == status, text
    assert response.headers["Content-Type"].startswith("application/json"), text
    assert set(body) == {"error"}, text
    error = body["error"]
    assert set(error) == {"code", "message", "status"} and error["status"] == status, text
    assert isinstance(error["code"], str) and error["code"], text
    assert isinstance(error["message"], str) and error["message"], text
    if code is not None:
        assert error["code"] == code, text
    assert "Traceback" not in text
    return error


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            total += float(m.group(4))
            found = True
    assert found, f"no sample {name}{labels}"
    return total


class PeakMemory:
    """A process's peak resident memory around some work, as the kernel counts it.

    ``reset()`` writes 5 to ``/proc/PID/clear_refs`` (the peak, ``VmHWM``, drops to the current
    RSS); ``rise_mb()`` is then the peak since the reset minus the RSS at the reset, in MiB.
    Use with ``server.worker_pids()[0]`` for a one-worker server.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.base_kb = 0

    def _status_kb(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def reset(self) -> "PeakMemory":
        with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
            fh.write("5")
        self.base_kb = self._status_kb("VmRSS")
        return self

    def peak_mb(self) -> float:
        return self._status_kb("VmHWM") / 1024.0

    def rss_mb(self) -> float:
        return self._status_kb("VmRSS") / 1024.0

    def rise_mb(self) -> float:
        return (self._status_kb("VmHWM") - self.base_kb) / 1024.0
