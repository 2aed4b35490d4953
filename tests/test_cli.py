"""scripts/cli.py: hyphenated flags, and scripts whose terminal output is ours, not TensorFlow's.

The output tests run the real commands in a fresh process, as a person would, with the user's
environment (no TF_CPP_MIN_LOG_LEVEL): TensorFlow's C++ start-up lines can only be seen there.
"""
import os
import re
import subprocess
import sys

import imagegen as ig
import pytest
from helpers import ROOT
from tiny_models import save_colour_model

from scripts import cli, label_image, make_feature_module, retrain

#: A line of TensorFlow's C++ logging (``I0000 00:00:17953.. 123 file.cc:31] ...``), absl's
#: pre-init notice, or the Python INFO line of the SavedModel export.
TENSORFLOW_CHATTER = re.compile(r"^([IWEF]\d{4} \d+:\d+:\d+\.\d+ |WARNING: All log messages "
                                r"before absl|.*contains input name\(s\)|INFO Assets written)",
                                re.M)


def run_script(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """``python scripts/<args>`` in a fresh process with the user's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_hyphenated_spellings_reach_the_underscore_flags():
    parser = cli.ArgumentParser()
    parser.add_argument("--image_dir")
    parser.add_argument("--how_many_training_steps", type=int, default=1)
    parser.add_argument("--name")
    args = parser.parse_args(["--image-dir", "photos", "--how-many=7", "--name=--image-dir"])
    assert (args.image_dir, args.how_many_training_steps) == ("photos", 7)  # abbreviation too
    assert args.name == "--image-dir"  # values are never rewritten
    assert parser.parse_args(["--image_dir", "x"]).image_dir == "x"  # the spelling --help shows
    assert parser.parse_args([]).verbose is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--image-folder", "x"])  # unknown flags are still errors
    assert parser.underscored(["--image-dir", "--", "--image-dir"]) == [
        "--image_dir", "--", "--image-dir"]


def test_every_retrain_and_label_image_flag_takes_hyphens():
    for parser in (retrain.build_parser(), label_image.build_parser()):
        for action in parser._actions:
            for option in action.option_strings:
                if "_" in option:
                    assert parser.underscored([option.replace("_", "-")]) == [option]
    args = retrain.build_parser().parse_args(["--image-dir", "d", "--tfhub-module", "m",
                                              "--output-dir", "o", "--random-crop", "5"])
    assert (args.image_dir, args.tfhub_module, args.output_dir, args.random_crop) == \
        ("d", "m", "o", 5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two colours, 12 pictures each, and a tiny feature module: a retrain in seconds."""
    root = tmp_path_factory.mktemp("cli")
    for name, colour in (("blue", ig.BLUE), ("red", ig.RED)):
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            ig.noisy(colour, (40, 40), seed=i, amount=40).save(root / "data" / name / f"{i}.png")
    params = make_feature_module.ModuleParams(input_size=16, channels=(4, 8), epochs=1,
                                              images_per_class=4, shapes=("circle", "cross"))
    module, metrics = make_feature_module.train_module(params, progress=False)
    make_feature_module.save_module(module, str(root / "module"), params, metrics)
    return root


@pytest.mark.parametrize("verbose", [False, True])
def test_retrain_shows_our_output_not_tensorflows(tiny_data, verbose):
    out = tiny_data / f"model_{verbose}"
    proc = run_script("scripts/retrain.py", "--image-dir", str(tiny_data / "data"),
                      "--tfhub-module", str(tiny_data / "module"), "--output-dir", str(out),
                      "--how-many-training-steps", "5", "--bottleneck-dir", "", "--quiet",
                      *(["--verbose"] if verbose else []))
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and os.path.exists(out / "saved_model.pb")
    chatter = TENSORFLOW_CHATTER.findall(proc.stdout + proc.stderr)
    if verbose:
        assert chatter  # what the quiet run hides is there to hide
    else:
        assert not chatter, proc.stderr


def test_label_image_prints_only_the_labels(tmp_path):
    model = save_colour_model(str(tmp_path / "colours"))
    ig.solid(ig.GREEN, (30, 30)).save(tmp_path / "green.png")
    proc = run_script("scripts/label_image.py", "--model", model, "--image",
                      str(tmp_path / "green.png"), "--top-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "green"
    assert proc.stderr == ""  # nothing else: no TensorFlow start-up lines, no INFO lines


def test_errors_that_matter_still_reach_the_terminal(tmp_path):
    proc = run_script("scripts/label_image.py", "--model", str(tmp_path / "missing"),
                      "--image", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "model not found" in proc.stderr
