"""gunicorn settings, from the same environment variables as the app (common/config.py).

The model is loaded by each worker after the fork (no preload_app): TensorFlow's thread pools
do not survive a fork, and each worker must own its runtime.
"""
import glob
import os
import shutil
import tempfile
import threading

from common.config import Config
from common.machine import (alone_setting, alone_threads, arbiter_board, lower_thread_priority,
                            plan_for, take_seat)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # ONNX Runtime writes a device id otherwise

_settings = Config.from_env(os.environ)  # fails start-up with a message naming a bad variable

# The server's own run folder (in TMPDIR, removed at exit) for what libraries insist on writing.
_run_dir = tempfile.mkdtemp(prefix="classifier-run-")
# The workers' figures for each other's fair share (common/fairshare.py: Siblings).
_share_dir = os.path.join(_run_dir, "share")
# Where the workers hand each other connections (common/web/gunicorn_worker.py: Handoff).
_handoff_dir = os.path.join(_run_dir, "handoff")
# Metrics of all workers (prometheus_client's multiprocess mode): the folder must be named in
# the environment before any worker imports prometheus_client, and be empty at start.
_metrics_dir = _settings.metrics_dir or os.path.join(_run_dir, "metrics")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir
# Importing TensorFlow imports Keras, which writes $KERAS_HOME/keras.json (default ~/.keras):
# keep it out of the user's home. A KERAS_HOME set by the user wins.
os.environ.setdefault("KERAS_HOME", os.path.join(_run_dir, "keras"))

wsgi_app = "app:create_app()"
bind = f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else \
    f"{_settings.host}:{_settings.port}"
# WORKERS=auto (the default): one worker per CPU this process may use (affinity, cgroup quota),
# as many as the memory allows, each running its model on CPUs // workers threads
# (common/machine.py; docs/BENCHMARKS.md has the measurements). The workers read the plan from
# the environment they inherit, as the numbers a user could have set.
_plan = plan_for(_settings)
os.environ["WORKERS"] = str(_plan.workers)
os.environ["RUNTIME_THREADS"] = str(_plan.runtime_threads)
os.environ["RUNTIME_THREADS_ALONE"] = str(_plan.alone_threads)
workers = _plan.workers
# The work each worker has in hand (one byte each, shared with the workers forked from here):
# a worker's model call runs on RUNTIME_THREADS_ALONE threads while no other worker has any.
_board = arbiter_board()
# gthread that reads request heads in its main loop (HEADER_TIMEOUT), drops clients that do not
# read their answers (SEND_TIMEOUT) and answers gunicorn's protocol errors in JSON.
worker_class = "common.web.gunicorn_worker.JsonErrorWorker"
threads = _settings.threads
preload_app = False
# The model loads in a background thread, so the worker keeps its heartbeat while it warms up;
# the timeout still has to cover a slow first import of TensorFlow on a busy machine.
timeout = 120
graceful_timeout = 30
keepalive = 5
# Optional leak backstop (MAX_REQUESTS, default off): a worker is replaced after that many
# requests, spread out by a 10% jitter. Off by default because the soak test shows no growth and
# a lone worker's replacement must load its model before it accepts: seconds with no server.
max_requests = _settings.max_requests
max_requests_jitter = _settings.max_requests // 10
loglevel = _settings.log_level
accesslog = None  # the app logs one JSON line per request itself
# gunicorn >= 25 opens a control socket in $HOME/.gunicorn by default: one path shared by every
# server of the user (two instances clobber each other's) and a file outside the project. Off.
control_socket_disable = True
errorlog = "-"


def on_starting(server):
    """Say how the server is sized (gunicorn's own count wins: ``-w`` or GUNICORN_CMD_ARGS
    override this file; the runtime threads follow it unless RUNTIME_THREADS was set); clear
    metrics files a previous run left in PROMETHEUS_MULTIPROC_DIR."""
    count = server.cfg.workers
    threads = _plan.runtime_threads
    alone = _plan.alone_threads
    if count != _plan.workers:
        threads = _settings.runtime_threads or max(1, _plan.cpus // count)
        os.environ["WORKERS"] = str(count)
        os.environ["RUNTIME_THREADS"] = str(threads)
        alone = alone_threads(alone_setting(_settings), _plan.cpus, threads)
        os.environ["RUNTIME_THREADS_ALONE"] = str(alone)
    server.log.info("%d worker(s) x %d runtime thread(s) (%s; ~%.0f MiB a worker); a lone call "
                    "of an ONNX model on %d", count, threads, _plan.reason
                    if count == _plan.workers else "gunicorn's worker count", _plan.worker_mb,
                    alone or threads)
    os.makedirs(_metrics_dir, exist_ok=True)
    for path in glob.glob(os.path.join(_metrics_dir, "*.db")):
        os.unlink(path)


def _warm_workers(count: int):
    from common.web.gunicorn_worker import WarmWorkers
    return WarmWorkers(os.path.join(_run_dir, "warm"), count)


def child_exit(server, worker):
    """A worker is gone (also after kill -9): drop its live gauges from /metrics and its mark
    as warm."""
    from common.metrics import mark_process_dead
    mark_process_dead(worker.pid, _metrics_dir)
    _warm_workers(server.cfg.workers).forget(worker.pid)
    _board.free(getattr(worker, "seat_number", -1))
    from common.fairshare import Siblings
    Siblings.forget(_share_dir, worker.pid)
    from common.web.gunicorn_worker import Handoff
    Handoff.forget(_handoff_dir, worker.pid)


def on_exit(server):
    shutil.rmtree(_run_dir, ignore_errors=True)


def post_worker_init(worker):
    """Hold the worker back from accepting requests until the versions found at start-up are
    loaded and warmed up (or failed).

    The app loads the model in a background thread (so the dev server answers /readyz 503 while
    loading); under gunicorn a worker that is still loading, at start or after a max_requests
    restart, must not take requests that a ready sibling could serve. The heartbeat keeps going
    meanwhile, so a slow load is not mistaken for a hung worker.
    Once warm, the worker is marked so, and its ``/readyz`` says ready only when every worker
    has been warm (``WarmWorkers``); versions found later load at ``LOAD_NICE`` where they
    may, else in one worker at a time (``OneLoadAtATime``).
    """
    from common.dataplane import DataPlane

    dataplane = DataPlane.of(worker.wsgi)
    while not dataplane.manager.wait_initial(1.0):
        worker.notify()
    warm = _warm_workers(worker.cfg.workers)
    warm.mark(worker.pid)
    dataplane.workers_waiting = warm.waiting
    from common.web.gunicorn_worker import OneLoadAtATime
    dataplane.manager.load_turn = OneLoadAtATime(os.path.join(_run_dir, "load.lock"))
    if dataplane.share is not None and worker.cfg.workers > 1:
        # each worker's clients, for the others' fair share (common/fairshare.py)
        from common.fairshare import Siblings
        dataplane.share.siblings = Siblings(_share_dir)
        worker.defer_accept = dataplane.share.crowded
    _start_grpc(worker, dataplane)


def _start_grpc(worker, dataplane):
    """This worker's gRPC server on GRPC_PORT (shared by the workers: SO_REUSEPORT), made here,
    after the fork and once the worker is warm (common/rpc/server.py); off with GRPC_PORT=0.
    It checks the same keys and writes the same audit records as the app."""
    if dataplane.config.grpc_port is None:
        return
    from common.rpc import server as rpc

    app = worker.wsgi
    worker.rpc_server = rpc.start(dataplane.config, dataplane, app.extensions["keyring"],
                                  app.extensions.get("audit"))


_request_thread = threading.local()


def pre_request(worker, req):
    """Run request threads at a lower CPU priority than the model (REQUEST_NICE).

    The model's threads (the batcher and TensorFlow's pools, made before the first request)
    keep priority 0; each of gthread's request threads lowers its own priority once, at its
    first request. Under overload, clients that resend at once can keep the request threads
    busy refusing them; at a lower priority that work takes only the CPU the model leaves,
    instead of a fair share of it (measured in docs/BENCHMARKS.md). A process cannot raise its
    threads' priority back without privileges, so nothing made by a request thread may be a
    model thread.
    """
    if _settings.request_nice and not getattr(_request_thread, "reniced", False):
        _request_thread.reniced = True
        lower_thread_priority(_settings.request_nice)


def worker_exit(server, worker):
    """On a graceful stop, finish the gRPC calls running (new ones are refused) and answer
    what is still queued before the worker goes."""
    from common.dataplane import DataPlane

    rpc_server = getattr(worker, "rpc_server", None)
    if rpc_server is not None:
        rpc_server.stop(grace=max(1, graceful_timeout - 5))
    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        DataPlane.of(app).close()


def pre_fork(server, worker):
    """Give the new worker the lowest seat on the board of work in hand that no live worker
    holds; empty the seats no live worker holds (one gunicorn dropped without ``child_exit``
    may have left its count)."""
    taken = {getattr(w, "seat_number", -1) for w in server.WORKERS.values()}
    _board.free_all_but(taken)
    worker.seat_number = next(n for n in range(len(taken) + 1) if n not in taken)


def post_fork(server, worker):
    """Tune glibc's malloc in the worker (docs/BENCHMARKS.md, *Hostile requests*):

    * cap its arenas: with dozens of request threads each would get its own arena and keep
      freed image buffers, inflating RSS;
    * map every block of ``MMAP_THRESHOLD_BYTES`` or more on its own, so that a big decode's
      buffers go back to the system the moment they are freed. glibc's default threshold
      rises to the size of the largest block freed (up to 32 MiB), after which Pillow's 16 MiB
      image blocks came from the arenas and stayed there whenever they were freed after the
      decode's ``malloc_trim`` (the decoded image outlives its decode).

    Take the worker's seat on the board of work in hand (``pre_fork`` chose it; the app finds
    it with ``machine.worker_seat``). With several workers, also name the folder where the
    worker takes connections handed over by its siblings (the fair share moving a client out
    of a crowded worker).
    """
    tune_malloc(_settings.malloc_arena_max, MMAP_THRESHOLD_BYTES)
    take_seat(_board.seat(worker.seat_number))
    if server.cfg.workers > 1:
        worker.handoff_dir = _handoff_dir


#: Blocks this large or larger are mapped on their own (a fixed threshold: glibc no longer
#: raises it). Above a batch of 8 MobileNet-sized inputs (4.8 MB), below Pillow's blocks.
MMAP_THRESHOLD_BYTES = 8 * 2**20


def tune_malloc(arenas: int, mmap_threshold: int) -> None:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, arenas)  # M_ARENA_MAX
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
