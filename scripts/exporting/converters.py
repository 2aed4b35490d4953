"""SavedModel -> ONNX (tf2onnx) and -> TFLite (TensorFlow's own converter), in memory.

Both start from the folder's ``serving_default`` signature: float32 ``[n, h, w, 3]`` in
``[0, 1]`` (input ``images``) -> ``[n, labels]`` scores (output ``probabilities``); the batch
dimension stays free. Nothing is written here: :mod:`scripts.exporting` verifies the bytes
first.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import re
from typing import Iterable

import numpy as np

#: The ONNX opset written by default; tf2onnx 1.17 writes 13..18 (newer ones are refused).
DEFAULT_OPSET = 17
OPSETS = range(13, 19)
#: TFLite variants: float32, float16 weights, int8 weights (dynamic range), full int8.
QUANTIZATIONS = ("fp32", "float16", "dynamic", "int8")
#: The packages each format needs beyond TensorFlow (requirements-export.txt).
NEEDS = {"onnx": ("tf2onnx", "onnx", "onnxruntime"), "tflite": ("ai_edge_litert",)}


#: What the converters and LiteRT print on stderr while they work (hidden unless --verbose).
CONVERTER_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} \d+:\d+:\d+\.\d+ "
    r"|W\d{4} \d+:\d+:\d+\.\d+ +\d+ (tf_tfl_flatbuffer_helpers|flatbuffer_export)\.cc:"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate"
    r"|fully_quantize: \d)")


@contextlib.contextmanager
def quiet_converters():
    """tf2onnx's INFO lines and the TFLite converter's C++ notices kept out of the terminal,
    unless TensorFlow's own logs are wanted (``--verbose``: its logger at INFO or below)."""
    if logging.getLogger("tensorflow").getEffectiveLevel() <= logging.INFO:
        yield
        return
    from scripts.cli import filtered_stderr

    tf2onnx_log = logging.getLogger("tf2onnx")
    level = tf2onnx_log.level
    tf2onnx_log.setLevel(logging.WARNING)
    try:
        with filtered_stderr(CONVERTER_NOISE):
            yield
    finally:
        tf2onnx_log.setLevel(level)


class ExportError(RuntimeError):
    """An export cannot be made, or was made and refused; the message says why."""


def missing_packages(fmt: str) -> list[str]:
    """The packages ``fmt`` needs that cannot be imported here."""
    missing = []
    for name in NEEDS[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name.replace("_", "-"))
    return missing


def require(fmt: str) -> None:
    """ExportError naming the missing converters and how to install them."""
    missing = missing_packages(fmt)
    if missing:
        raise ExportError(f"exporting to {fmt} needs {', '.join(missing)}, which is not "
                          f"installed: pip install -r requirements-export.txt")


def _serving_function(saved_model_dir: str, size: tuple[int, int]):
    """(tf.function over ``images``, its TensorSpec, the loaded object kept alive)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    signature = loaded.signatures["serving_default"]
    (input_name, _), = signature.structured_input_signature[1].items()
    outputs = signature.structured_outputs
    output_name = "probabilities" if "probabilities" in outputs else next(iter(outputs))
    spec = tf.TensorSpec([None, size[0], size[1], 3], tf.float32, name="images")

    @tf.function(input_signature=[spec])
    def serve(images):
        return {"probabilities": signature(**{input_name: images})[output_name]}

    return serve, spec, loaded


def to_onnx(saved_model_dir: str, size: tuple[int, int], opset: int = DEFAULT_OPSET) -> bytes:
    """The SavedModel as ONNX bytes: input ``images``, output ``probabilities``."""
    require("onnx")
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported by tf2onnx 1.17 (use "
                          f"{OPSETS.start}..{OPSETS.stop - 1})")
    import tf2onnx

    serve, spec, _loaded = _serving_function(saved_model_dir, size)
    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=opset)
    except Exception as exc:  # tf2onnx raises many types for an op it cannot convert
        raise ExportError(f"tf2onnx could not convert {saved_model_dir}: {exc}") from None
    return proto.SerializeToString()


def to_tflite(saved_model_dir: str, size: tuple[int, int], quantize: str = "fp32",
              calibration: Iterable[np.ndarray] | None = None) -> bytes:
    """The SavedModel as TFLite bytes; float32 input and output whatever ``quantize`` is.

    The variables are frozen into constants first: for SavedModels holding Keras 3 resource
    variables the converter otherwise writes VAR_HANDLE ops whose outputs are NaN.
    ``quantize="int8"`` needs ``calibration``: float32 ``[h, w, 3]`` images in ``[0, 1]``.
    """
    require("tflite")
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZATIONS)}")
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    serve, spec, loaded = _serving_function(saved_model_dir, size)
    frozen = convert_variables_to_constants_v2(serve.get_concrete_function(spec))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], loaded)
    if quantize != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        images = [] if calibration is None else list(calibration)
        if not images:
            raise ExportError("--quantize int8 needs calibration images (--calibration-dir)")
        converter.representative_dataset = lambda: ([img[None].astype(np.float32)]
                                                    for img in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return converter.convert()
    except Exception as exc:
        raise ExportError(f"the TFLite converter could not convert {saved_model_dir}: "
                          f"{exc}") from None
