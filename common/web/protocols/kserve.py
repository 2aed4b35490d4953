"""The Open Inference Protocol (KServe v2) REST API, with Triton's binary tensor data and
classification extensions, over the DataPlane that ``blueprint(dataplane)`` is handed.

* ``GET /v2/health/live`` ``{"live": true}``; ``GET /v2/health/ready`` ``{"ready": bool}``
  (every model has a ready version; 503 otherwise); ``GET /v2`` the server's metadata.
* ``GET /v2/models/{m}[/versions/{v}]``: the model's metadata (``images`` FP32
  ``[-1, h, w, 3]`` and ``image_bytes`` BYTES ``[-1]`` -> ``probabilities`` FP32
  ``[-1, labels]``; a model that takes encoded images lists only its own input, BYTES
  ``[-1]``, and answers a FP32/UINT8 tensor 400); ``.../ready``.
* ``POST /v2/models/{m}[/versions/{v}]/infer`` with one input: FP32 ``[N, h, w, 3]`` in [0, 1]
  (``data`` flat or nested), or BYTES ``[N]`` of encoded images (in JSON each element a base64
  string, as KServe's REST examples send them; as binary data each element the raw bytes, as
  Triton's clients send them). Output ``probabilities`` FP32 ``[N, labels]``, or with the
  output parameter ``"classification": k`` BYTES ``[N, k]`` of ``"score:index:label"``.
* Binary tensor data (``Inference-Header-Content-Length``): inputs with ``binary_data_size``
  are read from the bytes after the JSON header (FP32 little-endian / UINT8, row-major, in
  the JSON's shape; BYTES as Triton's length-prefixed elements); outputs asked for with
  ``"binary_data": true`` (or the request's ``"binary_data_output": true``) are written after
  the JSON answer. A header length of 0 is a raw binary request: the whole body is one
  encoded image.
* The input's ``name`` is the model's own input tensor's (its metadata's first input) or
  ``image_bytes`` (BYTES only); another is 400 naming them. ``outputs`` absent or ``[]``: every
  output.
* Compression: a body with ``Content-Encoding: gzip`` or ``deflate`` is inflated within the
  upload limit (``routes.body_bytes``; another encoding 415); the answer is compressed when
  ``Accept-Encoding`` asks for gzip or deflate (``base.compressed``), as Triton does.
* Extensions beside inference: ``GET /v2/models/{m}[/versions/{v}]/config`` (Triton's model
  configuration, ``common.oip.model_config``) and ``GET /v2/models[/{m}[/versions/{v}]]/stats``
  (the statistics extension, this worker's counts: ``common.oip.model_stats``).

* Bounds (``base.Limits``): a body holds no more JSON than ``MAX_IMAGES_PER_REQUEST`` images
  can (counted on its bytes before parsing), one input whose shape has 1 to ``MAX_RANK``
  dimensions with a product (exact) within the limits and equal to its data, and ``outputs``
  naming ``probabilities`` once; all checked before inference.

Errors are ``{"error": "message"}`` with our statuses (400, 404, 405, 413, 415, 422, 503), on
every ``/v2`` path, routed or not (``error_handlers.envelope_for``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from flask import Blueprint, Response, jsonify, request

from common import oip
from common.dataplane import DataPlane, Images, Inference
from common.errors import InvalidParameter, TooManyImages
from common.oip import (BYTES_CONTENT, BYTES_INPUT, OUTPUT, classes, deserialize_bytes,
                        serialize_bytes)
from common.web import error_handlers
from common.web.binding import Views
from common.web.protocols.base import (
    MAX_OUTPUTS,
    MAX_RANK,
    Limits,
    compressed,
    decode_b64,
    float_tensor,
    read_json,
    route,
    run,
)

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics",
              "model_repository", "model_repository(unload_dependents)"]
HEADER_LENGTH = "Inference-Header-Content-Length"

views = Views()


def blueprint(dataplane: DataPlane) -> Blueprint:
    """The ``/v2`` routes over ``dataplane``, answering errors in the protocol's shape."""
    bp = Blueprint("kserve", __name__, url_prefix="/v2")
    error_handlers.install_handler(bp, "message")
    return views.bind(bp, dataplane)


# -- health and metadata ---------------------------------------------------------------------
@views.get("/health/live")
def live(dataplane: DataPlane):
    return jsonify({"live": True})


@views.get("/health/ready")
def ready(dataplane: DataPlane):
    """Ready when every model has a version that is ready and every worker is warm (503
    otherwise, for probes)."""
    ok = oip.server_ready(dataplane)
    return jsonify({"ready": ok}), 200 if ok else 503


@views.get("")
def server_metadata(dataplane: DataPlane):
    return jsonify({"name": oip.SERVER_NAME, "version": oip.SERVER_VERSION,
                    "extensions": EXTENSIONS})


@views.get("/models/<name>")
@views.get("/models/<name>/versions/<version>")
def model_metadata(dataplane: DataPlane, name, version=None):
    metadata = oip.model_metadata(dataplane, name, version)
    metadata["inputs"] = [{"name": t["name"], "datatype": t["datatype"], "shape": t["shape"],
                           "parameters": {"content": BYTES_CONTENT} if t["datatype"] == "BYTES"
                           else {"layout": t["layout"]}} for t in metadata["inputs"]]
    return jsonify(metadata)


@views.get("/models/<name>/ready")
@views.get("/models/<name>/versions/<version>/ready")
def model_ready(dataplane: DataPlane, name, version=None):
    """``{"name", "ready"}``: 200 when ready, 503 while loading or failed (404 unknown)."""
    ok = dataplane.served(route(name, version)).health().ready
    return jsonify({"name": name, "ready": ok}), 200 if ok else 503


# -- model configuration and statistics extensions -------------------------------------------
@views.get("/models/<name>/config")
@views.get("/models/<name>/versions/<version>/config")
def model_config(dataplane: DataPlane, name, version=None):
    """Triton's model configuration (model_config.proto's JSON; ``common.oip.model_config``)."""
    return jsonify(oip.model_config(dataplane, name, version))


@views.get("/models/stats")
@views.get("/models/<name>/stats")
@views.get("/models/<name>/versions/<version>/stats")
def model_stats(dataplane: DataPlane, name=None, version=None):
    """The statistics extension: ``{"model_stats": [...]}`` of every loaded version, of one
    model's, or of one version (``common.oip.model_stats``: this worker's counts)."""
    return jsonify(oip.model_stats(dataplane, name, version))


# -- inference -------------------------------------------------------------------------------
@views.post("/models/<name>/infer")
@views.post("/models/<name>/versions/<version>/infer")
def model_infer(dataplane: DataPlane, name, version=None):
    """One input of images -> the ``probabilities`` output, as scores or classes, in JSON or
    binary. The body is read once the request is admitted (as every protocol route's)."""
    target = route(name, version)
    header_length = request.headers.get(HEADER_LENGTH)
    done = run(dataplane, target, lambda raw, limits: parse_infer(raw, header_length, limits),
               "kserve")
    return compressed(_response(name, done))


def _response(name: str, done: Inference) -> Response:
    """The answer to an ``infer`` request: JSON, or JSON then the binary outputs."""
    asked, classifier, scores = done.request, done.classifier, done.scores
    answer = {"model_name": name, "model_version": str(classifier.version)}
    if asked.id is not None:
        answer["id"] = asked.id
    outputs, chunks = [], []
    for spec in asked.outputs:
        output = _output(spec, scores, classifier.labels)
        if spec["binary"]:
            data = output.pop("data")
            chunks.append(data)
            output["parameters"] = {"binary_data_size": len(data)}
        outputs.append(output)
    answer["outputs"] = outputs
    if not chunks:
        return jsonify(answer)
    head = json.dumps(answer).encode()
    return Response(b"".join([head, *chunks]), mimetype="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(head))})


@dataclass(frozen=True)
class InferRequest(Images):
    """A parsed ``infer`` body: its one input (``inputs``: float32 ``[N, h, w, 3]`` or encoded
    images), the outputs asked for (see :func:`_outputs`) and the request's ``id``."""

    outputs: list[dict]
    id: str | None = None


def parse_infer(raw: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """An ``infer`` body (``header_length``: its ``Inference-Header-Content-Length``, if any)
    -> what it asks for, or 400/413. Every count is checked against ``limits`` before anything
    is built per element, so no body costs more than a bounded multiple of a valid one."""
    header, binary = _split_body(raw, header_length)
    if header is None:  # raw binary request: the body is one encoded image
        return InferRequest([binary], [{"name": OUTPUT, "classification": 0, "binary": True}])
    body = read_json(header, limits)
    if "id" in body and not isinstance(body["id"], str):
        raise InvalidParameter("'id' must be a string")
    outputs = _outputs(body)
    return InferRequest(_input(body, binary, limits), outputs, body.get("id"))


def _split_body(raw: bytes, given: str | None) -> tuple[bytes | None, bytes]:
    """(JSON header, binary data after it); (None, body) for a raw binary request."""
    if given is None:
        return raw, b""
    if not given.strip().isdigit() or int(given) > len(raw):
        raise InvalidParameter(f"{HEADER_LENGTH} must be a whole number of bytes no larger "
                               f"than the body ({len(raw)}), got {given[:20]!r}")
    length = int(given)
    return (None, raw) if length == 0 else (raw[:length], raw[length:])


def _input(body: dict, binary: bytes, limits: Limits):
    """The one input -> float32 ``[N, h, w, 3]`` (FP32) or a list of encoded images (BYTES)."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidParameter("'inputs' must be a list of one input (FP32 images [N, h, w, 3] "
                               "or BYTES encoded images [N])")
    spec = inputs[0]
    limits.check_input_name(spec.get("name"), "'inputs'[0].name")
    datatype = spec.get("datatype")
    if spec.get("name") == BYTES_INPUT and datatype != "BYTES" and \
            limits.input_names[:1] != (BYTES_INPUT,):  # unless the model's own is so named
        raise InvalidParameter(f"input {BYTES_INPUT!r} holds encoded images: its datatype is "
                               f"BYTES, got {str(datatype)[:20]!r}")
    if datatype not in ("FP32", "UINT8", "BYTES"):
        raise InvalidParameter(f"input datatype must be FP32 or UINT8 (the model's input "
                               f"tensor, as its metadata shows) or BYTES (encoded images), got "
                               f"{str(datatype)[:20]!r}")
    shape, count = _shape(spec.get("shape"), datatype, limits)
    size = _binary_size(spec)
    if size is not None and size != len(binary):
        raise InvalidParameter(f"binary_data_size is {size} but {len(binary)} bytes follow the "
                               f"JSON header")
    if size is None and binary:
        raise InvalidParameter(f"{len(binary)} bytes follow the JSON header but no input has "
                               f"binary_data_size")
    if datatype in ("FP32", "UINT8"):
        if size is not None:
            width = 4 if datatype == "FP32" else 1
            if size != count * width:
                raise InvalidParameter(f"{datatype} shape {shape} needs {count * width} bytes, "
                                       f"got {size}")
            array = np.frombuffer(binary, dtype="<f4" if width == 4 else np.uint8
                                  ).astype(np.float32)
            if not np.isfinite(array).all():
                raise InvalidParameter("the input has NaN or infinite values")
        else:
            array = float_tensor(spec.get("data"), "input 'data'").reshape(-1)
            if array.size != count:
                raise InvalidParameter(f"shape {shape} needs {count} values, got {array.size}")
        return array.reshape(shape)
    if size is not None:
        return deserialize_bytes(binary, count)
    images = [decode_b64(v, f"input 'data'[{i}]", limits.max_upload_bytes)
              for i, v in enumerate(_flatten(spec.get("data"), count))]
    if len(images) != count:
        raise InvalidParameter(f"shape {shape} needs {count} elements, got {len(images)}")
    return images


def _shape(shape, datatype: str, limits: Limits) -> tuple[list[int], int]:
    """The input's shape and its element count, in exact integer arithmetic (no overflow, so
    no dimension can wrap the count into a small one): 1 to ``MAX_RANK`` whole numbers >= 0,
    neither the count nor any dimension above what ``limits`` allow (BYTES: images; FP32: the
    numbers of that many float images)."""
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK or not all(
            type(d) is int and d >= 0 for d in shape):
        raise InvalidParameter(f"input 'shape' must be a list of 1 to {MAX_RANK} whole "
                               f"numbers >= 0, got {json.dumps(shape)[:80]}")
    count = math.prod(shape)
    most = limits.max_images if datatype == "BYTES" else limits.max_tensor_values
    if count > most or max(shape) > most:  # a dimension too, in case another is 0
        raise TooManyImages(f"input shape {json.dumps(shape)[:80]} holds more {datatype} "
                            f"elements than {limits.max_images} images (MAX_IMAGES_PER_REQUEST)"
                            f" can ({most})")
    return shape, count


def _flatten(data, most: int) -> list:
    """BYTES ``data``, flat or nested lists -> its elements in row-major order; 400 past
    ``most`` elements (the shape's count), before the rest is walked."""
    if not isinstance(data, list):
        raise InvalidParameter("input 'data' must be a list")
    flat, todo = [], [iter(data)]
    while todo:
        item = next(todo[-1], StopIteration)
        if item is StopIteration:
            todo.pop()
        elif isinstance(item, list):
            todo.append(iter(item))
        elif len(flat) == most:
            raise InvalidParameter(f"input 'data' has more elements than its shape ({most})")
        else:
            flat.append(item)
    return flat


def _binary_size(spec: dict) -> int | None:
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidParameter("input 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise InvalidParameter("binary_data_size must be a whole number")
    return size


def _outputs(body: dict) -> list[dict]:
    """The outputs asked for: name, classification count (0: the scores), binary or JSON.
    The model has one output, so at most ``MAX_OUTPUTS`` entries are read and each name may
    appear once: the answer never grows with the number of entries. No ``outputs``, or an
    empty list, asks for every output (the protocol's rule)."""
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidParameter("'parameters' must be an object")
    binary_default = parameters.get("binary_data_output", False) is True
    asked = body.get("outputs")
    if asked is None or asked == []:  # the spec: none named, every output
        return [{"name": OUTPUT, "classification": 0, "binary": binary_default}]
    if not isinstance(asked, list) or len(asked) > MAX_OUTPUTS or not all(
            isinstance(o, dict) for o in asked):
        raise InvalidParameter(f"'outputs' must be a list of at most {MAX_OUTPUTS} objects, "
                               f"each naming the model's output {OUTPUT!r} once")
    specs = []
    for output in asked:
        if output.get("name") != OUTPUT:
            raise InvalidParameter(f"unexpected inference output {str(output.get('name'))[:40]!r}"
                                   f": the model's output is {OUTPUT!r}")
        if specs:
            raise InvalidParameter(f"output {OUTPUT!r} is asked for more than once")
        params = output.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidParameter("output 'parameters' must be an object")
        count = params.get("classification", 0)
        if type(count) is not int or count < 0:
            raise InvalidParameter("'classification' must be a whole number of classes")
        binary = params.get("binary_data", binary_default)
        specs.append({"name": OUTPUT, "classification": count, "binary": binary is True})
    return specs


def _output(spec: dict, scores: np.ndarray, labels: list[str]) -> dict:
    """One response output; ``data`` is bytes for a binary output, a flat list otherwise."""
    n = scores.shape[0]
    if spec["classification"]:
        k = min(spec["classification"], len(labels))
        strings = classes(scores, labels, k)  # Triton's "score:index:label"
        data = serialize_bytes(strings) if spec["binary"] else strings
        return {"name": OUTPUT, "datatype": "BYTES", "shape": [n, k], "data": data}
    data = scores.astype("<f4").tobytes() if spec["binary"] else scores.reshape(-1).tolist()
    return {"name": OUTPUT, "datatype": "FP32", "shape": list(scores.shape), "data": data}

