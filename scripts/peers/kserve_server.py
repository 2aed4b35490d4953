"""KServe's Python model server serving the ONNX model, as its custom-model documentation shows.

    PEER_MODEL_DIR=build/models/mobilenet_v2 PEER_MODEL_NAME=mobilenet_v2_random PEER_PORT=8080 \
        build/peers/kserve/bin/python scripts/peers/kserve_server.py

``POST /v1/models/<name>:predict`` (KServe's v1 protocol) with
``{"instances": [{"b64": "<base64 JPEG>"}]}`` answers ``{"predictions": [[{"label", "score"},
x5]]}``. ``PEER_WORKERS`` uvicorn workers (KServe's ``workers``; 1, its default, unless the
benchmark says), gRPC off, the per-request log lines (latency, access, trace) off: our service
logs warnings only in the benchmark too.

KServe's Python server has no batching of its own: batching is the Kubernetes "batcher" (the
agent beside the container), which a Python process alone does not have. Each request is one
``preprocess`` -> ``predict`` -> ``postprocess``; KServe calls synchronous methods on its event
loop, so they are ``async`` here and hand the decode and the model call to the event loop's
default executor (KServe sizes it, ``--max_asyncio_workers``), so that requests overlap as they
do in our threads.
"""
import argparse
import asyncio
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kserve import Model, ModelServer, model_server  # noqa: E402
from onnx_model import OnnxModel, PeerSettings  # noqa: E402

SETTINGS = PeerSettings.from_env()


class OnnxClassifier(Model):
    def __init__(self, name: str):
        super().__init__(name)
        self.model = None
        self.load()

    def load(self):
        self.model = OnnxModel.from_settings(SETTINGS)
        self.ready = True

    # With workers > 1 KServe pickles the registered models into each worker process; an ONNX
    # Runtime session cannot be pickled, so each worker loads its own (as it would in ours).
    def __getstate__(self):
        return {**self.__dict__, "model": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load()

    async def preprocess(self, payload, headers=None):
        loop = asyncio.get_running_loop()
        arrays = [await loop.run_in_executor(None, self.model.preprocess, instance)
                  for instance in payload["instances"]]
        return np.stack(arrays)

    async def predict(self, payload, headers=None):
        return await asyncio.get_running_loop().run_in_executor(None, self.model.predict, payload)

    def postprocess(self, result, headers=None):
        return {"predictions": self.model.top_k(result)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    args, _ = parser.parse_known_args()
    server = ModelServer(http_port=SETTINGS.port, enable_grpc=False,
                         enable_latency_logging=False, workers=SETTINGS.workers)
    for name in ("uvicorn.access", "kserve.trace"):  # a line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([OnnxClassifier(SETTINGS.name)])
