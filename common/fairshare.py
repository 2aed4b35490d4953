"""A fair share per client: while the model is pressed, no client holds more than its share of
the requests one worker has in flight. No web framework here.

Admission by expected wait (``batcher.py``) refuses everyone alike: a client with 60
connections that resends every 503 at once wins most of the room that frees up, and a client
with one connection that waits out ``Retry-After`` gets almost none (issue 24: 156 answers/s
against 0.5-1.3/s). :class:`FairShare` counts each client's requests from admission to their
answer. While the model is pressed (``Batcher.pressed``: its thread was busy at least half of
the last second or so), a client that already holds its share while other clients are active
is refused (429 ``over_fair_share``, ``DataPlane``), before its body is read. The share is the
worker's requests in flight over its active clients, rounded up (at least ``min_share``): a
client alone is never over its share (admission by expected wait still holds it), and a client
with many connections beside clients with one each is held to about one request in flight at a
time, as they are. A client between two requests (answered less than ``grace`` seconds ago)
still counts as active, so that one with many connections does not count as alone then.

Per worker: gunicorn's workers are separate processes and each counts its own requests and
shares out its own capacity among the clients whose connections it holds
(docs/BENCHMARKS.md measures what that means with two workers). Bounded: a client leaves the
table when its last request is answered, so the table never holds more clients than the worker
has requests in flight (at most its ``THREADS``), plus at most ``max_recent`` remembered for
the grace period.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict


class FairShare:
    """Requests in flight per client (any hashable identity, such as ``"addr:10.0.0.1"``).

    Thread-safe. :meth:`enter` counts one more request of a client, or says it is over its
    share; :meth:`leave` uncounts it when it is answered. A client whose last request was
    answered less than ``grace`` seconds ago still counts as active (with nothing held): a
    client with one connection is between two requests for a moment after each answer, and
    in that moment a client with many must not count as alone. At most ``max_recent`` such
    clients are remembered (the oldest forgotten first).
    """

    def __init__(self, min_share: int = 1, grace: float = 0.5, max_recent: int = 1024):
        if min_share < 1:
            raise ValueError("min_share must be >= 1")
        self.min_share = min_share
        self.grace = grace
        self.max_recent = max_recent
        self._held: dict[str, int] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()  # idle client -> when it left
        self._total = 0
        self._lock = threading.Lock()

    def share(self, now: float | None = None) -> int:
        """The requests a client may hold while the model is pressed: the worker's requests
        in flight over the active clients (holding some, or answered within ``grace``),
        rounded up; at least ``min_share``."""
        with self._lock:
            self._forget(time.monotonic() if now is None else now)
            return self._share()

    def _share(self) -> int:
        active = len(self._held) + len(self._recent)
        return max(self.min_share, math.ceil(self._total / max(1, active)))

    def _forget(self, now: float) -> None:
        while self._recent:
            client, left = next(iter(self._recent.items()))
            if now - left < self.grace and len(self._recent) <= self.max_recent:
                break
            del self._recent[client]

    def enter(self, client: str, pressed: bool, now: float | None = None) -> bool:
        """Count one more request of ``client`` and return True; or, when ``pressed``, other
        clients are active and ``client`` holds its share already, count nothing and return
        False. A client alone is never over its share (admission by expected wait holds it)."""
        with self._lock:
            self._forget(time.monotonic() if now is None else now)
            held = self._held.get(client, 0)
            others = len(self._held) + len(self._recent) - (1 if held else 0)
            if pressed and held and others and held >= self._share():
                return False
            self._recent.pop(client, None)
            self._held[client] = held + 1
            self._total += 1
            return True

    def leave(self, client: str, now: float | None = None) -> None:
        """One request of ``client`` was answered (after an :meth:`enter` that returned True);
        a client with nothing left in flight moves to the recent clients."""
        with self._lock:
            held = self._held.get(client, 0)
            if held <= 0:
                raise RuntimeError(f"{client!r} has no request in flight")
            if held == 1:
                del self._held[client]
                self._recent[client] = time.monotonic() if now is None else now
                self._forget(self._recent[client])
            else:
                self._held[client] = held - 1
            self._total -= 1

    def in_flight(self) -> dict[str, int]:
        """A copy of the table: each client with requests in flight, and how many."""
        with self._lock:
            return dict(self._held)

    def active(self, now: float | None = None) -> int:
        """Clients holding requests or answered within ``grace`` seconds."""
        with self._lock:
            self._forget(time.monotonic() if now is None else now)
            return len(self._held) + len(self._recent)
