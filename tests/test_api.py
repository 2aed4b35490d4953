"""The routes in-process (Flask test client): parameters, sources, readiness, request ids."""
import io
import os

import pytest

import imagegen as ig
from app import create_app
from common.classifier import Classifier, load_classifier


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
    assert os.listdir(temp_dir) == [body["filename"]]
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
    assert client.get("/healthz", headers={"X-Request-ID": "abc-1"}).headers["X-Request-ID"] == "abc-1"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id!"}).headers["X-Request-ID"]
    assert len(made) == 32 and made.isalnum()


def test_not_ready_until_loaded(colour_model_dir, tmp_path):
    app = create_app({"temp_dir": str(tmp_path), "model_path": colour_model_dir})
    client = app.test_client()
    holder = app.extensions["classifier_service"].holder
    assert client.get("/healthz").status_code == 200
    if holder.state == "loading":  # usually still loading here; never a 500 either way
        first = client.get("/readyz")
        assert first.status_code in (200, 503)
    assert holder.wait(60)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["model"]["name"] == "colours"


def test_classify_while_loading_is_503_with_retry_after(tmp_path):
    slow = Classifier(predict_fn=lambda x: [[1.0]] * len(x), labels=["a"], input_size=(1, 1))
    app = create_app({"temp_dir": str(tmp_path)}, classifier=slow)
    app.extensions["classifier_service"].holder.state = "loading"
    response = upload(app.test_client(), ig.jpeg())
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert app.test_client().get("/readyz").status_code == 503


def test_failed_load_is_reported_on_readyz(tmp_path):
    app = create_app({"temp_dir": str(tmp_path), "model_path": str(tmp_path / "none"),
                      "exit_on_load_failure": False})
    holder = app.extensions["classifier_service"].holder
    assert not holder.wait(60)
    body = app.test_client().get("/readyz").get_json()
    assert "failed to load" in body["error"]["message"]


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
    demo = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tf_files", "demo")
    app = create_app({"temp_dir": str(tmp_path)}, classifier=load_classifier(demo))
    client = app.test_client()
    evaluation = client.get("/model").get_json()["evaluation"]
    assert evaluation["accuracy"] >= 0.95 and evaluation["confusion_matrix_png"]
    png = client.get("/model/confusion_matrix.png")
    assert png.status_code == 200 and png.data.startswith(b"\x89PNG")
