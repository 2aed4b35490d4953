"""Training runs you can compare: two tiny retrain.py runs, their records, compare_runs.py.

The runs go through retrain.py's main (flags as a person types them) on noisy colour pictures
with a tiny feature module of our own, in a temp folder.
"""
import json
import os
import shutil

import imagegen as ig
import numpy as np
import pytest

from scripts import compare_runs, make_feature_module, retrain, training

COLOURS = {"blue": ig.BLUE, "green": ig.GREEN, "red": ig.RED}


def write_colours(folder, seed: int, per_class: int = 20):
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        os.makedirs(folder / name, exist_ok=True)
        for i in range(per_class):
            ig.noisy(colour, (36, 36), seed=int(rng.integers(1 << 30)), amount=60).save(
                folder / name / f"{name}_{i:03d}.png")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run A (learning rate 0.05) and run B (0.01, one picture redrawn under the same name)."""
    root = tmp_path_factory.mktemp("runs")
    write_colours(root / "data_a", seed=1)
    shutil.copytree(root / "data_a", root / "data_b")
    write_colours(root / "redraw", seed=2, per_class=1)
    shutil.copy(root / "redraw" / "red" / "red_000.png", root / "data_b" / "red" / "red_000.png")
    params = make_feature_module.ModuleParams(input_size=16, channels=(4, 8), epochs=1,
                                              images_per_class=4, shapes=("circle", "cross"))
    module, metrics = make_feature_module.train_module(params, progress=False)
    module_dir = make_feature_module.save_module(module, str(root / "module"), params, metrics)
    common = ["--tfhub-module", module_dir, "--how-many-training-steps", "60",
              "--eval-step-interval", "20", "--bottleneck-dir", "", "--quiet"]
    assert retrain.main(["--image-dir", str(root / "data_a"), "--output-dir",
                         str(root / "models" / "a"), "--learning-rate", "0.05",
                         "--summaries-dir", str(root / "logs" / "a"), *common]) == 0
    assert retrain.main(["--image_dir", str(root / "data_b"), "--output_dir",
                         str(root / "models" / "b"), "--learning_rate", "0.01",
                         "--runs_log", str(root / "models" / "runs.jsonl"), *common]) == 0
    return root, module_dir


def model_json(folder) -> dict:
    return json.load(open(os.path.join(folder, "model.json")))


def test_each_run_records_what_made_it(two_runs):
    root, module_dir = two_runs
    run = model_json(root / "models" / "a")["run"]
    assert run["module"] == module_dir
    assert run["flags"]["learning_rate"] == 0.05 and run["flags"]["how_many_training_steps"] == 60
    assert "quiet" not in run["flags"]  # how it printed is not what it trained
    assert run["data"]["images"] == 60
    splits = run["data"]["splits"]
    assert set(splits) == set(COLOURS)
    assert all(sum(s.values()) == 20 and s["training"] > 0 for s in splits.values())
    assert run["seconds"] > 0
    metrics = run["metrics"]
    assert metrics["test_accuracy"] == model_json(root / "models" / "a")["metrics"][
        "test_accuracy"]
    assert set(metrics["per_class"]) == set(COLOURS)
    assert all(0 <= v["f1"] <= 1 for v in metrics["per_class"].values())


def test_fingerprints_tell_the_image_list_from_its_contents(two_runs):
    root, _ = two_runs
    a, b = (model_json(root / "models" / x)["run"]["data"] for x in "ab")
    assert a["image_list_sha256"] == b["image_list_sha256"]  # same names
    assert a["contents_sha256"] != b["contents_sha256"]  # one picture redrawn
    again = training.data_record(training.create_image_lists(str(root / "data_a")), [])
    assert again["contents_sha256"] == a["contents_sha256"]  # stable over time


def test_both_runs_land_in_one_runs_log_beside_the_output_folders(two_runs):
    root, _ = two_runs
    runs = training.read_runs(str(root / "models" / "runs.jsonl"))  # A's default place
    assert [r["id"] for r in runs] == [model_json(root / "models" / x)["run"]["id"] for x in "ab"]
    assert runs[0] == model_json(root / "models" / "a")["run"]


def test_compare_runs_prints_them_side_by_side(two_runs, capsys):
    root, _ = two_runs
    log = str(root / "models" / "runs.jsonl")
    assert compare_runs.main(["--runs-log", log]) == 0
    out = capsys.readouterr().out
    lines = {line[2:].split("  ")[0]: line for line in out.splitlines()
             if line[:1] in ("*", " ") and line.strip()}  # row name -> its line
    assert lines["learning_rate"].split() == ["*", "learning_rate", "0.05", "0.01"]
    assert lines["image list"].startswith("  ")  # same names: no star
    assert lines["contents"].startswith("*")
    flags = [name for section, name, _ in compare_runs.compare(compare_runs.find_runs([], log))
             if section == "flags"]
    assert flags == ["image_dir", "learning_rate"]  # where each run wrote is not compared
    assert "F1 per class:" in out and all(colour in lines for colour in COLOURS)
    accuracies = [model_json(root / "models" / x)["metrics"]["test_accuracy"] for x in "ab"]
    assert lines["test_accuracy"].split()[-2:] == [compare_runs._cell(a) for a in accuracies]
    by_folder = compare_runs.compare(compare_runs.find_runs(
        [str(root / "models" / "a"), str(root / "models" / "b")]))
    assert by_folder == compare_runs.compare(compare_runs.find_runs([], log))
    assert compare_runs.find_runs(["-1"], log)[0]["id"] == model_json(root / "models" / "b")[
        "run"]["id"]


def test_compare_runs_says_what_is_missing(tmp_path, capsys):
    assert compare_runs.main(["--runs_log", str(tmp_path / "none.jsonl")]) == 2
    assert "no runs log" in capsys.readouterr().err
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": "x"}) + "\n")
    assert compare_runs.main(["--runs_log", str(tmp_path / "one.jsonl")]) == 2
    assert "give at least two" in capsys.readouterr().err


def test_tensorboard_gets_the_hyper_parameters(two_runs):
    import tensorflow as tf
    root, _ = two_runs
    logs = root / "logs" / "a"
    events = [logs / f for f in os.listdir(logs) if f.startswith("events.out.tfevents")]
    hparams = {}
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    from tensorboard.plugins.hparams import plugin_data_pb2
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        hparams = {k: v for k, v in data.session_start_info.hparams.items()}
    assert hparams["learning_rate"].number_value == pytest.approx(0.05)
    assert hparams["module"].string_value.endswith("module")
    assert {"train", "validation"} <= set(os.listdir(logs))  # the accuracy metrics' groups
