"""Test-split evaluation of an exported model folder, loaded the way the server loads it."""
from __future__ import annotations

import os

import numpy as np

from common.inference.classifier import Classifier
from common.inference.images import load_image_file
from common.inference.loader import load_classifier
from common.modelfolder import ModelFolder

from .data import SPLITS, ImageLists, RetrainError, _image_files


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
    return _evaluate(clf, lists, items, batch_size, progress)


def evaluate_image_folder(folder: ModelFolder, image_dir: str, batch_size: int = 32,
                          progress: bool = True) -> dict:
    """Metrics of the model in ``folder`` on EVERY image of a separate labelled set laid out as
    ``image_dir/<label>/`` (a test set kept apart from training, such as the demo's canvas
    drawings). Same keys as :func:`evaluate_test_split`. Raises RetrainError for a sub-folder
    that is not one of the model's labels."""
    clf = load_classifier(folder)
    folders = sorted(d for d in os.listdir(image_dir)
                     if os.path.isdir(os.path.join(image_dir, d)) and not d.startswith("."))
    unknown = set(folders) - set(clf.labels)
    if unknown:
        raise RetrainError(f"{image_dir}: {', '.join(sorted(unknown))} not among the model's "
                           "labels")
    lists = {label: {split: [] for split in SPLITS} for label in clf.labels}
    for label in folders:
        lists[label]["testing"] = [os.path.join(label, f)
                                   for f in _image_files(os.path.join(image_dir, label))]
    image_lists = ImageLists(image_dir, list(clf.labels), lists)
    return _evaluate(clf, image_lists, image_lists.paths("testing"), batch_size, progress)


def _evaluate(clf: Classifier, lists: ImageLists, items: list[tuple[str, int]], batch_size: int,
              progress: bool) -> dict:
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
        x = np.stack([load_image_file(os.path.join(lists.image_dir, p), clf.input_size,
                                      spec=clf.spec)
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
