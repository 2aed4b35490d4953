"""common/inference/classifier.py and common/modelfolder.py: loading both model kinds, the start-up
checks, the three steps (preprocess, predict, postprocess)."""
import pkgutil
import subprocess
import sys

import imagegen as ig
import numpy as np
import pytest
from helpers import ROOT
from tiny_models import COLOUR_LABELS, save_colour_frozen_graph, save_colour_model

import common
from common.inference import classifier as classifier_module
from common.inference.batcher import bucket_sizes, efficient_batch_size
from common.inference.classifier import Classifier, Options
from common.inference.images import DecodeLimits
from common.inference.loader import load_classifier
from common.modelfolder import LegacyGraph, ModelFolder, ModelLoadError, parse_labels


def batch(*colours, size=(32, 32)):
    out = np.zeros((len(colours), *size, 3), np.float32)
    for i, c in enumerate(colours):
        out[i, ..., :] = np.array(c, np.float32) / 255.0
    return out


def test_saved_model_folder(classifier):
    assert classifier.labels == COLOUR_LABELS
    assert classifier.input_size == (32, 32)
    assert classifier.describe() == {"name": "colours", "version": "7"}
    scores = classifier.predict(batch((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    assert scores.shape == (3, 3)
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    assert [classifier.labels[i] for i in scores.argmax(axis=1)] == ["red", "blue", "green"]


def test_predict_refuses_wrong_shape(classifier):
    with pytest.raises(ValueError):
        classifier.predict(np.zeros((1, 10, 10, 3), np.float32))


def test_a_model_answering_the_wrong_shape_is_a_value_error_not_a_load_error():
    clf = Classifier(predict_fn=lambda x: np.ones((len(x), 5)), labels=["a", "b"],
                     input_size=(1, 1))
    with pytest.raises(ValueError, match="shape"):
        clf.predict(np.zeros((1, 1, 1, 3), np.float32))


def test_the_three_steps(classifier):
    array, decoded = classifier.preprocess(ig.png(ig.BLUE), DecodeLimits(10_000))
    assert array.shape == (32, 32, 3) and array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0 and decoded.extension == "png"
    scores = classifier.predict(array[None])[0]
    ranked = classifier.postprocess(scores, Options(top_k=2))
    order = np.argsort(-scores, kind="stable")[:2]
    assert [p["label"] for p in ranked] == [classifier.labels[i] for i in order]
    assert ranked[0]["label"] == "blue"
    assert len(ranked) == 2 and set(ranked[0]) == {"label", "score"}
    assert ranked[0]["score"] == round(float(scores.max()), 6)


def test_label_count_mismatch_fails_fast(tmp_path):
    folder = save_colour_model(str(tmp_path / "m"), extra_outputs=1)
    with pytest.raises(ModelLoadError, match="4 scores"):
        clf = load_classifier(folder)
        clf.warm_up()


def test_warm_up_checks_undeclared_output_width():
    clf = Classifier(predict_fn=lambda x: np.ones((len(x), 4)), labels=["a", "b"],
                     input_size=(2, 2))
    with pytest.raises(ModelLoadError, match="4 scores"):
        clf.warm_up()


def test_warm_up_times_a_seats_choice_as_it_runs_under_load_and_runs_the_other_once():
    """A model with a second session for calls that run alone (``Seat.either``): the warm-up
    times the session used under load, whatever the other workers do, and warms the other
    up with one image."""
    from common.machine import WorkBoard

    calls = []

    def session(name):
        def run(x):
            calls.append((name, len(x)))
            return np.full((len(x), 2), 0.5)
        return run

    clf = Classifier(predict_fn=WorkBoard(seats=1).seat(0).either(session("under load"),
                                                                  session("alone")),
                     labels=["a", "b"], input_size=(2, 2))
    clf.warm_up((1, 2))
    assert calls == [("under load", 1)] * 2 + [("under load", 2)] * 2 + [("alone", 1)]


@pytest.mark.parametrize("per_call, per_image, measured, batch", [
    (0.0, 0.004, [1, 2], 1),  # the time grows with the batch: 2 gains nothing, 4 and 8 unmeasured
    (0.02, 0.001, [1, 2, 4, 8], 8),  # a fixed cost a call: every size gains
])
def test_warm_up_measures_larger_batches_only_while_they_gain(per_call, per_image, measured,
                                                               batch, monkeypatch):
    """A model that takes the same time per image gains nothing from batches: the warm-up
    stops after size 2 and the batcher then serves one image a call; one with a cost per call
    is measured at every size. (The clock the warm-up reads advances by the model's cost.)"""
    clock = [0.0]
    monkeypatch.setattr(classifier_module.time, "perf_counter", lambda: clock[0])

    def predict(x):
        clock[0] += per_call + per_image * len(x)
        return np.full((len(x), 2), 0.5)

    clf = Classifier(predict_fn=predict, labels=["a", "b"], input_size=(2, 2))
    clf.warm_up(bucket_sizes(8))
    assert sorted(clf.batch_seconds) == measured
    assert efficient_batch_size(clf.batch_seconds, 8) == batch


def test_missing_labels_or_model_fail_clearly(tmp_path, colour_model_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        load_classifier(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="saved_model.pb"):
        load_classifier(str(empty))
    with pytest.raises(ModelLoadError, match="labels"):
        load_classifier(ModelFolder(colour_model_dir, labels_path=str(tmp_path / "missing.txt")))


def test_corrupt_saved_model_fails_clearly(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"garbage")
    (folder / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_classifier(str(folder))


def test_read_labels_rules(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("daisy\nrose\n\n")
    assert parse_labels(str(path)) == ["daisy", "rose"]
    path.write_text("daisy\n\nrose\n")
    with pytest.raises(ModelLoadError, match="empty line"):
        parse_labels(str(path))
    path.write_text("a\na\n")
    with pytest.raises(ModelLoadError, match="duplicate"):
        parse_labels(str(path))
    path.write_text("\n")
    with pytest.raises(ModelLoadError, match="empty"):
        parse_labels(str(path))


@pytest.mark.parametrize("scale,mean,std", [(1.0, 0.0, 255.0), (255.0, 0.0, 1.0)])
def test_legacy_frozen_graph(tmp_path, scale, mean, std):
    pb = save_colour_frozen_graph(str(tmp_path / "retrained_graph.pb"), scale=scale)
    (tmp_path / "retrained_labels.txt").write_text("red\ngreen\nblue\n")
    # labels found beside the graph
    clf = load_classifier(ModelFolder(pb, legacy=LegacyGraph(input_mean=mean, input_std=std)))
    clf.warm_up()
    assert clf.input_size == (32, 32)
    scores = clf.predict(batch((0, 0, 255), (255, 0, 0)))
    assert [clf.labels[i] for i in scores.argmax(axis=1)] == ["blue", "red"]


def test_legacy_graph_wrong_tensor_name(tmp_path):
    pb = save_colour_frozen_graph(str(tmp_path / "g.pb"))
    (tmp_path / "l.txt").write_text("red\ngreen\nblue\n")
    with pytest.raises(ModelLoadError, match="cannot load frozen graph"):
        load_classifier(ModelFolder(pb, labels_path=str(tmp_path / "l.txt"),
                                    legacy=LegacyGraph(output_layer="nope")))
    with pytest.raises(ModelLoadError, match="LABELS_PATH"):
        load_classifier(pb)


def test_legacy_graph_label_mismatch(tmp_path):
    pb = save_colour_frozen_graph(str(tmp_path / "g.pb"))
    (tmp_path / "l.txt").write_text("red\ngreen\n")
    with pytest.raises(ModelLoadError, match="3 scores"):
        load_classifier(ModelFolder(pb, labels_path=str(tmp_path / "l.txt")))


def test_input_size_rule(tmp_path):
    folder = ModelFolder(str(tmp_path / "m"))
    assert folder.input_size({"input_size": [10, 20]}, (30, 30)) == (10, 20)  # model.json first
    assert folder.input_size({}, (30, 40)) == (30, 40)  # then the signature
    with pytest.raises(ModelLoadError, match="input size unknown"):
        folder.input_size({}, None)
    graph = ModelFolder(str(tmp_path / "g.pb"), legacy=LegacyGraph(input_size=(50, 60)))
    assert graph.input_size({}, (30, 30)) == (50, 60)  # a configured size wins for a graph
    assert ModelFolder(str(tmp_path / "g.pb")).input_size({}, None) == (299, 299)


def _ranker(labels):
    return Classifier(predict_fn=lambda x: None, labels=labels, input_size=(1, 1))


def test_rank_orders_clamps_and_thresholds():
    clf = _ranker(["a", "b", "c", "d"])
    scores = np.array([0.1, 0.5, 0.15, 0.25])
    assert [p.label for p in clf.rank(scores)] == ["b", "d", "c", "a"]
    assert [p.label for p in clf.rank(scores, top_k=2)] == ["b", "d"]
    assert len(clf.rank(scores, top_k=99)) == 4
    assert [p.label for p in clf.rank(scores, threshold=0.2)] == ["b", "d"]
    assert clf.rank(scores, threshold=0.9) == []


def test_logits_are_softmaxed():
    clf = Classifier(predict_fn=lambda x: np.array([[1.0, 3.0]]), labels=["a", "b"],
                     input_size=(1, 1), outputs="logits")
    scores = clf.predict(np.zeros((1, 1, 1, 3), np.float32))
    assert np.allclose(scores.sum(), 1.0) and scores[0, 1] > 0.85


#: Every module of the engine: all of common/ but the web layer (common.web), which alone may
#: import Flask.
def _unimportable(name: str):
    raise ImportError(f"{name} cannot be imported, so its modules cannot be checked")


ENGINE_MODULES = ["common"] + sorted(
    m.name for m in pkgutil.walk_packages(common.__path__, "common.", onerror=_unimportable)
    if m.name != "common.web" and not m.name.startswith("common.web."))


def test_the_engine_walk_finds_every_layer():
    assert {"common.config", "common.dataplane", "common.versions.manager",
            "common.inference.batcher", "common.inference.runtimes.onnxrt"} <= set(ENGINE_MODULES)


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engine_module_imports_no_web_framework(module):
    """Each engine module, imported alone in a fresh interpreter, loads neither Flask nor
    Werkzeug (so no module passes on what another one imported first)."""
    code = (f"import sys, {module}; "
            "print(','.join(m for m in ('flask', 'werkzeug') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} imports {result.stdout.strip()}"
