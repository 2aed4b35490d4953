"""Feedback: from a wrong answer to the next training run. No web framework here.

A classify answer names the upload it stored in temp/ (``filename``, the store's own
``<16 hex>.<ext>`` name). A person who knows the right label sends both back
(``POST /feedback``); :meth:`Feedback.record` copies the stored image into
``FEEDBACK_DIR/<label>/<filename>`` (the folder-per-class layout ``retrain.py
--extra_image_dir`` reads) with ``<16 hex>.json`` beside it: one JSON line saying which model and
version answered, what it predicted (when the client says), and when.

* Only names the store gives are accepted (never a path), and only while temp/ still holds them.
* Labels: one of the model's labels (the model's spelling wins over a different case), or, with
  ``FEEDBACK_NEW_LABELS``, a new one; never a path, a dot- or underscore-name, more than
  ``MAX_LABEL_LENGTH`` characters or more than ``MAX_LABEL_BYTES`` bytes of UTF-8 (a file
  name's limit). Folders starting with ``_`` are the service's own (``_review``).
* The same image with the same label again changes nothing (idempotent); with another label it
  moves: the last answer counts, so an image is in one label folder only, and a label folder
  the move emptied is removed (folders never pile up).
* The labelled images together stay within ``FEEDBACK_MAX_FILES`` and ``FEEDBACK_MAX_MB``;
  past them feedback is refused (507), never evicted: labelled images are worth keeping.

``REVIEW_BELOW_SCORE``: :meth:`Feedback.review` copies uploads whose top score is below it into
``FEEDBACK_DIR/_review/`` with their predictions, within the same caps counted on their own;
when ``_review`` is full new ones are not kept (logged), and a failure never fails the answer.

Concurrency: gunicorn's workers and their threads share the folder. Each record runs under an
exclusive ``fcntl.flock`` on ``.state/lock`` (waited for at most ``LOCK_WAIT_SECONDS``, then 503),
so a move is one step for every other request; ``.state/index/<filename>`` says which label holds
each image (no request lists the label folders), and ``.state/usage.json`` counts the images and
bytes (recounted from the folders once it is ``USAGE_RECOUNT_SECONDS`` old, so a folder emptied
by hand is seen). Files are written to a hidden name and renamed into place. A worker records at
most ``IN_FLIGHT`` feedbacks at once; more wait up to ``SLOT_WAIT_SECONDS``, then 503.

Symlinks are never followed below ``FEEDBACK_DIR`` (itself the operator's choice, so it may be
one): a label folder that is a symlink is refused, and the stored upload is opened with
``O_NOFOLLOW``. ``FEEDBACK_DIR=off`` switches feedback and review off; a folder that cannot be
written switches the page's buttons off (:attr:`Feedback.enabled`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import threading
import time

import numpy as np

from common.errors import (
    FeedbackDisabled,
    FeedbackFull,
    ImageNotFound,
    InvalidFilename,
    InvalidLabel,
    InvalidParameter,
    Overloaded,
    StorageUnavailable,
    UnknownLabel,
)
from common.inference.classifier import Options
from common.storage import ImageStore

log = logging.getLogger(__name__)

REVIEW = "_review"  # low-confidence uploads, for a person to label
STATE = ".state"  # the lock, the index and the usage count; hidden from retrain.py
MAX_LABEL_LENGTH = 64  # characters: what a person reads
MAX_LABEL_BYTES = 255  # UTF-8 bytes: the longest file name Linux file systems take
REVIEW_TOP_K = 5  # predictions kept beside a review copy
IN_FLIGHT = 4  # feedbacks one worker records at once
SLOT_WAIT_SECONDS = 2.0  # a feedback waits this long for a slot, then 503
LOCK_WAIT_SECONDS = 5.0  # and this long for the folder's lock, then 503
USAGE_RECOUNT_SECONDS = 60.0  # the usage count is recounted from the folders when this old
_FORBIDDEN = set('/\\:*?"<>|')  # path separators and what Windows refuses in a folder name
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def check_label(label) -> str:
    """A label usable as a folder name, or InvalidLabel (400) saying why."""
    if not isinstance(label, str) or not label.strip():
        raise InvalidLabel("give the correct label as 'label'")
    if len(label) > MAX_LABEL_LENGTH or len(label.encode("utf-8", "replace")) > MAX_LABEL_BYTES:
        raise InvalidLabel(f"a label has at most {MAX_LABEL_LENGTH} characters and "
                           f"{MAX_LABEL_BYTES} bytes in UTF-8")
    if label[0] in "._" or label != label.strip() or label.endswith("."):
        raise InvalidLabel("a label cannot start with '.' or '_', start or end with a space, "
                           "or end with '.'")
    bad = sorted({c for c in label if c in _FORBIDDEN or not c.isprintable()})
    if bad:
        raise InvalidLabel(f"a label cannot contain {''.join(bad)!r}")
    return label


class NotPlainFolder(OSError):
    """A folder below FEEDBACK_DIR is a symlink or not a folder: never written through."""


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
        self._slots = threading.BoundedSemaphore(IN_FLIGHT)
        self.writable = self._probe() if root else False

    @classmethod
    def from_config(cls, config, store: ImageStore) -> "Feedback":
        return cls(config.feedback_dir, store, new_labels=config.feedback_new_labels,
                   max_files=config.feedback_max_files, max_bytes=config.feedback_max_bytes,
                   review_below=config.review_below_score)

    @property
    def enabled(self) -> bool:
        """Whether the page should offer feedback: switched on, and the folder writable (as
        found at start and after the last failed write)."""
        return self.root is not None and self.writable

    def require(self) -> None:
        """FeedbackDisabled (403) when feedback is off."""
        if self.root is None:
            raise FeedbackDisabled("feedback is switched off on this server (FEEDBACK_DIR=off)")

    @contextlib.contextmanager
    def writing(self):
        """Hold one of the worker's ``IN_FLIGHT`` feedback slots; Overloaded (503, Retry-After)
        when none frees up within ``SLOT_WAIT_SECONDS``: a flood of feedback holds a bounded
        number of threads and file copies."""
        self.require()
        if not self._slots.acquire(timeout=SLOT_WAIT_SECONDS):
            raise Overloaded("too many feedback requests at once; retry later")
        try:
            yield
        finally:
            self._slots.release()

    def _probe(self) -> bool:
        """Whether the folder, or the nearest existing folder above it (where it will be made
        at the first feedback), can be written: nothing is created until feedback comes."""
        folder = os.path.abspath(self.root)
        while not os.path.isdir(folder):
            parent = os.path.dirname(folder)
            if parent == folder or os.path.lexists(folder):  # a file (or a link) in the way
                break
            folder = parent
        if os.path.isdir(folder) and not os.path.islink(folder) and \
                os.access(folder, os.W_OK | os.X_OK):
            return True
        log.warning("the feedback folder is not writable, feedback is unavailable")
        return False

    # -- feedback -------------------------------------------------------------------------------
    def record(self, filename, label, model: dict, labels, predicted=None,
               score=None) -> tuple[dict, bool]:
        """Keep the stored image ``filename`` as an example of ``label``.

        ``model``: ``{"name", "version"}`` of the model whose answer was wrong; ``labels``: its
        labels. ``predicted``/``score``: what it answered, as the client reports it (optional).
        Returns (the answer, created): created is False when the same image already had this
        label. Raises FeedbackDisabled (403), InvalidFilename, InvalidLabel, UnknownLabel,
        InvalidParameter (400), ImageNotFound (404), FeedbackFull (507),
        StorageUnavailable or Overloaded (503).
        """
        self.require()
        if not ImageStore.is_name(filename):
            raise InvalidFilename(f"filename must be the name a classify answer gave "
                                  f"(16 hex digits and an extension), got {str(filename)[:40]!r}")
        label = self._label(label, labels)
        predicted = self._predicted(predicted, score)
        if not self.writable and not self._probe():
            raise StorageUnavailable("the feedback folder is not writable")
        answer = {"filename": filename, "label": label, "model": model,
                  "saved": f"{self.shown}/{label}/{filename}"}
        note = {"filename": filename, "label": label, "model": model.get("name"),
                "version": model.get("version"), **predicted, "time": _now()}
        try:
            with self.store.open(filename) as source, self._locked() as state:
                if source is None:
                    raise ImageNotFound(f"{filename} is not stored here: it was never uploaded, "
                                        f"or it has been removed from temp/ since; classify "
                                        f"the image again")
                moved_from = state.where(filename)
                if moved_from == label:
                    return {**answer, "created": False, "moved_from": None}, False
                size = os.fstat(source.fileno()).st_size
                if moved_from is None:
                    self._check_room(*state.usage(), size, full=FeedbackFull)
                state.put(label, filename, source, note)
                if moved_from is None:
                    state.count(1, size)
                else:
                    state.remove(moved_from, filename)
        except NotPlainFolder:
            raise StorageUnavailable(f"the folder of the label {label!r} is not a plain folder "
                                     f"(a symlink?); feedback for it is refused") from None
        except OSError as exc:
            log.error("cannot write feedback for the label %r: %s", label, exc)
            self.writable = self._probe()
            raise StorageUnavailable(f"cannot store the feedback: {exc.strerror or 'error'}") \
                from None
        log.info("feedback: %s is %r (model %s v%s)", filename, label, model.get("name"),
                 model.get("version"))
        return {**answer, "created": True, "moved_from": moved_from}, True

    @contextlib.contextmanager
    def _locked(self):
        """The folder's state, under its exclusive lock (shared by every worker and thread)."""
        root = self._open_root()
        try:
            state_fd = _open_folder(STATE, root, create=True)
            try:
                lock = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o644, dir_fd=state_fd)
                try:
                    _flock(lock, LOCK_WAIT_SECONDS)
                    yield _State(root, state_fd)
                finally:
                    os.close(lock)  # releases the lock
            finally:
                os.close(state_fd)
        finally:
            os.close(root)

    def _open_root(self) -> int:
        """A descriptor of ``FEEDBACK_DIR`` (made again if it was removed). It may be a
        symlink: the operator chose it; nothing below it is followed."""
        os.makedirs(self.root, exist_ok=True)
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

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

    def _check_room(self, count: int, total: int, size: int, full) -> None:
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
        try:
            with self.store.open(filename) as source:
                if source is None:
                    return False
                root = self._open_root()
                try:
                    folder = _open_folder(REVIEW, root, create=True)
                    try:
                        if _holds(folder, filename):
                            return False
                        self._check_room(*_usage(folder), os.fstat(source.fileno()).st_size,
                                         full=FeedbackFull)
                        model = classifier.describe()
                        _copy(source, folder, filename, {
                            "filename": filename, "model": model["name"],
                            "version": model["version"],
                            "predictions": classifier.postprocess(
                                scores, Options(top_k=REVIEW_TOP_K)),
                            "below": self.review_below, "time": _now()})
                        return True
                    finally:
                        os.close(folder)
                finally:
                    os.close(root)
        except FeedbackFull as exc:
            log.warning("not kept for review: %s", exc.message)
        except OSError as exc:
            log.error("cannot keep %s for review: %s", filename, exc)
        return False


class _State:
    """The feedback folder while its lock is held: where each image is, the usage count, and
    the moves. Every path is resolved from the folder's descriptor without following
    symlinks."""

    INDEX = "index"
    USAGE = "usage.json"

    def __init__(self, root: int, state: int):
        self.root = root
        self.state = state

    def where(self, filename: str) -> str | None:
        """The label whose folder holds ``filename`` (None: none). Read from the index; an
        entry whose image was removed by hand counts as none."""
        index = self._index()
        try:
            label = _read(index, filename)
        except FileNotFoundError:
            return None
        finally:
            os.close(index)
        if "/" in label or label[:1] in ("", ".", "_"):  # not one this service wrote
            return None
        folder = _open_folder(label, self.root)
        if folder is None:
            return None
        try:
            return label if _holds(folder, filename) else None
        finally:
            os.close(folder)

    def put(self, label: str, filename: str, source, note: dict) -> None:
        """Copy ``source`` into ``label``'s folder and point the index at it."""
        folder = _open_folder(label, self.root, create=True)
        try:
            source.seek(0)
            _copy(source, folder, filename, note)
        finally:
            os.close(folder)
        index = self._index()
        try:
            _write_label(index, filename, label)
        finally:
            os.close(index)

    def remove(self, label: str, filename: str) -> None:
        """Remove ``filename`` and its note from ``label``'s folder; the folder too once empty."""
        folder = _open_folder(label, self.root)
        if folder is None:
            return
        try:
            for name in (filename, os.path.splitext(filename)[0] + ".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)
        try:
            os.rmdir(label, dir_fd=self.root)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise

    def usage(self) -> tuple[int, int]:
        """(images, bytes) in the label folders: the saved count, or, once it is
        ``USAGE_RECOUNT_SECONDS`` old, a recount that also brings the index in line with the
        folders (pictures removed or moved by hand)."""
        try:
            st = os.stat(self.USAGE, dir_fd=self.state, follow_symlinks=False)
            if time.time() - st.st_mtime < USAGE_RECOUNT_SECONDS:
                saved = json.loads(_read(self.state, self.USAGE))
                return int(saved["files"]), int(saved["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        found = _images(self.root)
        index = self._index()
        try:
            where = {name: label for label, name, _ in found}
            for name in os.listdir(index):
                if name not in where and ImageStore.is_name(name):
                    os.unlink(name, dir_fd=index)
            for name, label in where.items():
                try:
                    current = _read(index, name)
                except FileNotFoundError:
                    current = None
                if current != label:
                    _write_label(index, name, label)
        finally:
            os.close(index)
        count, total = len(found), sum(size for _, _, size in found)
        self._save_usage(count, total)
        return count, total

    def count(self, files: int, size: int) -> None:
        count, total = self.usage()
        self._save_usage(count + files, total + size)

    def _save_usage(self, count: int, total: int) -> None:
        text = json.dumps({"files": count, "bytes": total}).encode()
        _write(self.state, self.USAGE, lambda fh: fh.write(text))

    def _index(self) -> int:
        """The index folder, built from the label folders when there is none yet (a folder
        that older versions filled)."""
        index = _open_folder(self.INDEX, self.state)
        if index is not None:
            return index
        building = f".{self.INDEX}-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(building, dir_fd=self.state)
        index = _open_folder(building, self.state, create=True)
        try:
            for label, name, _ in _images(self.root):
                _write_label(index, name, label)
        finally:
            os.close(index)
        os.rename(building, self.INDEX, src_dir_fd=self.state, dst_dir_fd=self.state)
        return _open_folder(self.INDEX, self.state)


def _flock(fd: int, wait: float) -> None:
    """Take the exclusive lock on ``fd`` within ``wait`` seconds, else Overloaded (503)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Overloaded("the feedback folder is busy; retry later") from None
            time.sleep(0.005)


def _open_folder(name: str, parent: int, create: bool = False) -> int | None:
    """A descriptor of the plain folder ``name`` in ``parent`` (None when absent and not
    ``create``). NotPlainFolder when it is a symlink or not a folder."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotPlainFolder(exc.errno, "not a plain folder") from None
        raise


def _images(root: int) -> list[tuple[str, str, int]]:
    """(label, file name, bytes) of every image in the label folders."""
    found = []
    for label in _label_folders(root):
        folder = _open_folder(label, root)
        if folder is None:
            continue
        try:
            found += [(label, name, size) for name, size in _image_files(folder)]
        finally:
            os.close(folder)
    return found


def _image_files(folder: int) -> list[tuple[str, int]]:
    """(name, bytes) of the regular files in ``folder`` named as the store names images."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _is_image(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((entry.name, st.st_size))
    return found


def _is_image(name: str) -> bool:
    """A stored image's name (the store's names; not the ``.json`` notes beside them)."""
    return ImageStore.is_name(name) and not name.endswith(".json")


def _label_folders(root: int) -> list[str]:
    """The label folders' names (not hidden, not the service's own ``_`` ones)."""
    with os.scandir(root) as entries:
        return [e.name for e in entries
                if e.name[0] not in "._" and e.is_dir(follow_symlinks=False)]


def _holds(folder: int, name: str) -> bool:
    """Whether ``folder`` holds ``name`` as a regular file (a symlink does not count)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _usage(folder: int) -> tuple[int, int]:
    """(images, their bytes) in ``folder``: regular files named as the store names images."""
    files = _image_files(folder)
    return len(files), sum(size for _, size in files)


def _write_label(index: int, name: str, label: str) -> None:
    _write(index, name, lambda fh: fh.write(label.encode("utf-8")))


def _read(folder: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(4096).decode("utf-8")


def _write(folder: int, name: str, fill) -> None:
    """Write ``name`` in ``folder`` atomically: ``fill(file)`` into a hidden file, renamed into
    place (a rename replaces a symlink there, never writes through it)."""
    tmp = f".incoming-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=folder)
        raise


def _copy(source, folder: int, filename: str, note: dict) -> None:
    """``source`` (an open file) -> ``folder/filename`` and its note -> ``folder/<stem>.json``;
    the note first, so an image always has one."""
    stem = os.path.splitext(filename)[0]
    text = (json.dumps(note, sort_keys=True) + "\n").encode("utf-8")
    _write(folder, stem + ".json", lambda fh: fh.write(text))
    _write(folder, filename, lambda fh: shutil.copyfileobj(source, fh))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
