"""A SavedModel whose signature takes encoded images (a ``tf.string`` input of JPEG/PNG bytes,
decoded in its graph, as TF Hub, TF Serving and AutoML image exports often are): imported with
scripts/import_model.py, served by the real server on every path (our API, both protocols over
HTTP and gRPC, label_image.py), each answer compared with the SavedModel's own outputs for the
same bytes, computed here by calling the loaded SavedModel directly. Bad bytes get the same
4xx as for any model and never reach the model; a pixel tensor gets a clean 400."""
from __future__ import annotations

import base64
import io
import json

import grpc
import imagegen as ig
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import assert_envelope, post_image, start_server
from PIL import Image

from common.inference.loader import load_classifier
from scripts.importing import CannotImport, import_model
from scripts.label_image import label_images
from scripts.liveserver import free_port

LABELS = ["red", "green", "blue"]
NAME = "bytesmodel"
TOLERANCE = 1e-5


class _Decoding(tf.Module):
    """Decodes each encoded image (tf.io.decode_image), resizes it to 32x32 and softmaxes
    ``gain`` times its channel means: a red picture scores "red" highest."""

    def __init__(self):
        super().__init__()
        self.gain = tf.Variable(20.0)

    def scores(self, encoded):
        """A scalar string (one encoded image) -> float32 ``[3]`` probabilities."""
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        pixels = tf.image.resize(tf.cast(image, tf.float32) / 255.0, [32, 32])
        return tf.nn.softmax(self.gain * tf.reduce_mean(pixels, axis=[0, 1]))


def save_decoding_model(path: str, scalar: bool = False) -> str:
    """The SavedModel: ``image_bytes`` tf.string ``[None]`` -> ``probabilities`` ``[None, 3]``
    (``scalar``: ``encoded`` tf.string ``[]`` -> ``[3]``, one image a call)."""
    model = _Decoding()
    if scalar:
        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="encoded")])
        def serve(encoded):
            return {"probabilities": model.scores(encoded)}
    else:
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(image_bytes):
            return {"probabilities": tf.map_fn(model.scores, image_bytes,
                                               fn_output_signature=tf.float32)}
    model.serve = serve
    tf.saved_model.save(model, path, signatures={"serving_default": serve})
    return path


def own_scores(saved_model, images: list[bytes]) -> np.ndarray:
    """The SavedModel's own outputs float32 ``[n, 3]`` for these bytes, as TF Serving runs it."""
    fn = saved_model.signatures["serving_default"]
    return fn(image_bytes=tf.constant(images, tf.string))["probabilities"].numpy()


def png_of(data: bytes) -> bytes:
    """What the service feeds the model for a format TensorFlow does not decode: a PNG of the
    decoded RGB image."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


RED_PNG, BLUE_PNG = ig.png(ig.RED), ig.png(ig.BLUE)
GREEN_JPEG = ig.jpeg(ig.GREEN)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(the import's result, the source SavedModel loaded in this process)."""
    work = tmp_path_factory.mktemp("string_input")
    source = save_decoding_model(str(work / "source"))
    result = import_model(source, output_dir=str(work / NAME), labels=LABELS)
    return result, tf.saved_model.load(source)


@pytest.fixture(scope="module")
def server(imported, tmp_path_factory):
    work = tmp_path_factory.mktemp("string_server")
    grpc_port = free_port()
    live = start_server(work, {"MODEL_PATH": imported[0].folder, "WORKERS": "1",
                               "GRPC_PORT": str(grpc_port)})
    live.grpc_address = f"127.0.0.1:{grpc_port}"
    yield live
    live.stop()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def by_label(predictions: list[dict]) -> np.ndarray:
    scores = {p["label"]: p["score"] for p in predictions}
    return np.array([scores[label] for label in LABELS], np.float32)


def model_calls(server) -> int:
    """Images this (single) worker has run through the model (the statistics extension)."""
    stats = requests.get(f"{server.url}/v2/models/{NAME}/stats", timeout=10).json()
    return sum(entry["inference_count"] for entry in stats["model_stats"])


# -- the import ------------------------------------------------------------------------------
def test_import_records_that_the_model_takes_encoded_images(imported):
    result, _ = imported
    meta = json.load(open(f"{result.folder}/model.json"))
    assert meta["preprocessing"]["dtype"] == "string"
    assert meta["signature"]["input"] == "image_bytes"
    assert meta["import"]["found"]["inputs"] == [
        {"name": "image_bytes", "shape": [None], "dtype": "string"}]
    assert any("encoded images" in sentence for sentence in meta["import"]["assumed"])
    assert result.check["top"]["label"] in LABELS


def test_a_scalar_string_signature_is_served_one_image_a_call(tmp_path, imported):
    source = save_decoding_model(str(tmp_path / "scalar"), scalar=True)
    result = import_model(source, output_dir=str(tmp_path / "out"), labels=LABELS)
    clf = load_classifier(result.folder)
    clf.warm_up((1, 2))
    batch = np.stack([clf.preprocess(data)[0] for data in (RED_PNG, GREEN_JPEG)])
    assert batch.shape == (2,) and batch.dtype == object
    np.testing.assert_allclose(clf.predict(batch), own_scores(imported[1], [RED_PNG, GREEN_JPEG]),
                               atol=TOLERANCE)


def test_pixel_settings_for_an_encoded_input_are_refused(tmp_path, imported):
    source = save_decoding_model(str(tmp_path / "source"))
    with pytest.raises(CannotImport, match="decodes them itself: mean"):
        import_model(source, output_dir=str(tmp_path / "out"), labels=LABELS,
                     settings={"mean": (0.5, 0.5, 0.5)})
    assert not (tmp_path / "out").exists()


def test_label_image_reads_the_folder(tmp_path, imported):
    result, saved = imported
    (tmp_path / "red.png").write_bytes(RED_PNG)
    (tmp_path / "green.jpg").write_bytes(GREEN_JPEG)
    clf = load_classifier(result.folder)
    answers = label_images(clf, [str(tmp_path / "red.png"), str(tmp_path / "green.jpg")])
    assert [a["predictions"][0]["label"] for a in answers] == ["red", "green"]
    np.testing.assert_allclose([by_label(a["predictions"]) for a in answers],
                               own_scores(saved, [RED_PNG, GREEN_JPEG]), atol=TOLERANCE)


# -- serving ---------------------------------------------------------------------------------
@pytest.mark.server
def test_classify_answers_what_the_model_itself_answers(server, imported):
    saved = imported[1]
    webp = ig.webp(ig.BLUE)  # not a format TensorFlow decodes: fed as a PNG of its pixels
    for data, fed, top in ((RED_PNG, RED_PNG, "red"), (BLUE_PNG, BLUE_PNG, "blue"),
                           (GREEN_JPEG, GREEN_JPEG, "green"), (webp, png_of(webp), "blue")):
        r = post_image(server, data)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == top
        np.testing.assert_allclose(by_label(r.json()["predictions"]),
                                   own_scores(saved, [fed])[0], atol=TOLERANCE)


@pytest.mark.server
def test_both_protocols_take_the_bytes_and_agree(server, imported):
    expected = own_scores(imported[1], [RED_PNG, BLUE_PNG])
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                        "data": [b64(RED_PNG), b64(BLUE_PNG)]}]}
    r = requests.post(f"{server.url}/v2/models/{NAME}/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    np.testing.assert_allclose(np.reshape(output["data"], output["shape"]), expected,
                               atol=TOLERANCE)
    r = requests.post(f"{server.url}/v1/models/{NAME}:predict", timeout=30,
                      json={"instances": [{"b64": b64(RED_PNG)}, {"b64": b64(BLUE_PNG)}]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], expected, atol=TOLERANCE)


@pytest.mark.server
def test_a_pixel_tensor_is_a_clean_400(server):
    tensor = np.zeros((1, 32, 32, 3)).tolist()
    r = requests.post(f"{server.url}/v2/models/{NAME}/infer", timeout=30, json={
        "inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": [1, 32, 32, 3],
                    "data": tensor}]})
    assert r.status_code == 400 and "takes encoded images" in r.json()["error"], r.text
    r = requests.post(f"{server.url}/v1/models/{NAME}:predict", json={"instances": tensor},
                      timeout=30)
    assert r.status_code == 400 and "takes encoded images" in r.json()["error"], r.text


@pytest.mark.server
def test_bad_bytes_get_the_usual_4xx_and_never_reach_the_model(server):
    before = model_calls(server)
    bomb = ig.png_claiming(100_000, 100_000)
    assert_envelope(post_image(server, bomb), 413)
    assert_envelope(post_image(server, b"not an image at all"), 415)
    r = requests.post(f"{server.url}/v2/models/{NAME}/infer", timeout=30, json={
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                    "data": [b64(bomb)]}]})
    assert r.status_code == 413, r.text
    r = requests.post(f"{server.url}/v1/models/{NAME}:predict", timeout=30,
                      json={"instances": [{"b64": b64(b"GIF89a but no image")}]})
    assert r.status_code in (415, 422), r.text
    assert model_calls(server) == before
    assert post_image(server, RED_PNG).status_code == 200
    assert model_calls(server) == before + 1  # the count would have seen them


@pytest.mark.server
def test_metadata_lists_only_the_bytes_input(server):
    v2 = requests.get(f"{server.url}/v2/models/{NAME}", timeout=10).json()
    assert [(i["name"], i["datatype"], i["shape"]) for i in v2["inputs"]] == [
        ("image_bytes", "BYTES", [-1])]
    config = requests.get(f"{server.url}/v2/models/{NAME}/config", timeout=10).json()
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("image_bytes", "TYPE_STRING", [1])]
    v1 = requests.get(f"{server.url}/v1/models/{NAME}/metadata", timeout=10).json()
    inputs = v1["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert list(inputs) == ["image_bytes"] and inputs["image_bytes"]["dtype"] == "DT_STRING"
    model = requests.get(f"{server.url}/model", timeout=10).json()
    assert model["input"]["dtype"] == "string" and model["preprocessing"]["dtype"] == "string"


@pytest.mark.server
def test_grpc_bytes_and_strings_agree(server, imported):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    from tritonclient.grpc import InferenceServerClient, InferenceServerException, InferInput

    expected = own_scores(imported[1], [RED_PNG, BLUE_PNG])
    client = InferenceServerClient(server.grpc_address)
    try:
        metadata = client.get_model_metadata(NAME)
        assert [(i.name, i.datatype) for i in metadata.inputs] == [("image_bytes", "BYTES")]
        given = InferInput("image_bytes", [2], "BYTES")
        given.set_data_from_numpy(np.array([RED_PNG, BLUE_PNG], dtype=np.object_))
        scores = client.infer(NAME, [given]).as_numpy("probabilities")
        np.testing.assert_allclose(scores, expected, atol=TOLERANCE)
        pixels = InferInput("image_bytes", [1, 32, 32, 3], "FP32")
        pixels.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.float32))
        with pytest.raises(InferenceServerException, match="takes encoded images"):
            client.infer(NAME, [pixels])
    finally:
        client.close()
    with grpc.insecure_channel(server.grpc_address) as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = NAME
        request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([RED_PNG, BLUE_PNG]))
        answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=60)
    np.testing.assert_allclose(tf.make_ndarray(answer.outputs["probabilities"]), expected,
                               atol=TOLERANCE)
