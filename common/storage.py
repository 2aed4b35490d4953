"""The temp/ folder: content-addressed names, atomic writes, bounded size.

A stored file is named ``<first 16 hex of sha256(bytes)>.<ext>`` where ``ext`` comes from the
format Pillow detected, so the client's file name never becomes a path, two clients sending the
same name never collide, and the same bytes are stored once. Writes go to a hidden temporary file
in the same folder and are renamed into place. After each write the folder is trimmed, oldest
first, to its file-count and byte caps.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading

from .errors import StorageUnavailable

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{16}\.[a-z]{3,4}$")


class ImageStore:
    """Stores image bytes under safe names in one folder, within count and byte caps."""

    def __init__(self, root: str, *, max_files: int = 1000, max_bytes: int = 512 * 1024 * 1024):
        self.root = os.path.abspath(root)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Create the folder if needed; called once at start-up."""
        os.makedirs(self.root, exist_ok=True)

    @staticmethod
    def name_for(data: bytes, extension: str) -> str:
        if not re.fullmatch(r"[a-z]{3,4}", extension):
            raise ValueError(f"bad extension {extension!r}")
        return f"{hashlib.sha256(data).hexdigest()[:16]}.{extension}"

    def save(self, data: bytes, extension: str) -> str:
        """Write ``data`` atomically and return the stored file name (not a path)."""
        name = self.name_for(data, extension)
        path = os.path.join(self.root, name)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-", suffix=".part")
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
        self.trim()
        return name

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
        count = total = 0
        for entry in self.files():
            try:
                total += entry.stat().st_size
                count += 1
            except FileNotFoundError:
                continue
        return count, total

    def trim(self) -> int:
        """Evict oldest files until both caps hold; returns how many were removed."""
        with self._lock:
            entries = self.files()
            sizes = []
            for entry in entries:
                try:
                    sizes.append(entry.stat().st_size)
                except FileNotFoundError:
                    sizes.append(0)
            count, total = len(entries), sum(sizes)
            removed = 0
            for entry, size in zip(entries, sizes):
                if count <= self.max_files and total <= self.max_bytes:
                    break
                _unlink(entry.path)
                count -= 1
                total -= size
                removed += 1
            return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
