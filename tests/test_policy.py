"""common/versions/policy.py: the aspired versions and the one next action, without threads or
files."""
import pytest

from common.versions.policy import Action, Kind, Serving, aspired_versions, next_action
from common.versions.served import State
from common.versions.settings import VersionPolicy

LATEST, ALL = VersionPolicy(), VersionPolicy("all")
A, B = ("a",), ("b",)  # two fingerprints: the files of a version


def ready(prints=A):
    return Serving(prints, State.READY)


def loading(prints=A):
    return Serving(prints, State.LOADING)


def failed(prints=A):
    return Serving(prints, State.FAILED)


def run(offered, policy, serving):
    """Apply next_action until there is none, as the manager does (a load serves LOADING)."""
    serving, steps = dict(serving), []
    for _ in range(20):
        action = next_action(offered, policy, serving)
        if action is None:
            return steps, serving
        steps.append((action.kind.value, action.version))
        if action.kind is Kind.LOAD:
            serving[action.version] = loading(offered[action.version])
        else:
            del serving[action.version]
    raise AssertionError(f"no end: {steps}")


@pytest.mark.parametrize("policy, aspired", [
    (LATEST, {3}), (VersionPolicy("latest", count=2), {2, 3}), (ALL, {1, 2, 3}),
    (VersionPolicy("specific", versions=(1, 3, 9)), {1, 3})])
def test_aspired_versions_follow_the_named_policy(policy, aspired):
    assert aspired_versions({1: A, 2: A, 3: A}, policy) == aspired


def test_nothing_to_do_when_served_is_aspired():
    assert next_action({1: A}, LATEST, {1: ready()}) is None


def test_a_new_version_is_loaded_before_the_old_one_goes():
    assert next_action({1: A, 2: A}, LATEST, {1: ready()}) == Action(Kind.LOAD, 2, "new")
    # while 2 loads, 1 keeps serving
    assert next_action({1: A, 2: A}, LATEST, {1: ready(), 2: loading()}) is None
    # 2 is ready: 1 goes
    assert next_action({1: A, 2: A}, LATEST, {1: ready(), 2: ready()}) == Action(
        Kind.UNLOAD, 1, "replaced")


def test_a_broken_new_version_keeps_the_old_one_serving():
    assert next_action({2: A, 3: A}, LATEST, {2: ready(), 3: failed()}) is None


def test_a_failed_version_is_tried_again_when_its_files_change():
    assert next_action({3: B}, LATEST, {3: failed(A)}) == Action(
        Kind.LOAD, 3, "its files changed")
    assert next_action({3: B}, LATEST, {3: loading(A)}).kind is Kind.LOAD
    # a ready version whose files changed keeps serving: a new number is the way to publish
    assert next_action({3: B}, LATEST, {3: ready(A)}) is None


def test_while_nothing_aspired_is_ready_only_the_newest_ready_other_serves():
    serving = {1: ready(), 2: ready(), 3: failed()}
    assert next_action({1: A, 2: A, 3: A}, LATEST, serving) == Action(Kind.UNLOAD, 1, "replaced")
    assert next_action({1: A, 2: A, 3: A}, LATEST, {2: ready(), 3: failed()}) is None


def test_a_removed_folder_goes_once_its_replacement_is_ready():
    assert next_action({2: A}, LATEST, {1: ready(), 2: loading()}) is None
    assert next_action({2: A}, LATEST, {1: ready(), 2: ready()}) == Action(
        Kind.UNLOAD, 1, "folder removed")


def test_a_model_no_longer_offered_goes_at_once():
    assert next_action({}, LATEST, {1: ready(), 2: loading()}) == Action(
        Kind.UNLOAD, 1, "folder removed")
    assert run({}, LATEST, {1: ready(), 2: loading()}) == (
        [("unload", 1), ("unload", 2)], {})


def test_a_narrower_policy_unloads_the_others_and_loads_come_first():
    steps, serving = run({1: A, 2: A, 3: A}, VersionPolicy("specific", versions=(1,)),
                         {2: ready(), 3: ready()})
    # while 1 loads, the newest ready other keeps the model available
    assert steps == [("load", 1), ("unload", 2)] and set(serving) == {1, 3}
    serving[1] = ready()
    steps, serving = run({1: A, 2: A, 3: A}, VersionPolicy("specific", versions=(1,)), serving)
    assert steps == [("unload", 3)] and set(serving) == {1}


def test_first_round_loads_every_aspired_version_one_action_at_a_time():
    steps, serving = run({1: A, 2: A, 3: A}, ALL, {})
    assert steps == [("load", 1), ("load", 2), ("load", 3)]
    assert all(s.state is State.LOADING for s in serving.values())
