"""Fixtures: a tiny real SavedModel, the app built around it, and the real gunicorn server."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from hypothesis import settings  # noqa: E402

from scripts.liveserver import LiveServer  # noqa: E402,F401 (re-exported to the tests)
from tiny_models import save_colour_model  # noqa: E402


# Fuzzing profiles: `make test` runs a fixed sample (same examples every run, nothing stored);
# `make test-long` sets HYPOTHESIS_PROFILE=long for many fresh examples.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("long", max_examples=5000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def colour_model_dir(tmp_path_factory) -> str:
    return save_colour_model(str(tmp_path_factory.mktemp("models") / "colours"))


@pytest.fixture(scope="session")
def classifier(colour_model_dir):
    from common.classifier import load_classifier
    clf = load_classifier(colour_model_dir)
    clf.warm_up()
    return clf


@pytest.fixture
def temp_dir(tmp_path) -> str:
    return str(tmp_path / "temp")


@pytest.fixture
def app(classifier, temp_dir):
    from app import create_app
    return create_app({"temp_dir": temp_dir, "url_allow_hosts": ("127.0.0.1",)},
                      classifier=classifier)


@pytest.fixture
def client(app):
    return app.test_client()


def start_server(work, env: dict, name: str = "server") -> LiveServer:
    """Start the real server with ``env``, its TEMP_DIR (``server.temp_dir``) and log under the
    folder ``work``; returns once it is ready."""
    server = LiveServer({"TEMP_DIR": str(work / "temp"), **env})
    server.temp_dir = str(work / "temp")
    return server.start(str(work / f"{name}.log"))


@pytest.fixture(scope="session")
def live_server(colour_model_dir, tmp_path_factory):
    """The real server, as the Dockerfile runs it, serving the colour model."""
    server = start_server(tmp_path_factory.mktemp("live"), {
        "MODEL_PATH": colour_model_dir,
        "URL_ALLOW_HOSTS": "127.0.0.1",
        "WORKERS": "2",
        "THREADS": "8",
        "MAX_UPLOAD_MB": "2",
    })
    yield server
    server.stop()
