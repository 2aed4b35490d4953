"""Fixtures: a tiny real SavedModel, the app built around it, and the real gunicorn server.

Shared helpers (paths, starting a server, the error envelope) are in ``helpers.py``; pytest.ini
puts the repository root and tests/ on the import path.
"""
from __future__ import annotations

import os

import pytest
from helpers import DEMO, start_server
from hypothesis import settings
from tiny_models import save_colour_model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Fuzzing profiles: `make test` runs a fixed sample (same examples every run, nothing stored);
# `make test-long` sets HYPOTHESIS_PROFILE=long for many fresh examples.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("long", max_examples=5000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


SERVER_FIXTURES = {"live_server", "demo_server"}


def pytest_collection_modifyitems(config, items):
    """Tests that use a real-server fixture are ``server`` tests (``make test-fast`` skips
    them); files that start servers themselves carry the mark in ``pytestmark``.

    ``docker`` tests (build and run the image: minutes, a Docker engine) run only when the
    marker expression names them (``make test-docker`` = ``-m docker``), never in ``make test``.
    """
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
    if "docker" not in (config.getoption("markexpr") or ""):
        docker = [item for item in items if item.get_closest_marker("docker")]
        if docker:
            config.hook.pytest_deselected(items=docker)
            items[:] = [item for item in items if not item.get_closest_marker("docker")]


@pytest.fixture(scope="session")
def colour_model_dir(tmp_path_factory) -> str:
    return save_colour_model(str(tmp_path_factory.mktemp("models") / "colours"))


@pytest.fixture(scope="session")
def classifier(colour_model_dir):
    from common.inference.loader import load_classifier
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


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """The real server with the demo model as shipped and default limits; short URL timeouts
    (no internet here)."""
    server = start_server(tmp_path_factory.mktemp("demo"), {
        "MODEL_PATH": DEMO, "WORKERS": "1", "URL_ALLOW_HOSTS": "",
        "URL_FETCH_TIMEOUT": "3", "URL_CONNECT_TIMEOUT": "1"})
    yield server
    server.stop()
