"""Write the figures of the last reliability run into docs/RELIABILITY.md.

The tests record what they measured in build/reliability/<name>.json (tests/reliability.py);
this replaces the part of docs/RELIABILITY.md between the ``figures`` markers with tables of
those numbers, so the document shows the last run and how it was made.

    make test && make reliability
"""
from __future__ import annotations

import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from scripts import cli  # noqa: E402

START, END = "<!-- figures:start -->", "<!-- figures:end -->"

# name -> (title, formatted with the figures; [(key, label)])
SECTIONS = {
    "slow_connections": ("A normal upload while {half_sent_heads} clients hold half-sent heads "
                         "and {trickling_bodies} trickle bodies", [
        ("upload_median_quiet_ms", "upload median before (ms)"),
        ("upload_median_during_ms", "upload median during (ms)"),
        ("upload_max_during_ms", "slowest upload during (ms)")]),
    "overload": ("Overload: {clients} clients, {seconds} s, one worker, demo model", [
        ("answered_200", "answered 200"), ("answered_503", "answered 503 + Retry-After"),
        ("errors", "any other status or dropped connection"),
        ("p50_ms", "p50 of the 200s (ms)"), ("p99_ms", "p99 of the 200s (ms)"),
        ("healthz_checks", "/healthz checks during the storm"),
        ("healthz_max_ms", "slowest /healthz (ms)"),
        ("throughput_before", "throughput before, 4 clients, median of five 1 s windows (req/s)"),
        ("throughput_after", "throughput right after, the same measure (req/s)"),
        ("first_second_after", "... in the first second after (req/s)"),
        ("after_over_before", "after / before")]),
    "soak": ("Soak: {requests:,} requests, {clients} clients, demo model", [
        ("seconds", "seconds"),
        ("rss_mb_after_warmup", "worker RSS after 500 warm-up requests (MB)"),
        ("rss_mb_end", "worker RSS at the end (MB)"), ("rss_growth_pct", "RSS growth (%)"),
        ("fds_after_warmup", "open file descriptors after warm-up"), ("fds_end", "... at the end"),
        ("threads_after_warmup", "threads after warm-up"), ("threads_end", "... at the end"),
        ("temp_files", "files in temp/ at the end"), ("temp_mb", "MiB in temp/ at the end"),
        ("temp_caps", "temp/ caps")]),
    "kill_worker": ("kill -9 of one of two workers under 8 clients", [
        ("requests", "requests in the run"), ("failed_in_flight", "requests that failed"),
        ("replacement_ready_s", "kill to replacement worker ready (s)"),
        ("ok_after_replacement", "requests after that, all 200")]),
    "hung_model": ("A model call that hangs", [
        ("hang_s", "model call hangs for (s)"), ("request_timeout_s", "REQUEST_TIMEOUT (s)"),
        ("trap_answered_after_s", "client answered 503 after (s)")]),
    "slow_client": ("A body sent one byte a second", [
        ("upload_timeout_s", "UPLOAD_TIMEOUT (s)"), ("min_rate_kb_s", "UPLOAD_MIN_RATE_KB"),
        ("trickle_cut_after_s", "cut off with 408 after (s)"),
        ("other_requests_during", "other requests served meanwhile (all 200)")]),
    "contract": ("schemathesis against /openapi.json", [
        ("examples_per_operation", "examples per operation"), ("seed", "seed"),
        ("result", "result"), ("command", "command")]),
}


def render(results_dir: str) -> str:
    lines = []
    found = {}
    for name in SECTIONS:
        path = os.path.join(results_dir, f"{name}.json")
        if os.path.exists(path):
            with open(path) as fh:
                found[name] = json.load(fh)
    if not found:
        raise SystemExit(f"no figures in {results_dir}: run `make test` first")
    when = sorted(f["recorded"] for f in found.values())
    lines.append(f"Last run: {when[0]} to {when[-1]}, on {platform.machine()} with "
                 f"{os.cpu_count()} cores, Python {platform.python_version()} "
                 f"(`make test`, then `make reliability`).")
    for name, (title, rows) in SECTIONS.items():
        if name not in found:
            continue
        lines += ["", f"**{title.format(**found[name])}**", "", "| | |", "|---|---|"]
        for key, label in rows:
            value = found[name].get(key, "")
            value = f"`{value}`" if key == "command" else value
            lines.append(f"| {label} | {value} |")
    return "\n".join(lines)


def update(doc_path: str, figures: str) -> None:
    with open(doc_path) as fh:
        text = fh.read()
    if START not in text or END not in text:
        raise SystemExit(f"{doc_path} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(doc_path, "w") as fh:
        fh.write(f"{head}{START}\n{figures}\n{END}{tail}")


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], verbose_flag=False)
    parser.add_argument("--results", default=os.path.join(ROOT, "build", "reliability"))
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "RELIABILITY.md"))
    args = parser.parse_args(argv)
    update(args.doc, render(args.results))
    print(f"updated {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
