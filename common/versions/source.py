"""The model repository on disk and its settings file: what versions exist, which are settled,
which each model should serve. No TensorFlow and no web framework here.

Layout, as TensorFlow Serving's (``MODEL_REPOSITORY``)::

    models/
      flowers/            a model: numbered version folders
        1/                each a model folder (SavedModel + labels.txt + model.json, or a legacy
        2/                retrained_graph.pb + labels)
      demo/               a folder that is itself a model folder is version 1 of "demo"
      .incoming-3/        hidden names are never read (publish by renaming into place)

Folders that are neither (no model inside, e.g. a feature-extractor module) are skipped with one
log line, and so are model and version folders that are symlinks resolving outside the
repository (a link inside it, e.g. ``3 -> 2``, is fine; ``MODEL_REPOSITORY`` itself may be a
link: the operator chose it). A version is loaded only once it is *settled*: its files (names,
sizes, times) were the same at two polls, or its newest file is older than ``settle_seconds``,
so a folder still being copied is never loaded.

The settings file (``MODEL_CONFIG``, JSON or YAML) says, per model, which versions to serve and
which labels name them; it is re-read when it changes::

    default_model: flowers
    models:
      flowers:
        version_policy: {latest: 2}     # latest (= {latest: 1}, the default) | all |
                                        # {specific: [1, 3]}
        labels: {stable: 1, canary: 2}
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Protocol

from common.config import Config
from common.modelfolder import LegacyGraph, ModelFolder

log = logging.getLogger(__name__)

_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
#: A model name or a version label: what a route may carry.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"]+/)*([^\s/'\"]*)")


def without_paths(text: str, known: dict[str, str] | None = None) -> str:
    """``text`` (an error's message) with no absolute server path in it, for answers: a path
    inside a folder of ``known`` (folder -> how to show it, "" for nothing) is shown relative to
    it, any other absolute path by its last part. Logs keep the full message."""
    for path, shown in sorted((known or {}).items(), key=lambda item: -len(item[0])):
        for variant in {os.path.abspath(path), os.path.realpath(path)}:
            variant = variant.rstrip(os.sep)
            if variant:
                text = text.replace(variant + os.sep, shown + "/" if shown else "")
                text = text.replace(variant, shown or ".")
    return _ABSOLUTE.sub(lambda m: m.group(1) or "/", text)


def inside(path: str, root: str) -> bool:
    """Whether ``path``, symlinks resolved, stays inside the folder ``root`` (itself resolved:
    the operator may give a symlink as the repository)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def routable(name: str) -> bool:
    """Whether ``name`` can be a model's name in URLs (and a repository folder's)."""
    return bool(NAME.match(name))


@dataclass(frozen=True)
class VersionFolder:
    """One version on disk and the fingerprint of its files."""

    name: str
    version: int
    path: str
    fingerprint: tuple


def fingerprint(path: str) -> tuple[tuple, float]:
    """(sorted (relative path, size, mtime_ns) of every file under ``path`` (or of the file
    ``path``), newest mtime)."""
    if os.path.isfile(path):
        st = os.stat(path)
        return ((os.path.basename(path), st.st_size, st.st_mtime_ns),), st.st_mtime
    entries, newest = [], 0.0
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime)
    return tuple(sorted(entries)), newest


def next_version(model_dir: str) -> int:
    """One more than the highest numbered version folder in ``model_dir`` (1 when none)."""
    try:
        numbers = [int(v) for v in os.listdir(model_dir) if _VERSION.match(v)]
    except FileNotFoundError:
        numbers = []
    return max(numbers, default=0) + 1


def version_staging(model_dir: str, version: int) -> str:
    """Where a new version is built before it is published
    (:func:`common.modelfolder.publish`): a hidden folder beside the versions, never read by
    a scan."""
    return os.path.join(model_dir, f".incoming-{version}-{os.getpid()}")


class Source(Protocol):
    """Where versions come from: :meth:`scan` offers each model's settled versions, and
    :meth:`open` gives the model folder of one of them. ``essential``: the source's one model
    is all the worker has to serve, so a failure to load it at start-up stops the worker.
    ``shown_roots``: the server folders a load error may name -> how answers show them."""

    essential: bool
    shown_roots: dict[str, str]

    def scan(self, confirm_after: float = 0.0) -> dict[str, dict[int, VersionFolder]]: ...

    def open(self, folder: VersionFolder) -> ModelFolder: ...


def source_for(config: Config) -> Source:
    """The source the config names: ``MODEL_REPOSITORY``'s models, else the one model folder
    ``MODEL_PATH`` (with the labels and legacy-graph settings)."""
    if config.model_repository:
        return RepositorySource(config.model_repository, legacy=config.legacy_graph)
    path = config.model_path
    if os.path.isdir(path) and ModelFolder.in_directory(path).is_frozen_graph:
        path = ModelFolder.in_directory(path).path  # a folder holding a frozen graph (imported)
    return FolderSource(ModelFolder(path, labels_path=config.labels_path,
                                    legacy=config.legacy_graph))


class RepositorySource:
    """Scans ``root`` for models and versions, and tells which versions are settled.

    Args:
        root: the repository folder (``MODEL_REPOSITORY``).
        legacy: the tensor names and scaling of the frozen graphs it holds.
        settle_seconds: a version whose newest file is at least this old is settled.
    """

    essential = False

    def __init__(self, root: str, *, legacy: LegacyGraph | None = None,
                 settle_seconds: float = 2.0):
        self.root = root
        self.legacy = legacy
        self.settle_seconds = settle_seconds
        self.shown_roots = {root: ""}
        self._last: dict[tuple[str, int], tuple] = {}  # fingerprints at the previous scan
        self._skipped: set[str] = set()

    def open(self, folder: VersionFolder) -> ModelFolder:
        return ModelFolder.in_directory(folder.path, legacy=self.legacy)

    def scan(self, confirm_after: float = 0.0) -> dict[str, dict[int, VersionFolder]]:
        """Every model's settled versions now. ``confirm_after`` (the first scan, which has no
        previous one): look again after that many seconds at versions not yet settled."""
        settled: dict[str, dict[int, VersionFolder]] = {}
        seen, unsure = {}, []
        for name, versions in self._find().items():
            for version, path in versions.items():
                prints, newest = fingerprint(path)
                seen[(name, version)] = prints
                stable = self._last.get((name, version)) == prints
                if prints and (stable or time.time() - newest >= self.settle_seconds):
                    settled.setdefault(name, {})[version] = VersionFolder(name, version, path,
                                                                          prints)
                else:
                    unsure.append((name, version, path))
        if unsure and confirm_after > 0:
            time.sleep(confirm_after)
            for name, version, path in unsure:
                prints, _ = fingerprint(path)
                if prints and prints == seen[(name, version)]:
                    settled.setdefault(name, {})[version] = VersionFolder(name, version, path,
                                                                          prints)
        self._last = seen
        return settled

    def _find(self) -> dict[str, dict[int, str]]:
        """name -> version -> folder, settled or not."""
        found: dict[str, dict[int, str]] = {}
        try:
            names = sorted(os.listdir(self.root))
        except OSError as exc:
            log.error("cannot read MODEL_REPOSITORY %s: %s", self.root, exc)
            names = []
        for name in names:
            path = os.path.join(self.root, name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            if not routable(name):
                self._skip(path, "not a valid model name")
                continue
            if not inside(path, self.root):
                self._skip(path, "a symlink to a folder outside the repository")
                continue
            versions = {}
            for v in os.listdir(path):
                version = os.path.join(path, v)
                if not (_VERSION.match(v) and os.path.isdir(version)):
                    continue
                if inside(version, self.root):
                    versions[int(v)] = version
                else:
                    self._skip(version, "a symlink to a folder outside the repository")
            if versions:
                found[name] = versions
            elif ModelFolder.holds_model(path):
                found[name] = {1: path}
            else:
                self._skip(path, "no numbered versions and no model inside")
        return found

    def _skip(self, path: str, why: str) -> None:
        if path not in self._skipped:
            self._skipped.add(path)
            log.warning("skipping %s in the model repository: %s", path, why)


class FolderSource:
    """One model folder (``MODEL_PATH``) served as one version of one model: a repository of
    one entry. Its name and version are model.json's when they can be routed (a model name as
    in a repository, a whole version number), else the folder's name (a frozen graph: the
    folder holding it) and 1. Always settled: it names one folder on purpose. Essential: a
    worker with nothing else to serve stops when it fails to load at start-up."""

    essential = True

    def __init__(self, model: ModelFolder):
        self.model = model
        self.name, self.version = _served_as(model)
        self.shown_roots = {os.path.dirname(os.path.abspath(model.path)): ""}

    def open(self, folder: VersionFolder) -> ModelFolder:
        return self.model

    def scan(self, confirm_after: float = 0.0) -> dict[str, dict[int, VersionFolder]]:
        prints, _ = fingerprint(self.model.path)
        return {self.name: {self.version: VersionFolder(self.name, self.version,
                                                        self.model.path, prints)}}


def _served_as(model: ModelFolder) -> tuple[str, int]:
    """The (name, version) a lone model folder is served, routed and answered as."""
    fallback, version = model.identity({})
    name = fallback
    try:
        name, version = model.identity(model.read_metadata())
    except Exception as exc:  # an unreadable model.json fails the load, with its message
        log.debug("%s is served under its folder's name: %s", model.path, exc)
    if not routable(name):
        name = fallback if routable(fallback) else "model"
    return name, version
