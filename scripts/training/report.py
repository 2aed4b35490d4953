"""What a retrain run records: report.json, model.json and the confusion-matrix picture.

Only builds dicts and a PNG; writing them into the model folder is ``ModelFolder``'s job.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict

import numpy as np

from common.inference.preprocessing import OURS

from .data import SPLITS, ImageLists
from .features import FeatureStats
from .train import TrainParams

#: Layout of the confusion-matrix PNG, in pixels.
CELL, TOP, CHAR_WIDTH = 48, 40, 8


def build_report(evaluation: dict, train_metrics: dict, lists: ImageLists,
                 stats: FeatureStats, seconds: float) -> dict:
    """report.json: the evaluation (see ``evaluate``), training curves, counts and timings."""
    return {
        "accuracy": evaluation["test_accuracy"], **evaluation,
        "validation_accuracy": train_metrics["validation_accuracy"],
        "train_accuracy": train_metrics["train_accuracy"],
        "training_history": train_metrics["history"],
        "images": {split: len(lists.paths(split)) for split in SPLITS},
        "extra_images": {"folders": lists.folders[1:], "per_class": lists.extra},
        "skipped_images": stats.skipped,
        "features": {"computed": stats.computed, "cached": stats.cached,
                     "seconds": stats.seconds},
        "seconds": round(seconds, 1),
    }


def build_model_json(output_dir: str, name: str | None, version: str, size: tuple[int, int],
                     module_handle: str, evaluation: dict, train_metrics: dict,
                     params: TrainParams, num_labels: int) -> dict:
    """model.json: identity (name defaults to the folder's name), input (height, width),
    the preprocessing spec (``tfhub``: what training used), base module, metrics and the
    training parameters."""
    return {
        "name": name or os.path.basename(os.path.normpath(output_dir)),
        "version": str(version),
        "input_size": list(size),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_module": module_handle,
        "outputs": "probabilities",
        # how the service feeds it: what training fed it (the one preprocessing path)
        "preprocessing": OURS.as_dict(),
        "metrics": {"test_accuracy": evaluation["test_accuracy"],
                    "validation_accuracy": train_metrics["validation_accuracy"],
                    "train_accuracy": train_metrics["train_accuracy"],
                    "test_images": evaluation["test_images"]},
        "training": asdict(params),
        "labels": num_labels,
    }


def draw_confusion_matrix(labels: list[str], matrix, path: str) -> None:
    """The confusion matrix as a PNG heat map (rows: true label, columns: predicted).

    ``matrix``: counts [C, C]. Cells are shaded by their share of the row (blue on the
    diagonal, red off it).
    """
    from PIL import Image, ImageDraw

    m = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    longest = max(len(s) for s in labels)
    left = 12 + CHAR_WIDTH * longest
    img = Image.new("RGB", (left + CELL * n + 20, TOP + CELL * n + 12 + CHAR_WIDTH * longest),
                    "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), "rows: true label, columns: predicted", fill="black")
    row_sums = m.sum(axis=1, keepdims=True)
    share = np.divide(m, row_sums, out=np.zeros_like(m), where=row_sums > 0)  # [C, C] in [0, 1]
    for i in range(n):
        draw.text((6, TOP + i * CELL + CELL // 2 - 5), labels[i], fill="black")
        for j in range(n):
            _draw_cell(draw, left + j * CELL, TOP + i * CELL, int(m[i, j]), share[i, j], i == j)
    for j, label in enumerate(labels):  # column labels: one line each, turned to read upwards
        line = Image.new("RGB", (CHAR_WIDTH * len(label) + 4, 12), "white")
        ImageDraw.Draw(line).text((2, 0), label, fill="black")
        turned = line.rotate(90, expand=True)  # [12 wide, text long]
        img.paste(turned, (left + j * CELL + CELL // 2 - 6, TOP + n * CELL + 4))
    img.save(path)


def _draw_cell(draw, x: int, y: int, count: int, share: float, diagonal: bool) -> None:
    """One cell at (x, y): its count on a colour whose depth is ``share`` in [0, 1]."""
    colour = (int(255 - 200 * share), int(255 - 120 * share), 255) if diagonal else \
        (255, int(255 - 200 * share), int(255 - 200 * share))
    draw.rectangle((x, y, x + CELL - 2, y + CELL - 2), fill=colour, outline=(200, 200, 200))
    draw.text((x + 6, y + CELL // 2 - 6), str(count), fill="black" if share < 0.6 else "white")
