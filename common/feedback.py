"""Feedback: from a wrong answer to the next training run. No web framework here.

A classify answer names the upload it stored in temp/ (``filename``, the store's own
``<16 hex>.<ext>`` name). A person who knows the right label sends both back
(``POST /feedback``); :meth:`Feedback.record` copies the stored image into
``FEEDBACK_DIR/<label>/<filename>`` (the folder-per-class layout ``retrain.py
--extra_image_dir`` reads) with ``<16 hex>.json`` beside it: one JSON line saying which model and
version answered, what it predicted (when the client says), and when.

* Only names the store gives are accepted (never a path), and only while temp/ still holds them.
* Labels: one of the model's labels (the model's spelling wins over a different case), or, with
  ``FEEDBACK_NEW_LABELS``, a new one; never a path, a dot- or underscore-name, or more than
  ``MAX_LABEL_LENGTH`` characters. Folders starting with ``_`` are the service's own
  (``_review``).
* The same image with the same label again changes nothing (idempotent); with another label it
  moves: the last answer counts, so an image never trains two classes.
* The labelled images together stay within ``FEEDBACK_MAX_FILES`` and ``FEEDBACK_MAX_MB``;
  past them feedback is refused (507), never evicted: labelled images are worth keeping.

``REVIEW_BELOW_SCORE``: :meth:`Feedback.review` copies uploads whose top score is below it into
``FEEDBACK_DIR/_review/`` with their predictions, within the same caps counted on their own;
when ``_review`` is full new ones are not kept (logged), and a failure never fails the answer.

Writes are atomic (a hidden temporary file renamed into place), so gunicorn's workers can share
the folder. ``FEEDBACK_DIR=off`` switches feedback and review off.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np

from .classifier import Options
from .errors import (FeedbackDisabled, FeedbackFull, ImageNotFound, InvalidFilename,
                     InvalidLabel, InvalidParameter, StorageUnavailable, UnknownLabel)
from . import storage
from .storage import ImageStore

log = logging.getLogger(__name__)

REVIEW = "_review"  # low-confidence uploads, for a person to label
MAX_LABEL_LENGTH = 64
REVIEW_TOP_K = 5  # predictions kept beside a review copy
_FORBIDDEN = set('/\\:*?"<>|')  # path separators and what Windows refuses in a folder name


def check_label(label) -> str:
    """A label usable as a folder name, or InvalidLabel (400) saying why."""
    if not isinstance(label, str) or not label.strip():
        raise InvalidLabel("give the correct label as 'label'")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidLabel(f"a label has at most {MAX_LABEL_LENGTH} characters")
    if label[0] in "._" or label != label.strip() or label.endswith("."):
        raise InvalidLabel("a label cannot start with '.' or '_', start or end with a space, "
                           "or end with '.'")
    bad = sorted({c for c in label if c in _FORBIDDEN or not c.isprintable()})
    if bad:
        raise InvalidLabel(f"a label cannot contain {''.join(bad)!r}")
    return label


class Feedback:
    """The feedback folder: labelled copies of stored uploads, and the review folder.

    Args:
        root: ``FEEDBACK_DIR`` (None: feedback is off).
        store: the temp/ store the names come from.
        new_labels: ``FEEDBACK_NEW_LABELS``: labels the model does not have are accepted.
        max_files, max_bytes: caps of the labelled images (and, counted apart, of ``_review``).
        review_below: ``REVIEW_BELOW_SCORE`` (None: off).
    """

    def __init__(self, root: str | None, store: ImageStore, *, new_labels: bool = False,
                 max_files: int = 10000, max_bytes: int = 1024 ** 3,
                 review_below: float | None = None):
        self.root = os.path.abspath(root) if root else None
        self.shown = os.path.basename(os.path.normpath(root)) if root else None
        self.store = store
        self.new_labels = new_labels
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.review_below = review_below if root else None

    @classmethod
    def from_config(cls, config, store: ImageStore) -> "Feedback":
        return cls(config.feedback_dir, store, new_labels=config.feedback_new_labels,
                   max_files=config.feedback_max_files, max_bytes=config.feedback_max_bytes,
                   review_below=config.review_below_score)

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def require(self) -> None:
        """FeedbackDisabled (403) when feedback is off."""
        if self.root is None:
            raise FeedbackDisabled("feedback is switched off on this server (FEEDBACK_DIR=off)")

    # -- feedback -------------------------------------------------------------------------------
    def record(self, filename, label, model: dict, labels, predicted=None,
               score=None) -> tuple[dict, bool]:
        """Keep the stored image ``filename`` as an example of ``label``.

        ``model``: ``{"name", "version"}`` of the model whose answer was wrong; ``labels``: its
        labels. ``predicted``/``score``: what it answered, as the client reports it (optional).
        Returns (the answer, created): created is False when the same image already had this
        label. Raises FeedbackDisabled (403), InvalidFilename, InvalidLabel, UnknownLabel,
        InvalidParameter (400), ImageNotFound (404), FeedbackFull (507),
        StorageUnavailable (503).
        """
        self.require()
        if not ImageStore.is_name(filename):
            raise InvalidFilename(f"filename must be the name a classify answer gave "
                                  f"(16 hex digits and an extension), got {str(filename)[:40]!r}")
        label = self._label(label, labels)
        predicted = self._predicted(predicted, score)
        source = self.store.path_of(filename)
        if source is None:
            raise ImageNotFound(f"{filename} is not stored here: it was never uploaded, or it "
                                f"has been removed from temp/ since; classify the image again")
        folder = os.path.join(self.root, label)
        target = os.path.join(folder, filename)
        answer = {"filename": filename, "label": label, "model": model,
                  "saved": f"{self.shown}/{label}/{filename}"}
        if os.path.exists(target):
            return {**answer, "created": False, "moved_from": None}, False
        try:
            size = os.path.getsize(source)
            self._check_room(self._label_folders(), size, full=FeedbackFull)
            note = {"filename": filename, "label": label, "model": model.get("name"),
                    "version": model.get("version"), **predicted, "time": _now()}
            _copy(source, folder, filename, note)
            moved_from = self._remove_elsewhere(filename, keep=label)
        except FileNotFoundError:  # evicted from temp/ between the check and the copy
            raise ImageNotFound(f"{filename} was removed from temp/ meanwhile; classify the "
                                f"image again") from None
        except OSError as exc:
            log.error("cannot write feedback to %s: %s", folder, exc)
            raise StorageUnavailable(f"cannot store the feedback: {exc.strerror or exc}") \
                from None
        log.info("feedback: %s is %r (model %s v%s)", filename, label, model.get("name"),
                 model.get("version"))
        return {**answer, "created": True, "moved_from": moved_from}, True

    def _label(self, label, labels) -> str:
        label = check_label(label)
        if label in labels:
            return label
        same = [known for known in labels if known.lower() == label.lower()]
        if len(same) == 1:  # "Circle" for the model's "circle": one class, one folder
            return same[0]
        if not self.new_labels:
            shown = ", ".join(list(labels)[:20]) + (" ..." if len(labels) > 20 else "")
            raise UnknownLabel(f"{label!r} is not one of the model's labels ({shown}); "
                               f"new labels are off (FEEDBACK_NEW_LABELS)")
        return label

    @staticmethod
    def _predicted(predicted, score) -> dict:
        """The client's report of the wrong answer, checked: ``{"predicted", "score"}``."""
        out = {}
        if predicted not in (None, ""):
            if not isinstance(predicted, str) or len(predicted) > 256:
                raise InvalidParameter("predicted must be a label (a string)")
            out["predicted"] = predicted
        if score not in (None, ""):
            try:
                value = float(score)
            except (TypeError, ValueError):
                value = None
            if isinstance(score, bool) or value is None or not 0.0 <= value <= 1.0:
                raise InvalidParameter("score must be a number in [0, 1]")
            out["score"] = value
        return out

    def _label_folders(self) -> list[str]:
        try:
            return [e.path for e in os.scandir(self.root)
                    if e.is_dir() and e.name[0] not in "._"]
        except FileNotFoundError:
            return []

    def _remove_elsewhere(self, filename: str, keep: str) -> str | None:
        """Remove ``filename`` from every other label folder (the last answer counts)."""
        moved_from = None
        for folder in self._label_folders():
            if os.path.basename(folder) == keep:
                continue
            if _remove(folder, filename):
                moved_from = os.path.basename(folder)
        return moved_from

    def _check_room(self, folders: list[str], size: int, full) -> None:
        count, total = usage(folders)
        if count + 1 > self.max_files or total + size > self.max_bytes:
            raise full(f"the feedback folder holds {count} images, {total / 2 ** 20:.1f} MiB; "
                       f"its caps are {self.max_files} images and "
                       f"{self.max_bytes / 2 ** 20:.0f} MiB (FEEDBACK_MAX_FILES, "
                       f"FEEDBACK_MAX_MB)")

    # -- review ---------------------------------------------------------------------------------
    def review(self, filename: str, classifier, scores) -> bool:
        """Keep a copy of the stored upload ``filename`` in ``_review/`` when its top score
        (``scores``: ``[labels]`` probabilities from ``classifier``) is below
        ``REVIEW_BELOW_SCORE``. Never raises; True when a copy was written."""
        if self.review_below is None or float(np.max(scores)) >= self.review_below:
            return False
        folder = os.path.join(self.root, REVIEW)
        try:
            source = self.store.path_of(filename)
            if source is None or os.path.exists(os.path.join(folder, filename)):
                return False
            self._check_room([folder], os.path.getsize(source), full=FeedbackFull)
            model = classifier.describe()
            _copy(source, folder, filename, {
                "filename": filename, "model": model["name"], "version": model["version"],
                "predictions": classifier.postprocess(scores, Options(top_k=REVIEW_TOP_K)),
                "below": self.review_below, "time": _now()})
            return True
        except FeedbackFull as exc:
            log.warning("not kept for review: %s", exc.message)
        except OSError as exc:
            log.error("cannot keep %s for review in %s: %s", filename, folder, exc)
        return False


def usage(folders: list[str]) -> tuple[int, int]:
    """(images, their bytes) in ``folders``: files named as the store names them."""
    entries = []
    for folder in folders:
        try:
            entries.extend(e for e in os.scandir(folder) if ImageStore.is_name(e.name))
        except FileNotFoundError:
            continue
    return storage.usage(entries)


def _copy(source: str, folder: str, filename: str, note: dict) -> None:
    """``source`` -> ``folder/filename`` and its note -> ``folder/<stem>.json``, each written
    to a hidden file and renamed into place; the note first, so an image always has one."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(filename)[0]
    tmp = os.path.join(folder, f".incoming-{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(note, sort_keys=True) + "\n")
        os.replace(tmp, os.path.join(folder, stem + ".json"))
        shutil.copyfile(source, tmp)
        os.replace(tmp, os.path.join(folder, filename))
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _remove(folder: str, filename: str) -> bool:
    """Remove ``folder/filename`` and its note; True if the image was there."""
    removed = False
    for name in (filename, os.path.splitext(filename)[0] + ".json"):
        try:
            os.unlink(os.path.join(folder, name))
            removed = removed or name == filename
        except FileNotFoundError:
            pass
    return removed


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
