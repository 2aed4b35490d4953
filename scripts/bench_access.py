#!/usr/bin/env python3
"""Access control's costs (issue 24): does refusing a key leak how much of it was right, and
what does the key check add to a request?

    python scripts/bench_access.py --rounds 5000 --classify_rounds 1000 --inproc 200000 \
        --json build/bench/access.json

1. **In-process**: ``KeyRing.authenticate`` timed on a wrong key that shares all but its last
   character with a real one and on a random key of the same length, alternated, ``--inproc``
   calls each (``time.perf_counter_ns`` per call).
2. **Over HTTP**: the real server (the Dockerfile's command, ``MODEL_PATH`` the demo, one
   worker) with ``API_KEYS`` set; one keep-alive connection sends ``GET /models`` with the
   prefix key and with a random key, alternated, ``--rounds`` each; every answer must be 401.
3. **Overhead on /classify** (``--classify_rounds``, 0 to skip): the same small PNG posted to
   ``/classify`` with a valid key on that server, then to a server without keys, alternating
   blocks of 20 requests between the two running servers.

Reports median and inter-quartile range (µs) of each, and the ratios of the medians
(prefix ÷ random; keys ÷ no keys).
"""
from __future__ import annotations

import http.client
import io
import os
import secrets
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.keys import KeyRing, new_key  # noqa: E402
from scripts import cli  # noqa: E402
from scripts.liveserver import ROOT, LiveServer  # noqa: E402

DEMO = os.path.join(ROOT, "tf_files", "demo")


def summary(samples_ns: list[int]) -> dict:
    """Median, quartiles and IQR in microseconds."""
    q1, median, q3 = statistics.quantiles(samples_ns, n=4, method="inclusive")
    return {"n": len(samples_ns), "median_us": round(median / 1e3, 2),
            "q1_us": round(q1 / 1e3, 2), "q3_us": round(q3 / 1e3, 2),
            "iqr_us": round((q3 - q1) / 1e3, 2)}


def keys_to_compare(real: str) -> dict[str, str]:
    """A wrong key sharing all but the last character with ``real``, and a random one of the
    same length."""
    last = "A" if real[-1] != "A" else "B"
    return {"prefix": real[:-1] + last, "random": secrets.token_urlsafe(64)[:len(real)]}


def in_process(real: str, calls: int) -> dict:
    ring = KeyRing(f"bench:{real}:classify," + ",".join(
        f"other{i}:{new_key()}:classify" for i in range(9)))
    wrong = keys_to_compare(real)
    samples = {name: [] for name in wrong}
    for _ in range(calls):
        for name, key in wrong.items():
            t0 = time.perf_counter_ns()
            ring.authenticate(key)
            samples[name].append(time.perf_counter_ns() - t0)
    return {name: summary(values) for name, values in samples.items()}


def over_http(server: LiveServer, real: str, rounds: int) -> dict:
    wrong = keys_to_compare(real)
    samples = {name: [] for name in wrong}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for i in range(rounds + 50):  # the first 50 rounds warm up
            for name, key in (wrong.items() if i % 2 else reversed(list(wrong.items()))):
                t0 = time.perf_counter_ns()
                conn.request("GET", "/models", headers={"Authorization": f"Bearer {key}"})
                response = conn.getresponse()
                response.read()
                elapsed = time.perf_counter_ns() - t0
                if response.status != 401:
                    raise RuntimeError(f"expected 401 for the {name} key, got {response.status}")
                if i >= 50:
                    samples[name].append(elapsed)
    finally:
        conn.close()
    return {name: summary(values) for name, values in samples.items()}


def _png() -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def classify_overhead(with_keys: LiveServer, without: LiveServer, real: str,
                      rounds: int) -> dict:
    body = _png()
    targets = {"keys": (with_keys, {"Authorization": f"Bearer {real}"}), "no_keys": (without, {})}
    conns = {name: http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
             for name, (server, _) in targets.items()}
    samples = {name: [] for name in targets}
    try:
        done = -40  # two warm-up blocks
        while done < rounds:
            for name, (_, headers) in targets.items():
                for _ in range(20):
                    t0 = time.perf_counter_ns()
                    conns[name].request("POST", "/classify", body=body,
                                        headers={"Content-Type": "image/png", **headers})
                    response = conns[name].getresponse()
                    response.read()
                    elapsed = time.perf_counter_ns() - t0
                    if response.status != 200:
                        raise RuntimeError(f"/classify ({name}) answered {response.status}")
                    if done >= 0:
                        samples[name].append(elapsed)
            done += 20
    finally:
        for conn in conns.values():
            conn.close()
    return {name: summary(values) for name, values in samples.items()}


def run(rounds: int, classify_rounds: int, inproc: int, model: str = DEMO) -> dict:
    real = new_key()
    work = tempfile.mkdtemp(prefix="bench-access-")
    common = {"MODEL_PATH": model, "WORKERS": "1", "AUDIT_LOG": "off", "LOG_LEVEL": "warning",
              "FEEDBACK_DIR": "off"}
    result = {"in_process": in_process(real, inproc)}
    guarded = LiveServer({**common, "TEMP_DIR": os.path.join(work, "t1"),
                          "API_KEYS": f"bench:{real}:classify"})
    guarded.start(os.path.join(work, "guarded.log"))
    try:
        result["http_refusals"] = over_http(guarded, real, rounds)
        if classify_rounds:
            plain = LiveServer({**common, "TEMP_DIR": os.path.join(work, "t2")})
            plain.start(os.path.join(work, "plain.log"))
            try:
                result["classify"] = classify_overhead(guarded, plain, real, classify_rounds)
            finally:
                plain.stop()
    finally:
        guarded.stop()
    def ratio(part: str, a: str, b: str) -> float:
        return round(result[part][a]["median_us"] / result[part][b]["median_us"], 3)

    result["ratios"] = {"in_process_prefix_over_random": ratio("in_process", "prefix", "random"),
                        "http_prefix_over_random": ratio("http_refusals", "prefix", "random")}
    if "classify" in result:
        result["ratios"]["classify_keys_over_no_keys"] = ratio("classify", "keys", "no_keys")
    return result


def table(result: dict) -> str:
    rows = ["| measurement | key | n | median µs | IQR µs (q1–q3) |",
            "|---|---|---:|---:|---:|"]
    for part, title in (("in_process", "`KeyRing.authenticate`"),
                        ("http_refusals", "401 over HTTP (`GET /models`)"),
                        ("classify", "`POST /classify` 200")):
        for name, s in result.get(part, {}).items():
            rows.append(f"| {title} | {name} | {s['n']} | {s['median_us']} | "
                        f"{s['iqr_us']} ({s['q1_us']}–{s['q3_us']}) |")
    ratios = ", ".join(f"{k} = {v}" for k, v in result["ratios"].items())
    return "\n".join(rows) + f"\n\nRatios of medians: {ratios}"


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], verbose_flag=False)
    parser.add_argument("--rounds", type=int, default=3000, help="HTTP refusals per key")
    parser.add_argument("--classify_rounds", type=int, default=300,
                        help="/classify requests per server (0: skip)")
    parser.add_argument("--inproc", type=int, default=100_000,
                        help="in-process authenticate calls per key")
    parser.add_argument("--model", default=DEMO, help="MODEL_PATH of the servers")
    parser.add_argument("--json", help="also write the result here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args.rounds, args.classify_rounds, args.inproc, args.model)
    if args.json:
        cli.write_json(args.json, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
