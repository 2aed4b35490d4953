#!/usr/bin/env python3
"""Benchmark the service against the model's own limit, in one run.

Starts the real server (the Dockerfile's gunicorn command) with a model, drives it over loopback
at several concurrencies with a ~500x375 JPEG and a 12-megapixel JPEG, then stops it and measures
the same model alone in-process (batch 1, the best batch size, and the decode + resize of each
JPEG). Reports goodput (200s per second), the share of 503s, p50/p95/p99 of the 200s, errors,
the load generator's own CPU seconds, peak RSS per worker, time to ready, first-request
latency, and the ratios service / in-process, as a Markdown table and JSON.

    python scripts/benchmark.py --model build/models/inception_v3 --json build/bench.json

The load generator is ``wrk`` (``scripts/wrk/post_image.lua``, one connection per wrk thread)
when it is installed, else threads of this process (``scripts/loadgen.drive``, with a warning):
both send raw ``image/jpeg`` bodies on keep-alive connections, in a closed loop. By default a
client answered 503 sends again at once (``--polite``: it waits Retry-After, at most 1 s).
They ask for ``top_k=5`` (``--top_k``), as clients of a 1000-class model do. They share the
machine with the server, as a sidecar would; their CPU seconds are reported beside each level.

``--grpc 1,16,64`` adds gRPC levels on the same server after the REST ones: Triton's
``ModelInfer`` with the same JPEG as one BYTES element and the classification extension
(``top_k``), sent by ``h2load`` (nghttp2-client: a C HTTP/2 client, one call in flight per
connection), its successes counted by the server's own metrics (see :func:`grpc_level`).

``--refusal_cpu SECONDS`` adds the CPU a refused request costs the worker, answered at once and
paced (``--refusal_rates``; see
:func:`refused_request_cpu`); ``--profile SECONDS`` samples the worker with py-spy during one
more level (see :func:`profile_level`).
"""
from __future__ import annotations

import collections
import contextlib
import http.client
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import cli  # noqa: E402
from scripts.liveserver import LiveServer  # noqa: E402
from scripts.loadgen import (drive, grpc_frame, h2load_drive, photo_jpeg,  # noqa: E402
                             wrk_available, wrk_drive)


@dataclass
class BenchParams:
    """What one benchmark run measures."""

    model: str = "build/models/inception_v3"  # model folder to serve
    concurrency: tuple[int, ...] = (1, 4, 16, 64)  # client counts for the small JPEG
    large_concurrency: tuple[int, ...] = (1,)  # client counts for the 12-megapixel JPEG
    duration: float = 20.0  # seconds per load level
    warmup_requests: int = 5  # requests sent before each level, not counted
    env: dict = field(default_factory=dict)  # extra server environment (WORKERS, THREADS, ...)
    inprocess_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # batch sizes tried in-process
    top_k: int = 5  # what clients ask for (0: every label)
    driver: str = "auto"  # load generator: "wrk", "python", or "auto" (wrk when installed)
    polite: bool = False  # after a 503 wait Retry-After (True) or send again at once (False)
    refusal_cpu: float = 0.0  # seconds of the refused-request CPU measurement (0: skip it)
    refusal_rates: tuple[int, ...] = (0, 100)  # MAX_REFUSALS_PER_SECOND of its servers
    swap: float = 0.0  # seconds of each of two levels, without and with a new version (0: skip)
    swap_concurrency: int = 16  # clients during the swap levels
    profile: float = 0.0  # seconds of py-spy on the worker during one more level (0: skip it)
    profile_concurrency: int = 16  # clients during the profiled level
    grpc: tuple[int, ...] = ()  # client counts of gRPC ModelInfer levels (small JPEG; h2load)


def peak_rss_mb(pids: list[int], field: str = "VmHWM") -> dict:
    """Per process, from /proc: VmHWM (peak RSS) or RssAnon (private memory now), in MB."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith(field + ":"):
                        out[pid] = round(int(line.split()[1]) / 1024.0, 1)
        except OSError:
            continue
    return out


def in_process(model: str, batches: tuple[int, ...], env: dict,
               images: dict[str, bytes] | None = None) -> dict:
    """The model alone: median latency at batch 1, the best images/s over ``batches``, and the
    median decode and resize times of each of ``images`` (the service's own functions).

    The model runs on the runtime the server chose with the same settings (``RUNTIME``, the
    thread and precision variables, from this environment and ``env``, as the server's): with
    ``RUNTIME=auto`` a folder with a verified model.onnx runs on ONNX Runtime in both."""
    from common.config import Config
    from common.inference.loader import RuntimeOptions, load_classifier

    settings = Config.from_env({**os.environ, **env, "MODEL_PATH": model})
    clf = load_classifier(model, RuntimeOptions.from_config(settings))
    clf.warm_up(batches)
    rng = np.random.default_rng(0)
    per_batch = {}
    for n in batches:
        x = rng.random((n, *clf.input_shape), dtype=np.float32).astype(clf.spec.numpy_dtype)
        clf.predict(x)
        times = []
        budget = time.perf_counter() + 8.0
        cpu0 = time.process_time()
        while len(times) < 5 or (time.perf_counter() < budget and len(times) < 50):
            t0 = time.perf_counter()
            clf.predict(x)
            times.append(time.perf_counter() - t0)
        cpu_ms = (time.process_time() - cpu0) * 1000 / (n * len(times))
        median = statistics.median(times)
        per_batch[n] = {"ms_per_batch": round(median * 1000, 1),
                        "images_per_s": round(n / median, 2), "cpu_ms_per_image": round(cpu_ms, 2)}
    best = max(per_batch, key=lambda n: per_batch[n]["images_per_s"])
    return {"runtime": clf.runtime,
            "batch1_ms": per_batch[1]["ms_per_batch"] if 1 in per_batch else None,
            "best_batch": best, "best_images_per_s": per_batch[best]["images_per_s"],
            "best_cpu_ms_per_image": per_batch[best]["cpu_ms_per_image"],
            "per_batch": per_batch,
            "decode": {name: decode_times(data, tuple(clf.input_size))
                       for name, data in (images or {}).items()}}


def decode_times(data: bytes, size: tuple[int, int], repeats: int = 15) -> dict:
    """Median ms of ``decode_image`` (draft-mode JPEG decode to RGB) and of ``to_model_input``
    (resize + scale) for one image, as the service runs them for a model of input ``size``."""
    from common.inference.images import decode_image
    from common.inference.preprocessing import to_model_input

    decode, resize = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoded = decode_image(data, target_size=size)
        t1 = time.perf_counter()
        to_model_input(decoded.image, size)
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        resize.append(t2 - t1)
    return {"bytes": len(data), "decode_ms": round(statistics.median(decode) * 1000, 2),
            "resize_ms": round(statistics.median(resize) * 1000, 2)}


def choose_driver(driver: str) -> str:
    """"wrk" or "python": "auto" is wrk when it is installed, else python with a warning."""
    if driver == "auto":
        if wrk_available():
            return "wrk"
        print("warning: wrk is not installed (apt-get install wrk); the clients are Python "
              "threads of this process, which take CPU from the server", file=sys.stderr)
        return "python"
    if driver == "wrk" and not wrk_available():
        raise SystemExit("--driver wrk: wrk is not installed (apt-get install wrk)")
    return driver


def warm(port: int, body: bytes, requests: int, top_k: int, patience: float = 60.0) -> int:
    """``requests`` 200s on one connection, not counted; a 503 is retried after its
    Retry-After, so a level starts only once what the previous one left queued has drained.
    Returns the 503s met."""
    shed = 0
    ok = 0
    deadline = time.monotonic() + patience
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while ok < requests and time.monotonic() < deadline:
        conn.request("POST", f"/classify?top_k={top_k}" if top_k else "/classify", body=body,
                     headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        if response.status == 200:
            ok += 1
        else:
            shed += 1
            conn.close()
            time.sleep(min(float(response.getheader("Retry-After") or 1), 1.0))
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()
    return shed


def level(driver: str, port: int, body: bytes, body_path: str, concurrency: int,
          params: BenchParams, duration: float | None = None) -> dict:
    """One load level with the chosen driver (warm-up requests first, not counted)."""
    duration = params.duration if duration is None else duration
    warm_503 = warm(port, body, max(1, params.warmup_requests), params.top_k)
    if driver == "wrk":
        out = wrk_drive(f"http://127.0.0.1:{port}", body_path, concurrency, duration,
                        polite=params.polite, top_k=params.top_k)
    else:
        out = drive(port, body, concurrency, duration, 0, params.top_k, polite=params.polite)
    return {**out, "warmup_503s": warm_503}


def costed_level(driver: str, port: int, workers: list[int], body: bytes, body_path: str,
                 concurrency: int, params: BenchParams) -> dict:
    """:func:`level`, plus ``server_cpu_ms_per_200``: the workers' CPU over the level divided by
    its 200s (the level's warm-up 200s, max(1, N), are in the window too); and
    ``connections_per_worker``: how the clients' connections sat in the workers
    (:class:`ConnectionSplit`), and ``connections_moved``: how many the server moved."""
    before, moved = workers_cpu_s(workers), connections_moved(port)
    with ConnectionSplit(workers, port) as split:
        lv = level(driver, port, body, body_path, concurrency, params)
    answered = lv["ok"] + max(1, params.warmup_requests)
    lv["server_cpu_ms_per_200"] = round(
        (workers_cpu_s(workers) - before) * 1000 / max(1, answered), 2)
    lv["connections_per_worker"] = split.medians()
    after = connections_moved(port)
    lv["connections_moved"] = None if None in (moved, after) else after - moved
    return lv


def connections_moved(port: int) -> float | None:
    """The server's ``classifier_fair_share_moves_total`` (connections it asked to move to
    another worker), summed over its workers; None when /metrics does not have it."""
    found = re.search(r"^classifier_fair_share_moves_total (\S+)$", metrics_text(port), re.M)
    return float(found.group(1)) if found else None


def connections_per_worker(pids: list[int], port: int) -> list[int]:
    """Established TCP connections to ``port`` that each of ``pids`` holds (the sockets of
    /proc/net/tcp and tcp6 whose local port is ``port``, matched to each process's
    descriptors by inode); 0 for a process that is gone."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local remote state ... inode (10th)
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    counts = []
    for pid in pids:
        held = 0
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        except OSError:
            pass
        counts.append(held)
    return counts


class ConnectionSplit:
    """Samples :func:`connections_per_worker` twice a second in a thread while in use, from
    ``settle`` seconds on (the warm-up's and the load generator's connections made);
    :meth:`medians` is each worker's median, the most loaded first. The kernel hands each
    new connection to one of gunicorn's workers, and kept-alive clients stay where they
    landed unless the server moves them."""

    def __init__(self, pids: list[int], port: int, every: float = 0.5, settle: float = 2.0):
        self.pids, self.port, self.every, self.settle = pids, port, every, settle
        self.samples: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ConnectionSplit":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        if self._stop.wait(self.settle):
            return
        while not self._stop.wait(self.every):
            self.samples.append(connections_per_worker(self.pids, self.port))

    def medians(self) -> list[float]:
        if not self.samples:
            return []
        return sorted((statistics.median(column) for column in zip(*self.samples)),
                      reverse=True)


def grpc_infer_message(port: int, body: bytes, top_k: int) -> tuple[str, bytes]:
    """The gRPC ModelInfer request a Triton client sends for ``body`` (an encoded image, one
    BYTES element of the ``image_bytes`` input) asking for the ``top_k`` classes (Triton's
    classification extension; 0: every score), serialised with tritonclient's stubs; returns
    the default model's name and the message. Names come from the REST API of the same server."""
    from tritonclient.grpc import service_pb2

    answer = requests_json(port, "POST", "/classify", body)
    name = answer["model"]["name"]
    output = requests_json(port, "GET", f"/v2/models/{name}")["outputs"][0]["name"]
    request = service_pb2.ModelInferRequest(model_name=name)
    tensor = request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(body)
    out = request.outputs.add(name=output)
    if top_k:
        out.parameters["classification"].int64_param = top_k
    return name, request.SerializeToString()


def requests_json(port: int, method: str, path: str, body: bytes | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body,
                 headers={"Content-Type": "image/jpeg"} if body is not None else {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
    return json.loads(data)


def metrics_text(port: int) -> str:
    """The server's /metrics page (every worker's series, summed)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def grpc_calls(port: int, method: str = "/inference.GRPCInferenceService/ModelInfer"
               ) -> tuple[int, int]:
    """(calls answered OK, all calls) of the gRPC ``method`` so far, summed over the workers,
    from the server's /metrics (gRPC answers HTTP 200 to every call, so h2load cannot tell)."""
    ok = total = 0.0
    for line in metrics_text(port).splitlines():
        if line.startswith("classifier_requests_total{") and f'route="{method}"' in line:
            count = float(line.rsplit(" ", 1)[1])
            total += count
            ok += count if 'status="200"' in line else 0.0
    return int(ok), int(total)


def grpc_level(server: LiveServer, workers: list[int], body: bytes, concurrency: int,
               params: BenchParams, log_dir: str) -> dict:
    """``concurrency`` closed-loop gRPC clients (h2load over HTTP/2, one call in flight each)
    send the ModelInfer request of :func:`grpc_infer_message` for ``params.duration`` s, one
    second of warm-up first; goodput counts the calls the server answered OK (its metrics)."""
    name, message = grpc_infer_message(server.port, body, params.top_k)
    path = os.path.join(log_dir, "model_infer.grpc")
    with open(path, "wb") as fh:
        fh.write(grpc_frame(message))
    (before_ok, before_all), before_cpu = grpc_calls(server.port), workers_cpu_s(workers)
    lv = h2load_drive(f"http://127.0.0.1:{server.grpc_port}"
                      "/inference.GRPCInferenceService/ModelInfer", path, concurrency,
                      params.duration, {"content-type": "application/grpc", "te": "trailers"})
    ok, calls = grpc_calls(server.port)  # the warm-up second's calls included
    ok, calls = ok - before_ok, calls - before_all
    seconds = params.duration + 1.0
    lv.update({"image": "500x375", "protocol": "grpc ModelInfer (BYTES, classification)",
               "model": name, "ok": ok, "goodput": round(ok / seconds, 2),
               "not_ok": calls - ok,
               "server_cpu_ms_per_200": round(
                   (workers_cpu_s(workers) - before_cpu) * 1000 / max(1, ok), 2)})
    print(json.dumps(lv), file=sys.stderr)
    return lv


def run(params: BenchParams, log_dir: str | None = None) -> dict:
    small = photo_jpeg(500, 375, seed=1)
    large = photo_jpeg(4000, 3000, seed=2)
    log_dir = log_dir or tempfile.mkdtemp(prefix="bench-")
    paths = {}
    for name, data in (("500x375", small), ("4000x3000", large)):
        paths[name] = os.path.join(log_dir, f"{name}.jpg")
        with open(paths[name], "wb") as fh:
            fh.write(data)
    driver = choose_driver(params.driver)
    env = {"MODEL_PATH": params.model, "TEMP_DIR": os.path.join(log_dir, "temp"),
           "LOG_LEVEL": "warning", **params.env}
    server = LiveServer(env)
    server.start(os.path.join(log_dir, "server.log"), wait_ready=False)
    result = {"model": params.model, "params": asdict(params), "driver": driver,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}}
    try:
        result["time_to_ready_s"] = round(server.wait_ready(300), 2)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        t0 = time.perf_counter()
        conn.request("POST", f"/classify?top_k={params.top_k}" if params.top_k else "/classify",
                     body=small, headers={"Content-Type": "image/jpeg"})
        first = conn.getresponse()
        first.read()
        result["first_request_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        result["first_request_status"] = first.status
        conn.request("GET", "/model")
        result["server_runtime"] = json.loads(conn.getresponse().read()).get("runtime")
        conn.close()
        levels = []
        workers = server.worker_pids()
        for name, body, counts in (("500x375", small, params.concurrency),
                                   ("4000x3000", large, params.large_concurrency)):
            for c in counts:
                lv = costed_level(driver, server.port, workers, body, paths[name], c, params)
                levels.append({"image": name, **lv})
                print(json.dumps(levels[-1]), file=sys.stderr)
        result["levels"] = levels
        if params.grpc:
            result["grpc_levels"] = [
                grpc_level(server, workers, small, c, params, log_dir) for c in params.grpc]
        if params.profile:
            result["profile"] = profile_level(server, driver, small, paths["500x375"], params,
                                              log_dir)
        result["peak_rss_mb"] = peak_rss_mb(server.worker_pids())
        result["anon_rss_mb"] = peak_rss_mb(server.worker_pids(), "RssAnon")
    finally:
        server.stop()
    result["in_process"] = inproc = in_process(params.model, params.inprocess_batches, params.env,
                                               {"500x375": small, "4000x3000": large})
    if params.swap:
        result["swap"] = swap_levels(params, driver, paths["500x375"], small, log_dir)
    if params.refusal_cpu:
        result["refusal_cpu"] = refused_request_cpu(params.refusal_cpu, paths["500x375"],
                                                    log_dir, driver,
                                                    rates=params.refusal_rates)
    if inproc["runtime"] != result["server_runtime"]:  # the ratios would compare runtimes
        raise RuntimeError(f"the server ran {result['server_runtime']} but the in-process "
                           f"figures {inproc['runtime']}")
    result["ratios"] = ratios(result)
    return result


def ratios(result: dict) -> dict:
    """Service ÷ in-process (goodput at each small-image level, p50 at 1 client) and more."""
    inproc = result["in_process"]
    by = {(lv["image"], lv["concurrency"]): lv for lv in result["levels"]}
    out = {}
    for (image, c), lv in by.items():
        if image == "500x375" and c > 1:
            out[f"goodput_c{c}_vs_best_batch"] = round(lv["ok"] / lv["seconds"]
                                                       / inproc["best_images_per_s"], 3)
            if lv.get("server_cpu_ms_per_200"):
                # the most 200s per second the server's CPU per 200 allows on this machine's
                # cores, as a share of the in-process best: the ratio above cannot exceed it
                most = result["machine"]["cpus"] * 1000 / lv["server_cpu_ms_per_200"]
                out[f"cpu_ceiling_c{c}"] = round(most / inproc["best_images_per_s"], 3)
    if ("500x375", 1) in by and inproc["batch1_ms"]:
        c1 = by[("500x375", 1)]
        out["p50_c1_vs_batch1"] = round(c1["p50_ms"] / inproc["batch1_ms"], 3)
        out["first_request_vs_median"] = round(result["first_request_ms"] / c1["p50_ms"], 3)
        if ("4000x3000", 1) in by:
            out["large_vs_small_p50_c1"] = round(by[("4000x3000", 1)]["p50_ms"]
                                                 / c1["p50_ms"], 3)
    return out


# -- workers x threads -----------------------------------------------------------------------------
def sweep(params: BenchParams, settings: list[tuple[int | None, int | None, dict]],
          log_dir: str | None = None) -> dict:
    """The server at each (WORKERS, RUNTIME_THREADS, other variables) of ``settings`` (None:
    ``auto``), one after another, on the small JPEG at ``params.concurrency``; then the model
    in-process with all the CPUs. Per setting: time to ready, each level's goodput, p50, p99,
    503 share and server CPU per 200, and each worker's private memory (RssAnon) after the
    levels."""
    small = photo_jpeg(500, 375, seed=1)
    log_dir = log_dir or tempfile.mkdtemp(prefix="bench-sweep-")
    body_path = os.path.join(log_dir, "500x375.jpg")
    with open(body_path, "wb") as fh:
        fh.write(small)
    driver = choose_driver(params.driver)
    rows = []
    for n, (workers, threads, extra) in enumerate(settings):
        env = {"MODEL_PATH": params.model, "TEMP_DIR": os.path.join(log_dir, "temp"),
               "LOG_LEVEL": "warning", **params.env,
               "WORKERS": str(workers or "auto"), "RUNTIME_THREADS": str(threads or "auto"),
               **extra}
        server = LiveServer(env)
        server.start(os.path.join(log_dir, f"server-{n}-{workers}x{threads}.log"),
                     wait_ready=False)
        try:
            row = {"workers": workers or "auto", "runtime_threads": threads or "auto",
                   "env": extra, "time_to_ready_s": round(server.wait_ready(300), 2),
                   "levels": []}
            pids = server.worker_pids()
            row["worker_count"] = len(pids)
            for c in params.concurrency:
                lv = costed_level(driver, server.port, pids, small, body_path, c, params)
                row["levels"].append(lv)
                print(json.dumps({"setting": f"{workers}x{threads}", **extra, **lv}),
                      file=sys.stderr)
            row["anon_rss_mb"] = peak_rss_mb(pids, "RssAnon")
        finally:
            server.stop()
        rows.append(row)
    inproc = in_process(params.model, params.inprocess_batches, params.env)
    for row in rows:
        for lv in row["levels"]:
            lv["vs_in_process_best"] = round(lv["goodput"] / inproc["best_images_per_s"], 3)
    return {"model": params.model, "driver": driver, "params": asdict(params),
            "machine": {"cpus": os.cpu_count(), "usable_cpus": _usable_cpus(),
                        "platform": platform.platform()},
            "sweep": rows, "in_process": inproc}


def _usable_cpus() -> int:
    from common.machine import usable_cpus
    return usable_cpus()


def sweep_markdown(result: dict) -> str:
    ip = result["in_process"]
    lines = [f"`{result['model']}` on {result['machine']['usable_cpus']} usable CPUs "
             f"({result['driver']} clients; in-process best {ip['best_images_per_s']}/s at "
             f"batch {ip['best_batch']}, batch 1 {ip['batch1_ms']} ms, {ip['runtime']})", "",
             "| workers × runtime threads | ready after s | clients | goodput/s | ÷ in-process "
             "best | p50 ms | p99 ms | 503 share | server CPU ms per 200 | private MB a worker "
             "| connections a worker |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["sweep"]:
        rss = row["anon_rss_mb"]
        per_worker = round(sum(rss.values()) / len(rss)) if rss else ""
        setting = " ".join([f"{row['workers']} × {row['runtime_threads']}",
                            *(f"{k}={v}" for k, v in row.get("env", {}).items())])
        for lv in row["levels"]:
            lines.append(f"| {setting} | "
                         f"{row['time_to_ready_s']} | {lv['concurrency']} | {lv['goodput']} | "
                         f"{lv['vs_in_process_best']} | {lv['p50_ms']} | {lv['p99_ms']} | "
                         f"{lv['shed_share']} | {lv['server_cpu_ms_per_200']} | {per_worker} | "
                         f"{_split(lv)} |")
    return "\n".join(lines)


def _split(lv: dict) -> str:
    """A level's connections a worker, and how many moved: ``"32 / 32 (18 moved)"``."""
    split = " / ".join(f"{n:g}" for n in lv.get("connections_per_worker", []))
    moved = lv.get("connections_moved")
    return f"{split} ({moved:g} moved)" if moved else split


def parse_sweep(text: str) -> list[tuple[int | None, int | None, dict]]:
    """``"1x2,2x1,auto,auto:RUNTIME_THREADS_ALONE=0"`` -> [(1, 2, {}), (2, 1, {}),
    (None, None, {}), (None, None, {"RUNTIME_THREADS_ALONE": "0"})]: workers x threads
    (``auto``: both auto), then any variables of that setting alone, each after a colon."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        setting, *assignments = item.split(":")
        extra = dict(a.split("=", 1) for a in assignments)
        if setting == "auto":
            out.append((None, None, extra))
            continue
        workers, _, threads = setting.partition("x")
        out.append((int(workers), int(threads) if threads else None, extra))
    return out


# -- latency while a new version is published -----------------------------------------------------
def swap_levels(params: BenchParams, driver: str, body_path: str, body: bytes,
                log_dir: str) -> dict:
    """The model served from a repository (``bench/1``, MODEL_POLL_SECONDS=1): one level of
    ``params.swap`` seconds as is, then one during which version 2 (a copy of the same folder)
    is published a third of the way in and version 1 removed once 2 answers. Returns both
    levels; the p99 of the second against the first is what a roll-out costs."""
    import threading as _threading

    repo = os.path.join(log_dir, "repository")
    shutil.rmtree(repo, ignore_errors=True)
    os.makedirs(os.path.join(repo, "bench"))
    shutil.copytree(params.model, os.path.join(repo, "bench", "1"))
    env = {"MODEL_REPOSITORY": repo, "MODEL_POLL_SECONDS": "1",
           "TEMP_DIR": os.path.join(log_dir, "temp-swap"), "LOG_LEVEL": "warning", **params.env}
    server = LiveServer(env)
    server.start(os.path.join(log_dir, "server-swap.log"))
    out: dict = {"concurrency": params.swap_concurrency, "seconds": params.swap}
    try:
        out["steady"] = level(driver, server.port, body, body_path, params.swap_concurrency,
                              params, duration=params.swap)
        events = {}

        def publish():
            time.sleep(params.swap / 3)
            staging = os.path.join(repo, "bench", ".incoming-2")
            shutil.copytree(params.model, staging)
            os.rename(staging, os.path.join(repo, "bench", "2"))
            events["published_s"] = round(params.swap / 3, 1)
            t0 = time.monotonic()
            while time.monotonic() - t0 < params.swap:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
                conn.request("GET", "/models")
                text = conn.getresponse().read().decode()
                conn.close()
                if '"version":2,"state":"ready"' in text.replace(" ", ""):
                    events["ready_after_s"] = round(time.monotonic() - t0, 1)
                    shutil.rmtree(os.path.join(repo, "bench", "1"))
                    return
                time.sleep(0.2)

        thread = _threading.Thread(target=publish, daemon=True)
        thread.start()
        out["swapping"] = level(driver, server.port, body, body_path, params.swap_concurrency,
                                params, duration=params.swap)
        thread.join(params.swap * 2)
        out.update(events)
    finally:
        server.stop()
    return out


# -- the CPU of one refused request --------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def task_cpu(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of ``pid``: (utime + stime in clock ticks from task/*/stat, ns on CPU from
    task/*/schedstat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                ns = int(fh.read().split()[0])
        except OSError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12]), ns)
    return out


def workers_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system, every thread) the worker processes ``pids`` have used."""
    return sum(process_ticks(pid) for pid in pids) / os.sysconf("SC_CLK_TCK")


def process_ticks(pid: int, system_only: bool = False) -> int:
    """utime + stime (or stime alone) of the whole process in clock ticks (threads that ended
    included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[12]) + (0 if system_only else int(fields[11]))


def _delta(before: dict, after: dict) -> dict[int, tuple[int, int]]:
    return {tid: (a[0] - before.get(tid, (0, 0))[0], a[1] - before.get(tid, (0, 0))[1])
            for tid, a in after.items()}


def _thread_names(pid: int) -> dict[int, str]:
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                names[int(tid)] = fh.read().strip()
        except OSError:
            continue
    return names


class _Window:
    """Worker CPU over a window: whole process (ticks) and per thread (ticks, ns)."""

    def __init__(self, pid: int):
        self.pid = pid

    def __enter__(self):
        self.s0 = process_ticks(self.pid, system_only=True)
        self.p0, self.t0, self.w0 = process_ticks(self.pid), task_cpu(self.pid), time.monotonic()
        return self

    def __exit__(self, *exc):
        self.p1, self.t1 = process_ticks(self.pid), task_cpu(self.pid)
        self.system = process_ticks(self.pid, system_only=True) - self.s0  # kernel time
        self.wall = time.monotonic() - self.w0
        self.threads = _delta(self.t0, self.t1)

    def without(self, tids: set[int]) -> tuple[int, int]:
        """(ticks of the process, ns of its live threads), less the threads ``tids``."""
        ticks = self.p1 - self.p0 - sum(self.threads.get(t, (0, 0))[0] for t in tids)
        ns = sum(v[1] for t, v in self.threads.items() if t not in tids)
        return ticks, ns


def refused_request_cpu(seconds: float, body_path: str, log_dir: str, driver: str,
                        clients: tuple[int, ...] = (2, 16),
                        rates: tuple[int, ...] = (0, 100)) -> dict:
    """Worker CPU per refused request, in ms, with refusals answered at once and paced.

    One server per ``MAX_REFUSALS_PER_SECOND`` of ``rates`` (0: refusals answered at once),
    each measured as in :func:`_refusal_floods`. A paced flood answers few refusals while its
    clients' connections are held, so its CPU per refusal carries a fixed cost; the *marginal*
    CPU of one refusal is the slope between two rates' floods of the same clients:
    (CPU_a - CPU_b) / (refused_a - refused_b), and what is left of the slower rate's CPU is the
    fixed cost per second of holding those clients.
    """
    runs = []
    for i, rate in enumerate(rates):
        run_ = _refusal_floods(seconds, body_path, os.path.join(log_dir, f"refusals-{rate}"),
                               driver, clients, {"MAX_REFUSALS_PER_SECOND": str(rate)},
                               profile=i == 0)
        runs.append({"refusals_per_second": rate, **run_})
    out = {"seconds": seconds, "driver": driver, "runs": runs, "marginal": []}
    for a, b in zip(runs, runs[1:]):
        for fa, fb in zip(a["floods"], b["floods"]):
            extra = fa["refused"] - fb["refused"]
            if fa["clients"] != fb["clients"] or abs(extra) < 50:
                continue
            cpu_a = fa["worker_cpu_s_without_spinning"] - a["idle_worker_cpu_s"]
            cpu_b = fb["worker_cpu_s_without_spinning"] - b["idle_worker_cpu_s"]
            ms = (cpu_a - cpu_b) * 1000 / extra
            out["marginal"].append({
                "clients": fa["clients"], "rates": [a["refusals_per_second"],
                                                    b["refusals_per_second"]],
                "cpu_ms_per_refusal": round(ms, 3),
                "fixed_cpu_s_per_s": round((cpu_b - fb["refused"] * ms / 1000)
                                           / fb["wall_s"], 3)})
    return out


def _refusal_floods(seconds: float, body_path: str, log_dir: str, driver: str,
                    clients: tuple[int, ...], server_env: dict, profile: bool = True) -> dict:
    """Worker CPU per refused request, in ms, for one server.

    Serves the test suite's colour model built to spin (a busy loop in the graph) whenever a
    batch holds a pure magenta image. Windows of ``seconds`` each, read from
    /proc/<worker>/stat (whole process, threads that ended included) and
    /proc/<worker>/task/*/{stat,schedstat} (per thread):

    1. idle: no requests at all;
    2. spinning: one magenta image sent (2.5 s earlier, so the running call has overrun the
       admission budget and every new request is refused), no other request; the threads busy
       here (> 5% of the wall time), and every TensorFlow pool thread (tf_*, the loop moves
       between them), are the spinning ones;
    3. one flood per entry of ``clients``: that many impolite clients send the 500x375 JPEG,
       every request refused at admission (503 + Retry-After, body not read, connection closed).

    A flood's refusals are charged the worker's CPU less the spinning threads', less the same
    for the idle window, divided by the number of 503s.
    """
    from PIL import Image

    from tests.tiny_models import TRAP, save_colour_model

    hang = (3 + len(clients)) * seconds + 10
    os.makedirs(log_dir, exist_ok=True)
    folder = save_colour_model(os.path.join(log_dir, "spinning_model"), hang_seconds=hang)
    env = {"MODEL_PATH": folder, "TEMP_DIR": os.path.join(log_dir, "temp-refusal"),
           "LOG_LEVEL": "warning", "WORKERS": "1", "REQUEST_TIMEOUT": str(hang + 10),
           "MODEL_HANG_TIMEOUT": str(hang + 60), **server_env}
    server = LiveServer(env)
    server.start(os.path.join(log_dir, "server-refusal.log"))
    out: dict = {"seconds": seconds, "driver": driver, "clk_tck": CLK_TCK,
                 "hang_seconds": hang, "floods": []}
    floods = []
    try:
        with open(body_path, "rb") as fh:
            body = fh.read()
        warm(server.port, body, 20, 5)  # the request threads exist and have served once
        (pid,) = server.worker_pids()
        time.sleep(1.0)
        with _Window(pid) as idle:
            time.sleep(seconds)
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), TRAP).save(buf, "PNG")
        trapped = {}

        def send_trap():
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=hang + 30)
            conn.request("POST", "/classify", body=buf.getvalue(),
                         headers={"Content-Type": "image/png"})
            trapped["status"] = conn.getresponse().status

        threading.Thread(target=send_trap, daemon=True).start()
        time.sleep(2.5)  # the call has overrun its estimate by more than the 1 s budget
        probe = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        probe.request("POST", "/classify", body=body, headers={"Content-Type": "image/jpeg"})
        out["probe_status"] = probe.getresponse().status
        probe.close()
        with _Window(pid) as spinning:
            time.sleep(seconds)
        for c in clients:
            with _Window(pid) as window:
                if driver == "wrk":
                    load = wrk_drive(server.url, body_path, c, seconds, polite=False)
                else:
                    load = drive(server.port, body, c, seconds, polite=False)
            floods.append((window, load))
        # one more flood, not measured, with py-spy on the worker: where a refusal's CPU goes
        raw = os.path.join(log_dir, "profile-refusals.txt")
        spy = _start_pyspy(pid, seconds, raw, gil=True) if profile else None  # Python alone
        if spy is not None:
            time.sleep(0.5)
            load = (wrk_drive(server.url, body_path, clients[-1], seconds, polite=False)
                    if driver == "wrk" else
                    drive(server.port, body, clients[-1], seconds, polite=False))
            spy.communicate(timeout=seconds + 60)
            if spy.returncode == 0 and os.path.exists(raw):
                answers = load["shed_503"] * min(1.0, int(seconds) / load["seconds"])
                out["profile"] = {**summarise_profile(raw, 100, round(answers)), "raw": raw,
                                  "clients": clients[-1], "seconds": int(seconds)}
        out["trap_answered_before_the_end"] = "status" in trapped
        names = _thread_names(pid)
    finally:
        server.stop()
    # the spinning call moves between TensorFlow's pool threads (named tf_*); a refused request
    # never reaches TensorFlow, so all of them are left out, with any other busy one
    spin = {t for t, v in spinning.threads.items() if v[1] > 0.05 * spinning.wall * 1e9}
    spin |= {t for w, _ in floods for t in w.threads if names.get(t, "").startswith("tf_")}
    idle_ticks, idle_ns = idle.without(spin)
    out.update({
        "idle_wall_s": round(idle.wall, 2),
        "idle_worker_cpu_s": round(idle_ticks / CLK_TCK, 3),
        "spinning_threads": {f"{t} {names.get(t, '?')}": round(spinning.threads[t][1] / 1e9, 2)
                             for t in spin},
        "spinning_wall_s": round(spinning.wall, 2),
        "spinning_window_other_cpu_s": round(spinning.without(spin)[1] / 1e9, 3)})
    for window, load in floods:
        ticks, ns = window.without(spin)
        refused = load["shed_503"]
        busiest = sorted(((v[1], t) for t, v in window.threads.items() if t not in spin),
                         reverse=True)[:5]
        out["floods"].append({
            "clients": load["concurrency"], "refused": refused, "accepted": load["ok"],
            "wall_s": round(window.wall, 2),
            "spinning_threads_cpu_s": round(sum(window.threads.get(t, (0, 0))[1]
                                                for t in spin) / 1e9, 2),
            "worker_cpu_s_without_spinning": round(ticks / CLK_TCK, 2),
            "cpu_ms_per_refusal": round((ticks - idle_ticks) * 1000 / CLK_TCK / refused, 3)
            if refused else None,
            "kernel_ms_per_refusal": round((window.system - idle.system) * 1000 / CLK_TCK
                                           / refused, 3) if refused else None,
            "cpu_ms_per_refusal_schedstat": round((ns - idle_ns) / 1e6 / refused, 3)
            if refused else None,
            "client_cpu_ms_per_refusal": round(load["client_cpu_s"] * 1000 / refused, 3)
            if refused else None,
            "busiest_threads_s": {f"{t} {names.get(t, '?')}": round(ns_ / 1e9, 2)
                                  for ns_, t in busiest},
            "load": load})
    print(json.dumps({k: v for k, v in out.items() if k != "floods"}), file=sys.stderr)
    return out


# -- where the request path's CPU goes ---------------------------------------------------------
# Each sample is charged to the innermost frame that matches one of these (first match wins
# on that frame); patterns are matched against py-spy's "function (file:line)" frames.
CATEGORIES = [
    ("model call (TensorFlow)", r"tensorflow/|\(common/inference/(classifier\.py|runtimes/)"),
    ("JPEG decode",
     r"\(common/inference/images\.py|PIL/JpegImagePlugin|PIL/ImageFile|decode_image"),
    ("resize + scale", r"\(common/inference/preprocessing\.py|PIL/Image\.py.*resize"),
    ("JSON", r"\(json/|jsonify|flask/json"),
    ("storage (temp files)", r"\(common/storage\.py"),
    ("logging", r"\(logging/|\(common/logs\.py"),
    ("metrics", r"\(common/metrics\.py|prometheus_client/"),
    ("body read / upload", r"\(common/web/deadlines\.py|werkzeug/formparser|werkzeug/wsgi|"
                           r"gunicorn/http/body|\(socket\.py"),
    ("batcher", r"\(common/inference/batcher\.py"),
    ("gunicorn HTTP parse", r"gunicorn/http/(message|parser|unreader)"),
    ("gunicorn response write", r"gunicorn/http/wsgi|write \(gunicorn/util\.py"),
    ("gunicorn worker loop", r"gunicorn/"),
    ("service code (web, data plane, versions)", r"\(common/|\(app\.py"),
    ("Flask / Werkzeug", r"flask/|werkzeug/"),
]


# Leaf frames that block in C (lock, queue, selector waits): py-spy's --nonblocking idle
# detection misses some of them; they are counted apart and left out of the shares.
WAITING = re.compile(r"^(Condition\.wait|Event\.wait|Queue\.get|_worker|.*\.select|"
                     r"_wait_for_tstate_lock|Thread\.join|poll|sleep) \((threading|queue|"
                     r"selectors|concurrent/futures/thread|gunicorn/workers/gthread|time)\.py")


def summarise_profile(raw_path: str, rate: int, requests: int, top: int = 15) -> dict:
    """py-spy's raw (collapsed) stacks -> samples per category and per leaf function, with an
    estimate of ms per request (samples / rate / requests). Idle threads are not sampled;
    samples whose leaf is a blocking wait (WAITING) are counted apart and not in the shares."""
    compiled = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]
    per_category, per_leaf = collections.Counter(), collections.Counter()
    total = waiting = 0
    with open(raw_path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            if WAITING.search(frames[-1]):
                waiting += n
                continue
            total += n
            per_leaf[frames[-1]] += n
            name = "other"
            for frame in reversed(frames):
                match = next((cat for cat, rx in compiled if rx.search(frame)), None)
                if match:
                    name = match
                    break
            per_category[name] += n

    def entry(n):
        return {"samples": n, "share": round(n / total, 3) if total else 0.0,
                "ms_per_request": round(n / rate * 1000 / requests, 2) if requests else None}

    return {"samples": total, "waiting_samples_left_out": waiting, "rate_hz": rate,
            "requests": requests,
            "categories": {k: entry(v) for k, v in per_category.most_common()},
            "top_leaf_functions": {k: entry(v) for k, v in per_leaf.most_common(top)}}


def _start_pyspy(pid: int, seconds: float, raw: str, rate: int = 100, gil: bool = False):
    """py-spy record (raw stacks, --nonblocking) on ``pid`` for ``seconds``; None without it.
    ``gil``: only the thread holding the GIL is sampled, so threads waiting for the GIL (many,
    with one thread per connection) are not charged to the line they wait on; native code that
    releases the GIL (JPEG decode, TensorFlow) is then not seen."""
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        print("warning: py-spy not installed (pip install py-spy); no profile", file=sys.stderr)
        return None
    return subprocess.Popen([pyspy, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", str(rate), "--format", "raw", "--nonblocking",
                             "--output", raw] + (["--gil"] if gil else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def profile_level(server: LiveServer, driver: str, body: bytes, body_path: str,
                  params: BenchParams, log_dir: str, rate: int = 100) -> dict:
    """py-spy (``record --nonblocking``, raw stacks) on the worker for ``params.profile`` s while
    ``params.profile_concurrency`` clients send ``body``. Not counted in the levels: the
    sampler takes CPU from the server."""
    (pid,) = server.worker_pids()[:1]
    raw = os.path.join(log_dir, "profile.txt")
    seconds = params.profile
    spy = _start_pyspy(pid, seconds, raw, rate)
    if spy is None:
        return {"skipped": "py-spy not installed"}
    time.sleep(0.5)  # attached
    load = level(driver, server.port, body, body_path, params.profile_concurrency, params,
                 duration=seconds)
    _, err = spy.communicate(timeout=seconds + 60)
    if spy.returncode != 0 or not os.path.exists(raw):
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    # requests answered while py-spy sampled: the level's answers, scaled to py-spy's seconds
    answers = (load["ok"] + load["shed_503"]) * min(1.0, int(seconds) / load["seconds"])
    out = summarise_profile(raw, rate, round(answers))
    out.update({"raw": raw, "load": load, "seconds": int(seconds)})
    return out


def markdown(result: dict) -> str:
    lines = [f"Model `{result['model']}` on {result.get('server_runtime')} · load generator: "
             f"{result.get('driver', 'python')} · "
             f"time to ready {result['time_to_ready_s']} s · first "
             f"request {result['first_request_ms']} ms · peak RSS per worker "
             f"{', '.join(f'{v} MB' for v in result['peak_rss_mb'].values())} (private at the "
             f"end: {', '.join(f'{v} MB' for v in result['anon_rss_mb'].values())})", "",
             "| image | clients | after 503 | goodput 200/s | 503 share | p50 ms | p95 ms | "
             "p99 ms | 200s | 503s | errors | client CPU s | server CPU ms per 200 |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in result["levels"]:
        lines.append(f"| {lv['image']} | {lv['concurrency']} | "
                     f"{'wait Retry-After' if lv.get('polite') else 'retry at once'} | "
                     f"{lv['throughput']} | {lv.get('shed_share', '')} | "
                     f"{lv['p50_ms']} | {lv['p95_ms']} | {lv['p99_ms']} | {lv['ok']} | "
                     f"{lv['shed_503']} | {lv['errors']} | {lv.get('client_cpu_s', '')} | "
                     f"{lv.get('server_cpu_ms_per_200', '')} |")
    if result.get("grpc_levels"):
        lines += ["", "gRPC, the same server (`ModelInfer`, the JPEG as one BYTES element, "
                  "classification extension; h2load, one call in flight per client; the calls "
                  "answered OK counted by the server's metrics, over the level and its "
                  "warm-up second):", "",
                  "| clients | goodput OK/s | p50 ms (all) | p99 ms (all) | not OK | "
                  "client CPU s | server CPU ms per OK |", "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {lv['concurrency']} | {lv['goodput']} | {lv['p50_ms']} | {lv['p99_ms']} | "
                  f"{lv['not_ok']} | {lv['client_cpu_s']} | {lv['server_cpu_ms_per_200']} |"
                  for lv in result["grpc_levels"]]
    ip = result["in_process"]
    per_batch = ", ".join(f"{n}: {v['images_per_s']}" for n, v in ip["per_batch"].items())
    lines += ["", f"In-process, same run, on {ip.get('runtime', 'tensorflow')} (as the server): "
              f"batch 1 {ip['batch1_ms']} ms; best batch "
              f"{ip['best_batch']}: {ip['best_images_per_s']} images/s "
              f"({per_batch}), {ip.get('best_cpu_ms_per_image')} ms of CPU per image"]
    if ip.get("decode"):
        lines.append("Decode + resize in-process (median): " + "; ".join(
            f"{name} ({d['bytes'] // 1000} KB): decode {d['decode_ms']} ms, resize "
            f"{d['resize_ms']} ms" for name, d in ip["decode"].items()))
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["ratios"].items()]
    rc = result.get("refusal_cpu")
    if rc:
        lines += ["", f"Refused requests (spinning model, {rc['seconds']} s windows, one server "
                  "per MAX_REFUSALS_PER_SECOND; 0: answered at once):", "",
                  "| refusals/s | impolite clients | refused | accepted | worker CPU s (less "
                  "spinning) | ms per refusal (stat) | of which kernel | (schedstat) | "
                  "client ms per refusal |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['refusals_per_second']} | {f['clients']} | {f['refused']} | "
                  f"{f['accepted']} | {f['worker_cpu_s_without_spinning']} | "
                  f"**{f['cpu_ms_per_refusal']}** | {f['kernel_ms_per_refusal']} | "
                  f"{f['cpu_ms_per_refusal_schedstat']} | {f['client_cpu_ms_per_refusal']} |"
                  for r in rc["runs"] for f in r["floods"]]
        lines += ["", "Idle windows' worker CPU: " + ", ".join(
            f"{r['idle_worker_cpu_s']} s ({r['refusals_per_second']}/s server)"
            for r in rc["runs"])]
        if rc["marginal"]:
            lines += ["", "| clients | between refusals/s | marginal CPU ms per refusal | "
                      "fixed CPU s per s of the slower |", "|---:|---|---:|---:|"]
            lines += [f"| {m['clients']} | {m['rates'][0]} and {m['rates'][1]} | "
                      f"**{m['cpu_ms_per_refusal']}** | {m['fixed_cpu_s_per_s']} |"
                      for m in rc["marginal"]]
        prof = next((r["profile"] for r in rc["runs"] if r.get("profile")), None)
        if prof:
            lines += _profile_tables(prof, f"py-spy --gil during one more flood of "
                                     f"{prof['clients']} clients (not measured)", 12)
    sw = result.get("swap")
    if sw:
        lines += ["", f"Publishing a new version under load ({sw['concurrency']} clients, "
                  f"{sw['seconds']} s per level; version 2 published at {sw.get('published_s')} s, "
                  f"ready {sw.get('ready_after_s')} s later, then version 1 removed):", "",
                  "| level | goodput 200/s | 503s | errors | p50 ms | p99 ms |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {lv['goodput']} | {lv['shed_503']} | {lv['errors']} | "
                  f"{lv['p50_ms']} | {lv['p99_ms']} |"
                  for name, lv in (("no swap", sw["steady"]), ("swap", sw["swapping"]))]
    prof = result.get("profile")
    if prof and "categories" in prof:
        lines += _profile_tables(prof, f"py-spy, {prof['seconds']} s at "
                                 f"{prof['load']['concurrency']} clients")
    return "\n".join(lines)


def _profile_tables(prof: dict, title: str, top: int = 15) -> list[str]:
    lines = ["", f"{title}: {prof['samples']} samples at {prof['rate_hz']} Hz over "
             f"~{prof['requests']} answers ({prof['waiting_samples_left_out']} samples in "
             "blocking waits left out):", "", "| where | share of samples | ms per answer |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {v['share']} | {v['ms_per_request']} |"
              for k, v in prof["categories"].items()]
    lines += ["", "| leaf function | share | ms per answer |", "|---|---:|---:|"]
    lines += [f"| `{k}` | {v['share']} | {v['ms_per_request']} |"
              for k, v in list(prof["top_leaf_functions"].items())[:top]]
    return lines


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BenchParams.model)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--large_concurrency", default="1")
    parser.add_argument("--duration", type=float, default=BenchParams.duration)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="server setting, e.g. --env THREADS=64 (repeatable)")
    parser.add_argument("--top_k", type=int, default=BenchParams.top_k,
                        help="top_k the clients ask for (0: every label)")
    parser.add_argument("--driver", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator (auto: wrk when installed)")
    parser.add_argument("--polite", action="store_true",
                        help="clients wait Retry-After after a 503 (default: send again at once)")
    parser.add_argument("--refusal_cpu", type=float, default=0.0, metavar="SECONDS",
                        help="also measure the worker CPU of one refused request")
    parser.add_argument("--refusal_rates", default="0,100", metavar="R,R",
                        help="MAX_REFUSALS_PER_SECOND of the refusal servers (0: at once); the "
                             "marginal CPU of a refusal is the slope between them")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="also sample the worker with py-spy during one more level")
    parser.add_argument("--profile_concurrency", type=int, default=16)
    parser.add_argument("--swap", type=float, default=0.0, metavar="SECONDS",
                        help="also serve from a repository and publish a new version during a "
                             "level, beside one without (p99 during a roll-out)")
    parser.add_argument("--sweep", metavar="WxT,...",
                        help="instead: the server at each WORKERS x RUNTIME_THREADS (e.g. "
                             "1x2,2x1,auto; a setting's own variables after colons: "
                             "auto:RUNTIME_THREADS_ALONE=0), small JPEG only, beside the model "
                             "in-process")
    parser.add_argument("--grpc", default="", metavar="N,N",
                        help="also gRPC ModelInfer levels at these client counts (h2load, "
                             "apt-get install nghttp2-client)")
    parser.add_argument("--inprocess_batches", default="1,2,4,8,16,32")
    parser.add_argument("--json", help="write the full result here")
    args = cli.parse_args(parser, argv, tensorflow=True)
    env = dict(item.split("=", 1) for item in args.env)
    params = BenchParams(
        model=args.model, duration=args.duration, env=env,
        top_k=args.top_k, concurrency=tuple(int(c) for c in args.concurrency.split(",") if c),
        large_concurrency=tuple(int(c) for c in args.large_concurrency.split(",") if c),
        inprocess_batches=tuple(int(c) for c in args.inprocess_batches.split(",") if c),
        driver=args.driver, polite=args.polite, refusal_cpu=args.refusal_cpu,
        refusal_rates=tuple(int(r) for r in args.refusal_rates.split(",") if r),
        profile=args.profile, profile_concurrency=args.profile_concurrency, swap=args.swap,
        grpc=tuple(int(c) for c in args.grpc.split(",") if c))
    if args.sweep:
        result = sweep(params, parse_sweep(args.sweep))
        text = sweep_markdown(result)
    else:
        result = run(params)
        text = markdown(result)
    result["command"] = "python scripts/benchmark.py " + " ".join(argv or sys.argv[1:])
    if args.json:
        cli.write_json(args.json, result)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
