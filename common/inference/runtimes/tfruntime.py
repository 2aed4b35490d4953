"""TensorFlow: the runtime's settings and the two graph loaders. The only server module that
imports TensorFlow (lazily, so importing it costs nothing until a model is loaded).

``load_graph(folder)`` turns a :class:`~common.modelfolder.ModelFolder` into a
:class:`RuntimeGraph`: a thread-safe ``predict_fn`` (float32 ``[n, h, w, 3]`` in ``[0, 1]`` ->
float32 ``[n, outputs]``; for a SavedModel whose signature takes encoded images, a ``tf.string``
input of shape ``[None]`` or ``[]``, an object array ``[n]`` of bytes) plus what the graph
declares about its shapes. Which files to read and
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
        predict_fn: the model's input batch ``[n, *input_dims]`` (the dtype of
            ``input_dtype``; a float32 batch is cast or, for a quantised input, quantised) ->
            float32 ``[n, outputs]``. Thread-safe; a graph whose batch is fixed at 1 is run
            once per image.
        input_dims: one image's dimensions as the graph declares them (``(h, w, 3)`` or
            ``(3, h, w)``, None where not fixed), or None when the input is not 4-D.
        outputs: the output width the graph declares, or None when not fixed.
        keepalive: the object whose variables the function needs.
        input_dtype: ``float32``, ``uint8``, ``int8`` (a quantised TFLite input) or ``string``
            (encoded images: ``[n]`` bytes objects).
        input_name: the graph's own name for its input (protocol metadata shows it).
        fixed_batch: the batch size the graph fixes (1 for many exports), or None.
        quantised: the input is quantised (a TFLite uint8/int8 input with a scale): it takes
            float32 pixels, which the runtime quantises with the model's scale and zero point.
        alone_fn: the same model on more threads, for calls that start while no other worker
            has work in hand (``RUNTIME_THREADS_ALONE``), or None.
    """

    predict_fn: Callable[[np.ndarray], np.ndarray]
    input_dims: tuple | None
    outputs: int | None
    keepalive: Any = None
    input_dtype: str = "float32"
    input_name: str = "images"
    fixed_batch: int | None = None
    quantised: bool = False
    alone_fn: Callable[[np.ndarray], np.ndarray] | None = None

    def static_size(self, layout: str = "NHWC") -> tuple[int, int] | None:
        """``(height, width)`` the graph fixes, read in ``layout``; None when not both fixed."""
        if not self.input_dims or len(self.input_dims) != 3:
            return None
        h, w = self.input_dims[:2] if layout == "NHWC" else self.input_dims[1:]
        return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None


def per_image(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A graph whose batch is fixed at 1, run once per image of a batch (results stacked)."""
    def predict_fn(batch: np.ndarray) -> np.ndarray:
        if len(batch) == 1:
            return run(batch)
        return np.concatenate([run(batch[i:i + 1]) for i in range(len(batch))])
    return predict_fn


def dims_of(shape) -> tuple | None:
    """One image's dims of a 4-D batch shape (ints, None where unknown), else None."""
    dims = list(shape) if shape is not None else []
    if len(dims) != 4:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in dims[1:])


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


#: Input dtypes a served graph may take (TensorFlow's names), as the spec calls them.
_DTYPES = {"float32": "float32", "uint8": "uint8", "float16": "float32", "float64": "float32",
           "string": "string"}


def _load_saved_model(folder: ModelFolder) -> RuntimeGraph:
    """A SavedModel's signature (model.json ``signature``: ``name``, ``input``, ``output``;
    default ``serving_default``, its one input, ``probabilities`` or its first output)."""
    import tensorflow as tf

    wanted = folder.read_metadata().get("signature") or {}
    try:
        loaded = tf.saved_model.load(folder.path)
    except Exception as exc:  # TensorFlow raises many types for a broken SavedModel
        raise ModelLoadError(f"cannot load SavedModel {folder.path} (is {SAVED_MODEL} or a "
                             f"file under variables/ damaged or truncated?): {exc}") from None
    name = wanted.get("name") or "serving_default"
    signature = loaded.signatures.get(name)
    if signature is None:
        raise ModelLoadError(f"{folder.path} has no {name} signature (it has "
                             f"{sorted(loaded.signatures) or 'none'})")
    inputs = signature.structured_input_signature[1]
    input_name = wanted.get("input") or (next(iter(inputs)) if len(inputs) == 1 else None)
    if input_name not in inputs:
        raise ModelLoadError(f"{folder.path}: signature {name} must take one image input, has "
                             f"{list(inputs)}")
    spec = inputs[input_name]
    dtype = _DTYPES.get(spec.dtype.name)
    if dtype is None:
        raise ModelLoadError(f"{folder.path}: input {input_name} is {spec.dtype.name}; an image "
                             f"model's input must be float or uint8 pixels, or encoded "
                             f"images (string)")
    if dtype == "string" and spec.shape.rank not in (0, 1):
        raise ModelLoadError(f"{folder.path}: input {input_name} is a string tensor of shape "
                             f"{spec.shape}; encoded images are [None] (a batch) or [] (one)")
    outputs = signature.structured_outputs
    output_name = wanted.get("output") or (
        "probabilities" if "probabilities" in outputs else next(iter(outputs)))
    if output_name not in outputs:
        raise ModelLoadError(f"{folder.path}: signature {name} has no output {output_name!r} "
                             f"(it has {sorted(outputs)})")
    declared = outputs[output_name].shape

    def call(x) -> np.ndarray:
        """The signature on one input tensor -> its output as float32."""
        return np.asarray(signature(**{input_name: x})[output_name].numpy(), np.float32)

    def predict_fn(images: np.ndarray) -> np.ndarray:
        return call(tf.constant(images, dtype=spec.dtype))

    if dtype == "string":
        rows = declared.rank == 2 or (declared.rank == 1 and spec.shape.rank == 0)
        return RuntimeGraph(_encoded_images(call, spec.shape.rank),
                            None, _static(declared[-1]) if rows else None, loaded,
                            input_dtype="string", input_name=input_name)
    return RuntimeGraph(predict_fn, dims_of(spec.shape.as_list() if spec.shape.rank else None),
                        _static(declared[-1]) if declared.rank == 2 else None, loaded,
                        input_dtype=dtype, input_name=input_name)


def _encoded_images(call, rank: int):
    """The ``predict_fn`` of a signature taking encoded images (``call``: the signature on one
    string tensor -> float32): an object array ``[n]`` of bytes -> float32 ``[n, outputs]``; a
    scalar string input (``rank`` 0) is called once per image, its ``[outputs]`` or
    ``[1, outputs]`` answers stacked."""
    import tensorflow as tf

    def predict_fn(images: np.ndarray) -> np.ndarray:
        encoded = [bytes(b) for b in np.asarray(images, dtype=object).reshape(-1)]
        if rank == 1:
            return call(tf.constant(encoded, dtype=tf.string))
        return np.stack([call(tf.constant(b, dtype=tf.string)).reshape(-1) for b in encoded])

    return predict_fn


def load_keras(path: str) -> RuntimeGraph:
    """A Keras model file (``.keras``, or a legacy ``.h5``) as a RuntimeGraph, its call traced
    once per batch size into a graph (``tf.function``)."""
    import tensorflow as tf
    try:
        import keras
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # a damaged file, custom layers not registered, ...
        raise ModelLoadError(f"cannot load Keras model {path}: {exc}") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelLoadError(f"{path}: the model must take one input and give one output, has "
                             f"{len(model.inputs)} and {len(model.outputs)}")
    shape = tuple(model.inputs[0].shape)
    dtype = _DTYPES.get(str(model.inputs[0].dtype).replace("tf.", ""), "float32")
    call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def predict_fn(images: np.ndarray) -> np.ndarray:
        return np.asarray(call(tf.constant(images, dtype=dtype)), np.float32)

    out = tuple(model.outputs[0].shape)
    return RuntimeGraph(predict_fn, dims_of(shape),
                        int(out[-1]) if len(out) == 2 and out[-1] else None, model,
                        input_dtype=dtype, input_name=model.inputs[0].name)


def _load_frozen_graph(folder: ModelFolder) -> RuntimeGraph:
    """A TF1 frozen GraphDef as a pruned ``tf.function``, scaled as ``folder.legacy`` says."""
    import tensorflow as tf

    legacy = folder.legacy
    names = folder.read_metadata().get("signature") or {}  # an imported graph's tensor names
    if names:
        from dataclasses import replace
        legacy = replace(legacy, input_layer=names.get("input", legacy.input_layer),
                         output_layer=names.get("output", legacy.output_layer))
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
        return np.asarray(fn(tf.constant(x, dtype=input_tensor.dtype)).numpy(), np.float32)

    declared = output_tensor.shape
    return RuntimeGraph(predict_fn, dims_of(input_tensor.shape.as_list()
                                            if input_tensor.shape.rank else None),
                        _static(declared[-1]) if declared.rank == 2 else None, wrapped,
                        input_name=legacy.input_layer)


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"
