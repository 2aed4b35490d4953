"""TF Serving's API as both its adapters speak it, REST (``web/protocols/tfserving.py``) and
gRPC (``rpc/tfserving.py``): the one signature, the feature names an Example's image may have,
a version's state in TF Serving's words, the versions a status request names, the tensor
name the metadata shows, and the gRPC methods served (for the servicers and for the handler
that loads them at their first call). No web framework and no TensorFlow here.
"""
from __future__ import annotations

from typing import Iterable

from common.errors import ModelNotFound
from common.versions.served import State

#: The one signature every model has.
SIGNATURE = "serving_default"
#: TF Serving's gRPC services and the methods of each that are served.
GRPC_METHODS = {
    "tensorflow.serving.PredictionService": ("Predict", "Classify", "GetModelMetadata"),
    "tensorflow.serving.ModelService": ("GetModelStatus",),
}
#: Each served gRPC method's path -> the key scope it needs.
GRPC_SCOPES = {f"/{service}/{name}": "classify"
               for service, names in GRPC_METHODS.items() for name in names}
#: Feature names an Example's encoded image may have (TF Example conventions), in the order
#: they are looked for.
IMAGE_FEATURES = ("image/encoded", "image", "image_bytes", "images", "encoded", "bytes",
                  "b64", "input", "inputs")
#: Features an Example (or its context) may have: an image and a few more, not thousands.
MAX_FEATURES = 8
#: Our states -> TF Serving's ``ModelVersionStatus.State`` name and the status' error code
#: name (``tensorflow.error.Code``).
STATES = {State.LOADING: ("LOADING", "OK"), State.READY: ("AVAILABLE", "OK"),
          State.HUNG: ("AVAILABLE", "DEADLINE_EXCEEDED"), State.FAILED: ("END", "UNKNOWN"),
          State.STOPPED: ("END", "OK")}


def version_statuses(dataplane, name: str, version: int | None = None,
                     label: str | None = None) -> tuple[str, list[dict]]:
    """GetModelStatus: the model's name (an empty ``name``: the default model) and its
    versions as ``/models`` lists them, every one, or the one ``version`` or ``label`` names
    (404 when it has none such)."""
    model = dataplane.model_status(name or dataplane.manager.default_name)[0]
    versions, wanted = model["versions"], version
    if label:
        if label not in model["labels"]:
            raise ModelNotFound(f"model {model['name']!r} has no version labelled "
                                f"{label[:40]!r}")
        wanted = model["labels"][label]
    if wanted is not None:
        versions = [v for v in versions if v["version"] == wanted]
        if not versions:
            raise ModelNotFound(f"Could not find version {wanted} of model {model['name']}")
    return model["name"], versions


def input_tensor(classifier) -> str:
    """The graph tensor the metadata names for the model's input: a SavedModel's serving
    signature placeholder (``serving_default_<input>:0``), else the input's own name."""
    name = classifier.describe_input()["name"]
    return (f"serving_default_{name}:0" if classifier.platform == "tensorflow_savedmodel"
            else name)


def image_feature(binary: Iterable[str]) -> str | None:
    """Of an Example's features that hold bytes (``binary``, names), the one holding the
    image: the first of :data:`IMAGE_FEATURES` there is, else the only one; None when there
    is neither."""
    binary = list(binary)
    known = [name for name in IMAGE_FEATURES if name in binary]
    if known:
        return known[0]
    return binary[0] if len(binary) == 1 else None
