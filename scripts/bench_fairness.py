#!/usr/bin/env python3
"""A fair share per client (issue 24), measured: one greedy client against four polite ones.

Starts the real server (the Dockerfile's command, ``TRUSTED_PROXIES=127.0.0.1``) with a model,
or drives the one at ``--url`` (which must trust 127.0.0.1 as a proxy for the identities to
count), and runs four phases of ``--duration`` seconds each:

1. **capacity**: the greedy client alone (60 connections, each resending a 503 or 429 at once):
   the server's goodput (200s per second) when one client keeps it saturated;
2. **fair share on**: the greedy client beside four polite clients (one connection each,
   waiting out ``Retry-After``, at most ``--max_wait`` s, after a 503 or 429);
3. **capacity again** (the same server): the capacity is the mean of 1 and 3, so that the
   machine's drift during the run moves the ratios less (both are reported);
4. **fair share off** (a second server with ``FAIR_SHARE=false``, started after the first is
   stopped; with ``--url`` only the server's own setting is measured): as 2.

Every client is one identity to the server: all run on this machine, so each sends its own
``X-Forwarded-For`` address (``10.24.0.1`` for the greedy one, ``10.24.0.2``... for the polite
ones) and the server believes it because the peer, 127.0.0.1, is a trusted proxy. The figure
of merit is each polite client's goodput / (capacity / 5), the target >= 0.8.

The clients are one asyncio loop in one process (raw HTTP/1.1 on keep-alive sockets, a
pre-built request, the answer's status and length parsed, nothing else), so they cost little
CPU on the machine the server shares; their CPU seconds are reported beside each phase.

    python scripts/bench_fairness.py --model build/models/mobilenet_v2 --duration 30 \\
        --json build/bench/fairness.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import cli  # noqa: E402
from scripts.liveserver import LiveServer  # noqa: E402
from scripts.loadgen import photo_jpeg  # noqa: E402

GREEDY = "10.24.0.1"
POLITE = tuple(f"10.24.0.{i}" for i in range(2, 6))


@dataclass
class FairnessParams:
    """What one fairness run measures."""

    model: str = "build/models/mobilenet_v2"  # model folder to serve
    url: str | None = None  # drive this server instead of starting one (it must trust 127.0.0.1)
    duration: float = 30.0  # seconds of each phase
    warmup: float = 3.0  # seconds of load before each phase, not counted
    greedy_connections: int = 60  # the greedy client's connections
    polite_clients: int = 4  # clients with one connection each
    max_wait: float = 5.0  # most seconds a polite client waits out a Retry-After
    top_k: int = 5  # what the clients ask for
    env: dict = field(default_factory=dict)  # extra server environment


@dataclass
class Tally:
    """One client's answers in the counted window."""

    ok: int = 0
    shed_503: int = 0
    over_share_429: int = 0
    other: int = 0
    errors: int = 0


class Client:
    """One identity: ``connections`` keep-alive connections in a closed loop. Polite: after a
    503 or 429 a connection waits Retry-After (at most ``max_wait`` s); greedy: it resends at
    once."""

    def __init__(self, name: str, address: str, connections: int, polite: bool,
                 request: bytes, max_wait: float):
        self.name, self.address, self.polite = name, address, polite
        self.connections, self.request, self.max_wait = connections, request, max_wait
        self.tally = Tally()
        self.counting = False

    def count(self, status: int | None) -> None:
        if not self.counting:
            return
        t = self.tally
        if status == 200:
            t.ok += 1
        elif status == 503:
            t.shed_503 += 1
        elif status == 429:
            t.over_share_429 += 1
        elif status is None:
            t.errors += 1
        else:
            t.other += 1

    async def connection(self, port: int, stop: asyncio.Event) -> None:
        reader = writer = None
        while not stop.is_set():
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(self.request)
                status, retry_after, keep = await _response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                self.count(None)
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
                continue
            self.count(status)
            if not keep:  # a refused request's unread body: the server closes the connection
                writer.close()
                reader = writer = None
            if status in (429, 503) and self.polite:
                await _sleep_unless(stop, min(float(retry_after or 1), self.max_wait))
        if writer is not None:
            writer.close()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def _response(reader: asyncio.StreamReader) -> tuple[int, str | None, bool]:
    """(status, Retry-After, whether the connection stays open) of one answer, body skipped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, retry_after, keep = 0, None, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "retry-after":
            retry_after = value.strip()
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
    if length:
        await reader.readexactly(length)
    return status, retry_after, keep


def build_request(path: str, body: bytes, address: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"X-Forwarded-For: {address}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def _drive(port: int, clients: list[Client], warmup: float, duration: float) -> float:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.connection(port, stop))
             for c in clients for _ in range(c.connections)]
    await asyncio.sleep(warmup)
    for c in clients:
        c.counting = True
    began = time.perf_counter()
    await asyncio.sleep(duration)
    for c in clients:
        c.counting = False
    elapsed = time.perf_counter() - began
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    for task in tasks:
        task.cancel()
    return elapsed


def phase(port: int, params: FairnessParams, body: bytes, polite: bool) -> dict:
    """Drive the greedy client, and with ``polite`` the polite ones, for one phase."""
    path = f"/classify?top_k={params.top_k}" if params.top_k else "/classify"
    clients = [Client("greedy", GREEDY, params.greedy_connections, False,
                      build_request(path, body, GREEDY), params.max_wait)]
    if polite:
        clients += [Client(f"polite{i + 1}", address, 1, True,
                           build_request(path, body, address), params.max_wait)
                    for i, address in enumerate(POLITE[:params.polite_clients])]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = asyncio.run(_drive(port, clients, params.warmup, params.duration))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    out = {"seconds": round(elapsed, 1), "client_cpu_s": round(cpu, 2), "clients": {}}
    for c in clients:
        out["clients"][c.name] = {**asdict(c.tally), "connections": c.connections,
                                  "goodput": round(c.tally.ok / elapsed, 2)}
    out["total_goodput"] = round(sum(c.tally.ok for c in clients) / elapsed, 2)
    return out


def ratios(result: dict, phase_name: str, polite_clients: int) -> dict:
    """Each polite client's goodput / (capacity / (polite clients + 1)), the capacity being the
    mean of the phases before and after the fair share's."""
    fair = result["capacity_goodput"] / (polite_clients + 1)
    clients = result[phase_name]["clients"]
    return {name: round(c["goodput"] / fair, 3) if fair else None
            for name, c in clients.items() if name != "greedy"}


def run(params: FairnessParams, log_dir: str | None = None) -> dict:
    log_dir = log_dir or tempfile.mkdtemp(prefix="fairness-")
    body = photo_jpeg(500, 375, seed=1)
    result: dict = {"params": asdict(params)}

    def with_server(fair_share: bool, phases: list[tuple[str, bool]]) -> None:
        if params.url:
            port = int(params.url.rsplit(":", 1)[1].rstrip("/"))
            for name, polite in phases:
                result[name] = phase(port, params, body, polite)
            return
        env = {"MODEL_PATH": params.model, "TRUSTED_PROXIES": "127.0.0.1",
               "FAIR_SHARE": "true" if fair_share else "false", "LOG_LEVEL": "warning",
               "TEMP_DIR": os.path.join(log_dir, "temp"), **params.env}
        server = LiveServer(env)
        server.start(os.path.join(log_dir, f"server-{fair_share}.log"), wait_ready=True,
                     timeout=300)
        try:
            result.setdefault("workers", len(server.worker_pids()))
            for name, polite in phases:
                result[name] = phase(server.port, params, body, polite)
                print(json.dumps({name: result[name]}), file=sys.stderr)
        finally:
            server.stop()

    with_server(True, [("capacity", False), ("fair_share_on", True),
                       ("capacity_again", False)])
    if not params.url:
        with_server(False, [("fair_share_off", True)])
    before, after = (result[name]["total_goodput"] for name in ("capacity", "capacity_again"))
    result["capacity_goodput"] = round((before + after) / 2, 2)
    result["fair"] = round(result["capacity_goodput"] / (params.polite_clients + 1), 2)
    result["ratios"] = {name: ratios(result, name, params.polite_clients)
                        for name in ("fair_share_on", "fair_share_off") if name in result}
    return result


def markdown(result: dict) -> str:
    lines = [f"Capacity (the greedy client alone, before and after the fair share's phase): "
             f"{result['capacity']['total_goodput']} and "
             f"{result['capacity_again']['total_goodput']}, mean "
             f"**{result['capacity_goodput']}** answers/s; a fair share of "
             f"{len(result['fair_share_on']['clients'])} clients: {result['fair']}/s.", "",
             "| phase | client | connections | goodput /s | ÷ fair share | 200s | 503s | 429s "
             "| errors | client CPU s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("capacity", "fair_share_on", "capacity_again", "fair_share_off"):
        if name not in result:
            continue
        ph = result[name]
        for client, c in ph["clients"].items():
            ratio = result["ratios"].get(name, {}).get(client)
            lines.append(f"| {name} | {client} | {c['connections']} | {c['goodput']} | "
                         f"{'' if ratio is None else ratio} | {c['ok']} | {c['shed_503']} | "
                         f"{c['over_share_429']} | {c['errors'] + c['other']} | "
                         f"{ph['client_cpu_s'] if client == 'greedy' else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    defaults = FairnessParams()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=defaults.model)
    ap.add_argument("--url", default=None, help="drive this server (it must trust 127.0.0.1)")
    ap.add_argument("--duration", type=float, default=defaults.duration)
    ap.add_argument("--warmup", type=float, default=defaults.warmup)
    ap.add_argument("--greedy_connections", type=int, default=defaults.greedy_connections)
    ap.add_argument("--polite_clients", type=int, default=defaults.polite_clients)
    ap.add_argument("--max_wait", type=float, default=defaults.max_wait)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra server environment (repeatable)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    params = FairnessParams(model=args.model, url=args.url, duration=args.duration,
                            warmup=args.warmup, greedy_connections=args.greedy_connections,
                            polite_clients=args.polite_clients, max_wait=args.max_wait,
                            env=dict(item.split("=", 1) for item in args.env))
    result = run(params)
    if args.json:
        cli.write_json(args.json, result)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
