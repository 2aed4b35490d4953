"""The Open Inference Protocol's gRPC API (KServe v2 ``GRPCInferenceService``, package
``inference``, as Triton serves it), over the DataPlane, with Triton's classification and
model configuration extensions. The stubs are tritonclient's (``tritonclient.grpc.service_pb2``):
the same messages Triton's own clients send.

* ``ServerLive`` (always), ``ServerReady`` (every model has a ready version and every worker is
  warm), ``ModelReady`` (false for a model or version not served), ``ServerMetadata``.
* ``ModelMetadata``: the model's own input (``images`` FP32 ``[-1, h, w, 3]`` for ours; an
  imported model's name, dtype and layout), ``image_bytes`` BYTES ``[-1]`` (encoded images)
  beside it (a model that takes encoded images: its own input only, BYTES ``[-1]``;
  ``common.oip.metadata_inputs``), and ``probabilities`` FP32 ``[-1, labels]``; ``ModelConfig`` and
  ``ModelStatistics``: ``common/oip.py``'s dicts (as REST's ``/config`` and ``/stats``) in
  Triton's messages.
* ``ModelInfer`` with one input: BYTES ``[N]`` of encoded images, or the model's tensor FP32
  (or UINT8 for a uint8 model) ``[N, *input shape]``, in ``raw_input_contents`` (Triton's
  clients send that) or ``contents``. Output ``probabilities`` FP32 ``[N, labels]`` in
  ``raw_output_contents``; asked for with the parameter ``classification: k`` BYTES ``[N, k]``
  of ``"score:index:label"``.
* The other methods of the service (repository, shared memory, trace, log, streaming) are
  ``UNIMPLEMENTED`` (``calls.Calls`` answers them so, as for any method not in ``SCOPES``).

Bounds: one input, a shape of 1 to ``MAX_RANK`` dimensions whose count (exact) is within
MAX_IMAGES_PER_REQUEST images and matches its data, ``probabilities`` asked for at most once;
the message itself is within ``max_receive_message_length`` (``server.py``).
"""
from __future__ import annotations

from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as config_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from common.dataplane import DataPlane, Images, Inference
from common.errors import InvalidParameter, ModelNotFound
from common.oip import (OUTPUT, SERVER_NAME, SERVER_VERSION, classes, deserialize_bytes,
                        model_config, model_metadata, model_stats, route, serialize_bytes,
                        server_ready)
from common.rpc import calls
from common.rpc.tensors import (
    Limits,
    check_shape,
    limits_for,
    listed_numbers,
    raw_numbers,
)

SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["classification", "model_configuration", "statistics"]
#: Methods served and the key scope each needs (None: open, as ``/v2/health/*`` is).
SCOPES = {f"/{SERVICE}/{name}": scope for name, scope in (
    ("ServerLive", None), ("ServerReady", None), ("ModelReady", "classify"),
    ("ServerMetadata", "classify"), ("ModelMetadata", "classify"),
    ("ModelConfig", "classify"), ("ModelStatistics", "classify"), ("ModelInfer", "classify"))}


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Thin adapter: each method parses its message and makes one DataPlane call."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    # -- health and metadata ---------------------------------------------------------------
    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=server_ready(self.dataplane))

    def ModelReady(self, request, context):
        try:
            ready = self.dataplane.served(route(request.name, request.version)).health().ready
        except ModelNotFound:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)

    def ModelMetadata(self, request, context):
        """The same metadata as REST's (``common/oip.py``), without its per-input parameters."""
        return json_format.ParseDict(
            model_metadata(self.dataplane, request.name, request.version),
            pb.ModelMetadataResponse(), ignore_unknown_fields=True)

    def ModelConfig(self, request, context):
        """Triton's ``ModelConfig`` (``common/oip.py``'s dict, the same as REST's)."""
        config = model_config(self.dataplane, self._name(request.name), request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(
            config, config_pb2.ModelConfig(), ignore_unknown_fields=True))

    def ModelStatistics(self, request, context):
        """The statistics extension (``common/oip.py``): this worker's counts."""
        stats = model_stats(self.dataplane, request.name or None, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(),
                                     ignore_unknown_fields=True)

    def _name(self, name: str) -> str:
        """A request's model name; empty: the default model."""
        return name or self.dataplane.manager.default_name

    # -- inference -------------------------------------------------------------------------
    def ModelInfer(self, request, context):
        """One input of images -> ``probabilities``, as scores or classes. The tensor is read
        into numpy once the DataPlane has admitted the request."""
        target = route(request.model_name, request.model_version)
        asked = requested_outputs(request)
        call = calls.current()
        done = self.dataplane.infer(
            lambda: parse_input(request, limits_for(self.dataplane, target)), target,
            client=call.client)
        call.note(done.classifier, "grpc-oip")
        return response(request, done, asked)


def parse_input(request, limits: Limits) -> Images:
    """A ModelInferRequest's one input -> encoded images (BYTES) or a float32 tensor of its
    shape (FP32, UINT8), or 400. Counts are checked against ``limits`` before anything is
    built per element."""
    if len(request.inputs) != 1:
        raise InvalidParameter(f"give one input (FP32/UINT8 images as the model's metadata "
                               f"shows, or BYTES encoded images [N]), got {len(request.inputs)}")
    tensor = request.inputs[0]
    datatype = tensor.datatype
    if datatype not in ("FP32", "UINT8", "BYTES"):
        raise InvalidParameter(f"input datatype must be FP32 or UINT8 (the model's input "
                               f"tensor, as its metadata shows) or BYTES (encoded images), got "
                               f"{datatype[:20]!r}")
    shape = list(tensor.shape)
    count = check_shape(shape, datatype == "BYTES", limits)
    raw = request.raw_input_contents
    if len(raw) > 1:
        raise InvalidParameter(f"raw_input_contents has {len(raw)} entries for one input")
    contents = tensor.contents
    if raw and contents.ByteSize():
        raise InvalidParameter("give the input's data in contents or raw_input_contents, "
                               "not both")
    if datatype == "BYTES":
        images = (deserialize_bytes(raw[0], count) if raw
                  else list(contents.bytes_contents))
        if len(images) != count:
            raise InvalidParameter(f"shape {shape} needs {count} BYTES elements, got "
                                   f"{len(images)}")
        return Images(images)
    if raw:
        return Images(raw_numbers(raw[0], "<f4" if datatype == "FP32" else "u1", shape, count))
    if datatype == "FP32":
        return Images(listed_numbers(contents.fp32_contents, shape, count))
    return Images(listed_numbers(contents.uint_contents, shape, count, most=255))


def requested_outputs(request) -> list[int]:
    """The outputs asked for, as classification counts (0: the scores); ``probabilities``
    alone, at most once; none asked for: the scores."""
    if not request.outputs:
        return [0]
    if len(request.outputs) > 1:
        raise InvalidParameter(f"the model has one output, {OUTPUT!r}; ask for it once")
    output = request.outputs[0]
    if output.name != OUTPUT:
        raise InvalidParameter(f"unexpected inference output {output.name[:40]!r}: the "
                               f"model's output is {OUTPUT!r}")
    if "classification" not in output.parameters:
        return [0]
    parameter = output.parameters["classification"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param") or getattr(parameter, kind) < 0:
        raise InvalidParameter("'classification' must be a whole number of classes")
    return [getattr(parameter, kind)]


def response(request, done: Inference, asked: list[int]):
    """The ModelInferResponse: each output in ``raw_output_contents``, as Triton answers."""
    classifier, scores = done.classifier, done.scores
    answer = pb.ModelInferResponse(model_name=request.model_name or classifier.name,
                                   model_version=str(classifier.version), id=request.id)
    n = scores.shape[0]
    for count in asked:
        if count:
            k = min(count, len(classifier.labels))
            answer.outputs.add(name=OUTPUT, datatype="BYTES", shape=[n, k])
            answer.raw_output_contents.append(
                serialize_bytes(classes(scores, classifier.labels, count)))
        else:
            answer.outputs.add(name=OUTPUT, datatype="FP32", shape=list(scores.shape))
            answer.raw_output_contents.append(scores.astype("<f4").tobytes())
    return answer


def add_to(server, dataplane: DataPlane) -> dict[str, str | None]:
    """Serve the service on ``server``; returns its methods' scopes for ``calls.Calls``."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane),
                                                                server)
    return SCOPES


__all__ = ["InferenceServicer", "add_to", "SERVICE", "SCOPES"]
