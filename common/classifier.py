"""A loaded model as three steps, in the style of TorchServe's handlers. No web framework here.

* :meth:`Classifier.preprocess`: image bytes -> float32 ``[h, w, 3]`` in ``[0, 1]`` at the
  model's input size (``common.images.load_for_model``, the one preprocessing function);
* :meth:`Classifier.predict`: float32 ``[n, h, w, 3]`` in ``[0, 1]`` -> float32
  ``[n, labels]`` probabilities (one ``tf.function`` call; thread-safe, so one instance serves
  every request thread of a worker through its batcher);
* :meth:`Classifier.postprocess`: one image's scores -> ``[{"label", "score"}, ...]`` ranked,
  the shape of the API's ``predictions`` and of ``label_image.py --json``.

``load_classifier`` builds one from a :class:`~common.modelfolder.ModelFolder` (files and checks)
and a runtime that runs the graph: :mod:`common.tfruntime` (TensorFlow, the SavedModel),
:mod:`common.onnxrt` (ONNX Runtime, ``model.onnx``) or :mod:`common.litert` (``.tflite``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .exports import check_reference
from .images import DecodedImage, DecodeLimits, load_for_model
from .modelfolder import EXPORT_FILES, TFLITE, ModelFolder, ModelLoadError

#: Decimal places of the scores in every answer.
SCORE_DIGITS = 6


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass(frozen=True)
class Options:
    """Postprocessing options: ``top_k`` (>= 1, None = all labels), ``threshold`` (0..1)."""

    top_k: int | None = None
    threshold: float | None = None


@dataclass
class Classifier:
    """A loaded model.

    Attributes:
        predict_fn: float32 ``[n, h, w, 3]`` in ``[0, 1]`` -> ``[n, num_labels]``.
        labels: one label per output, in output order.
        input_size: ``(height, width)`` the model expects.
        outputs: ``"probabilities"`` (already softmaxed) or ``"logits"`` (softmax applied here).
        folder: where it was loaded from (None for a model built in memory).
    """

    predict_fn: Callable[[np.ndarray], np.ndarray]
    labels: list[str]
    input_size: tuple[int, int]
    name: str = "model"
    version: str = "1"
    outputs: str = "probabilities"
    metadata: dict = field(default_factory=dict)
    folder: ModelFolder | None = None
    #: What runs ``predict_fn``: tensorflow, onnx or tflite (see ``RuntimeOptions``).
    runtime: str = "tensorflow"
    warmed_up: bool = False
    #: Seconds of one call per batch size, measured by the warm-up's second pass.
    batch_seconds: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    # -- 1. preprocess ------------------------------------------------------------------------
    def preprocess(self, data: bytes,
                   limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, DecodedImage]:
        """Image bytes -> (float32 ``[h, w, 3]`` in ``[0, 1]``, the decoded image).

        Raises the 4xx ApiErrors of ``common.images.decode_image`` for bad bytes, and its 503
        when the decode does not fit in ``limits.budget``.
        """
        return load_for_model(data, self.input_size, limits=limits)

    # -- 2. inference -------------------------------------------------------------------------
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Scores for a batch.

        Args:
            images: float32 ``[n, height, width, 3]`` with values in ``[0, 1]``.

        Returns:
            float32 ``[n, num_labels]``; each row sums to 1.

        Raises:
            ValueError: the batch has the wrong shape, or the model answered with one.
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (*self.input_size, 3):
            raise ValueError(f"expected [n, {self.input_size[0]}, {self.input_size[1]}, 3], "
                             f"got {list(images.shape)}")
        scores = np.asarray(self.predict_fn(images), dtype=np.float32)
        if scores.shape != (images.shape[0], self.num_labels):
            raise ValueError(f"model returned shape {list(scores.shape)} for "
                             f"{images.shape[0]} images and {self.num_labels} labels")
        if self.outputs == "logits":
            scores = _softmax(scores)
        return scores

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run the model twice per batch size so the first real request is not slower, and
        time the second call of each (``batch_seconds``: the batcher's first estimates).

        Also the start-up check that labels and model outputs agree (for models that do not
        declare their output width). Returns seconds taken.
        """
        started = time.perf_counter()
        for n in batch_sizes:
            zeros = np.zeros((n, *self.input_size, 3), np.float32)
            scores = np.asarray(self.predict_fn(zeros))  # the first call traces the shape
            width = scores.shape[-1] if scores.ndim == 2 else 0
            ModelFolder.check_label_count(width, self.labels, self.name)
            t0 = time.perf_counter()
            self.predict_fn(zeros)
            self.batch_seconds[n] = time.perf_counter() - t0
        self.warmed_up = True
        return time.perf_counter() - started

    # -- 3. postprocess -----------------------------------------------------------------------
    def rank(self, scores: np.ndarray, top_k: int | None = None,
             threshold: float | None = None) -> list[Prediction]:
        """One image's scores -> predictions, highest first.

        ``top_k`` is clamped to the number of labels (None = all); ``threshold`` drops scores
        below it. Ties keep label order.
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        k = self.num_labels if top_k is None else max(0, min(int(top_k), self.num_labels))
        if threshold is not None:
            candidates = np.flatnonzero(scores >= threshold)
        else:
            candidates = np.arange(scores.size)
        if k < candidates.size:  # only the top k are sorted: cheap for 1000-class models
            candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]] if k else \
                candidates[:0]
        order = candidates[np.lexsort((candidates, -scores[candidates]))]
        return [Prediction(self.labels[i], float(scores[i])) for i in order]

    def postprocess(self, scores: np.ndarray, options: Options = Options()) -> list[dict]:
        """One image's scores -> ``[{"label", "score"}]`` ranked, scores rounded."""
        return [{"label": p.label, "score": round(p.score, SCORE_DIGITS)}
                for p in self.rank(scores, options.top_k, options.threshold)]

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version}


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class RuntimeOptions:
    """Which runtime runs a model folder, and its settings.

    ``runtime``: ``tensorflow`` (the SavedModel), ``onnx`` (the folder's verified
    ``model.onnx`` on ONNX Runtime), ``auto`` (the server's default: ``onnx`` when the folder
    has a verified ``model.onnx`` and onnxruntime is installed, else ``tensorflow``), or
    ``tflite`` (the
    ``tflite_file`` export on LiteRT, for label_image.py). ``configure_tensorflow`` applies the
    TensorFlow thread and precision settings, once per process, when TensorFlow is chosen.
    """

    runtime: str = "tensorflow"
    tflite_file: str | None = None
    configure_tensorflow: bool = False
    tf_intra_op_threads: int = 0
    tf_inter_op_threads: int = 0
    precision: str = "fp32"
    onnx_intra_op_threads: int = 0
    onnx_inter_op_threads: int = 0
    onnx_spinning: bool = False

    @classmethod
    def from_config(cls, config) -> "RuntimeOptions":
        """The server's: RUNTIME, TF_*_THREADS, PRECISION, ONNX_*_THREADS and ONNX_SPINNING."""
        return cls(runtime=config.runtime, configure_tensorflow=True,
                   tf_intra_op_threads=config.tf_intra_op_threads,
                   tf_inter_op_threads=config.tf_inter_op_threads, precision=config.precision,
                   onnx_intra_op_threads=config.onnx_intra_op_threads,
                   onnx_inter_op_threads=config.onnx_inter_op_threads,
                   onnx_spinning=config.onnx_spinning)


def choose_runtime(folder: ModelFolder, runtime: str, precision: str = "fp32") -> str:
    """``auto`` -> ``onnx`` when the folder has a verified model.onnx and onnxruntime is
    installed (and ``PRECISION=bf16``, a TensorFlow feature, was not asked for), else
    ``tensorflow``; any other runtime is returned as asked."""
    if runtime != "auto":
        return runtime
    if precision == "bf16":
        return "tensorflow"
    from . import onnxrt

    if folder.folder is not None and folder.verified_export("onnx") and onnxrt.available():
        return "onnx"
    return "tensorflow"


def _exported_graph(folder: ModelFolder, options: RuntimeOptions, runtime: str):
    """(graph, export record) of the folder's ONNX or TFLite export; ModelLoadError when it
    has none that passed verification, or its file is not the one verified."""
    if runtime == "onnx":
        key = "onnx"
    else:
        name = os.path.basename(options.tflite_file or TFLITE)
        key = next((k for k, f in EXPORT_FILES.items() if f == name and k != "onnx"), None)
        if key is None:
            raise ModelLoadError(f"{name} is not one of the exports of a model folder "
                                 f"({', '.join(f for f in EXPORT_FILES.values())})")
    found = folder.verified_export(key) if folder.folder is not None else None
    if found is None:
        reason = "no record in model.json" if not (folder.folder and folder.export_record(key)) \
            else "its file differs from the verified one"
        raise ModelLoadError(f"{folder.path} has no verified {EXPORT_FILES[key]} ({reason}); "
                             f"make one with scripts/export.py --model {folder.path} "
                             f"--format {key.split('-')[0]}")
    path, record = found
    if runtime == "onnx":
        from . import onnxrt
        graph = onnxrt.load_graph(path, intra_op=options.onnx_intra_op_threads,
                                  inter_op=options.onnx_inter_op_threads,
                                  spinning=options.onnx_spinning)
    else:
        from . import litert
        graph = litert.load_graph(path)
    return graph, record, path


def load_classifier(folder: ModelFolder | str, options: RuntimeOptions | None = None
                    ) -> Classifier:
    """Load a model folder (or a legacy frozen graph) on the runtime ``options`` choose
    (default: TensorFlow, settings untouched); ModelLoadError with a clear reason.

    An ONNX or TFLite export is checked against the TensorFlow outputs recorded in model.json
    before it is used; the Classifier is the same whichever runtime runs it.
    """
    from . import tfruntime

    options = options or RuntimeOptions()
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    folder.check_exists()
    meta = folder.read_metadata()
    labels = folder.read_labels()
    runtime = choose_runtime(folder, options.runtime, options.precision)
    if runtime == "tensorflow":
        if options.configure_tensorflow:
            tfruntime.configure(options.tf_intra_op_threads, options.tf_inter_op_threads,
                                options.precision)
        graph, record, where = tfruntime.load_graph(folder), None, folder.path
    elif runtime in ("onnx", "tflite"):
        graph, record, where = _exported_graph(folder, options, runtime)
    else:
        raise ModelLoadError(f"unknown runtime {runtime!r}")
    folder.check_label_count(graph.outputs, labels, where)
    name, version = folder.identity(meta)
    outputs = meta.get("outputs", "probabilities")
    if outputs not in ("probabilities", "logits"):
        raise ModelLoadError(f"{folder.path}: model.json outputs must be probabilities or "
                             f"logits, got {outputs!r}")
    size = folder.input_size(meta, graph.static_size)
    if record is not None:
        check_reference(graph.predict_fn, record, size, where)
    clf = Classifier(predict_fn=graph.predict_fn, labels=labels, input_size=size, name=name,
                     version=version, outputs=outputs, metadata=meta, folder=folder,
                     runtime=runtime)
    clf._keepalive = graph.keepalive  # the function needs the loaded object's variables alive
    return clf
