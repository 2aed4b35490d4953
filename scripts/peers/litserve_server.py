"""LitServe serving the ONNX model, as its documentation shows, with its batching switched on.

    PEER_MODEL_DIR=build/models/mobilenet_v2 PEER_MODEL_NAME=mobilenet_v2_random PEER_PORT=8080 \
        build/peers/litserve/bin/python scripts/peers/litserve_server.py

``POST /v1/models/<name>:predict`` with ``{"instances": [{"b64": "<base64 JPEG>"}]}`` (one image
a request: LitServe batches requests, not the instances inside one) answers
``{"predictions": [[{"label", "score"}, x5]]}``. ``PEER_WORKERS`` inference workers (``workers_per_device``; 1 unless the benchmark says)
and one API server process; requests are gathered into batches of up to ``PEER_MAX_BATCH``,
waiting at most ``PEER_BATCH_WAIT_MS`` (``LitAPI(max_batch_size, batch_timeout)``). LitServe runs
``decode_request`` in the inference worker, one request after another, before the batch.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import litserve as ls  # noqa: E402
from onnx_model import OnnxModel, PeerSettings  # noqa: E402

SETTINGS = PeerSettings.from_env()


class ClassifierAPI(ls.LitAPI):
    def setup(self, device):
        self.model = OnnxModel.from_settings(SETTINGS)

    def decode_request(self, request):
        (instance,) = request["instances"]
        return self.model.preprocess(instance)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.model.predict(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"predictions": self.model.top_k(output)}


if __name__ == "__main__":
    api = ClassifierAPI(max_batch_size=SETTINGS.max_batch,
                        batch_timeout=SETTINGS.batch_wait_ms / 1000.0,
                        api_path=f"/v1/models/{SETTINGS.name}:predict")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=SETTINGS.workers, timeout=30)
    server.run(host="127.0.0.1", port=SETTINGS.port, num_api_servers=1, log_level="warning",
               generate_client_file=False)
