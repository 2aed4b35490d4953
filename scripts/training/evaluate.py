"""Test-split evaluation of an exported model folder, loaded the way the server loads it."""
from __future__ import annotations

import os

import numpy as np

from common.classifier import Classifier, load_classifier
from common.images import load_image_file
from common.modelfolder import ModelFolder

from .data import ImageLists


def evaluate_test_split(folder: ModelFolder, lists: ImageLists, skipped: list[str],
                        batch_size: int = 32, progress: bool = True) -> dict:
    """Test-set metrics of the model in ``folder`` (through ``load_classifier``).

    Images in ``skipped`` (unreadable) are left out. Returns ``test_accuracy`` (None without
    test images), ``test_images``, ``per_class`` (see :func:`per_class_metrics`),
    ``confusion_matrix`` (``labels`` and ``rows_true_columns_predicted``, int counts
    [C, C]) and ``misclassified`` (``image``, ``label``, ``predicted``, ``score`` in [0, 1]).
    """
    clf = load_classifier(folder)
    items = [(p, c) for p, c in lists.paths("testing") if p not in skipped]
    confusion, misclassified = _confusion(clf, lists, items, batch_size, progress)
    total = int(confusion.sum())
    return {"test_accuracy": round(float(np.trace(confusion)) / total, 4) if total else None,
            "test_images": total, "per_class": per_class_metrics(confusion, lists.labels),
            "confusion_matrix": {"labels": lists.labels, "rows_true_columns_predicted":
                                 confusion.tolist()},
            "misclassified": misclassified}


def _confusion(clf: Classifier, lists: ImageLists, items: list[tuple[str, int]],
               batch_size: int, progress: bool) -> tuple[np.ndarray, list[dict]]:
    """Classify ``[(rel_path, true class)]`` in batches -> (int64 [C, C] counts, rows true and
    columns predicted; the misclassified images)."""
    from tqdm import tqdm

    n = len(lists.labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    misclassified = []
    for start in tqdm(range(0, len(items), batch_size), desc="testing", unit="batch",
                      disable=not progress or not items):
        chunk = items[start:start + batch_size]
        x = np.stack([load_image_file(os.path.join(lists.image_dir, p), clf.input_size)
                      for p, _ in chunk])
        for (path, truth), row in zip(chunk, clf.predict(x)):  # row: float32 [C] in [0, 1]
            guess = int(np.argmax(row))
            confusion[truth, guess] += 1
            if guess != truth:
                misclassified.append({"image": path, "label": lists.labels[truth],
                                      "predicted": lists.labels[guess],
                                      "score": round(float(row[guess]), 4)})
    return confusion, misclassified


def per_class_metrics(confusion: np.ndarray, labels: list[str]) -> dict[str, dict]:
    """``{label: {"precision", "recall", "f1" (in [0, 1], 4 places), "support" (true count)}}``
    from a [C, C] confusion matrix (rows true, columns predicted)."""
    per_class = {}
    for i, label in enumerate(labels):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": round(precision, 4), "recall": round(recall, 4),
                            "f1": round(f1, 4), "support": actual}
    return per_class
