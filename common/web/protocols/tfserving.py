"""TensorFlow Serving's REST API (``tensorflow_serving/g3doc/api_rest.md``), over the DataPlane
that ``blueprint(dataplane)`` is handed.

Routes, each also under ``/versions/{v}`` or ``/labels/{l}`` after the model name:

* ``GET /v1/models/{m}``: ``{"model_version_status": [{"version", "state", "status":
  {"error_code", "error_message"}}]}`` (GetModelStatusResponse); states AVAILABLE, LOADING,
  END (a failed load: its error in ``error_message``);
* ``GET /v1/models/{m}/metadata``: the ``serving_default`` signature (the model's real input,
  e.g. ``images`` DT_FLOAT ``[-1, h, w, 3]``, and ``image_bytes`` DT_STRING ``[-1]`` ->
  ``probabilities`` DT_FLOAT ``[-1, labels]``; a model that takes encoded images has only its
  own input, DT_STRING ``[-1]``, and answers a float tensor 400);
* ``POST /v1/models/{m}:predict``: ``instances`` (row) or ``inputs`` (columnar); each image
  as ``{"b64": ...}`` (alone or under an input name) or as a float ``[h, w, 3]`` tensor in
  [0, 1], as a client of a float-input SavedModel sends it -> ``{"predictions": [[score per
  label], ...]}`` or ``{"outputs": ...}``;
* ``POST /v1/models/{m}:classify``: ``examples`` whose image feature is ``{"b64": ...}``
  (``image/encoded``, ``image``, ...) -> ``{"results": [[[label, score], ...], ...]}`` ranked.

An input given under a name (``{"inputs": {name: ...}}``, ``{"instances": [{name: ...}]}``)
must name one the signature has: the model's own input tensor's (``images`` for our own
models) or ``image_bytes`` (400 otherwise, naming them). A body with ``Content-Encoding: gzip``
or ``deflate`` is inflated within the upload limit; answers are compressed when
``Accept-Encoding`` asks (``base.compressed``).

Bodies are bounded (``base.Limits``): no more JSON than ``MAX_IMAGES_PER_REQUEST`` images can
hold (counted on the bytes before parsing), at most that many rows or examples (counted before
any is built), at most ``MAX_FEATURES`` features in ``context`` and in each example.

Errors are TF Serving's ``{"error": "message"}`` with our statuses (400, 404, 405, 413, 415,
422, 503 with Retry-After), on every ``/v1`` path, routed or not.
"""
from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, jsonify
from werkzeug.routing import BaseConverter

from common.dataplane import DataPlane, Images
from common.errors import InvalidParameter
from common.oip import BYTES_INPUT, OUTPUT
from common.tfserving import SIGNATURE, STATES, image_feature, input_tensor, version_statuses
from common.versions.served import State
from common.web import error_handlers
from common.web.binding import Views
from common.web.protocols.base import (
    MAX_FEATURES,
    Limits,
    check_image_count,
    compressed,
    decode_b64,
    float_tensor,
    is_b64,
    read_json,
    route,
    run,
)


class Segment(BaseConverter):
    """A name, version or label in a /v1 URL: no ``/`` and no ``:`` (as TF Serving's own
    pattern), so ``/v1/models/m:predict`` is the predict route of ``m`` and never the status
    of a model named ``m:predict``."""

    regex = "[^/:]+"




views = Views()


def blueprint(dataplane: DataPlane) -> Blueprint:
    """The ``/v1/models`` routes over ``dataplane``, answering errors in TF Serving's shape."""
    bp = Blueprint("tfserving", __name__, url_prefix="/v1/models")
    error_handlers.install_handler(bp, "message")
    bp.record_once(lambda state: state.app.url_map.converters.setdefault("segment", Segment))
    return views.bind(bp, dataplane)


# -- status and metadata ---------------------------------------------------------------------
@views.get("/<segment:name>")
@views.get("/<segment:name>/versions/<segment:version>")
@views.get("/<segment:name>/labels/<segment:label>")
def model_status(dataplane: DataPlane, name, version=None, label=None):
    """GetModelStatusResponse: every version (or the one asked for), its state and error."""
    _, versions = version_statuses(dataplane, name, route(name, version).version, label)
    return jsonify({"model_version_status": [
        {"version": str(v["version"]), "state": STATES[State(v["state"])][0],
         "status": {"error_code": STATES[State(v["state"])][1],
                    "error_message": v["error"] or ""}} for v in versions]})


@views.get("/<segment:name>/metadata")
@views.get("/<segment:name>/versions/<segment:version>/metadata")
@views.get("/<segment:name>/labels/<segment:label>/metadata")
def model_metadata(dataplane: DataPlane, name, version=None, label=None):
    """GetModelMetadataResponse: the model spec and its serving signature."""
    served = dataplane.served(route(name, version, label))
    clf = served.classifier  # 503 while it is not ready
    real = clf.describe_input()
    inputs = {real["name"]: _tensor_info(real["shape"], input_tensor(clf), real["dtype"])}
    if not clf.spec.encoded:  # a model that takes encoded images has only its own input
        inputs[BYTES_INPUT] = _tensor_info([-1], BYTES_INPUT, "string")
    return jsonify({
        "model_spec": {"name": name, "signature_name": "",
                       "version": str(served.version)},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: {
            "inputs": inputs,
            "outputs": {OUTPUT: _tensor_info([-1, len(clf.labels)],
                                             "StatefulPartitionedCall:0")},
            "method_name": "tensorflow/serving/predict",
            "defaults": {}}}}}})


def _tensor_info(shape: list[int], tensor: str, dtype: str = "float32") -> dict:
    """A signature's TensorInfo: ``dtype`` (float32, uint8 or string), shape (-1: any)."""
    return {"dtype": {"float32": "DT_FLOAT", "uint8": "DT_UINT8", "string": "DT_STRING"}[dtype],
            "tensor_shape": {"dim": [{"size": str(size), "name": ""} for size in shape],
                             "unknown_rank": False},
            "name": tensor}


# -- predict and classify --------------------------------------------------------------------
@views.post("/<segment:name>:predict")
@views.post("/<segment:name>/versions/<segment:version>:predict")
@views.post("/<segment:name>/labels/<segment:label>:predict")
def model_predict(dataplane: DataPlane, name, version=None, label=None):
    """Row (``instances``) or columnar (``inputs``) request -> the ``probabilities`` output.
    The body is read once the request is admitted (as every protocol route's)."""
    target = route(name, version, label)
    done = run(dataplane, target, parse_predict, "tfserving")
    return compressed(jsonify({done.request.key: done.scores.tolist()}))


@views.post("/<segment:name>:classify")
@views.post("/<segment:name>/versions/<segment:version>:classify")
@views.post("/<segment:name>/labels/<segment:label>:classify")
def model_classify(dataplane: DataPlane, name, version=None, label=None):
    """``examples`` with an encoded image feature -> ranked ``[label, score]`` pairs each."""
    target = route(name, version, label)
    done = run(dataplane, target, parse_classify, "tfserving")
    return compressed(jsonify({"results": [[[p.label, p.score]
                                            for p in done.classifier.rank(row)]
                                           for row in done.scores]}))


@dataclass(frozen=True)
class PredictRequest(Images):
    """A parsed ``:predict`` body: its images, and the answer's key (``predictions`` for a row
    request, ``outputs`` for a columnar one)."""

    key: str


def parse_predict(raw: bytes, limits: Limits) -> PredictRequest:
    """A ``:predict`` body -> its encoded images or float tensor and the answer's key, or
    400/413. The rows are counted against ``limits`` before anything is built per row."""
    body = read_json(raw, limits)
    _check_signature(body)
    if "instances" in body and "inputs" in body:
        raise InvalidParameter("expecting only one of 'inputs' or 'instances' keys")
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise InvalidParameter("'instances' must be a non-empty list")
        check_image_count(len(rows), limits, "instances")
        rows = [_unname(row, f"instances[{i}]", limits) for i, row in enumerate(rows)]
        return PredictRequest(_rows(rows, "predictions", limits), "predictions")
    if "inputs" in body:
        rows = _unname(body["inputs"], "inputs", limits)
        rows = [rows] if is_b64(rows) else rows
        if not isinstance(rows, list) or not rows:
            raise InvalidParameter("'inputs' must be a non-empty list, or one {\"b64\": ...}")
        check_image_count(len(rows), limits, "inputs")
        return PredictRequest(_rows(rows, "outputs", limits), "outputs")
    raise InvalidParameter("Missing 'inputs' or 'instances' key")


def parse_classify(raw: bytes, limits: Limits) -> Images:
    """A ``:classify`` body -> the encoded image of each example, or 400/413. The examples are
    counted, and the features of ``context`` and of each example bounded (``MAX_FEATURES``),
    before any example is looked at: the work grows with the examples, never with
    features x examples."""
    body = read_json(raw, limits)
    _check_signature(body, "tensorflow/serving/classify")
    examples, context = body.get("examples"), body.get("context", {})
    if not isinstance(examples, list) or not examples:
        raise InvalidParameter("'examples' must be a non-empty list of objects")
    check_image_count(len(examples), limits, "examples")
    _check_features(context, "'context'")
    return Images([_example_image(example, context, i, limits)
                   for i, example in enumerate(examples)])


def _check_signature(body: dict, *also: str) -> None:
    signature = body.get("signature_name", "")
    if not isinstance(signature, str):
        raise InvalidParameter("'signature_name' key must be a string value")
    if signature not in ("", SIGNATURE, *also):
        raise InvalidParameter(f'Serving signature name: "{signature[:60]}" not found in '
                               f"signature def")


def _check_features(features, where: str) -> None:
    """An example or the context: an object of at most ``MAX_FEATURES`` features."""
    if not isinstance(features, dict):
        raise InvalidParameter(f"{where} must be an object of features")
    if len(features) > MAX_FEATURES:
        raise InvalidParameter(f"{where} has {len(features)} features; at most {MAX_FEATURES} "
                               f"(the model reads one image feature)")


def _unname(value, where: str, limits: Limits):
    """A value given under an input name -> the value; others pass unchanged. The name must be
    one the signature has (the model's own input tensor's, or ``image_bytes`` for encoded
    images: what the metadata lists), else 400 naming them, as TF Serving answers."""
    if isinstance(value, dict) and not is_b64(value):
        if len(value) != 1:
            raise InvalidParameter(f"{where}: the model has one input, got "
                                   f"{len(value)} keys")
        (name, inner), = value.items()
        limits.check_input_name(name, where)
        return inner
    return value


def _rows(rows: list, what: str, limits: Limits):
    """Rows that are all ``{"b64"}`` images -> their bytes; otherwise one float tensor."""
    images = [is_b64(row) for row in rows]
    if all(images):
        return [decode_b64(row["b64"], f"{what}[{i}].b64", limits.max_upload_bytes)
                for i, row in enumerate(rows)]
    if any(images):
        raise InvalidParameter("mix of {\"b64\": ...} images and tensors in one request")
    return float_tensor(rows, "the input tensor")


def _example_image(example, context: dict, index: int, limits: Limits) -> bytes:
    """The encoded image of one tf.Example given as JSON: a known feature name holding
    ``{"b64": ...}`` (or a one-element list of it), else the one feature that holds one."""
    where = f"examples[{index}]"
    _check_features(example, where)
    shared = set(example) & set(context)
    if shared:
        raise InvalidParameter(f"{where}: features in 'context' must not appear in examples "
                               f"({sorted(shared)[:3]})")
    features = {**context, **example}
    values = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in features.items()}
    binary = [k for k, v in values.items() if is_b64(v)]
    chosen = image_feature(binary)
    if chosen is None:
        raise InvalidParameter(f"{where}: give the image as one feature {{\"b64\": ...}}, e.g. "
                               f"\"image/encoded\" (found {len(binary)} binary features)")
    return decode_b64(values[chosen]["b64"], f"{where}.{chosen}.b64", limits.max_upload_bytes)
