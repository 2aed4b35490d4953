"""Bounded parsing on the protocol routes (/v1 TF Serving, /v2 Open Inference Protocol): tiny
or hostile bodies must not cost the worker more than a bounded multiple of their size.

One real server (gunicorn, one worker) serves a repository with the colour model
(``colours/1``, 32x32 input) and a model whose only version is garbage (``broken/1``). Each
test sends real bytes and measures the worker: its CPU (``/proc/PID/stat`` utime + stime) and
its peak memory (``helpers.PeakMemory``) around the request. The bounds are generous (a few
times what the fixed server needs) yet far below what the unbounded parser cost: a refused
request may take at most 0.25 s of CPU per MiB of body.
"""
import base64
import json
import os

import imagegen as ig
import pytest
import requests
from helpers import PeakMemory, start_server
from tiny_models import save_colour_model

pytestmark = pytest.mark.server

MIB = 1 << 20
#: CPU a refused request may cost per MiB of body (the target in docs/BENCHMARKS.md, "Hostile
#: requests"), and at least (the kernel counts CPU in 10 ms ticks; the request's own handling is
#: a few of them).
CPU_PER_MIB, CPU_FLOOR = 0.25, 0.1
PNG = base64.b64encode(ig.png(ig.RED)).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("protocol_limits")
    repo = work / "repo"
    save_colour_model(str(repo / "colours" / "1"))
    garbage = repo / "broken" / "1"
    garbage.mkdir(parents=True)
    (garbage / "saved_model.pb").write_bytes(b"not a SavedModel")
    (garbage / "labels.txt").write_text("a\nb\n")
    live = start_server(work, {"MODEL_REPOSITORY": str(repo), "DEFAULT_MODEL": "colours",
                               "EXIT_ON_LOAD_FAILURE": "false", "MODEL_POLL_SECONDS": "0",
                               "WORKERS": "1", "THREADS": "4"})
    live.work = str(work)
    yield live
    live.stop()


def worker_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) the process has used."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured_post(server, path: str, body: bytes, **headers):
    """POST ``body``; returns (response, worker CPU seconds, worker peak memory rise MiB)."""
    pid = server.worker_pids()[0]
    memory = PeakMemory(pid).reset()
    before = worker_cpu(pid)
    r = requests.post(server.url + path, data=body, timeout=60,
                      headers={"Content-Type": "application/json", **headers})
    return r, worker_cpu(pid) - before, memory.rise_mb()


def assert_message_error(response, status: int) -> str:
    """The protocols' error: ``{"error": "<message>"}`` with this status."""
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


def log_size(server) -> int:
    return len(server.output(None))


def assert_no_traceback_since(server, start: int):
    """The server logged no traceback after ``start`` (a length of its log)."""
    assert "Traceback" not in server.output(None)[start:]


def infer_body(inputs: list, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


EIGHT_IMAGES = {"name": "images", "datatype": "BYTES", "shape": [8], "data": [PNG] * 8}


# -- 1. the v2 outputs list ------------------------------------------------------------------
def test_a_huge_v2_outputs_list_is_refused_before_any_work(server):
    """150,000 copies of the one output beside 8 images (3.6 MiB) once made a 148 MiB answer."""
    body = infer_body([EIGHT_IMAGES], outputs=[{"name": "probabilities"}] * 150_000)
    r, cpu, rise = measured_post(server, "/v2/models/colours/infer", body)
    assert_message_error(r, 400)
    assert len(r.content) < 1000
    assert cpu <= max(CPU_PER_MIB * len(body) / MIB, CPU_FLOOR), cpu
    assert rise < 64, rise


@pytest.mark.parametrize("outputs", [
    [{"name": "probabilities"}] * 2,
    [{"name": "probabilities"}] + [{"name": "logits"}],
    [{"name": "logits"}],
    [{"name": "probabilities", "parameters": {"classification": 1}}] * 9,
], ids=["twice", "one unknown", "unknown", "nine entries"])
def test_v2_outputs_name_the_model_output_at_most_once(server, outputs):
    """The model has one output: a list that names another, or this one twice or more, is
    refused before inference; the same request with its first entry alone is answered."""
    r = requests.post(server.url + "/v2/models/colours/infer", timeout=30,
                      data=infer_body([EIGHT_IMAGES], outputs=outputs))
    assert_message_error(r, 400)
    one = requests.post(server.url + "/v2/models/colours/infer", timeout=30,
                        data=infer_body([EIGHT_IMAGES], outputs=outputs[:1]))
    if outputs[0]["name"] == "probabilities":
        assert one.status_code == 200, one.text
        assert [o["name"] for o in one.json()["outputs"]] == ["probabilities"]
    else:
        assert_message_error(one, 400)


# -- 2. TF Serving's :classify context ------------------------------------------------------
def test_classify_context_does_not_multiply_by_the_examples(server):
    """4,000 context keys x 8,000 empty examples (0.1 MiB) once cost 4.3 s of CPU."""
    context = {"image/encoded": {"b64": PNG}, **{f"k{i}": 1 for i in range(3999)}}
    body = json.dumps({"context": context, "examples": [{}] * 8000}).encode()
    r, cpu, rise = measured_post(server, "/v1/models/colours:classify", body)
    assert_message_error(r, 400)
    assert cpu <= CPU_FLOOR, cpu
    assert rise < 32, rise


@pytest.mark.parametrize("body", [
    {"context": {"image/encoded": {"b64": PNG}, **{f"k{i}": 1 for i in range(8)}},
     "examples": [{}]},
    {"examples": [{"image/encoded": {"b64": PNG}, **{f"k{i}": 1 for i in range(8)}}]},
    {"context": {"image/encoded": {"b64": PNG}}, "examples": [{}] * 9},
], ids=["9 context features", "9 example features", "9 examples"])
def test_classify_features_and_examples_are_counted_first(server, body):
    """At most MAX_FEATURES features in the context and in each example, and at most
    MAX_IMAGES_PER_REQUEST examples, checked before any example is built."""
    r = requests.post(server.url + "/v1/models/colours:classify", json=body, timeout=30)
    assert_message_error(r, 400)


# -- 3. bodies refused before they become millions of Python objects -------------------------
def _bytes_elements(size: int) -> bytes:
    n = size // 3
    return (b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[%d],"data":[' % n
            + b",".join([b'""'] * n) + b"]}]}")


def _instances(size: int, item: bytes) -> bytes:
    n = size // (len(item) + 1) - 16
    return b'{"instances":[' + b",".join([item] * n) + b"]}"


@pytest.mark.parametrize("path, body", [
    ("/v2/models/colours/infer", _bytes_elements(8 * MIB)),  # 2.8 M empty BYTES elements
    ("/v1/models/colours:predict", _instances(16 * MIB, b"0")),  # 8.4 M numbers
    ("/v1/models/colours:predict", _instances(16 * MIB, b"{}")),  # 5.6 M objects
], ids=["v2 BYTES elements", "v1 numbers", "v1 objects"])
def test_a_refused_body_costs_at_most_a_quarter_second_per_mib(server, path, body):
    r, cpu, rise = measured_post(server, path, body)
    assert r.status_code in (400, 413), r.text[:300]
    assert_message_error(r, r.status_code)
    mib = len(body) / MIB
    assert cpu <= max(CPU_PER_MIB * mib, CPU_FLOOR), (cpu, mib)
    assert rise < 4 * mib + 32, (rise, mib)  # the body itself, a copy or two; never 300 MiB


def _chunks(size: int):
    """A ``:predict`` body of ``size`` bytes of numbers, sent chunked (no Content-Length)."""
    chunk = b"0," * 32768
    yield b'{"instances":['
    for _ in range(size // len(chunk)):
        yield chunk
    yield b"0]}"


def test_a_chunked_body_over_the_limit_is_413_not_parsed_cut_short(server):
    """A chunked body has no Content-Length to refuse; it is read up to the limit and refused
    once it passes it (werkzeug alone stops at the limit and hands on the first 16 MiB)."""
    pid = server.worker_pids()[0]
    memory, before = PeakMemory(pid).reset(), worker_cpu(pid)
    r = requests.post(server.url + "/v1/models/colours:predict", data=_chunks(24 * MIB),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert_message_error(r, 413)
    assert worker_cpu(pid) - before <= CPU_PER_MIB * 24, "CPU"
    assert memory.rise_mb() < 4 * 16 + 32


def test_a_valid_tensor_is_still_parsed(server):
    """The counts leave room for the largest valid request: 8 float images [32, 32, 3]."""
    tensor = [[[[0.9, 0.1, 0.1]] * 32] * 32] * 8
    r = requests.post(server.url + "/v1/models/colours:predict", json={"instances": tensor},
                      timeout=30)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["predictions"]) == 8


# -- 4. shapes with checked arithmetic --------------------------------------------------------
FP32 = {"name": "images", "datatype": "FP32"}
BYTES = {"name": "images", "datatype": "BYTES"}


SHAPES = {
    "2^62+1 x 4 (int64 wraps to 4)": ({**FP32, "shape": [4611686018427387905, 4],
                                        "data": [0.5] * 4}, b""),
    "above 2^64": ({**BYTES, "shape": [2 ** 70], "data": [PNG]}, b""),
    "0 x 2^70": ({**FP32, "shape": [0, 2 ** 70], "parameters": {"binary_data_size": 0}}, b""),
    "2^62 x 4 (int64 wraps to 0)": ({**FP32, "shape": [2 ** 62, 4],
                                     "parameters": {"binary_data_size": 0}}, b""),
    "negative": ({**FP32, "shape": [-1, 32, 32, 3], "data": [0.5] * 3072}, b""),
    "float": ({**FP32, "shape": [1, 32.0, 32, 3], "data": [0.5] * 3072}, b""),
    "string": ({**FP32, "shape": [1, 32, 32, "3"], "data": [0.5] * 3072}, b""),
    "boolean": ({**FP32, "shape": [1, 32, 32, True], "data": [0.5] * 32 * 32}, b""),
    "rank 9": ({**FP32, "shape": [1] * 9, "data": [0.5]}, b""),
    "FP32 data short of the shape": ({**FP32, "shape": [1, 32, 32, 3],
                                      "data": [0.5] * 3071}, b""),
    "BYTES data short of the shape": ({**BYTES, "shape": [2], "data": [PNG]}, b""),
    "binary FP32 short of the shape": ({**FP32, "shape": [1, 32, 32, 3],
                                        "parameters": {"binary_data_size": 8}}, b"\0" * 8),
    "binary BYTES over the shape": ({**BYTES, "shape": [1],
                                     "parameters": {"binary_data_size": 8}}, b"\0" * 8),
}


@pytest.mark.parametrize("spec, binary", SHAPES.values(), ids=SHAPES.keys())
def test_impossible_shapes_answer_400(server, spec, binary):
    """Shapes are checked in exact arithmetic (the first four once answered 500, each with a
    traceback in the log); the rest must stay 400."""
    head = infer_body([spec])
    headers = {"Inference-Header-Content-Length": str(len(head))} if binary else {}
    start = log_size(server)
    r = requests.post(server.url + "/v2/models/colours/infer", data=head + binary,
                      headers={"Content-Type": "application/json", **headers}, timeout=30)
    assert_message_error(r, 400)
    assert_no_traceback_since(server, start)


# -- 5. no server paths in answers --------------------------------------------------------------
@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models/broken"), ("GET", "/v1/models/broken/versions/1"),
    ("GET", "/v1/models/broken/metadata"), ("POST", "/v1/models/broken:predict"),
    ("GET", "/v2/models/broken"), ("GET", "/v2/models/broken/versions/1"),
    ("POST", "/v2/models/broken/infer")])
def test_a_broken_model_answer_shows_no_server_path(server, method, path):
    """A version that failed to load says why (the status' ``error_message``, the 503's
    message), naming no folder of the server."""
    body = infer_body([EIGHT_IMAGES]) if "infer" in path else json.dumps(
        {"instances": [{"b64": PNG}]}).encode()
    r = requests.request(method, server.url + path, timeout=10,
                         data=body if method == "POST" else None)
    assert r.status_code in (200, 503), r.text
    assert "saved_model.pb" in r.text or "SavedModel" in r.text, r.text  # it says why
    assert server.work not in r.text and os.path.realpath(server.work) not in r.text, r.text
