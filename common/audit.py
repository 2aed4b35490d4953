"""The audit trail: one JSON object a line for what changes state or refuses a key. No web
framework here.

``Audit(target)``: ``"-"`` writes to the logger ``classifier.audit`` (the log stream, as JSON
lines through ``common.logs``), a path appends to that file (``AUDIT_LOG``), None or ``off``
writes nothing. Each record::

    {"time": "2024-05-01T12:00:00.123Z", "event": "feedback_written", "key": "ci",
     "client": "10.0.0.7", "request_id": "3f2c...", "details": {...}}

Events: ``feedback_written``, ``model_loaded``, ``model_unloaded`` (one per worker, by the
manager), ``model_load_requested`` and ``model_unload_requested`` (one per request of the
repository extension, with its ``outcome``: ``ok`` or the error's code), ``key_rejected`` and
``key_rejected_suppressed``. ``key`` is a key's *name*, never a key. Rejections are
rate-limited per process (``REJECTIONS_PER_MINUTE``); past the limit they are counted, and
one ``key_rejected_suppressed`` record with the count follows when the minute ends, so a flood
of bad keys cannot fill the disk. A file is bounded too: past ``max_bytes`` it is renamed to
``<path>.1`` (replacing the one before) and a new one is started, so it holds at most twice
``max_bytes``. Several gunicorn workers append to the same file: each record is one
``write`` of an ``O_APPEND`` descriptor, and a worker reopens the path when another has
rotated it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger("classifier.audit")

EVENTS = ("feedback_written", "model_loaded", "model_unloaded", "model_load_requested",
          "model_unload_requested", "key_rejected", "key_rejected_suppressed")
#: key_rejected records written per process and minute; the rest are counted.
REJECTIONS_PER_MINUTE = 60
#: A file past this size is rotated once (``<path>.1``).
MAX_BYTES = 16 * 1024 * 1024
#: Longest string kept in ``details`` (paths and names a client chose are cut).
MAX_DETAIL = 200


def _now_iso(seconds: float) -> str:
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int(seconds % 1 * 1000):03d}Z")


def _clean(value):
    if isinstance(value, str):
        return value[:MAX_DETAIL]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return str(value)[:MAX_DETAIL]


class Audit:
    """Writes audit records to ``target``: ``"-"`` the log stream, a file path, or None or
    ``off`` (nothing).

    Args:
        target: ``AUDIT_LOG``.
        max_bytes: a file's size before it is rotated once.
        per_minute: key_rejected records per minute before they are only counted.
        clock: wall-clock seconds (tests).
    """

    def __init__(self, target: str | None, *, max_bytes: int = MAX_BYTES,
                 per_minute: int = REJECTIONS_PER_MINUTE,
                 clock: Callable[[], float] = time.time):
        self.target = None if not target or target.strip().lower() == "off" else target
        self.max_bytes = max_bytes
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.RLock()  # rejected() writes its summary while holding it
        self._fd: int | None = None
        self._window = 0.0  # start of the current minute of rejections
        self._written = 0  # key_rejected records written in it
        self._dropped = 0  # and not written
        self._timer: threading.Timer | None = None
        if self.target == "-":
            log.setLevel(logging.INFO)  # the trail is kept whatever LOG_LEVEL says

    @classmethod
    def from_config(cls, config) -> "Audit":
        return cls(config.audit_log)

    @property
    def enabled(self) -> bool:
        return self.target is not None

    def record(self, event: str, *, key: str | None = None, client: str | None = None,
               request_id: str | None = None, **details) -> None:
        """Write one record (``event`` one of ``EVENTS``; ``key`` a key's name)."""
        if self.target is None:
            return
        entry = {"time": _now_iso(self._clock()), "event": event, "key": key,
                 "client": client, "request_id": request_id,
                 "details": {k: _clean(v) for k, v in details.items()}}
        try:
            self._write(entry)
        except OSError as exc:  # the trail must never fail the request it records
            logging.getLogger(__name__).error("cannot write the audit trail %s: %s",
                                              self.target, exc.strerror or exc)

    def rejected(self, *, key: str | None = None, client: str | None = None,
                 request_id: str | None = None, **details) -> None:
        """A ``key_rejected`` record, at most ``per_minute`` a minute; the rest are counted and
        summed up in one ``key_rejected_suppressed`` record when the minute ends."""
        if self.target is None:
            return
        with self._lock:
            now = self._clock()
            if now - self._window >= 60.0:
                self._flush_dropped_locked()
                self._window, self._written = now, 0
            if self._written >= self.per_minute:
                self._dropped += 1
                if self._timer is None:
                    self._timer = threading.Timer(max(0.0, self._window + 60.0 - now),
                                                  self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._written += 1
        self.record("key_rejected", key=key, client=client, request_id=request_id, **details)

    def flush(self) -> None:
        """Write the count of rejections not written, if any (the timer calls it)."""
        with self._lock:
            self._timer = None
            self._flush_dropped_locked()

    def _flush_dropped_locked(self) -> None:
        dropped, self._dropped = self._dropped, 0
        if dropped:
            self.record("key_rejected_suppressed", dropped=dropped,
                        limit_per_minute=self.per_minute)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- writing ----------------------------------------------------------------------------
    def _write(self, entry: dict) -> None:
        if self.target == "-":
            log.info(entry["event"], extra={k: v for k, v in entry.items() if k != "time"})
            return
        line = (json.dumps(entry, default=str, ensure_ascii=True) + "\n").encode("ascii")
        with self._lock:
            fd = self._open()
            os.write(fd, line)
            if os.fstat(fd).st_size > self.max_bytes:
                self._rotate(fd)

    def _open(self) -> int:
        """The descriptor for the path, reopened when another process rotated the file."""
        if self._fd is not None:
            try:
                same = os.stat(self.target).st_ino == os.fstat(self._fd).st_ino
            except OSError:
                same = False
            if same:
                return self._fd
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o640)
        return self._fd

    def _rotate(self, fd: int) -> None:
        """Rename the full file to ``<path>.1``, under an exclusive lock on it so that two
        processes do not both rotate (the second sees a new, small file and leaves it)."""
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                current = os.stat(self.target)
            except OSError:
                return
            if current.st_ino == os.fstat(fd).st_ino and current.st_size > self.max_bytes:
                os.replace(self.target, self.target + ".1")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._fd = None

