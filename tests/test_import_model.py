"""scripts/import_model.py: models made the way their tools make them (tests/foreign_models.py)
imported, loaded on their own runtime and compared, image by image, with scores this file
computes on its own: its own NumPy/Pillow preprocessing written from each convention's
documentation, the raw model run directly (onnxruntime, Keras, LiteRT's interpreter,
TensorFlow), its own softmax. Each comparison is also shown to fail for a deliberately wrong
preprocessing. Refusals: one sentence, exit status 2, nothing published. The real server
serves an imported folder and a repository of them."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import foreign_models as fm
import numpy as np
import pytest
import requests
from helpers import ROOT, post_image, start_server
from PIL import Image, ImageDraw

from common.inference.loader import RuntimeOptions, load_classifier
from common.modelfolder import ModelFolder, file_sha256
from scripts.importing import CannotImport, import_model

COLOURS = ["red", "green", "blue"]
#: torchvision's ImageNet normalisation (transforms.Normalize), in [0, 1] units.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
#: Keras' "caffe" mode: BGR channel means subtracted from 0..255 pixels.
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68])


# -- images and the tests' own preprocessing ---------------------------------------------------
def picture(seed: int, size=(61, 45)) -> Image.Image:
    """A non-square picture (so a crop differs from a stretch): a colour gradient, noise and a
    few filled rectangles."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / w, yy * 255.0 / h, 255.0 - xx * 255.0 / w], axis=-1)
    arr = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        draw.rectangle((x0, y0, x0 + int(rng.integers(5, 20)), y0 + int(rng.integers(5, 20))),
                       fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


#: What every comparison classifies: a PNG and a JPEG, 61x45.
IMAGES = [encoded(picture(1), "PNG"), encoded(picture(2), "JPEG")]


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def stretched(data: bytes, size) -> np.ndarray:
    """float64 ``[h, w, 3]`` 0..255: the whole image resized to ``size`` (PIL bilinear)."""
    return np.asarray(rgb(data).resize((size[1], size[0]), Image.Resampling.BILINEAR),
                      np.float64)


def torchvision_crop(data: bytes, crop: int) -> np.ndarray:
    """torchvision's evaluation transform on a PIL image, scaled to the crop:
    ``Resize(round(crop * 256 / 224))`` (shorter side to that, the longer side
    ``int(side * long / short)``, bilinear) then ``CenterCrop(crop)`` (corner
    ``int(round((side - crop) / 2))``). float64 ``[crop, crop, 3]`` 0..255."""
    image = rgb(data)
    side = round(crop * 256 / 224)
    w, h = image.size
    new = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    image = image.resize(new, Image.Resampling.BILINEAR)
    top, left = int(round((new[1] - crop) / 2.0)), int(round((new[0] - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop)), np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# -- the raw models, run directly --------------------------------------------------------------
def run_onnx(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1].astype(np.float32)})[0]
                           for i in range(len(x))])


def run_keras(path: str, x: np.ndarray) -> np.ndarray:
    import keras

    return np.asarray(keras.saving.load_model(path, compile=False)(x.astype(np.float32)))


def run_tflite(path: str, x: np.ndarray) -> np.ndarray:
    """LiteRT's interpreter, with the quantisation TFLite documents: ``q = round(x / scale) +
    zero_point`` in, ``(q - zero_point) * scale`` out."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=path)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    scale, zero = inp["quantization"]
    info = np.iinfo(inp["dtype"])
    q = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
    interp.set_tensor(inp["index"], q)
    interp.invoke()
    o_scale, o_zero = out["quantization"]
    return (interp.get_tensor(out["index"]).astype(np.float64) - o_zero) * o_scale


def run_saved_model(path: str, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    predict = tf.saved_model.load(path).signatures["predict"]
    return predict(pixels=tf.constant(x, tf.float32))["logits"].numpy()


def run_frozen(path: str, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as fh:
        graph_def.ParseFromString(fh.read())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run("scores:0", {"input:0": x.astype(np.float32)})


# -- the foreign models ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """Every foreign model, by key; labels files beside them."""
    d = tmp_path_factory.mktemp("foreign")
    (d / "ext").mkdir()
    paths = {
        "onnx": fm.onnx_classifier(str(d / "resnet.onnx")),
        "onnx-batch1": fm.onnx_classifier(str(d / "batch1.onnx"), batch=1),
        "onnx-external": fm.onnx_classifier(str(d / "ext" / "classifier.onnx"), external=True),
        "onnx-opset18": fm.onnx_classifier(str(d / "opset18.onnx"), opset=18),
        "two-inputs": fm.onnx_two_inputs(str(d / "pair.onnx")),
        "not-an-image": fm.onnx_not_an_image(str(d / "tabular.onnx")),
        "3d-output": fm.onnx_3d_output(str(d / "sequence.onnx")),
        "keras-tf": fm.keras_classifier(str(d / "mobilenet.keras"), "tf"),
        "keras-caffe": fm.keras_classifier(str(d / "resnet50.keras"), "caffe"),
        "h5-tf": fm.keras_classifier(str(d / "legacy.h5"), "tf"),
        "tflite-uint8": fm.quantised_tflite(str(d / "quant_uint8.tflite"), "uint8"),
        "tflite-int8": fm.quantised_tflite(str(d / "quant_int8.tflite"), "int8"),
        "saved-model": fm.foreign_saved_model(str(d / "inception_sm")),
        "string-input": fm.string_input_saved_model(str(d / "bytes_sm")),
        "frozen": fm.frozen_graph(str(d / "frozen_inception.pb")),
    }
    for name, labels in (("labels4", [f"animal {i}" for i in range(4)]),
                         ("labels5", [f"animal {i}" for i in range(5)]),
                         ("colours", COLOURS),
                         ("imagenet", [f"synset {i:04d}" for i in range(1000)])):
        (d / f"{name}.txt").write_text("\n".join(labels) + "\n")
        paths[name] = str(d / f"{name}.txt")
    return paths


def served(folder) -> np.ndarray:
    """The service's scores ``[len(IMAGES), labels]`` for IMAGES from an imported folder, as
    the server gets them (preprocess the bytes, predict the batch)."""
    clf = load_classifier(ModelFolder.in_directory(folder), RuntimeOptions(runtime="auto"))
    batch = np.stack([clf.preprocess(data)[0] for data in IMAGES])
    return clf, clf.predict(batch)


def assert_matches(got, expected, wrong: dict, atol: float = 1e-4) -> None:
    """The service's scores equal the test's own; each deliberately wrong preprocessing gives
    scores that this comparison rejects, by a wide margin (10 times the tolerance)."""
    np.testing.assert_allclose(got, expected, atol=atol, rtol=0)
    for what, scores in wrong.items():
        assert np.abs(got - scores).max() > 10 * atol, f"{what} is not told apart"


# -- ONNX --------------------------------------------------------------------------------------
def torchvision_expected(source: str, crop=True, normalise=True, bgr=False) -> np.ndarray:
    pixels = np.stack([torchvision_crop(d, 32) if crop else stretched(d, (32, 32))
                       for d in IMAGES]) / 255.0
    if bgr:
        pixels = pixels[..., ::-1]
    if normalise:
        pixels = (pixels - IMAGENET_MEAN) / IMAGENET_STD
    return softmax(run_onnx(source, pixels.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("key", ["onnx", "onnx-batch1", "onnx-external", "onnx-opset18"])
def test_an_onnx_export_serves_with_torchvision_preprocessing(made, tmp_path, key):
    result = import_model(made[key], output_dir=str(tmp_path / "resnet"),
                          labels=made["labels4"], preset_name="torchvision")
    folder = ModelFolder(result.folder)
    meta = folder.read_metadata()
    assert folder.format == "onnx" and result.runtime == "onnx"
    assert meta["input_size"] == [32, 32] and meta["labels"] == 4
    spec = meta["preprocessing"]
    assert (spec["preset"], spec["layout"], spec["resize"], spec["output"]) == (
        "torchvision", "NCHW", "crop", "logits")
    found = meta["import"]["found"]
    assert found["opset"] == (18 if key == "onnx-opset18" else 17)
    assert found["fixed_batch"] == (1 if key == "onnx-batch1" else None)
    assert found["inputs"] == [{"name": "pixel_values", "dtype": "float32",
                                "shape": [found["fixed_batch"], 3, 32, 32]}]
    assert meta["import"]["sha256"] == file_sha256(made[key])
    assert any("logits" in s for s in meta["import"]["assumed"])
    if key == "onnx-external":  # the weights' file beside model.onnx, under the name it uses
        assert meta["external_data"] == ["classifier.onnx.data"]
        assert sorted(os.listdir(result.folder)) == ["classifier.onnx.data", "labels.txt",
                                                     "model.json", "model.onnx"]
        assert file_sha256(os.path.join(result.folder, "classifier.onnx.data")) == \
            file_sha256(made[key] + ".data")
    clf, got = served(result.folder)
    assert clf.labels == [f"animal {i}" for i in range(4)]
    assert_matches(got, torchvision_expected(made[key]), {
        "a stretch instead of the crop": torchvision_expected(made[key], crop=False),
        "no mean/std": torchvision_expected(made[key], normalise=False),
        "BGR": torchvision_expected(made[key], bgr=True)})


def test_the_layout_comes_from_the_model_when_the_preset_does_not_say(made, tmp_path):
    """No preset: NCHW from where the 3 channels are, tfhub's [0, 1] pixels, written down as
    assumptions; a preset that says NHWC is overruled by the model's shape, also written."""
    plain = import_model(made["onnx"], output_dir=str(tmp_path / "plain"), num_labels=4)
    assert plain.spec.layout == "NCHW" and plain.spec.mean == (0.0,) * 3
    assert any(s.startswith("no preset given") for s in plain.assumed)
    assert plain.model_json["import"]["found"]["output"] == "logits"
    _, got = served(plain.folder)
    pixels = np.stack([stretched(d, (32, 32)) for d in IMAGES]) / 255.0
    expected = softmax(run_onnx(made["onnx"], pixels.transpose(0, 3, 1, 2)))
    assert_matches(got, expected, {"torchvision's": torchvision_expected(made["onnx"])})
    overruled = import_model(made["onnx"], output_dir=str(tmp_path / "o"), num_labels=4,
                             preset_name="inception")
    assert overruled.spec.layout == "NCHW"
    assert any("the preset inception says NHWC" in s for s in overruled.assumed)


# -- Keras -------------------------------------------------------------------------------------
def keras_expected(source: str, convention: str, **wrong) -> np.ndarray:
    """Keras applications' preprocess_input: ``tf``: x / 127.5 - 1; ``caffe``: RGB -> BGR, then
    the ImageNet BGR means subtracted (0..255)."""
    x = np.stack([stretched(d, (32, 32)) for d in IMAGES])
    if convention == "tf":
        x = x / 255.0 if wrong.get("unscaled") else x / 127.5 - 1.0
    else:
        x = x if wrong.get("rgb") else x[..., ::-1]
        x = x if wrong.get("uncentred") else x - CAFFE_MEAN_BGR
    return run_keras(source, x)


@pytest.mark.parametrize("key, preset, convention", [
    ("keras-tf", "inception", "tf"), ("keras-caffe", "keras-caffe", "caffe"),
    ("h5-tf", "inception", "tf")])
def test_keras_models_serve_in_their_convention(made, tmp_path, key, preset, convention):
    result = import_model(made[key], output_dir=str(tmp_path / "k"), labels=made["colours"],
                          preset_name=preset)
    meta = result.model_json
    assert meta["format"] == key.split("-")[0] and result.runtime == "tensorflow"
    assert os.path.isfile(os.path.join(result.folder, f"model.{key.split('-')[0]}"))
    assert meta["preprocessing"]["output"] == "probabilities"  # softmax inside: detected
    assert any(s.startswith("the outputs are probabilities") for s in result.assumed)
    clf, got = served(result.folder)
    wrong = ({"[0, 1] pixels": keras_expected(made[key], "tf", unscaled=True)}
             if convention == "tf" else
             {"RGB order": keras_expected(made[key], "caffe", rgb=True),
              "no mean subtracted": keras_expected(made[key], "caffe", uncentred=True)})
    assert_matches(got, keras_expected(made[key], convention), wrong)
    for colour in COLOURS:  # and the colours separate, as the weights were chosen to
        solid = encoded(Image.new("RGB", (50, 37), {"red": (210, 30, 30), "green": (30, 190, 40),
                                                    "blue": (30, 40, 210)}[colour]), "PNG")
        scores = clf.predict(clf.preprocess(solid)[0][None])[0]
        assert clf.rank(scores, top_k=1)[0].label == colour


# -- TFLite ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_a_quantised_tflite_model_runs_on_litert_with_its_scale(made, tmp_path, dtype):
    source = made[f"tflite-{dtype}"]
    result = import_model(source, output_dir=str(tmp_path / "q"), labels=made["colours"],
                          preset_name="inception")
    found = result.model_json["import"]["found"]
    assert found["quantisation"]["input"]["dtype"] == dtype
    assert found["quantisation"]["output"]["dtype"] == dtype
    assert result.spec.dtype == "float32" and result.runtime == "tflite"
    assert any("quantised" in s for s in result.assumed)
    clf, got = served(result.folder)
    x = np.stack([stretched(d, (32, 32)) for d in IMAGES])
    expected = run_tflite(source, x / 127.5 - 1.0)
    step = found["quantisation"]["output"]["scale"]
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert_matches(got, expected, {"[0, 1] pixels": run_tflite(source, x / 255.0)},
                   atol=2 * step)


# -- SavedModel and frozen graph ---------------------------------------------------------------
def test_a_foreign_saved_model_with_its_signature_and_a_background_class(made, tmp_path):
    result = import_model(made["saved-model"], output_dir=str(tmp_path / "sm"),
                          labels=made["imagenet"], preset_name="keras-torch",
                          signature="predict", output_name="logits",
                          settings={"label_offset": 1})
    meta = result.model_json
    assert meta["format"] == "saved_model" and meta["input_size"] == [48, 48]
    assert meta["signature"] == {"name": "predict", "input": "pixels", "output": "logits"}
    assert meta["preprocessing"]["label_offset"] == 1
    assert meta["preprocessing"]["output"] == "logits"  # detected, over the preset's
    assert {t["name"] for t in meta["import"]["found"]["outputs"]} == {"logits", "classes"}
    assert {"saved_model.pb", "variables", "labels.txt", "model.json"} <= set(
        os.listdir(result.folder))
    _, got = served(result.folder)
    x = np.stack([stretched(d, (48, 48)) for d in IMAGES]) / 255.0
    logits = run_saved_model(made["saved-model"], (x - IMAGENET_MEAN) / IMAGENET_STD)
    expected = softmax(logits[:, 1:])
    assert got.shape == (2, 1000)
    assert_matches(got, expected, {
        "no label offset": softmax(logits[:, :1000]),
        "no mean/std": softmax(run_saved_model(made["saved-model"], x)[:, 1:])}, atol=2e-5)


def test_a_frozen_graph_is_written_as_retrained_graph_pb(made, tmp_path):
    result = import_model(made["frozen"], output_dir=str(tmp_path / "g"),
                          labels=made["colours"], preset_name="inception")
    assert sorted(os.listdir(result.folder)) == ["labels.txt", "model.json",
                                                 "retrained_graph.pb"]
    assert result.model_json["signature"]["input"] == "input"
    _, got = served(result.folder)
    x = np.stack([stretched(d, (32, 32)) for d in IMAGES])
    assert_matches(got, run_frozen(made["frozen"], x / 127.5 - 1.0),
                   {"[0, 1] pixels": run_frozen(made["frozen"], x / 255.0)})
    direct = load_classifier(os.path.join(result.folder, "retrained_graph.pb"))
    assert direct.labels == COLOURS and direct.spec.preset == "inception"
    # MODEL_PATH=<the folder> serves the graph in it (a repository of one)
    from common.config import Config
    from common.versions.source import source_for
    source = source_for(Config(model_path=result.folder))
    (versions,) = source.scan().values()
    opened = source.open(next(iter(versions.values())))
    assert opened.is_frozen_graph and opened.path.endswith("retrained_graph.pb")


# -- the command line --------------------------------------------------------------------------
def cli(*args, python_flags=()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "scripts/import_model.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_cli_imports_onnx_with_external_data_without_tensorflow(made, tmp_path):
    out = tmp_path / "resnet"
    run = cli("--model", made["onnx-external"], "--labels", made["labels4"], "--preset",
              "torchvision", "--output-dir", str(out), python_flags=("-X", "importtime"))
    assert run.returncode == 0, run.stderr
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert "onnxruntime" in imported and not {m for m in imported
                                              if m.split(".")[0] == "tensorflow"}
    lines = run.stdout.splitlines()
    assert lines[0] == f"imported classifier.onnx -> {out} (onnx, runs on ONNX Runtime)"
    assert "pixel_values float32 [N, 3, 32, 32]" in lines[1]
    assert "torchvision, NCHW, RGB, crop to 32x32 (shorter side 37 first)" in lines[2]
    assert "a generated image -> 4 scores, top 'animal" in lines[3]
    assert sorted(os.listdir(out)) == ["classifier.onnx.data", "labels.txt", "model.json",
                                       "model.onnx"]
    assert not os.path.exists(str(out) + ".incoming")
    _, got = served(str(out))
    np.testing.assert_allclose(got, torchvision_expected(made["onnx-external"]), atol=1e-4)
    # again into the same folder: replaced whole
    again = cli("--model", made["onnx"], "--num_labels", "4", "--preset", "torchvision",
                "--output_dir", str(out), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["source"] == "resnet.onnx"
    assert sorted(os.listdir(out)) == ["labels.txt", "model.json", "model.onnx"]


def test_the_cli_publishes_repository_versions_and_never_overwrites(made, tmp_path):
    repo = tmp_path / "repo"
    for _ in range(2):
        run = cli("--model", made["keras-caffe"] if _ else made["onnx"],
                  *(["--labels", made["colours"], "--preset", "keras-caffe"] if _ else
                    ["--labels", made["labels4"], "--preset", "torchvision"]),
                  "--repository", str(repo), "--name", "imported")
        assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(repo / "imported")) == ["1", "2"]
    first, second = (ModelFolder(str(repo / "imported" / v)) for v in ("1", "2"))
    assert (first.format, first.read_metadata()["version"]) == ("onnx", "1")
    assert (second.format, second.read_metadata()["version"]) == ("keras", "2")
    assert first.read_metadata()["name"] == second.read_metadata()["name"] == "imported"
    assert file_sha256(first.file("model.onnx")) == file_sha256(made["onnx"])


REFUSALS = {
    "two inputs": (["--model", "two-inputs"], "takes 2 inputs (left, right)"),
    "not an image": (["--model", "not-an-image"], "is not an image batch"),
    "3-D output": (["--model", "3d-output"], "is not one row of scores per image"),
    "label count": (["--model", "onnx", "--labels", "labels5"],
                    "gives 4 scores per image but there are 5 labels"),
    "background class": (["--model", "saved-model", "--signature", "predict",
                          "--output_name", "logits", "--labels", "imagenet"],
                         "pass --label_offset 1"),
    "unknown preset": (["--model", "onnx", "--preset", "pytorch"], "unknown preset 'pytorch'"),
    "pixel settings for encoded images": (["--model", "string-input", "--layout", "NCHW"],
                                          "decodes them itself: layout"),
    "input size": (["--model", "onnx", "--input_size", "48"], "fixed at 32x32"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_cannot_be_served_is_refused_in_one_sentence(made, tmp_path, case):
    args, phrase = REFUSALS[case]
    args = [made.get(a, a) for a in args]
    out = tmp_path / "out"
    run = cli(*args, "--output_dir", str(out))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    ours = [line for line in run.stderr.splitlines() if line.startswith("import_model.py:")]
    assert len(ours) == 1 and phrase in ours[0], run.stderr
    assert ours[0].startswith(f"import_model.py: cannot import {args[1]}: ")
    assert run.stdout == "" and not os.path.exists(out) and os.listdir(tmp_path) == []


def test_a_savedmodel_taking_encoded_images_is_imported_as_such(made, tmp_path):
    """tf.string ``[N]`` of encoded images: ``dtype: string`` in model.json, and the folder
    answers what the SavedModel itself answers for the same bytes."""
    import tensorflow as tf

    out = tmp_path / "bytes"
    run = cli("--model", made["string-input"], "--output_dir", str(out))
    assert run.returncode == 0, run.stderr
    assert ModelFolder(str(out)).read_metadata()["preprocessing"]["dtype"] == "string"
    clf = load_classifier(str(out))
    data = [encoded(image, fmt) for image, fmt in ((picture(1), "PNG"), (picture(2), "JPEG"))]
    own = tf.saved_model.load(made["string-input"]).signatures["serving_default"](
        image_bytes=tf.constant(data))["probabilities"].numpy()
    batch = np.stack([clf.preprocess(d)[0] for d in data])
    np.testing.assert_allclose(clf.predict(batch), own, atol=1e-6)


def test_the_library_refuses_with_the_same_sentences(made, tmp_path):
    with pytest.raises(CannotImport, match="there are 5 labels"):
        import_model(made["onnx"], output_dir=str(tmp_path / "x"), labels=made["labels5"])
    with pytest.raises(CannotImport, match="not an image batch"):
        import_model(made["not-an-image"], output_dir=str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []


def test_an_explicit_output_kind_is_not_second_guessed(made, tmp_path):
    result = import_model(made["keras-tf"], output_dir=str(tmp_path / "k"),
                          labels=made["colours"], preset_name="inception",
                          settings={"output": "logits"})
    assert result.spec.output == "logits"
    assert not any("the outputs are" in s for s in result.assumed)


# -- the real server ---------------------------------------------------------------------------
def _by_label(predictions: list[dict]) -> dict:
    return {p["label"]: p["score"] for p in predictions}


@pytest.mark.server
def test_the_server_serves_an_imported_onnx_folder(made, tmp_path):
    result = import_model(made["onnx-external"], output_dir=str(tmp_path / "resnet"),
                          labels=made["labels4"], preset_name="torchvision")
    server = start_server(tmp_path, {"MODEL_PATH": result.folder, "WORKERS": "1"})
    try:
        model = requests.get(server.url + "/model", timeout=10).json()
        assert model["runtime"] == "onnx"
        expected = torchvision_expected(made["onnx-external"])
        for data, want, name in zip(IMAGES, expected, ("p.png", "p.jpg")):
            answer = post_image(server, data, name=name)
            assert answer.status_code == 200, answer.text
            got = _by_label(answer.json()["predictions"])
            assert set(got) == {f"animal {i}" for i in range(4)}
            for i, score in enumerate(want):
                assert abs(got[f"animal {i}"] - score) <= 1e-4, (got, want)
    finally:
        server.stop()


@pytest.mark.server
def test_the_server_serves_a_repository_of_imported_models(made, tmp_path):
    repo = str(tmp_path / "repo")
    imports = {"resnet": (made["onnx-batch1"], dict(labels=made["labels4"],
                                                    preset_name="torchvision")),
               "caffe": (made["keras-caffe"], dict(labels=made["colours"],
                                                   preset_name="keras-caffe")),
               "quantised": (made["tflite-uint8"], dict(labels=made["colours"],
                                                        preset_name="inception")),
               "frozen": (made["frozen"], dict(labels=made["colours"],
                                               preset_name="inception"))}
    for name, (source, kwargs) in imports.items():
        import_model(source, repository=repo, name=name, **kwargs)
    x32 = np.stack([stretched(d, (32, 32)) for d in IMAGES])
    expected = {"resnet": (torchvision_expected(made["onnx-batch1"]), 1e-4),
                "caffe": (keras_expected(made["keras-caffe"], "caffe"), 1e-4),
                "quantised": (run_tflite(made["tflite-uint8"], x32 / 127.5 - 1), 0.01),
                "frozen": (run_frozen(made["frozen"], x32 / 127.5 - 1), 1e-4)}
    server = start_server(tmp_path, {"MODEL_REPOSITORY": repo, "WORKERS": "1",
                                     "MODEL_POLL_SECONDS": "0.5"}, wait_ready=False)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                models = requests.get(server.url + "/models", timeout=5).json()["models"]
            except (requests.RequestException, ValueError):
                models = []
            states = {m["name"]: [v["state"] for v in m["versions"]] for m in models}
            if all(states.get(n) == ["ready"] for n in imports):
                break
            time.sleep(0.3)
        assert all(states.get(n) == ["ready"] for n in imports), states
        for name, (want, atol) in expected.items():
            labels = ModelFolder(os.path.join(repo, name, "1")).read_labels()
            for data, row in zip(IMAGES, want):
                r = requests.post(f"{server.url}/models/{name}/classify",
                                  files={"image": ("p.png", data, "image/png")}, timeout=30)
                assert r.status_code == 200, r.text
                got = _by_label(r.json()["predictions"])
                assert max(got, key=got.get) == labels[int(np.argmax(row))], (name, got, row)
                for label, score in zip(labels, row):
                    assert abs(got[label] - score) <= atol, (name, got, row)
    finally:
        server.stop()
