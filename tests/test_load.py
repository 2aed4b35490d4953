"""Long runs on the real server with the demo model: overload (64 clients for 30 s against one
worker) and soak (5,000 requests). Marked ``long``: part of `make test` (CI), figures recorded
for docs/RELIABILITY.md."""
import os
import statistics
import threading
import time

import imagegen as ig
import pytest
import requests
from helpers import DEMO, LiveServer, start_server
from reliability import record

from scripts.loadgen import drive, photo_jpeg

pytestmark = [pytest.mark.long, pytest.mark.server]
OVERLOAD_SECONDS = float(os.environ.get("OVERLOAD_SECONDS", "30"))
SOAK_REQUESTS = int(os.environ.get("SOAK_REQUESTS", "5000"))


def start(tmp_path, env: dict) -> LiveServer:
    """The demo model on one worker."""
    return start_server(tmp_path, {"MODEL_PATH": DEMO, "WORKERS": "1", **env})


def test_overload_64_clients_one_worker(tmp_path):
    """Every answer is 200 or 503 + Retry-After, /healthz answers throughout, and throughput is
    back at once afterwards."""
    server = start(tmp_path, {})
    body = photo_jpeg(640, 480, seed=3)
    health, stop = [], threading.Event()

    def watch_health():
        while not stop.is_set():
            t = time.perf_counter()
            try:
                status = requests.get(server.url + "/healthz", timeout=5).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            health.append((status, time.perf_counter() - t))
            time.sleep(0.2)

    try:
        before = _throughput(server, body, warmup=20)
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        storm = drive(server.port, body, concurrency=64, duration=OVERLOAD_SECONDS,
                      polite=False)
        stop.set()
        watcher.join(30)
        after = _throughput(server, body)
        pid_alive = server.proc.poll() is None
    finally:
        stop.set()
        server.stop()
    assert pid_alive
    assert storm["errors"] == 0, storm  # no status other than 200/503, no dropped connection
    assert storm["shed_without_retry_after"] == 0, storm
    assert storm["ok"] > 0
    assert health and all(status == 200 for status, _ in health), health
    assert after["errors"] == 0 and after["shed_503"] == 0, after
    # Recovery, not a speed target: a server still digesting a backlog would be far slower.
    # Medians of five 1-second windows, so one hiccup of this shared machine does not decide.
    assert after["throughput"] >= 0.6 * before["throughput"], (before, after)
    assert after["windows"][0] >= 0.5 * before["throughput"], (before, after)  # at once
    record("overload", {
        "clients": 64, "seconds": storm["seconds"], "answered_200": storm["ok"],
        "answered_503": storm["shed_503"], "errors": storm["errors"],
        "p50_ms": storm["p50_ms"], "p99_ms": storm["p99_ms"],
        "healthz_checks": len(health),
        "healthz_max_ms": round(max(s for _, s in health) * 1000, 1),
        "throughput_before": before["throughput"], "throughput_after": after["throughput"],
        "first_second_after": after["windows"][0],
        "after_over_before": round(after["throughput"] / before["throughput"], 3)})


def _throughput(server, body, warmup: int = 0) -> dict:
    """4 clients, five 1-second windows: the median throughput and each window's."""
    runs = [drive(server.port, body, concurrency=4, duration=1, warmup=warmup if i == 0 else 0)
            for i in range(5)]
    windows = [r["throughput"] for r in runs]
    return {"throughput": statistics.median(windows), "windows": windows,
            "errors": sum(r["errors"] for r in runs), "shed_503": sum(r["shed_503"] for r in runs)}


def _proc(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as fh:
        status = dict(line.split(":", 1) for line in fh if ":" in line)
    return {"rss_kb": int(status["VmRSS"].split()[0]), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _images(count: int, seed: int) -> list[bytes]:
    """Distinct images of varied formats and sizes (each a new file for temp/)."""
    colours = [ig.RED, ig.GREEN, ig.BLUE, (200, 200, 40), (30, 30, 30)]
    out = []
    for i in range(count):
        size = (48 + (i * 7) % 200, 40 + (i * 13) % 160)
        picture = ig.noisy(colours[i % 5], size, seed=seed + i)
        out.append(ig.encode(picture, "JPEG" if i % 3 else "PNG", **({"quality": 85}
                                                                      if i % 3 else {})))
    return out


def _hammer(server, images: list[bytes], clients: int) -> dict:
    """Send every image once, ``clients`` at a time, each client on one keep-alive session."""
    statuses, lock, index = {}, threading.Lock(), iter(range(len(images)))

    def client():
        with requests.Session() as session:
            while True:
                with lock:
                    i = next(index, None)
                if i is None:
                    return
                response = session.post(server.url + "/classify",
                                        files={"image": ("x", images[i])}, timeout=60)
                with lock:
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return statuses


def _settled(pid: int) -> dict:
    time.sleep(1.0)  # clients closed their connections; let the worker notice
    return _proc(pid)


def test_soak_5000_requests(tmp_path):
    """RSS after warm-up grows at most 5%, temp/ stays within its caps, and neither file
    descriptors nor threads leak."""
    max_files, max_mb, clients, warmup = 300, 2, 8, 500
    # Leaks are the subject, not admission: on a busy machine the expected wait of a full
    # batch can pass QUEUE_MAX_WAIT_MS's default and refuse one request (503 overloaded), and
    # bodies read slowly can overlap past BODIES_IN_FLIGHT's default (THREADS less 2 here: a
    # CI run with other work on the machine got 29 such 503s in 4500).
    server = start(tmp_path, {"THREADS": str(clients), "TEMP_MAX_FILES": str(max_files),
                              "TEMP_MAX_MB": str(max_mb), "QUEUE_MAX_WAIT_MS": "60000",
                              "BODIES_IN_FLIGHT": str(clients)})
    try:
        (pid,) = server.worker_pids()
        started = _proc(pid)
        warm_statuses = _hammer(server, _images(warmup, seed=0), clients)
        warm = _settled(pid)
        t0 = time.perf_counter()
        statuses = _hammer(server, _images(SOAK_REQUESTS - warmup, seed=10_000), clients)
        seconds = time.perf_counter() - t0
        end = _settled(pid)
        names = os.listdir(server.temp_dir)
        images = [n for n in names if not n.startswith(".")]
        stored = sum(os.path.getsize(os.path.join(server.temp_dir, n)) for n in images)
    finally:
        server.stop()
    assert warm_statuses == {200: warmup} and statuses == {200: SOAK_REQUESTS - warmup}
    growth = end["rss_kb"] / warm["rss_kb"] - 1
    record("soak", {"requests": SOAK_REQUESTS, "clients": clients, "seconds": round(seconds, 1),
                    "rss_mb_start": round(started["rss_kb"] / 1024, 1),
                    "rss_mb_after_warmup": round(warm["rss_kb"] / 1024, 1),
                    "rss_mb_end": round(end["rss_kb"] / 1024, 1),
                    "rss_growth_pct": round(growth * 100, 2),
                    "fds_after_warmup": warm["fds"], "fds_end": end["fds"],
                    "threads_after_warmup": warm["threads"], "threads_end": end["threads"],
                    "temp_files": len(images), "temp_mb": round(stored / 2**20, 2),
                    "temp_caps": f"{max_files} files / {max_mb} MiB"})
    assert growth <= 0.05, (warm, end)
    assert end["fds"] <= warm["fds"], (warm, end)
    assert end["threads"] <= warm["threads"], (warm, end)
    assert len(images) <= max_files and stored <= max_mb * 2**20
    assert sorted(set(names) - set(images)) == [".ledger"]  # no half-written files left behind
