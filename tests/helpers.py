"""What several test files share: paths, the real server, uploads, the error envelope, metrics.

Tests import from here (and from the data helpers ``imagegen``, ``tiny_models``,
``webservers``, ``fuzzing``, ``reliability``), never from another test file.
"""
from __future__ import annotations

import dataclasses
import os
import re

import requests

from common.config import Config
from scripts.liveserver import LiveServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "tf_files", "demo")

__all__ = ["ROOT", "DEMO", "LiveServer", "start_server", "start_failing", "post_image",
           "assert_envelope", "metric", "metric_so_far", "PeakMemory"]


def config_variables() -> set[str]:
    """Every environment variable ``Config.from_env`` reads (the README, the image and the
    manifests are checked against it)."""
    return {field.metadata["env"] for field in dataclasses.fields(Config)}


def start_server(work, env: dict, name: str = "server", wait_ready: bool = True) -> LiveServer:
    """Start the real server with ``env``, its TEMP_DIR (``server.temp_dir``), FEEDBACK_DIR and
    log under the folder ``work``; returns once it is ready (unless ``wait_ready`` is False)."""
    server = LiveServer({"TEMP_DIR": str(work / "temp"), "FEEDBACK_DIR": str(work / "feedback"),
                         **env})
    server.temp_dir = str(work / "temp")
    return server.start(str(work / f"{name}.log"), wait_ready=wait_ready)


def start_failing(work, env: dict, timeout: float = 120) -> tuple[int, str]:
    """Start the real server with ``env`` (as :func:`start_server`) where it must stop by
    itself (a bad setting, a port taken): its exit code and all it printed."""
    server = start_server(work, env, wait_ready=False)
    try:
        code = server.proc.wait(timeout)
    finally:
        server.stop()
    return code, server.output(tail=None)


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


def _samples(text: str, name: str, labels: dict) -> list[float]:
    """The values of the samples of ``name`` in Prometheus text whose labels include ``labels``."""
    values = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == str(v) for k, v in labels.items()):
            values.append(float(m.group(4)))
    return values


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels``; a
    missing sample fails the test."""
    values = _samples(text, name, labels)
    assert values, f"no sample {name}{labels}"
    return sum(values)


#: The sample names each metric type exports (prometheus_client's text format).
_SAMPLE_SUFFIXES = {"counter": ("_total",), "gauge": ("",),
                    "histogram": ("_count", "_sum", "_bucket")}


def declared_samples() -> set[str]:
    """The sample names of every metric the service declares (``common.metrics.Metrics``)."""
    from common.metrics import Metrics
    return {family.name + suffix for family in Metrics().registry.collect()
            for suffix in _SAMPLE_SUFFIXES[family.type]}


def metric_so_far(text: str, name: str, **labels) -> float:
    """``metric`` where the series may not have started: 0 if no sample matches ``labels``.

    prometheus_client exports a labelled series from its first event on (a status not yet
    answered, a version that has run no batch), so a count read before the requests a test
    makes, or on a replica that served none, is legitimately absent. Only that absence reads
    0: ``text`` must be a metrics page (it carries ``classifier_requests_in_flight``, exported
    by every worker from start-up) and ``name`` a sample the service declares, so a failed
    scrape or a renamed metric fails the test instead of counting 0.
    """
    assert re.search(r"^classifier_requests_in_flight ", text, re.M), (
        f"not a metrics page: {text[:200]!r}")
    assert name in declared_samples(), f"{name} is not a metric the service declares"
    return sum(_samples(text, name, labels))


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
