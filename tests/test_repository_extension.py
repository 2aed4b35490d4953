"""Triton's model repository extension, ``/v2/repository`` (common/web/protocols/repository.py,
``Manager.request_load``/``request_unload``, ``ModelRequests``): against the real gunicorn
server with two workers and two tiny models, through tritonclient. A load or unload request
reaches one worker and must hold in both: the checks ask until each worker has answered
(told apart by the ``worker`` of the access log), and the poller must not undo an unload."""
import json
import os
import shutil
import time
import uuid

import imagegen as ig
import numpy as np
import pytest
import requests
from helpers import assert_envelope, start_server
from tiny_models import save_colour_model

from app import create_app
from common.dataplane import DataPlane
from common.versions.manager import ModelRequests, Requested

#: Keys shaped like real ones: one that may classify only, one with the admin scope too.
CI_KEY = "ci-Rw3Lp8Xk2Jm5Nq7Vb9Hc4Td6Fs1Gz0Ya-repo"
OPS_KEY = "ops-Qe5Ty7Ui9Op2As4Df6Gh8Jk1Lz3Xc-repo"

SHADES = ["dark", "mid", "light"]


def admin() -> dict:
    """Headers with the admin key: a new dict each time (tritonclient adds its own headers to
    the dict it is given)."""
    return {"Authorization": f"Bearer {OPS_KEY}"}


def classify_only() -> dict:
    return {"Authorization": f"Bearer {CI_KEY}"}
TOLERANCE = 1e-5


# -- the real server: two workers, two models ----------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("repository-extension")
    repo = work / "repo"
    save_colour_model(str(repo / "colours" / "1"))
    save_colour_model(str(repo / "shades" / "1"), labels=SHADES, name="shades")
    live = start_server(work, {
        "MODEL_REPOSITORY": str(repo), "DEFAULT_MODEL": "colours", "MODEL_POLL_SECONDS": "0.5",
        "WORKERS": "2", "THREADS": "8", "AUDIT_LOG": str(work / "audit.jsonl"),
        "API_KEYS": f"ci:{CI_KEY}:classify,ops:{OPS_KEY}:classify+admin"})
    live.audit_path = str(work / "audit.jsonl")
    yield live
    live.stop()


@pytest.fixture
def triton(server):
    from tritonclient.http import InferenceServerClient

    client = InferenceServerClient(server.url.removeprefix("http://"))
    for name in ("colours", "shades"):  # whatever an earlier test left: both served
        client.load_model(name, headers=admin())
    yield client
    client.close()


def each_worker(server, method: str, path: str, **kwargs) -> dict[int, list]:
    """Send the request on new connections until each of the server's workers has answered it
    at least twice (the access log's ``worker`` says which answered); returns worker pid ->
    its responses."""
    workers = set(server.worker_pids())
    assert len(workers) == 2, workers
    answers: dict[int, list] = {}
    for _ in range(10):
        sent = {}
        for _ in range(20):
            rid = f"each-{uuid.uuid4().hex}"
            r = requests.request(method, server.url + path, timeout=30,
                                 headers={**admin(), "X-Request-ID": rid, "Connection": "close"},
                                 **kwargs)
            sent[rid] = r
        for line in server.output(tail=None).splitlines():
            if '"request_id"' in line:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("request_id") in sent:
                    answers.setdefault(record["worker"], []).append(sent[record["request_id"]])
        if set(answers) == workers and all(len(v) >= 2 for v in answers.values()):
            return answers
    raise AssertionError(f"not every worker answered: {sorted(answers)} of {sorted(workers)}")


def assert_message(response, status: int) -> str:
    """Triton's error: ``{"error": "<message>"}`` with this status."""
    body = response.json() if callable(response.json) else response.get_json()
    assert response.status_code == status, body
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in json.dumps(body)
    return body["error"]


def image_input(data: bytes):
    from tritonclient.http import InferInput

    given = InferInput("image_bytes", [1], "BYTES")
    given.set_data_from_numpy(np.array([data], dtype=np.object_))
    return given


def read_audit(server) -> list[dict]:
    with open(server.audit_path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def index_of(triton) -> dict[str, tuple[str, str, str]]:
    return {e["name"]: (e["version"], e["state"], e["reason"])
            for e in triton.get_model_repository_index(headers=admin())}


# -- index ---------------------------------------------------------------------------------------
@pytest.mark.server
def test_index_lists_every_model_and_ready_filters(server, triton):
    entries = triton.get_model_repository_index(headers=admin())
    assert entries == [{"name": "colours", "version": "1", "state": "READY", "reason": ""},
                       {"name": "shades", "version": "1", "state": "READY", "reason": ""}]
    triton.unload_model("shades", headers=admin())
    try:
        assert index_of(triton)["shades"] == ("1", "UNAVAILABLE",
                                              "unloaded by a repository request")
        r = requests.post(server.url + "/v2/repository/index", json={"ready": True},
                          headers=admin(), timeout=30)
        assert r.status_code == 200 and [e["name"] for e in r.json()] == ["colours"], r.text
    finally:
        triton.load_model("shades", headers=admin())


# -- unload and load, in every worker ------------------------------------------------------------
@pytest.mark.server
def test_unload_holds_in_every_worker_and_the_poller_does_not_undo_it(server, triton):
    from tritonclient.utils import InferenceServerException

    before = len(read_audit(server))
    triton.unload_model("shades", headers=admin(), unload_dependents=True)
    try:
        assert not triton.is_model_ready("shades", headers=admin())
        for worker, answers in each_worker(server, "GET", "/v2/models/shades/ready").items():
            for r in answers:
                assert "unloaded" in assert_message(r, 404), worker
        with pytest.raises(InferenceServerException) as caught:
            triton.infer("shades", [image_input(ig.jpeg(ig.RED))], headers=admin())
        assert caught.value.status() == "404" and "unloaded" in caught.value.message()
        r = requests.post(server.url + "/models/shades/classify", headers=admin(), timeout=30,
                          files={"image": ("r.jpg", ig.jpeg(ig.RED), "image/jpeg")})
        assert "unloaded" in assert_envelope(r, 404, "model_not_found")["message"]
        assert triton.is_model_ready("colours", headers=admin())  # the other model serves on
        time.sleep(2.0)  # four polls of MODEL_POLL_SECONDS=0.5: the repository still holds it
        for answers in each_worker(server, "GET", "/v2/models/shades/ready").values():
            assert all(r.status_code == 404 for r in answers)
        requested = [r for r in read_audit(server)[before:]
                     if r["event"] == "model_unload_requested"]
        assert [(r["key"], r["details"]) for r in requested] == [
            ("ops", {"model": "shades", "outcome": "ok"})]
    finally:
        triton.load_model("shades", headers=admin())


@pytest.mark.server
def test_load_serves_it_again_in_every_worker_and_infer_agrees_with_classify(server, triton):
    from tritonclient.http import InferRequestedOutput

    triton.unload_model("shades", headers=admin())
    triton.load_model("shades", headers=admin())
    assert triton.is_model_ready("shades", headers=admin())
    for answers in each_worker(server, "GET", "/v2/models/shades/ready").values():
        assert all(r.status_code == 200 and r.json()["ready"] for r in answers)
    assert index_of(triton)["shades"] == ("1", "READY", "")
    data = ig.jpeg((90, 140, 100))
    result = triton.infer("shades", [image_input(data)], headers=admin(),
                          outputs=[InferRequestedOutput("probabilities")])
    scores = result.as_numpy("probabilities")[0]
    r = requests.post(server.url + "/models/shades/classify", headers=admin(), timeout=30,
                      files={"image": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    reference = {p["label"]: p["score"] for p in r.json()["predictions"]}
    assert SHADES[int(scores.argmax())] == r.json()["predictions"][0]["label"] == "mid"
    assert all(abs(float(s) - reference[label]) <= TOLERANCE for s, label in zip(scores, SHADES))
    loaded = [r for r in read_audit(server) if r["event"] == "model_load_requested"
              and r["details"] == {"model": "shades", "outcome": "ok"}]
    assert loaded and loaded[-1]["key"] == "ops"


@pytest.mark.server
def test_unloading_the_default_model_is_a_clear_404_and_readyz_503(server, triton):
    triton.unload_model("colours", headers=admin())
    try:
        for answers in each_worker(server, "POST", "/classify",
                                   files={"image": ("r.png", ig.png(ig.RED))}).values():
            for r in answers:
                message = assert_envelope(r, 404, "model_not_found")["message"]
                assert "default model 'colours' is unloaded" in message
        r = requests.get(server.url + "/readyz", timeout=30)
        assert "unloaded" in assert_envelope(r, 503, "model_not_ready")["message"]
        assert triton.is_model_ready("shades", headers=admin())
    finally:
        triton.load_model("colours", headers=admin())
    r = requests.post(server.url + "/classify", headers=admin(), timeout=30,
                      files={"image": ("r.png", ig.png(ig.RED))})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "red", r.text
    assert requests.get(server.url + "/readyz", timeout=30).status_code == 200


# -- errors and access ---------------------------------------------------------------------------
@pytest.mark.server
def test_unknown_models_and_bad_requests_are_clean_errors(server, triton):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        triton.load_model("nope", headers=admin())
    assert caught.value.status() == "404" and "no model named 'nope'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.unload_model("nope", headers=admin())
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException) as caught:
        triton.load_model("shades", headers=admin(), config=json.dumps({"max_batch_size": 4}))
    assert caught.value.status() == "400" and "'config' is not supported" in \
        caught.value.message()
    url = server.url + "/v2/repository"
    for path, body in [("/index", b"[1, 2"), ("/index", b"[]"), ("/index", b'{"ready": "yes"}'),
                       ("/models/shades/load", b'{"parameters": []}'),
                       ("/models/shades/unload", b'{"parameters": {"unload_dependents": 1}}'),
                       ("/models/shades/unload", b'{"model": "colours"}'),
                       ("/index", b"[" * 10000 + b"]" * 10000)]:
        r = requests.post(url + path, data=body, headers=admin(), timeout=30)
        assert_message(r, 400)
    assert_message(requests.post(url + "/index", data=b" " * (65 * 1024), headers=admin(),
                                 timeout=30), 413)
    assert_message(requests.get(url + "/index", headers=admin(), timeout=30), 405)
    assert_message(requests.post(url + "/models/a%2F..%2Fb/load", headers=admin(), timeout=30),
                   404)
    assert index_of(triton)["shades"][1] == "READY"  # no refused request changed anything


@pytest.mark.server
def test_the_repository_needs_the_admin_scope(server, triton):
    from tritonclient.utils import InferenceServerException

    for call in (lambda h: triton.get_model_repository_index(headers=h),
                 lambda h: triton.unload_model("shades", headers=h),
                 lambda h: triton.load_model("shades", headers=h)):
        with pytest.raises(InferenceServerException) as caught:
            call(classify_only())
        assert caught.value.status() == "403" and "'admin' scope" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            call({})
        assert caught.value.status() == "401"
    assert triton.is_model_ready("shades", headers=admin())  # nothing was unloaded
    refused = [r for r in read_audit(server) if r["event"] == "key_rejected"
               and r["details"].get("path") == "/v2/repository/models/shades/unload"]
    assert {(r["key"], r["details"]["reason"]) for r in refused} >= {("ci", "scope"),
                                                                       (None, "missing")}


# -- in-process: MODEL_PATH, and the requests file ---------------------------------------------
def test_model_path_unload_leaves_nothing_served_until_loaded(tmp_path):
    """With MODEL_PATH (a repository of one model) an unload leaves the server serving
    nothing, saying so; a load serves the folder again."""
    model = save_colour_model(str(tmp_path / "colours"))
    app = create_app({"model_path": model, "model_poll_seconds": 0,
                      "temp_dir": str(tmp_path / "temp"), "feedback_dir": None})
    dataplane = DataPlane.of(app)
    try:
        assert dataplane.manager.wait_initial(120)
        client = app.test_client()
        index = client.post("/v2/repository/index").get_json()
        assert index == [{"name": "colours", "version": "7", "state": "READY", "reason": ""}]
        assert client.post("/v2/repository/models/colours/unload").status_code == 200
        r = client.post("/classify", data=ig.png(ig.RED), content_type="image/png")
        assert "unloaded" in assert_envelope(r, 404, "model_not_found")["message"]
        assert_envelope(client.get("/readyz"), 503, "model_not_ready")
        assert client.post("/v2/repository/models/colours/load", json={}).status_code == 200
        r = client.post("/classify", data=ig.png(ig.RED), content_type="image/png")
        assert r.status_code == 200 and r.get_json()["predictions"][0]["label"] == "red"
    finally:
        dataplane.close()


def test_a_load_that_fails_is_400_with_the_reason(tmp_path):
    """A model whose folder is broken when it is loaded again: 400 naming the failure (no
    server path), and the index shows it UNAVAILABLE with the same reason."""
    repo = tmp_path / "repo"
    save_colour_model(str(repo / "colours" / "1"))
    app = create_app({"model_repository": str(repo), "model_poll_seconds": 0,
                      "temp_dir": str(tmp_path / "temp"), "feedback_dir": None})
    dataplane = DataPlane.of(app)
    try:
        assert dataplane.manager.wait_initial(120)
        client = app.test_client()
        assert client.post("/v2/repository/models/colours/unload").status_code == 200
        shutil.rmtree(repo / "colours" / "1")
        (repo / "colours" / "1").mkdir()
        (repo / "colours" / "1" / "saved_model.pb").write_bytes(b"not a saved model")
        (repo / "colours" / "1" / "labels.txt").write_text("red\ngreen\nblue\n")
        old = time.time() - 60  # settled: its files are older than the settle time
        for name in os.listdir(repo / "colours" / "1"):
            os.utime(repo / "colours" / "1" / name, (old, old))
        r = client.post("/v2/repository/models/colours/load")
        message = assert_message(r, 400)
        assert "failed to load model 'colours'" in message and str(tmp_path) not in message
        (entry,) = client.post("/v2/repository/index").get_json()
        assert entry["state"] == "UNAVAILABLE" and entry["reason"] and \
            str(tmp_path) not in entry["reason"]
    finally:
        dataplane.close()


def test_the_requests_file_of_an_earlier_run_is_ignored(tmp_path):
    """A restart serves the repository as it is: requests written by another server process
    (a pid that is not ours) read as none."""
    path = str(tmp_path / ".model-requests.json")
    earlier = ModelRequests(path, server=1)
    assert earlier.set_unloaded("colours", True) == 1
    assert earlier.read().unloaded == {"colours"}
    assert ModelRequests(path, server=os.getpid()).read() == Requested()
    now = ModelRequests(path, server=os.getpid())
    assert now.set_unloaded("shades", True) == 1 and now.read().unloaded == {"shades"}
    now.ack(os.getpid(), 1)
    assert now.read().acks == {os.getpid(): 1} and now.behind(1, os.getpid()) == []
