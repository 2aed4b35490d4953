"""LiteRT (TensorFlow Lite): runs a folder's ``model*.tflite`` export, as a phone would, for
``label_image.py --tflite`` and the exporter's checks. No TensorFlow and no web framework here:
the ``ai-edge-litert`` package (requirements-export.txt) brings its own interpreter.

``load_graph`` gives the :class:`~common.inference.runtimes.tfruntime.RuntimeGraph` the other
loaders give: float32 ``[n, h, w, 3]`` in ``[0, 1]`` -> float32 ``[n, outputs]`` (serialised by
a lock: one interpreter is not thread-safe).
"""
from __future__ import annotations

import threading

import numpy as np

from common.inference.runtimes.tfruntime import RuntimeGraph
from common.modelfolder import ModelLoadError


def interpreter(path: str | None = None, content: bytes | None = None, threads: int | None = None):
    """An ai-edge-litert Interpreter for a file or bytes; ModelLoadError when it cannot be had."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ModelLoadError("running .tflite files needs the ai-edge-litert package "
                             "(pip install -r requirements-export.txt)") from None
    try:
        return Interpreter(model_path=path, model_content=content, num_threads=threads)
    except Exception as exc:  # a damaged flatbuffer
        raise ModelLoadError(f"cannot load {path or 'the TFLite model'}: {exc}") from None


def load_graph(path: str | None = None, content: bytes | None = None,
               threads: int | None = None) -> RuntimeGraph:
    """A ``.tflite`` file (or its bytes) as a RuntimeGraph; the batch size is set per call."""
    interp = interpreter(path, content, threads)
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    lock = threading.Lock()
    current = [None]

    def predict_fn(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        with lock:
            if current[0] != images.shape:
                interp.resize_tensor_input(inp["index"], list(images.shape))
                interp.allocate_tensors()
                current[0] = images.shape
            interp.set_tensor(inp["index"], images)
            interp.invoke()
            return interp.get_tensor(out["index"]).copy()

    shape = inp["shape"]
    static = (int(shape[1]), int(shape[2])) if len(shape) == 4 else None
    width = int(out["shape"][-1]) if len(out["shape"]) == 2 else None
    return RuntimeGraph(predict_fn, static, width, interp)
