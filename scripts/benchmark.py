#!/usr/bin/env python3
"""Benchmark the service against the model's own limit, in one run.

Starts the real server (the Dockerfile's gunicorn command) with a model, drives it over loopback
at several concurrencies with a ~500x375 JPEG and a 12-megapixel JPEG, then stops it and measures
the same model alone in-process (batch 1 and the best batch size). Reports throughput,
p50/p95/p99 latency, errors and 503s apart, peak RSS per worker, time to ready, first-request
latency, and the ratios service / in-process, as a Markdown table and JSON.

    python scripts/benchmark.py --model build/models/inception_v3 --json build/bench.json

Clients are threads of this process sending raw ``image/jpeg`` bodies on keep-alive
connections; a client that gets 503 waits as its Retry-After says (at most 1 s) before its next
request.
They ask for ``top_k=5`` (``--top_k``), as clients of a 1000-class model do. They share the
machine with the server, as a sidecar would.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.liveserver import LiveServer  # noqa: E402
from scripts.loadgen import drive, photo_jpeg  # noqa: E402


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


def in_process(model: str, batches: tuple[int, ...], env: dict) -> dict:
    """The model alone: median latency at batch 1 and the best images/s over ``batches``."""
    from common import tfruntime
    from common.classifier import load_classifier

    tfruntime.configure(int(env.get("TF_INTRA_OP_THREADS", 0)),
                         int(env.get("TF_INTER_OP_THREADS", 0)), env.get("PRECISION", "fp32"))
    clf = load_classifier(model)
    clf.warm_up(batches)
    rng = np.random.default_rng(0)
    per_batch = {}
    for n in batches:
        x = rng.random((n, *clf.input_size, 3), dtype=np.float32)
        clf.predict(x)
        times = []
        budget = time.perf_counter() + 8.0
        while len(times) < 5 or (time.perf_counter() < budget and len(times) < 50):
            t0 = time.perf_counter()
            clf.predict(x)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        per_batch[n] = {"ms_per_batch": round(median * 1000, 1),
                        "images_per_s": round(n / median, 2)}
    best = max(per_batch, key=lambda n: per_batch[n]["images_per_s"])
    return {"batch1_ms": per_batch[1]["ms_per_batch"] if 1 in per_batch else None,
            "best_batch": best, "best_images_per_s": per_batch[best]["images_per_s"],
            "per_batch": per_batch}


def run(params: BenchParams, log_dir: str | None = None) -> dict:
    small = photo_jpeg(500, 375, seed=1)
    large = photo_jpeg(4000, 3000, seed=2)
    log_dir = log_dir or tempfile.mkdtemp(prefix="bench-")
    env = {"MODEL_PATH": params.model, "TEMP_DIR": os.path.join(log_dir, "temp"),
           "LOG_LEVEL": "warning", **params.env}
    server = LiveServer(env)
    server.start(os.path.join(log_dir, "server.log"), wait_ready=False)
    result = {"model": params.model, "params": asdict(params),
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
        conn.close()
        levels = []
        for c in params.concurrency:
            levels.append({"image": "500x375", **drive(server.port, small, c, params.duration,
                                                        params.warmup_requests, params.top_k)})
            print(json.dumps(levels[-1]), file=sys.stderr)
        for c in params.large_concurrency:
            levels.append({"image": "4000x3000", **drive(server.port, large, c, params.duration,
                                                          params.warmup_requests, params.top_k)})
            print(json.dumps(levels[-1]), file=sys.stderr)
        result["levels"] = levels
        result["peak_rss_mb"] = peak_rss_mb(server.worker_pids())
        result["anon_rss_mb"] = peak_rss_mb(server.worker_pids(), "RssAnon")
    finally:
        server.stop()
    result["in_process"] = inproc = in_process(params.model, params.inprocess_batches, params.env)
    by = {(lv["image"], lv["concurrency"]): lv for lv in result["levels"]}
    ratios = {}
    if ("500x375", 16) in by:
        ratios["throughput_c16_vs_best_batch"] = round(
            by[("500x375", 16)]["throughput"] / inproc["best_images_per_s"], 3)
    if ("500x375", 1) in by and inproc["batch1_ms"]:
        c1 = by[("500x375", 1)]
        ratios["p50_c1_vs_batch1"] = round(c1["p50_ms"] / inproc["batch1_ms"], 3)
        ratios["first_request_vs_median"] = round(result["first_request_ms"] / c1["p50_ms"], 3)
        if ("4000x3000", 1) in by:
            ratios["large_vs_small_p50_c1"] = round(by[("4000x3000", 1)]["p50_ms"]
                                                    / c1["p50_ms"], 3)
    result["ratios"] = ratios
    return result


def markdown(result: dict) -> str:
    lines = [f"Model `{result['model']}` · time to ready {result['time_to_ready_s']} s · first "
             f"request {result['first_request_ms']} ms · peak RSS per worker "
             f"{', '.join(f'{v} MB' for v in result['peak_rss_mb'].values())} (private at the "
             f"end: {', '.join(f'{v} MB' for v in result['anon_rss_mb'].values())})", "",
             "| image | clients | images/s | p50 ms | p95 ms | p99 ms | 200s | 503s | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in result["levels"]:
        lines.append(f"| {lv['image']} | {lv['concurrency']} | {lv['throughput']} | "
                     f"{lv['p50_ms']} | {lv['p95_ms']} | {lv['p99_ms']} | {lv['ok']} | "
                     f"{lv['shed_503']} | {lv['errors']} |")
    ip = result["in_process"]
    per_batch = ", ".join(f"{n}: {v['images_per_s']}" for n, v in ip["per_batch"].items())
    lines += ["", f"In-process, same run: batch 1 {ip['batch1_ms']} ms; best batch "
              f"{ip['best_batch']}: {ip['best_images_per_s']} images/s "
              f"({per_batch})",
              "", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["ratios"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BenchParams.model)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--large_concurrency", default="1")
    parser.add_argument("--duration", type=float, default=BenchParams.duration)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="server setting, e.g. --env THREADS=64 (repeatable)")
    parser.add_argument("--top_k", type=int, default=BenchParams.top_k,
                        help="top_k the clients ask for (0: every label)")
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    params = BenchParams(
        model=args.model, duration=args.duration, env=env,
        top_k=args.top_k, concurrency=tuple(int(c) for c in args.concurrency.split(",") if c),
        large_concurrency=tuple(int(c) for c in args.large_concurrency.split(",") if c))
    result = run(params)
    result["command"] = "python scripts/benchmark.py " + " ".join(argv or sys.argv[1:])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
