#!/usr/bin/env python3
"""Hostile requests against the real server, and what they cost it.

Starts the real server (the Dockerfile's gunicorn command, one worker, the given model) and
measures the figures hostile input is held to (docs/BENCHMARKS.md, "Hostile requests"):

* the worker's peak memory for one request ÷ the RGB size of the largest image allowed
  (``MAX_IMAGE_PIXELS`` × 3 bytes), over decompression bombs of every kind found so far;
* the worker's peak while eight bombs arrive at once, against ``DECODE_MEMORY_MB`` plus the
  worker's memory before them (the model's own), with the answers' statuses and the slowest
  ``/healthz`` meanwhile;
* the worker's CPU seconds per MiB of body for requests that are refused;
* a normal upload's latency while 80 connections hold half-sent headers and 48 trickle bodies;
* the new metric series that 10,000 requests with made-up methods, routes and models add.

The worker's peak is the kernel's (``VmHWM`` after ``clear_refs``), its CPU from ``/proc``.

    python scripts/attacks.py --model tf_files/demo --markdown build/attacks.md

A library too: :func:`bombs` and :func:`tiff_with_strips` make the files the tests post.
"""
from __future__ import annotations

import concurrent.futures
import gzip
import io
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from scripts import cli  # noqa: E402
from scripts.liveserver import LiveServer  # noqa: E402
from scripts.loadgen import photo_jpeg  # noqa: E402

MIB = 2**20
FLOOR_MIB = 1 / 64  # 16 KiB


# -- the files ------------------------------------------------------------------------------
def bombs(size: tuple[int, int]) -> dict[str, bytes]:
    """Small files that decode to ``size`` pixels, one of each kind that once cost a worker
    many times their RGB size: transparency, 16 bits, floats, progressive JPEG, WebP."""
    from PIL import Image

    rgba = Image.new("RGBA", size, (0, 0, 0, 0))
    return {
        "webp_lossless_rgba": _encode(rgba, "WEBP", lossless=True),
        "png_1bit_transparent": _encode(Image.new("1", size), "PNG", transparency=0),
        "png_palette_transparent": _encode(Image.new("P", size), "PNG", transparency=0),
        "png_rgba": _encode(rgba, "PNG"),
        "png_16bit": _encode(Image.new("I;16", size), "PNG"),
        "tiff_float": _encode(Image.new("F", size), "TIFF", compression="tiff_deflate"),
        "jpeg_progressive": _encode(Image.new("RGB", size), "JPEG", progressive=True,
                                    subsampling=0),
        "gif_transparent": _encode(Image.new("P", size), "GIF", transparency=0),
    }


def _encode(image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def tiff_with_strips(strips: int, size: tuple[int, int] = (64, 64),
                     pixels: int | None = None) -> bytes:
    """A little-endian TIFF whose first directory lists ``strips`` strip offsets and byte
    counts for a grey image of ``size`` (more strips than its rows when ``strips`` > height),
    followed by ``pixels`` bytes of pixel data (default: all of them)."""
    width, height = size
    entries, ifd = 7, 8
    offsets_at = ifd + 2 + entries * 12 + 4
    counts_at = offsets_at + 4 * strips
    pixels_at = counts_at + 4 * strips
    fields = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
              (262, 3, 1, 1), (273, 4, strips, offsets_at), (279, 4, strips, counts_at)]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd) + struct.pack("<H", entries))
    for tag, kind, count, value in fields:
        out += struct.pack("<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0)
    out += struct.pack(f"<{strips}I", *([pixels_at] * strips))
    out += struct.pack(f"<{strips}I", *([1] * strips))
    out += b"\x80" * (width * height if pixels is None else pixels)
    return bytes(out)


def refused_requests(model: str) -> dict[str, tuple[str, str, dict, bytes]]:
    """Requests the server must refuse cheaply: name -> (method, path, headers, body)."""
    json_type = {"Content-Type": "application/json"}
    small = _encode_small_png()
    b64 = __import__("base64").b64encode(small).decode()
    return {
        "webp bomb 16383x3051 (raw)": (
            "POST", "/classify", {"Content-Type": "image/webp"}, _webp_bomb()),
        "TIFF, a million strips": (
            "POST", "/classify", {"Content-Type": "image/tiff"}, tiff_with_strips(1_000_000)),
        "v2 BYTES, 8 MiB of empty elements": (
            "POST", f"/v2/models/{model}/infer", json_type, _json_list(
                '{"inputs":[{"name":"images","datatype":"BYTES","shape":[-1],"data":[', '""',
                "]}]}", 8 * MIB)),
        "v1 instances, 16 MiB of numbers": (
            "POST", f"/v1/models/{model}:predict", json_type, _json_list(
                '{"instances":[', "0", "]}", 16 * MIB - 64 * 1024)),
        "v1 instances, 16 MiB of {}": (
            "POST", f"/v1/models/{model}:predict", json_type, _json_list(
                '{"instances":[', "{}", "]}", 16 * MIB - 64 * 1024)),
        ":classify context, 4,000 keys x 8,000 examples": (
            "POST", f"/v1/models/{model}:classify", json_type, json.dumps(
                {"context": {f"k{i}": 0 for i in range(4000)},
                 "examples": [{}] * 8000}).encode()),
        "v2 outputs x150,000 beside 8 images": (
            "POST", f"/v2/models/{model}/infer", json_type, json.dumps(
                {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [8],
                             "data": [b64] * 8}],
                 "outputs": [{"name": "probabilities"}] * 150_000}).encode()),
        "v2 shape [2^62+1, 4]": (
            "POST", f"/v2/models/{model}/infer", json_type, json.dumps(
                {"inputs": [{"name": "images", "datatype": "FP32",
                             "shape": [4611686018427387905, 4], "data": [0.5] * 4}]}).encode()),
        "/feedback, 8 MiB chunked": (
            "POST", "/feedback", {**json_type, "Transfer-Encoding": "chunked"},
            _json_list('{"filename":"x.png","label":"y","pad":[', "0", "]}", 8 * MIB)),
        "gzip bomb as a v1 body (1 GiB inflated)": (
            "POST", f"/v1/models/{model}:predict",
            {**json_type, "Content-Encoding": "gzip"}, gzip.compress(b" " * (64 * MIB))),
    }


def _encode_small_png() -> bytes:
    from PIL import Image
    return _encode(Image.new("RGB", (32, 32), (200, 30, 30)), "PNG")


def _webp_bomb() -> bytes:
    from PIL import Image
    return _encode(Image.new("RGBA", (16383, 3051), (0, 0, 0, 0)), "WEBP", lossless=True)


def _json_list(head: str, element: str, tail: str, size: int) -> bytes:
    count = max(1, (size - len(head) - len(tail)) // (len(element) + 1))
    return (head + ",".join([element] * count) + tail).encode()


# -- the measurements -----------------------------------------------------------------------
class Worker:
    """The one worker process of a server: its peak memory and CPU, from /proc."""

    def __init__(self, pid: int):
        self.pid = pid

    def _kb(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def reset_peak(self) -> float:
        with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
            fh.write("5")
        return self._kb("VmRSS") / 1024

    def peak_mb(self) -> float:
        return self._kb("VmHWM") / 1024

    def cpu_s(self) -> float:
        """CPU seconds of all the worker's threads, to the nanosecond (schedstat)."""
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as fh:
                    total += int(fh.read().split()[0])
            except OSError:  # the thread ended meanwhile
                continue
        return total / 1e9


def send(port: int, method: str, path: str, headers: dict, body: bytes,
         timeout: float = 60) -> tuple[int, bytes]:
    """One request on its own connection (chunked when the headers say so) -> (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if headers.get("Transfer-Encoding") == "chunked":
            conn.putrequest(method, path)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            for start in range(0, len(body), 65536):
                piece = body[start:start + 65536]
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            conn.send(b"0\r\n\r\n")
        else:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                conn.putheader(name, value)
            conn.endheaders()
            conn.send(body)
    except OSError:  # the server answered and closed before the whole body was sent
        pass
    try:
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, repr(exc).encode()
    finally:
        conn.close()


def single_request_peaks(server: LiveServer, worker: Worker, max_pixels: int) -> dict:
    """Each bomb at just under ``max_pixels`` (and the 34-byte-class WebP): status and the
    worker's peak rise ÷ the RGB size of a ``max_pixels`` image."""
    side = int(max_pixels ** 0.5 * 0.999)
    files = bombs((side, side))
    files["webp_lossless_rgba 16383x3051"] = _webp_bomb()
    rgb_mb = 3 * max_pixels / MIB
    rss_before = worker.reset_peak()
    rows = {}
    for name, data in tqdm(files.items(), desc="bombs, one at a time", unit="request"):
        base = worker.reset_peak()
        status, _ = send(server.port, "POST", "/classify",
                         {"Content-Type": "application/octet-stream"}, data)
        rise = worker.peak_mb() - base
        rows[name] = {"bytes": len(data), "status": status, "peak_rise_mb": round(rise, 1),
                      "ratio": round(rise / rgb_mb, 3)}
    time.sleep(0.5)
    return {"rgb_mb": round(rgb_mb, 1), "size": [side, side], "rows": rows,
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(worker.reset_peak(), 1),
            "max_ratio": max(r["ratio"] for r in rows.values())}


def concurrent_bombs(server: LiveServer, worker: Worker, max_pixels: int,
                     decode_memory_mb: float) -> dict:
    """Eight bombs of different kinds at once, twice, while /healthz is polled."""
    side = int(max_pixels ** 0.5 * 0.999)
    files = list(bombs((side, side)).values())
    base = worker.reset_peak()
    stop, health = threading.Event(), []

    def probe():
        while not stop.is_set():
            started = time.monotonic()
            status, _ = send(server.port, "GET", "/healthz", {}, b"", timeout=30)
            health.append((status, time.monotonic() - started))
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda data: send(
            server.port, "POST", "/classify", {"Content-Type": "application/octet-stream"},
            data)[0], files * 2))
    stop.set()
    prober.join()
    peak = worker.peak_mb()
    return {"statuses": sorted(statuses), "before_mb": round(base, 1),
            "peak_mb": round(peak, 1), "peak_rise_mb": round(peak - base, 1),
            "decode_memory_mb": decode_memory_mb,
            "within": peak - base <= decode_memory_mb,
            "healthz_all_200": all(s == 200 for s, _ in health),
            "healthz_max_s": round(max((t for _, t in health), default=0.0), 3)}


def refusal_cpu(server: LiveServer, worker: Worker, model: str) -> dict:
    """Each refused request alone: status, body MiB, the worker's CPU seconds (all threads)
    per MiB, peak rise. A body under ``FLOOR_MIB`` counts as that much: any request has a
    fixed cost of a millisecond or two, which no multiple of a 100-byte body covers."""
    rows = {}
    for name, (method, path, headers, body) in tqdm(
            refused_requests(model).items(), desc="refused requests", unit="request"):
        base = worker.reset_peak()
        cpu = worker.cpu_s()
        status, answer = send(server.port, method, path, headers, body)
        time.sleep(0.2)  # work that goes on after the answer is counted too
        used = worker.cpu_s() - cpu
        mib = len(body) / MIB
        rows[name] = {"status": status, "body_mib": round(mib, 3), "cpu_s": round(used, 3),
                      "cpu_s_per_mib": round(used / max(mib, FLOOR_MIB), 3),
                      "peak_rise_mb": round(worker.peak_mb() - base, 1),
                      "answer_bytes": len(answer)}
    refused = [r for r in rows.values() if 400 <= r["status"] < 600]
    return {"rows": rows, "max_cpu_s_per_mib": max(r["cpu_s_per_mib"] for r in refused)}


def upload_under_slow_clients(server: LiveServer, headers_held: int = 80,
                              bodies_held: int = 48, samples: int = 20) -> dict:
    """A normal JPEG upload's latency, quiet and while connections hold half-sent headers and
    trickle bodies (one byte a second)."""
    photo = photo_jpeg(500, 375)

    def timed() -> list[tuple[int, float]]:
        out = []
        for _ in range(samples):
            started = time.monotonic()
            status, _ = send(server.port, "POST", "/classify?top_k=5",
                             {"Content-Type": "image/jpeg"}, photo)
            out.append((status, time.monotonic() - started))
        return out

    quiet = timed()
    socks, stop = [], threading.Event()
    for i in range(headers_held + bodies_held):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        if i < headers_held:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Ty")
        else:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 100000\r\n\r\n\xff")
        socks.append(sock)

    def trickle():
        while not stop.wait(1.0):
            for sock in socks[headers_held:]:
                try:
                    sock.send(b"\0")
                except OSError:
                    pass

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    time.sleep(1.0)
    attacked = timed()
    stop.set()
    for sock in socks:
        sock.close()

    def p50(rows):
        return round(statistics.median(t for _, t in rows) * 1000, 1)

    return {"quiet_p50_ms": p50(quiet), "attacked_p50_ms": p50(attacked),
            "attacked_max_ms": round(max(t for _, t in attacked) * 1000, 1),
            "attacked_statuses": sorted({s for s, _ in attacked}),
            "quiet_statuses": sorted({s for s, _ in quiet})}


def metric_series(server: LiveServer, requests_count: int = 10_000) -> dict:
    """Series in /metrics before and after requests with made-up methods, paths and models."""
    import http.client

    def series() -> set[str]:
        _, text = send(server.port, "GET", "/metrics", {}, b"")
        return {line.split(" ")[0] for line in text.decode().splitlines()
                if line and not line.startswith("#")}

    warm = [("GET", "/healthz"), ("POST", "/classify"), ("GET", "/nothing")]
    for method, path in warm:  # the labels ordinary traffic makes
        send(server.port, method, path, {"Content-Type": "image/png"}, b"")
    before = series()

    def batch(start: int, count: int):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for i in range(start, start + count):
            path = [f"/x{i}", f"/models/m{i}/classify", f"/v2/models/m{i}/infer",
                    f"/v1/models/m{i}:predict", f"/models/demo/versions/{i}/classify"][i % 5]
            try:
                conn.request(f"M{i}" if i % 2 else "GET", path, body=b"")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.close()

    def send_all(count: int, offset: int):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda start: batch(start, count // 8),
                          range(offset, offset + count, count // 8)))

    send_all(1000, 10**6)  # each route template, method and status once: a bounded set
    warmed = series()
    send_all(requests_count, 0)
    after = series()
    return {"requests": requests_count, "series_before": len(before),
            "series_after_first_1000": len(warmed), "series_after": len(after),
            "new_series": sorted(after - warmed)[:20], "new_series_count": len(after - warmed)}


def run(model: str, env: dict, log_dir: str) -> dict:
    settings = {"MODEL_PATH": model, "WORKERS": "1", **env}
    max_pixels = int(settings.get("MAX_IMAGE_PIXELS", 50_000_000))
    decode_mb = float(settings.get("DECODE_MEMORY_MB", 512))
    server = LiveServer({"TEMP_DIR": os.path.join(log_dir, "temp"),
                         "FEEDBACK_DIR": os.path.join(log_dir, "feedback"), **settings})
    server.start(os.path.join(log_dir, "server.log"))
    try:
        (pid,) = server.worker_pids()
        worker = Worker(pid)
        name = json.loads(send(server.port, "GET", "/readyz", {}, b"")[1])["model"]["name"]
        send(server.port, "POST", "/classify", {"Content-Type": "image/jpeg"},
             photo_jpeg(500, 375))
        result = {"model": model, "env": settings, "worker_rss_mb": worker.reset_peak()}
        result["single"] = single_request_peaks(server, worker, max_pixels)
        result["concurrent"] = concurrent_bombs(server, worker, max_pixels, decode_mb)
        result["refusals"] = refusal_cpu(server, worker, name)
        result["slow_clients"] = upload_under_slow_clients(server)
        result["metrics"] = metric_series(server)
        return result
    finally:
        server.stop()


def markdown(result: dict) -> str:
    s, c, r = result["single"], result["concurrent"], result["refusals"]
    slow, m = result["slow_clients"], result["metrics"]
    lines = [
        "| figure | target | measured |", "|---|---|---|",
        f"| peak of one request ÷ RGB size of the largest image allowed ({s['rgb_mb']} MiB) "
        f"| ≤ 2 | {s['max_ratio']:.2f} |",
        f"| 16 bombs, 8 at a time: worker's peak rise (before: {c['before_mb']} MiB) "
        f"| ≤ DECODE_MEMORY_MB = {c['decode_memory_mb']:g} | {c['peak_rise_mb']} MiB; "
        f"answers {sorted(set(c['statuses']))}; /healthz all 200: {c['healthz_all_200']}, "
        f"slowest {c['healthz_max_s'] * 1000:.0f} ms |",
        f"| CPU of a refused request ÷ its body | ≤ 0.25 s/MiB | "
        f"{r['max_cpu_s_per_mib']:.3f} s/MiB at most |",
        f"| normal upload p50 while 80 half-sent headers + 48 trickled bodies "
        f"| 200 within the usual latency | {slow['attacked_p50_ms']} ms "
        f"(quiet {slow['quiet_p50_ms']} ms), max {slow['attacked_max_ms']} ms, "
        f"statuses {slow['attacked_statuses']} |",
        f"| new metric series from {m['requests']:,} made-up requests (after 1,000 such "
        f"requests, which met every route template: {m['series_before']} → "
        f"{m['series_after_first_1000']}) | 0 | {m['new_series_count']} |",
        f"| the worker's RSS before and after the bombs | back to the allocator "
        f"| {s['rss_before_mb']} → {s['rss_after_mb']} MiB |",
        "", "| bomb (one request) | bytes | status | peak rise MiB | ÷ RGB |",
        "|---|---:|---:|---:|---:|"]
    for name, row in s["rows"].items():
        lines.append(f"| {name} | {row['bytes']:,} | {row['status']} | {row['peak_rise_mb']} "
                     f"| {row['ratio']:.2f} |")
    lines += ["", "| refused request | body MiB | status | CPU s | s/MiB | peak rise MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['body_mib']} | {row['status']} | {row['cpu_s']} | "
                     f"{row['cpu_s_per_mib']} | {row['peak_rise_mb']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf_files/demo")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a server setting (repeatable)")
    parser.add_argument("--json", help="write the full result here")
    parser.add_argument("--markdown", help="write the Markdown tables here")
    args = cli.parse_args(parser, argv, tensorflow=False)
    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="attacks-") as work:
        result = run(args.model, env, work)
    text = markdown(result)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
