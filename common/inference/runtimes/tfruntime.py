"""TensorFlow: the runtime's settings and the two graph loaders. The only server module that
imports TensorFlow (lazily, so importing it costs nothing until a model is loaded).

``load_graph(folder)`` turns a :class:`~common.modelfolder.ModelFolder` into a
:class:`RuntimeGraph`: a thread-safe ``predict_fn`` (float32 ``[n, h, w, 3]`` in ``[0, 1]`` ->
float32 ``[n, outputs]``) plus what the graph declares about its shapes. Which files to read and
how to check them is the model folder's business; how to run them is this module's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from common.modelfolder import SAVED_MODEL, ModelFolder, ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class RuntimeGraph:
    """A callable model graph.

    Attributes:
        predict_fn: float32 ``[n, h, w, 3]`` in ``[0, 1]`` -> float32 ``[n, outputs]``.
        static_size: ``(height, width)`` fixed by the graph's input signature, or None.
        outputs: the output width the graph declares, or None when not fixed.
        keepalive: the object whose variables the function needs.
    """

    predict_fn: Callable[[np.ndarray], np.ndarray]
    static_size: tuple[int, int] | None
    outputs: int | None
    keepalive: Any = None


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def configure(intra_op: int = 0, inter_op: int = 0, precision: str = "fp32") -> str:
    """Thread pools (0 = TensorFlow's choice) and precision; must run before the first op.

    ``precision="bf16"`` turns on oneDNN's automatic bfloat16 mixed precision for graph
    functions, only where the CPU supports bf16 natively. Returns the precision in effect.
    """
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as exc:  # the runtime was already initialised in this process
        log.warning("TensorFlow thread settings not applied: %s", exc)
    if precision == "bf16":
        if not cpu_supports_bf16():
            log.warning("PRECISION=bf16 asked for, but this CPU has no native bf16; using fp32")
            return "fp32"
        tf.config.optimizer.set_experimental_options(
            {"auto_mixed_precision_onednn_bfloat16": True})
    return precision


def load_graph(folder: ModelFolder) -> RuntimeGraph:
    """Load the folder's SavedModel, or its legacy frozen graph; ModelLoadError when broken."""
    folder.check_exists()
    if folder.is_frozen_graph:
        return _load_frozen_graph(folder)
    return _load_saved_model(folder)


def _static(dims) -> int | None:
    return None if dims is None else int(dims)


def static_size(shape) -> tuple[int, int] | None:
    """``(height, width)`` of an image batch shape ``[n, h, w, c]`` when both are fixed, else
    None (a ``tf.TensorShape`` or TensorSpec shape; shared with retrain's module inspection)."""
    if shape.rank == 4 and None not in shape[1:3]:
        return int(shape[1]), int(shape[2])
    return None


def _load_saved_model(folder: ModelFolder) -> RuntimeGraph:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(folder.path)
    except Exception as exc:  # TensorFlow raises many types for a broken SavedModel
        raise ModelLoadError(f"cannot load SavedModel {folder.path} (is {SAVED_MODEL} or a "
                             f"file under variables/ damaged or truncated?): {exc}") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ModelLoadError(f"{folder.path} has no serving_default signature")
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise ModelLoadError(f"{folder.path}: serving_default must take one input, has "
                             f"{list(inputs)}")
    (input_name, spec), = inputs.items()
    outputs = signature.structured_outputs
    output_name = "probabilities" if "probabilities" in outputs else next(iter(outputs))
    declared = outputs[output_name].shape

    def predict_fn(images: np.ndarray) -> np.ndarray:
        return signature(**{input_name: tf.constant(images)})[output_name].numpy()

    return RuntimeGraph(predict_fn, static_size(spec.shape),
                        _static(declared[-1]) if declared.rank == 2 else None, loaded)


def _load_frozen_graph(folder: ModelFolder) -> RuntimeGraph:
    """A TF1 frozen GraphDef as a pruned ``tf.function``, scaled as ``folder.legacy`` says."""
    import tensorflow as tf

    legacy = folder.legacy
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(folder.path, "rb") as fh:
            graph_def.ParseFromString(fh.read())
        wrapped = tf.compat.v1.wrap_function(
            lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
        input_tensor = wrapped.graph.as_graph_element(_tensor_name(legacy.input_layer))
        output_tensor = wrapped.graph.as_graph_element(_tensor_name(legacy.output_layer))
        fn = wrapped.prune(input_tensor, output_tensor)
    except Exception as exc:
        raise ModelLoadError(f"cannot load frozen graph {folder.path}: {exc}") from None

    scale = np.float32(255.0 / legacy.input_std)
    offset = np.float32(legacy.input_mean / legacy.input_std)

    def predict_fn(images: np.ndarray) -> np.ndarray:
        x = images * scale - offset if (scale != 1 or offset != 0) else images
        return fn(tf.constant(x, dtype=input_tensor.dtype)).numpy()

    declared = output_tensor.shape
    return RuntimeGraph(predict_fn, static_size(input_tensor.shape),
                        _static(declared[-1]) if declared.rank == 2 else None, wrapped)


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"
