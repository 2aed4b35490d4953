"""The model repository: layout, settings file, version policy, and hot reload in the engine
(in-process, common/manager.py) and on the real server under load."""
import contextlib
import json
import os
import shutil
import threading
import time

import imagegen as ig
import pytest
import requests
from helpers import post_image, start_server
from reliability import record
from tiny_models import save_colour_model

from common import modelfolder
from common.config import Config
from common.errors import ModelNotFound
from common.inference.images import DecodeLimits
from common.inference.loader import load_classifier
from common.versions.manager import Manager, Route
from common.versions.settings import RepositoryConfigError, VersionPolicy, parse_settings
from common.versions.source import RepositorySource


@pytest.fixture(scope="module")
def colour_versions(tmp_path_factory):
    """Three built model folders: v1 labels red/green/blue, v2 the same with a "2" suffix, and a
    corrupt one (its saved_model.pb is not a SavedModel)."""
    root = tmp_path_factory.mktemp("builds")
    v1 = save_colour_model(str(root / "v1"))
    v2 = save_colour_model(str(root / "v2"), labels=["red2", "green2", "blue2"])
    bad = str(root / "bad")
    shutil.copytree(v1, bad)
    with open(os.path.join(bad, "saved_model.pb"), "wb") as fh:
        fh.write(b"not a saved model")
    return {"v1": v1, "v2": v2, "bad": bad}


def publish(repo, name: str, version: int, source: str) -> str:
    """Copy ``source`` beside the model, then rename it into ``<name>/<version>`` in one step."""
    os.makedirs(os.path.join(repo, name), exist_ok=True)
    staging = os.path.join(repo, f".incoming-{name}-{version}")
    shutil.copytree(source, staging)
    return modelfolder.publish(staging, os.path.join(repo, name, str(version)))


def test_the_publish_rule_never_writes_into_a_published_folder(tmp_path):
    """A repository version is never overwritten; a plain output folder is replaced whole."""
    def built(text):
        staging = tmp_path / f".incoming-{text}"
        staging.mkdir()
        (staging / "labels.txt").write_text(text)
        return str(staging)

    target = str(tmp_path / "m" / "1")
    os.makedirs(os.path.dirname(target))
    assert modelfolder.publish(built("one"), target) == target
    with pytest.raises(FileExistsError, match="never overwritten"):
        modelfolder.publish(built("two"), target)
    assert open(os.path.join(target, "labels.txt")).read() == "one"
    modelfolder.publish(str(tmp_path / ".incoming-two"), target, replace=True)
    assert open(os.path.join(target, "labels.txt")).read() == "two"
    assert sorted(os.listdir(tmp_path / "m")) == ["1"]  # nothing moved aside is left
    assert not os.path.exists(tmp_path / ".incoming-two")


# -- layout and settings ---------------------------------------------------------------------
def test_scan_finds_versions_and_skips_what_is_not_a_model(tmp_path, colour_versions, caplog):
    repo = tmp_path / "repo"
    publish(repo, "flowers", 1, colour_versions["v1"])
    publish(repo, "flowers", 3, colour_versions["v2"])
    shutil.copytree(colour_versions["v1"], repo / "demo")  # a model folder: version 1 of demo
    (repo / "features").mkdir()  # not a model
    (repo / "features" / "module.json").write_text("{}")
    (repo / ".incoming-x").mkdir()  # hidden: never read
    (repo / "flowers" / "notes").mkdir()  # not a number: not a version
    found = RepositorySource(str(repo), settle_seconds=0).scan()
    assert {n: sorted(v) for n, v in found.items()} == {"flowers": [1, 3], "demo": [1]}
    assert found["demo"][1].path == str(repo / "demo")
    assert sum("features" in r.message and "skipping" in r.message for r in caplog.records) == 1
    RepositorySource(str(repo), settle_seconds=0).scan()


def test_a_version_still_being_written_is_not_settled(tmp_path, colour_versions):
    repo = tmp_path / "repo"
    folder = publish(repo, "m", 1, colour_versions["v1"])
    scanner = RepositorySource(str(repo), settle_seconds=3600)  # only "unchanged across two scans"
    assert scanner.scan() == {}  # first sight: not settled yet
    with open(os.path.join(folder, "labels.txt"), "a") as fh:
        fh.write("")  # untouched content, but...
    os.utime(os.path.join(folder, "labels.txt"))  # ...a newer time: still being written
    assert scanner.scan() == {}
    assert sorted(scanner.scan()["m"]) == [1]  # unchanged across two scans: settled


@pytest.mark.parametrize("raw,versions", [
    (None, [3]), ("latest", [3]), ({"latest": 2}, [2, 3]),
    ({"latest": {"num_versions": 2}}, [2, 3]), ("all", [1, 2, 3]),
    ({"specific": [1, 3]}, [1, 3]), ({"specific": {"versions": [2]}}, [2]),
])
def test_version_policies(raw, versions):
    assert sorted(VersionPolicy.parse(raw, "t").choose([1, 2, 3])) == versions


@pytest.mark.parametrize("text", [
    '{"models": {"m": {"version_policy": {"newest": 1}}}}',
    '{"models": {"m": {"labels": {"stable": "one"}}}}',
    '{"models": {"../m": {}}}', '{"model": {}}', '[1, 2]', '{"models": {"m": {"x": 1}}}',
    '{"models": {"m": {"version_policy": {"latest": 0}}}}',
])
def test_bad_settings_are_refused_with_a_reason(text):
    with pytest.raises(RepositoryConfigError):
        parse_settings(text, "models.json")


def test_yaml_settings(tmp_path):
    settings = parse_settings("default_model: flowers\nmodels:\n  flowers:\n"
                              "    version_policy: {latest: 2}\n"
                              "    labels: {stable: 1, canary: 2}\n", "m.yaml")
    assert settings.default_model == "flowers"
    assert settings.model("flowers").labels == {"stable": 1, "canary": 2}
    assert settings.model("flowers").policy == VersionPolicy("latest", count=2)


# -- the manager in-process ------------------------------------------------------------------
def _registry(repo, settings_path=None, **overrides):
    config = Config.from_mapping({"model_repository": str(repo), "model_config": settings_path,
                                  "model_poll_seconds": 0, "temp_dir": str(repo / ".t"),
                                  **overrides})
    manager = Manager(config, load_classifier)
    manager.source.settle_seconds = 0
    return manager.start()


def _wait(manager, name, version, state="ready", timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manager.poll()
        for model in manager.status():
            for v in model["versions"]:
                if model["name"] == name and v["version"] == version and v["state"] == state:
                    return v
        time.sleep(0.05)
    raise AssertionError(manager.status())


def _wait_gone(manager, name, version, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manager.poll()
        if version not in _versions(manager, name):
            return
        time.sleep(0.05)
    raise AssertionError(manager.status())


def _versions(manager, name):
    return {v["version"]: v["state"] for m in manager.status() if m["name"] == name
            for v in m["versions"]}


def _red(clf):
    return clf.preprocess(ig.png(ig.RED), DecodeLimits(10**6))[0]


def _classify(manager, route=Route()):
    with manager.lease(route) as lease:
        clf = lease.classifier
        scores = lease.ticket.submit([_red(clf)])[0]
        return clf.describe(), clf.labels[int(scores.argmax())]


def test_new_version_replaces_the_old_only_once_ready(tmp_path, colour_versions):
    repo = tmp_path / "repo"
    publish(repo, "colours", 1, colour_versions["v1"])
    manager = _registry(repo)
    try:
        assert manager.wait_initial(60)
        assert _classify(manager) == ({"name": "colours", "version": "1"}, "red")
        publish(repo, "colours", 2, colour_versions["v2"])
        _wait(manager, "colours", 2)
        _wait_gone(manager, "colours", 1)  # replaced, then unloaded
        assert _versions(manager, "colours") == {2: "ready"}
        assert _classify(manager) == ({"name": "colours", "version": "2"}, "red2")
        # a corrupt version 3 is reported with its error; version 2 keeps serving
        publish(repo, "colours", 3, colour_versions["bad"])
        failed = _wait(manager, "colours", 3, "failed")
        assert failed["error"]
        manager.poll()
        assert _versions(manager, "colours") == {3: "failed", 2: "ready"}
        assert _classify(manager)[1] == "red2"
        # a fixed version 3 (its files change) is tried again
        shutil.rmtree(repo / "colours" / "3")
        publish(repo, "colours", 3, colour_versions["v1"])
        _wait(manager, "colours", 3)
        assert _classify(manager) == ({"name": "colours", "version": "3"}, "red")
    finally:
        manager.close()


def _nice(native_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, native_id)


def test_a_roll_out_loads_at_load_nice_and_serves_at_normal_priority(tmp_path, colour_versions):
    """LOAD_NICE: a version found after start-up loads and warms up in a thread of its own at
    that nice, without waiting for ``load_turn`` (one worker after another would multiply a
    slow lowered load by the workers); the batcher thread that then serves it keeps the
    process's priority. Versions found at start-up, and loads that would start runtime
    threads (``may_lower`` False), load at the process's priority, the latter in their turn."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    lowered = max(base, 7)
    seen, turns = {}, []

    def load(folder):
        seen[os.path.basename(folder.path)] = _nice(threading.get_native_id())
        return load_classifier(folder)

    @contextlib.contextmanager
    def turn():
        turns.append(_nice(threading.get_native_id()))
        yield

    repo = tmp_path / "repo"
    publish(repo, "colours", 1, colour_versions["v1"])
    config = Config.from_mapping({"model_repository": str(repo), "model_poll_seconds": 0,
                                  "temp_dir": str(repo / ".t"), "load_nice": 7})
    manager = Manager(config, load, may_lower=lambda folder: not folder.path.endswith("3"))
    manager.source.settle_seconds = 0
    manager.load_turn = turn
    manager.start()
    try:
        assert manager.wait_initial(60)
        publish(repo, "colours", 2, colour_versions["v2"])
        _wait(manager, "colours", 2)
        assert _classify(manager) == ({"name": "colours", "version": "2"}, "red2")
        assert seen == {"1": base, "2": lowered} and turns == []
        batcher = manager.find(Route("colours", 2)).running().batcher
        assert _nice(batcher._thread.native_id) == base
        publish(repo, "colours", 3, colour_versions["v1"])
        _wait(manager, "colours", 3)
        assert _classify(manager) == ({"name": "colours", "version": "3"}, "red")
        assert seen == {"1": base, "2": lowered, "3": base} and turns == [base]
        assert _nice(threading.get_native_id()) == base  # nothing lowered the caller
    finally:
        manager.close()


def test_labels_policy_and_unknown_names(tmp_path, colour_versions):
    repo = tmp_path / "repo"
    publish(repo, "colours", 1, colour_versions["v1"])
    publish(repo, "colours", 2, colour_versions["v2"])
    settings = tmp_path / "models.json"
    settings.write_text(json.dumps({"models": {"colours": {
        "version_policy": "all", "labels": {"stable": 1, "canary": 2}}}}))
    manager = _registry(repo, str(settings))
    try:
        assert manager.wait_initial(60)
        assert _classify(manager, Route("colours", label="stable"))[1] == "red"
        assert _classify(manager, Route("colours", label="canary"))[1] == "red2"
        assert _classify(manager, Route("colours", version=1))[1] == "red"
        assert _classify(manager)[0]["version"] == "2"  # no version asked: the newest
        for route in (Route("nope"), Route("colours", version=9), Route("colours", label="x")):
            with pytest.raises(ModelNotFound):
                manager.lease(route)
        # the settings file changes: only version 1 now
        settings.write_text(json.dumps({"models": {"colours": {
            "version_policy": {"specific": [1]}}}}))
        _wait_gone(manager, "colours", 2)
        assert _versions(manager, "colours") == {1: "ready"}
        # a broken settings file keeps the previous settings and says why
        settings.write_text("{not json")
        manager.poll()
        assert "cannot parse" in manager.settings_error()
        assert _versions(manager, "colours") == {1: "ready"}
    finally:
        manager.close()


@pytest.mark.parametrize("meta, served_as", [
    ({"name": "flowers", "version": "3"}, ("flowers", 3)),  # model.json's, when routable
    ({"name": "my flowers!", "version": "2024-05"}, ("mymodel", 1)),  # else the folder's, and 1
    (None, ("mymodel", 1)),  # no model.json
])
def test_model_path_is_routed_and_answered_as_one_name_and_version(tmp_path, colour_versions,
                                                                   meta, served_as):
    """MODEL_PATH (one model, no repository): the name and version in the answers are the ones
    that /models lists and that the /models/{name}/versions/{v} routes take."""
    folder = tmp_path / "mymodel"
    shutil.copytree(colour_versions["v1"], folder)
    meta_path = folder / "model.json"
    if meta is None:
        meta_path.unlink()
    else:
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **meta}))
    config = Config.from_mapping({"model_path": str(folder), "model_poll_seconds": 0,
                                  "temp_dir": str(tmp_path / "t")})
    manager = Manager(config, load_classifier).start()
    try:
        assert manager.wait_initial(60)
        name, version = served_as
        assert [(m["name"], [v["version"] for v in m["versions"]]) for m in manager.status()] \
            == [(name, [version])]
        answer = {"name": name, "version": str(version)}
        assert _classify(manager) == (answer, "red")
        assert _classify(manager, Route(name=name, version=version)) == (answer, "red")
    finally:
        manager.close()


def test_a_request_keeps_its_version_while_it_is_unloaded(tmp_path, colour_versions):
    """Admitted on version 1, answered by version 1 even though version 2 replaced it meanwhile:
    the unload waits for the request."""
    repo = tmp_path / "repo"
    publish(repo, "colours", 1, colour_versions["v1"])
    manager = _registry(repo)
    try:
        assert manager.wait_initial(60)
        lease = manager.lease(Route())
        publish(repo, "colours", 2, colour_versions["v2"])
        _wait(manager, "colours", 2)
        manager.poll()
        assert 1 not in _versions(manager, "colours")  # gone from the table...
        with lease:  # ...but still serves the request that holds it
            clf = lease.classifier
            scores = lease.ticket.submit([_red(clf)])[0]
            assert clf.version == 1 and clf.labels[int(scores.argmax())] == "red"
    finally:
        manager.close()


# -- the real server ----------------------------------------------------------------------------
def _status(server) -> dict:
    models = requests.get(server.url + "/models", timeout=10).json()["models"]
    return {m["name"]: {v["version"]: (v["state"], v["error"]) for v in m["versions"]}
            for m in models}


def _until(predicate, timeout=60.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s")


@pytest.mark.server
def test_hot_reload_under_load(tmp_path, colour_versions):
    """Closed-loop clients for 20 s while version 2 is published and version 1 removed, a
    half-copied version 3 sits there, then a corrupt version 3 is published: every answer is a
    200, answers switch from version 1 to 2, no answer mixes versions, the corrupt version shows
    its error while version 2 keeps serving, and the half-copied one is never loaded.

    Loads run at normal priority here (``LOAD_NICE=0``), in turn, so that the switch is bounded
    by a few polls and a load (8 s below). At the default nice a load under this load takes
    only the CPU the four clients leave, which has taken longer than 8 s on the CI machine
    (docs/BENCHMARKS.md: 19-40 s for an Inception-sized model under 16 clients);
    test_a_roll_out_loads_at_load_nice_and_serves_at_normal_priority covers the lowered load."""
    repo = tmp_path / "repo"
    publish(repo, "colours", 1, colour_versions["v1"])
    server = start_server(tmp_path, {"MODEL_REPOSITORY": str(repo), "MODEL_POLL_SECONDS": "0.3",
                                     "WORKERS": "2", "THREADS": "8", "LOAD_NICE": "0"})
    answers, stop = [], threading.Event()
    body = ig.png(ig.RED)

    def client():
        session = requests.Session()
        while not stop.is_set():
            r = session.post(server.url + "/classify", files={"image": ("r.png", body)},
                             timeout=30)
            answers.append((time.monotonic(), r.status_code,
                            r.json() if r.status_code == 200 else r.text))

    try:
        assert _status(server) == {"colours": {1: ("ready", None)}}
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(4)
        # a version 3 copied in place, file by file and slowly: never loaded while incomplete
        half = repo / "colours" / "3"
        half.mkdir()
        shutil.copy(os.path.join(colour_versions["v1"], "labels.txt"), half)
        publish(repo, "colours", 2, colour_versions["v2"])
        switched = time.monotonic()
        _until(lambda: _status(server)["colours"].get(2, ("",))[0] == "ready")
        shutil.rmtree(repo / "colours" / "1")
        _until(lambda: 1 not in _status(server)["colours"])
        time.sleep(4)
        assert 3 not in _status(server)["colours"] or _status(server)["colours"][3][0] != "ready"
        shutil.rmtree(half)
        publish(repo, "colours", 3, colour_versions["bad"])
        def version_3():  # one read: two could be answered by two workers, one still loading
            state = _status(server)["colours"].get(3, ("",))
            return state[0] == "failed" and state
        failed = _until(version_3)
        assert failed[1]  # its error
        time.sleep(4)
        status = _status(server)["colours"]
        assert status[2] == ("ready", None) and status[3][0] == "failed"
        time.sleep(max(0.0, 20 - (time.monotonic() - switched) - 4))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop()
    assert answers and all(status == 200 for _, status, _ in answers), \
        [a for a in answers if a[1] != 200][:3]
    seen = [(a[2]["model"]["version"], a[2]["predictions"][0]["label"]) for a in answers]
    assert set(seen) == {("1", "red"), ("2", "red2")}  # each answer from one version
    # switched: every worker serves version 2 within a few polls and a load of publishing it
    late = [a[2]["model"]["version"] for a in answers if a[0] > switched + 8]
    assert seen[0][0] == "1" and late and set(late) == {"2"}


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


@pytest.mark.server
def test_twenty_load_unload_cycles_keep_memory_flat(tmp_path, colour_versions):
    """A worker that loads a new version and unloads the old one 20 times: its RSS after the
    last cycle is within 10% of its RSS after the first."""
    repo = tmp_path / "repo"
    publish(repo, "colours", 1, colour_versions["v1"])
    server = start_server(tmp_path, {"MODEL_REPOSITORY": str(repo), "MODEL_POLL_SECONDS": "0.2",
                                     "WORKERS": "1"})
    rss = []
    try:
        (pid,) = server.worker_pids()
        for version in range(2, 22):
            publish(repo, "colours", version, colour_versions["v2" if version % 2 else "v1"])
            _until(lambda: _status(server)["colours"] == {version: ("ready", None)})
            shutil.rmtree(repo / "colours" / str(version - 1))
            answer = post_image(server, ig.png(ig.RED)).json()
            assert answer["model"]["version"] == str(version)
            time.sleep(0.3)  # the unloader thread has let the old version go
            rss.append(_rss_kb(pid))
    finally:
        server.stop()
    record("reload_cycles", {"cycles": len(rss), "rss_mb_after_first": round(rss[0] / 1024, 1),
                             "rss_mb_after_last": round(rss[-1] / 1024, 1),
                             "growth_pct": round((rss[-1] / rss[0] - 1) * 100, 2),
                             "rss_mb_each": [round(r / 1024, 1) for r in rss]})
    assert rss[-1] <= rss[0] * 1.10, rss
