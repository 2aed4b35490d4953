"""gRPC: the Open Inference Protocol's ``GRPCInferenceService`` (``oip.py``), TensorFlow
Serving's ``PredictionService`` and ``ModelService`` (``tfserving.py``) and ``grpc.health.v1``,
served on ``GRPC_PORT`` by every gunicorn worker (``server.py``).

No web framework here: like the Flask adapters, each servicer parses the protobuf and makes one
DataPlane call. ``calls.py`` is what the Flask request hooks are for REST: request id, API key,
client id for the fair share, one access-log line and the request metrics per RPC, and the one
place an ``ApiError`` becomes a gRPC status.
"""
