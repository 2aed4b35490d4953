#!/usr/bin/env python3
"""Print two or more retrain runs side by side: flags that differ, data, accuracy, per-class F1.

    python scripts/compare_runs.py                       # the last two runs of tf_files/runs.jsonl
    python scripts/compare_runs.py tf_files/flowers tf_files/flowers_v2    # model folders
    python scripts/compare_runs.py -3 -1 --runs_log /tmp/runs.jsonl        # runs by position
    python scripts/compare_runs.py 20261101T0930 --all_flags               # by id (or a prefix)

Each retrain.py run records its flags, module, data fingerprints, split sizes, duration and
metrics in the version's model.json (key ``run``) and in a ``runs.jsonl`` beside the output
folder (scripts/training/runs.py); this reads either. Rows whose values differ start with ``*``.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.modelfolder import ModelFolder, ModelLoadError  # noqa: E402
from scripts import cli  # noqa: E402
from scripts.training.runs import RUNS_LOG, read_runs  # noqa: E402

#: Flags that say where a run wrote, not what it trained: compared only with --all_flags.
WHERE_FLAGS = ("bottleneck_dir", "name", "output_dir", "output_graph", "output_labels",
               "runs_log", "summaries_dir", "version")
DEFAULT_RUNS_LOG = os.path.join("tf_files", RUNS_LOG)


class CompareError(ValueError):
    """A run cannot be found; the message says which and where it was looked for."""


def find_runs(sources: list[str], runs_log: str = DEFAULT_RUNS_LOG) -> list[dict]:
    """Run records for ``sources``: model folders (their model.json's ``run``), runs logs (all
    their runs), or run ids, id prefixes and positions (``-1`` = the last) in ``runs_log``.
    No sources: the last two runs of ``runs_log``."""
    logged = None

    def log_runs() -> list[dict]:
        nonlocal logged
        if logged is None:
            if not os.path.isfile(runs_log):
                raise CompareError(f"no runs log at {runs_log} (give --runs_log, or model folders)")
            logged = read_runs(runs_log)
        return logged

    if not sources:
        return log_runs()[-2:]
    runs = []
    for source in sources:
        if os.path.isdir(source):
            runs.append(_folder_run(source))
        elif os.path.isfile(source):
            runs.extend(read_runs(source))
        else:
            runs.append(_logged_run(source, log_runs(), runs_log))
    return runs


def _folder_run(path: str) -> dict:
    try:
        run = ModelFolder(path).read_metadata().get("run")
    except ModelLoadError as exc:
        raise CompareError(str(exc)) from None
    if not run:
        raise CompareError(f"{path} has no run record in its model.json (trained before runs "
                           "were recorded?)")
    return run


def _logged_run(key: str, runs: list[dict], runs_log: str) -> dict:
    try:
        return runs[int(key)]
    except ValueError:
        pass
    except IndexError:
        raise CompareError(f"{runs_log} holds {len(runs)} runs; there is no run {key}") from None
    matches = [r for r in runs if str(r.get("id", "")).startswith(key)]
    if len(matches) != 1:
        raise CompareError(f"{'no' if not matches else len(matches)} runs in {runs_log} "
                           f"match {key!r}")
    return matches[0]


def compare(runs: list[dict], all_flags: bool = False) -> list[tuple[str, str, list]]:
    """Rows ``(section, name, [value per run])``: the runs, their data, the flags (those that
    differ, or all), the metrics and per-class F1 (None where a run has no such value)."""
    rows: list[tuple[str, str, list]] = []

    def add(section: str, name: str, values: list) -> None:
        rows.append((section, name, values))

    for key in ("id", "name", "version", "output_dir", "created", "module", "seconds"):
        add("run", key, [r.get(key) for r in runs])
    data = [r.get("data", {}) for r in runs]
    add("data", "images", [d.get("images") for d in data])
    add("data", "image list", [_short(d.get("image_list_sha256")) for d in data])
    add("data", "contents", [_short(d.get("contents_sha256")) for d in data])
    for label in _union(d.get("splits", {}) for d in data):
        add("data", f"{label} train/val/test", [_splits(d.get("splits", {}).get(label))
                                                for d in data])
    flags = [r.get("flags", {}) for r in runs]
    for key in _union(flags):
        values = [f.get(key) for f in flags]
        if all_flags or (key not in WHERE_FLAGS and _differ(values)):
            add("flags", key, values)
    metrics = [r.get("metrics", {}) for r in runs]
    for key in ("test_accuracy", "validation_accuracy", "train_accuracy", "test_images"):
        add("metrics", key, [m.get(key) for m in metrics])
    per_class = [m.get("per_class", {}) for m in metrics]
    for label in _union(per_class):
        add("F1 per class", label, [(p.get(label) or {}).get("f1") for p in per_class])
    return rows


def render(rows: list[tuple[str, str, list]]) -> str:
    """The rows as a text table, one column per run, sections as headings; ``*`` marks rows
    whose values differ."""
    cells = [(section, name, [_cell(v) for v in values]) for section, name, values in rows]
    n = max((len(v) for _, _, v in cells), default=0)
    name_width = max((len(name) for _, name, _ in cells), default=0) + 2
    widths = [max(len(v[i]) for _, _, v in cells) for i in range(n)]
    lines, current = [], None
    for section, name, values in cells:
        if section != current:
            lines.append(("" if current is None else "\n") + f"{section}:")
            current = section
        mark = "*" if section != "run" and _differ(values) else " "
        lines.append(f"{mark} {name:<{name_width}}" + "  ".join(
            f"{v:<{w}}" for v, w in zip(values, widths)).rstrip())
    return "\n".join(lines)


def _union(dicts) -> list[str]:
    keys: list[str] = []
    for d in dicts:
        keys.extend(k for k in d if k not in keys)
    return keys


def _differ(values: list) -> bool:
    return any(v != values[0] for v in values[1:])


def _short(digest: str | None) -> str | None:
    return digest[:12] if digest else None


def _splits(split: dict | None) -> str | None:
    if not split:
        return None
    return "/".join(str(split.get(k, 0)) for k in ("training", "validation", "testing"))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], verbose_flag=False)
    parser.add_argument("runs", nargs="*", help="model folders, runs logs, run ids (or id "
                        "prefixes) or positions in --runs_log (-1 = the last); default: the "
                        "last two runs of --runs_log")
    parser.add_argument("--runs_log", default=DEFAULT_RUNS_LOG, help="the runs log to look in")
    parser.add_argument("--all_flags", action="store_true", help="every flag, not only those "
                        "that differ")
    parser.add_argument("--json", action="store_true",
                        help="print the rows as JSON: [{section, name, values}]")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv, tensorflow=False)
    try:
        runs = find_runs(args.runs, args.runs_log)
    except CompareError as exc:
        print(f"compare_runs.py: error: {exc}", file=sys.stderr)
        return 2
    if len(runs) < 2:
        print(f"compare_runs.py: error: {len(runs)} run found; give at least two",
              file=sys.stderr)
        return 2
    rows = compare(runs, args.all_flags)
    if args.json:
        print(json.dumps([{"section": s, "name": n, "values": v} for s, n, v in rows], indent=2))
    else:
        print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
