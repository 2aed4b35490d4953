"""BentoML serving the ONNX model, as its documentation shows, with adaptive batching on.

    PEER_MODEL_DIR=build/models/mobilenet_v2 PEER_MODEL_NAME=mobilenet_v2_random \
        build/peers/bentoml/bin/bentoml serve bentoml_service:Classifier \
        --working-dir scripts/peers --host 127.0.0.1 --port 8080

``POST /v1/models/<name>:predict`` with ``{"instances": [{"b64": "<base64 JPEG>"}]}`` (the API's
one parameter is ``instances``, so this is BentoML's own JSON body) answers the list of each
image's ``[{"label", "score"}, x5]``. ``batchable=True``: BentoML's dispatcher joins the
``instances`` of concurrent requests into one call of up to ``PEER_MAX_BATCH`` images (its
adaptive batching chooses how long to wait; ``max_latency_ms`` is left at its default) and
splits the answers back. One worker (the default), access log off (our service logs warnings
only in the benchmark too). The batch's images are decoded one after another inside the call.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bentoml  # noqa: E402
from onnx_model import OnnxModel, PeerSettings  # noqa: E402

SETTINGS = PeerSettings.from_env()


@bentoml.service(workers=SETTINGS.workers, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self):
        self.model = OnnxModel.from_settings(SETTINGS)

    @bentoml.api(route=f"/v1/models/{SETTINGS.name}:predict", batchable=True,
                 max_batch_size=SETTINGS.max_batch)
    def predict(self, instances: list[dict[str, str]]) -> list[list[dict]]:
        x = np.stack([self.model.preprocess(instance) for instance in instances])
        return self.model.top_k(self.model.predict(x))
