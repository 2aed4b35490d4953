"""Exporting a model folder for other runtimes: the library behind ``scripts/export.py``.

One SavedModel, three more places to run it:

* ``onnx``: ``model.onnx`` (tf2onnx), for ONNX Runtime in the server (``RUNTIME=onnx``) and
  onnxruntime-web in the browser;
* ``tflite``: ``model.tflite`` (float32) or ``model.{float16,dynamic,int8}.tflite``, for
  phones (LiteRT; ``label_image.py --tflite``).

:func:`export` converts in memory, runs the export and TensorFlow on the model's own test
images (or generated ones), and writes the file and its record into model.json only when the
export is within its tolerance (``common.inference.exports.TOLERANCES``); otherwise it raises
ExportError and writes nothing. The record holds the verification and TensorFlow's reference
outputs, which the loaders check again at every load.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from common.inference.exports import (
    QUANTIZED_REPLAY,
    TOLERANCES,
    Tolerance,
    reference_inputs,
    reference_record,
)
from common.inference.images import FILE_EXTENSIONS
from common.modelfolder import EXPORT_FILES, ModelFolder, ModelLoadError

from .converters import (
    DEFAULT_OPSET,
    OPSETS,
    QUANTIZATIONS,
    ExportError,
    missing_packages,
    quiet_converters,
    to_onnx,
    to_tflite,
)
from .verify import batched, generated_images, image_files, verify

__all__ = ["DEFAULT_OPSET", "FORMATS", "OPSETS", "QUANTIZATIONS", "ExportError",
           "ExportParams", "export", "export_default", "export_key", "find_images",
           "missing_packages", "resolve_model"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tflite")
#: The exports retrain.py and the demo build make when the converters are installed.
DEFAULT_EXPORTS = (("onnx", "fp32"), ("tflite", "fp32"))


@dataclass(frozen=True)
class ExportParams:
    """One export.

    Attributes:
        format: ``onnx`` or ``tflite``.
        quantize: TFLite only: ``fp32``, ``float16``, ``dynamic`` (int8 weights) or ``int8``
            (int8 weights and activations, calibrated on ``calibration`` images).
        opset: ONNX only, 13..18.
        images: image files to verify on (the model's own test images); empty: generated.
        generated: how many generated images to verify on when ``images`` is empty.
        calibration: image files for ``int8`` (a hundred or so, like the training data).
        max_abs_diff, min_top1_agreement: override the format's default tolerance.
    """

    format: str = "onnx"
    quantize: str = "fp32"
    opset: int = DEFAULT_OPSET
    images: tuple[str, ...] = ()
    generated: int = 48
    calibration: tuple[str, ...] = ()
    max_abs_diff: float | None = None
    min_top1_agreement: float | None = None
    batch_size: int = 16

    @property
    def key(self) -> str:
        return export_key(self.format, self.quantize)

    def tolerance(self) -> Tolerance:
        default = TOLERANCES[self.key]
        return Tolerance(default.max_abs_diff if self.max_abs_diff is None else self.max_abs_diff,
                         default.min_top1_agreement if self.min_top1_agreement is None
                         else self.min_top1_agreement)


def export_key(fmt: str, quantize: str = "fp32") -> str:
    """``onnx``, ``tflite`` or ``tflite-<quantize>``: the key in model.json and EXPORT_FILES."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        if quantize != "fp32":
            raise ExportError("ONNX exports are float32 only (--quantize is for tflite)")
        return "onnx"
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize must be one of {', '.join(QUANTIZATIONS)}")
    return "tflite" if quantize == "fp32" else f"tflite-{quantize}"


def resolve_model(path: str) -> ModelFolder:
    """``tf_files/<name>`` or ``tf_files/<name>/<version>``: a folder holding a SavedModel, or
    the highest numbered version folder under it."""
    folder = ModelFolder(path)
    if os.path.isdir(path) and not os.path.exists(folder.file("saved_model.pb")):
        versions = [d for d in os.listdir(path) if d.isdigit()
                    and os.path.isdir(os.path.join(path, d))]
        if versions:
            folder = ModelFolder(os.path.join(path, max(versions, key=int)))
    try:
        folder.check_exists()
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    return folder


def find_images(folder: str | None, limit: int | None = None,
                model: ModelFolder | None = None) -> tuple[str, ...]:
    """Image files under a folder (recursively, sorted), at most ``limit`` (spread evenly over
    the sorted list, so that every sub-folder is represented).

    When ``model`` is given and the folder is its training data (one sub-folder per label, as
    retrain.py's ``--image_dir``), only the test split retrain.py held out (by file-name hash,
    with the percentages in model.json): the model's own test images.
    """
    if not folder:
        return ()
    if not os.path.isdir(folder):
        raise ExportError(f"{folder} is not a folder")
    if model is not None:
        labels = model.read_labels()
        if sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))) \
                == sorted(labels):
            from scripts.training.data import create_image_lists
            training = model.read_metadata().get("training", {})
            lists = create_image_lists(folder, training.get("validation_percentage", 10),
                                       training.get("testing_percentage", 10))
            return _spread([os.path.join(folder, p) for p, _ in lists.paths("testing")], limit)
    return _spread(sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                          if f.lower().endswith(FILE_EXTENSIONS)), limit)


def _spread(items: list[str], limit: int | None) -> tuple[str, ...]:
    """At most ``limit`` of ``items``, evenly spaced."""
    if not limit or len(items) <= limit:
        return tuple(items)
    return tuple(items[int(i * len(items) / limit)] for i in range(limit))


def export(model: str | ModelFolder, params: ExportParams = ExportParams(),
           progress: bool = True) -> dict:
    """Convert, verify and (only when verified) write one export; returns its record as
    written into model.json. Raises ExportError with the reason (nothing written)."""
    from common.inference.loader import load_classifier

    folder = model if isinstance(model, ModelFolder) else resolve_model(model)
    key = params.key
    started = time.perf_counter()
    try:
        tf_model = load_classifier(folder)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    size = tf_model.input_size
    if params.images:
        images, source = image_files(list(params.images), size), "test images"
    else:
        images, source = generated_images(size, params.generated), "generated images"
    if not len(images):
        images, source = generated_images(size, params.generated), "generated images"

    log.info("converting %s to %s", folder.path, EXPORT_FILES[key])
    with quiet_converters():
        if params.format == "onnx":
            data = to_onnx(folder.path, size, params.opset)
            graph = _onnx_graph(data)
        else:
            calibration = image_files(list(params.calibration), size) \
                if params.calibration else None
            data = to_tflite(folder.path, size, params.quantize, calibration)
            graph = _tflite_graph(data)
        convert_seconds = time.perf_counter() - started
        tolerance = params.tolerance()
        reference = batched(tf_model.predict_fn, images, params.batch_size, progress,
                            "TensorFlow")
        candidate = batched(graph.predict_fn, images, params.batch_size, progress, key)
    verification = verify(reference, candidate, tolerance, f"{len(images)} {source}")
    if not verification["passed"]:
        raise ExportError(
            f"{EXPORT_FILES[key]} refused: against TensorFlow on {verification['source']} the "
            f"largest score difference is {verification['max_abs_diff']:.3g} (allowed "
            f"{tolerance.max_abs_diff:g}) and the top-1 agreement "
            f"{verification['top1_agreement']:.3f} (needed {tolerance.min_top1_agreement:g})")
    # The loaders check the export against these at every load. Float32 exports must still
    # give TensorFlow's scores; a quantized export (whose scores on the seeded noise may stray
    # far from TensorFlow's: noise is nothing like its calibration images) must still give the
    # scores it gave here, when it was verified.
    ref_in = reference_inputs(size)
    ref_tf = np.asarray(tf_model.predict_fn(ref_in))
    ref_export = np.asarray(graph.predict_fn(ref_in))
    if params.quantize == "fp32":
        ref_check = verify(ref_tf, ref_export, tolerance, "reference inputs")
        if not ref_check["passed"]:
            raise ExportError(f"{EXPORT_FILES[key]} refused: on the seeded reference inputs the "
                              f"largest score difference is {ref_check['max_abs_diff']:.3g}")
        reference = reference_record(ref_tf, tolerance, "tensorflow")
    else:
        reference = reference_record(ref_export, QUANTIZED_REPLAY, "this export when verified")
    record = {
        "format": params.format, "quantize": params.quantize,
        **({"opset": params.opset} if params.format == "onnx" else {}),
        "converter": _converter(params.format),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "convert_seconds": round(convert_seconds, 1),
        "verification": verification,
        "reference": reference,
    }
    path = folder.write_export(key, data, record)
    log.info("wrote %s (%.1f MB), verified on %s: max difference %.3g, top-1 agreement %.3f",
             path, len(data) / 1e6, verification["source"], verification["max_abs_diff"],
             verification["top1_agreement"])
    return folder.export_record(key)


def export_default(model: str | ModelFolder, images: tuple[str, ...] = (),
                   progress: bool = True) -> dict[str, str]:
    """The exports retrain.py and the demo build make: ONNX and float32 TFLite, each where its
    converters are installed. Returns ``{key: "written" | why not}``; an export that fails
    verification is logged and skipped, never fatal."""
    outcome = {}
    for fmt, quantize in DEFAULT_EXPORTS:
        key = export_key(fmt, quantize)
        missing = missing_packages(fmt)
        if missing:
            outcome[key] = f"skipped: {', '.join(missing)} not installed " \
                           f"(pip install -r requirements-export.txt)"
            log.warning("%s export %s", key, outcome[key])
            continue
        try:
            export(model, ExportParams(format=fmt, quantize=quantize, images=images), progress)
            outcome[key] = "written"
        except ExportError as exc:
            outcome[key] = f"failed: {exc}"
            log.warning("%s export %s", key, outcome[key])
    return outcome


def _onnx_graph(data: bytes):
    from common.inference.runtimes import onnxrt
    try:
        return onnxrt.load_graph(data)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None


def _tflite_graph(data: bytes):
    from common.inference.runtimes import litert
    try:
        return litert.load_graph(content=data)
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None


def _converter(fmt: str) -> str:
    packages = ["tf2onnx", "onnx"] if fmt == "onnx" else ["tensorflow-cpu"]
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(versions)
