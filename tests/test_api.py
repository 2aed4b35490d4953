"""The routes in-process (Flask test client): parameters, sources, readiness, request ids."""
import io
import os
import threading

import imagegen as ig
import pytest
from helpers import DEMO, assert_envelope

from app import create_app
from common.dataplane import DataPlane
from common.inference.loader import load_classifier
from common.versions.served import State


def upload(client, data, name="photo.jpg", query="", content_type=None):
    return client.post("/classify" + query, data={"image": (io.BytesIO(data), name,
                                                            content_type)})


def test_upload_answers_the_design_shape(client, temp_dir):
    response = upload(client, ig.jpeg(ig.BLUE))
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["filename", "model", "predictions", "labels", "elapsed_ms"]
    assert body["model"] == {"name": "colours", "version": "7"}
    assert body["predictions"][0]["label"] == "blue"
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True)
    assert list(body["labels"]) == [p["label"] for p in body["predictions"]]
    assert sorted(os.listdir(temp_dir)) == [".ledger", body["filename"]]  # and its count
    assert body["filename"].endswith(".jpg") and body["elapsed_ms"] >= 0


def test_raw_body_upload(client):
    response = client.post("/classify", data=ig.png(ig.GREEN), content_type="image/png")
    assert response.get_json()["predictions"][0]["label"] == "green"


def test_wrong_name_and_content_type_do_not_matter(client):
    response = upload(client, ig.jpeg(ig.RED), name="notes.txt", content_type="text/plain")
    assert response.status_code == 200
    body = response.get_json()
    assert body["predictions"][0]["label"] == "red" and body["filename"].endswith(".jpg")


@pytest.mark.parametrize("query,count", [("?top_k=1", 1), ("?top_k=2", 2), ("?top_k=50", 3),
                                         ("?threshold=0.5", 1), ("?threshold=0", 3)])
def test_top_k_and_threshold(client, query, count):
    response = upload(client, ig.jpeg(ig.RED), query=query)
    assert len(response.get_json()["predictions"]) == count


@pytest.mark.parametrize("query", ["?top_k=0", "?top_k=-1", "?top_k=abc", "?top_k=1.5",
                                   "?threshold=2", "?threshold=-0.1", "?threshold=nan",
                                   "?threshold=x", "?top_k=", "?threshold="])
def test_bad_parameters_are_400(client, query):
    response = upload(client, ig.jpeg(), query=query)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_parameter"


def test_default_top_k_from_config(classifier, tmp_path):
    app = create_app({"temp_dir": str(tmp_path), "top_k": 1}, classifier=classifier)
    response = upload(app.test_client(), ig.jpeg())
    assert len(response.get_json()["predictions"]) == 1


def test_missing_part_and_empty_file(client):
    response = client.post("/classify", data={"other": (io.BytesIO(b"x"), "a.jpg")})
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "missing_image"
    response = upload(client, b"")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "empty_image"


def test_request_id_is_echoed_or_made(client):
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-1"}).headers["X-Request-ID"]
    assert echoed == "abc-1"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id!"}).headers["X-Request-ID"]
    assert len(made) == 32 and made.isalnum()


def gated(classifier):
    """A loader that returns ``classifier`` only once the returned event is set."""
    gate = threading.Event()

    def load():
        assert gate.wait(60), "the test never opened the gate"
        return classifier
    return load, gate


def test_not_ready_until_loaded(classifier, tmp_path):
    load, gate = gated(classifier)
    app = create_app({"temp_dir": str(tmp_path)}, classifier=load)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    assert_envelope(client.get("/readyz"), 503, "model_not_ready")
    gate.set()
    assert DataPlane.of(app).model.wait(60).state is State.READY
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["model"]["name"] == "colours"


def test_not_ready_while_sibling_workers_load(classifier, tmp_path):
    """Under gunicorn each worker's /readyz also waits for its siblings (WarmWorkers)."""
    from common.web.gunicorn_worker import WarmWorkers

    app = create_app({"temp_dir": str(tmp_path / "temp")}, classifier=classifier)
    assert DataPlane.of(app).model.wait(60).state is State.READY
    warm = WarmWorkers(str(tmp_path / "warm"), expected=2)
    DataPlane.of(app).workers_waiting = warm.waiting
    warm.mark(1)
    error = assert_envelope(app.test_client().get("/readyz"), 503, "model_not_ready")
    assert error["message"].startswith("1 of 2 workers are warm")
    warm.mark(2)
    assert app.test_client().get("/readyz").status_code == 200


def test_classify_while_loading_is_503_with_retry_after(classifier, tmp_path):
    load, gate = gated(classifier)
    app = create_app({"temp_dir": str(tmp_path / "temp")}, classifier=load)
    try:
        response = upload(app.test_client(), ig.jpeg())
        assert_envelope(response, 503, "model_not_ready")
        assert response.headers["Retry-After"].isdigit()
        assert_envelope(app.test_client().get("/model"), 503, "model_not_ready")
        assert os.listdir(tmp_path / "temp") == []  # refused before anything was stored
    finally:
        gate.set()


def test_failed_load_is_reported_on_readyz(tmp_path):
    app = create_app({"temp_dir": str(tmp_path), "model_path": str(tmp_path / "none"),
                      "exit_on_load_failure": False})
    health = DataPlane.of(app).model.wait(60)
    assert health.state is State.FAILED and "model not found" in health.reason
    error = assert_envelope(app.test_client().get("/readyz"), 503, "model_not_ready")
    assert "failed to load" in error["message"] and "model not found" in error["message"]


@pytest.mark.parametrize("case,status,code", [
    ("text", 415, "unsupported_media_type"), ("truncated", 422, "undecodable_image"),
    ("bomb", 413, "image_too_large"), ("empty", 400, "empty_image"),
    ("bad_top_k", 400, "invalid_parameter"), ("too_big", 413, "payload_too_large"),
])
def test_refused_requests_store_nothing(classifier, tmp_path, case, status, code):
    temp = tmp_path / "temp"
    app = create_app({"temp_dir": str(temp), "max_upload_mb": 1}, classifier=classifier)
    jpeg = ig.encode(ig.noisy(ig.RED, (200, 200)), "JPEG")
    data, query = {"text": (b"hello", ""), "truncated": (jpeg[:len(jpeg) // 2], ""),
                   "bomb": (ig.png_claiming(40000, 40000), ""), "empty": (b"", ""),
                   "bad_top_k": (jpeg, "?top_k=0"),
                   "too_big": (os.urandom(2 * 1024 * 1024), "")}[case]
    assert_envelope(upload(app.test_client(), data, query=query), status, code)
    assert os.listdir(temp) == []
    assert upload(app.test_client(), jpeg).status_code == 200  # the same app stores good ones
    assert sorted(os.listdir(temp))[0] == ".ledger" and len(os.listdir(temp)) == 2  # + 1 image


def test_temp_not_writable_is_503(classifier, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    app = create_app({"temp_dir": str(blocker / "temp")}, classifier=classifier)
    response = upload(app.test_client(), ig.jpeg())
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "storage_unavailable"


def test_index_page(client):
    response = client.get("/")
    assert response.status_code == 200 and b"<html" in response.data


def test_model_route_without_a_report(client):
    body = client.get("/model").get_json()
    assert body["name"] == "colours" and body["labels"] == ["red", "green", "blue"]
    assert body["evaluation"] is None
    response = client.get("/model/confusion_matrix.png")
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "not_found"


def test_model_route_with_the_demo_report(tmp_path):
    app = create_app({"temp_dir": str(tmp_path)}, classifier=load_classifier(DEMO))
    client = app.test_client()
    evaluation = client.get("/model").get_json()["evaluation"]
    assert evaluation["accuracy"] >= 0.95 and evaluation["confusion_matrix_png"]
    png = client.get("/model/confusion_matrix.png")
    assert png.status_code == 200 and png.data.startswith(b"\x89PNG")
