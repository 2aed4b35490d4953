"""The record of one retrain run, so that runs can be compared: what made it and what it gave.

A run record (a dict, JSON-ready) holds

* ``id`` (``<UTC time>-<6 hex>``), ``created``, ``output_dir``, ``name``, ``version``;
* ``module``: the feature module's handle; ``flags``: every option of the run;
* ``data``: ``image_dir``, ``extra_image_dirs``, ``images``, ``image_list_sha256`` (the sorted list
  of relative paths), ``contents_sha256`` (those paths with the SHA-1 of each file's bytes: same
  list, other pixels gives another value), ``splits`` (``{label: {"training", "validation",
  "testing"}}`` counts) and ``skipped`` (unreadable images);
* ``seconds``: the run's duration; ``metrics``: test/validation/train accuracy, test images and
  per-class precision, recall, F1 and support.

:func:`scripts.training.retrain` writes it into the version's model.json (key ``run``), appends
it as one line to a ``runs.jsonl`` (by default beside the output folder) and logs the same
hyper-parameters to TensorBoard's HParams dashboard; ``scripts/compare_runs.py`` reads them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time

from .data import SPLITS, ImageLists

log = logging.getLogger(__name__)

RUNS_LOG = "runs.jsonl"


def new_run_id() -> str:
    """``20261101T093000Z-1a2b3c``: sorts by time, unique enough for one machine's runs."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def default_runs_log(output_dir: str) -> str:
    """``runs.jsonl`` in the folder that holds ``output_dir`` (``tf_files/runs.jsonl`` for
    ``tf_files/flowers``), so the versions trained side by side share one log."""
    return os.path.join(os.path.dirname(os.path.abspath(os.path.normpath(output_dir))), RUNS_LOG)


def data_record(lists: ImageLists, skipped: list[str]) -> dict:
    """The ``data`` part of a run record: fingerprints of the image list and contents, splits."""
    paths = sorted(lists.all_paths())
    contents = hashlib.sha256()
    for rel in paths:
        contents.update(f"{rel}\0{_file_sha1(os.path.join(lists.image_dir, rel))}\n".encode())
    return {
        "image_dir": lists.folders[0] if lists.folders else lists.image_dir,
        "extra_image_dirs": lists.folders[1:],
        "images": len(paths),
        "image_list_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "contents_sha256": contents.hexdigest(),
        "splits": {label: {split: len(lists.lists[label][split]) for split in SPLITS}
                   for label in lists.labels},
        "skipped": len(skipped),
    }


def _file_sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_run_record(run_id: str, flags: dict, module_handle: str, data: dict,
                     evaluation: dict, train_metrics: dict, seconds: float, output_dir: str,
                     name: str, version: str) -> dict:
    """One run record (see the module docstring); ``evaluation`` is ``evaluate_test_split``'s
    result, ``train_metrics`` ``train_head``'s."""
    return {
        "id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "output_dir": output_dir, "name": name, "version": str(version),
        "module": module_handle,
        "flags": {k: _jsonable(v) for k, v in sorted(flags.items())},
        "data": data,
        "seconds": round(seconds, 1),
        "metrics": {"test_accuracy": evaluation["test_accuracy"],
                    "validation_accuracy": train_metrics["validation_accuracy"],
                    "train_accuracy": train_metrics["train_accuracy"],
                    "test_images": evaluation["test_images"],
                    "per_class": evaluation["per_class"]},
    }


def _jsonable(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def append_run(path: str, record: dict) -> None:
    """Add ``record`` as one line to the runs log at ``path`` (created with its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def read_runs(path: str) -> list[dict]:
    """The records of a runs log, oldest first; a damaged line is skipped with a warning."""
    runs = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("%s:%d is not a JSON line; skipped", path, number)
                continue
            if isinstance(record, dict):
                runs.append(record)
    return runs


def log_hparams(summaries_dir: str, record: dict) -> None:
    """The run's hyper-parameters and final metrics for TensorBoard's HParams dashboard.

    Written into ``summaries_dir`` itself (the run; its ``train/`` and ``validation/`` scalars
    are the dashboard's ``accuracy`` metrics), with the test accuracy as a scalar beside them.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    values = {k: v for k, v in record["flags"].items() if v is not None}
    values["module"] = record["module"]
    steps = int(record["flags"].get("how_many_training_steps") or 0)
    writer = tf.summary.create_file_writer(summaries_dir)
    with writer.as_default():
        hp.hparams(values, trial_id=record["id"])
        if record["metrics"]["test_accuracy"] is not None:
            tf.summary.scalar("test_accuracy", record["metrics"]["test_accuracy"], step=steps)
    writer.flush()
    writer.close()
