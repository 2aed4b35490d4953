"""The version policy's decisions, apart from scanning and from loading: given what the source
offers for one model, the model's :class:`~common.versions.settings.VersionPolicy` and what the
manager serves (each version's files and state), the *aspired* versions and the one next
action that moves towards them. Pure: no threads, no files, no clocks.

The order is TF Serving's availability-preserving one:

* every aspired version is loaded first (one that is offered and not served, or served from
  other files while it is not ready: failed or still loading);
* a served version that is not aspired (the policy no longer wants it, or its folder is gone)
  is unloaded only once every aspired version has settled (loaded or failed) and one of them
  is ready, so a model that has a ready version never goes without one. Until then the newest
  ready one of them keeps serving and the others go. A model the source no longer offers at
  all goes at once;
* a model unloaded by request is offered nothing (:func:`offered_models`), so it goes at once
  too and stays unloaded until a load request.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Collection, Mapping

from common.versions.served import State
from common.versions.settings import VersionPolicy


class Kind(str, enum.Enum):
    LOAD = "load"
    UNLOAD = "unload"


@dataclass(frozen=True)
class Action:
    """One step for one model: load ``version`` (a served entry with that number, failed or
    loading, is replaced), or unload it; ``reason`` is for the log."""

    kind: Kind
    version: int
    reason: str


@dataclass(frozen=True)
class Serving:
    """What the manager holds of one version: the fingerprint of the files it was loaded from
    and its state now."""

    fingerprint: tuple | None
    state: State


def offered_models(found: Mapping[str, Mapping[int, object]],
                   unloaded: Collection[str]) -> dict[str, Mapping[int, object]]:
    """What the source offers the manager: its scan (name -> version -> folder) less the
    models unloaded by request (Triton's repository extension), which are then offered
    nothing, so that :func:`next_action` unloads every version of them at once and loads
    none until they are loaded again."""
    return {name: versions for name, versions in found.items() if name not in unloaded}


def aspired_versions(offered: Mapping[int, tuple], policy: VersionPolicy) -> set[int]:
    """The versions of ``offered`` (version -> fingerprint) that ``policy`` wants served."""
    return policy.choose(list(offered))


def next_action(offered: Mapping[int, tuple], policy: VersionPolicy,
                serving: Mapping[int, Serving]) -> Action | None:
    """The one next step for a model, or None when what is served is what the policy wants.

    Args:
        offered: the source's settled versions of the model, version -> fingerprint.
        policy: the model's version policy (the settings file's, or the default).
        serving: what the manager serves of the model, version -> :class:`Serving`.
    """
    aspired = aspired_versions(offered, policy)
    for version in sorted(aspired):
        current = serving.get(version)
        if current is None:
            return Action(Kind.LOAD, version, "new")
        if current.fingerprint != offered[version] and current.state is not State.READY:
            return Action(Kind.LOAD, version, "its files changed")
    states = [serving[v].state for v in aspired if v in serving]
    settled = all(state is not State.LOADING for state in states)
    available = settled and any(state is State.READY for state in states)
    fallback = None if available else max(
        (v for v, s in serving.items() if v not in aspired and s.state is State.READY),
        default=None)
    for version in sorted(serving):
        if version in aspired:
            continue
        if available or not offered or (fallback is not None and version != fallback):
            return Action(Kind.UNLOAD, version,
                          "replaced" if version in offered else "folder removed")
    return None
