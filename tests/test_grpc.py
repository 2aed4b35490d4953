"""gRPC on GRPC_PORT (common/rpc/): the Open Inference Protocol's GRPCInferenceService through
Triton's own client (tritonclient.grpc), TF Serving's PredictionService and ModelService
through TF Serving's own stubs (tensorflow-serving-api) and tf.make_tensor_proto, and
grpc.health.v1.

One real gunicorn server (two workers sharing the gRPC port, API keys on, a small upload limit)
on a repository of the colour model (colours/1 labels red/green/blue, colours/2 the same with a
"2" suffix, colours/3 a version that failed to load). Every answer is compared with what POST /classify gives for the same images; every
bad request gets its own status code (never UNKNOWN or a traceback) and the server answers the
next good call."""
import json
import os
import shutil
import socket

import grpc
import imagegen as ig
import numpy as np
import pytest
import requests
from helpers import metric, start_failing, start_server
from tiny_models import save_colour_model

from common.config import Config, ConfigError
from common.inference.images import load_for_model
from common.rpc import server as rpc_server
from scripts.liveserver import ROOT, free_port

KEY = "grpc-Qw7Er9Ty2Ui4Op6As8Df1Gh3Jk5-inline"
METRICS_KEY = "scrape-Zx8Cv6Bn4Nm2Lk1Jh3Gf5Ds7-inline"
COLOURS = [(150, 110, 90), (90, 140, 100), (100, 110, 160)]
TOLERANCE = 1e-5
AUTH = (("authorization", f"Bearer {KEY}"),)
UPLOAD_MB = 0.25  # MAX_UPLOAD_MB: gRPC messages up to 256 KiB + 64 KiB


def images() -> list[bytes]:
    return [ig.jpeg(colour) for colour in COLOURS]


def tensor(data: bytes) -> np.ndarray:
    """The service's preprocessing of ``data``: float32 ``[32, 32, 3]`` in [0, 1]."""
    return load_for_model(data, (32, 32))[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("grpc")
    built, repo = work / "built", work / "repo"
    save_colour_model(str(built / "v1"))
    save_colour_model(str(built / "v2"), labels=["red2", "green2", "blue2"])
    for version in (1, 2):
        shutil.copytree(built / f"v{version}", repo / "colours" / str(version))
    shutil.copytree(built / "v1", repo / "colours" / "3")  # a version that fails to load
    (repo / "colours" / "3" / "saved_model.pb").write_bytes(b"not a saved model")
    settings = work / "models.json"
    settings.write_text(json.dumps({"models": {"colours": {
        "version_policy": "all", "labels": {"stable": 1, "canary": 2}}}}))
    grpc_port = free_port()
    live = start_server(work, {
        "MODEL_REPOSITORY": str(repo), "MODEL_CONFIG": str(settings), "MODEL_POLL_SECONDS": "0",
        "WORKERS": "2", "THREADS": "8", "GRPC_PORT": str(grpc_port),
        "MAX_UPLOAD_MB": str(UPLOAD_MB), "AUDIT_LOG": str(work / "audit.jsonl"),
        "TRUSTED_PROXIES": "127.0.0.1",
        "API_KEYS": f"ci:{KEY}:classify,scraper:{METRICS_KEY}:metrics"})
    live.grpc_address = f"127.0.0.1:{grpc_port}"
    live.audit_path = str(work / "audit.jsonl")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        yield ch


@pytest.fixture(scope="module")
def triton(server):
    from tritonclient.grpc import InferenceServerClient

    client = InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(server) -> list[dict]:
    """``/classify``'s scores of each image on colours/2, by label (the reference)."""
    scores = []
    for data in images():
        r = requests.post(f"{server.url}/models/colours/versions/2/classify",
                          files={"image": ("x.jpg", data, "image/jpeg")},
                          headers={"X-API-Key": KEY}, timeout=60)
        assert r.status_code == 200, r.text
        scores.append({p["label"]: p["score"] for p in r.json()["predictions"]})
    return scores


LABELS = ["red2", "green2", "blue2"]


def as_rows(reference: list[dict]) -> np.ndarray:
    return np.array([[row[label] for label in LABELS] for row in reference], np.float32)


# -- the Open Inference Protocol, through tritonclient.grpc ------------------------------------
@pytest.mark.server
def test_oip_health_and_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()  # open, as /v2/health/*
    headers = dict(AUTH)
    assert triton.is_model_ready("colours", "1", headers=headers)
    assert not triton.is_model_ready("nope", headers=headers)
    assert not triton.is_model_ready("colours", "3", headers=headers)  # failed to load
    assert {"classification", "model_configuration"} <= set(
        triton.get_server_metadata(headers=headers).extensions)
    meta = triton.get_model_metadata("colours", "1", headers=headers, as_json=True)
    assert meta["name"] == "colours" and meta["platform"] == "tensorflow_savedmodel"
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("images", "FP32", ["-1", "32", "32", "3"]), ("image_bytes", "BYTES", ["-1"])]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32", ["-1", "3"])]
    config = triton.get_model_config("colours", "1", headers=headers, as_json=True)["config"]
    assert config["name"] == "colours"
    assert config["input"][0]["name"] == "images"
    assert config["input"][0]["dims"] == ["32", "32", "3"]
    assert config["input"][1]["name"] == "image_bytes"
    assert config["output"][0]["dims"] == ["3"]


@pytest.mark.server
def test_oip_infer_bytes_agrees_with_classify(triton, reference):
    from tritonclient.grpc import InferInput

    data = np.array(images(), dtype=np.object_)
    given = InferInput("image_bytes", [len(data)], "BYTES")
    given.set_data_from_numpy(data)
    result = triton.infer("colours", [given], model_version="2", headers=dict(AUTH))
    scores = result.as_numpy("probabilities")
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, as_rows(reference), atol=TOLERANCE)
    assert result.get_response().model_version == "2"


@pytest.mark.server
def test_oip_infer_fp32_tensor_and_classification(triton, reference):
    from tritonclient.grpc import InferInput, InferRequestedOutput

    batch = np.stack([tensor(d) for d in images()]).astype(np.float32)
    given = InferInput("images", list(batch.shape), "FP32")
    given.set_data_from_numpy(batch)
    scores = triton.infer("colours", [given], model_version="2",
                          headers=dict(AUTH)).as_numpy("probabilities")
    np.testing.assert_allclose(scores, as_rows(reference), atol=TOLERANCE)

    asked = InferRequestedOutput("probabilities", class_count=3)
    classes = triton.infer("colours", [given], model_version="2", outputs=[asked],
                           headers=dict(AUTH)).as_numpy("probabilities")
    assert classes.shape == (3, 3)
    for row, expected in zip(classes, reference):
        parsed = [item.decode().split(":") for item in row]
        assert [label for _, _, label in parsed] == sorted(expected, key=lambda k: -expected[k])
        for score, index, label in parsed:
            assert LABELS[int(index)] == label
            assert abs(float(score) - expected[label]) < 1e-5


@pytest.mark.server
def test_oip_default_version_and_raw_contents(channel, reference):
    """A request built by hand: the model's latest version, the image in contents."""
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="colours", id="abc")
    request.inputs.add(name="image_bytes", datatype="BYTES", shape=[1]).contents.bytes_contents \
        .append(images()[0])
    answer = stub.ModelInfer(request, metadata=AUTH, timeout=60)
    assert answer.model_version == "2" and answer.id == "abc"
    scores = np.frombuffer(answer.raw_output_contents[0], "<f4")
    np.testing.assert_allclose(scores, as_rows(reference)[0], atol=TOLERANCE)


# -- TF Serving, through its own stubs ---------------------------------------------------------
@pytest.fixture(scope="module")
def tfs(channel):
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model_service_pb2_grpc.ModelServiceStub(channel))


@pytest.mark.server
def test_tfserving_predict_strings_and_floats(tfs, reference):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    prediction, _ = tfs
    for proto in (tf.make_tensor_proto(images()),
                  tf.make_tensor_proto(np.stack([tensor(d) for d in images()]))):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "colours"
        request.model_spec.version.value = 2
        request.inputs["images"].CopyFrom(proto)
        answer = prediction.Predict(request, metadata=AUTH, timeout=60)
        scores = tf.make_ndarray(answer.outputs["probabilities"])
        np.testing.assert_allclose(scores, as_rows(reference), atol=TOLERANCE)
        assert answer.model_spec.name == "colours" and answer.model_spec.version.value == 2


@pytest.mark.server
def test_tfserving_classify(tfs, reference):
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2

    prediction, _ = tfs
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "colours"
    request.model_spec.version_label = "canary"
    for data in images():
        example = request.input.example_list.examples.add()
        example.features.feature["image/encoded"].CopyFrom(
            tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])))
    answer = prediction.Classify(request, metadata=AUTH, timeout=60)
    assert len(answer.result.classifications) == 3
    for classes, expected in zip(answer.result.classifications, reference):
        assert [c.label for c in classes.classes] == sorted(expected, key=lambda k: -expected[k])
        for c in classes.classes:
            assert abs(c.score - expected[c.label]) < 1e-5


@pytest.mark.server
def test_tfserving_metadata_and_status(tfs):
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
    )

    prediction, models = tfs
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "colours"
    answer = prediction.GetModelMetadata(request, metadata=AUTH, timeout=60)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    answer.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == [-1, 32, 32, 3]
    assert [d.size for d in signature.outputs["probabilities"].tensor_shape.dim] == [-1, 3]
    assert answer.model_spec.version.value == 2

    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "colours"
    versions = models.GetModelStatus(status, metadata=AUTH, timeout=60).model_version_status
    state = get_model_status_pb2.ModelVersionStatus
    assert sorted((v.version, v.state, v.status.error_code) for v in versions) == [
        (1, state.AVAILABLE, 0), (2, state.AVAILABLE, 0), (3, state.END, 2)]  # 2: UNKNOWN
    assert [v.status.error_message for v in versions if v.version == 3][0]


@pytest.mark.server
def test_a_version_not_ready_is_unavailable_with_a_retry_hint(channel):
    """A refusal to retry later (503 model_not_ready: colours/3 failed to load) is UNAVAILABLE
    with ``retry-after`` (seconds) and our error code in the trailing metadata."""
    from tritonclient.grpc import service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = _oip_request(data=_bytes_tensor(images()[:1]))
    request.model_version = "3"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=AUTH, timeout=60)
    _assert_clean(caught.value, grpc.StatusCode.UNAVAILABLE)
    trailing = dict(caught.value.trailing_metadata())
    assert trailing["retry-after"] == "1" and trailing["error-code"] == "model_not_ready"
    assert trailing["x-request-id"]
    _still_serves(channel)


# -- health, logs, metrics ---------------------------------------------------------------------
@pytest.mark.server
def test_health_serving_and_both_workers_serve(server, channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "tensorflow.serving.PredictionService"):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert server.output(tail=None).count("gRPC on ") == 2  # each worker serves the port


@pytest.mark.server
def test_rpcs_are_counted_and_logged(server, triton):
    from tritonclient.grpc import InferInput

    given = InferInput("image_bytes", [1], "BYTES")
    given.set_data_from_numpy(np.array(images()[:1], dtype=np.object_))
    triton.infer("colours", [given], headers={"x-api-key": KEY, "x-request-id": "grpc-log-1"})
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    assert metric(text, "classifier_requests_total",
                  route="/inference.GRPCInferenceService/ModelInfer", status="200") >= 1
    lines = [json.loads(line) for line in server.output(tail=None).splitlines()
             if line.startswith("{") and "grpc-log-1" in line]
    assert [(entry["route"], entry["status"], entry["key"], entry["model"])
            for entry in lines] == [("/inference.GRPCInferenceService/ModelInfer", 200, "ci",
                                     "colours/2")]


# -- a worker that does not run TensorFlow ------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory):
    """The demo model on ONNX Runtime: the worker does not import TensorFlow to serve, so by
    default (GRPC_TFSERVING=auto) TF Serving's services, whose stubs import it, are loaded at
    their first call (server.LazyTfServing)."""
    work = tmp_path_factory.mktemp("grpc-onnx")
    grpc_port = free_port()
    live = start_server(work, {"MODEL_PATH": os.path.join(ROOT, "tf_files", "demo"),
                               "RUNTIME": "onnx", "WORKERS": "1", "THREADS": "4",
                               "GRPC_PORT": str(grpc_port)})
    live.grpc_address = f"127.0.0.1:{grpc_port}"
    yield live
    live.stop()


@pytest.mark.server
def test_onnx_worker_serves_oip_at_once_and_tf_serving_from_its_first_call(onnx_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tritonclient.grpc import InferenceServerClient, InferInput, InferRequestedOutput

    star = open(os.path.join(ROOT, "docs", "examples", "star.png"), "rb").read()
    r = requests.post(onnx_server.url + "/classify", files={"image": ("s.png", star)},
                      timeout=60)
    assert r.status_code == 200, r.text
    expected = {p["label"]: p["score"] for p in r.json()["predictions"]}
    client = InferenceServerClient(onnx_server.grpc_address)
    try:
        assert client.get_model_metadata("demo").platform == "onnxruntime_onnx"
        config = client.get_model_config("demo").config
        assert (config.name, config.input[0].name, list(config.input[0].dims)) == \
            ("demo", "images", [64, 64, 3])
        given = InferInput("image_bytes", [1], "BYTES")
        given.set_data_from_numpy(np.array([star], dtype=np.object_))
        asked = InferRequestedOutput("probabilities", class_count=6)
        top = client.infer("demo", [given], outputs=[asked]).as_numpy("probabilities")[0]
    finally:
        client.close()
    for item in top:
        score, _, label = item.decode().split(":")
        assert abs(float(score) - expected[label]) < 1e-5, (expected, top)
    with grpc.insecure_channel(onnx_server.grpc_address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(
            service="inference.GRPCInferenceService"), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(
            service="tensorflow.serving.PredictionService"), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert "loaded at their first call" not in onnx_server.output(tail=None)
        # The first TF Serving call loads its stubs (and TensorFlow) in the worker: a few s.
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        request = predict_pb2.PredictRequest()
        request.model_spec.name = "demo"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto([star]))
        answer = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request,
                                                                               timeout=120)
        scores = tf.make_ndarray(answer.outputs["probabilities"])[0]
        labels = [line.strip() for line in open(os.path.join(ROOT, "tf_files", "demo",
                                                             "labels.txt")) if line.strip()]
        for label, score in zip(labels, scores):
            assert abs(float(score) - expected[label]) < 1e-5, (expected, scores)
        assert "loaded at their first call" in onnx_server.output(tail=None)
        with pytest.raises(grpc.RpcError) as caught:  # parsed by the method's own class
            ch.unary_unary("/tensorflow.serving.PredictionService/Predict")(b"\xff\xff",
                                                                             timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.server
def test_a_grpc_port_taken_stops_start_up_with_the_reason(tmp_path):
    """Another process holds GRPC_PORT (without SO_REUSEPORT): the worker fails to boot and
    the server stops, naming the setting, instead of serving HTTP alone."""
    model = save_colour_model(str(tmp_path / "colours"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, log = start_failing(tmp_path, {"MODEL_PATH": model, "WORKERS": "1",
                                             "THREADS": "4", "GRPC_PORT": str(port)})
    assert code != 0
    assert f"cannot serve gRPC on 127.0.0.1:{port} (GRPC_PORT)" in log


# -- settings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, port", [("8500", 8500), ("off", None), ("OFF", None), ("0", None),
                                       ("50051", 50051)])
def test_grpc_port_setting(raw, port):
    assert Config.from_env({"GRPC_PORT": raw}).grpc_port == port


@pytest.mark.parametrize("name, raw", [("GRPC_PORT", "70000"), ("GRPC_PORT", "-1"),
                                       ("GRPC_PORT", "grpc"), ("GRPC_MAX_WORKERS", "0"),
                                       ("GRPC_TFSERVING", "maybe")])
def test_bad_grpc_settings_stop_start_up(name, raw):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: raw})


def test_grpc_bounds_follow_the_upload_limit_and_threads():
    config = Config.from_env({"MAX_UPLOAD_MB": "2", "THREADS": "32"})
    assert config.max_body_bytes == 2 * 1024 * 1024 + 64 * 1024
    assert config.grpc_threads == 32 and config.grpc_tfserving is None
    assert dict(rpc_server.options(config))["grpc.max_receive_message_length"] == \
        config.max_body_bytes
    assert Config.from_env({"GRPC_MAX_WORKERS": "3"}).grpc_threads == 3
    assert Config.from_env({"GRPC_TFSERVING": "on"}).grpc_tfserving is True


# -- bad requests: a clean status each, and the server still answers ---------------------------
def _oip_request(datatype="BYTES", shape=(1,), data=None, model="colours"):
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images" if datatype != "BYTES" else "image_bytes",
                       datatype=datatype, shape=list(shape))
    if data is not None:
        request.raw_input_contents.append(data)
    return request


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


BAD_OIP = {
    "wrong dtype": (_oip_request("INT32", (1, 32, 32, 3), b"\0" * 4 * 32 * 32 * 3), AUTH,
                    grpc.StatusCode.INVALID_ARGUMENT),
    "wrong shape": (_oip_request("FP32", (1, 16, 16, 3), b"\0" * 4 * 16 * 16 * 3), AUTH,
                    grpc.StatusCode.INVALID_ARGUMENT),
    "data not the shape's": (_oip_request("FP32", (1, 32, 32, 3), b"\0" * 12), AUTH,
                             grpc.StatusCode.INVALID_ARGUMENT),
    "not an image": (_oip_request("BYTES", (1,), _bytes_tensor([b"not an image"])), AUTH,
                     grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (_oip_request(model="nope", data=_bytes_tensor([b"x"])), AUTH,
                      grpc.StatusCode.NOT_FOUND),
    "unknown version": (_oip_request(data=_bytes_tensor([b"x"])), AUTH,
                        grpc.StatusCode.NOT_FOUND),
    "too many images": (_oip_request("BYTES", (9,), _bytes_tensor([b"x"] * 9)), AUTH,
                        grpc.StatusCode.INVALID_ARGUMENT),
    "over the size limit": (_oip_request("BYTES", (1,), _bytes_tensor([b"\0" * 400_000])),
                            AUTH, grpc.StatusCode.RESOURCE_EXHAUSTED),
    "no key": (_oip_request(data=_bytes_tensor([b"x"])), (),
               grpc.StatusCode.UNAUTHENTICATED),
    "wrong key": (_oip_request(data=_bytes_tensor([b"x"])), (("x-api-key", "nope-" * 8),),
                  grpc.StatusCode.UNAUTHENTICATED),
    "key without the scope": (_oip_request(data=_bytes_tensor([b"x"])),
                              (("authorization", f"Bearer {METRICS_KEY}"),),
                              grpc.StatusCode.PERMISSION_DENIED),
}
BAD_OIP["unknown version"][0].model_version = "7"


def _still_serves(channel) -> None:
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
    answer = stub.ModelInfer(_oip_request(data=_bytes_tensor(images()[:1])), metadata=AUTH,
                             timeout=60)
    assert np.frombuffer(answer.raw_output_contents[0], "<f4").shape == (3,)


def _assert_clean(err: grpc.RpcError, code: grpc.StatusCode) -> None:
    assert err.code() == code, (err.code(), err.details())
    assert err.details() and "Traceback" not in err.details()


@pytest.mark.server
@pytest.mark.parametrize("case", sorted(BAD_OIP))
def test_oip_bad_request_gets_its_status(channel, case):
    from tritonclient.grpc import service_pb2_grpc

    request, metadata, code = BAD_OIP[case]
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=metadata, timeout=60)
    _assert_clean(caught.value, code)
    _still_serves(channel)


@pytest.mark.server
def test_malformed_protobuf_is_invalid_argument(channel):
    """Bytes that are not a ModelInferRequest, sent as one with a generic call."""
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as caught:
        call(b"\xff\xff\xff\xff\xff\xff", metadata=AUTH, timeout=60)
    _assert_clean(caught.value, grpc.StatusCode.INVALID_ARGUMENT)
    _still_serves(channel)


@pytest.mark.server
def test_unserved_methods_are_unimplemented(channel):
    for method in ("/inference.GRPCInferenceService/RepositoryIndex", "/no.Such/Method"):
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(method)(b"", metadata=AUTH, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    _still_serves(channel)


@pytest.mark.parametrize("case", ["wrong dtype", "wrong shape", "unknown model",
                                  "unknown signature", "no key"])
@pytest.mark.server
def test_tfserving_bad_request_gets_its_status(tfs, channel, case):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "nope" if case == "unknown model" else "colours"
    if case == "unknown signature":
        request.model_spec.signature_name = "other"
    value = {"wrong dtype": np.zeros((1, 32, 32, 3), np.int32),
             "wrong shape": np.zeros((1, 16, 16, 3), np.float32)}.get(case, images()[:1])
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(value))
    code = {"unknown model": grpc.StatusCode.NOT_FOUND,
            "no key": grpc.StatusCode.UNAUTHENTICATED}.get(case, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError) as caught:
        tfs[0].Predict(request, metadata=() if case == "no key" else AUTH, timeout=60)
    _assert_clean(caught.value, code)
    _still_serves(channel)


@pytest.mark.server
def test_a_refused_key_is_audited_with_the_client_a_trusted_proxy_names(server, channel):
    """As for HTTP (common/clients.py): from a peer in TRUSTED_PROXIES (here 127.0.0.1, as the
    pod's proxy) the right-most x-forwarded-for hop is the client; the key is never written."""
    wrong = "grpc-wrong-key-0123456789abcdef"
    for request_id, forwarded in (("grpc-audit-1", "198.51.100.7"),
                                  ("grpc-audit-2", "not-an-address")):
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")(
                b"", metadata=(("x-api-key", wrong), ("x-request-id", request_id),
                               ("x-forwarded-for", f"10.0.0.1, {forwarded}")), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with open(server.audit_path) as fh:
        text = fh.read()
    records = {r["request_id"]: r for r in map(json.loads, text.splitlines())
               if r["event"] == "key_rejected"}
    assert records["grpc-audit-1"]["client"] == "198.51.100.7"
    assert records["grpc-audit-2"]["client"] == "127.0.0.1"  # a malformed hop: the peer
    assert wrong not in text



def test_the_lazily_served_tf_serving_methods_are_the_ones_tfserving_serves():
    """One list of TF Serving's methods (``common/tfserving.py``): each is a method of its
    service in TF Serving's protos and of the servicer that answers it."""
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    from common.rpc import tfserving
    from common.tfserving import GRPC_METHODS

    assert rpc_server.LazyTfServing(None).scopes == tfserving.SCOPES
    assert set(GRPC_METHODS) == set(tfserving.SERVICES)
    servicers = {"tensorflow.serving.PredictionService": (
                     prediction_service_pb2, "PredictionService", tfserving.PredictionServicer),
                 "tensorflow.serving.ModelService": (
                     model_service_pb2, "ModelService", tfserving.ModelServicer)}
    for service, names in GRPC_METHODS.items():
        module, short, servicer = servicers[service]
        declared = module.DESCRIPTOR.services_by_name[short].methods_by_name
        for name in names:
            assert name in declared, (service, name)
            assert name in vars(servicer), (service, name)
