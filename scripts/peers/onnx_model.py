"""What every peer service shares, so that only the serving framework differs between them.

The same ``model.onnx`` on ONNX Runtime with the thread settings our service uses (the same
environment variables, read here; 0 = ONNX Runtime's own choice, spinning off), and our own
decode + resize + scale (``common.inference.images.load_for_model``), so a peer's image reaches
the model as the same float32 array ours does. No serving framework is imported here: the peer
files (``kserve_server.py``, ``litserve_server.py``, ``bentoml_service.py``) import this, and the
tests import it in our own virtualenv.

    model = OnnxModel.load("build/models/mobilenet_v2")
    x = np.stack([model.preprocess(instance) for instance in body["instances"]])
    answers = model.top_k(model.predict(x))       # [[{"label", "score"}, ...] per image]
"""
from __future__ import annotations

import base64
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # our preprocessing: the peers' virtualenvs do not install this repo
    sys.path.insert(0, ROOT)

from common.inference.images import load_for_model  # noqa: E402

#: Environment variables the peer services read (the benchmark sets them for every server).
MODEL_DIR = "PEER_MODEL_DIR"  # the model folder (model.onnx, labels.txt, model.json)
MODEL_NAME = "PEER_MODEL_NAME"  # the name in /v1/models/<name>:predict (ours: model.json's)
PORT = "PEER_PORT"
MAX_BATCH = "PEER_MAX_BATCH"  # the peer's batch size limit, where it batches (ours: 8)
BATCH_WAIT_MS = "PEER_BATCH_WAIT_MS"  # how long a peer's batcher waits to fill a batch
WORKERS = "PEER_WORKERS"  # processes serving the model (each its own session)
TOP_K = 5


@dataclass
class PeerSettings:
    """A peer server's settings, from the environment (one line each above)."""

    model_dir: str
    name: str
    port: int
    max_batch: int
    batch_wait_ms: float
    workers: int
    intra_op: int
    inter_op: int
    spinning: bool

    @classmethod
    def from_env(cls, environ=os.environ) -> "PeerSettings":
        return cls(model_dir=environ[MODEL_DIR], name=environ[MODEL_NAME],
                   port=int(environ.get(PORT, "8080")),
                   max_batch=int(environ.get(MAX_BATCH, "8")),
                   batch_wait_ms=float(environ.get(BATCH_WAIT_MS, "10")),
                   workers=int(environ.get(WORKERS, "1")),
                   intra_op=int(environ.get("ONNX_INTRA_OP_THREADS", "0")),
                   inter_op=int(environ.get("ONNX_INTER_OP_THREADS", "0")),
                   spinning=environ.get("ONNX_SPINNING", "0").lower() in ("1", "true", "yes"))


class OnnxModel:
    """One ONNX Runtime session, its labels and its input size; thread-safe ``predict``."""

    def __init__(self, session, labels: list[str], size: tuple[int, int]):
        self.session = session
        self.labels = labels
        self.size = size
        self.input_name = session.get_inputs()[0].name
        outputs = session.get_outputs()
        self.output_name = next((o.name for o in outputs if o.name == "probabilities"),
                                outputs[0].name)

    @classmethod
    def load(cls, model_dir: str, intra_op: int = 0, inter_op: int = 0,
             spinning: bool = False) -> "OnnxModel":
        """The folder's model.onnx with our service's session options (as
        ``common.inference.runtimes.onnxrt.session_options``, restated here so that this file
        needs only onnxruntime, numpy and Pillow)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op
        options.inter_op_num_threads = inter_op
        options.log_severity_level = 3
        flag = "1" if spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", flag)
        options.add_session_config_entry("session.inter_op.allow_spinning", flag)
        session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"),
                                       sess_options=options, providers=["CPUExecutionProvider"])
        with open(os.path.join(model_dir, "labels.txt")) as fh:
            labels = [line.strip() for line in fh if line.strip()]
        with open(os.path.join(model_dir, "model.json")) as fh:
            height, width = json.load(fh)["input_size"]
        return cls(session, labels, (int(height), int(width)))

    @classmethod
    def from_settings(cls, settings: PeerSettings) -> "OnnxModel":
        return cls.load(settings.model_dir, settings.intra_op, settings.inter_op,
                        settings.spinning)

    def preprocess(self, instance) -> np.ndarray:
        """A TF-Serving-style instance ``{"b64": "<base64 image>"}`` (or the bare base64 string)
        -> float32 ``[h, w, 3]`` in [0, 1], by our service's own decode, resize and scale."""
        return preprocess(instance, self.size)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``[n, h, w, 3]`` -> probabilities ``[n, labels]``."""
        return self.session.run([self.output_name],
                                {self.input_name: np.asarray(batch, np.float32)})[0]

    def top_k(self, probabilities: np.ndarray, k: int = TOP_K) -> list[list[dict]]:
        """Each row's ``k`` best labels, highest first: ``[{"label", "score"}, ...]``."""
        return [ranked(row, self.labels, k) for row in np.atleast_2d(probabilities)]


def preprocess(instance, size: tuple[int, int]) -> np.ndarray:
    """``{"b64": "..."}`` or a base64 string -> our ``load_for_model`` array for ``size``."""
    if isinstance(instance, dict):
        if set(instance) != {"b64"}:
            raise ValueError(f"expected an instance {{'b64': ...}}, got keys {sorted(instance)}")
        instance = instance["b64"]
    if not isinstance(instance, str):
        raise ValueError(f"expected a base64 string, got {type(instance).__name__}")
    return load_for_model(base64.b64decode(instance, validate=True), size)[0]


def ranked(row: np.ndarray, labels: list[str], k: int = TOP_K) -> list[dict]:
    """The ``k`` (clamped to the labels) highest scores of one row, highest first."""
    k = max(1, min(k, len(labels)))
    best = np.argsort(row)[::-1][:k]
    return [{"label": labels[i], "score": float(row[i])} for i in best]
