#!/usr/bin/env python3
"""Run a sample of the test suite one test at a time, each in a fresh pytest process.

A test that passes only after another test ran (a folder it expects filled, a server another
test started, a module-level cache) passes in the full run and fails here.

    python scripts/check_isolation.py               # 12 tests, sample chosen by today's date
    python scripts/check_isolation.py --sample 40 --seed 7
    python scripts/check_isolation.py --all         # every test (long: minutes per ten)

The sample never includes tests marked ``long`` (minutes each). It prints one line per test and
a closing ``N passed, N failed`` line; the exit status is 1 when any test failed alone.
"""
from __future__ import annotations

import datetime
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from scripts import cli  # noqa: E402


def collect(marker: str = "not long") -> list[str]:
    """Test ids of the suite, as ``pytest --collect-only -q`` lists them."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def choose(ids: list[str], size: int, seed: int) -> list[str]:
    """A sample of ``size`` ids, at least one per test file when size allows, stable per seed."""
    rng = random.Random(seed)
    by_file: dict[str, list[str]] = {}
    for test_id in ids:
        by_file.setdefault(test_id.split("::")[0], []).append(test_id)
    files = sorted(by_file)
    rng.shuffle(files)
    picked = [rng.choice(by_file[f]) for f in files[:size]]
    rest = [i for i in ids if i not in picked]
    picked += rng.sample(rest, min(len(rest), size - len(picked)))
    return sorted(picked)


def run_alone(test_id: str, timeout: float = 600) -> tuple[bool, float, str]:
    """(passed, seconds, output tail) of one test in its own pytest process."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               test_id], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        ok, output = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        ok, output = False, f"timed out after {timeout:g} s"
    return ok, time.perf_counter() - started, output[-3000:]


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], verbose_flag=False)
    parser.add_argument("--sample", type=int, default=12, help="how many tests to run alone")
    parser.add_argument("--seed", type=int, default=datetime.date.today().toordinal(),
                        help="sample seed (default: today's date, so the sample moves daily)")
    parser.add_argument("--all", action="store_true", help="every test, not a sample")
    args = parser.parse_args(argv)
    ids = collect()
    chosen = ids if args.all else choose(ids, args.sample, args.seed)
    print(f"running {len(chosen)} of {len(ids)} tests one by one (seed {args.seed})", flush=True)
    failed = []
    for test_id in chosen:
        ok, seconds, output = run_alone(test_id)
        print(f"{'PASS' if ok else 'FAIL'} {seconds:6.1f} s  {test_id}", flush=True)
        if not ok:
            failed.append(test_id)
            print(output, flush=True)
    print(f"isolation: {len(chosen) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
