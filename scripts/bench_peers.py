#!/usr/bin/env python3
"""Our service beside KServe's Python model server, LitServe and BentoML, in one run.

Every server serves the same ``model.onnx`` on ONNX Runtime with the same thread settings
(``ONNX_INTRA_OP_THREADS``, ``ONNX_INTER_OP_THREADS``, ``ONNX_SPINNING``, from ``--intra_op``
etc.) and preprocesses with our own ``common.inference.images.load_for_model``
(``scripts/peers/onnx_model.py``), so the serving framework is what differs. Each peer runs from
its own virtualenv (``build/peers/<name>/``, made from ``scripts/peers/requirements-<name>.txt``
when missing or out of date, ``pip check`` clean) and is written as its documentation shows,
batching on where it has batching (``scripts/peers/*``).

One after another, each started on a free loopback port, waited for until it answers, warmed
up, driven by ``wrk`` (``scripts/wrk/post_image.lua``, one connection per wrk thread, a client
answered 503 sends again at once) at each of ``--concurrency`` for ``--duration`` s, then
stopped: our service on ``/classify`` (the raw 500x375 JPEG, a new image each request) and on
``/v1/models/<name>:predict`` (the body every peer gets: TF-Serving-style JSON,
``{"instances": [{"b64": ...}]}``, the same bytes each request), then each peer on its
``:predict``, then our service again (both bodies) to show how much the machine drifted during
the run. Reports goodput (200s per second), p50 and p99 of the 200s, the 503 share, wrk's own
CPU seconds and the server's CPU ms per 200 per level, and the ratios of ours to the best peer,
as JSON and a Markdown table.

    python scripts/bench_peers.py --model build/models/mobilenet_v2 --json build/bench/peers.json
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import cli  # noqa: E402
from scripts.liveserver import ROOT, LiveServer, free_port  # noqa: E402
from scripts.loadgen import photo_jpeg, wrk_available, wrk_drive  # noqa: E402

PEERS_DIR = os.path.join(ROOT, "scripts", "peers")
PEER_NAMES = ("kserve", "litserve", "bentoml")
#: The rows of the table that are our service, and which body each sends.
OURS = {"ours /classify (raw JPEG)": "raw", "ours :predict (b64 JSON)": "b64"}
AGAIN = " again"  # suffix of the rows measured at the end of the run


@dataclass
class PeerParams:
    """What one side-by-side run measures."""

    model: str = "build/models/mobilenet_v2"  # model folder with a verified model.onnx
    peers: tuple[str, ...] = PEER_NAMES  # which peers, in this order
    concurrency: tuple[int, ...] = (1, 16, 64)  # wrk connections per level
    duration: float = 20.0  # seconds per level
    warmup_requests: int = 5  # 200s before each level, not counted
    intra_op: int = 0  # ONNX_INTRA_OP_THREADS of every server (0: ONNX Runtime's, ours' default)
    inter_op: int = 0  # ONNX_INTER_OP_THREADS of every server
    spinning: bool = False  # ONNX_SPINNING of every server (ours' default: off)
    max_batch: int = 8  # batch limit of every batching server (our BATCH_MAX_SIZE default)
    workers: int = 0  # processes of every server (ours: WORKERS; 0: each server's default)
    batch_wait_ms: float = 10.0  # LitServe's batch_timeout (BentoML adapts its own wait)
    venv_root: str = os.path.join(ROOT, "build", "peers")  # build/peers/<name>/
    env: dict = field(default_factory=dict)  # extra settings of our service


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the peers' virtualenvs -----------------------------------------------------------------------
def requirements_path(name: str) -> str:
    return os.path.join(PEERS_DIR, f"requirements-{name}.txt")


def ensure_venv(name: str, venv_root: str, python: str = sys.executable) -> str:
    """``venv_root/name`` with ``requirements-<name>.txt`` installed and ``pip check`` clean;
    made afresh (``--clear``) when missing or made from another requirements file. Returns the
    virtualenv's folder."""
    venv = os.path.join(venv_root, name)
    with open(requirements_path(name), "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    stamp = os.path.join(venv, ".installed")
    if os.path.exists(stamp) and open(stamp).read().strip() == digest:
        return venv
    progress(f"{name}: making {venv} from {os.path.relpath(requirements_path(name), ROOT)} "
             "(a few minutes)")
    os.makedirs(venv_root, exist_ok=True)
    pip = os.path.join(venv, "bin", "pip")
    for cmd in ([python, "-m", "venv", "--clear", venv],
                [pip, "install", "-q", "--upgrade", "pip"],
                [pip, "install", "-q", "-r", requirements_path(name)],
                [pip, "check"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    with open(stamp, "w") as fh:
        fh.write(digest + "\n")
    return venv


def peer_command(name: str, venv: str, port: int) -> list[str]:
    """The command line that serves the peer ``name`` on 127.0.0.1:``port``."""
    python = os.path.join(venv, "bin", "python")
    if name == "kserve":
        return [python, os.path.join(PEERS_DIR, "kserve_server.py"), "--http_port", str(port)]
    if name == "litserve":
        return [python, os.path.join(PEERS_DIR, "litserve_server.py")]
    if name == "bentoml":
        return [os.path.join(venv, "bin", "bentoml"), "serve", "bentoml_service:Classifier",
                "--working-dir", PEERS_DIR, "--host", "127.0.0.1", "--port", str(port)]
    raise ValueError(f"unknown peer {name!r}: expected one of {', '.join(PEER_NAMES)}")


def versions(venv: str, names: tuple[str, ...]) -> dict:
    """The installed versions of ``names`` in the virtualenv ``venv``."""
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", code, *names],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# -- servers ---------------------------------------------------------------------------------------
class PeerServer(LiveServer):
    """A peer's process group on 127.0.0.1:<free port>; ready once ``:predict`` answers 200."""

    def __init__(self, command, env: dict, port: int, path: str, body: bytes):
        super().__init__(env)
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **env}  # not our venv's PATH: the peer has its own
        self.command, self.path, self.body = command, path, body

    def start(self, log_path: str, timeout: float = 300.0):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}:\n{self.output()}")
            try:
                if post(self.port, self.path, self.body, "application/json")[0] == 200:
                    self.ready_seconds = time.monotonic() - self.started_at
                    return self
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no 200 from {self.path} after {timeout} s:\n{self.output()}")

    def stop(self):
        """The process group, then whatever below it outlived the group (a worker in a
        session of its own), if that pid still runs the peer's virtualenv."""
        below = tree_pids(self.proc.pid)[1:] if self.proc and self.proc.poll() is None else []
        super().stop()
        venv = os.path.dirname(os.path.dirname(self.command[0]))
        for pid in below:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if venv.encode() in fh.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes, str | None]:
    """One POST on a new connection: (status, body, Retry-After)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Retry-After")
    finally:
        conn.close()


def warm(port: int, path: str, body: bytes, content_type: str, requests: int,
         patience: float = 60.0) -> int:
    """``requests`` 200s, not counted; a 503 is retried after its Retry-After (at most 1 s), so a
    level starts once what the previous one left queued has drained. Returns the 503s met."""
    ok = shed = 0
    deadline = time.monotonic() + patience
    while ok < requests and time.monotonic() < deadline:
        status, answer, retry_after = post(port, path, body, content_type)
        if status == 200:
            ok += 1
        elif status == 503:
            shed += 1
            time.sleep(min(float(retry_after or 1), 1.0))
        else:
            raise RuntimeError(f"warm-up got {status} from {path}: {answer[:300]!r}")
    return shed


def _stat(pid) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:  # gone
        return None


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it, alive now (by parent pid: BentoML's workers run in
    sessions of their own, so a process group or session would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and the processes below it alive now: a server
    and every process it started (LitServe's and BentoML's workers)."""
    ticks = sum(int(f[11]) + int(f[12]) for f in map(_stat, tree_pids(root)) if f)
    return ticks / os.sysconf("SC_CLK_TCK")


def levels(server: LiveServer, path: str, body: bytes, body_path: str, content_type: str,
           params: PeerParams, unique: bool, label: str) -> list[dict]:
    """Every level of ``params.concurrency`` against one running server."""
    out = []
    for c in params.concurrency:
        warm_503 = warm(server.port, path, body, content_type, max(1, params.warmup_requests))
        cpu0 = tree_cpu_s(server.proc.pid)
        lv = wrk_drive(server.url, body_path, c, params.duration, path=path,
                       content_type=content_type, unique=unique)
        answered = lv["ok"] + lv["shed_503"]
        lv["server_cpu_ms_per_answer"] = round(
            (tree_cpu_s(server.proc.pid) - cpu0) * 1000 / answered, 2) if answered else None
        lv["warmup_503s"] = warm_503
        progress(f"{label}: {c} clients: {lv['goodput']} 200/s, p50 {lv['p50_ms']} ms, "
                 f"p99 {lv['p99_ms']} ms, 503 share {lv['shed_share']}, errors {lv['errors']}")
        out.append(lv)
    return out


def bodies(log_dir: str) -> dict:
    """The one image (500x375 photo-like JPEG) as the raw body and as the b64 JSON body, with
    the files wrk reads them from."""
    jpeg = photo_jpeg(500, 375, seed=1)
    b64 = json.dumps({"instances": [{"b64": base64.b64encode(jpeg).decode()}]}).encode()
    out = {}
    for kind, data in (("raw", jpeg), ("b64", b64)):
        path = os.path.join(log_dir, "body.jpg" if kind == "raw" else "body.json")
        with open(path, "wb") as fh:
            fh.write(data)
        out[kind] = {"data": data, "path": path}
    return out


def model_name(model: str) -> str:
    """The name our service answers ``/v1/models/<name>`` for (model.json's, as it routes)."""
    from common.modelfolder import ModelFolder
    from common.versions.source import FolderSource

    return FolderSource(ModelFolder(model)).name


def onnx_env(params: PeerParams) -> dict:
    return {"ONNX_INTRA_OP_THREADS": str(params.intra_op),
            "ONNX_INTER_OP_THREADS": str(params.inter_op),
            "ONNX_SPINNING": "1" if params.spinning else "0"}


def run_ours(params: PeerParams, body: dict, name: str, log_dir: str, suffix: str = "") -> dict:
    """Our service (the Dockerfile's gunicorn command) on both bodies: {row: result}."""
    env = {"MODEL_PATH": params.model, "RUNTIME": "onnx", "LOG_LEVEL": "warning",
           "TEMP_DIR": os.path.join(log_dir, "temp"), "BATCH_MAX_SIZE": str(params.max_batch),
           **onnx_env(params), **({"WORKERS": str(params.workers)} if params.workers else {}),
           **params.env}
    server = LiveServer(env)
    rows = {}
    progress(f"ours{suffix}: starting")
    server.start(os.path.join(log_dir, f"ours{suffix.strip()}.log"), wait_ready=False)
    try:
        ready = round(server.wait_ready(300), 2)
        for row, kind in OURS.items():
            path, ctype = (("/classify?top_k=5", "image/jpeg") if kind == "raw" else
                           (f"/v1/models/{name}:predict", "application/json"))
            rows[row + suffix] = {
                "server": "ours", "body": kind, "path": path, "time_to_ready_s": ready,
                "levels": levels(server, path, body[kind]["data"], body[kind]["path"], ctype,
                                 params, unique=kind == "raw", label=row + suffix)}
    finally:
        server.stop()
    return rows


def run_peer(peer: str, params: PeerParams, body: dict, name: str, log_dir: str) -> dict:
    """One peer on the b64 body; a peer that cannot be installed or started is recorded with
    the reason and the run goes on."""
    path = f"/v1/models/{name}:predict"
    row = {"server": peer, "body": "b64", "path": path}
    try:
        venv = ensure_venv(peer, params.venv_root)
        row["versions"] = versions(venv, (peer, "onnxruntime", "numpy", "pillow"))
        port = free_port()
        env = {"PEER_MODEL_DIR": os.path.abspath(params.model), "PEER_MODEL_NAME": name,
               "PEER_PORT": str(port), "PEER_MAX_BATCH": str(params.max_batch),
               "PEER_WORKERS": str(params.workers or 1),
               "PEER_BATCH_WAIT_MS": str(params.batch_wait_ms), "BENTOML_DO_NOT_TRACK": "True",
               "PYTHONPATH": ROOT, **onnx_env(params)}
        progress(f"{peer} {row['versions'].get(peer)}: starting")
        server = PeerServer(peer_command(peer, venv, port), env, port, path,
                            body["b64"]["data"])
        server.start(os.path.join(log_dir, f"{peer}.log"))
    except Exception as exc:  # noqa: BLE001 - the other servers are still worth measuring
        progress(f"{peer}: failed: {exc}")
        return {**row, "failed": str(exc)[-2000:]}
    try:
        status, answer, _ = post(port, path, body["b64"]["data"], "application/json")
        row["sample_answer"] = answer[:300].decode(errors="replace")
        row["time_to_ready_s"] = round(server.ready_seconds, 2)
        row["levels"] = levels(server, path, body["b64"]["data"], body["b64"]["path"],
                               "application/json", params, unique=False, label=peer)
    finally:
        server.stop()
    return row


def run(params: PeerParams, log_dir: str | None = None) -> dict:
    if wrk_available() is None:
        raise SystemExit("scripts/bench_peers.py needs wrk (apt-get install wrk)")
    if not os.path.exists(os.path.join(params.model, "model.onnx")):
        raise SystemExit(f"{params.model} has no model.onnx (scripts/export.py --format onnx)")
    log_dir = log_dir or tempfile.mkdtemp(prefix="bench-peers-")
    body = bodies(log_dir)
    name = model_name(params.model)
    result = {"model": params.model, "model_name": name, "params": asdict(params),
              "log_dir": log_dir,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "rows": {}}
    result["rows"].update(run_ours(params, body, name, log_dir))
    for peer in params.peers:
        result["rows"][peer] = run_peer(peer, params, body, name, log_dir)
    result["rows"].update(run_ours(params, body, name, log_dir, AGAIN))
    result["ratios"] = ratios(result["rows"], params.concurrency)
    return result


# -- the report ------------------------------------------------------------------------------------
#: metric -> (key in a level, True when higher is better)
METRICS = {"goodput": ("goodput", True), "p50": ("p50_ms", False), "p99": ("p99_ms", False)}


def ratios(rows: dict, concurrency: tuple[int, ...]) -> dict:
    """Per level and metric, each of our first-run rows divided by the best peer's value (the
    highest goodput, the lowest p50 and p99): ``{"16": {"goodput": {"best_peer": "litserve",
    "value": 51.2, "ours :predict (b64 JSON)": 1.21, ...}}}``. Above 1 is better for goodput,
    below 1 for latency. A level no peer answered has no entry."""
    peers = {k: r for k, r in rows.items() if r["server"] != "ours" and r.get("levels")}
    out = {}
    for i, c in enumerate(concurrency):
        per_level = {}
        for metric, (key, higher) in METRICS.items():
            values = {k: r["levels"][i][key] for k, r in peers.items()
                      if r["levels"][i].get(key) is not None and r["levels"][i]["ok"] > 0}
            if not values:
                continue
            best = (max if higher else min)(values, key=values.get)
            entry = {"best_peer": best, "value": values[best]}
            for row in OURS:
                lv = rows.get(row, {}).get("levels")
                ours = lv[i][key] if lv and lv[i]["ok"] > 0 else None
                entry[row] = round(ours / values[best], 2) if ours is not None and \
                    values[best] else None
            per_level[metric] = entry
        if per_level:
            out[str(c)] = per_level
    return out


def markdown(result: dict) -> str:
    """The side-by-side table and the ratios, as Markdown."""
    conc = result["params"]["concurrency"]
    head = "| server | " + " | ".join(
        f"{c} cl.: 200/s | p50 ms | p99 ms | 503 share | wrk CPU s | server CPU ms/answer"
        for c in conc) + " |"
    lines = [f"Model `{result['model']}` (`{result['model_name']}`) on ONNX Runtime · "
             f"{result['params']['duration']} s a level · {result['machine']['cpus']} CPUs · "
             f"intra-op threads {result['params']['intra_op'] or 'ONNX Runtime default'} · "
             f"batches up to {result['params']['max_batch']}", "", head,
             "|---|" + "---:|" * (6 * len(conc))]
    for row, r in result["rows"].items():
        label = row if row.startswith("ours") else \
            f"{row} {r.get('versions', {}).get(row, '')}".strip()
        if r.get("failed"):
            lines.append(f"| {label} | failed: {r['failed'].splitlines()[0][:120]} |")
            continue
        cells = []
        for lv in r["levels"]:
            cells += [lv["goodput"], lv["p50_ms"], lv["p99_ms"], lv["shed_share"],
                      lv["client_cpu_s"], lv.get("server_cpu_ms_per_answer")]
        lines.append(f"| {label} | " + " | ".join("" if v is None else str(v) for v in cells)
                     + " |")
    if result["ratios"]:
        lines += ["", "Ours ÷ the best peer at each level (goodput: above 1 is better; p50 and "
                  "p99: below 1 is better):", "",
                  "| clients | metric | best peer | its value | " +
                  " | ".join(OURS) + " |", "|---:|---|---|---:|" + "---:|" * len(OURS)]
        for c, per_level in result["ratios"].items():
            for metric, e in per_level.items():
                lines.append(f"| {c} | {metric} | {e['best_peer']} | {e['value']} | " +
                             " | ".join(str(e.get(row)) for row in OURS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=PeerParams.model)
    parser.add_argument("--peers", default=",".join(PEER_NAMES),
                        help="which peers, in order (comma-separated)")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration", type=float, default=PeerParams.duration)
    parser.add_argument("--warmup_requests", type=int, default=PeerParams.warmup_requests)
    parser.add_argument("--intra_op", type=int, default=PeerParams.intra_op,
                        help="ONNX_INTRA_OP_THREADS of every server (0: ONNX Runtime's choice)")
    parser.add_argument("--inter_op", type=int, default=PeerParams.inter_op)
    parser.add_argument("--spinning", action="store_true", help="ONNX_SPINNING=1 everywhere")
    parser.add_argument("--max_batch", type=int, default=PeerParams.max_batch)
    parser.add_argument("--workers", type=int, default=PeerParams.workers,
                        help="processes of every server: our WORKERS, KServe's workers, "
                             "LitServe's workers_per_device, BentoML's workers (0: each one's "
                             "default: ours WORKERS=auto, the peers 1)")
    parser.add_argument("--batch_wait_ms", type=float, default=PeerParams.batch_wait_ms)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting of our service (repeatable)")
    parser.add_argument("--json", help="write the full result here")
    parser.add_argument("--markdown", help="write the table here too")
    args = cli.parse_args(parser, argv)
    params = PeerParams(
        model=args.model, peers=tuple(p for p in args.peers.split(",") if p),
        concurrency=tuple(int(c) for c in args.concurrency.split(",") if c),
        duration=args.duration, warmup_requests=args.warmup_requests, intra_op=args.intra_op,
        inter_op=args.inter_op, spinning=args.spinning, max_batch=args.max_batch,
        workers=args.workers,
        batch_wait_ms=args.batch_wait_ms, env=dict(e.split("=", 1) for e in args.env))
    for peer in params.peers:
        peer_command(peer, "", 0)  # an unknown name fails before anything starts
    result = run(params)
    result["command"] = "python scripts/bench_peers.py " + " ".join(argv or sys.argv[1:])
    table = markdown(result)
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.markdown, table)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(text + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
