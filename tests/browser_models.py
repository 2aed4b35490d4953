"""Imported ONNX models and pictures for the in-browser tests (test_browser_onnx.py): small
graphs built with ``onnx.helper`` whose answer is a fixed linear function of the picture's mean
colour, so any step of the preprocessing the page gets wrong (the crop, the filter, the
mean/std, the layout, the colour order) moves the scores far beyond rounding.

A model folder is what ``import_model.py`` writes: ``model.onnx``, ``labels.txt`` and
``model.json`` with ``format: onnx``, the input size and the ``preprocessing`` spec.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

LABELS = ["amber", "jade", "slate", "coral"]

#: Per-channel mean -> logits (rows: the channels as the model takes them). Moderate gains: a
#: pixel level of difference in a channel's mean moves a score by far less than the tests'
#: tolerance, a wrong crop or normalisation by far more.
WEIGHTS = np.array([[1.2, -0.9, 0.3, -0.4],
                    [-0.7, 1.1, -0.5, 0.2],
                    [-0.3, -0.4, 1.0, 0.6]], np.float32)
BIAS = np.array([0.1, -0.2, 0.05, 0.0], np.float32)

#: The torchvision preset: NCHW float32, resize the shorter side to 37 (32 / 0.875) and crop
#: the centre 32 x 32, ImageNet mean/std, logits out.
TORCHVISION = {"preset": "torchvision"}
#: Everything else the page must port: NHWC uint8 BGR pixels, letterboxed with bicubic, one
#: leading background output dropped, independent sigmoid scores.
UINT8_LETTERBOX = {"preset": "tfhub", "colour": "BGR", "resize": "letterbox",
                   "interpolation": "bicubic", "dtype": "uint8", "output": "sigmoid",
                   "label_offset": 1}


def save_onnx_model(folder: str, preprocessing: dict, *, size=(32, 32),
                    name: str = "imported") -> str:
    """Write an imported ONNX model folder: the graph takes the layout and dtype
    ``preprocessing`` says (NCHW for torchvision), averages each channel over the picture and
    maps the three means through :data:`WEIGHTS` (steeper, and shifted, for uint8 pixels), with
    ``label_offset`` leading outputs before the labels' own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from common.inference.preprocessing import Preprocessing

    spec = Preprocessing.from_dict(preprocessing)
    height, width = size
    nchw = spec.layout == "NCHW"
    uint8 = spec.dtype == "uint8"
    dims = ["N", 3, height, width] if nchw else ["N", height, width, 3]
    weights, bias = WEIGHTS, BIAS
    if uint8:  # 0..255 pixels: a steeper slope for sigmoid scores that spread
        weights = weights * np.float32(4.0 / 255.0)
        bias = bias - np.float32(1.5)
    if spec.label_offset:
        weights = np.concatenate([np.full((3, spec.label_offset), 0.5, np.float32), weights], 1)
        bias = np.concatenate([np.zeros(spec.label_offset, np.float32), bias])
    nodes, source = [], "input"
    if uint8:
        nodes.append(helper.make_node("Cast", ["input"], ["pixels"], to=TensorProto.FLOAT))
        source = "pixels"
    nodes += [helper.make_node("ReduceMean", [source], ["means"],
                               axes=[2, 3] if nchw else [1, 2], keepdims=0),
              helper.make_node("Gemm", ["means", "weights", "bias"], ["scores"])]
    outputs = weights.shape[1]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.UINT8 if uint8 else TensorProto.FLOAT,
                                       dims)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", outputs])],
        [numpy_helper.from_array(weights.astype(np.float32), "weights"),
         numpy_helper.from_array(bias.astype(np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime and onnxruntime-web both read
    onnx.checker.check_model(model)
    os.makedirs(folder, exist_ok=True)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    with open(os.path.join(folder, "labels.txt"), "w") as fh:
        fh.write("\n".join(LABELS) + "\n")
    with open(os.path.join(folder, "model.json"), "w") as fh:
        json.dump({"name": name, "version": "1", "format": "onnx", "input_size": list(size),
                   "preprocessing": preprocessing}, fh)
    return folder


def banded(size: tuple[int, int], band: int, rows: int) -> Image.Image:
    """A ``(width, height)`` RGB picture whose outer ``band`` columns are red (left) and blue
    (right), top ``rows`` rows white and bottom ``rows`` rows black, the rest green and grey
    stripes: the centre crop sees none of the side bands, a stretch or letterbox sees them
    all, and a crop one row off (a half rounded up instead of to even) swaps a white row for
    a black one."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :] = (40, 160, 70)
    pixels[:, ::4] = (150, 150, 150)
    pixels[:rows] = 255
    pixels[height - rows:] = 0
    pixels[:, :band] = (220, 30, 30)
    pixels[:, width - band:] = (30, 40, 220)
    return Image.fromarray(pixels)


def pictures(folder) -> list[str]:
    """Non-square pictures whose centre differs from their edges (so the crop matters), as
    files under ``folder``: PNGs 50 x 37 and 37 x 50 (crop offsets of 2.5, rounded to even),
    a small one the crop enlarges, and JPEGs the server decodes at 1/8 scale."""
    made = {
        "banded-50x37.png": banded((50, 37), 9, 3),
        "banded-37x50.png": banded((50, 37), 9, 3).transpose(Image.Transpose.TRANSPOSE),
        "small-20x12.png": banded((20, 12), 3, 2),
        "wide-900x700.jpg": banded((900, 700), 150, 60),
        "tall-480x1000.jpg": banded((480, 1000), 70, 200),
    }
    paths = []
    for name, image in made.items():
        path = os.path.join(str(folder), name)
        image.save(path, **({"quality": 95} if name.endswith(".jpg") else {}))
        paths.append(path)
    return paths
