"""TensorFlow Serving's gRPC API (``tensorflow_serving/apis``: ``PredictionService`` and
``ModelService``), over the DataPlane, with TF Serving's own stubs (tensorflow-serving-api's
files, copied into the venv by ``make venv`` without its requirements; see the Makefile).
Importing them imports all of TensorFlow: ``server.py`` imports this module only when it
starts, and serves without it when it does not import.

* ``Predict``: one input (any name) of DT_STRING ``[N]`` encoded images (``string_val``), or
  the model's tensor DT_FLOAT (DT_UINT8 for a uint8 model) ``[N, *input shape]`` (for our
  models ``[N, h, w, 3]`` in [0, 1]) in ``tensor_content`` or ``float_val`` / ``int_val``
  (one value is repeated over the shape, as TensorFlow reads a TensorProto) -> output
  ``probabilities`` DT_FLOAT ``[N, labels]``; ``output_filter`` may name only it.
* ``Classify``: ``tf.Example``s (``example_list``, or ``example_list_with_context``) each with
  an encoded image as a bytes feature (``image/encoded``, ``image``, ... as REST's
  ``:classify``) -> per example every label with its score, highest first.
* ``GetModelMetadata`` (``metadata_field: "signature_def"``): the ``serving_default``
  signature, as REST's ``/metadata`` shows it. ``ModelService.GetModelStatus``: each version's
  state (AVAILABLE, LOADING, END) and error, as REST's ``GET /v1/models/{m}``.
* ``model_spec``: ``name`` (empty: the default model), ``version`` or ``version_label``;
  ``signature_name`` empty or ``serving_default``. Regress, MultiInference and
  HandleReloadConfigRequest are ``UNIMPLEMENTED``.
"""
from __future__ import annotations

import numpy as np
from google.protobuf import any_pb2
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from common.dataplane import DataPlane, Images
from common.errors import InvalidParameter, TooManyImages
from common.oip import MAX_RANK, OUTPUT, route
from common.rpc import calls
from common.rpc.tensors import Limits, check_shape, limits_for, listed_numbers, raw_numbers
from common.tfserving import (
    GRPC_METHODS,
    GRPC_SCOPES,
    MAX_FEATURES,
    SIGNATURE,
    STATES,
    image_feature,
    input_tensor,
    version_statuses,
)
from common.versions.manager import Route
from common.versions.served import State

SERVICES = list(GRPC_METHODS)
SCOPES = GRPC_SCOPES
#: TF Serving's names of a version's state and of its status' code -> their enums' numbers.
_VERSION_STATES = get_model_status_pb2.ModelVersionStatus.State
_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type
_DTYPES = {"float32": types_pb2.DT_FLOAT, "uint8": types_pb2.DT_UINT8,
           "string": types_pb2.DT_STRING}


def target(spec) -> Route:
    """The Route a ``ModelSpec`` names (404 for a version or label it does not have); 400 for
    a signature other than ``serving_default``."""
    if spec.signature_name not in ("", SIGNATURE):
        raise InvalidParameter(f"the model has one signature, {SIGNATURE!r}; got "
                               f"{spec.signature_name[:40]!r}")
    if spec.HasField("version"):
        return route(spec.name, spec.version.value)
    return route(spec.name, None, spec.version_label)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Thin adapter: each method parses its message and makes one DataPlane call."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    def Predict(self, request, context):
        where = target(request.model_spec)
        for name in request.output_filter:
            if name != OUTPUT:
                raise InvalidParameter(f"unknown output {name[:40]!r}: the model's output is "
                                       f"{OUTPUT!r}")
        done = self.dataplane.infer(
            lambda: parse_predict(request, limits_for(self.dataplane, where)), where,
            client=calls.current().client)
        calls.current().note(done.classifier, "grpc-tfserving")
        answer = predict_pb2.PredictResponse(model_spec=spec_of(done.classifier))
        answer.outputs[OUTPUT].CopyFrom(float_tensor(done.scores))
        return answer

    def Classify(self, request, context):
        where = target(request.model_spec)
        done = self.dataplane.infer(
            lambda: parse_classify(request, limits_for(self.dataplane, where)), where,
            client=calls.current().client)
        calls.current().note(done.classifier, "grpc-tfserving")
        answer = classification_pb2.ClassificationResponse(
            model_spec=spec_of(done.classifier))
        for row in done.scores:
            answer.result.classifications.add().classes.extend(
                classification_pb2.Class(label=p.label, score=p.score)
                for p in done.classifier.rank(row))
        return answer

    def GetModelMetadata(self, request, context):
        if list(request.metadata_field) != ["signature_def"]:
            raise InvalidParameter("metadata_field must be ['signature_def'], got "
                                   f"{[f[:40] for f in request.metadata_field[:4]]}")
        served = self.dataplane.served(target(request.model_spec))
        clf = served.classifier  # 503 while it is not ready
        real = clf.describe_input()
        signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        signature.inputs[real["name"]].CopyFrom(
            tensor_info(input_tensor(clf), _DTYPES[real["dtype"]], real["shape"]))
        signature.outputs[OUTPUT].CopyFrom(
            tensor_info("StatefulPartitionedCall:0", types_pb2.DT_FLOAT,
                        [-1, len(clf.labels)]))
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def[SIGNATURE].CopyFrom(signature)
        packed = any_pb2.Any()
        packed.Pack(signatures)
        answer = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=spec_of(clf))
        answer.metadata["signature_def"].CopyFrom(packed)
        return answer


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    def GetModelStatus(self, request, context):
        """Every version of the model (or the one asked for): state, error code, message."""
        spec = request.model_spec
        _, versions = version_statuses(
            self.dataplane, spec.name, spec.version.value if spec.HasField("version") else None,
            spec.version_label)
        answer = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            state, code = STATES[State(v["state"])]
            answer.model_version_status.add(
                version=v["version"], state=_VERSION_STATES.Value(state),
                status=status_pb2.StatusProto(error_code=_ERROR_CODES.values_by_name[code].number,
                                              error_message=v["error"] or ""))
        return answer


# -- parsing and answers -----------------------------------------------------------------------
def parse_predict(request, limits: Limits) -> Images:
    """A PredictRequest's one input -> encoded images (DT_STRING) or a float32 tensor
    ``[N, *input shape]`` (DT_FLOAT, DT_UINT8), or 400; counts checked before anything is
    built per element."""
    if len(request.inputs) != 1:
        raise InvalidParameter(f"give one input (DT_STRING encoded images [N], or the "
                               f"model's DT_FLOAT tensor), got {len(request.inputs)}")
    (tensor,) = request.inputs.values()
    if tensor.tensor_shape.unknown_rank:
        raise InvalidParameter("the input's shape must be known")
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.dtype == types_pb2.DT_STRING:
        shape = shape or [1]  # a scalar string: one image
        count = check_shape(shape, True, limits)
        if len(tensor.string_val) != count:
            raise InvalidParameter(f"shape {shape} needs {count} strings, got "
                                   f"{len(tensor.string_val)}")
        return Images(list(tensor.string_val))
    if tensor.dtype not in (types_pb2.DT_FLOAT, types_pb2.DT_UINT8):
        raise InvalidParameter(f"input dtype must be DT_STRING (encoded images) or DT_FLOAT / "
                               f"DT_UINT8 (the model's tensor), got {_dtype_name(tensor.dtype)}")
    count = check_shape(shape, False, limits)
    floats = tensor.dtype == types_pb2.DT_FLOAT
    if tensor.tensor_content:
        return Images(raw_numbers(tensor.tensor_content, "<f4" if floats else "u1", shape,
                                  count))
    values = tensor.float_val if floats else tensor.int_val
    if len(values) == 1 and count > 1:  # TensorFlow repeats the last value over the shape
        return Images(np.full(shape, listed_numbers(values, [1], 1, None if floats else 255)[0],
                              np.float32))
    return Images(listed_numbers(values, shape, count, None if floats else 255))


def parse_classify(request, limits: Limits) -> Images:
    """A ClassificationRequest's Examples -> one encoded image each, or 400."""
    kind = request.input.WhichOneof("kind")
    if kind is None:
        raise InvalidParameter("give input.example_list or input.example_list_with_context")
    listed = getattr(request.input, kind)
    if len(listed.examples) > limits.max_images:
        raise TooManyImages(f"at most {limits.max_images} images in one request "
                            f"(MAX_IMAGES_PER_REQUEST), got {len(listed.examples)} examples")
    context = listed.context.features.feature if kind == "example_list_with_context" else {}
    if len(context) > MAX_FEATURES:
        raise InvalidParameter(f"the context has {len(context)} features; at most "
                               f"{MAX_FEATURES}")
    return Images([example_image(e.features.feature, context, i)
                   for i, e in enumerate(listed.examples)])


def example_image(features, context, index: int) -> bytes:
    """The encoded image of one Example: a known feature name holding one bytes value, else
    the one bytes feature there is (with its context's features)."""
    where = f"examples[{index}]"
    if len(features) > MAX_FEATURES:
        raise InvalidParameter(f"{where} has {len(features)} features; at most {MAX_FEATURES}")
    shared = set(features) & set(context)
    if shared:
        raise InvalidParameter(f"{where}: features in the context must not appear in examples "
                               f"({sorted(shared)[:3]})")
    binary = {name: feature.bytes_list.value
              for source in (context, features) for name, feature in source.items()
              if feature.WhichOneof("kind") == "bytes_list"}
    chosen = image_feature(binary)
    if chosen is None:
        raise InvalidParameter(f"{where}: give the image as one bytes feature, e.g. "
                               f"'image/encoded' (found {len(binary)} bytes features)")
    if len(binary[chosen]) != 1:
        raise InvalidParameter(f"{where}.{chosen[:40]} must hold one image, got "
                               f"{len(binary[chosen])} values")
    return binary[chosen][0]


def _dtype_name(dtype: int) -> str:
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype)


def float_tensor(scores: np.ndarray) -> tensor_pb2.TensorProto:
    """float32 ``[n, labels]`` -> a DT_FLOAT TensorProto (``tensor_content``, little-endian,
    as ``tf.make_tensor_proto`` writes it; ``tf.make_ndarray`` reads it back)."""
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in scores.shape]),
        tensor_content=np.ascontiguousarray(scores, dtype="<f4").tobytes())


def tensor_info(name: str, dtype: int, shape: list[int]) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(
        name=name, dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in shape]))


def spec_of(classifier):
    """The ModelSpec an answer names: the model and the version that served it."""
    spec = predict_pb2.PredictResponse().model_spec
    spec.name = classifier.name
    spec.version.value = int(classifier.version)
    spec.signature_name = SIGNATURE
    return spec


def add_to(server, dataplane: DataPlane) -> dict[str, str]:
    """Serve both services on ``server``; returns their methods' scopes for ``calls.Calls``."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(dataplane), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(dataplane), server)
    return SCOPES


__all__ = ["PredictionServicer", "ModelServicer", "add_to", "SERVICES", "SCOPES", "MAX_RANK"]
