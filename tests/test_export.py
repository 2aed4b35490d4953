"""scripts/export.py: a tiny real model exported to ONNX and TFLite with the real converters,
verified against TensorFlow, refused when its outputs stray; the loaders' checks; the ONNX
runtime through the real gunicorn server."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import imagegen as ig
import numpy as np
import onnx
import pytest
import requests
from helpers import ROOT, metric_so_far, post_image, start_server
from onnx import helper, numpy_helper
from tiny_models import save_colour_model

from common.config import Config
from common.inference import exports
from common.inference.loader import RuntimeOptions, load_classifier, load_starts_threads
from common.modelfolder import EXPORT_FILES, ModelFolder, ModelLoadError, file_sha256
from scripts import export as export_cli
from scripts import exporting, label_image
from scripts.exporting import ExportError, ExportParams, converters

#: Colours with no tie between channels: the colour model ranks all three labels.
MIXED = [(200, 120, 90), (40, 180, 120), (90, 60, 220), (128, 128, 140), (250, 240, 10)]


def _colour_images(size=(32, 32)) -> np.ndarray:
    return np.stack([np.full((*size, 3), c, np.float32) / 255.0 for c in MIXED])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    """The colour model with a verified model.onnx and model.tflite."""
    folder = save_colour_model(str(tmp_path_factory.mktemp("exported") / "colours"))
    for fmt in ("onnx", "tflite"):
        exporting.export(folder, ExportParams(format=fmt, generated=12), progress=False)
    return folder


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder: str) -> str:
        return shutil.copytree(folder, str(tmp_path / os.path.basename(folder)))
    return copy


def test_onnx_export_is_written_verified_and_recorded(exported):
    folder = ModelFolder(exported)
    record = folder.export_record("onnx")
    assert record["file"] == "model.onnx" and record["opset"] == 17
    assert record["sha256"] == file_sha256(folder.file("model.onnx"))
    assert record["bytes"] == os.path.getsize(folder.file("model.onnx"))
    check = record["verification"]
    assert check["passed"] and check["images"] == 12 and check["top1_agreement"] == 1.0
    assert check["max_abs_diff"] <= check["tolerance"]["max_abs_diff"] == 1e-4
    assert np.asarray(record["reference"]["outputs"]).shape == (exports.REFERENCE_COUNT, 3)
    # The export answers like the SavedModel, through the same Classifier.
    tf_clf = load_classifier(exported)
    onnx_clf = load_classifier(exported, RuntimeOptions("onnx"))
    assert onnx_clf.runtime == "onnx" and onnx_clf.input_size == tf_clf.input_size
    images = _colour_images()
    np.testing.assert_allclose(onnx_clf.predict(images), tf_clf.predict(images), atol=1e-4)


#: Run in a fresh process (no other test's threads): for each runtime setting, whether
#: load_starts_threads predicts a load + warm-up that leaves new threads running.
_THREADS_PROBE = """
import json, os, sys
from common.inference.loader import RuntimeOptions, load_classifier, load_starts_threads
folder, out, kept = sys.argv[1], [], []
def tasks():
    return set(os.listdir("/proc/self/task"))
one, two = (RuntimeOptions("onnx", onnx_intra_op_threads=n) for n in (1, 2))
for options in (one, one, two, RuntimeOptions("tensorflow"), RuntimeOptions("tensorflow")):
    said, before = load_starts_threads(folder, options), tasks()
    kept.append(load_classifier(folder, options))  # kept: a session's pool ends with it
    kept[-1].warm_up((1, 2))
    out.append([options.runtime, said, len(tasks() - before)])
print(json.dumps(out))
"""


def test_load_starts_threads_says_what_a_load_leaves_running(exported):
    """A roll-out's load runs at LOAD_NICE only where ``load_starts_threads`` says it starts no
    thread the model keeps (such a thread would keep the lowered priority). Checked in a fresh
    process against the threads alive before and after real loads and warm-ups: ONNX Runtime
    starts none at one intra-op thread once it has loaded a model, a pool per session at two;
    TensorFlow its pools on its first load and none on the next."""
    found = subprocess.run([sys.executable, "-c", _THREADS_PROBE, exported], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr[-2000:]
    runs = json.loads(found.stdout.strip().splitlines()[-1])
    assert [(runtime, said) for runtime, said, _ in runs] == [
        ("onnx", True), ("onnx", False), ("onnx", True), ("tensorflow", True),
        ("tensorflow", False)]
    for runtime, said, started in runs:
        assert said or not started, runs  # a load said to start none starts none
    # and the probe sees the threads that make a load unsafe: ONNX Runtime's pool at two
    # threads, TensorFlow's pools on its first load (ONNX Runtime's first load started one
    # thread on one machine and none on another: it is never lowered either way)
    assert runs[2][2] and runs[3][2], runs
    # LiteRT is not measured: taken to start its pool
    assert load_starts_threads(exported, RuntimeOptions("tflite")) is True


@pytest.mark.parametrize("threads", [1, 2])
def test_the_app_lowers_a_roll_outs_load_only_where_no_thread_outlives_it(exported, tmp_path,
                                                                          threads):
    """create_app's wiring of LOAD_NICE: with one ONNX Runtime thread a version published after
    start-up loads lowered (it then takes no ``load_turn``); with two (a pool per session) at
    the process's priority, in its turn, so every thread started since, the new session's pool
    included, keeps that priority."""
    from app import create_app
    from common import modelfolder
    from common.dataplane import DataPlane

    base = os.getpriority(os.PRIO_PROCESS, 0)
    repo = tmp_path / "repo"
    os.makedirs(repo / "colours")
    shutil.copytree(exported, repo / "colours" / "1")
    app = create_app({"model_repository": str(repo), "model_poll_seconds": 0, "runtime": "onnx",
                      "onnx_intra_op_threads": threads, "temp_dir": str(tmp_path / "t"),
                      "load_nice": 9})
    manager = DataPlane.of(app).manager
    turns = []

    @contextlib.contextmanager
    def turn():
        turns.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        yield

    manager.load_turn = turn
    try:
        assert manager.wait_initial(60)
        before = set(os.listdir("/proc/self/task"))
        staging = shutil.copytree(exported, repo / ".incoming")
        modelfolder.publish(str(staging), str(repo / "colours" / "2"))
        deadline = time.monotonic() + 60
        while not any(v["version"] == 2 and v["state"] == "ready"
                      for m in manager.status() for v in m["versions"]):
            assert time.monotonic() < deadline, manager.status()
            manager.poll()
            time.sleep(0.05)
        assert turns == ([] if threads == 1 else [base])
        started = set(os.listdir("/proc/self/task")) - before
        assert started or threads == 1  # the pool of version 2's session
        for tid in started:
            try:
                assert os.getpriority(os.PRIO_PROCESS, int(tid)) == base
            except ProcessLookupError:  # a thread that has ended since
                pass
    finally:
        DataPlane.of(app).close()


def test_an_onnx_model_runs_alone_on_a_second_session_of_more_threads(exported):
    """RUNTIME_THREADS_ALONE: with a seat on the board of running calls, an ONNX model gets a
    second session on ``alone_threads`` (its own pool), which gives the same scores; a call
    takes it while no other call runs, the warm-up times the session used under load and runs
    the other once; without a seat, or with no more threads than under load, one session and
    the calls are still counted on the seat."""
    from common.machine import WorkBoard

    board = WorkBoard(seats=2)
    seat = board.seat(0)
    alone = []
    seat.on_alone = lambda: alone.append(1)
    before = set(os.listdir("/proc/self/task"))
    clf = load_classifier(exported, RuntimeOptions("onnx", onnx_intra_op_threads=1,
                                                   alone_threads=2, seat=seat))
    assert set(os.listdir("/proc/self/task")) - before  # the second session's pool
    assert clf.seat is seat and alone == []  # the load's reference check ran under load
    images = _colour_images()
    under_load = clf.predict_fn.under_load(images)
    np.testing.assert_allclose(clf.predict_fn.alone(images), under_load, atol=1e-6)
    clf.warm_up((1, 2))
    assert alone == [] and set(clf.batch_seconds) == {1, 2}
    np.testing.assert_allclose(clf.predict(images), clf.spec.to_scores(under_load), atol=1e-6)
    assert alone == [1]
    busy, leave = threading.Event(), threading.Event()
    sibling = threading.Thread(target=board.seat(1).either(lambda _: (busy.set(),
                                                                       leave.wait(30))),
                               args=(None,))
    sibling.start()
    try:
        assert busy.wait(30)
        clf.predict(images)
    finally:
        leave.set()
        sibling.join(30)
    assert alone == [1]  # another worker was running a call

    for options in (RuntimeOptions("onnx", onnx_intra_op_threads=1, alone_threads=2),
                    RuntimeOptions("onnx", onnx_intra_op_threads=2, alone_threads=2, seat=seat),
                    RuntimeOptions("tensorflow", seat=seat)):
        plain = load_classifier(exported, options)
        assert not hasattr(plain.predict_fn, "alone"), options
        if options.seat is not None:
            assert _seen_running(board, lambda: plain.predict(images))


def _seen_running(board, call, seconds: float = 10.0) -> bool:
    """Whether the board counted a running call while ``call`` ran over and over in another
    thread (sampled until seen, at most ``seconds``)."""
    stop, seen = threading.Event(), False

    def calls():
        while not stop.is_set():
            call()
    runner = threading.Thread(target=calls)
    runner.start()
    try:
        deadline = time.monotonic() + seconds
        while not seen and time.monotonic() < deadline:
            seen = board.busy() == 1
    finally:
        stop.set()
        runner.join(30)
    return seen and board.busy() == 0


@pytest.mark.parametrize("spinning", [False, True])
def test_onnx_spinning_setting_reaches_the_session(exported, spinning):
    """ONNX_SPINNING (default off) becomes the session's allow_spinning entries, so the pool
    threads sleep between ops instead of taking CPU from the request threads."""
    env = {"RUNTIME": "onnx", **({"ONNX_SPINNING": "true"} if spinning else {})}
    clf = load_classifier(exported, RuntimeOptions.from_config(Config.from_env(env)))
    options = clf._keepalive.get_session_options()
    for pool in ("intra_op", "inter_op"):
        entry = options.get_session_config_entry(f"session.{pool}.allow_spinning")
        assert entry == ("1" if spinning else "0")


@pytest.mark.parametrize("quantize", ["fp32", "float16", "dynamic", "int8"])
def test_tflite_exports_run_on_litert_and_in_label_image(exported, copy_of, tmp_path, quantize,
                                                         capsys):
    folder = copy_of(exported)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    # (int8 flattens the grey's small lead to a tie: it is left out of the calibration set)
    for i, colour in enumerate([c for c in MIXED if c != (128, 128, 140)] * 4):
        (calibration / f"{i}.png").write_bytes(ig.png(colour))
    own = exporting.find_images(str(calibration))  # the model's "own" images: calibrate, verify
    params = ExportParams(format="tflite", quantize=quantize, images=own, calibration=own)
    record = exporting.export(folder, params, progress=False)
    key = "tflite" if quantize == "fp32" else f"tflite-{quantize}"
    assert record["file"] == EXPORT_FILES[key] and record["verification"]["passed"]
    assert os.path.isfile(os.path.join(folder, record["file"]))
    image = tmp_path / "orange.png"
    image.write_bytes(ig.png(MIXED[0]))
    assert label_image.main(["--model", folder, "--tflite", record["file"], "--image",
                             str(image), "--top_k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in answer["predictions"]] == ["red", "green", "blue"]


def _scaled_onnx(real):
    """A converter whose model multiplies the 'blue' score by 0.5: outputs altered."""
    def convert(*args, **kwargs):
        model = onnx.load_from_string(real(*args, **kwargs))
        out = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [o + "_raw" if o == out else o for o in node.output]
        model.graph.initializer.append(numpy_helper.from_array(
            np.array([1.0, 1.0, 0.5], np.float32), "alter"))
        model.graph.node.append(helper.make_node("Mul", [out + "_raw", "alter"], [out]))
        return model.SerializeToString()
    return convert


def test_an_export_with_altered_outputs_is_refused_and_nothing_is_written(
        exported, copy_of, monkeypatch):
    folder = copy_of(exported)
    os.remove(os.path.join(folder, "model.onnx"))
    before = open(os.path.join(folder, "model.json")).read()
    monkeypatch.setattr(exporting, "to_onnx", _scaled_onnx(converters.to_onnx))
    with pytest.raises(ExportError, match=r"model.onnx refused: .*largest score difference"):
        exporting.export(folder, ExportParams(format="onnx", generated=12), progress=False)
    assert not os.path.exists(os.path.join(folder, "model.onnx"))
    assert open(os.path.join(folder, "model.json")).read() == before


def test_a_missing_converter_is_named(exported, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import tf2onnx -> ImportError
    assert converters.missing_packages("onnx") == ["tf2onnx"]
    assert export_cli.main(["--model", exported, "--format", "onnx", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tf2onnx" in err and "requirements-export.txt" in err and "Traceback" not in err
    outcome = exporting.export_default(exported, progress=False)
    assert outcome["onnx"].startswith("skipped: tf2onnx not installed")


def test_cli_exports_and_prints_the_verification(copy_of, exported, capsys):
    folder = copy_of(exported)
    assert export_cli.main(["--model", folder, "--format", "onnx", "--generated", "6",
                            "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["file"] == "model.onnx"
    assert printed["verification"]["passed"] and printed["verification"]["images"] == 6


def test_a_changed_file_is_not_served_auto_falls_back_to_tensorflow(exported, copy_of):
    folder = copy_of(exported)
    assert load_classifier(folder, RuntimeOptions("auto")).runtime == "onnx"
    bf16 = RuntimeOptions("auto", precision="bf16")  # a TensorFlow feature: auto keeps TF
    assert load_classifier(folder, bf16).runtime == "tensorflow"
    with open(os.path.join(folder, "model.onnx"), "ab") as fh:
        fh.write(b"\0")  # no longer the verified file
    assert load_classifier(folder, RuntimeOptions("auto")).runtime == "tensorflow"
    with pytest.raises(ModelLoadError, match="differs from the verified one"):
        load_classifier(folder, RuntimeOptions("onnx"))


def test_the_loader_checks_the_recorded_reference_outputs(exported, copy_of):
    folder = ModelFolder(copy_of(exported))
    meta = folder.read_metadata()
    outputs = meta["exports"]["onnx"]["reference"]["outputs"]
    outputs[0] = outputs[0][::-1]  # TensorFlow "said" something else
    folder.write_metadata(meta)
    with pytest.raises(ModelLoadError,
                       match="does not reproduce the recorded outputs of tensorflow"):
        load_classifier(folder, RuntimeOptions("onnx"))


def test_without_an_export_onnx_is_refused_and_auto_uses_tensorflow(colour_model_dir):
    assert load_classifier(colour_model_dir, RuntimeOptions("auto")).runtime == "tensorflow"
    with pytest.raises(ModelLoadError, match="no verified model.onnx .*scripts/export.py"):
        load_classifier(colour_model_dir, RuntimeOptions("onnx"))


def test_the_committed_demo_has_verified_exports():
    demo = ModelFolder(os.path.join(ROOT, "tf_files", "demo"))
    for key in ("onnx", "tflite"):
        path, record = demo.verified_export(key)
        assert record["verification"]["source"].endswith("test images")
        assert record["verification"]["top1_agreement"] == 1.0


# -- the real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(exported, tmp_path_factory):
    """The exported folder served twice by the real server: TensorFlow and ONNX Runtime."""
    started = {}
    try:
        for runtime in ("tensorflow", "onnx"):
            started[runtime] = start_server(tmp_path_factory.mktemp(runtime), {
                "MODEL_PATH": exported, "RUNTIME": runtime, "WORKERS": "1",
                "ONNX_INTRA_OP_THREADS": "1"}, name=runtime)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.mark.server
@pytest.mark.parametrize("alone", ["2", "0"])
def test_a_lone_request_runs_on_every_cpu_when_two_workers_share_them(exported, tmp_path,
                                                                       alone):
    """gunicorn with two workers of one runtime thread: each request sent on its own, with no
    other worker holding work, runs on the second session of RUNTIME_THREADS_ALONE threads
    (counted in /metrics, over both workers); under eight clients at once the workers see each
    other's work on the board they share, and many calls run under load;
    RUNTIME_THREADS_ALONE=0 turns it off."""
    from concurrent.futures import ThreadPoolExecutor

    server = start_server(tmp_path, {"MODEL_PATH": exported, "RUNTIME": "onnx", "WORKERS": "2",
                                     "RUNTIME_THREADS": "1", "RUNTIME_THREADS_ALONE": alone})

    def counted() -> tuple[float, float]:
        page = requests.get(server.url + "/metrics", timeout=10).text
        return (metric_so_far(page, "classifier_model_calls_alone_total"),
                metric_so_far(page, "classifier_model_call_duration_seconds_count"))

    try:
        before, _ = counted()
        for colour in MIXED[:5]:
            assert post_image(server, ig.png(colour)).status_code == 200
        after, calls = counted()
        assert after - before == (5 if alone != "0" else 0)
        if alone != "0":
            body = ig.png(MIXED[0])
            with ThreadPoolExecutor(8) as clients:  # a new connection each: both workers
                codes = list(clients.map(lambda _: post_image(server, body).status_code,
                                         range(160)))
            assert codes == [200] * 160
            alone_now, calls_now = counted()
            assert calls_now - calls >= 20  # batches of up to 8
            # a board each worker kept to itself would run every call alone; here about 40%
            # did (this model's calls are short beside a request's path, so a worker often
            # holds nothing between its clients' requests)
            assert alone_now - after <= 0.8 * (calls_now - calls), (alone_now - after,
                                                                     calls_now - calls)
    finally:
        server.stop()


@pytest.mark.server
def test_the_onnx_runtime_server_ranks_like_the_tensorflow_server(servers):
    for runtime, server in servers.items():
        assert requests.get(server.url + "/model", timeout=5).json()["runtime"] == runtime
    for colour in MIXED:
        answers = [post_image(server, ig.png(colour)).json()["predictions"]
                   for server in servers.values()]
        assert [p["label"] for p in answers[0]] == [p["label"] for p in answers[1]]
        for a, b in zip(*answers):
            assert abs(a["score"] - b["score"]) <= 1e-4, (colour, answers)


@pytest.mark.server
def test_model_onnx_is_served_with_caching_headers_and_its_hash(servers, exported):
    server = servers["onnx"]
    summary = requests.get(server.url + "/model", timeout=5).json()["onnx"]
    data = open(os.path.join(exported, "model.onnx"), "rb").read()
    sha256 = file_sha256(os.path.join(exported, "model.onnx"))
    response = requests.get(server.url + summary["url"], timeout=10)
    assert response.status_code == 200 and response.content == data
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert "max-age=86400" in response.headers["Cache-Control"]
    assert response.headers["ETag"] == f'"{sha256}"'
    digest = __import__("base64").b64encode(bytes.fromhex(sha256)).decode()
    assert response.headers["Repr-Digest"] == f"sha-256=:{digest}:"
    assert summary["integrity"] == f"sha256-{digest}" and summary["bytes"] == len(data)
    again = requests.get(server.url + summary["url"], timeout=10,
                         headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304 and not again.content


@pytest.mark.server
def test_a_model_without_onnx_answers_404_in_the_envelope(live_server):
    from helpers import assert_envelope
    assert requests.get(live_server.url + "/model", timeout=5).json()["onnx"] is None
    assert_envelope(requests.get(live_server.url + "/model/model.onnx", timeout=5), 404,
                    "not_found")


@pytest.mark.server
def test_the_onnx_server_needs_no_tensorflow(exported, tmp_path):
    """RUNTIME=onnx serves with TensorFlow impossible to import (the TensorFlow-free image)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTensorFlow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tf_keras', 'keras'):\n"
        "            raise ImportError('TensorFlow is not installed in this image')\n"
        "sys.meta_path.insert(0, _NoTensorFlow())\n")
    env = {"MODEL_PATH": exported, "RUNTIME": "onnx", "WORKERS": "1",
           "PYTHONPATH": os.pathsep.join([str(blocker), ROOT])}
    server = start_server(tmp_path, env)
    try:
        body = post_image(server, ig.png(MIXED[1])).json()
        assert body["predictions"][0]["label"] == "green"
    finally:
        server.stop()
    # The same server on TensorFlow cannot start: the blocker works.
    check = subprocess.run([sys.executable, "-c", "import tensorflow"], env={
        **os.environ, "PYTHONPATH": env["PYTHONPATH"]}, capture_output=True, text=True)
    assert check.returncode != 0 and "not installed in this image" in check.stderr
