"""Load generation over loopback: photo-like JPEGs and closed-loop HTTP clients.

A library (no CLI) shared by ``scripts/benchmark.py`` and the reliability tests. Two drivers:
:func:`drive`, clients that are threads of the calling process (what the tests use), and
:func:`wrk_drive`, the C load generator ``wrk`` with ``scripts/wrk/post_image.lua``, which
costs far less CPU per request on a machine shared with the server. Both send raw
``image/jpeg`` bodies on keep-alive connections and report the latencies of the 200s.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time

import numpy as np


def photo_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG (smooth colour fields plus grain) of the given size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    base = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(base, np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def drive(port: int, body: bytes, concurrency: int, duration: float, warmup: int = 0,
          top_k: int = 5, polite: bool = True) -> dict:
    """``concurrency`` clients POST ``body`` for ``duration`` s; latencies of the 200s.

    A polite client waits out Retry-After (at most 1 s) after a 503; an impolite one retries at
    once (the overload test's worst case).
    """
    path = f"/classify?top_k={top_k}" if top_k else "/classify"

    def one(conn):
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - t0, response.getheader("Retry-After")

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(warmup):
        one(conn)
    conn.close()

    ok, shed, errors, bad_shed = [], [0], [0], [0]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        while time.perf_counter() < stop_at[0]:
            try:
                status, seconds, retry_after = one(c)
            except (OSError, http.client.HTTPException):
                with lock:
                    errors[0] += 1
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            with lock:
                if status == 200:
                    ok.append(seconds)
                elif status == 503:
                    shed[0] += 1
                    bad_shed[0] += retry_after is None
                else:
                    errors[0] += 1
            if status == 503 and polite:  # a polite client honours Retry-After
                time.sleep(min(float(retry_after or 1), 1.0))
        c.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)  # this process: the clients' own CPU
    began = time.perf_counter()
    stop_at[0] = began + duration
    start.wait()
    for t in threads:
        t.join(duration + 120)
    elapsed = time.perf_counter() - began
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    answers = len(ok) + shed[0]
    return {"driver": "python", "concurrency": concurrency, "polite": polite,
            "seconds": round(elapsed, 1), "ok": len(ok),
            "throughput": round(len(ok) / elapsed, 2), "goodput": round(len(ok) / elapsed, 2),
            "shed_share": round(shed[0] / answers, 4) if answers else 0.0,
            "client_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime
                                  - cpu0.ru_stime, 2),
            "p50_ms": _ms(percentile(ok, 50)), "p95_ms": _ms(percentile(ok, 95)),
            "p99_ms": _ms(percentile(ok, 99)), "shed_503": shed[0],
            "shed_without_retry_after": bad_shed[0], "errors": errors[0]}


WRK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk", "post_image.lua")


def wrk_available() -> str | None:
    """The wrk executable's path, or None when wrk is not installed."""
    return shutil.which("wrk")


def wrk_drive(url: str, body_path: str, connections: int, duration: float,
              threads: int | None = None, polite: bool = False, top_k: int = 5,
              timeout: float = 30.0, unique: bool = True, path: str | None = None,
              content_type: str = "image/jpeg") -> dict:
    """``connections`` closed-loop wrk clients POST the file ``body_path`` for ``duration`` s.

    ``threads`` wrk threads (default: one per connection, which the Lua script needs to time
    each answer and keep the 200s' latencies apart; with fewer, p50/p99 are None). Impolite
    (default): a client answered 503 sends again at once; polite: it waits Retry-After (at most
    1 s). Returns goodput (200s per second), the share of 503s among the answers, the wrk
    process's own CPU seconds (user + system, from wait4), and the Lua summary's counts and
    percentiles, with the same keys as :func:`drive` where they mean the same. ``unique``
    (default): each request's JPEG carries its own counter in a comment segment, so every
    request is a new image to the service's content-addressed store, as in real traffic.
    ``path`` (default ``/classify?top_k=...``) and ``content_type`` let the same clients post
    another body, such as a TF Serving ``:predict`` JSON body (sent the same every time).
    """
    exe = wrk_available()
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    threads = threads or connections
    if path is None:
        path = f"/classify?top_k={top_k}" if top_k else "/classify"
    env = {**os.environ, "WRK_PATH": path, "WRK_CONTENT_TYPE": content_type}
    cmd = [exe, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s",
           "--timeout", f"{max(1, round(timeout))}s", "-s", WRK_SCRIPT, url, "--",
           os.path.abspath(body_path), "polite" if polite else "impolite",
           "unique" if unique else "same"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read()
    # wait4 gives exactly this child's rusage; RUSAGE_CHILDREN before/after cross-checks it
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    summary = json.loads(line[len("WRK_JSON "):])
    paired = threads == connections
    seconds = summary["duration_s"]
    answers = summary["ok"] + summary["shed_503"] + summary["other"]
    socket_errors = sum(summary["socket_errors"].values())
    cpu = usage.ru_utime + usage.ru_stime
    return {"driver": "wrk", "concurrency": connections, "polite": polite,
            "seconds": round(seconds, 1), "ok": summary["ok"],
            "goodput": round(summary["ok"] / seconds, 2),
            "throughput": round(summary["ok"] / seconds, 2),  # 200s per second, as drive()
            "p50_ms": summary["ok_p50_ms"] if paired else None,
            "p95_ms": summary["ok_p95_ms"] if paired else None,
            "p99_ms": summary["ok_p99_ms"] if paired else None,
            "shed_503": summary["shed_503"],
            "shed_share": round(summary["shed_503"] / answers, 4) if answers else 0.0,
            "shed_without_retry_after": summary["shed_without_retry_after"],
            "other_statuses": summary["other_statuses"], "socket_errors": summary["socket_errors"],
            "errors": summary["other"] + socket_errors,
            "client_cpu_s": round(cpu, 2),
            "client_cpu_s_children": round(after.ru_utime + after.ru_stime
                                           - before.ru_utime - before.ru_stime, 2),
            "client_cpu_ms_per_answer": round(cpu * 1000 / answers, 3) if answers else None,
            "wall_s": round(elapsed, 1), "wrk_threads": threads,
            "shed_p50_ms": summary["shed_p50_ms"] if paired else None,
            "wrk_all_answers_p50_ms": summary["wrk_all_answers_p50_ms"],
            "wrk_all_answers_p99_ms": summary["wrk_all_answers_p99_ms"],
            "first_503": summary.get("first_503")}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def h2load_available() -> str | None:
    """The h2load executable's path (Debian's nghttp2-client), or None."""
    return shutil.which("h2load")


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def h2load_drive(url: str, body_path: str, connections: int, duration: float,
                 headers: dict[str, str] | None = None, warmup: int = 1) -> dict:
    """``connections`` closed-loop HTTP/2 clients (h2load: one connection and one stream in
    flight each, cleartext with prior knowledge, as gRPC uses) POST the file ``body_path`` to
    ``url`` for ``duration`` s after ``warmup`` s not counted.

    For gRPC, ``body_path`` holds one framed message (:func:`grpc_frame`) and ``headers`` say
    ``content-type: application/grpc`` and ``te: trailers``. h2load reads HTTP statuses only,
    and gRPC answers every call, failed or not, with HTTP 200 (the outcome is in the
    ``grpc-status`` trailer): ``http_200`` here counts answers, and the caller counts the
    successful ones from the server's own metrics. Latencies (p50/p99 of all answers) come from
    h2load's per-request log; ``client_cpu_s`` is h2load's own CPU (user + system, from wait4).
    """
    exe = h2load_available()
    if exe is None:
        raise RuntimeError("h2load is not installed (apt-get install nghttp2-client)")
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log", delete=False) as fh:
        log_path = fh.name
    cmd = [exe, "-c", str(connections), "-m", "1", "-t", "1", "-D", f"{max(1, round(duration))}",
           "--warm-up-time", f"{max(0, round(warmup))}", "-d", os.path.abspath(body_path),
           "--log-file", log_path]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    text = out.decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"h2load failed: {' '.join(cmd)}\n{text[-3000:]}")
    statuses: dict[str, int] = {}
    times: list[float] = []
    with open(log_path) as fh:
        for line in fh:
            fields = line.split("\t")
            if len(fields) >= 3:
                statuses[fields[1]] = statuses.get(fields[1], 0) + 1
                times.append(int(fields[2]) / 1e6)
    os.unlink(log_path)
    answers = sum(statuses.values())
    cpu = usage.ru_utime + usage.ru_stime
    seconds = float(max(1, round(duration)))
    return {"driver": "h2load", "concurrency": connections, "seconds": seconds,
            "answers": answers, "http_statuses": statuses,
            "http_200": statuses.get("200", 0),
            "answers_per_s": round(answers / seconds, 2),
            "p50_ms": _ms(percentile(times, 50)), "p99_ms": _ms(percentile(times, 99)),
            "client_cpu_s": round(cpu, 2),
            "client_cpu_ms_per_answer": round(cpu * 1000 / answers, 3) if answers else None,
            "wall_s": round(elapsed, 1), "h2load_summary": [
                ln.strip() for ln in text.splitlines() if ln.startswith(("requests:", "status"))]}
