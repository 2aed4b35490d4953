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

A request finds its version with :meth:`Manager.lease`, which looks it up and counts it as
held under one lock, so a version is never unloaded under a request that has found it.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

from common.config import Config
from common.errors import ModelNotFound
from common.inference.batcher import Ticket
from common.inference.classifier import Classifier
from common.modelfolder import ModelFolder, ModelLoadError
from common.versions.policy import Kind, Serving, next_action
from common.versions.served import Health, ServedVersion, State
from common.versions.settings import SettingsFile, VersionPolicy
from common.versions.source import VersionFolder, source_for, without_paths

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
    """

    def __init__(self, config: Config, load: Callable[[ModelFolder], Classifier], *,
                 metrics=None, on_hung=None, on_failure=None,
                 classifier: Classifier | Callable[[], Classifier] | None = None,
                 audit=None):
        self.config = config
        self.audit = audit
        self._load = load
        self.metrics = metrics
        self.on_hung = on_hung
        self.on_failure = on_failure
        self._given = classifier
        self.source = source_for(config) if classifier is None else None
        self.settings_file = SettingsFile(config.model_config)
        self._versions: dict[str, dict[int, _Version]] = {}
        self._lock = threading.Lock()  # the table
        self._poll_lock = threading.Lock()  # one poll at a time
        self._closed = threading.Event()
        self._initial: list[ServedVersion] = []
        #: Held while a version found after start-up loads and warms up: a roll-out's load
        #: competes with serving. gunicorn.conf.py makes it one worker at a time
        #: (``OneLoadAtATime``), so the other workers serve at full speed meanwhile.
        self.load_turn: Callable[[], ContextManager] = contextlib.nullcontext

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> "Manager":
        """First poll (loads start in the background), then the poller thread if asked.
        Call it from the thread that should own the model threads (not a request thread)."""
        if self._given is not None:
            name = self.config.default_model or "default"
            served = self._served(self._given, identity=None).start()
            self._versions[name] = {1: _Version(None, served)}
            self._initial = [served]
            return self
        self.poll(initial=True)
        if self.config.model_poll_seconds > 0:
            threading.Thread(target=self._poll_forever, name="model-poller",
                             daemon=True).start()
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
        with self._lock:
            versions = [v.served for model in self._versions.values() for v in model.values()]
        for served in versions:
            served.close()

    def _poll_forever(self) -> None:
        while not self._closed.wait(self.config.model_poll_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the poller must outlive one bad scan
                log.exception("model repository poll failed")

    # -- keeping in step with the source ----------------------------------------------------------
    def poll(self, initial: bool = False) -> None:
        """Scan once, then apply the policy's next action for each model until there is none
        (:func:`~common.versions.policy.next_action`)."""
        with self._poll_lock:
            self.settings_file.refresh()
            settings = self.settings_file.settings
            found = self.source.scan(confirm_after=1.0 if initial else 0.0)
            to_retire: list[ServedVersion] = []
            with self._lock:
                table = {name: dict(versions) for name, versions in self._versions.items()}
            for name in sorted(set(found) | set(table)):
                offered = found.get(name, {})
                have = table.setdefault(name, {})
                to_retire += self._apply(name, offered, settings.model(name).policy, have,
                                         initial)
                if not have:
                    table.pop(name)
            with self._lock:
                self._versions = table
        for served in to_retire:
            threading.Thread(target=self._retire, args=(served,), name="model-unloader",
                             daemon=True).start()

    def _apply(self, name: str, offered: dict[int, VersionFolder], policy: VersionPolicy,
               have: dict[int, _Version], initial: bool) -> list[ServedVersion]:
        """Move ``have`` (one model's entries) towards what ``policy`` aspires to, one action
        at a time; returns the versions taken out of it, to retire."""
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
                         action.reason)
                retired.append(have.pop(action.version).served)
                continue
            folder = offered[action.version]
            if action.version in have:  # failed or loading: the new files replace it
                retired.append(have.pop(action.version).served)
            served = self._served(lambda f=folder: self._load_quoted(f),
                                  identity=(name, action.version), initial=initial)
            have[action.version] = _Version(folder, served.start())
            if initial:
                self._initial.append(served)
            log.info("loading model %s version %d from %s (%s)", name, action.version,
                     folder.path, action.reason)

    def _load_quoted(self, folder: VersionFolder) -> Classifier:
        """Load ``folder``; a failure's message, which becomes the version's error in every
        answer (``/models``, the protocols' status, 503s), names files as the source shows them
        (``flowers/2/labels.txt``; ``MODEL_PATH``: its folder's name), never by their server
        path. The log keeps the full message."""
        try:
            loaded = self._load(self.source.open(folder))
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

    def _served(self, classifier, identity, initial: bool = False) -> ServedVersion:
        return ServedVersion(classifier, self.config, metrics=self.metrics, on_hung=self.on_hung,
                             on_failure=self.on_failure if initial and self.source.essential
                             else None, identity=identity,
                             turn=contextlib.nullcontext if initial else self.load_turn)

    # -- requests ---------------------------------------------------------------------------------
    @property
    def default_name(self) -> str | None:
        """``DEFAULT_MODEL``, else the settings file's, else the only model, else ``demo``."""
        configured = self.config.default_model or self.settings_file.settings.default_model
        if configured:
            return configured
        names = list(self._versions)
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
        """Health of the default model's served version (``/readyz``)."""
        try:
            return self.default().health()
        except ModelNotFound:
            return Health(State.LOADING, "no model found yet")


__all__ = ["Manager", "Route", "Lease"]
