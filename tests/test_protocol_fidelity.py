"""The standard protocols as their own clients expect them (issue 25): every /v1 and /v2
answer in the protocols' error shape, routed or not; Triton's model configuration and
statistics extensions; gzip and deflate bodies both ways (the upload limit applied to the
inflated size); raw binary FP32 tensors; input names checked as TF Serving and Triton do.

One real gunicorn server (one worker, so the statistics it answers are the only worker's)
serves a repository with the colour model (``colours/1``, 32x32 float input ``images``), and
tritonclient (Triton's own HTTP client, from PyPI) and requests talk to it. Scores are
compared with what ``/classify`` gives for the same image."""
import base64
import gzip
import json
import zlib

import imagegen as ig
import numpy as np
import pytest
import requests
from helpers import PeakMemory, assert_envelope, start_server
from tiny_models import save_colour_model

from common.inference.images import load_for_model

pytestmark = pytest.mark.server

MIB = 1 << 20
TOLERANCE = 1e-5
#: Mixed colours, so every label gets a score well above zero.
COLOURS = [(150, 110, 90), (90, 140, 100), (100, 110, 160)]
UPLOAD_MB = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("fidelity")
    repo = work / "repo"
    save_colour_model(str(repo / "colours" / "1"))
    live = start_server(work, {"MODEL_REPOSITORY": str(repo), "DEFAULT_MODEL": "colours",
                               "MODEL_POLL_SECONDS": "0", "WORKERS": "1", "THREADS": "4",
                               "MAX_UPLOAD_MB": str(UPLOAD_MB), "BATCH_MAX_WAIT_MS": "2"})
    yield live
    live.stop()


@pytest.fixture
def triton(server):
    from tritonclient.http import InferenceServerClient

    client = InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


def images() -> list[bytes]:
    return [ig.jpeg(colour) for colour in COLOURS]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensor(data: bytes) -> np.ndarray:
    """What the service's preprocessing makes of these bytes: float32 [32, 32, 3] in [0, 1]."""
    return load_for_model(data, (32, 32))[0]


def classify_scores(server, data: bytes) -> dict:
    """``/classify``'s scores for one image, by label: the reference for every protocol."""
    r = requests.post(f"{server.url}/models/colours/classify",
                      files={"image": ("x.jpg", data, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    return {p["label"]: p["score"] for p in r.json()["predictions"]}


def assert_same_scores(server, rows, data: list[bytes]):
    """Each row of scores (in label order red, green, blue) is /classify's within 1e-5."""
    rows = np.asarray(rows, dtype=np.float64).reshape(len(data), -1)
    for row, d in zip(rows, data):
        reference = classify_scores(server, d)
        expected = [reference[label] for label in ("red", "green", "blue")]
        assert np.allclose(row, expected, atol=TOLERANCE, rtol=0), (row, expected)


def assert_message_error(response, status: int) -> str:
    """TF Serving's and Triton's error: ``{"error": "<message>"}`` with this status."""
    text = response.text[:300]
    assert response.status_code == status, text
    assert response.headers["Content-Type"].startswith("application/json"), text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], text
    assert "Traceback" not in text
    return body["error"]


# -- errors in the protocols' shape, routed or not ---------------------------------------------
@pytest.mark.parametrize("method,path,status", [
    ("get", "/v2/models/colours/infer", 405),
    ("post", "/v2/models/colours/ready", 405),
    ("delete", "/v2/models/colours", 405),
    ("get", "/v1/models", 404),
    ("get", "/v1", 404),
    ("get", "/v2/", 404),
    ("post", "/v1/models/colours:regress", 404),
    ("get", "/v1/models/colours:predict", 405),
    ("put", "/v1/models/colours", 405),
    ("get", "/v2/logging", 404),
    ("post", "/v2/logging", 404),
    ("get", "/v2/trace/setting", 404),
    ("get", "/v2/models/colours/trace/setting", 404),
    ("get", "/v2/models/colours/versions/1/nope", 404),
    ("get", "/v2/systemsharedmemory/status", 404),
    ("get", "/v2/nothing/here/at/all", 404),
])
def test_every_protocol_path_answers_the_protocol_error(server, method, path, status):
    r = getattr(requests, method)(server.url + path, timeout=30)
    assert_message_error(r, status)
    if status == 405:
        assert r.headers["Allow"]


def test_other_paths_keep_the_service_envelope(server):
    assert_envelope(requests.get(server.url + "/v3/models", timeout=30), 404)
    assert_envelope(requests.put(server.url + "/classify", timeout=30), 405)


def test_tritonclient_log_and_trace_settings_fail_cleanly(triton):
    from tritonclient.utils import InferenceServerException

    for call in (triton.get_log_settings, triton.get_trace_settings,
                 lambda: triton.get_trace_settings(model_name="colours")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "404"
        assert isinstance(caught.value.message(), str) and caught.value.message()


# -- model configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("version", ["", "1"])
def test_model_config_as_triton_writes_it(triton, version):
    config = triton.get_model_config("colours", model_version=version)
    assert config["name"] == "colours"
    assert config["platform"] == "tensorflow_savedmodel"
    assert config["backend"] == "tensorflow"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert isinstance(config["max_batch_size"], int) and config["max_batch_size"] >= 1
    assert config["input"] == [
        {"name": "images", "data_type": "TYPE_FP32", "format": "FORMAT_NHWC",
         "dims": [32, 32, 3]},
        {"name": "image_bytes", "data_type": "TYPE_STRING", "format": "FORMAT_NONE",
         "dims": [1]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32",
                                 "dims": [3], "label_filename": "labels.txt"}]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 2000  # BATCH_MAX_WAIT_MS
    assert batching["preferred_batch_size"] and max(batching["preferred_batch_size"]) >= \
        config["max_batch_size"]


def test_model_config_of_unknown_models_is_a_clean_error(server, triton):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_config("nope")
    assert caught.value.status() == "404"
    for path in ("/v2/models/colours/versions/7/config", "/v2/models/colours/versions/x/config"):
        assert_message_error(requests.get(server.url + path, timeout=30), 404)


# -- statistics --------------------------------------------------------------------------------
def _stats(triton) -> dict:
    (entry,) = triton.get_inference_statistics("colours")["model_stats"]
    return entry


def test_statistics_count_the_requests_served(server, triton):
    from tritonclient.http import InferInput

    before = _stats(triton)
    assert before["name"] == "colours" and before["version"] == "1"
    data = images()
    for d in data[:2]:  # two requests of one image
        given = InferInput("image_bytes", [1], "BYTES")
        given.set_data_from_numpy(np.array([d], dtype=np.object_))
        triton.infer("colours", [given])
    r = requests.post(server.url + "/v1/models/colours:predict", timeout=60,
                      json={"instances": [{"b64": b64(d)} for d in data]})  # one of three
    assert r.status_code == 200, r.text
    bad = requests.post(server.url + "/v2/models/colours/infer", timeout=60, json={
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                    "data": [b64(b"not an image")]}]})
    assert_message_error(bad, 415)
    after = _stats(triton)

    def grew(*keys):
        old, new = before, after
        for key in keys:
            old, new = old[key], new[key]
        return new - old

    assert grew("inference_count") == 5  # images through the model
    assert 1 <= grew("execution_count") <= 5  # model calls: requests may share one
    stats = "inference_stats"
    assert grew(stats, "success", "count") == 3
    assert grew(stats, "fail", "count") == 1
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert grew(stats, key, "count") == 3, key
    assert grew(stats, "success", "ns") > 0 and grew(stats, "fail", "ns") > 0
    assert grew(stats, "compute_infer", "ns") > 0 and grew(stats, "compute_input", "ns") > 0
    assert after["inference_stats"]["success"]["ns"] >= sum(
        after["inference_stats"][k]["ns"] for k in ("compute_input", "compute_infer"))
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0
    calls = sum(b["compute_infer"]["count"] for b in after["batch_stats"])
    assert calls == after["execution_count"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"]) == \
        after["inference_count"]


def test_statistics_routes(server, triton):
    from tritonclient.utils import InferenceServerException

    everything = triton.get_inference_statistics()
    assert [e["name"] for e in everything["model_stats"]] == ["colours"]
    one = triton.get_inference_statistics("colours", model_version="1")["model_stats"]
    assert [(e["name"], e["version"]) for e in one] == [("colours", "1")]
    assert set(one[0]["inference_stats"]) >= {"success", "fail", "queue", "compute_input",
                                              "compute_infer", "compute_output"}
    with pytest.raises(InferenceServerException):
        triton.get_inference_statistics("nope")
    assert_message_error(requests.get(server.url + "/v2/models/colours/versions/5/stats",
                                      timeout=30), 404)


# -- compressed bodies -------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_compressed_requests_and_answers(server, triton, algorithm, binary):
    from tritonclient.http import InferInput, InferRequestedOutput

    data = images()
    given = InferInput("images", [len(data), 32, 32, 3], "FP32")
    given.set_data_from_numpy(np.stack([tensor(d) for d in data]), binary_data=binary)
    result = triton.infer("colours", [given],
                          outputs=[InferRequestedOutput("probabilities", binary_data=binary)],
                          request_compression_algorithm=algorithm,
                          response_compression_algorithm=algorithm)
    assert_same_scores(server, result.as_numpy("probabilities"), data)


@pytest.mark.parametrize("algorithm,pack", [("gzip", gzip.compress),
                                            ("deflate", zlib.compress)])
def test_v2_infer_compressed_both_ways_on_the_wire(server, algorithm, pack):
    data = images()[:1]
    body = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                   "data": [b64(data[0])]}]}).encode()
    r = requests.post(server.url + "/v2/models/colours/infer", data=pack(body), timeout=60,
                      stream=True, headers={"Content-Encoding": algorithm,
                                            "Accept-Encoding": algorithm,
                                            "Content-Type": "application/json"})
    assert r.status_code == 200
    assert r.headers["Content-Encoding"] == algorithm
    raw = r.raw.read(decode_content=False)
    answer = json.loads(zlib.decompress(raw, 16 + zlib.MAX_WBITS if algorithm == "gzip"
                                        else zlib.MAX_WBITS))
    assert_same_scores(server, answer["outputs"][0]["data"], data)


@pytest.mark.parametrize("algorithm,pack", [("gzip", gzip.compress),
                                            ("deflate", zlib.compress)])
def test_v1_predict_and_classify_take_compressed_bodies(server, algorithm, pack):
    data = images()
    headers = {"Content-Encoding": algorithm, "Content-Type": "application/json"}
    predict = json.dumps({"instances": [{"b64": b64(d)} for d in data]}).encode()
    r = requests.post(server.url + "/v1/models/colours:predict", data=pack(predict),
                      headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert_same_scores(server, r.json()["predictions"], data)
    classify = json.dumps({"examples": [{"image/encoded": {"b64": b64(data[0])}}]}).encode()
    r = requests.post(server.url + "/v1/models/colours:classify", data=pack(classify),
                      headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    reference = classify_scores(server, data[0])
    assert {label: score for label, score in r.json()["results"][0]} == pytest.approx(
        reference, abs=TOLERANCE)


def test_raw_classify_body_may_be_compressed(server):
    """Our own raw-body /classify reads bodies through the same bounded reader."""
    data = images()[0]
    r = requests.post(server.url + "/models/colours/classify", data=gzip.compress(data),
                      headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"},
                      timeout=60)
    assert r.status_code == 200, r.text
    assert {p["label"]: p["score"] for p in r.json()["predictions"]} == classify_scores(server,
                                                                                       data)
    r = requests.post(server.url + "/models/colours/classify", data=data, timeout=60,
                      headers={"Content-Type": "image/jpeg", "Content-Encoding": "br"})
    assert_envelope(r, 415, "unsupported_encoding")


def test_compression_bomb_is_refused_after_the_limit(server):
    bomb = gzip.compress(bytes(200 * MIB), 9)  # 200 MiB of zeros in ~200 KiB
    assert len(bomb) < 1 * MIB
    memory = PeakMemory(server.worker_pids()[0]).reset()
    r = requests.post(server.url + "/v2/models/colours/infer", data=bomb, timeout=120,
                      headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert_message_error(r, 413)
    assert memory.rise_mb() < 100  # inflated up to the limit (4 MiB), never the 200 MiB
    assert requests.get(server.url + "/healthz", timeout=30).status_code == 200
    data = images()[:1]
    r = requests.post(server.url + "/v1/models/colours:predict", timeout=60,
                      json={"instances": [{"b64": b64(data[0])}]})
    assert r.status_code == 200, r.text


def test_inflated_size_counts_against_the_limit(server):
    """A body that inflates to just over MAX_UPLOAD_MB is refused, though it is tiny."""
    over = json.dumps({"instances": [{"b64": b64(b"\0" * (UPLOAD_MB * MIB))}]}).encode()
    r = requests.post(server.url + "/v1/models/colours:predict", data=gzip.compress(over),
                      headers={"Content-Encoding": "gzip"}, timeout=60)
    assert_message_error(r, 413)


@pytest.mark.parametrize("encoding,body,status", [
    ("br", b"{}", 415),
    ("gzip, br", b"{}", 415),
    ("gzip", b"not gzip at all", 400),
    ("gzip", gzip.compress(b'{"instances": []}')[:-12], 400),
    ("deflate", b"\x78\x9c\x00\x01", 400),
])
def test_unknown_or_corrupt_encodings_are_clean_errors(server, encoding, body, status):
    for path in ("/v1/models/colours:predict", "/v2/models/colours/infer"):
        r = requests.post(server.url + path, data=body, timeout=60,
                          headers={"Content-Encoding": encoding})
        assert_message_error(r, status)


# -- raw binary tensors, metadata, input names -------------------------------------------------
@pytest.mark.parametrize("name", ["images", "from metadata"])
def test_binary_fp32_tensor_gives_the_scores_of_classify(server, triton, name):
    from tritonclient.http import InferInput

    if name == "from metadata":
        name = triton.get_model_metadata("colours")["inputs"][0]["name"]
    data = images()
    given = InferInput(name, [len(data), 32, 32, 3], "FP32")
    given.set_data_from_numpy(np.stack([tensor(d) for d in data]), binary_data=True)
    result = triton.infer("colours", [given])
    assert_same_scores(server, result.as_numpy("probabilities"), data)


def test_metadata_lists_the_real_input_the_bytes_input_and_the_runtime(server, triton):
    meta = triton.get_model_metadata("colours")
    assert meta["platform"] == "tensorflow_savedmodel"
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("images", "FP32", [-1, 32, 32, 3]), ("image_bytes", "BYTES", [-1])]
    v1 = requests.get(server.url + "/v1/models/colours/metadata", timeout=30).json()
    signature = v1["metadata"]["signature_def"]["signature_def"]["serving_default"]
    inputs = signature["inputs"]
    assert set(inputs) == {"images", "image_bytes"}
    assert inputs["images"]["dtype"] == "DT_FLOAT"
    assert inputs["images"]["name"] == "serving_default_images:0"
    assert inputs["image_bytes"]["dtype"] == "DT_STRING"
    assert [d["size"] for d in inputs["image_bytes"]["tensor_shape"]["dim"]] == ["-1"]


def test_v1_input_names_are_checked(server):
    data = images()[:1]
    for body in ({"inputs": {"nope": [{"b64": b64(data[0])}]}},
                 {"instances": [{"pixels": {"b64": b64(data[0])}}]}):
        message = assert_message_error(requests.post(
            server.url + "/v1/models/colours:predict", json=body, timeout=60), 400)
        assert "'images'" in message and "'image_bytes'" in message
    for body in ({"inputs": {"images": [tensor(data[0]).tolist()]}},
                 {"instances": [{"image_bytes": {"b64": b64(data[0])}}]}):
        r = requests.post(server.url + "/v1/models/colours:predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert_same_scores(server, r.json()[next(iter(r.json()))], data)


def test_v2_input_names_are_checked(server, triton):
    from tritonclient.http import InferInput
    from tritonclient.utils import InferenceServerException

    data = images()[:1]
    given = InferInput("nope", [1, 32, 32, 3], "FP32")
    given.set_data_from_numpy(tensor(data[0])[None], binary_data=True)
    with pytest.raises(InferenceServerException) as caught:
        triton.infer("colours", [given])
    assert caught.value.status() == "400"
    assert "'images'" in caught.value.message() and "'image_bytes'" in caught.value.message()
    wrong_type = {"inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": [1, 32, 32, 3],
                              "data": tensor(data[0]).reshape(-1).tolist()}]}
    assert_message_error(requests.post(server.url + "/v2/models/colours/infer",
                                       json=wrong_type, timeout=60), 400)


def test_v2_empty_outputs_asks_for_every_output(server):
    data = images()[:1]
    r = requests.post(server.url + "/v2/models/colours/infer", timeout=60, json={
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                    "data": [b64(data[0])]}], "outputs": []})
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [1, 3]
    assert_same_scores(server, output["data"], data)


def test_raw_binary_body_is_still_one_image(server):
    """``Inference-Header-Content-Length: 0``: no JSON header, the whole body is one image."""
    data = images()[:1]
    r = requests.post(server.url + "/v2/models/colours/infer", data=data[0], timeout=60,
                      headers={"Inference-Header-Content-Length": "0",
                               "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text[:200]
