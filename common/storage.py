"""The temp/ folder: content-addressed names, atomic writes, caps that always hold.

A stored file is named ``<first 16 hex of sha256(bytes)>.<ext>`` where ``ext`` comes from the
format Pillow detected, so the client's file name never becomes a path, two clients sending the
same name never collide, and the same bytes are stored once (a second save of the same bytes
only touches the file). The bytes go to a hidden ``.incoming-*.part`` file first and are renamed
into place.

The folder holds at most ``max_files`` images and ``max_bytes`` bytes of them at every instant,
however many threads and processes (gunicorn's workers, or two servers on one volume) save into
it. Every rename into the folder happens under an exclusive ``flock`` on the folder's ledger,
``.ledger``, which holds the number and total size of the stored images; the writer that holds
the lock reads it, makes room when the new file would not fit, renames, and adds the file. The
copying is done before the lock, so writers wait for each other only for a rename.

Making room scans the folder (a stat per file) and evicts the oldest files. A folder found within
5% of a cap is trimmed to 90% of it, so the next scan is a tenth of the cap away. The scan also
corrects the ledger, so files removed or added by hand are counted from the next scan on.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import re
import stat
import struct

from common.errors import PayloadTooLarge, StorageUnavailable

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{16}\.[a-z]{3,4}$")
_LEDGER = struct.Struct("<qq")  # stored files, their total bytes


class ImageStore:
    """Stores image bytes under safe names in one folder, within count and byte caps."""

    HEADROOM = 0.1  # a folder near a cap is trimmed to 90% of it, so scans are far apart
    LEDGER = ".ledger"

    def __init__(self, root: str, *, max_files: int = 1000, max_bytes: int = 512 * 1024 * 1024):
        self.root = os.path.abspath(root)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._names = itertools.count()

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
        """Write ``data`` atomically and return the stored file name (not a path). 413 when
        ``data`` alone is larger than the byte cap; 503 when the folder cannot be written."""
        name = self.name_for(data, extension)
        path = os.path.join(self.root, name)
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(f"the image ({len(data)} bytes) is larger than all that "
                                  f"this server keeps ({self.max_bytes} bytes, TEMP_MAX_MB)")
        try:
            if self._touch(path):
                return name
            tmp = os.path.join(self.root, f".incoming-{os.getpid()}-{next(self._names)}.part")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                with self._ledger() as ledger:
                    if not self._touch(path):  # another writer may have stored it meanwhile
                        count, total = self._room_for(ledger, len(data))
                        os.replace(tmp, path)
                        _write(ledger, count + 1, total + len(data))
            finally:
                _unlink(tmp)
        except OSError as exc:
            log.error("cannot write to %s: %s", self.root, exc)
            raise StorageUnavailable(f"cannot store the image: {exc.strerror or exc}") from None
        return name

    @staticmethod
    def _touch(path: str) -> bool:
        """Whether ``path`` is stored already (a regular file: a symlink there is replaced by
        the save); if so it becomes the newest."""
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return False
            os.utime(path)
            return True
        except FileNotFoundError:  # never stored, or evicted meanwhile
            return False

    @contextlib.contextmanager
    def _ledger(self):
        """The ledger's descriptor, held under an exclusive ``flock`` (between threads too:
        each call opens its own). Closing it releases the lock, also when a process dies."""
        fd = os.open(os.path.join(self.root, self.LEDGER),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _room_for(self, ledger: int, size: int) -> tuple[int, int]:
        """(files, bytes) stored once there is room for one more file of ``size`` bytes: as
        the ledger says when it fits, otherwise after a scan (and a trim when needed)."""
        known = _read(ledger)
        if known is not None and known[0] + 1 <= self.max_files \
                and known[1] + size <= self.max_bytes:
            return known
        return self._trim(self.HEADROOM, size)[:2]

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
        with self._ledger() as ledger:
            count, total, removed = self._trim(0.0)
            _write(ledger, count, total)
        return removed

    def _trim(self, headroom: float, size: int | None = None) -> tuple[int, int, int]:
        """Scan, with the ledger locked. When the folder, with one more file of ``size`` bytes
        if given, is within ``headroom / 2`` of a cap (or over it), evict oldest files until it
        holds at most the cap less ``headroom`` of each (a share of the cap, rounded down: 0 for
        caps under 10 files). Returns (files left, bytes left, removed)."""
        entries = self.files()
        sizes = []
        for entry in entries:
            try:
                sizes.append(entry.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        count, total = len(entries), sum(sizes)
        extra_files, extra_bytes = (0, 0) if size is None else (1, size)
        spare_files = int(self.max_files * headroom)
        spare_bytes = int(self.max_bytes * headroom)
        if (count + extra_files <= self.max_files - spare_files // 2
                and total + extra_bytes <= self.max_bytes - spare_bytes // 2):
            return count, total, 0
        removed = 0
        for entry, entry_size in zip(entries, sizes):
            if (count + extra_files <= self.max_files - spare_files
                    and total + extra_bytes <= self.max_bytes - spare_bytes):
                break
            _unlink(entry.path)
            count -= 1
            total -= entry_size
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


def _read(ledger: int) -> tuple[int, int] | None:
    """The ledger's (files, bytes), or None when it is new or unreadable."""
    raw = os.pread(ledger, _LEDGER.size, 0)
    if len(raw) != _LEDGER.size:
        return None
    count, total = _LEDGER.unpack(raw)
    return (count, total) if count >= 0 and total >= 0 else None


def _write(ledger: int, count: int, total: int) -> None:
    os.pwrite(ledger, _LEDGER.pack(count, total), 0)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
