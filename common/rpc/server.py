"""The gRPC server of one gunicorn worker: made after the fork (never in the master), once the
worker's models are loaded and warm (``gunicorn.conf.py: post_worker_init``), on ``GRPC_PORT``
with ``SO_REUSEPORT`` so that every worker serves the same port (the kernel spreads the
connections), and drained with the worker (``worker_exit``: :meth:`RpcServer.stop`).

What it serves:

* the Open Inference Protocol's ``inference.GRPCInferenceService`` (``oip.py``), always;
* TF Serving's ``tensorflow.serving.PredictionService`` and ``ModelService``
  (``tfserving.py``), when its stubs (``tensorflow_serving``, installed by ``make venv``) and
  TensorFlow are installed (``GRPC_TFSERVING``). They import all of TensorFlow (about 500 MiB),
  so by default a worker that does not run TensorFlow already (ONNX Runtime, LiteRT) serves
  them through :class:`LazyTfServing`, which imports them at the first TF Serving call only;
* ``grpc.health.v1.Health`` (grpcio-health-checking): ``SERVING`` once the server is started
  (the worker is warm), ``NOT_SERVING`` while it drains; open, as the HTTP probes are.

Every RPC of the first two passes :class:`~common.rpc.calls.Calls` (request id, API key,
access log, metrics, errors as status codes). Bounds: a message is at most
``Config.max_body_bytes`` (the upload limit and framing room, as an HTTP body; larger ones are
refused ``RESOURCE_EXHAUSTED`` by gRPC before they reach a servicer), ``Config.grpc_threads``
RPCs run at once, each on its own thread (one more is refused ``RESOURCE_EXHAUSTED``), so a
worker's gRPC messages hold at most ``grpc_threads * max_body_bytes`` bytes.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.audit import Audit
from common.config import Config
from common.dataplane import DataPlane
from common.errors import ServiceUnavailable
from common.keys import KeyRing
from common.rpc import calls, oip
from common.tfserving import GRPC_METHODS, GRPC_SCOPES

log = logging.getLogger(__name__)


class RpcServer:
    """One worker's ``grpc.Server`` and its health service."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer,
                 port: int, services: list[str]):
        self.server = server
        self.health = health_servicer
        self.port = port
        self.services = services

    def stop(self, grace: float) -> None:
        """Say ``NOT_SERVING``, refuse new RPCs, and let those running finish within
        ``grace`` seconds (then they are cancelled)."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)


def options(config: Config) -> list[tuple[str, int]]:
    """The channel options of the server: the shared port and the message bounds."""
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", config.max_body_bytes),
        # the largest answer: MAX_IMAGES_PER_REQUEST rows of scores, or of classes
        ("grpc.max_send_message_length", -1),
        ("grpc.max_metadata_size", 16 * 1024),
    ]


def _tfserving(config: Config):
    """``common.rpc.tfserving`` when TF Serving's services are to be served, else None.

    GRPC_TFSERVING ``auto`` (the default): loaded at start when this worker runs TensorFlow
    already and the stubs are installed (elsewhere :class:`LazyTfServing` loads them at the
    first call); ``on``: loaded at start always (RuntimeError when they do not import);
    ``off``: never served."""
    if config.grpc_tfserving is False:
        return None
    if config.grpc_tfserving is None and "tensorflow" not in sys.modules:
        return None  # served lazily (LazyTfServing) where installed
    try:
        from common.rpc import tfserving
    except ImportError as exc:  # no tensorflow_serving stubs, or no TensorFlow
        if config.grpc_tfserving:
            raise RuntimeError(f"GRPC_TFSERVING=on but TF Serving's stubs do not import: {exc}"
                               f" (`make venv` installs them)") from None
        log.info("TF Serving's gRPC services are off: %s", exc)
        return None
    return tfserving


def _tfserving_installed() -> bool:
    """Whether TF Serving's stubs and TensorFlow are installed (found, not imported; an import
    hook that refuses TensorFlow, as a TensorFlow-free image may have, counts as not)."""
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("tensorflow_serving", "tensorflow"))
    except (ImportError, ValueError):
        return False


class LazyTfServing(grpc.GenericRpcHandler):
    """TF Serving's services in a worker that does not run TensorFlow: its methods are
    registered at start with raw-bytes handlers, and the first call imports ``tfserving.py``
    (and so TensorFlow: a few seconds and about 500 MiB, once per worker); each call then
    parses its request with the method's own message class (malformed: ``INVALID_ARGUMENT``)
    and is answered by the same servicers as when they are loaded at start."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane
        self.scopes = GRPC_SCOPES
        self._lock = threading.Lock()
        self._loaded: dict | None = None  # service -> (servicer, its pool descriptor)

    def service(self, handler_call_details):
        service, _, name = handler_call_details.method.lstrip("/").partition("/")
        if name not in GRPC_METHODS.get(service, ()):
            return None
        return grpc.unary_unary_rpc_method_handler(
            functools.partial(self._call, service, name),
            response_serializer=lambda message: message.SerializeToString())

    def _load(self) -> dict:
        with self._lock:
            if self._loaded is None:
                try:
                    from common.rpc import tfserving
                except ImportError as exc:
                    raise ServiceUnavailable(f"TF Serving's services cannot load here: {exc}"
                                             ) from None
                from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

                log.info("TF Serving's gRPC services loaded at their first call")
                self._loaded = {
                    "tensorflow.serving.PredictionService": (
                        tfserving.PredictionServicer(self.dataplane),
                        prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]),
                    "tensorflow.serving.ModelService": (
                        tfserving.ModelServicer(self.dataplane),
                        model_service_pb2.DESCRIPTOR.services_by_name["ModelService"])}
            return self._loaded

    def _call(self, service: str, name: str, raw: bytes, context):
        from google.protobuf import message_factory

        servicer, descriptor = self._load()[service]
        message = message_factory.GetMessageClass(descriptor.methods_by_name[name].input_type)
        request = calls.parse(message.FromString, raw)
        return getattr(servicer, name)(request, context)


def start(config: Config, dataplane: DataPlane, keys: KeyRing,
          audit: Audit | None = None) -> RpcServer | None:
    """Start this worker's gRPC server on ``GRPC_PORT`` (None when it is off). Raises
    RuntimeError when the port cannot be bound (so the worker fails to boot and says why)."""
    if config.grpc_port is None:
        return None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.grpc_threads,
                                   thread_name_prefix="grpc"),
        interceptors=[interceptor := calls.Calls({}, keys, dataplane.metrics, audit,
                                                 config.trusted_proxies)],
        options=options(config),
        maximum_concurrent_rpcs=config.grpc_threads)
    services = [oip.SERVICE]
    interceptor.serve(oip.add_to(server, dataplane))
    tfserving = _tfserving(config)
    if tfserving is not None:
        interceptor.serve(tfserving.add_to(server, dataplane))
        services.extend(tfserving.SERVICES)
    elif config.grpc_tfserving is None and _tfserving_installed():
        lazy = LazyTfServing(dataplane)
        server.add_generic_rpc_handlers((lazy,))
        interceptor.serve(lazy.scopes)
        services.extend(GRPC_METHODS)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = (f"[{config.host}]:{config.grpc_port}" if ":" in config.host
               else f"{config.host}:{config.grpc_port}")
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot serve gRPC on {address} (GRPC_PORT): {exc}") from None
    if not bound:
        raise RuntimeError(f"cannot serve gRPC on {address} (GRPC_PORT)")
    server.start()
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC on %s: %s", address, ", ".join(services))
    return RpcServer(server, health_servicer, bound, services)


__all__ = ["RpcServer", "start", "options"]
