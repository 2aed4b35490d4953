"""Which model versions this worker serves, kept in step with the source. No web framework here.

TF Serving's three roles, each in its own module: the *source* (:mod:`.source`) scans what
versions exist and which have settled; the *policy* (:mod:`.policy`) turns that, the settings
file's version policy (:mod:`.settings`) and what is served into the aspired versions and one
next action per model; the *manager* (this module) applies the actions and maps a model name,
and a version number or label, to one :class:`~common.versions.served.ServedVersion`
(classifier + batcher + hang watchdog + metrics, built, warmed up and closed together). A poller
thread (``MODEL_POLL_SECONDS``; each gunicorn worker runs its own) repeats the round:

* a new settled version is loaded and warmed up in the background; it takes traffic only once
  ready, and the version it replaces keeps serving until then;
* a version the policy no longer wants, or whose folder is gone, is unloaded once every version
  the policy wants has settled and one of them is ready (a model whose folder is gone goes at
  once). It leaves the routing table first and is closed only after the requests that hold it
  have been answered (``ServedVersion.retire``), so no request sees a half-unloaded version;
* a version that fails to load stays in the status with its error, the others keep serving,
  and it is tried again when its files change.

Explicit requests (Triton's model repository extension): :meth:`Manager.request_unload` takes
a model out of service in every worker and keeps the poller from bringing it back;
:meth:`Manager.request_load` serves it again and scans the repository now (with
``MODEL_POLL_SECONDS=0`` the only scans after start-up: Triton's explicit mode). Each gunicorn
worker has its own manager and a request reaches one of them, so requests travel through a
small shared file (:class:`ModelRequests`) that every worker's poller applies, and a request is
answered once every worker has. With ``MODEL_PATH`` (a repository of one model) unloading it
leaves the server serving nothing (``/classify`` 404, ``/readyz`` 503, both saying so) until it
is loaded again.

A request finds its version with :meth:`Manager.lease`, which looks it up and counts it as
held under one lock, so a version is never unloaded under a request that has found it.
"""
from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from common.config import Config
from common.errors import BadRequest, ModelNotFound, ModelNotReady, ServiceUnavailable
from common.inference.batcher import Ticket
from common.inference.classifier import Classifier
from common.machine import lower_thread_priority
from common.modelfolder import ModelFolder, ModelLoadError
from common.versions.policy import Kind, Serving, next_action, offered_models
from common.versions.served import Health, ServedVersion, State
from common.versions.settings import SettingsFile, VersionPolicy
from common.versions.source import VersionFolder, routable, source_for, without_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """What a request asks for: a model name (None: the default model) and at most one of a
    version number or a version label."""

    name: str | None = None
    version: int | None = None
    label: str | None = None


@dataclass
class Lease:
    """A request's hold on one served version: the classifier that serves it from start to
    finish and its room in that version's queue. A context manager: the room not used is given
    back on exit, and only then may the version be unloaded (:meth:`ServedVersion.retire`)."""

    classifier: Classifier
    ticket: Ticket
    served: ServedVersion

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.ticket.release()
        self.served.unhold()


@dataclass
class _Version:
    """One entry of the manager's table: the version and the folder it was loaded from (None
    for a classifier given in memory)."""

    folder: VersionFolder | None
    served: ServedVersion


#: How often each worker's poller thread looks at the requests file (one ``stat``) between
#: scans, and how often a request waiting for the other workers looks at their acks.
TICK_SECONDS = 0.2
#: How long a load or unload request waits for this worker and its siblings to apply it.
REQUEST_PATIENCE = 120.0
#: The requests file's name in ``TEMP_DIR`` (hidden: the image store never counts or trims it).
REQUESTS_FILE = ".model-requests.json"


@dataclass(frozen=True)
class Requested:
    """The explicit requests as last written: ``seq`` counts the writes (0: none in this run of
    the server), ``unloaded`` holds the models unloaded by request (the poller offers them
    nothing until they are loaded again), ``acks`` each worker's pid -> the last ``seq`` it
    has applied and settled."""

    seq: int = 0
    unloaded: frozenset = frozenset()
    acks: dict = field(default_factory=dict)


def _proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name ([] where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot; "" without ``/proc``): with the
    pid it names one process, even where pids are reused (a container's pid 1)."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _parent_of(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if len(fields) > 1 else None


def _is_gunicorn(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"gunicorn" in fh.read()
    except OSError:
        return False


def server_process() -> int:
    """The process that is the server: under gunicorn (its arbiter was imported before this
    worker was forked, and the parent is gunicorn, where ``/proc`` says) the master, this
    worker's parent; otherwise this process."""
    if "gunicorn.arbiter" not in sys.modules:
        return os.getpid()
    parent = os.getppid()
    return parent if _is_gunicorn(parent) or not os.path.isdir("/proc") else os.getpid()


class ModelRequests:
    """Explicit load and unload requests (Triton's model repository extension), shared by the
    server's workers.

    Under gunicorn each worker has its own manager, and a request reaches one of them; what it
    asks must hold in all of them. So a request is written to one small JSON file, ``path``
    (``<TEMP_DIR>/.model-requests.json``), replaced atomically under an ``flock`` on
    ``<path>.lock``: the models unloaded by request and a sequence number. Every worker's
    poller looks at the file each ``TICK_SECONDS`` (one ``stat``); a new sequence number makes
    it poll at once (a poll offers an unloaded model nothing, so it leaves the routing table,
    and scans the repository again, so a model loaded again comes back), and once none of its
    versions is still loading it writes the number back as its *ack*. The request waits until
    its own worker and every live sibling (the server's other child processes, from ``/proc``,
    and any worker that has acked before) has acked its number, so when it is answered every
    worker serves (or refuses) the model alike. A worker started later reads the file at its
    first poll, so it never loads a model unloaded by request.

    The file belongs to one run of the server: it names the server's process (pid and start
    time, :func:`server_process`); a file left by an earlier run is read as empty, so a restart
    serves the repository as it is, as Triton does. Acks of workers that have exited are
    ignored (and dropped at the next write). Nothing is written until the first request.
    """

    def __init__(self, path: str, server: int | None = None):
        self.path = path
        self.server_pid = server_process() if server is None else server
        self.server = f"{self.server_pid}:{_start_time(self.server_pid)}"
        self._lock = threading.Lock()
        self._state = Requested()
        self._seen: tuple | None = None  # (inode, mtime, size) of the file last read

    def read(self) -> Requested:
        """The requests now: one ``stat``, and a read only when the file has changed."""
        try:
            st = os.stat(self.path)
        except OSError:
            return Requested()
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if seen != self._seen:
                self._state, self._seen = self._load(), seen
            return self._state

    def _load(self) -> Requested:
        try:
            with open(self.path) as fh:
                data = json.load(fh)
            if not isinstance(data, dict) or data.get("server") != self.server:
                return Requested()  # an earlier run's
            return Requested(int(data["seq"]), frozenset(str(n) for n in data["unloaded"]),
                             {int(pid): int(seq) for pid, seq in data["acks"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("cannot read %s: %s; no model is unloaded by request", self.path, exc)
            return Requested()

    def set_unloaded(self, name: str, unloaded: bool) -> int:
        """Record that ``name`` is unloaded by request (or is not any more); returns the new
        sequence number the workers will ack (a load writes one even when nothing changes,
        so that every worker scans the repository again)."""
        def change(state: Requested) -> Requested:
            names = state.unloaded | {name} if unloaded else state.unloaded - {name}
            return Requested(state.seq + 1, frozenset(names), state.acks)
        return self._write(change).seq

    def ack(self, pid: int, seq: int) -> None:
        """Worker ``pid`` has applied the requests up to ``seq``, and nothing is loading."""
        self._write(lambda state: Requested(state.seq, state.unloaded,
                                            {**state.acks, pid: max(seq, state.acks.get(pid, 0))}))

    def forget(self, pid: int) -> None:
        """Worker ``pid`` is leaving: nobody waits for its ack."""
        if pid in self.read().acks:
            self._write(lambda state: Requested(
                state.seq, state.unloaded, {p: s for p, s in state.acks.items() if p != pid}))

    def behind(self, seq: int, me: int) -> list[int]:
        """The live sibling workers (not ``me``) that have not acked ``seq`` yet."""
        acks = self.read().acks
        siblings = (set(acks) | self._children()) - {me}
        return sorted(pid for pid in siblings if acks.get(pid, 0) < seq and self._alive(pid))

    def _children(self) -> set[int]:
        """The server's workers: its child processes that are gunicorn (forks of the master,
        not a program it may have started); none when this process is the server or there is
        no ``/proc``."""
        if self.server_pid == os.getpid():
            return set()
        try:
            entries = os.listdir("/proc")
        except OSError:
            return set()
        return {int(e) for e in entries if e.isdigit() and _parent_of(int(e)) == self.server_pid
                and _is_gunicorn(int(e))}

    def _alive(self, pid: int) -> bool:
        """Whether ``pid`` is a live worker of this server (a pid reused by another process is
        not: its parent is not the server's, where ``/proc`` says)."""
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False  # gone, or not ours to signal: not a sibling
        parent = _parent_of(pid)
        return parent is None or parent == self.server_pid or pid == os.getpid()

    def _write(self, change: Callable[[Requested], Requested]) -> Requested:
        """Read, change and replace the file under its lock; returns what was written."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with self._lock:
                    self._seen = None  # read the file itself, under the lock
                state = change(self.read())
                acks = {pid: seq for pid, seq in state.acks.items() if self._alive(pid)}
                tmp = f"{self.path}.{os.getpid()}.tmp"
                with open(tmp, "w") as fh:
                    json.dump({"server": self.server, "seq": state.seq,
                               "unloaded": sorted(state.unloaded),
                               "acks": {str(pid): seq for pid, seq in acks.items()}}, fh)
                os.replace(tmp, self.path)
                return Requested(state.seq, state.unloaded, acks)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class Manager:
    """The served versions of every model, by name and version.

    Args:
        config: ``MODEL_REPOSITORY`` / ``MODEL_PATH``, ``MODEL_CONFIG``, ``DEFAULT_MODEL``,
            ``MODEL_POLL_SECONDS`` and the batching settings of every version.
        load: loads the classifier of a model folder on a runtime (run in a background
            thread); the source (:func:`~common.versions.source.source_for`) says which folder.
        metrics: ``common.metrics.Metrics`` (or None).
        on_hung: passed to every ServedVersion (the worker's exit when a call hangs).
        on_failure: called when a version found at start-up fails to load and the source is
            essential (the worker's exit: it has nothing else to serve); later failures, and
            any failure in a repository, are only reported.
        classifier: serve this in-memory classifier (or zero-argument loader) as the only
            model instead of reading any folder (tests).
        audit: ``common.audit.Audit`` (or None): ``model_loaded`` when a version found in the
            source has loaded, ``model_unloaded`` when one is retired (one record per worker,
            each loads its own).
        may_lower: whether a folder may load at ``LOAD_NICE`` (``loader.load_starts_threads``
            says it starts no lasting thread); None: every load at normal priority.
    """

    def __init__(self, config: Config, load: Callable[[ModelFolder], Classifier], *,
                 metrics=None, on_hung=None, on_failure=None,
                 classifier: Classifier | Callable[[], Classifier] | None = None,
                 audit=None, may_lower: Callable[[ModelFolder], bool] | None = None):
        self.config = config
        self.audit = audit
        self._load = load
        self.may_lower = may_lower
        self.metrics = metrics
        self.on_hung = on_hung
        self.on_failure = on_failure
        self._given = classifier
        self.source = source_for(config) if classifier is None else None
        self.settings_file = SettingsFile(config.model_config)
        self._versions: dict[str, dict[int, _Version]] = {}
        #: Explicit load/unload requests shared by the server's workers (None: a classifier
        #: given in memory, which has no repository to load from).
        self.requests = (ModelRequests(os.path.join(config.temp_dir, REQUESTS_FILE))
                         if classifier is None else None)
        self._found: dict[str, dict[int, VersionFolder]] = {}  # the last scan, for the index
        self._unloaded: frozenset = frozenset()  # unloaded by request, as last applied here
        self._applied = 0  # the requests' sequence number the last poll applied
        self._acked = 0  # and the last one this worker acked (applied, nothing loading)
        self._settled = threading.Condition()  # notified when _acked moves
        self._wake = threading.Event()  # a request asks the poller to look now
        self._lock = threading.Lock()  # the table
        self._poll_lock = threading.Lock()  # one poll at a time
        self._closed = threading.Event()
        self._initial: list[ServedVersion] = []
        #: Held while a version found after start-up loads and warms up at normal priority
        #: (not at ``LOAD_NICE``): a roll-out's load competes with serving. gunicorn.conf.py
        #: makes it one worker at a time (``OneLoadAtATime``), so the other workers serve at
        #: full speed meanwhile.
        self.load_turn: Callable[[], ContextManager] = contextlib.nullcontext

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> "Manager":
        """First poll (loads start in the background), then the poller thread: it scans every
        ``MODEL_POLL_SECONDS`` (0: only at start and on a load request, Triton's explicit
        mode) and applies load/unload requests (:class:`ModelRequests`) as they come. Call it
        from the thread that should own the model threads (not a request thread)."""
        if self._given is not None:
            name = self.config.default_model or "default"
            served = self._served(self._given, identity=None).start()
            self._versions[name] = {1: _Version(None, served)}
            self._initial = [served]
            return self
        self.poll(initial=True)
        threading.Thread(target=self._poll_forever, name="model-poller", daemon=True).start()
        return self

    def wait_initial(self, timeout: float | None = None) -> bool:
        """Block until every version found at start-up has loaded or failed; True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for served in self._initial:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if served.wait(left).state is State.LOADING:
                return False
        return True

    def close(self) -> None:
        """Stop polling, then close every version (answering what is queued)."""
        self._closed.set()
        self._wake.set()
        with self._settled:
            self._settled.notify_all()
        if self.requests is not None and self._acked:
            try:
                self.requests.forget(os.getpid())
            except OSError as exc:
                log.warning("cannot update %s: %s", self.requests.path, exc)
        with self._lock:
            versions = [v.served for model in self._versions.values() for v in model.values()]
        for served in versions:
            served.close()

    def _poll_forever(self) -> None:
        """Scan every ``MODEL_POLL_SECONDS`` (never when 0) and whenever the requests file has
        a new sequence number (looked at each ``TICK_SECONDS``); ack what was applied once
        nothing is loading."""
        every = self.config.model_poll_seconds
        last = time.monotonic()
        while not self._closed.is_set():
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                due = every > 0 and time.monotonic() - last >= every
                if due or self.requests.read().seq != self._applied:
                    last = time.monotonic()
                    self.poll()
                self._ack_when_settled()
            except Exception:  # noqa: BLE001 - the poller must outlive one bad scan
                log.exception("model repository poll failed")

    def _ack_when_settled(self) -> None:
        """Ack the requests the last poll applied, once none of this worker's versions is
        loading (a load request is answered when its model has loaded or failed)."""
        applied = self._applied
        if applied <= self._acked:
            return
        with self._lock:
            loading = any(entry.served.health().state is State.LOADING
                          for model in self._versions.values() for entry in model.values())
        if loading:
            return
        self.requests.ack(os.getpid(), applied)
        with self._settled:
            self._acked = applied
            self._settled.notify_all()

    # -- keeping in step with the source ----------------------------------------------------------
    def poll(self, initial: bool = False) -> None:
        """Scan once, then apply the policy's next action for each model until there is none
        (:func:`~common.versions.policy.next_action`)."""
        with self._poll_lock:
            requested = self.requests.read()
            self.settings_file.refresh()
            settings = self.settings_file.settings
            found = self.source.scan(confirm_after=1.0 if initial else 0.0)
            offers = offered_models(found, requested.unloaded)
            to_retire: list[ServedVersion] = []
            with self._lock:
                table = {name: dict(versions) for name, versions in self._versions.items()}
            for name in sorted(set(offers) | set(table)):
                offered = offers.get(name, {})
                have = table.setdefault(name, {})
                to_retire += self._apply(name, offered, settings.model(name).policy, have,
                                         initial, name in requested.unloaded)
                if not have:
                    table.pop(name)
            with self._lock:
                self._versions = table
                self._found = found
                self._unloaded = requested.unloaded
            self._applied = requested.seq
        for served in to_retire:
            threading.Thread(target=self._retire, args=(served,), name="model-unloader",
                             daemon=True).start()

    def _apply(self, name: str, offered: dict[int, VersionFolder], policy: VersionPolicy,
               have: dict[int, _Version], initial: bool,
               unloaded: bool = False) -> list[ServedVersion]:
        """Move ``have`` (one model's entries) towards what ``policy`` aspires to, one action
        at a time; returns the versions taken out of it, to retire. ``unloaded``: the model
        is unloaded by request (``offered`` is then empty)."""
        prints = {version: folder.fingerprint for version, folder in offered.items()}
        retired = []
        while True:
            serving = {version: Serving(entry.folder.fingerprint if entry.folder else None,
                                        entry.served.health().state)
                       for version, entry in have.items()}
            action = next_action(prints, policy, serving)
            if action is None:
                return retired
            if action.kind is Kind.UNLOAD:
                log.info("unloading model %s version %d (%s)", name, action.version,
                         "unloaded by request" if unloaded else action.reason)
                retired.append(have.pop(action.version).served)
                continue
            folder = offered[action.version]
            if action.version in have:  # failed or loading: the new files replace it
                retired.append(have.pop(action.version).served)
            nice = 0 if initial else self._load_nice(folder)
            served = self._served(lambda f=folder, n=nice: self._load_quoted(f, n),
                                  identity=(name, action.version), initial=initial,
                                  lowered=bool(nice))
            have[action.version] = _Version(folder, served.start())
            if initial:
                self._initial.append(served)
            log.info("loading model %s version %d from %s (%s)", name, action.version,
                     folder.path, action.reason)

    def _load_quoted(self, folder: VersionFolder, nice: int = 0) -> Classifier:
        """Load ``folder``; a failure's message, which becomes the version's error in every
        answer (``/models``, the protocols' status, 503s), names files as the source shows them
        (``flowers/2/labels.txt``; ``MODEL_PATH``: its folder's name), never by their server
        path. The log keeps the full message.

        ``nice`` (:meth:`_load_nice`): load at that lower CPU priority, so that a roll-out's
        load and warm-up take the CPU the serving versions leave. The call then runs in a
        thread of its own (``ServedVersion``'s ``apart``), which ends with the load."""
        try:
            opened = self.source.open(folder)
            if nice:
                log.info("model %s version %d loads at nice %d", folder.name, folder.version,
                         lower_thread_priority(nice))
            loaded = self._load(opened)
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            log.error("model %s version %d failed to load: %s", folder.name, folder.version,
                      message)
            raise ModelLoadError(without_paths(message, self.source.shown_roots)) from None
        self._audit("model_loaded", folder.name, folder.version)
        return loaded

    def _retire(self, served: ServedVersion) -> None:
        served.retire(self.config.request_timeout + 5.0)
        if served.identity is not None:
            self._audit("model_unloaded", *served.identity)
        gc.collect()  # the graph's memory goes back only once nothing refers to it

    def _audit(self, event: str, name: str, version: int) -> None:
        if self.audit is not None:
            self.audit.record(event, model=name, version=version)

    def _served(self, classifier, identity, initial: bool = False,
                lowered: bool = False) -> ServedVersion:
        return ServedVersion(classifier, self.config, metrics=self.metrics, on_hung=self.on_hung,
                             on_failure=self.on_failure if initial and self.source.essential
                             else None, identity=identity,
                             turn=contextlib.nullcontext if initial or lowered
                             else self.load_turn, apart=lowered)

    def _load_nice(self, folder: VersionFolder) -> int:
        """``LOAD_NICE`` for a version found after start-up when ``may_lower`` says its load
        starts no thread the model keeps, else 0. A load so lowered takes only the CPU the
        serving versions leave, so it does not wait for ``load_turn`` either: under
        saturation it is slow (tens of seconds), and one worker after another would multiply
        that by the workers."""
        if not self.config.load_nice or self.may_lower is None:
            return 0
        try:
            return self.config.load_nice if self.may_lower(self.source.open(folder)) else 0
        except Exception:  # a broken folder: its load reports what is wrong
            return 0

    # -- requests ---------------------------------------------------------------------------------
    @property
    def default_name(self) -> str | None:
        """``DEFAULT_MODEL``, else the settings file's, else the only model, else ``demo``
        (models unloaded by request count: unloading the default model does not make another
        one the default)."""
        configured = self.config.default_model or self.settings_file.settings.default_model
        if configured:
            return configured
        names = sorted(set(self._versions) | (self._unloaded & set(self._found)))
        if len(names) == 1:
            return names[0]
        return "demo" if "demo" in names else (sorted(names)[0] if names else None)

    def lease(self, route: Route, images: int = 1) -> Lease:
        """Find the version ``route`` asks for and reserve room for ``images`` images in its
        queue (the request has read its body, before it decodes). 404 for an unknown model,
        version or label; the version's 503 when it is not ready or overloaded. The version is
        looked up and held under one lock, so it is never unloaded under a request that found
        it."""
        with self._lock:
            served = self._find(route)
            served.hold()
        try:
            running = served.running()
            return Lease(running.classifier, running.batcher.admit(images), served)
        except BaseException:
            served.unhold()
            raise

    def precheck(self, route: Route, images: int = 1) -> None:
        """Refuse now what :meth:`lease` would refuse (404, or the version's 503), taking no
        room: a request prechecks before it reads its body and leases once it has it."""
        self.find(route).running().batcher.check_room(images)

    def find(self, route: Route) -> ServedVersion:
        """The version ``route`` asks for (for metadata and status; requests lease)."""
        with self._lock:
            return self._find(route)

    def _find(self, route: Route) -> ServedVersion:
        name = route.name or self.default_name
        versions = self._versions.get(name) if name else None
        if not versions:
            if name in self._unloaded:
                raise ModelNotFound(f"{'model' if route.name else 'the default model'} "
                                    f"{name!r} is unloaded (a repository unload request); a "
                                    "repository load request serves it again")
            raise ModelNotFound(f"no model named {name!r}" if route.name else
                                "no default model is being served")
        if route.label is not None:
            number = self.settings_file.settings.model(name).labels.get(route.label)
            if number is None:
                raise ModelNotFound(f"model {name!r} has no version labelled {route.label!r}")
            route = Route(name, number)
        if route.version is not None:
            entry = versions.get(route.version)
            if entry is None:
                raise ModelNotFound(f"model {name!r} has no version {route.version}")
            return entry.served
        ready = [v for v, e in versions.items() if e.served.health().ready]
        if ready:
            return versions[max(ready)].served
        return versions[max(versions)].served  # its 503 (loading, failed) says why

    def default(self) -> ServedVersion:
        return self.find(Route())

    # -- status -----------------------------------------------------------------------------------
    def status(self, name: str | None = None) -> list[dict]:
        """Every model (or ``name``): its versions with state and error, its labels."""
        with self._lock:
            table = {n: dict(v) for n, v in self._versions.items()}
        if name is not None and name not in table:
            raise ModelNotFound(f"no model named {name!r}")
        settings = self.settings_file.settings
        out = []
        for model in sorted(table) if name is None else [name]:
            versions = []
            for number, entry in sorted(table[model].items(), reverse=True):
                health: Health = entry.served.health()
                versions.append({"version": number, "state": health.state.value,
                                 "error": health.reason if health.state is State.FAILED
                                 else None})
            out.append({"name": model, "default": model == self.default_name,
                        "versions": versions,
                        "labels": settings.model(model).labels,
                        "version_policy": settings.model(model).policy.describe()})
        return out

    def settings_error(self) -> str | None:
        return self.settings_file.error

    def ready(self) -> Health:
        """Health of the default model's served version (``/readyz``). Raises ModelNotReady
        (503, saying so) when the default model was unloaded by request."""
        try:
            return self.default().health()
        except ModelNotFound as exc:
            if self.default_name in self._unloaded:
                raise ModelNotReady(exc.message) from None
            return Health(State.LOADING, "no model found yet")

    # -- the repository extension (explicit load and unload) ---------------------------------------
    def index(self) -> list[dict]:
        """Every version the repository holds (as of this worker's last scan) and every served
        one, by name then version: ``{"name", "version": int, "state", "reason"}``, where
        ``state`` is a served version's (``loading``, ``ready``, ``hung``, ``failed``,
        ``stopped``) or, for one on disk that is not served, ``unloaded`` (its model was
        unloaded by request) or ``not_served`` (its version policy does not choose it);
        ``reason`` says why a version is not ready ("" when it is)."""
        with self._lock:
            table = {n: dict(v) for n, v in self._versions.items()}
            found, unloaded = self._found, self._unloaded
        out = []
        for name in sorted(set(found) | set(table)):
            for version in sorted(set(found.get(name, {})) | set(table.get(name, {}))):
                entry = table.get(name, {}).get(version)
                if entry is not None:
                    health = entry.served.health()
                    state, reason = health.state.value, health.reason or ""
                elif name in unloaded:
                    state, reason = "unloaded", "unloaded by a repository request"
                else:
                    state, reason = "not_served", "not chosen by the model's version policy"
                out.append({"name": name, "version": version, "state": state,
                            "reason": "" if state == "ready" else reason or state})
        return out

    def request_load(self, name: str) -> None:
        """Load (or look again at) model ``name`` in every worker, as Triton's explicit load:
        it is no longer unloaded by request, every worker scans the repository now and loads
        the versions its version policy chooses; returns once this worker and its siblings
        have applied it (:class:`ModelRequests`). A version whose files are unchanged is not
        reloaded (a failed one is tried again after an unload, or when its files change).

        Raises ModelNotFound (404) when the repository has no model ``name``; BadRequest (400)
        with the reason when no version of it is ready (failed to load, or none chosen);
        BadRequest for a server given a classifier in memory; ServiceUnavailable (503) when
        the workers have not applied it within ``REQUEST_PATIENCE`` (they still will)."""
        self._request(name, unload=False)
        with self._lock:
            versions = dict(self._versions.get(name, {}))
            known = name in self._found
        if not versions:
            if not known:
                raise ModelNotFound(f"the repository has no model named {name!r}")
            raise BadRequest(f"model {name!r} has no version its version policy chooses "
                             "(see the repository index)")
        if not any(entry.served.health().ready for entry in versions.values()):
            reasons = "; ".join(f"version {v}: {e.served.health().reason or 'not ready'}"
                                for v, e in sorted(versions.items()))
            raise BadRequest(f"failed to load model {name!r}: {reasons}")

    def request_unload(self, name: str) -> None:
        """Stop serving every version of model ``name`` in every worker until a load request;
        the poller does not bring it back (a restart of the server does). Requests that hold
        a version are answered first. Returns once every worker has applied it. Raises
        ModelNotFound (404) for a model neither on disk nor served; BadRequest for a server
        given a classifier in memory; ServiceUnavailable as :meth:`request_load`."""
        with self._lock:
            known = name in self._found or name in self._versions or name in self._unloaded
        if not known:
            raise ModelNotFound(f"the repository has no model named {name!r}")
        self._request(name, unload=True)

    def _request(self, name: str, unload: bool) -> None:
        """Write the request, wake this worker's poller and wait until this worker and every
        sibling have applied it (each acks once nothing of its own is loading)."""
        if self.requests is None:
            raise BadRequest("this server serves a model given in memory; the repository "
                             "extension needs MODEL_REPOSITORY or MODEL_PATH")
        if not routable(name):
            raise ModelNotFound(f"the repository has no model named {name[:64]!r}")
        deadline = time.monotonic() + REQUEST_PATIENCE
        try:
            seq = self.requests.set_unloaded(name, unload)
        except OSError as exc:
            log.error("cannot write %s: %s", self.requests.path, exc)
            raise ServiceUnavailable("the model requests file in TEMP_DIR cannot be written")
        log.info("%s of model %s requested (request %d)", "unload" if unload else "load",
                 name, seq)
        self._wake.set()
        with self._settled:
            done = self._settled.wait_for(lambda: self._acked >= seq or self._closed.is_set(),
                                          max(0.0, deadline - time.monotonic()))
        if self._closed.is_set():
            raise ServiceUnavailable("the worker is shutting down")
        if not done:
            raise ServiceUnavailable(f"model {name!r} is still loading in this worker; the "
                                     "repository index shows when it is ready")
        behind = self.requests.behind(seq, os.getpid())
        while behind and time.monotonic() < deadline and not self._closed.is_set():
            time.sleep(TICK_SECONDS)
            behind = self.requests.behind(seq, os.getpid())
        if behind:
            raise ServiceUnavailable(f"{len(behind)} other worker(s) have not applied the "
                                     f"request for model {name!r} yet (they will)")


__all__ = ["Manager", "Route", "Lease"]
