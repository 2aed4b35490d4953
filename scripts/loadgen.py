"""Load generation over loopback: photo-like JPEGs and closed-loop HTTP clients.

A library (no CLI) shared by ``scripts/benchmark.py`` and the reliability tests. Clients are
threads of the calling process sending raw ``image/jpeg`` bodies on keep-alive connections.
"""
from __future__ import annotations

import http.client
import io
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
    began = time.perf_counter()
    stop_at[0] = began + duration
    start.wait()
    for t in threads:
        t.join(duration + 120)
    elapsed = time.perf_counter() - began
    return {"concurrency": concurrency, "seconds": round(elapsed, 1), "ok": len(ok),
            "throughput": round(len(ok) / elapsed, 2),
            "p50_ms": _ms(percentile(ok, 50)), "p95_ms": _ms(percentile(ok, 95)),
            "p99_ms": _ms(percentile(ok, 99)), "shed_503": shed[0],
            "shed_without_retry_after": bad_shed[0], "errors": errors[0]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)
