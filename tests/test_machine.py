"""common/machine.py: the CPUs and memory this process may use, and WORKERS=auto's plan.

The cgroup files are a fake tree in tmp_path (v2 and v1 layouts, a quota set above the
process's own cgroup, "max" for none); the affinity mask is set for real, in a child process.
"""
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from common import machine
from common.config import Config

MIB = 1024 * 1024


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def v2(tmp_path):
    """A cgroup v2 tree: the process in /kubepods/pod1/ctr, quotas set on the pod."""
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "kubepods/pod1/cpu.max", "250000 100000")  # 2.5 CPUs
    write(root / "kubepods/pod1/ctr/cpu.max", "max 100000")
    write(root / "kubepods/pod1/memory.max", str(3 * 1024 * MIB))
    write(root / "kubepods/pod1/ctr/memory.max", "max")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    return str(root), str(proc)


def test_cgroup_v2_quota_and_memory_are_found_above_the_process(v2):
    root, proc = v2
    assert machine.cgroup_cpu_limit(root, proc) == 2.5
    assert machine.cgroup_memory_limit(root, proc) == 3 * 1024 * MIB
    # 2.5 CPUs of quota keep 2 busy without throttling (this machine has 2 or more cores)
    assert machine.usable_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v1_quota_and_memory(tmp_path):
    root = tmp_path / "cgroup"
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "100000")
    write(root / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000")
    write(root / "memory/docker/abc/memory.limit_in_bytes", str(512 * MIB))
    proc = tmp_path / "proc-cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    root = str(root)  # Docker's v1 layout: cpu and cpuacct mounted together
    assert machine.cgroup_cpu_limit(root, str(proc)) == 1.0
    assert machine.cgroup_memory_limit(root, str(proc)) == 512 * MIB
    assert machine.usable_cpus(root, str(proc)) == 1


def test_v1_unlimited_and_no_cgroup_mean_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    write(root / "cpu/cpu.cfs_quota_us", "-1")
    write(root / "cpu/cpu.cfs_period_us", "100000")
    write(root / "memory/memory.limit_in_bytes", str(2 ** 63 - 4096))
    proc = tmp_path / "proc-cgroup"
    proc.write_text("4:cpu:/\n5:memory:/\n")
    assert machine.cgroup_cpu_limit(str(root), str(proc)) is None
    assert machine.cgroup_memory_limit(str(root), str(proc)) is None
    empty = tmp_path / "none"
    empty.mkdir()
    assert machine.cgroup_cpu_limit(str(empty), str(proc)) is None
    assert machine.usable_cpus(str(empty), str(proc)) == len(os.sched_getaffinity(0))


def test_a_quota_below_one_cpu_still_gives_one(v2):
    root, proc = v2
    with open(os.path.join(root, "kubepods/pod1/cpu.max"), "w") as fh:
        fh.write("50000 100000")  # 500m
    assert machine.usable_cpus(root, proc) == 1


def test_the_affinity_mask_is_honoured(tmp_path):
    """In a child pinned to one CPU, usable_cpus says 1 though the machine has more."""
    code = ("import os, sys; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from common.machine import usable_cpus; "
            f"print(usable_cpus(root={str(tmp_path)!r}), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "1", out


def test_plan_is_one_worker_per_cpu_cut_to_the_memory():
    plan = machine.plan_workers(16, 64 * 1024 * MIB, worker_mb=1000)
    assert (plan.workers, plan.runtime_threads) == (16, 1)
    plan = machine.plan_workers(16, 4 * 1024 * MIB, worker_mb=1000)  # room for 3 after reserve
    assert (plan.workers, plan.runtime_threads) == (3, 5)
    assert "memory for 3 workers" in plan.reason
    plan = machine.plan_workers(4, 512 * MIB, worker_mb=1000)  # not even one fits: still one
    assert (plan.workers, plan.runtime_threads) == (1, 4)
    plan = machine.plan_workers(2, None, worker_mb=1000)
    assert (plan.workers, plan.runtime_threads) == (2, 1)


def test_worker_memory_grows_with_the_model_and_the_runtime():
    small = machine.worker_memory_mb([("onnx", 14 * MIB)], transient_mb=0)
    large = machine.worker_memory_mb([("onnx", 92 * MIB)], transient_mb=0)
    tf = machine.worker_memory_mb([("tensorflow", 14 * MIB)], transient_mb=0)
    assert small < large and small < tf
    assert machine.worker_memory_mb([("onnx", 14 * MIB)], transient_mb=768) == small + 768


def test_plan_for_reads_the_served_models_and_numbers_win(tmp_path):
    from tiny_models import save_colour_model

    model = save_colour_model(str(tmp_path / "model"))
    config = Config.from_env({"MODEL_PATH": model})
    files = machine.served_model_files(config)
    assert [runtime for runtime, _ in files] == ["tensorflow"] and files[0][1] > 0
    plan = machine.plan_for(config, cpus=8, memory_bytes=64 * 1024 * MIB)
    assert (plan.workers, plan.runtime_threads) == (8, 1)
    plan = machine.plan_for(Config.from_env({"MODEL_PATH": model, "WORKERS": "2"}), cpus=8,
                            memory_bytes=64 * 1024 * MIB)
    assert (plan.workers, plan.runtime_threads) == (2, 4)
    plan = machine.plan_for(Config.from_env({"MODEL_PATH": model, "WORKERS": "2",
                                             "RUNTIME_THREADS": "3"}), cpus=8,
                            memory_bytes=64 * 1024 * MIB)
    assert (plan.workers, plan.runtime_threads) == (2, 3)
    plan = machine.plan_for(Config.from_env({"MODEL_PATH": model, "RUNTIME_THREADS": "4"}),
                            cpus=8, memory_bytes=64 * 1024 * MIB)
    assert (plan.workers, plan.runtime_threads) == (2, 4)  # threads given: workers fit them
    tight = machine.plan_for(config, cpus=8, memory_bytes=2 * 1024 * MIB)
    assert tight.workers < 8 and tight.runtime_threads == 8 // tight.workers


def test_runtime_threads_default_to_the_usable_cpus():
    from common.inference.loader import RuntimeOptions

    options = RuntimeOptions.from_config(Config.from_env({}))
    assert options.onnx_intra_op_threads == options.tf_intra_op_threads == machine.usable_cpus()
    options = RuntimeOptions.from_config(Config.from_env({"RUNTIME_THREADS": "1",
                                                          "ONNX_INTRA_OP_THREADS": "3"}))
    assert (options.onnx_intra_op_threads, options.tf_intra_op_threads) == (3, 1)


def test_warm_workers_say_ready_once_all_were_warm(tmp_path):
    from common.web.gunicorn_worker import WarmWorkers

    warm = WarmWorkers(str(tmp_path / "warm"), expected=2)
    warm.mark(101)
    assert warm.waiting() == "1 of 2 workers are warm; the others are loading the model"
    warm.mark(102)  # the last one records that all were warm, whether or not a probe came
    assert os.path.exists(os.path.join(warm.folder, WarmWorkers.ALL))
    assert warm.waiting() is None
    warm.forget(101)  # replaced later: it takes no requests until warm, siblings serve
    assert warm.waiting() is None


def test_a_call_runs_alone_only_while_no_other_worker_runs_one():
    """RUNTIME_THREADS_ALONE's board: made before the workers fork (gunicorn's arbiter), one
    seat per worker. A call takes the ``alone`` function only while no other worker has work in
    hand (a call running, images queued) and no other model thread of its own worker runs one;
    a seat left counted by a worker that died inside a call is emptied when the arbiter frees
    it or a new worker takes it."""
    import multiprocessing
    import threading

    board = machine.WorkBoard(seats=4)
    mine = board.seat(0)
    counted = []
    mine.on_alone = lambda: counted.append(1)
    ran = []
    def under_load(batch):
        ran.append(("under load", batch))

    def alone(batch):
        ran.append(("alone", batch))

    call = mine.either(under_load, alone)
    call(1)

    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()

    def sibling(exit_inside: bool):
        seat = board.seat(1)

        def model(_):
            started.set()
            if exit_inside:
                os._exit(0)  # dies inside the call: its seat stays counted
            release.wait(30)
        seat.either(model)(None)

    child = context.Process(target=sibling, args=(False,))
    child.start()
    try:
        assert started.wait(30)
        assert board.busy() == 1
        call(2)  # a sibling worker runs a call
    finally:
        release.set()
        child.join(30)
    assert board.busy() == 0
    call(3)
    sibling_queue = board.seat(2)
    sibling_queue.in_hand(2)  # a sibling holds two images, its model thread between calls
    call(3.1)
    sibling_queue.in_hand(-1)
    call(3.2)
    sibling_queue.in_hand(-1)
    mine.in_hand(3)  # this worker's own images do not hold it back
    call(3.3)
    mine.in_hand(-3)

    inside, leave = threading.Event(), threading.Event()
    other_model = threading.Thread(target=mine.either(lambda _: (inside.set(), leave.wait(30))),
                                   args=(None,))
    other_model.start()
    try:
        assert inside.wait(30)
        call(4)  # this worker's other model thread runs a call
    finally:
        leave.set()
        other_model.join(30)

    started.clear()
    child = context.Process(target=sibling, args=(True,))
    child.start()
    child.join(30)
    assert started.is_set() and board.busy() == 1
    call(5)  # the dead worker's seat still counts
    board.free(1)  # the arbiter's child_exit
    call(6)
    with pytest.raises(SystemExit):
        board.seat(2).either(lambda _: sys.exit(0))(None)  # the count goes down on the way out
    assert board.busy() == 0
    started.clear()
    child = context.Process(target=sibling, args=(True,))
    child.start()
    child.join(30)
    assert board.busy() == 1
    board.seat(1)  # a new worker takes the dead one's seat: emptied
    assert board.busy() == 0
    assert ran == [("alone", 1), ("under load", 2), ("alone", 3), ("under load", 3.1),
                   ("under load", 3.2), ("alone", 3.3), ("under load", 4),
                   ("under load", 5), ("alone", 6)]
    assert len(counted) == 4 and board.busy() == 0
    assert board.seat(4) is None  # past the last seat: no board for that worker


def test_a_seats_forced_calls_are_counted_and_a_failing_hook_leaks_nothing():
    """The warm-up's calls (``under_load`` and ``alone`` of ``Seat.either``) run the session
    named, counted like any call; a metrics hook that raises fails the call and leaves the seat
    empty; the arbiter empties seats no live worker holds; one board per arbiter process (a
    reload runs gunicorn.conf.py again)."""
    board = machine.WorkBoard(seats=3)
    mine = board.seat(0)
    seen = []
    call = mine.either(lambda _: seen.append(("under load", board.busy())),
                       lambda _: seen.append(("alone", board.busy())))
    call.under_load(None)
    call.alone(None)
    assert seen == [("under load", 1), ("alone", 1)] and board.busy() == 0

    def broken():
        raise RuntimeError("the metrics file is gone")
    mine.on_alone = broken
    with pytest.raises(RuntimeError):
        call(None)
    assert board.busy() == 0
    mine.on_alone = None
    call(None)
    assert seen[-1] == ("alone", 1)

    board.seat(1).in_hand(1)
    board.seat(2).in_hand(1)
    board.free_all_but({0, 2})
    assert board.busy() == 1
    assert machine.arbiter_board() is machine.arbiter_board()


def test_the_arbiter_gives_each_worker_the_lowest_free_seat():
    """gunicorn.conf.py's pre_fork: a new worker (also one replacing a dead worker) gets the
    lowest seat no live worker holds, so two workers never count on one seat. Run in a fresh
    process: importing gunicorn.conf.py makes its run folder and sets variables."""
    probe = (
        "import runpy, types\n"
        "conf = runpy.run_path('gunicorn.conf.py')\n"
        "live = {pid: types.SimpleNamespace(seat_number=n) for pid, n in [(11, 0), (12, 2)]}\n"
        "server = types.SimpleNamespace(WORKERS=live)\n"
        "seats = []\n"
        "for pid in (13, 14):\n"
        "    worker = types.SimpleNamespace()\n"
        "    conf['pre_fork'](server, worker)\n"
        "    live[pid] = worker\n"
        "    seats.append(worker.seat_number)\n"
        "conf['on_exit'](None)\n"
        "print(seats)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[1, 3]"


def test_the_second_session_is_counted_in_a_workers_memory():
    """WORKERS=auto charges each worker its ONNX models' second session (RUNTIME_THREADS_ALONE)
    when the workers get fewer threads than it, and only then."""
    onnx = machine.worker_memory_mb([("onnx", 92 * MIB)], transient_mb=0)
    alone = machine.worker_memory_mb([("onnx", 92 * MIB)], transient_mb=0, alone=True)
    assert alone - onnx == pytest.approx(machine.ALONE_MB_BASE + 92 * machine.ALONE_MB_PER_MODEL_MB)
    tf = machine.worker_memory_mb([("tensorflow", 92 * MIB)], transient_mb=0)
    assert machine.worker_memory_mb([("tensorflow", 92 * MIB)], transient_mb=0, alone=True) == tf

    demo = {"MODEL_PATH": os.path.join(ROOT, "tf_files", "demo"), "RUNTIME": "onnx"}
    plenty = 64 * 1024 * MIB
    plain = machine.plan_for(Config.from_env({**demo, "RUNTIME_THREADS_ALONE": "0"}), cpus=8,
                             memory_bytes=plenty)
    assert plain.alone_threads == 0
    charged = machine.plan_for(Config.from_env(demo), cpus=8, memory_bytes=plenty)
    assert (charged.workers, charged.runtime_threads, charged.alone_threads) == (8, 1, 8)
    assert charged.worker_mb > plain.worker_mb
    one = machine.plan_for(Config.from_env({**demo, "WORKERS": "1"}), cpus=8,
                           memory_bytes=plenty)
    assert one.runtime_threads == 8 and one.worker_mb == plain.worker_mb  # no second session
    assert one.alone_threads == 0
    # threads sized by hand are kept: auto gives no second session, a number still does
    assert machine.plan_for(Config.from_env({**demo, "RUNTIME_THREADS": "1"}), cpus=8,
                            memory_bytes=plenty).alone_threads == 0
    assert machine.plan_for(Config.from_env({**demo, "RUNTIME_THREADS": "1", "WORKERS": "8",
                                             "RUNTIME_THREADS_ALONE": "4"}), cpus=8,
                            memory_bytes=plenty).alone_threads == 4
    # memory for two plain workers but not two with the second session: two workers, none
    tight = int((256 + 2 * plain.worker_mb + 1) * MIB)
    two = machine.plan_for(Config.from_env(demo), cpus=2, memory_bytes=tight)
    assert (two.workers, two.runtime_threads, two.alone_threads) == (2, 1, 0)
    assert "would cost a worker" in two.reason
