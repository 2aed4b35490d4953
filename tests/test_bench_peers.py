"""scripts/bench_peers.py and scripts/peers/: what can be checked without the peers installed.

The peers see the image exactly as our service does (the same array from the same bytes), a
tiny ONNX model gives the answer you can read, the ratios pick the best peer per metric, and
every peer's virtualenv pins the runtime and image libraries at our versions."""
import base64
import json
import os
import re

import numpy as np
import pytest

from common.inference.images import load_for_model
from scripts import bench_peers, loadgen
from scripts.peers import onnx_model

PEERS_DIR = bench_peers.PEERS_DIR


def test_peer_preprocessing_is_ours():
    jpeg = loadgen.photo_jpeg(500, 375, seed=3)
    b64 = base64.b64encode(jpeg).decode()
    ours = load_for_model(jpeg, (224, 224))[0]
    for instance in ({"b64": b64}, b64):
        theirs = onnx_model.preprocess(instance, (224, 224))
        assert theirs.dtype == np.float32 and theirs.shape == (224, 224, 3)
        np.testing.assert_array_equal(theirs, ours)


@pytest.mark.parametrize("instance", [{"b64": "AAAA", "extra": 1}, {"image": "AAAA"}, 42,
                                      {"b64": "not base64!"}])
def test_peer_preprocessing_refuses_other_instances(instance):
    with pytest.raises(ValueError):
        onnx_model.preprocess(instance, (8, 8))


def test_ranked_is_highest_first_and_clamped():
    labels = ["a", "b", "c"]
    assert [r["label"] for r in onnx_model.ranked(np.array([0.2, 0.5, 0.3]), labels)] == \
        ["b", "c", "a"]
    assert [r["label"] for r in onnx_model.ranked(np.array([0.2, 0.5, 0.3]), labels, 1)] == ["b"]


def _pooling_onnx(path):
    """A model you can read: the mean of each colour channel, softmaxed, as ``probabilities``
    over the labels red, green, blue."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("Mul", ["mean", "ten"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "pool", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 8, 8, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_onnx_model_answers_the_colour(tmp_path):
    pytest.importorskip("onnxruntime")
    from io import BytesIO

    from PIL import Image
    _pooling_onnx(str(tmp_path / "model.onnx"))
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "model.json").write_text(json.dumps({"input_size": [8, 8]}))
    model = onnx_model.OnnxModel.load(str(tmp_path), intra_op=1)
    assert model.size == (8, 8)
    answers = []
    for colour in ((250, 10, 10), (10, 10, 250)):
        buf = BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, "JPEG")
        answers.append(model.preprocess({"b64": base64.b64encode(buf.getvalue()).decode()}))
    top = model.top_k(model.predict(np.stack(answers)), k=5)
    assert [row[0]["label"] for row in top] == ["red", "blue"]
    assert all(len(row) == 3 for row in top)  # k clamped to the labels


def _level(goodput, p50, p99, ok=100):
    return {"goodput": goodput, "p50_ms": p50, "p99_ms": p99, "ok": ok, "shed_share": 0.0,
            "client_cpu_s": 0.1, "server_cpu_ms_per_answer": 12.0}


def _result(rows):
    return {"model": "m", "model_name": "m", "machine": {"cpus": 2},
            "params": {"concurrency": [1, 16], "duration": 5, "intra_op": 0, "max_batch": 8},
            "rows": rows, "ratios": bench_peers.ratios(rows, (1, 16))}


def test_ratios_take_the_best_peer_per_metric():
    rows = {"ours /classify (raw JPEG)": {"server": "ours", "levels": [_level(20, 50, 80),
                                                                     _level(40, 400, 900)]},
            "ours :predict (b64 JSON)": {"server": "ours", "levels": [_level(10, 100, 160),
                                                                    _level(30, 500, 1000)]},
            "kserve": {"server": "kserve", "levels": [_level(10, 100, 200), _level(20, 800, 900)]},
            "litserve": {"server": "litserve", "levels": [_level(5, 90, 400),
                                                          _level(25, 600, 2000)]},
            "bentoml": {"server": "bentoml", "failed": "pip check failed"},
            "ours /classify (raw JPEG) again": {"server": "ours",
                                                "levels": [_level(1, 1, 1), _level(1, 1, 1)]}}
    r = bench_peers.ratios(rows, (1, 16))
    assert r["1"]["goodput"]["best_peer"] == "kserve" and r["1"]["goodput"]["value"] == 10
    assert r["1"]["p50"]["best_peer"] == "litserve"
    assert r["1"]["p99"]["best_peer"] == "kserve"
    assert r["1"]["goodput"]["ours /classify (raw JPEG)"] == 2.0
    assert r["1"]["p50"]["ours :predict (b64 JSON)"] == pytest.approx(1.11)
    assert r["16"]["goodput"]["best_peer"] == "litserve"
    assert r["16"]["goodput"]["ours :predict (b64 JSON)"] == 1.2
    assert r["16"]["p99"]["best_peer"] == "kserve"  # the "again" rows are never a peer

    table = bench_peers.markdown(_result(rows))
    assert "| kserve | 10 | 100 | 200 |" in table
    assert "| bentoml | failed: pip check failed |" in table
    assert "| 16 | goodput | litserve | 25 | 1.6 | 1.2 |" in table


def test_a_level_no_peer_answered_has_no_ratio():
    rows = {"ours :predict (b64 JSON)": {"server": "ours", "levels": [_level(10, 100, 160)]},
            "kserve": {"server": "kserve", "levels": [_level(0, None, None, ok=0)]}}
    assert bench_peers.ratios(rows, (1,)) == {}


def test_unknown_peer_is_refused():
    with pytest.raises(ValueError, match="kserve, litserve, bentoml"):
        bench_peers.peer_command("triton", "", 0)


def _pins(path):
    with open(path) as fh:
        return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip()).groups()
                    for line in fh if re.match(r"[A-Za-z0-9_.-]+==", line.strip()))


@pytest.mark.parametrize("peer", bench_peers.PEER_NAMES)
def test_peer_venv_pins_our_runtime_and_image_libraries(peer):
    """Only the serving framework may differ: onnxruntime, numpy and Pillow are ours, and every
    package is pinned."""
    ours = {k.lower(): v for k, v in _pins(os.path.join(bench_peers.ROOT,
                                                        "requirements.txt")).items()}
    theirs = {k.lower(): v for k, v in _pins(bench_peers.requirements_path(peer)).items()}
    for name in ("onnxruntime", "numpy", "pillow"):
        assert theirs[name] == ours[name], name
    assert peer in theirs
    with open(bench_peers.requirements_path(peer)) as fh:
        loose = [ln for ln in fh if ln.strip() and not ln.startswith("#") and "==" not in ln]
    assert loose == []


@pytest.mark.parametrize("peer,module", [("kserve", "kserve_server.py"),
                                         ("litserve", "litserve_server.py"),
                                         ("bentoml", "bentoml_service.py")])
def test_peer_services_use_the_shared_model(peer, module):
    """Each peer service decodes and runs the model only through onnx_model (our
    preprocessing), never through its own image code."""
    with open(os.path.join(PEERS_DIR, module)) as fh:
        source = fh.read()
    assert "from onnx_model import OnnxModel, PeerSettings" in source
    assert "self.model.preprocess" in source and "self.model.predict" in source
    assert not re.search(r"^\s*(from PIL|import PIL|import cv2)", source, re.M)
    assert module[:-3] in " ".join(bench_peers.peer_command(peer, "/v", 1))
