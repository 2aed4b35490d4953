"""LiteRT (TensorFlow Lite): runs a folder's ``model*.tflite`` export, as a phone would, for
``label_image.py --tflite`` and the exporter's checks. No TensorFlow and no web framework here:
the ``ai-edge-litert`` package (requirements.txt) brings its own interpreter.

``load_graph`` gives the :class:`~common.inference.runtimes.tfruntime.RuntimeGraph` the other
loaders give: the model's input batch -> float32 ``[n, outputs]`` (serialised by a lock: one
interpreter is not thread-safe); quantised inputs and outputs use the model's own scale and
zero point.
"""
from __future__ import annotations

import threading

import numpy as np

from common.inference.runtimes.tfruntime import RuntimeGraph, dims_of, per_image
from common.modelfolder import ModelLoadError


def interpreter(path: str | None = None, content: bytes | None = None, threads: int | None = None):
    """An ai-edge-litert Interpreter for a file or bytes; ModelLoadError when it cannot be had."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ModelLoadError("running .tflite files needs the ai-edge-litert package "
                             "(pip install -r requirements.txt)") from None
    try:
        return Interpreter(model_path=path, model_content=content, num_threads=threads)
    except Exception as exc:  # a damaged flatbuffer
        raise ModelLoadError(f"cannot load {path or 'the TFLite model'}: {exc}") from None


def load_graph(path: str | None = None, content: bytes | None = None,
               threads: int | None = None) -> RuntimeGraph:
    """A ``.tflite`` file (or its bytes) as a RuntimeGraph; the batch size is set per call
    (a graph whose batch is fixed at 1 runs once per image). A quantised input (uint8/int8
    with a scale) is quantised from the float batch with the model's own scale and zero point;
    a quantised output is dequantised the same way."""
    interp = interpreter(path, content, threads)
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    lock = threading.Lock()
    current = [None]
    in_type = np.dtype(inp["dtype"])
    in_scale, in_zero = inp.get("quantization", (0.0, 0))
    out_scale, out_zero = out.get("quantization", (0.0, 0))
    quantised_in = in_type.kind in "iu" and in_scale > 0
    signature = inp.get("shape_signature", inp["shape"])
    fixed = int(signature[0]) if len(signature) and signature[0] > 0 else None

    def to_input(images: np.ndarray) -> np.ndarray:
        if images.dtype == in_type:
            return images
        if quantised_in:
            info = np.iinfo(in_type)
            q = np.rint(np.asarray(images, np.float32) / np.float32(in_scale) + in_zero)
            return np.clip(q, info.min, info.max).astype(in_type)
        return np.asarray(images, in_type)

    def run(images: np.ndarray) -> np.ndarray:
        x = to_input(np.asarray(images))
        with lock:
            if current[0] != x.shape:
                interp.resize_tensor_input(inp["index"], list(x.shape))
                interp.allocate_tensors()
                current[0] = x.shape
            interp.set_tensor(inp["index"], x)
            interp.invoke()
            y = interp.get_tensor(out["index"]).copy()
        if out_scale > 0 and np.dtype(y.dtype).kind in "iu":
            return ((y.astype(np.float32) - out_zero) * np.float32(out_scale)).reshape(len(x), -1)
        return np.asarray(y, np.float32).reshape(len(x), -1)

    width = int(out["shape"][-1]) if len(out["shape"]) >= 2 else None
    dtype = "uint8" if in_type == np.uint8 and not quantised_in else (
        "float32" if not quantised_in else in_type.name)
    return RuntimeGraph(per_image(run) if fixed == 1 else run, dims_of(list(signature)), width,
                        interp, input_dtype=dtype, input_name=str(inp["name"]),
                        fixed_batch=fixed, quantised=bool(quantised_in))
