"""The standard protocols: TensorFlow Serving's REST API (/v1) and the Open Inference Protocol
(KServe v2, /v2) with Triton's binary data and classification extensions.

Server tests run the real gunicorn server on a repository (colours/1 labels red/green/blue,
colours/2 the same with a "2" suffix, labels stable=1 and canary=2) and check that what TF
Serving-shaped bodies (from its api_rest.md) and tritonclient (Triton's own client, from PyPI;
binary and JSON) get back are the scores ``/classify`` gives for the same images. The
in-process tests check each protocol's parsing and errors."""
import base64
import json
import shutil

import imagegen as ig
import numpy as np
import pytest
import requests
from helpers import start_server
from tiny_models import save_colour_model

from common.inference.images import load_for_model

#: Mixed colours, so every label gets a score well above zero (the colour model softmaxes the
#: mean of each channel): the comparisons below are not all "1.0 vs 1.0".
COLOURS = [(150, 110, 90), (90, 140, 100), (100, 110, 160)]
TOLERANCE = 1e-5


def images() -> list[bytes]:
    return [ig.jpeg(colour) for colour in COLOURS]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensor(data: bytes, size=(32, 32)) -> np.ndarray:
    """What the service's one preprocessing function makes of these bytes: [h, w, 3] in [0, 1]."""
    return load_for_model(data, size)[0]


def assert_message_error(response, status: int) -> str:
    """TF Serving's and the Open Inference Protocol's error: ``{"error": "<message>"}``."""
    body = response.json() if callable(getattr(response, "json", None)) else response.get_json()
    text = json.dumps(body)
    assert response.status_code == status, text
    assert response.headers["Content-Type"].startswith("application/json"), text
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], text
    assert "Traceback" not in text
    return body["error"]


# -- the real server -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("protocols")
    built = work / "built"
    repo = work / "repo"
    save_colour_model(str(built / "v1"))
    save_colour_model(str(built / "v2"), labels=["red2", "green2", "blue2"])
    for version in (1, 2):
        shutil.copytree(built / f"v{version}", repo / "colours" / str(version))
    settings = work / "models.json"
    settings.write_text(json.dumps({"models": {"colours": {
        "version_policy": "all", "labels": {"stable": 1, "canary": 2}}}}))
    live = start_server(work, {"MODEL_REPOSITORY": str(repo), "MODEL_CONFIG": str(settings),
                               "MODEL_POLL_SECONDS": "0", "WORKERS": "1", "THREADS": "8"})
    yield live
    live.stop()


def classify_scores(server, data: bytes, version: int = 2) -> dict:
    """``/classify``'s scores for one image, by label (the reference for every protocol)."""
    r = requests.post(f"{server.url}/models/colours/versions/{version}/classify",
                      files={"image": ("x.jpg", data, "image/jpeg")}, timeout=30)
    assert r.status_code == 200, r.text
    return {p["label"]: p["score"] for p in r.json()["predictions"]}


def assert_same_scores(rows, labels, references):
    """Each row of scores (in label order) has /classify's top-1 and scores within 1e-5."""
    assert len(rows) == len(references)
    for row, reference in zip(rows, references):
        got = dict(zip(labels, (float(s) for s in row)))
        assert max(got, key=got.get) == max(reference, key=reference.get)
        assert got.keys() == reference.keys()
        for label in labels:
            assert abs(got[label] - reference[label]) <= TOLERANCE, (label, got, reference)


# TF Serving ----------------------------------------------------------------------------------
V2_LABELS = ["red2", "green2", "blue2"]


@pytest.mark.server
def test_tfserving_status_and_metadata(server):
    r = requests.get(server.url + "/v1/models/colours", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        for v in ("2", "1")]}
    one = requests.get(server.url + "/v1/models/colours/labels/stable", timeout=10).json()
    assert [v["version"] for v in one["model_version_status"]] == ["1"]
    meta = requests.get(server.url + "/v1/models/colours/versions/1/metadata", timeout=10).json()
    assert meta["model_spec"] == {"name": "colours", "signature_name": "", "version": "1"}
    signature = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert [d["size"] for d in signature["inputs"]["images"]["tensor_shape"]["dim"]] == \
        ["-1", "32", "32", "3"]
    assert [d["size"] for d in signature["outputs"]["probabilities"]["tensor_shape"]["dim"]] == \
        ["-1", "3"]
    assert_message_error(requests.get(server.url + "/v1/models/colours/versions/9", timeout=10),
                         404)
    assert_message_error(requests.get(server.url + "/v1/models/nope/metadata", timeout=10), 404)


def _tfserving_bodies(data: list[bytes]) -> dict:
    """Request bodies in the shapes of TF Serving's api_rest.md: row and columnar, images as
    {"b64"} alone or under an input name, and float tensors as a float-input model gets them."""
    return {
        "instances b64": {"instances": [{"b64": b64(d)} for d in data]},
        "instances named b64": {"signature_name": "serving_default",
                                "instances": [{"image_bytes": {"b64": b64(d)}} for d in data]},
        "inputs b64": {"inputs": {"images": [{"b64": b64(d)} for d in data]}},
        "instances tensor": {"instances": [tensor(d).tolist() for d in data]},
        "inputs tensor": {"inputs": [tensor(d).tolist() for d in data]},
    }


@pytest.mark.server
@pytest.mark.parametrize("shape", ["instances b64", "instances named b64", "inputs b64",
                                   "instances tensor", "inputs tensor"])
def test_tfserving_predict_gives_the_scores_of_classify(server, shape):
    data = images()
    body = _tfserving_bodies(data)[shape]
    r = requests.post(server.url + "/v1/models/colours:predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    key = "predictions" if "instances" in body else "outputs"
    assert list(r.json()) == [key]
    assert_same_scores(r.json()[key], V2_LABELS, [classify_scores(server, d) for d in data])


@pytest.mark.server
def test_tfserving_predict_by_version_and_label(server):
    data = images()[:1]
    body = {"instances": [{"b64": b64(data[0])}]}
    for path in ("/versions/1", "/labels/stable"):
        r = requests.post(f"{server.url}/v1/models/colours{path}:predict", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert_same_scores(r.json()["predictions"], ["red", "green", "blue"],
                           [classify_scores(server, data[0], version=1)])


@pytest.mark.server
def test_tfserving_classify_ranks_labels(server):
    """The classify example of api_rest.md: an image feature and a caption per example."""
    data = images()
    body = {"examples": [{"image/encoded": {"b64": b64(d)}, "caption": "seaside"}
                         for d in data]}
    r = requests.post(server.url + "/v1/models/colours/labels/canary:classify", json=body,
                      timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    for pairs, d in zip(results, data):
        reference = classify_scores(server, d)
        assert [label for label, _ in pairs] == sorted(reference, key=reference.get,
                                                       reverse=True)
        assert all(abs(score - reference[label]) <= TOLERANCE for label, score in pairs)


# Open Inference Protocol with tritonclient -----------------------------------------------------
@pytest.fixture
def triton(server):
    from tritonclient.http import InferenceServerClient

    client = InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.mark.server
def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("colours") and triton.is_model_ready("colours", "1")
    assert not triton.is_model_ready("nope")
    assert set(triton.get_server_metadata()["extensions"]) >= {"binary_tensor_data",
                                                                "classification"}
    meta = triton.get_model_metadata("colours", "1")
    # the model's real input (our SavedModel's ``images``, NHWC), and encoded images beside it
    assert meta["inputs"] == [
        {"name": "images", "datatype": "FP32", "shape": [-1, 32, 32, 3],
         "parameters": {"layout": "NHWC"}},
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1],
         "parameters": {"content": "encoded images (JPEG, PNG, ...)"}}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["platform"] == "tensorflow_savedmodel"


@pytest.mark.server
@pytest.mark.parametrize("datatype", ["BYTES", "FP32"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_gives_the_scores_of_classify(server, triton, datatype, binary):
    from tritonclient.http import InferInput, InferRequestedOutput

    data = images()
    if datatype == "BYTES":  # binary: the raw bytes; JSON: base64 strings, as KServe's examples
        values = np.array([d if binary else b64(d).encode() for d in data], dtype=np.object_)
    else:
        values = np.stack([tensor(d) for d in data])
    given = InferInput("images", list(values.shape), datatype)
    given.set_data_from_numpy(values, binary_data=binary)
    result = triton.infer("colours", [given], model_version="2", request_id="r1",
                          outputs=[InferRequestedOutput("probabilities", binary_data=binary)])
    response = result.get_response()
    assert response["model_name"] == "colours" and response["model_version"] == "2"
    assert response["id"] == "r1"
    assert ("data" in response["outputs"][0]) is not binary  # binary: after the JSON header
    scores = result.as_numpy("probabilities")
    assert scores.dtype == np.float32 and scores.shape == (3, 3)
    assert_same_scores(scores, V2_LABELS, [classify_scores(server, d) for d in data])


@pytest.mark.server
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_classification_extension(server, triton, binary):
    from tritonclient.http import InferInput, InferRequestedOutput

    data = images()
    given = InferInput("images", [len(data)], "BYTES")
    given.set_data_from_numpy(np.array(data, dtype=np.object_))
    result = triton.infer("colours", [given], model_version="1", outputs=[
        InferRequestedOutput("probabilities", binary_data=binary, class_count=2)])
    top = result.as_numpy("probabilities")
    assert top.shape == (3, 2)
    for row, d in zip(top, data):
        reference = classify_scores(server, d, version=1)
        ranked = sorted(reference, key=reference.get, reverse=True)
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in row]
        assert [label for _, _, label in parsed] == ranked[:2]
        assert [int(index) for _, index, _ in parsed] == [["red", "green", "blue"].index(x)
                                                          for x in ranked[:2]]
        assert all(abs(float(score) - reference[label]) <= TOLERANCE
                   for score, _, label in parsed)


@pytest.mark.server
def test_tritonclient_errors_are_exceptions_with_the_message(triton):
    from tritonclient.http import InferInput
    from tritonclient.utils import InferenceServerException

    given = InferInput("images", [1], "BYTES")
    given.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("colours", [given])
    assert caught.value.status() == "415" and "image" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("nope", [given])
    assert caught.value.status() == "404"


@pytest.mark.server
def test_raw_binary_request_and_v1_v2_without_a_client(server):
    """curl's view: a raw binary request (the body is one image) answers in binary."""
    data = images()[0]
    r = requests.post(server.url + "/v2/models/colours/infer", data=data,
                      headers={"Inference-Header-Content-Length": "0"}, timeout=30)
    assert r.status_code == 200, r.text
    length = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 12}
    scores = np.frombuffer(r.content[length:], dtype="<f4").reshape(1, 3)
    assert_same_scores(scores, V2_LABELS, [classify_scores(server, data)])


# -- in-process: parsing and errors ------------------------------------------------------------
PNG = ig.png(ig.RED)


@pytest.mark.parametrize("path,body,status", [
    (":predict", "not json", 400),
    (":predict", "[1, 2]", 400),
    (":predict", json.dumps({"nothing": 1}), 400),
    (":predict", json.dumps({"instances": [], }), 400),
    (":predict", json.dumps({"instances": [{"b64": "x"}], "inputs": [{"b64": "x"}]}), 400),
    (":predict", json.dumps({"instances": [{"b64": "!!!!"}]}), 400),
    (":predict", json.dumps({"instances": [{"b64": b64(b"plain text")}]}), 415),
    (":predict", json.dumps({"instances": [{"b64": b64(PNG[:60])}]}), 422),
    (":predict", json.dumps({"instances": [[1.0, 2.0]]}), 400),
    (":predict", json.dumps({"instances": [[[[1.0, 0, 0]] * 32] * 31]}), 400),
    (":predict", json.dumps({"instances": [[[["a", 0, 0]] * 32] * 32]}), 400),
    (":predict", '{"instances": [[[[NaN, 0, 0]]]]}', 400),
    (":predict", json.dumps({"instances": [{"a": 1, "b": 2}]}), 400),
    (":predict", json.dumps({"instances": [{"b64": b64(PNG)}, [1.0]]}), 400),
    (":predict", json.dumps({"signature_name": "other", "instances": [{"b64": b64(PNG)}]}), 400),
    (":predict", "[" * 100000 + "]" * 100000, 400),
    (":classify", json.dumps({"examples": [{"caption": "x"}]}), 400),
    (":classify", json.dumps({"examples": {"image": {"b64": b64(PNG)}}}), 400),
    (":classify", json.dumps({"examples": [{"image": {"b64": b64(PNG)}}],
                              "context": {"image": {"b64": b64(PNG)}}}), 400),
    ("/versions/x:predict", json.dumps({"instances": [{"b64": b64(PNG)}]}), 404),
    ("/versions/9:predict", json.dumps({"instances": [{"b64": b64(PNG)}]}), 404),
    ("/labels/x:classify", json.dumps({"examples": [{"image": {"b64": b64(PNG)}}]}), 404),
    (":classify", json.dumps({"examples": [{"image": {"b64": b64(PNG)}}],
                              "context": {f"k{i}": i for i in range(9)}}), 400),
    (":predict", json.dumps({"instances": [{"b64": b64(PNG)}] * 9}), 400),
    (":predict", json.dumps({"instances": [0] * 40_000}), 400),  # more values than 8 images
])
def test_tfserving_bad_requests(client, path, body, status):
    r = client.post(f"/v1/models/default{path}", data=body)
    assert_message_error(r, status)


def test_tfserving_in_process_answers(client):
    r = client.post("/v1/models/default:classify", json={
        "context": {"image/encoded": [{"b64": b64(PNG)}]}, "examples": [{"caption": "x"}]})
    assert r.status_code == 200, r.get_data()
    assert r.get_json()["results"][0][0][0] == "red"
    assert_message_error(client.get("/v1/models/nope"), 404)
    assert_message_error(client.post("/v1/models/nope:predict", json={
        "instances": [{"b64": b64(PNG)}]}), 404)
    # other routes keep the service's own envelope
    assert set(client.get("/nope").get_json()["error"]) == {"code", "message", "status"}


def _infer_body(inputs, **extra) -> str:
    return json.dumps({"inputs": inputs, **extra})


GOOD_BYTES = {"name": "images", "datatype": "BYTES", "shape": [1], "data": [b64(PNG)]}


@pytest.mark.parametrize("body,headers,status", [
    ("not json", {}, 400),
    (json.dumps({"inputs": []}), {}, 400),
    (_infer_body([GOOD_BYTES, GOOD_BYTES]), {}, 400),
    (_infer_body([{**GOOD_BYTES, "datatype": "INT8"}]), {}, 400),
    (_infer_body([{**GOOD_BYTES, "shape": [2]}]), {}, 400),
    (_infer_body([{**GOOD_BYTES, "shape": "1"}]), {}, 400),
    (_infer_body([{**GOOD_BYTES, "data": ["%%%"]}]), {}, 400),
    (_infer_body([{**GOOD_BYTES, "data": [b64(b"hello")]}]), {}, 415),
    (_infer_body([{**GOOD_BYTES, "data": "abc"}]), {}, 400),
    (_infer_body([GOOD_BYTES], id=7), {}, 400),
    (_infer_body([GOOD_BYTES], outputs=[{"name": "logits"}]), {}, 400),
    (_infer_body([GOOD_BYTES], outputs=[{"name": "probabilities"}] * 2), {}, 400),
    (_infer_body([{**GOOD_BYTES, "shape": [2 ** 70]}]), {}, 400),
    (_infer_body([{"name": "images", "datatype": "FP32", "shape": [4611686018427387905, 4],
                   "data": [0.5] * 4}]), {}, 400),
    (_infer_body([GOOD_BYTES], outputs=[{"name": "probabilities",
                                         "parameters": {"classification": -1}}]), {}, 400),
    (_infer_body([{"name": "images", "datatype": "FP32", "shape": [1, 32, 32, 3],
                   "data": [0.5] * 100}]), {}, 400),
    (_infer_body([{"name": "images", "datatype": "FP32", "shape": [1, 2, 2, 3],
                   "data": [0.5] * 12}]), {}, 400),
    (_infer_body([{"name": "images", "datatype": "FP32", "shape": [1, 32, 32, 3],
                   "data": [True] * 3072}]), {}, 400),
    (_infer_body([GOOD_BYTES]), {"Inference-Header-Content-Length": "x"}, 400),
    (_infer_body([GOOD_BYTES]), {"Inference-Header-Content-Length": "999999"}, 400),
    (_infer_body([{**GOOD_BYTES, "data": None, "parameters": {"binary_data_size": 10}}]),
     {"Inference-Header-Content-Length": "0"}, 415),  # header 0: the body is one "image"
])
def test_kserve_bad_requests(client, body, headers, status):
    assert_message_error(client.post("/v2/models/default/infer", data=body, headers=headers),
                         status)


def test_kserve_binary_sizes_must_add_up(client):
    def post(declared: int):
        head = _infer_body([{"name": "images", "datatype": "BYTES", "shape": [1],
                             "parameters": {"binary_data_size": declared}}]).encode()
        return client.post("/v2/models/default/infer",
                           data=head + len(PNG).to_bytes(4, "little") + PNG,
                           headers={"Inference-Header-Content-Length": str(len(head))})

    assert_message_error(post(4 + len(PNG) + 1), 400)
    assert_message_error(post(4 + len(PNG) - 1), 400)
    r = post(4 + len(PNG))
    assert r.status_code == 200, r.get_data()
    assert r.get_json()["outputs"][0]["data"][0] > 0.9  # red


def test_kserve_health_and_unknown_models(client):
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    assert client.get("/v2/models/default/ready").get_json() == {"name": "default",
                                                                 "ready": True}
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/default/versions/2",
                 "/v2/models/default/versions/x/ready"):
        assert_message_error(client.get(path), 404)
