"""Models made the way other tools make them, tiny, for scripts/import_model.py's tests.

Each maker writes what its tool writes and returns the path to hand to the importer:

* :func:`onnx_classifier`: a torchvision-style ONNX export built with ``onnx.helper``: input
  ``pixel_values`` float32 ``[N, 3, h, w]`` (ImageNet mean/std normalised), output ``logits``
  ``[N, k]`` (no softmax); a dynamic batch ``N`` or a fixed batch of 1, optionally with its
  weights in an external data file beside it (``<file>.data``);
* :func:`onnx_two_inputs`, :func:`onnx_not_an_image`, :func:`onnx_3d_output`: ONNX graphs the
  service cannot serve;
* :func:`keras_classifier`: a ``.keras`` (or ``.h5``) file in Keras applications' ``tf``
  convention (RGB in ``[-1, 1]``) or ``caffe`` convention (BGR, ImageNet means subtracted,
  0..255), softmax inside;
* :func:`quantised_tflite`: a fully integer-quantised ``.tflite`` (uint8 or int8 input and
  output, calibrated on a representative dataset in ``[-1, 1]``), by ``tf.lite.TFLiteConverter``;
* :func:`foreign_saved_model`: a SavedModel whose signature ``predict`` takes ``pixels``
  (ImageNet mean/std normalised, NHWC) and returns ``logits`` ``[N, 1001]`` with a background
  class first, and ``classes`` ``[N]``; :func:`string_input_saved_model` takes encoded bytes;
* :func:`frozen_graph`: a TF1-style frozen ``.pb`` (``input`` -> ``scores``, softmax), inputs
  in ``[-1, 1]``.

The weights are fixed (seeded) and chosen so that scores differ clearly between images: the
tests compare the service's scores with their own preprocessing and the raw model's outputs.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Input size of the small models (height, width): non-square inputs are not needed, images are.
SIZE = (32, 32)


# -- ONNX ---------------------------------------------------------------------------------------
def _onnx_weights(size, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    flat = 3 * size[0] * size[1]
    spatial = (rng.standard_normal((flat, classes)) * (3.0 / np.sqrt(flat))).astype(np.float32)
    colour = (rng.standard_normal((3, classes)) * 2.0).astype(np.float32)
    bias = (rng.standard_normal(classes) * 0.5).astype(np.float32)
    return spatial, colour, bias


def _reduce_mean(opset: int, data: str, out: str, axes: list[int], inits: list) -> object:
    """ReduceMean over ``axes`` without keeping them (opset 18 takes the axes as an input)."""
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), out + "_axes"))
        return helper.make_node("ReduceMean", [data, out + "_axes"], [out], keepdims=0)
    return helper.make_node("ReduceMean", [data], [out], axes=axes, keepdims=0)


def _save_onnx(graph, path: str, opset: int, external: bool = False) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="pytorch", producer_version="2.5.0")
    model.ir_version = 8
    onnx.checker.check_model(model)
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data", size_threshold=0)
    else:
        onnx.save_model(model, path)
    return path


def onnx_classifier(path: str, *, size=SIZE, classes: int = 4, batch: int | str = "N",
                    opset: int = 17, external: bool = False, seed: int = 0) -> str:
    """A torchvision-style classifier: float32 ``[batch, 3, h, w]`` (normalised) -> logits
    ``[batch, classes]`` = flatten(x) @ A + mean_hw(x) @ C + b. Sensitive to every pixel, so
    a wrong crop, layout, colour order or mean/std changes its scores."""
    spatial, colour, bias = _onnx_weights(size, classes, seed)
    inits = [numpy_helper.from_array(spatial, "fc.weight"),
             numpy_helper.from_array(colour, "colour.weight"),
             numpy_helper.from_array(bias, "fc.bias")]
    nodes = [helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "fc.weight"], ["spatial"]),
             _reduce_mean(opset, "pixel_values", "means", [2, 3], inits),
             helper.make_node("MatMul", ["means", "colour.weight"], ["colour"]),
             helper.make_node("Add", ["spatial", "colour"], ["summed"]),
             helper.make_node("Add", ["summed", "fc.bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                       [batch, 3, size[0], size[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])], inits)
    return _save_onnx(graph, path, opset, external)


def onnx_two_inputs(path: str, *, size=SIZE, classes: int = 4) -> str:
    """Two image inputs (``left``, ``right``) -> logits: the service feeds one."""
    _, colour, bias = _onnx_weights(size, classes, 1)
    inits = [numpy_helper.from_array(colour, "w"), numpy_helper.from_array(bias, "b")]
    shape = ["N", 3, size[0], size[1]]
    nodes = [helper.make_node("Add", ["left", "right"], ["both"]),
             _reduce_mean(17, "both", "means", [2, 3], inits),
             helper.make_node("MatMul", ["means", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["logits"])]
    graph = helper.make_graph(
        nodes, "pair", [helper.make_tensor_value_info("left", TensorProto.FLOAT, shape),
                        helper.make_tensor_value_info("right", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    return _save_onnx(graph, path, 17)


def onnx_not_an_image(path: str, *, features: int = 10, classes: int = 4) -> str:
    """A tabular model: float32 ``[N, features]`` -> logits."""
    weight = np.random.default_rng(2).standard_normal((features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["logits"])], "tabular",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(weight, "w")])
    return _save_onnx(graph, path, 17)


def onnx_3d_output(path: str, *, size=SIZE, classes: int = 4) -> str:
    """An image model whose output is ``[N, 1, classes]`` (a sequence of one), not scores."""
    _, colour, bias = _onnx_weights(size, classes, 3)
    inits = [numpy_helper.from_array(colour, "w"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array([-1, 1, classes], np.int64), "shape")]
    nodes = [_reduce_mean(17, "pixel_values", "means", [2, 3], inits),
             helper.make_node("MatMul", ["means", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["flat_logits"]),
             helper.make_node("Reshape", ["flat_logits", "shape"], ["logits"])]
    graph = helper.make_graph(
        nodes, "sequence",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                       ["N", 3, size[0], size[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, classes])], inits)
    return _save_onnx(graph, path, 17)


# -- Keras and TFLite ---------------------------------------------------------------------------
#: Keras' "caffe" means (0..255) in the model's own BGR order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def keras_model(convention: str = "tf", *, size=SIZE, seed: int = 0):
    """A Keras functional model: ``[N, h, w, 3]`` -> GlobalAveragePooling2D -> Dense(3,
    softmax) over (red, green, blue). ``convention`` ``tf``: RGB in ``[-1, 1]``; ``caffe``:
    BGR minus :data:`CAFFE_MEAN_BGR` (0..255), so its first channel is blue."""
    import keras

    rng = np.random.default_rng(seed)
    inputs = keras.Input(shape=(*size, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(inputs)
    dense = keras.layers.Dense(3, activation="softmax", name="predictions")
    model = keras.Model(inputs, dense(pooled), name=f"colours_{convention}")
    if convention == "tf":  # [-1, 1] RGB: channel i votes for colour i
        weight = 4.0 * np.eye(3) + rng.standard_normal((3, 3)) * 0.8
    elif convention == "caffe":  # centred 0..255 BGR: channel 0 (blue) votes for colour 2
        weight = 0.04 * np.eye(3)[::-1] + rng.standard_normal((3, 3)) * 0.006
    else:
        raise ValueError(convention)
    bias = rng.standard_normal(3) * 0.3
    dense.set_weights([weight.astype(np.float32), bias.astype(np.float32)])
    return model


def keras_classifier(path: str, convention: str = "tf", *, size=SIZE, seed: int = 0) -> str:
    """:func:`keras_model` saved as ``path`` (``.keras``, or a legacy ``.h5``)."""
    keras_model(convention, size=size, seed=seed).save(path)
    return path


def quantised_tflite(path: str, dtype: str = "uint8", *, size=SIZE, seed: int = 0) -> str:
    """The ``tf`` convention Keras model, fully integer-quantised by ``TFLiteConverter``
    (representative dataset: images in ``[-1, 1]``); ``dtype`` (uint8 or int8) input and
    output."""
    import tensorflow as tf

    model = keras_model("tf", size=size, seed=seed)
    rng = np.random.default_rng(seed)

    def representative():
        for i in range(32):
            colour = rng.random(3) * 2 - 1
            noise = rng.standard_normal((1, *size, 3)) * 0.3
            yield [np.clip(colour + noise, -1, 1).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = getattr(tf, dtype)
    with warnings.catch_warnings():  # "statistics for quantized inputs were expected"
        warnings.simplefilter("ignore", UserWarning)
        data = converter.convert()
    with open(path, "wb") as fh:
        fh.write(data)
    return path


# -- SavedModel and frozen graph ------------------------------------------------------------------
def foreign_saved_model(folder: str, *, size=(48, 48), classes: int = 1001,
                        seed: int = 0) -> str:
    """A SavedModel with signature ``predict``: ``pixels`` float32 ``[N, h, w, 3]`` (ImageNet
    mean/std normalised) -> ``{"logits": [N, classes], "classes": [N] int64}``; output 0 is a
    background class (label_offset 1). Logits = mean_hw(x) @ C + avgpool8(x) @ S + b."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    pooled = (size[0] // 8) * (size[1] // 8) * 3
    module = tf.Module()
    module.colour = tf.Variable((rng.standard_normal((3, classes)) * 2).astype(np.float32))
    module.spatial = tf.Variable(
        (rng.standard_normal((pooled, classes)) * (2 / np.sqrt(pooled))).astype(np.float32))
    module.bias = tf.Variable((rng.standard_normal(classes) * 0.5).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32, name="pixels")])
    def predict(pixels):
        means = tf.reduce_mean(pixels, axis=[1, 2])
        grid = tf.reshape(tf.nn.avg_pool2d(pixels, 8, 8, "VALID"), [-1, pooled])
        logits = means @ module.colour + grid @ module.spatial + module.bias
        return {"logits": logits, "classes": tf.argmax(logits, axis=-1)}

    module.predict = predict
    tf.saved_model.save(module, folder, signatures={"predict": predict})
    return folder


def string_input_saved_model(folder: str) -> str:
    """A SavedModel whose ``serving_default`` takes encoded image bytes (tf.string ``[N]``)."""
    import tensorflow as tf

    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve(image_bytes):
        decoded = tf.map_fn(lambda data: tf.reduce_mean(tf.cast(
            tf.io.decode_image(data, 3, expand_animations=False), tf.float32), axis=[0, 1]),
            image_bytes, fn_output_signature=tf.float32)
        return {"probabilities": tf.nn.softmax(decoded / 255.0)}

    module.serve = serve
    tf.saved_model.save(module, folder, signatures={"serving_default": serve})
    return folder


def frozen_graph(path: str, *, size=SIZE, seed: int = 0) -> str:
    """A TF1-style frozen GraphDef: ``input`` float32 ``[N, h, w, 3]`` in ``[-1, 1]`` ->
    ``scores`` = softmax(mean_hw(x) @ W + b) over 3 classes (the variables folded into
    constants, as ``freeze_graph`` did)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    rng = np.random.default_rng(seed)
    weight = tf.Variable((4.0 * np.eye(3) + rng.standard_normal((3, 3))).astype(np.float32))
    bias = tf.Variable((rng.standard_normal(3) * 0.3).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, *size, 3], tf.float32, name="input")])
    def scores(images):
        return tf.nn.softmax(tf.reduce_mean(images, axis=[1, 2]) @ weight + bias, name="scores")

    frozen = convert_variables_to_constants_v2(scores.get_concrete_function())
    with open(path, "wb") as fh:
        fh.write(frozen.graph.as_graph_def().SerializeToString())
    return path
