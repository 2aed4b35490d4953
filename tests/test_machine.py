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
