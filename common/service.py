"""The plain functions behind the routes: bytes in, the response dict out. No web framework."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .classifier import Classifier
from .errors import EmptyImage, InvalidParameter
from .images import load_for_model
from .storage import ImageStore


@dataclass(frozen=True)
class Options:
    """Per-request options: ``top_k`` (>= 1, None = all) and ``threshold`` (0..1, None = none)."""

    top_k: int | None = None
    threshold: float | None = None


def parse_options(args: Mapping[str, str], default_top_k: int | None = None) -> Options:
    """Validate the ``top_k`` and ``threshold`` query parameters (400 when bad)."""
    top_k = _parameter(args, "top_k", int, lambda v: v >= 1, "an integer >= 1")
    threshold = _parameter(args, "threshold", float, lambda v: 0.0 <= v <= 1.0,  # refuses nan
                           "a number in [0, 1]")
    return Options(top_k=default_top_k if top_k is None else top_k, threshold=threshold)


def _parameter(args: Mapping[str, str], name: str, cast, valid, expected: str):
    raw = args.get(name)
    if raw is None:  # absent; present but empty ("top_k=") is invalid like any other non-number
        return None
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise InvalidParameter(f"{name} must be {expected}, got {raw[:40]!r}")
    return value


def classify_bytes(data: bytes, *, classifier: Classifier, store: ImageStore, options: Options,
                   max_pixels: int, started: float | None = None,
                   predict: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Decode, store and classify one image; returns the JSON body of DESIGN.md's 200 answer.

    ``predict`` maps one float32 ``[h, w, 3]`` image to its scores (the worker's Batcher);
    by default the classifier is called directly with a batch of one.
    """
    started = time.perf_counter() if started is None else started
    if not data:
        raise EmptyImage()
    array, decoded = load_for_model(data, classifier.input_size, max_pixels=max_pixels)
    filename = store.save(data, decoded.extension)
    scores = predict(array) if predict else classifier.predict(array[None])[0]
    ranked = classifier.rank(scores, options.top_k, options.threshold)
    return {
        "filename": filename,
        "model": classifier.describe(),
        "predictions": [{"label": p.label, "score": round(p.score, 6)} for p in ranked],
        "labels": {p.label: round(p.score, 6) for p in ranked},
        "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 1),
    }


def model_summary(classifier: Classifier) -> dict:
    """Name, version, labels and, when the model folder has report.json, its evaluation summary."""
    summary = {**classifier.describe(), "labels": list(classifier.labels),
               "input_size": list(classifier.input_size),
               "metrics": classifier.metadata.get("metrics", {}), "evaluation": None}
    report_path = report_file(classifier, "report.json")
    if report_path:
        try:
            with open(report_path, encoding="utf-8") as fh:
                report = json.load(fh)
            summary["evaluation"] = {
                "accuracy": report.get("accuracy"), "test_images": report.get("test_images"),
                "per_class": report.get("per_class", {}),
                "confusion_matrix_png": bool(report_file(classifier, "confusion_matrix.png")),
            }
        except (OSError, ValueError):
            pass
    return summary


def report_file(classifier: Classifier, name: str) -> str | None:
    """Path of an evaluation file in the model folder, or None (also for frozen graphs)."""
    if not classifier.source or not os.path.isdir(classifier.source):
        return None
    path = os.path.join(classifier.source, name)
    return path if os.path.isfile(path) else None
