"""The CPUs and memory this process may really use, and how many workers fit them. No web
framework here; nothing is read at import time.

A container limited to 2 CPUs on a 64-core host sees 64 cores in ``os.cpu_count()``; what it may
use is the smallest of its affinity mask (``os.sched_getaffinity``, what ``taskset`` and
Kubernetes' static CPU manager set) and its cgroup's CPU quota (``cpu.max`` in cgroup v2,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1: what ``docker run --cpus`` and a Kubernetes
CPU limit set), taken over the process's cgroup and every cgroup above it. Memory likewise: the
smallest ``memory.max`` (v1: ``memory.limit_in_bytes``) on the way up, and the machine's
``MemTotal``.

:func:`plan_workers` turns that into ``WORKERS=auto``'s choice (gunicorn.conf.py applies it,
docs/BENCHMARKS.md "Workers sized to the machine" has the measurements behind the rule): one
worker per usable CPU, each running its model on ``cpus // workers`` runtime threads, as many
as the memory allows, at least one.

:class:`WorkBoard` tells the workers which of them has work in hand, so that a model call that
starts while none other has runs on every usable CPU (``RUNTIME_THREADS_ALONE``).
"""
from __future__ import annotations

import logging
import math
import mmap
import os
import threading
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

MIB = 1024 * 1024
CGROUP_ROOT = "/sys/fs/cgroup"

#: Private memory (MiB) of a warmed-up worker beyond its model, and per MiB of model file, by
#: runtime: a line through RssAnon of workers serving MobileNetV2 (14 MB) and Inception v3
#: (92 MB) folders on each runtime, rounded up (docs/BENCHMARKS.md, "Workers sized to the
#: machine").
#: Shared libraries are file pages shared between workers and not counted.
WORKER_BASE_MB = {"onnx": 150.0, "tensorflow": 430.0}
WORKER_MB_PER_MODEL_MB = {"onnx": 3.6, "tensorflow": 1.7}
#: The second ONNX Runtime session a worker holds for calls that run alone
#: (RUNTIME_THREADS_ALONE), MiB: a line through its cost for the same two models (32 MB and
#: 136 MB of RssAnon after a call), rounded up.
ALONE_MB_BASE = 16.0
ALONE_MB_PER_MODEL_MB = 1.4


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """Controller (``""`` for cgroup v2's unified tree) -> this process's cgroup path."""
    out = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out[controller] = parts[2]
    return out


def _upwards(base: str, path: str):
    """``base/path``, then each folder above it up to ``base`` itself."""
    parts = [p for p in path.split("/") if p]
    for n in range(len(parts), -1, -1):
        yield os.path.join(base, *parts[:n])


def _cgroup_folders(root: str, controller: str, cgroups: dict[str, str]):
    """The folders to read for ``controller``: v2 (``root/cgroup.controllers`` exists) or v1
    (``root/<controller>``, also as a combined mount such as ``cpu,cpuacct``)."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        yield from _upwards(root, cgroups.get("", "/"))
        return
    path = next((p for c, p in cgroups.items() if controller in c.split(",")), "/")
    for mount in (controller, f"{controller},cpuacct", f"cpuacct,{controller}"):
        if os.path.isdir(os.path.join(root, mount)):
            yield from _upwards(os.path.join(root, mount), path)
            # inside a container the process's path may not exist under the mount; its root
            # is then the container's own cgroup, which _upwards reaches last
            return


def cgroup_cpu_limit(root: str = CGROUP_ROOT,
                     proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time the cgroup quota allows (``2.5`` for ``250000 100000``), the
    smallest on the way up; None when no quota is set."""
    cgroups = own_cgroups(proc_cgroup)
    limits = []
    for folder in _cgroup_folders(root, "cpu", cgroups):
        v2 = _read(os.path.join(folder, "cpu.max"))
        if v2 is not None:
            quota, _, period = v2.partition(" ")
            if quota != "max" and period:
                limits.append(int(quota) / int(period))
            continue
        quota = _read(os.path.join(folder, "cpu.cfs_quota_us"))
        period = _read(os.path.join(folder, "cpu.cfs_period_us"))
        if quota and period and int(quota) > 0:
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def cgroup_memory_limit(root: str = CGROUP_ROOT,
                        proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes the cgroup may use, the smallest on the way up; None when unlimited."""
    cgroups = own_cgroups(proc_cgroup)
    limits = []
    for folder in _cgroup_folders(root, "memory", cgroups):
        raw = _read(os.path.join(folder, "memory.max"))
        if raw is None:
            raw = _read(os.path.join(folder, "memory.limit_in_bytes"))
        if raw and raw != "max" and int(raw) < 2 ** 60:  # v1 says "unlimited" with ~2^63
            limits.append(int(raw))
    return min(limits) if limits else None


def usable_cpus(root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> int:
    """Whole CPUs this process may keep busy: its affinity mask, cut to the cgroup quota
    (rounded down: a 1.5-CPU quota keeps one CPU busy without being throttled), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def lower_thread_priority(nice: int) -> int:
    """Lower the calling thread's CPU priority to ``nice`` (Linux: a thread is a task of its
    own, so ``setpriority`` with its id touches no other thread); never raises it. Returns the
    nice value in effect.

    Threads the thread starts afterwards inherit it, and an unprivileged process cannot raise
    it back: whatever must keep normal priority (a model's thread, a runtime's pool) must not
    be started by a thread lowered so. A no-op where the OS has no per-thread priority.
    """
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        if nice > now:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (AttributeError, OSError):
        return 0


class WorkBoard:
    """How much work each of a server's workers has in hand now: per worker (a "seat") one byte,
    non-zero while it has an admitted image not yet answered (queued or in the running call) or
    a model call running, in memory shared by the workers because the arbiter made it before
    forking them (gunicorn.conf.py gives each worker a seat of its own).

    It lets a worker run a model call on more threads while no other worker has work in hand
    (``RUNTIME_THREADS_ALONE``, :meth:`Seat.either`): under load every worker runs its calls on
    its own share of the CPUs, and a lone request gets them all. Counting running calls alone
    was not enough: between two calls of a busy worker its seat read empty, and its sibling's
    next call took every CPU for its whole length (measured: 16 clients then got 503s).
    """

    def __init__(self, seats: int = 256):
        self.seats = seats
        self._shared = mmap.mmap(-1, seats)  # anonymous and shared: forked workers see it

    def seat(self, number: int) -> "Seat | None":
        """Seat ``number``, emptied (its last holder may have died with work in hand); None
        past the last one."""
        if not 0 <= number < self.seats:
            return None
        self.free(number)
        return Seat(self._shared, number)

    def free(self, number: int) -> None:
        """Empty seat ``number`` (its worker is gone)."""
        if 0 <= number < self.seats:
            self._shared[number] = 0

    def free_all_but(self, held: set[int]) -> None:
        """Empty every seat not in ``held`` (the live workers'): a worker gunicorn dropped
        without ``child_exit`` leaves none counted."""
        for number in range(self.seats):
            if number not in held:
                self._shared[number] = 0

    def busy(self) -> int:
        """Workers with work in hand now."""
        return self.seats - self._shared[:].count(0)


_BOARD: WorkBoard | None = None


def arbiter_board() -> WorkBoard:
    """The server's board, made once per process: gunicorn runs gunicorn.conf.py again on a
    reload (HUP), and the workers it forks then must share the board the others write."""
    global _BOARD
    if _BOARD is None:
        _BOARD = WorkBoard()
    return _BOARD


class Seat:
    """One worker's seat on a :class:`WorkBoard`: this worker writes its byte (and the arbiter
    empties it once the worker is gone)."""

    def __init__(self, shared: mmap.mmap, number: int):
        self._shared = shared
        self.number = number
        self._lock = threading.Lock()  # a worker's model and request threads share it
        self._running = 0
        self._in_hand = 0
        #: Called (no arguments) for each call that runs alone: the app's metrics hook.
        self.on_alone = None

    def _publish(self) -> None:
        self._shared[self.number] = min(self._running + self._in_hand, 255)

    def in_hand(self, delta: int) -> None:
        """Images admitted (``delta`` > 0), or answered or given back (< 0): the batcher's
        ``work_changed`` hook."""
        with self._lock:
            self._in_hand += delta
            if self._in_hand < 0:  # a bug in the counting: never hold the others back for it
                log.warning("seat %d counted %d images in hand", self.number, self._in_hand)
                self._in_hand = 0
            self._publish()

    def _start(self) -> bool:
        """Count a call in; True when it may run alone: no other call of this worker (another
        model's thread) and no other worker with work in hand."""
        with self._lock:
            self._running += 1
            self._publish()
            if self._running != 1:
                return False
            seats = self._shared[:]
            return seats.count(0) == len(seats) - 1

    def _end(self) -> None:
        with self._lock:
            self._running -= 1
            self._publish()

    def _counted(self, fn):
        def run(batch):
            self._start()
            try:
                return fn(batch)
            finally:
                self._end()
        return run

    def either(self, under_load, alone=None):
        """A model function that runs ``alone`` (the model on more threads) when no other model
        call runs in this worker and no other worker has work in hand, else ``under_load``
        (always, when ``alone`` is None); counted on this seat. Its ``under_load`` and
        ``alone`` attributes (with ``alone`` given) run that one, counted: the warm-up times
        and runs each. A worker that takes work after another's call started alone runs its
        own calls on its share of the CPUs meanwhile: they are oversubscribed until that call
        ends."""
        def chosen(batch):
            fn = under_load
            alone_now = self._start() and alone is not None
            try:
                if alone_now:
                    fn = alone
                    if self.on_alone is not None:
                        self.on_alone()
                return fn(batch)
            finally:
                self._end()
        if alone is not None:
            chosen.under_load, chosen.alone = self._counted(under_load), self._counted(alone)
        return chosen


def alone_setting(config) -> int | None:
    """RUNTIME_THREADS_ALONE as set (None: ``auto``); 0 for ``auto`` when RUNTIME_THREADS is a
    number (a user who sized the threads by hand keeps them)."""
    if config.runtime_threads_alone is None and config.runtime_threads:
        return 0
    return config.runtime_threads_alone


def alone_threads(setting: int | None, cpus: int, threads: int) -> int:
    """The second session's threads for workers whose calls run on ``threads``: the setting
    (None: every usable CPU), or 0 (no second session) when that is not more than
    ``threads``."""
    wanted = cpus if setting is None else setting
    return wanted if wanted > threads else 0


#: This worker's seat on the server's WorkBoard (gunicorn.conf.py's post_fork); None
#: outside gunicorn, where a process has no sibling to give way to.
_SEAT: Seat | None = None


def take_seat(seat: Seat | None) -> None:
    global _SEAT
    _SEAT = seat


def worker_seat() -> Seat | None:
    """This worker's seat (:func:`take_seat`), or None."""
    return _SEAT


def usable_memory(root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup",
                  meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes this process may use: the cgroup limit and the machine's memory, the smaller."""
    total = None
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    limits = [v for v in (cgroup_memory_limit(root, proc_cgroup), total) if v]
    return min(limits) if limits else None


def worker_memory_mb(models: list[tuple[str, int]], transient_mb: float,
                     alone: bool = False) -> float:
    """Expected private memory (MiB) of one worker serving ``models`` ((runtime, bytes of the
    file it loads) each), plus ``transient_mb``: the bounds on what requests may hold at once
    (DECODE_MEMORY_MB and QUEUE_MEMORY_MB), counted in full so that the bounds hold together;
    ``alone``: with each ONNX model's second session (RUNTIME_THREADS_ALONE)."""
    runtimes = {runtime for runtime, _ in models} or {"tensorflow"}  # none yet: the larger
    base = max(WORKER_BASE_MB.get(r, WORKER_BASE_MB["tensorflow"]) for r in runtimes)
    weights = sum(WORKER_MB_PER_MODEL_MB.get(r, WORKER_MB_PER_MODEL_MB["tensorflow"]) * n / MIB
                  for r, n in models)
    if alone:
        weights += sum(ALONE_MB_BASE + ALONE_MB_PER_MODEL_MB * n / MIB
                       for r, n in models if r == "onnx")
    return base + weights + transient_mb


@dataclass(frozen=True)
class WorkerPlan:
    """``WORKERS=auto``'s choice and why."""

    workers: int
    runtime_threads: int
    cpus: int
    memory_mb: float | None
    worker_mb: float
    reason: str
    #: RUNTIME_THREADS_ALONE's threads (0: no second session).
    alone_threads: int = 0


def plan_workers(cpus: int, memory_bytes: int | None, worker_mb: float,
                 reserve_mb: float = 256.0) -> WorkerPlan:
    """One worker per usable CPU, each with ``cpus // workers`` runtime threads, cut to as many
    workers of ``worker_mb`` as fit in ``memory_bytes`` less ``reserve_mb`` (the arbiter, the
    page cache a model file needs); at least one.

    The rule is the measured one (docs/BENCHMARKS.md): on 16 cores, 16 workers of one thread
    served 0.88 of the model's in-process best, 8 x 2 0.66, 4 x 4 0.62, 1 x 16 0.34; on 2 cores
    2 x 1 against 1 x 2 is in the same section.
    """
    memory_mb = None if memory_bytes is None else memory_bytes / MIB
    workers, reason = cpus, f"{cpus} usable CPU{'s' if cpus != 1 else ''}"
    if memory_mb is not None:
        fit = int((memory_mb - reserve_mb) // worker_mb)
        if fit < workers:
            workers = max(1, fit)
            reason += (f"; memory for {max(fit, 0)} worker{'s' if fit != 1 else ''} of "
                       f"~{worker_mb:.0f} MiB in {memory_mb:.0f} MiB")
    return WorkerPlan(workers=workers, runtime_threads=max(1, cpus // workers), cpus=cpus,
                      memory_mb=memory_mb, worker_mb=worker_mb, reason=reason)


def served_model_files(config) -> list[tuple[str, int]]:
    """(runtime, bytes of the file it loads) of the newest version of each model the config's
    source offers: what every worker will hold (the default version policy serves the latest;
    a policy serving more versions is undercounted). Reads the folders' listings and model.json,
    and, for ``RUNTIME=auto``, checksums a model.onnx to see whether it is the verified one
    (importing onnxruntime in the arbiter); nothing is loaded."""
    from common.inference.loader import IMPORTED, choose_runtime
    from common.modelfolder import EXPORT_FILES
    from common.versions.source import source_for

    source = source_for(config)
    out = []
    for versions in source.scan().values():
        if not versions:
            continue
        newest = versions[max(versions)]
        try:
            folder = source.open(newest)
            imported = IMPORTED.get(folder.format)
            runtime = imported or choose_runtime(folder, config.runtime, config.precision)
        except Exception:  # noqa: BLE001 - a folder that cannot load is refused later, clearly
            continue
        files = {name: size for name, size, _ in newest.fingerprint}
        if imported:  # an imported model's folder is its file (and its weights) and labels
            size = sum(files.values())
        elif runtime == "onnx":
            size = sum(s for n, s in files.items() if n.startswith(EXPORT_FILES["onnx"]))
        else:
            exports = set(EXPORT_FILES.values())
            size = sum(s for n, s in files.items() if os.path.basename(n) not in exports)
        out.append((runtime, size))
    return out


def plan_for(config, cpus: int | None = None, memory_bytes: int | None = None) -> WorkerPlan:
    """``WORKERS=auto``'s plan for ``config``: the usable CPUs and memory of this process (or
    those given), and a worker's expected memory for the models the config serves plus
    DECODE_MEMORY_MB and QUEUE_MEMORY_MB. A number in WORKERS or RUNTIME_THREADS wins; with
    only RUNTIME_THREADS set, the workers are as many as its threads fit in the CPUs. The
    second session of RUNTIME_THREADS_ALONE is charged to each worker, and dropped where
    charging it would cost a worker."""
    cpus = usable_cpus() if cpus is None else cpus
    setting = alone_setting(config)
    if config.workers and config.runtime_threads:  # nothing to decide: no scan
        return WorkerPlan(workers=config.workers, runtime_threads=config.runtime_threads,
                          cpus=cpus, memory_mb=None, worker_mb=0.0,
                          reason="WORKERS and RUNTIME_THREADS set",
                          alone_threads=alone_threads(setting, cpus, config.runtime_threads))
    memory_bytes = usable_memory() if memory_bytes is None else memory_bytes
    models = served_model_files(config)
    transient_mb = config.decode_memory_mb + config.queue_memory_mb

    def sized(alone: bool) -> WorkerPlan:
        plan = plan_workers(cpus, memory_bytes, worker_memory_mb(models, transient_mb, alone))
        workers = config.workers or plan.workers
        if config.workers is None and config.runtime_threads:
            workers = min(workers, max(1, cpus // config.runtime_threads))
        threads = config.runtime_threads or max(1, cpus // workers)
        return replace(plan, workers=workers, runtime_threads=threads,
                       reason=plan.reason if config.workers is None else "WORKERS set",
                       alone_threads=alone_threads(setting, cpus, threads) if alone else 0)

    plan = sized(False)
    if alone_threads(setting, cpus, plan.runtime_threads):
        charged = sized(True)
        if charged.workers == plan.workers:
            return charged
        return replace(plan, reason=plan.reason + "; no second session for lone calls "
                       "(RUNTIME_THREADS_ALONE): its memory would cost a worker")
    return plan
