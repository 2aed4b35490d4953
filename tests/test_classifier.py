"""common/classifier.py: loading both model kinds, the start-up checks, ranking."""
import os

import numpy as np
import pytest

from common.classifier import (Classifier, ClassifierHolder, ModelLoadError, load_classifier,
                               read_labels)
from tiny_models import COLOUR_LABELS, save_colour_frozen_graph, save_colour_model


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


def test_label_count_mismatch_fails_fast(tmp_path):
    folder = save_colour_model(str(tmp_path / "m"), extra_outputs=1)
    with pytest.raises(ModelLoadError, match="4 scores"):
        clf = load_classifier(folder)
        clf.warm_up()


def test_missing_labels_or_model_fail_clearly(tmp_path, colour_model_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        load_classifier(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="saved_model.pb"):
        load_classifier(str(empty))
    with pytest.raises(ModelLoadError, match="labels"):
        load_classifier(colour_model_dir, labels_path=str(tmp_path / "missing.txt"))


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
    assert read_labels(str(path)) == ["daisy", "rose"]
    path.write_text("daisy\n\nrose\n")
    with pytest.raises(ModelLoadError):
        read_labels(str(path))
    path.write_text("a\na\n")
    with pytest.raises(ModelLoadError):
        read_labels(str(path))


@pytest.mark.parametrize("scale,mean,std", [(1.0, 0.0, 255.0), (255.0, 0.0, 1.0)])
def test_legacy_frozen_graph(tmp_path, scale, mean, std):
    pb = save_colour_frozen_graph(str(tmp_path / "retrained_graph.pb"), scale=scale)
    (tmp_path / "retrained_labels.txt").write_text("red\ngreen\nblue\n")
    clf = load_classifier(pb, input_mean=mean, input_std=std)  # labels found beside the graph
    clf.warm_up()
    assert clf.input_size == (32, 32)
    scores = clf.predict(batch((0, 0, 255), (255, 0, 0)))
    assert [clf.labels[i] for i in scores.argmax(axis=1)] == ["blue", "red"]


def test_legacy_graph_wrong_tensor_name(tmp_path):
    pb = save_colour_frozen_graph(str(tmp_path / "g.pb"))
    (tmp_path / "l.txt").write_text("red\ngreen\nblue\n")
    with pytest.raises(ModelLoadError, match="cannot load frozen graph"):
        load_classifier(pb, labels_path=str(tmp_path / "l.txt"), output_layer="nope")
    with pytest.raises(ModelLoadError, match="LABELS_PATH"):
        load_classifier(pb)


def test_legacy_graph_label_mismatch(tmp_path):
    pb = save_colour_frozen_graph(str(tmp_path / "g.pb"))
    (tmp_path / "l.txt").write_text("red\ngreen\n")
    with pytest.raises(ModelLoadError, match="3 scores"):
        load_classifier(pb, labels_path=str(tmp_path / "l.txt"))


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


def test_holder_loads_in_background_and_reports_failure(colour_model_dir):
    holder = ClassifierHolder()
    assert holder.classifier is None and holder.state == "loading"
    holder.start(lambda: load_classifier(colour_model_dir))
    assert holder.wait(60) and holder.classifier.warmed_up
    failures = []
    bad = ClassifierHolder()
    bad.start(lambda: load_classifier("/nonexistent"), on_failure=failures.append)
    assert not bad.wait(60)
    assert bad.state == "failed" and isinstance(failures[0], ModelLoadError)


def test_engine_imports_no_web_framework():
    import subprocess
    import sys
    code = ("import sys; import common.classifier, common.batching, common.images, "
            "common.fetch, common.storage, common.service, common.preprocessing, common.config, "
            "common.metrics, common.slowclients; "
            "bad = [m for m in ('flask', 'werkzeug') if m in sys.modules]; "
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
