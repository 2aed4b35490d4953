"""scripts/: synthetic data, the feature module, retrain end to end, label_image, the demo model.

A tiny data set and a tiny feature module (made by our own scripts) live in a temp folder. The
library is used through ``scripts.training``'s public names, the commands through their mains.
"""
import json
import os
import shutil

import imagegen as ig
import numpy as np
import pytest
from helpers import DEMO
from tiny_models import save_colour_frozen_graph

from common.inference.images import load_for_model
from common.inference.loader import load_classifier
from common.modelfolder import ModelFolder
from scripts import label_image, make_demo_data, make_feature_module, retrain, training

SHAPES = ("circle", "cross", "square")
COLOURS = {"blue": ig.BLUE, "green": ig.GREEN, "red": ig.RED}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Noisy solid-colour pictures, 30 per class: a task whose right answer is certain."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(3)
    for name, colour in COLOURS.items():
        (folder / name).mkdir()
        for i in range(30):
            size = (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            image = ig.noisy(colour, size, seed=int(rng.integers(1 << 30)), amount=60)
            image.save(folder / name / f"{name}_{i:03d}.{'png' if i % 2 else 'jpg'}")
    return str(folder)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    params = make_feature_module.ModuleParams(input_size=32, channels=(8, 16, 32),
                                              images_per_class=20, epochs=1, seed=4,
                                              shapes=SHAPES + ("triangle",))
    module, metrics = make_feature_module.train_module(params, progress=False)
    folder = str(tmp_path_factory.mktemp("module") / "features")
    return make_feature_module.save_module(module, folder, params, metrics)


FAST = training.TrainParams(how_many_training_steps=150, eval_step_interval=50,
                           learning_rate=0.05, train_batch_size=32)


@pytest.fixture(scope="module")
def trained(data_dir, module_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("retrain")
    result = training.retrain(data_dir, str(work / "model"), module_dir, FAST,
                             bottleneck_dir=str(work / "cache"),
                             summaries_dir=str(work / "logs"), progress=False,
                             output_graph=str(work / "legacy" / "retrained_graph.pb"),
                             output_labels=str(work / "legacy" / "retrained_labels.txt"))
    return result, work


def test_sketches_are_seeded_and_laid_out_by_class(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for folder in (a, b):
        make_demo_data.make_dataset(folder, make_demo_data.DataParams(
            shapes=("star", "heart"), per_class=3, size=48, seed=9), progress=False)
    assert sorted(os.listdir(a)) == ["heart", "star"]
    first = open(os.path.join(a, "star", "star_00001.png"), "rb").read()
    assert first == open(os.path.join(b, "star", "star_00001.png"), "rb").read()


def test_feature_module_has_the_tf_hub_form(module_dir):
    module = training.load_module(module_dir, progress=False)  # hub.load's equivalent
    out = module(np.zeros((2, 32, 32, 3), np.float32)).numpy()
    assert out.shape == (2, 32)
    assert training.module_input_size(module, module_dir) == (32, 32)


def test_split_is_stable_when_images_are_added():
    names = [f"img_{i}.jpg" for i in range(300)]
    before = {n: training.which_set(n, 10, 10) for n in names}
    after = {n: training.which_set(n, 10, 10) for n in names + [f"new_{i}.jpg" for i in range(50)]}
    assert all(after[n] == before[n] for n in names)
    counts = {s: list(before.values()).count(s) for s in ("training", "validation", "testing")}
    assert 10 < counts["validation"] < 55 and 10 < counts["testing"] < 55
    assert (training.which_set("a_nohash_1.jpg", 10, 10)
            == training.which_set("a_nohash_2.jpg", 10, 10))


def test_retrain_writes_the_model_folder(trained):
    result, _ = trained
    folder = result.output_dir
    for name in ("saved_model.pb", "labels.txt", "model.json", "report.json",
                 "confusion_matrix.png"):
        assert os.path.exists(os.path.join(folder, name)), name
    assert open(os.path.join(folder, "labels.txt")).read().split() == sorted(COLOURS)
    meta = json.load(open(os.path.join(folder, "model.json")))
    assert meta["input_size"] == [32, 32] and meta["version"] == "1"
    assert set(meta["metrics"]) >= {"test_accuracy", "validation_accuracy"}
    report = json.load(open(os.path.join(folder, "report.json")))
    assert set(report["per_class"]) == set(COLOURS)
    assert all(set(v) == {"precision", "recall", "f1", "support"}
               for v in report["per_class"].values())
    matrix = np.array(report["confusion_matrix"]["rows_true_columns_predicted"])
    assert matrix.shape == (3, 3) and matrix.sum() == report["test_images"] > 0
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-4)
    assert len(report["misclassified"]) == matrix.sum() - np.trace(matrix)
    assert report["accuracy"] == 1.0  # colours are easy even for a barely trained module


def test_exported_model_reloads_and_agrees_with_the_report(trained, data_dir):
    result, _ = trained
    clf = load_classifier(result.output_dir)
    clf.warm_up()
    assert clf.labels == sorted(COLOURS)
    lists = training.create_image_lists(data_dir)
    wrong = 0
    for path, truth in lists.paths("testing"):
        array, _ = load_for_model(open(os.path.join(data_dir, path), "rb").read(),
                                  clf.input_size)
        wrong += int(np.argmax(clf.predict(array[None])[0]) != truth)
    assert wrong == len(result.report["misclassified"])


def test_second_run_uses_the_cache(trained, data_dir, module_dir):
    first, work = trained
    assert first.feature_stats.computed == 90 and first.feature_stats.cached == 0
    second = training.retrain(data_dir, str(work / "model2"), module_dir, FAST,
                             bottleneck_dir=str(work / "cache"), progress=False)
    assert second.feature_stats.computed == 0 and second.feature_stats.cached == 90


def test_summaries_are_written(trained):
    _, work = trained
    assert any(f.startswith("events.out.tfevents")
               for _, _, files in os.walk(work / "logs") for f in files)


def test_unreadable_images_are_skipped_and_counted(data_dir, module_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "red" / "broken.png").write_bytes(b"not really a png")
    result = training.retrain(str(data), str(tmp_path / "m"), module_dir,
                             training.TrainParams(how_many_training_steps=5), progress=False,
                             bottleneck_dir=None)
    assert result.report["skipped_images"] == [os.path.join("red", "broken.png")]
    assert os.path.exists(tmp_path / "m" / "saved_model.pb")


@pytest.fixture(scope="module")
def extracted(data_dir, module_dir):
    """(module, image lists, input size, features) of the tiny data set, without a cache."""
    module = training.load_module(module_dir)
    lists = training.create_image_lists(data_dir)
    size = training.module_input_size(module, module_dir)
    features, _ = training.compute_features(module, lists, size, None, progress=False)
    return module, lists, size, features


AUGMENT = dict(flip_left_right=True, random_crop=10, random_scale=10, random_brightness=10)


class CountingModule:
    """A feature module that records every batch it is called on."""

    def __init__(self, module):
        self.module, self.batches = module, []

    def __call__(self, images):
        self.batches.append(np.asarray(images))
        return self.module(images)


def training_images(lists, size) -> np.ndarray:
    return np.stack([load_for_model(open(os.path.join(lists.image_dir, p), "rb").read(),
                                    size)[0] for p, _ in lists.paths("training")])


def test_distort_changes_pixels_but_not_shape_or_range(extracted):
    _, lists, size, _ = extracted
    images = training_images(lists, size)[:6]
    params = training.TrainParams(**AUGMENT)
    out = training.distort(images, params, np.random.default_rng(1)).numpy()
    assert out.shape == images.shape == (6, *size, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out - images).max(axis=(1, 2, 3)).min() > 0.01  # every image changed
    again = training.distort(images, params, np.random.default_rng(1)).numpy()
    assert np.array_equal(out, again)  # seeded
    unchanged = training.distort(images, training.TrainParams(), np.random.default_rng(1))
    assert np.allclose(unchanged.numpy(), images)  # no augmentation asked: the images as given


def test_augmentation_runs_the_module_on_distorted_images_at_every_step(extracted):
    module, lists, size, features = extracted
    originals = training_images(lists, size)
    steps, batch = 3, 4
    runs = {}
    for augment in (False, True):
        params = training.TrainParams(how_many_training_steps=steps, train_batch_size=batch,
                                      **(AUGMENT if augment else {}))
        counting = CountingModule(module)
        weights, biases, _ = training.train_head(counting, lists, features, size, params,
                                                 progress=False)
        runs[augment] = (counting.batches, weights.numpy(), biases.numpy())
    assert runs[False][0] == []  # without augmentation: cached features only
    calls = runs[True][0]
    assert len(calls) == steps
    for images in calls:
        assert images.shape == (batch, *size, 3) and images.min() >= 0 and images.max() <= 1
        distance = np.abs(images[:, None] - originals[None]).max(axis=(2, 3, 4))  # [batch, N]
        assert distance.min() > 0.01  # none of them is an undistorted training image
    assert not np.allclose(runs[True][1], runs[False][1])  # same seed, other training


def test_training_is_seeded(extracted):
    module, lists, size, features = extracted
    params = training.TrainParams(how_many_training_steps=3, train_batch_size=4)
    first, second = (training.train_head(module, lists, features, size, params,
                                         progress=False)[0].numpy() for _ in range(2))
    assert np.array_equal(first, second)


def test_training_features_are_the_served_preprocessing(extracted):
    """retrain's features come from the bytes exactly as the server preprocesses them."""
    module, lists, size, features = extracted
    for rel in ("blue/blue_001.png", "blue/blue_002.jpg"):
        array, _ = load_for_model(open(os.path.join(lists.image_dir, rel), "rb").read(), size)
        np.testing.assert_allclose(module(array[None]).numpy()[0], features[rel], atol=1e-5)


def test_accuracy_gate_refuses_export(data_dir, module_dir, tmp_path):
    params = training.TrainParams(how_many_training_steps=1, min_test_accuracy=1.01)
    with pytest.raises(training.RetrainError, match="not exported"):
        training.retrain(data_dir, str(tmp_path / "m"), module_dir, params, progress=False,
                        bottleneck_dir=None)
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("layout,message", [
    ("missing", "not found"), ("one_class", "at least 2"), ("too_few", "at least 3"),
])
def test_clear_errors_for_bad_folders(tmp_path, layout, message):
    root = tmp_path / "images"
    if layout != "missing":
        root.mkdir()
        make_demo_data.make_dataset(str(root), make_demo_data.DataParams(
            shapes=("star",), per_class=5, size=32), progress=False)
    if layout == "too_few":
        (root / "heart").mkdir()
        for i in range(2):
            shutil.copy(root / "star" / f"star_{i:05d}.png", root / "heart" / f"h{i}.png")
    with pytest.raises(training.RetrainError, match=message):
        training.create_image_lists(str(root))


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    code = retrain.main(["--image_dir", str(tmp_path / "none"), "--output_dir",
                         str(tmp_path / "m"), "--tfhub_module", "unused", "--quiet"])
    assert code == 2 and "image folder not found" in capsys.readouterr().err


def test_label_image_prints_ranked_lines(trained, data_dir, capsys):
    result, _ = trained
    image = os.path.join(data_dir, "green", "green_003.png")
    assert label_image.main(["--model", result.output_dir, "--image", image,
                             "--top_k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    labels = [line.split()[0] for line in lines]
    scores = [float(line.split()[1]) for line in lines]
    assert labels[0] == "green" and scores == sorted(scores, reverse=True)


def test_label_image_json_for_a_folder(trained, data_dir, capsys):
    result, _ = trained
    assert label_image.main(["--model", result.output_dir, "--image",
                             os.path.join(data_dir, "red"), "--json", "--top_k", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 30 and all(r["predictions"][0]["label"] == "red" for r in out)


def test_label_image_matches_the_server_path(trained, data_dir, capsys):
    """label_image and the server share loader, preprocessing and postprocessing: same JSON."""
    result, _ = trained
    path = os.path.join(data_dir, "blue", "blue_002.jpg")
    assert label_image.main(["--model", result.output_dir, "--image", path, "--json"]) == 0
    labelled = json.loads(capsys.readouterr().out)
    clf = load_classifier(result.output_dir)
    array, _ = load_for_model(open(path, "rb").read(), clf.input_size)
    assert labelled["predictions"] == clf.postprocess(clf.predict(array[None])[0])


def test_legacy_graph_from_retrain_and_label_image(trained, data_dir, capsys):
    _, work = trained
    graph = str(work / "legacy" / "retrained_graph.pb")
    labels = str(work / "legacy" / "retrained_labels.txt")
    image = os.path.join(data_dir, "blue", "blue_001.png")
    assert label_image.main(["--graph", graph, "--labels", labels, "--image", image,
                             "--json"]) == 0
    legacy = json.loads(capsys.readouterr().out)
    assert label_image.main(["--model", str(work / "model"), "--image", image, "--json"]) == 0
    modern = json.loads(capsys.readouterr().out)
    assert ([p["label"] for p in legacy["predictions"]]
            == [p["label"] for p in modern["predictions"]])
    for a, b in zip(legacy["predictions"], modern["predictions"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_label_image_with_a_hand_built_frozen_graph(tmp_path, capsys):
    """The legacy flags reach the graph: its own tensor names, and pixels in [0, 255]."""
    graph = save_colour_frozen_graph(str(tmp_path / "g.pb"), input_name="pixels",
                                     output_name="scores", scale=255.0)
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    from PIL import Image
    Image.new("RGB", (50, 50), (0, 0, 230)).save(tmp_path / "blue.png")
    assert label_image.main(["--graph", graph, "--labels", str(tmp_path / "labels.txt"),
                             "--input_layer", "pixels", "--output_layer", "scores",
                             "--input_mean", "0", "--input_std", "1",
                             "--image", str(tmp_path / "blue.png"), "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert predictions[0]["label"] == "blue" and predictions[0]["score"] > 0.99


def test_the_committed_demo_model_is_good(tmp_path, capsys):
    """tf_files/demo: labels, report, and >= 90% on fresh sketches it never saw."""
    meta = json.load(open(os.path.join(DEMO, "model.json")))
    assert meta["metrics"]["test_accuracy"] >= 0.95
    assert os.path.exists(os.path.join(DEMO, "confusion_matrix.png"))
    assert load_classifier(DEMO).labels == sorted(make_demo_data.DEMO_SHAPES)
    make_demo_data.make_dataset(str(tmp_path), make_demo_data.DataParams(per_class=10, seed=1234),
                                progress=False)
    assert label_image.main(["--model", DEMO, "--image", str(tmp_path), "--json",
                             "--top_k", "1"]) == 0
    results = json.loads(capsys.readouterr().out)
    right = sum(r["predictions"][0]["label"] == os.path.basename(os.path.dirname(r["image"]))
                for r in results)
    assert len(results) == 10 * len(make_demo_data.DEMO_SHAPES) and right / len(results) >= 0.9


def test_retrain_publishes_new_versions_into_a_repository(data_dir, module_dir, tmp_path):
    """--repository/--name: each run is the next numbered version, renamed into place; a
    folder already there (maybe live) is never touched, and nothing half-built is left."""
    repo = tmp_path / "repo"
    (repo / "colours" / "1").mkdir(parents=True)  # someone else's version 1: left alone
    (repo / "colours" / "1" / "keep.txt").write_text("live")
    argv = ["--image-dir", data_dir, "--tfhub_module", module_dir, "--repository", str(repo),
            "--name", "colours", "--how_many_training_steps", "20", "--no_export", "--quiet",
            "--bottleneck_dir", str(tmp_path / "cache"), "--runs_log", ""]
    assert retrain.main(argv) == 0
    assert retrain.main(argv) == 0
    assert sorted(os.listdir(repo / "colours")) == ["1", "2", "3"]  # no .incoming-* left
    assert os.listdir(repo / "colours" / "1") == ["keep.txt"]
    for version in ("2", "3"):
        meta = ModelFolder(str(repo / "colours" / version)).read_metadata()
        assert meta["name"] == "colours" and meta["version"] == version
