"""The temp/ folder: content-addressed names, atomic writes, bounded size.

A stored file is named ``<first 16 hex of sha256(bytes)>.<ext>`` where ``ext`` comes from the
format Pillow detected, so the client's file name never becomes a path, two clients sending the
same name never collide, and the same bytes are stored once (a second save of the same bytes
only touches the file). Writes go to a hidden temporary file in the same folder and are renamed
into place.

The folder is kept within its file-count and byte caps, oldest first. Scanning it costs a stat
per file, so a save does not scan every time: each scan leaves a room (the caps less what the
folder holds; a folder found within 5% of a cap is trimmed to 90% of it, so the room is never
tiny), and each of the ``writers`` processes sharing the folder (gunicorn's workers) scans again
once it has written its share of that room, ``1 / writers`` of it, in files or in bytes. The
caps hold after every scan; between scans the writers together add at most one room.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import re
import stat
import threading

from common.errors import StorageUnavailable

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{16}\.[a-z]{3,4}$")


class ImageStore:
    """Stores image bytes under safe names in one folder, within count and byte caps."""

    HEADROOM = 0.1  # a folder near a cap is trimmed to 90% of it, so the room is never tiny

    def __init__(self, root: str, *, max_files: int = 1000, max_bytes: int = 512 * 1024 * 1024,
                 writers: int = 1):
        self.root = os.path.abspath(root)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.writers = max(1, writers)
        self._lock = threading.Lock()  # the quota
        self._scan_lock = threading.Lock()  # one scan at a time in this process
        self._names = itertools.count()
        self._quota = (0, 0)  # files, bytes this process may write before it scans again

    def ensure(self) -> None:
        """Create the folder if needed; called once at start-up."""
        os.makedirs(self.root, exist_ok=True)

    @staticmethod
    def name_for(data: bytes, extension: str) -> str:
        if not re.fullmatch(r"[a-z]{3,4}", extension):
            raise ValueError(f"bad extension {extension!r}")
        return f"{hashlib.sha256(data).hexdigest()[:16]}.{extension}"

    @staticmethod
    def is_name(name) -> bool:
        """Whether ``name`` is a name this store gives (``<16 hex>.<ext>``), never a path."""
        return isinstance(name, str) and _NAME.fullmatch(name) is not None

    @contextlib.contextmanager
    def open(self, name: str):
        """The stored image ``name`` opened for reading, or None (not one of our names, not
        stored, or not a regular file). Opened with ``O_NOFOLLOW``: a symlink put in the folder
        never makes the service read a file elsewhere."""
        fh = None
        if self.is_name(name):
            try:
                fd = os.open(os.path.join(self.root, name),
                             os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:  # absent (ENOENT) or a symlink (ELOOP)
                if exc.errno not in (errno.ENOENT, errno.ELOOP):
                    raise
            else:
                fh = os.fdopen(fd, "rb")
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    fh.close()
                    fh = None
        try:
            yield fh
        finally:
            if fh is not None:
                fh.close()

    def save(self, data: bytes, extension: str) -> str:
        """Write ``data`` atomically and return the stored file name (not a path)."""
        name = self.name_for(data, extension)
        path = os.path.join(self.root, name)
        try:
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):  # a symlink there is replaced below
                    os.utime(path)  # stored before: the same bytes, now the newest
                    return name
            except FileNotFoundError:
                pass
            tmp = os.path.join(self.root, f".incoming-{os.getpid()}-{next(self._names)}.part")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)  # same content under the same name: replacing is harmless
            except BaseException:
                _unlink(tmp)
                raise
        except OSError as exc:
            log.error("cannot write to %s: %s", self.root, exc)
            raise StorageUnavailable(f"cannot store the image: {exc.strerror or exc}") from None
        self._written(len(data))
        return name

    def _written(self, size: int) -> None:
        """Charge one new file to the quota; scan (and trim) once it is spent."""
        with self._lock:
            files, size_left = self._quota
            self._quota = (files - 1, size_left - size)
            if self._quota[0] > 0 and self._quota[1] > 0:
                return
        count, total, _ = self._trim(self.HEADROOM)
        with self._lock:
            self._quota = ((self.max_files - count) // self.writers,
                           (self.max_bytes - total) // self.writers)

    def files(self) -> list[os.DirEntry]:
        """Stored images (our own names only), oldest first."""
        try:
            entries = [e for e in os.scandir(self.root) if _NAME.match(e.name) and e.is_file()]
        except FileNotFoundError:
            return []
        stats = []
        for entry in entries:
            try:
                stats.append((entry.stat().st_mtime_ns, entry))
            except FileNotFoundError:  # evicted by another worker meanwhile
                continue
        stats.sort(key=lambda item: (item[0], item[1].name))
        return [entry for _, entry in stats]

    def usage(self) -> tuple[int, int]:
        """(number of stored files, total bytes)."""
        return usage(self.files())

    def trim(self) -> int:
        """Evict oldest files until both caps hold; returns how many were removed."""
        return self._trim(0.0)[2]

    def _trim(self, headroom: float) -> tuple[int, int, int]:
        """Scan; when the folder is within ``headroom / 2`` of a cap (or over it), evict oldest
        files until it holds at most the cap less ``headroom`` of each (a share of the cap,
        rounded down: 0 for caps under 10 files). Returns (files left, bytes left, removed)."""
        with self._scan_lock:
            entries = self.files()
            sizes = []
            for entry in entries:
                try:
                    sizes.append(entry.stat().st_size)
                except FileNotFoundError:
                    sizes.append(0)
            count, total = len(entries), sum(sizes)
            spare_files = int(self.max_files * headroom)
            spare_bytes = int(self.max_bytes * headroom)
            if (count <= self.max_files - spare_files // 2
                    and total <= self.max_bytes - spare_bytes // 2):
                return count, total, 0
            removed = 0
            for entry, size in zip(entries, sizes):
                if count <= self.max_files - spare_files and total <= self.max_bytes - spare_bytes:
                    break
                _unlink(entry.path)
                count -= 1
                total -= size
                removed += 1
            return count, total, removed


def usage(entries) -> tuple[int, int]:
    """(number, total bytes) of the files ``entries`` (``os.DirEntry``) that still exist."""
    count = total = 0
    for entry in entries:
        try:
            total += entry.stat().st_size
            count += 1
        except FileNotFoundError:
            continue
    return count, total


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
