"""The repository's settings file (``MODEL_CONFIG``, JSON or YAML): per model, which versions
to serve (the version policy) and which labels name them; re-read when it changes. No web
framework here::

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
from dataclasses import dataclass, field

from common.versions.source import NAME, without_paths

log = logging.getLogger(__name__)


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
        if not isinstance(name, str) or not NAME.match(name):
            raise RepositoryConfigError(f"{where}: not a valid model name")
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - {"version_policy", "labels"}:
            raise RepositoryConfigError(f"{where}: expected version_policy and/or labels")
        labels = entry.get("labels") or {}
        if not isinstance(labels, dict) or not all(
                isinstance(k, str) and NAME.match(k) and isinstance(v, int)
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

