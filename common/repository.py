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

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

from .modelfolder import ModelFolder

log = logging.getLogger(__name__)

_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LABEL = _NAME


class RepositoryConfigError(ValueError):
    """The settings file cannot be used (its message says why)."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions to serve: ``latest`` (the ``count`` highest), ``all``, or
    ``specific`` (``versions``)."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    def choose(self, available: list[int]) -> set[int]:
        if self.kind == "all":
            return set(available)
        if self.kind == "specific":
            return set(self.versions) & set(available)
        return set(sorted(available)[-self.count:])

    def describe(self) -> dict:
        if self.kind == "latest":
            return {"latest": {"num_versions": self.count}}
        if self.kind == "specific":
            return {"specific": {"versions": list(self.versions)}}
        return {"all": {}}

    @classmethod
    def parse(cls, raw, where: str) -> "VersionPolicy":
        """``"latest"``, ``"all"``, ``{"latest": N}``, ``{"latest": {"num_versions": N}}``,
        ``{"specific": [..]}``, ``{"specific": {"versions": [..]}}``, ``{"all": {}}``."""
        if raw is None:
            return cls()
        if isinstance(raw, str):
            raw = {raw: {}}
        if not isinstance(raw, dict) or len(raw) != 1:
            raise RepositoryConfigError(f"{where}: version_policy must be latest, all or "
                                        "specific")
        (kind, arg), = raw.items()
        if kind == "latest":
            count = arg.get("num_versions", 1) if isinstance(arg, dict) else arg
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise RepositoryConfigError(f"{where}: latest needs a count >= 1")
            return cls("latest", count=count)
        if kind == "all":
            return cls("all")
        if kind == "specific":
            versions = arg.get("versions") if isinstance(arg, dict) else arg
            if (not isinstance(versions, list) or not versions
                    or not all(isinstance(v, int) and v >= 1 for v in versions)):
                raise RepositoryConfigError(f"{where}: specific needs a list of versions >= 1")
            return cls("specific", versions=tuple(sorted(set(versions))))
        raise RepositoryConfigError(f"{where}: unknown version_policy {kind!r}")


@dataclass(frozen=True)
class ModelSettings:
    policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RepositorySettings:
    """The parsed settings file (defaults when there is none)."""

    default_model: str | None = None
    models: dict[str, ModelSettings] = field(default_factory=dict)

    def model(self, name: str) -> ModelSettings:
        return self.models.get(name, ModelSettings())


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
    return bool(_NAME.match(name))


def parse_settings(text: str, path: str) -> RepositorySettings:
    """The settings file's text (JSON, or YAML when the name ends in .yaml/.yml)."""
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text or "{}")
    except Exception as exc:  # noqa: BLE001 - any parse error is the file's fault
        raise RepositoryConfigError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(raw, dict):
        raise RepositoryConfigError(f"{path}: expected a mapping at the top")
    unknown = set(raw) - {"default_model", "models"}
    if unknown:
        raise RepositoryConfigError(f"{path}: unknown keys {sorted(unknown)}")
    models = {}
    for name, entry in (raw.get("models") or {}).items():
        where = f"{path}: models.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise RepositoryConfigError(f"{where}: not a valid model name")
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"version_policy", "labels"}:
            raise RepositoryConfigError(f"{where}: expected version_policy and/or labels")
        labels = entry.get("labels") or {}
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and _LABEL.match(k) and isinstance(v, int)
                and not isinstance(v, bool) and v >= 1 for k, v in labels.items()):
            raise RepositoryConfigError(f"{where}: labels map names to versions >= 1")
        models[name] = ModelSettings(VersionPolicy.parse(entry.get("version_policy"), where),
                                     dict(labels))
    default = raw.get("default_model")
    if default is not None and not isinstance(default, str):
        raise RepositoryConfigError(f"{path}: default_model must be a name")
    return RepositorySettings(default, models)


class SettingsFile:
    """The settings file, re-read when its modification time or size changes. A file that
    cannot be used keeps the previous settings and reports its error."""

    def __init__(self, path: str | None):
        self.path = path
        self.settings = RepositorySettings()
        self.error: str | None = None
        self._seen: tuple | None = None

    def refresh(self) -> bool:
        """Re-read if changed; True when the settings changed."""
        if not self.path:
            return False
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            stamp = ("missing", str(exc))
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            with open(self.path, encoding="utf-8") as fh:
                settings = parse_settings(fh.read(), self.path)
        except (OSError, RepositoryConfigError) as exc:
            log.error("model settings not applied: %s", exc)
            shown = os.path.basename(self.path)
            self.error = (f"{shown}: {exc.strerror}" if isinstance(exc, OSError) and
                          exc.strerror else without_paths(str(exc), {self.path: shown}))
            return False
        self.error = None
        changed = settings != self.settings
        self.settings = settings
        if changed:
            log.info("model settings read from %s", self.path)
        return changed


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
    """Where a new version is built before it is published: a hidden folder beside the
    versions, never read by a scan."""
    return os.path.join(model_dir, f".incoming-{version}-{os.getpid()}")


def publish_version(staging: str, model_dir: str, version: int) -> str:
    """Move the finished folder ``staging`` to ``model_dir/<version>`` in one rename, so a
    running server sees the whole version or nothing. Never replaces a folder that may be live:
    FileExistsError when the version exists."""
    target = os.path.join(model_dir, str(version))
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists; a published version is never overwritten")
    os.rename(staging, target)
    return target


class Repository:
    """Scans ``root`` for models and versions, and tells which versions are settled.

    With ``single`` (``MODEL_PATH``, the one-model shortcut) the repository is that one folder,
    served as the one version of ``single_identity`` (name, version).
    """

    def __init__(self, root: str | None, *, single: str | None = None,
                 single_identity: tuple[str, int] = ("default", 1),
                 settle_seconds: float = 2.0):
        self.root = root
        self.single = single
        self.single_identity = single_identity
        self.settle_seconds = settle_seconds
        self._last: dict[tuple[str, int], tuple] = {}  # fingerprints at the previous scan
        self._skipped: set[str] = set()

    def scan(self, confirm_after: float = 0.0) -> dict[str, dict[int, VersionFolder]]:
        """Every model's settled versions now. ``confirm_after`` (the first scan, which has no
        previous one): look again after that many seconds at versions not yet settled. The
        one-model shortcut (``single``) is always settled: it names one folder on purpose."""
        found: dict[str, dict[int, str]] = {}
        if self.single:
            name, version = self.single_identity
            found[name] = {version: self.single}
        elif self.root:
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
        settled: dict[str, dict[int, VersionFolder]] = {}
        seen, unsure = {}, []
        for name, versions in found.items():
            for version, path in versions.items():
                prints, newest = fingerprint(path)
                seen[(name, version)] = prints
                stable = self._last.get((name, version)) == prints
                if self.single or (prints and (
                        stable or time.time() - newest >= self.settle_seconds)):
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

    def _skip(self, path: str, why: str) -> None:
        if path not in self._skipped:
            self._skipped.add(path)
            log.warning("skipping %s in the model repository: %s", path, why)
