"""A fair share per client: while the model is pressed, no client holds more than its share of
the requests in flight, nor is served much faster than a client that waits on the server with
fewer connections. No web framework here.

Admission by expected wait (``batcher.py``) refuses everyone alike: a client with 60
connections that resends every 503 at once wins most of the room that frees up, and a client
with one connection that waits out ``Retry-After`` gets almost none (issue 24: 156 answers/s
against 0.5-1.3/s). :class:`FairShare` counts each client's requests from admission to their
answer. While the model is pressed (``Batcher.pressed``: its thread was busy at least half of
the last second or so, in this worker or, as it last said, in another), a client that already
holds requests (here or in another worker) is refused (429 ``over_fair_share``, ``DataPlane``,
before its body is read) when one of these rules says so. A client that holds none is never
refused, so a client with one connection never is.

1. **Its share of the requests in flight**: the worker's requests in flight over its active
   clients, rounded up (at least ``min_share``), beside other active clients, counting the
   client's requests in every worker. A client alone is never over it (admission by expected
   wait still holds it), and a client with many connections beside clients with one each is
   held to about one request in flight at a time, as they are. A client between two requests
   (answered less than ``grace`` seconds ago) still counts as active, so that one with many
   connections does not count as alone then.
2. **Its rate beside the clients that wait on the server**: its images served per second (a
   request of eight images counts eight), over every worker, more than ``RATE_SLACK`` times
   those of the fastest other client that is *backlogged* (at least ``BACKLOGGED`` requests in
   flight on average over the last ``RATE_TAU`` seconds or so: it waits on the server, not on
   itself). A client that is rarely waiting (an occasional request, or a slow network between
   it and the server) is not backlogged and holds no one back.
3. **Better served elsewhere**: this worker is pressed and another worker that serves the
   client gives the clients waiting on it more than ``RATE_SLACK`` times what this one gives
   (or is not pressed and has fewer clients waiting on it): the client yields here to the
   clients that have only this worker.

Rules 1-3 span the workers because gunicorn's workers are separate processes and the kernel
hands each connection to one of them: four clients with one connection each may all sit in one
worker while a client with 60 connections also fills the other, and per-worker accounting then
gave them a fifth of one worker each (0.44-0.46 of a fair share measured, docs/BENCHMARKS.md).
For the same reason a pressed worker on which at least two more clients wait than on another
moves one of them, and one whose requests in flight are those of one client alone on the server
(many kept-alive connections, a load generator's or a proxy's, split unevenly by the kernel)
moves one of its connections to a worker holding ``UNEVEN`` fewer:
:meth:`FairShare.should_move` names the worker to which the web layer hands the client's
connection after its answer (the client keeps its connection; the other worker
answers its next request), at most every ``MOVE_EVERY`` seconds; and a *crowded* worker
(pressed, and another gives its waiting clients more or has room, :meth:`FairShare.crowded`)
pauses before it accepts a new connection, so that a new connection more likely lands in
another worker.

The workers learn of each other through :class:`Siblings`: each publishes its clients' figures
(and whether its model is pressed) every ``Siblings.every`` seconds as one small JSON file in a
folder of the server's own (``gunicorn.conf.py``); a figure older than ``Siblings.stale``
seconds is ignored, so a worker that stopped or hangs holds no one back, and a refusal that
rests only on other workers' figures is checked against a fresh read first. Outside gunicorn
(or with one worker) there are no siblings and the rules apply to the one process.

Bounded: a client leaves the in-flight table when its last request is answered, so it never
holds more clients than the worker has requests in flight (at most its ``THREADS``), plus at
most ``max_recent`` remembered for the grace period and, separately, for their rates; the rules
reuse the figures they work out for ``SNAPSHOT_EVERY`` seconds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict

log = logging.getLogger(__name__)

#: Seconds over which a client's images served per second and requests in flight are
#: averaged.
RATE_TAU = 2.0
#: Requests in flight on average from which a client counts as waiting on the server.
BACKLOGGED = 0.5
#: How much faster than the fastest backlogged other client a client may be served.
RATE_SLACK = 1.25
#: Seconds between two connections that one worker tells to move (``FairShare.should_move``).
MOVE_EVERY = 1.0
#: How many more requests in flight than another worker (the answered connection's next one
#: counted) make a worker move one client's connection there, when that client is alone on the
#: server (``FairShare._less_loaded``), and for how many seconds they must have been so: enough
#: that the counts' flicker between two batches does not move connections back and forth.
UNEVEN = 3
UNEVEN_FOR = 0.5
#: Seconds for which the rules reuse the figures they worked out (``FairShare._snapshot``).
SNAPSHOT_EVERY = 0.05
#: A client's figures this small (answers, requests in flight) are forgotten.
_NEGLIGIBLE = 0.01


class Usage:
    """One client's recent use: ``answers`` (the images of its answered requests, an
    exponentially decayed count, so that ``answers / tau`` is its images served per second)
    and ``in_flight`` (its requests in flight, exponentially averaged), both with the time
    constant ``tau``; ``held`` is what it holds now. Not thread-safe (:class:`FairShare`
    holds its lock)."""

    __slots__ = ("answers", "in_flight", "held", "stamp")

    def __init__(self, now: float):
        self.answers = 0.0
        self.in_flight = 0.0
        self.held = 0
        self.stamp = now

    def advance(self, now: float, tau: float) -> "Usage":
        keep = math.exp(-max(0.0, now - self.stamp) / tau)
        self.answers *= keep
        self.in_flight = self.in_flight * keep + self.held * (1.0 - keep)
        self.stamp = max(self.stamp, now)
        return self

    def negligible(self) -> bool:
        return not self.held and self.answers < _NEGLIGIBLE and self.in_flight < _NEGLIGIBLE


class Siblings:
    """The other workers' figures, through one JSON file per process in ``folder``:
    ``{"pressed": bool, "clients": {client: [images served per second, in flight, held]}}``
    (read back with the process's ``"pid"`` added, from the file's name).

    :meth:`publish` writes this process's file (atomically: a temporary file, then a rename);
    :meth:`others` reads the other processes' files, at most every ``every`` seconds (cached in
    between), skipping those not written for ``stale`` seconds. Errors (a full or read-only
    disk) are logged once and leave the rules to this process's own figures.
    """

    def __init__(self, folder: str, pid: int | None = None, every: float = 0.25,
                 stale: float = 2.0):
        self.folder = folder
        self.pid = os.getpid() if pid is None else pid
        self.every = every
        self.stale = stale
        self._read_at = -math.inf
        self._published_at = -math.inf
        self._cached: list[dict] = []
        self._warned = False
        os.makedirs(folder, mode=0o700, exist_ok=True)

    @staticmethod
    def path_of(folder: str, pid: int) -> str:
        return os.path.join(folder, f"{pid}.json")

    def claim(self, now: float) -> bool:
        """Whether this process's figures are due to be published (at most every ``every``
        seconds); True marks them published now. The caller serialises its calls."""
        if 0.0 <= now - self._published_at < self.every:
            return False
        self._published_at = now
        return True

    def publish(self, figures: dict) -> None:
        path = self.path_of(self.folder, self.pid)
        try:
            with open(path + ".tmp", "w") as out:
                json.dump(figures, out, separators=(",", ":"))
            os.replace(path + ".tmp", path)
        except OSError as err:
            self._warn(err)

    def others(self, now: float, fresh: bool = False) -> list[dict]:
        """The other processes' figures, as read at most ``every`` seconds ago (``fresh``:
        now)."""
        if not fresh and 0.0 <= now - self._read_at < self.every:
            return self._cached
        self._read_at = now
        found, oldest = [], time.time() - self.stale
        try:
            entries = list(os.scandir(self.folder))
        except OSError as err:
            self._warn(err)
            entries = []
        for entry in entries:
            if entry.name != f"{self.pid}.json" and entry.name.endswith(".json"):
                try:
                    if entry.stat().st_mtime >= oldest:
                        with open(entry.path) as source:
                            figures = json.load(source)
                        figures["pid"] = int(entry.name[:-len(".json")])
                        found.append(figures)
                except (OSError, ValueError):
                    continue  # gone, or being replaced: the next read sees it
        self._cached = found
        return found

    @classmethod
    def forget(cls, folder: str, pid: int) -> None:
        """A worker is gone (the master's ``child_exit``): remove its file."""
        try:
            os.unlink(cls.path_of(folder, pid))
        except OSError:
            pass

    def _warn(self, err: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("fair share: cannot share figures with the other workers in %s: %s",
                        self.folder, err)


class FairShare:
    """Requests in flight and recent use per client (any hashable identity, such as
    ``"addr:10.0.0.1"``).

    Thread-safe. :meth:`enter` counts one more request of a client, or says it is over its
    share; :meth:`leave` uncounts it when it is answered. A client whose last request was
    answered less than ``grace`` seconds ago still counts as active (with nothing held): a
    client with one connection is between two requests for a moment after each answer, and
    in that moment a client with many must not count as alone. At most ``max_recent`` such
    clients are remembered (the oldest forgotten first), and at most ``max_recent`` clients'
    rates beside those holding requests. ``siblings``: the other workers' figures (None: this
    process alone).
    """

    def __init__(self, min_share: int = 1, grace: float = 0.5, max_recent: int = 1024,
                 tau: float = RATE_TAU, siblings: Siblings | None = None):
        if min_share < 1:
            raise ValueError("min_share must be >= 1")
        self.min_share = min_share
        self.grace = grace
        self.max_recent = max_recent
        self.tau = tau
        self.siblings = siblings
        self._held: dict[str, int] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()  # idle client -> when it left
        self._usage: OrderedDict[str, Usage] = OrderedDict()  # least recently changed first
        self._pressed = False  # this worker's model, as its caller last said
        self._moved_at = -math.inf  # when should_move last said yes
        self._uneven_since: float | None = None  # since when _less_loaded has seen unevenness
        self._crowded, self._crowded_at = False, -math.inf  # crowded(), and when
        self._snapshot_cache: tuple | None = None  # _snapshot()'s last answer
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

    def _touch(self, client: str, now: float) -> Usage:
        """``client``'s usage brought to ``now``, moved to the end; the stalest forgotten."""
        usage = self._usage.pop(client, None) or Usage(now)
        self._usage[client] = usage.advance(now, self.tau)
        while len(self._usage) > self.max_recent + len(self._held):
            stalest = next(iter(self._usage))
            if self._usage[stalest].held:
                break
            del self._usage[stalest]
        return usage

    def enter(self, client: str, pressed: bool, now: float | None = None) -> bool:
        """Count one more request of ``client`` and return True; or, when the model is
        pressed (``pressed``: in this worker; or in another, as it last said), ``client``
        holds requests already and is over its share (either rule of the module's docstring),
        count nothing and return False. A client alone is never over its share (admission by
        expected wait holds it)."""
        now = time.monotonic() if now is None else now
        self._pressed = pressed  # published as is: a sibling's pressure is not echoed
        others = self._others(now)
        for fresh in (False, True):
            with self._lock:
                why = self._over(client, pressed, others, now)
                if why is None:
                    held = self._held.get(client, 0)
                    self._recent.pop(client, None)
                    self._held[client] = held + 1
                    self._total += 1
                    self._touch(client, now).held += 1
                    break
                if why == "here" or fresh:
                    return False
            # refused only for what other workers said: make sure that it is still so
            others = self.siblings.others(now, fresh=True)
        self._publish(now)
        return True

    def _over(self, client: str, pressed: bool, others: list[dict], now: float) -> str | None:
        """Why ``client`` is over its share (``"here"``: it holds requests in this worker;
        ``"elsewhere"``: only in others, as they last said), or None (under the lock)."""
        pressed = pressed or any(sibling.get("pressed") for sibling in others)
        self._forget(now)
        held = self._held.get(client, 0)
        held_everywhere = held + sum(_held(sibling, client) for sibling in others)
        if not (pressed and held_everywhere):
            return None
        beside = len(self._held) + len(self._recent) - (
            client in self._held or client in self._recent)
        if (beside and held_everywhere >= self._share()
                or self._pressed and beside
                and self._better_served_elsewhere(client, others, now)
                or self._faster_than_the_waiting(client, others, now)):
            return "here" if held else "elsewhere"
        return None

    def leave(self, client: str, now: float | None = None, images: int = 1) -> None:
        """One request of ``client`` was answered (after an :meth:`enter` that returned True),
        with ``images`` images; a client with nothing left in flight moves to the recent
        clients."""
        now = time.monotonic() if now is None else now
        with self._lock:
            held = self._held.get(client, 0)
            if held <= 0:
                raise RuntimeError(f"{client!r} has no request in flight")
            if held == 1:
                del self._held[client]
                self._recent[client] = now
                self._forget(now)
            else:
                self._held[client] = held - 1
            self._total -= 1
            usage = self._touch(client, now)
            usage.held -= 1
            usage.answers += images
        self._publish(now)

    def _faster_than_the_waiting(self, client: str, others: list[dict], now: float) -> bool:
        """Whether ``client``'s images served per second, over every worker, pass
        ``RATE_SLACK`` times those of the fastest other backlogged client (under the lock)."""
        everywhere = self._snapshot(now, others)[1]
        own = everywhere.get(client)
        if own is None:
            return False
        fastest = max((rate for name, (rate, in_flight) in everywhere.items()
                       if name != client and in_flight >= BACKLOGGED), default=0.0)
        return fastest > 0 and own[0] > RATE_SLACK * fastest

    def _snapshot(self, now: float, others: list[dict]) -> tuple[dict, dict]:
        """(this worker's figures, ``{client: [images served per second, in flight]}``
        summed over every worker), worked out at most every ``SNAPSHOT_EVERY`` seconds for the same
        ``others``: with many clients the rules would otherwise go through all of them at
        every request (under the lock)."""
        cached = self._snapshot_cache
        if cached and cached[1] is others and 0.0 <= now - cached[0] < SNAPSHOT_EVERY:
            return cached[2], cached[3]
        figures = self._figures(now)
        everywhere = {name: [rate, in_flight] for name, (rate, in_flight, _) in figures.items()}
        for sibling in others:
            for name, (rate, in_flight, _) in sibling.get("clients", {}).items():
                summed = everywhere.setdefault(name, [0.0, 0.0])
                summed[0] += rate
                summed[1] += in_flight
        self._snapshot_cache = (now, others, figures, everywhere)
        return figures, everywhere

    def crowded(self, now: float | None = None) -> bool:
        """Whether this worker's model is pressed and another worker gives the clients waiting
        on it more (``RATE_SLACK``) or has room (not pressed, fewer clients waiting on it);
        worked out at most every
        ``Siblings.every`` seconds (False without siblings). gunicorn's workers share one
        listening socket: a crowded worker lets the others accept a new connection first
        (``gunicorn_worker.py``)."""
        if not self.may_move():
            return False
        now = time.monotonic() if now is None else now
        if now - self._crowded_at >= self.siblings.every:
            others = self.siblings.others(now)
            with self._lock:
                self._crowded = self._better_elsewhere(None, others, self._figures(now))
                self._crowded_at = now
        return self._crowded

    def may_move(self) -> bool:
        """Cheap: whether :meth:`should_move` may say yes at all (there are siblings and this
        worker's model is pressed)."""
        return self.siblings is not None and self._pressed

    def should_move(self, client: str, now: float | None = None) -> int | None:
        """The pid of the worker ``client``'s connection should move to, or None: this
        worker's model is pressed, no connection was told to move in the last ``MOVE_EVERY``
        seconds, and either

        * the client waits on this worker (backlogged here) and holds nothing else here (its
          only request here was just answered: moving one of many connections would not change
          its share), and another worker has at least two fewer clients waiting on it (the one
          with the fewest); this worker then forgets the client's figures at once, so that
          neither worker counts it twice. Without it, four clients with one connection each
          that the kernel happened to hand to one worker stay there for good, sharing half the
          machine; or
        * the connections of one client that is alone on the server are uneven between the
          workers (:meth:`_less_loaded`): one client with many kept-alive connections (a load
          generator, or a proxy in front of the service) that the kernel split 42 to 22
          between two workers would otherwise wait longer in one worker than in the other for
          as long as it keeps them, and be refused there first.

        The web layer then hands the connection to that worker after its answer
        (``common/web/clients.py``, ``gunicorn_worker.Handoff``): the client's next request
        on it is that worker's.

        Counts, not rates, decide: each move is exact (the connection goes where it is
        sent), and rates averaged over ``tau`` seconds lag behind a move, so that moving by
        them sent clients back and forth between even workers (measured,
        docs/BENCHMARKS.md)."""
        if not self.may_move():
            return None
        now = time.monotonic() if now is None else now
        others = self._others(now)
        with self._lock:
            if now - self._moved_at < MOVE_EVERY or not others:
                return None
            target = self._fewer_waiting(client, others, now)
            if target is not None:
                self._usage.pop(client, None)
                self._recent.pop(client, None)
                self._snapshot_cache = None
            else:
                target = self._less_loaded(client, others, now)
                if target is None:
                    return None
            self._moved_at = now
        log.debug("fair share: a connection of %s is asked to move to worker %s", client,
                  target.get("pid"))
        self._publish(now, force=True)  # the others see at once what left
        return target.get("pid")

    def _fewer_waiting(self, client: str, others: list[dict], now: float) -> dict | None:
        """The sibling with the fewest clients waiting on it, when ``client`` waits on this
        worker only with the request just answered and that sibling has at least two fewer
        clients waiting on it than this one (under the lock); else None."""
        if self._held.get(client, 0):
            return None
        figures = self._figures(now)
        if figures.get(client, (0.0, 0.0))[1] < BACKLOGGED:
            return None
        target = min(others, key=lambda s: _waiting(s.get("clients", {}), client))
        if _waiting(target.get("clients", {}), client) + 1 >= _waiting(figures, None):
            return None
        return target

    def _less_loaded(self, client: str, others: list[dict], now: float) -> dict | None:
        """The sibling holding the fewest requests in flight, when for ``UNEVEN_FOR`` seconds
        this worker has held at least ``UNEVEN`` more (this connection's next request counted)
        and no client but ``client`` has held requests in any worker, as their figures say
        (under the lock); else None. Between several clients the fair share's rules decide
        where each may be served: a connection moved to even the counts could be refused
        there (rule 1 counts its requests in every worker). The unevenness must last, so that
        the counts' flicker between two batches moves nothing."""
        alone = not any(name != client for name in self._held) and not any(
            name != client and figures[2]
            for sibling in others for name, figures in sibling.get("clients", {}).items())
        target = min(others, key=_holds)
        if not alone or self._total + 1 < _holds(target) + UNEVEN:
            self._uneven_since = None
            return None
        if self._uneven_since is None:
            self._uneven_since = now
        if now - self._uneven_since < UNEVEN_FOR:
            return None
        self._uneven_since = None
        return target

    def _better_served_elsewhere(self, client: str, others: list[dict], now: float) -> bool:
        """Whether another worker that has served ``client`` lately gives the clients waiting
        on it more than this one (:meth:`_better_elsewhere`; under the lock; this worker's
        model is pressed): the client then yields here to those that have this worker only."""
        serving = [s for s in others if s.get("clients", {}).get(client, (0.0,))[0] > 0]
        return bool(serving) and self._better_elsewhere(client, serving,
                                                        self._snapshot(now, others)[0])

    @staticmethod
    def _better_elsewhere(client: str, others: list[dict], figures: dict) -> bool:
        """Whether one of ``others`` (siblings' figures) gives the clients waiting on it,
        ``client`` aside, more than ``RATE_SLACK`` times what this worker (``figures``) gives
        them, or has room to give: its model is not pressed and one more client waiting on it
        would still leave fewer than wait on this worker (so that a worker dipping under
        pressed for a moment does not draw clients back and forth between two that are
        even)."""
        here, waiting = _level(figures, client), _waiting(figures, None)
        return any(not s.get("pressed") and _waiting(s.get("clients", {}), client) + 1 < waiting
                   or _level(s.get("clients", {}), client) > RATE_SLACK * here
                   for s in others)

    def _figures(self, now: float) -> dict[str, list]:
        """This worker's clients: ``{client: [images served per second, in flight, held]}``
        (under the lock; the negligible ones forgotten)."""
        figures = {}
        for client in list(self._usage):
            usage = self._usage[client].advance(now, self.tau)
            if usage.negligible():
                del self._usage[client]
            else:
                figures[client] = [usage.answers / self.tau, usage.in_flight, usage.held]
        return figures

    def _others(self, now: float) -> list[dict]:
        return self.siblings.others(now) if self.siblings is not None else _NO_SIBLINGS

    def _publish(self, now: float, force: bool = False) -> None:
        siblings = self.siblings
        if siblings is None:
            return
        with self._lock:
            if not siblings.claim(now) and not force:
                return
            mine = self._figures(now)
            figures = {"pressed": self._pressed, "clients": {
                name: [round(rate, 3), round(in_flight, 3), held]
                for name, (rate, in_flight, held) in mine.items()}}
        siblings.publish(figures)

    def usage(self, now: float | None = None) -> dict[str, list]:
        """This worker's clients' recent use: ``{client: [images served per second, requests in
        flight on average, held now]}``."""
        with self._lock:
            return self._figures(time.monotonic() if now is None else now)

    def in_flight(self) -> dict[str, int]:
        """A copy of the table: each client with requests in flight, and how many."""
        with self._lock:
            return dict(self._held)

    def active(self, now: float | None = None) -> int:
        """Clients holding requests or answered within ``grace`` seconds."""
        with self._lock:
            self._forget(time.monotonic() if now is None else now)
            return len(self._held) + len(self._recent)


_NO_SIBLINGS: list[dict] = []  # never changed: one object, so that _snapshot's cache holds


def _waiting(clients: dict, client: str | None) -> int:
    """How many clients wait on a worker (backlogged), ``client`` aside."""
    return sum(1 for name, (_, in_flight, _) in clients.items()
               if name != client and in_flight >= BACKLOGGED)


def _level(clients: dict, client: str | None) -> float:
    """What a worker gives the clients that wait on it, ``client`` aside: the answers per
    second of the fastest backlogged one (0.0: none)."""
    return max((rate for name, (rate, in_flight, _) in clients.items()
                if name != client and in_flight >= BACKLOGGED), default=0.0)


def _holds(sibling: dict) -> int:
    """The requests in flight in a sibling, as its figures say (every client's held)."""
    return sum(int(figures[2]) for figures in sibling.get("clients", {}).values())


def _held(sibling: dict, client: str) -> int:
    """The requests a sibling's figures say ``client`` holds there."""
    figures = sibling.get("clients", {}).get(client)
    return int(figures[2]) if figures else 0
