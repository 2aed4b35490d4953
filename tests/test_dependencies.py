"""The environment we made: one TensorFlow distribution, no file owned twice, `pip check` clean.

The same check runs inside the Docker image (tests/test_docker.py). Why it matters: see
scripts/check_environment.py and requirements.txt.
"""
import os
import re
import subprocess
import sys

from helpers import ROOT

from scripts import check_environment

SERVING = os.path.join(ROOT, "requirements.txt")


def requirement_names(path: str) -> set[str]:
    """Names pinned in a requirements file and the files it includes with ``-r``."""
    names = set()
    for line in open(path):
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(os.path.join(os.path.dirname(path), line[3:].strip()))
        elif line:
            names.add(re.split(r"[=<>!~\[; ]", line)[0].lower().replace("_", "-"))
    return names


def test_exactly_one_distribution_owns_tensorflow():
    assert check_environment.package_owners("tensorflow") == ["tensorflow_cpu"]


def test_no_file_is_installed_by_two_distributions():
    assert check_environment.check()["shared"] == {}


def test_pip_check_is_clean():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_serving_requirements_bring_neither_tf_hub_nor_a_second_tensorflow():
    names = requirement_names(SERVING)
    assert "tensorflow-cpu" in names
    assert not names & {"tensorflow", "tensorflow-hub", "tf-keras", "tensorboard", "tqdm",
                        "pytest"}
    for other in ("requirements-train.txt", "requirements-dev.txt"):
        assert not requirement_names(os.path.join(ROOT, other)) & {
            "tensorflow", "tensorflow-hub", "tf-keras"}, other
