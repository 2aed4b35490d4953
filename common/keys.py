"""API keys: who may call the service, and for what. No web framework here.

Keys come from ``API_KEYS`` (one line: comma-separated ``name:key:scope+scope``, the keys in
plain text, hashed as they are read) and ``API_KEYS_FILE`` (one ``name:sha256:<hex>:scope+scope``
entry a line, ``#`` comments and blank lines allowed: the file holds only digests). Scopes are
``SCOPES``. :class:`KeyRing` answers which entry a presented key is, in time that does not
depend on how much of it matches a real key: the presented key is hashed (SHA-256) and its
digest compared with *every* stored digest by ``hmac.compare_digest``, so neither an early exit
nor a shared prefix tells an attacker anything. The file is re-read when it changes (checked
at most once a second), so a key is rotated without a restart; a file that becomes unreadable
or malformed keeps the last good keys and is logged once.

No message, log line or exception of this module carries a key: a malformed entry is named by
its position only (what looks like its name might be a key written in the wrong place).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

log = logging.getLogger(__name__)

#: What a key may be used for; a route needs one of them (``common/web/auth.py``).
SCOPES = ("classify", "feedback", "admin", "metrics")
#: Longest key taken; a longer one is refused without being hashed.
MAX_KEY_LENGTH = 256
#: How often (seconds) the key file's identity (inode, size, mtime) is looked at.
CHECK_EVERY = 1.0

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: A key: printable ASCII without spaces or commas (API_KEYS separates entries by commas).
_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]{1,%d}" % MAX_KEY_LENGTH)
_HEX = re.compile(r"[0-9a-f]{64}")
#: Compared against when no key is stored, so that refusing costs the same work.
_NOTHING = hashlib.sha256(b"").digest()


class KeyConfigError(ValueError):
    """API_KEYS or API_KEYS_FILE is malformed. The message names the variable and the entry (by
    its name or position), never a key (``Config.from_env`` does not quote API_KEYS either:
    the field is ``secret``)."""


@dataclass(frozen=True)
class KeyEntry:
    """One key: its name (what logs and the audit trail show), the SHA-256 of the key, and
    its scopes."""

    name: str
    digest: bytes
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as API_KEYS_FILE stores it."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def new_key() -> str:
    """A new random key: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def file_line(name: str, key: str, scopes: Iterable[str]) -> str:
    """The API_KEYS_FILE line for ``key``: ``name:sha256:<hex>:scope+scope`` (checked)."""
    joined = "+".join(sorted(_scopes("+".join(scopes), "the scopes"), key=SCOPES.index))
    return f"{_name(name, 'the name')}:sha256:{hash_key(check_key(key, 'the key'))}:{joined}"


def check_key(key: str, where: str) -> str:
    """``key`` if it can be a key (1..MAX_KEY_LENGTH printable ASCII, no space or comma)."""
    if not _KEY.fullmatch(key):
        raise KeyConfigError(f"{where}: a key is 1 to {MAX_KEY_LENGTH} printable ASCII "
                             f"characters without spaces or commas")
    return key


def _scopes(raw: str, where: str) -> frozenset[str]:
    scopes = [s.strip() for s in raw.split("+")]
    unknown = [s for s in scopes if s not in SCOPES]
    if not raw.strip() or unknown:  # not quoted: a key written in the wrong place would be
        raise KeyConfigError(f"{where}: scopes must be some of {', '.join(SCOPES)}, joined "
                             f"by '+' (an unknown or empty scope)")
    return frozenset(scopes)


def _name(raw: str, where: str) -> str:
    if not _NAME.fullmatch(raw):
        raise KeyConfigError(f"{where}: the name must be 1 to 64 letters, digits, '.', '_' "
                             f"or '-'")
    return raw


def parse_inline(raw: str, variable: str = "API_KEYS") -> list[KeyEntry]:
    """``name:key:scope+scope,...`` -> entries (the keys hashed). The name ends at the first
    ``:``, the scopes start after the last, so a key may hold ``:``."""
    entries = []
    for number, item in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not item:
            continue
        where = f"{variable} entry {number}"
        if item.count(":") < 2:
            raise KeyConfigError(f"{where}: expected name:key:scope+scope")
        name, rest = item.split(":", 1)
        key, scopes = rest.rsplit(":", 1)
        name = _name(name.strip(), where)  # the name is not quoted: it might be a key
        check_key(key, where)
        entries.append(KeyEntry(name, hashlib.sha256(key.encode("ascii")).digest(),
                                _scopes(scopes, where)))
    return _unique(entries, variable)


def parse_file_text(text: str, source: str = "API_KEYS_FILE") -> list[KeyEntry]:
    """The key file's text -> entries: ``name:sha256:<hex>:scope+scope`` a line, ``#``
    comments and blank lines skipped. Errors name the line number, never the line or its
    name, either of which might be a key pasted by mistake."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        parts = line.split(":")
        if len(parts) != 4 or parts[1] != "sha256":
            raise KeyConfigError(f"{where}: expected name:sha256:<64 hex digits>:scope+scope "
                                 f"(scripts/api_key.py writes one)")
        name = _name(parts[0], where)
        if not _HEX.fullmatch(parts[2]):
            raise KeyConfigError(f"{where}: the digest must be 64 lower-case hex digits")
        entries.append(KeyEntry(name, bytes.fromhex(parts[2]), _scopes(parts[3], where)))
    return _unique(entries, source)


def _unique(entries: list[KeyEntry], source: str) -> list[KeyEntry]:
    names, digests = set(), {}
    for entry in entries:
        if entry.name in names:
            raise KeyConfigError(f"{source}: the name {entry.name!r} is used twice")
        if entry.digest in digests:
            raise KeyConfigError(f"{source}: {digests[entry.digest]!r} and {entry.name!r} have "
                                 f"the same key")
        names.add(entry.name)
        digests[entry.digest] = entry.name
    return entries


def read_file(path: str) -> list[KeyEntry]:
    """The entries of the key file at ``path`` (KeyConfigError when unreadable or malformed)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1024 * 1024 + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyConfigError(f"API_KEYS_FILE cannot be read: "
                             f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    if len(text) > 1024 * 1024:
        raise KeyConfigError("API_KEYS_FILE is larger than 1 MiB")
    return parse_file_text(text)


def presented_key(bearer: list[str], plain: list[str]) -> tuple[str | None, str | None]:
    """(the key, None), (None, "missing") or (None, "malformed"), from the values of every
    ``Authorization`` header (``bearer``) and every ``X-API-Key`` header (``plain``) a request
    carried (HTTP headers, or gRPC metadata ``authorization`` / ``x-api-key``): exactly one
    ``Bearer <key>`` or one plain key; two of them, another scheme, a scheme without a key, or
    anything after the key is malformed."""
    if not bearer and not plain:
        return None, "missing"
    if len(bearer) + len(plain) != 1:
        return None, "malformed"
    if plain:
        key = plain[0].strip()
        return (key, None) if key and " " not in key else (None, "malformed")
    parts = bearer[0].strip().split(" ")
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1]:
        return None, "malformed"
    return parts[1], None


class KeyRing:
    """The keys the service accepts: ``API_KEYS``'s and ``API_KEYS_FILE``'s.

    Args:
        inline: ``API_KEYS`` (None: none).
        path: ``API_KEYS_FILE`` (None: none); read now (KeyConfigError when it cannot be) and
            again whenever its inode, size or modification time changes.
        clock: monotonic seconds (tests).
    """

    def __init__(self, inline: str | None = None, path: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._clock = clock
        self._inline = parse_inline(inline) if inline else []
        self._reload_lock = threading.Lock()
        self._checked = clock()
        self._identity = None
        self._failed: str | None = None  # the last reload error logged, logged once
        file_entries = []
        if path:
            self._identity = self._stat()
            file_entries = read_file(path)
        self._entries = tuple(self._merge(file_entries))

    @classmethod
    def from_config(cls, config) -> "KeyRing":
        return cls(config.api_keys, config.api_keys_file)

    @property
    def enabled(self) -> bool:
        """Keys are checked at all (API_KEYS or API_KEYS_FILE set)."""
        return bool(self._inline) or bool(self.path)

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self._entries]

    def authenticate(self, presented: str | None) -> KeyEntry | None:
        """The entry whose key ``presented`` is, or None. Takes the same work whatever
        ``presented`` shares with a real key: one SHA-256 of at most ``MAX_KEY_LENGTH``
        characters, then one constant-time comparison with every stored digest, no early exit.
        A key that cannot be one (too long, not printable ASCII) is refused after the same
        comparisons on a stand-in digest."""
        self.refresh()
        if presented is None or not _KEY.fullmatch(presented[:MAX_KEY_LENGTH + 1]):
            digest = _NOTHING
        else:
            digest = hashlib.sha256(presented.encode("ascii")).digest()
        found = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest) and digest is not _NOTHING:
                found = entry
        return found

    # -- rotation ---------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Re-read the key file if it changed (looked at once every ``CHECK_EVERY`` seconds,
        by one thread; the others go on with the keys they have)."""
        if not self.path:
            return
        now = self._clock()
        if not force and now - self._checked < CHECK_EVERY:
            return
        if not self._reload_lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            identity = self._stat()
            if identity == self._identity and not force:
                return
            try:
                entries = self._merge(read_file(self.path))
            except KeyConfigError as exc:
                if str(exc) != self._failed:
                    log.error("%s; keeping the %d keys read before", exc, len(self._entries))
                    self._failed = str(exc)
                self._identity = identity
                return
            self._entries = tuple(entries)
            self._identity = identity
            self._failed = None
            log.info("API_KEYS_FILE read: %d keys (%s)", len(entries),
                     ", ".join(e.name for e in entries))
        finally:
            self._reload_lock.release()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return ("missing", exc.errno)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _merge(self, file_entries: list[KeyEntry]) -> list[KeyEntry]:
        return _unique([*self._inline, *file_entries], "API_KEYS and API_KEYS_FILE")
