"""The Open Inference Protocol's model configuration and statistics extensions as plain dicts,
in Triton's own JSON field names, shared by the REST adapter (``web/protocols/kserve.py``) and
the gRPC server (which builds ``ModelConfigResponse`` / ``ModelStatisticsResponse`` from these
dicts with ``google.protobuf.json_format.ParseDict``). No web framework here.

* :func:`model_config`: ``model_config.proto``'s ``ModelConfig`` of one served version: name,
  platform and backend (the runtime that really runs it), ``max_batch_size`` (the batcher's
  largest model call), the model's own input tensor and the ``image_bytes`` BYTES input
  (:func:`metadata_inputs`: a model that takes encoded images has only its own, BYTES),
  the ``probabilities`` output, ``dynamic_batching`` and the model's ``version_policy``.
* :func:`model_stats`: the statistics extension's ``{"model_stats": [...]}``, one entry per
  loaded version, from the version's counters (:class:`~common.versions.served.Statistics`).
  The counters are **per gunicorn worker**: a request is counted by the worker that served it,
  and each worker answers with its own counts (as ``/metrics`` is not: it sums the workers).
"""
from __future__ import annotations

import re
import struct

import numpy as np

from common.errors import InvalidParameter, ModelNotFound
from common.versions.manager import Route
from common.versions.served import ServedVersion, State

#: What the server metadata of both transports names.
SERVER_NAME, SERVER_VERSION = "image-classifier", "2"
#: The output every model answers (``[N, labels]`` scores).
OUTPUT = "probabilities"
#: Rank of the largest tensor shape a request may give (images are ``[N, h, w, 3]``), over
#: either protocol and either transport.
MAX_RANK = 8
#: The input beside the model's own tensor: encoded images, decoded and preprocessed by the
#: model's spec.
BYTES_INPUT = "image_bytes"
#: The spec's input dtype -> the protocol's datatype (Triton's config type: ``_CONFIG_TYPES``).
DATATYPES = {"float32": "FP32", "uint8": "UINT8", "string": "BYTES"}
#: What a BYTES input holds (its metadata's ``parameters``).
BYTES_CONTENT = "encoded images (JPEG, PNG, ...)"
#: The protocol's datatype -> Triton's config ``data_type`` (after ``TYPE_``).
_CONFIG_TYPES = {"FP32": "FP32", "UINT8": "UINT8", "BYTES": "STRING"}
#: The spec's layout -> Triton's ``ModelInput.Format``.
FORMATS = {"NHWC": "FORMAT_NHWC", "NCHW": "FORMAT_NCHW"}
#: Triton's platform -> its backend.
BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorflow_savedmodel": "tensorflow",
            "tensorflow_graphdef": "tensorflow", "tensorflow_keras": "tensorflow",
            "tflite": "tflite"}
#: The statistics each entry of ``inference_stats`` has (``{"count", "ns"}`` each).
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
             "cache_hit", "cache_miss")

_NUMBER = re.compile(r"^[0-9]{1,18}$")


def route(name: str, version: str | int | None = None, label: str | None = None) -> Route:
    """The Route a protocol names (a URL's segments, a gRPC request's fields): an empty name
    is the default model; ``version`` ``None`` or ``""`` names the model's latest ready
    version (or the one ``label`` names), a number that version; a string that is not a
    number names no version (404 ``model_not_found``)."""
    if version is None or version == "":
        return Route(name or None, None, label or None)
    if isinstance(version, int):
        return Route(name or None, version, None)
    if not _NUMBER.match(version):
        raise ModelNotFound(f"model {name!r} has no version {version[:40]!r}")
    return Route(name or None, int(version), None)


def server_ready(dataplane) -> bool:
    """The server is ready: every model has a ready version and every worker is warm."""
    models = dataplane.model_status()
    return (bool(models) and all(any(v["state"] == "ready" for v in m["versions"])
                                 for m in models)
            and not dataplane.workers_waiting())


def model_metadata(dataplane, name: str, version: str | int | None = None) -> dict:
    """The model metadata of both transports: ``{"name", "versions" (the ready ones),
    "platform", "inputs"`` (:func:`metadata_inputs`) ``, "outputs"}``; 503 while the version
    is not ready, 404 for an unknown one."""
    classifier = dataplane.served(route(name, version)).classifier
    versions = [str(v["version"]) for v in dataplane.model_status(classifier.name)[0][
        "versions"] if v["state"] == "ready"]
    return {"name": classifier.name, "versions": versions, "platform": classifier.platform,
            "inputs": metadata_inputs(classifier),
            "outputs": [{"name": OUTPUT, "datatype": "FP32",
                         "shape": [-1, len(classifier.labels)]}]}


def metadata_inputs(classifier) -> list[dict]:
    """The inputs the metadata of both protocols lists: ``{"name", "datatype", "shape",
    "layout"}`` each. A pixel model: its own tensor (``[-1, h, w, 3]`` or ``[-1, 3, h, w]``,
    FP32 or UINT8) and ``image_bytes`` BYTES ``[-1]``; a model that takes encoded images: its
    own input only, BYTES ``[-1]`` (it has no pixel tensor; ``image_bytes`` is still accepted
    as another name for it)."""
    real = classifier.describe_input()
    own = {"name": real["name"], "datatype": DATATYPES[real["dtype"]], "shape": real["shape"],
           "layout": real["layout"]}
    if classifier.spec.encoded:
        return [own]
    return [own, {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1], "layout": None}]


def model_config(dataplane, name: str, version: str | None = None) -> dict:
    """Triton's ``ModelConfig`` (model_config.proto, as its JSON) of the version that
    ``name`` / ``version`` names: 404 unknown, 503 while it is not ready.

    ``input[0]`` is the model's own tensor (``dims`` without the batch dimension, e.g.
    ``[h, w, 3]`` float32 in [0, 1] for our own models), ``input[1]`` ``image_bytes`` (one
    encoded image per batch row; ``TYPE_STRING`` ``[1]``, the only input of a model that
    takes encoded images); ``output[0]`` ``probabilities`` FP32 ``[labels]``."""
    served: ServedVersion = dataplane.served(route(name, version))
    clf = served.classifier  # 503 while it is not ready
    batcher = served.running().batcher
    platform = clf.platform
    model = dataplane.model_status(name)[0]
    return {
        "name": name,
        "platform": platform,
        "backend": BACKENDS.get(platform, ""),
        "version_policy": model["version_policy"],
        "max_batch_size": batcher.max_batch_size,
        "input": [
            {"name": tensor["name"], "data_type": "TYPE_" + _CONFIG_TYPES[tensor["datatype"]],
             "format": FORMATS.get(tensor["layout"], "FORMAT_NONE"),
             "dims": list(tensor["shape"][1:]) or [1]}
            for tensor in metadata_inputs(clf)],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [len(clf.labels)],
                    "label_filename": "labels.txt" if clf.folder is not None else ""}],
        "dynamic_batching": {
            "preferred_batch_size": [b for b in batcher.buckets],
            "max_queue_delay_microseconds": int(round(batcher.batch_wait * 1e6)),
        },
    }


def model_stats(dataplane, name: str | None = None, version: str | None = None) -> dict:
    """The statistics extension's answer: ``{"model_stats": [...]}`` for every loaded version
    of every model (``name`` None), of one model, or of one version (404 for an unknown model
    or version). Counts and nanoseconds are this worker's (see the module's docstring)."""
    if name is None:
        wanted = [(m["name"], v["version"]) for m in dataplane.model_status()
                  for v in m["versions"]]
    elif version is None or version == "":
        wanted = [(name, v["version"]) for v in dataplane.model_status(name)[0]["versions"]]
    else:
        number = route(name, version).version
        wanted = [(name, number)]
    entries = []
    for model, number in wanted:
        try:
            served: ServedVersion = dataplane.served(Route(model, number))
        except ModelNotFound:
            if version:
                raise
            continue  # unloaded since the listing
        if not version and served.health().state not in (State.READY, State.HUNG):
            continue  # Triton lists the versions it has loaded
        entries.append(version_stats(model, number, served.statistics.snapshot()))
    return {"model_stats": entries}


def version_stats(name: str, version: int, snapshot: dict) -> dict:
    """One entry of ``model_stats`` from a :meth:`Statistics.snapshot` (Triton's field
    names; every ``ns`` a total in nanoseconds, every ``count`` a number of requests, or of
    model calls in ``batch_stats``)."""
    return {
        "name": name,
        "version": str(version),
        "last_inference": snapshot["last_inference"],
        "inference_count": snapshot["inference_count"],
        "execution_count": snapshot["execution_count"],
        "inference_stats": {key: dict(snapshot["durations"].get(key, {"count": 0, "ns": 0}))
                            for key in DURATIONS},
        "batch_stats": [{"batch_size": size,
                         "compute_input": {"count": 0, "ns": 0},
                         "compute_infer": {"count": count, "ns": ns},
                         "compute_output": {"count": 0, "ns": 0}}
                        for size, (count, ns) in sorted(snapshot["batches"].items())],
    }


__all__ = ["route", "model_config", "model_stats", "version_stats", "OUTPUT", "BYTES_INPUT",
           "DATATYPES", "FORMATS", "BACKENDS", "DURATIONS"]


# -- Triton's BYTES tensors and classification strings (REST binary data and gRPC) -------
def deserialize_bytes(data: bytes, count: int) -> list[bytes]:
    """Triton's BYTES tensor: each element a 4-byte little-endian length, then its bytes; 400
    unless exactly ``count`` elements (the shape's) fill the data."""
    items, offset = [], 0
    while offset < len(data):
        if len(items) == count:
            raise InvalidParameter(f"BYTES data has more elements than its shape ({count})")
        if offset + 4 > len(data):
            raise InvalidParameter("BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidParameter("BYTES data ends inside an element")
        items.append(data[offset:offset + length])
        offset += length
    if len(items) != count:
        raise InvalidParameter(f"the shape needs {count} BYTES elements, got {len(items)}")
    return items


def serialize_bytes(items: list[str]) -> bytes:
    """Strings -> Triton's BYTES tensor data (4-byte little-endian length, then UTF-8)."""
    encoded = [item.encode() for item in items]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def classes(scores: np.ndarray, labels: list[str], k: int) -> list[str]:
    """Triton's classification output for float32 ``[n, labels]`` scores: ``n * k`` strings
    ``"score:index:label"`` (score as C's ``%f``), each row highest first, ties in label
    order."""
    k = min(k, len(labels))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [f"{scores[i, j]:f}:{j}:{labels[j]}" for i in range(scores.shape[0]) for j in top[i]]
