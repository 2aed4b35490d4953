"""The engine: load a model and its labels once, warm it up, predict batches, rank scores.

No web framework here. Two kinds of model are loaded:

* a model folder (``tf_files/<name>/``): a TF2 SavedModel whose ``serving_default`` signature takes
  ``images`` float32 ``[batch, height, width, 3]`` in ``[0, 1]`` and returns ``probabilities``
  ``[batch, num_labels]``, with ``labels.txt`` and ``model.json`` beside it;
* a legacy TF1 frozen graph (``*.pb``) with a labels file; input and output tensor names, input
  size and mean/std are configurable (defaults match the old retrain.py: ``Placeholder`` and
  ``final_result``, values in ``[0, 1]``).

Either way the result is a :class:`Classifier` whose :meth:`Classifier.predict` runs one
``tf.function`` call per batch. Calling a traced function is thread-safe, so one instance serves
every request thread of a worker.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model or its labels cannot be loaded, or they disagree. Start-up must stop."""


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass
class Classifier:
    """A loaded model: ``predict`` maps images to scores, ``rank`` turns scores into labels.

    Attributes:
        predict_fn: ``float32 [n, h, w, 3] in [0, 1]`` -> ``float32 [n, num_labels]``.
        labels: one label per output, in output order.
        input_size: ``(height, width)`` the model expects.
        outputs: ``"probabilities"`` (already softmaxed) or ``"logits"`` (softmax applied here).
    """

    predict_fn: Callable[[np.ndarray], np.ndarray]
    labels: list[str]
    input_size: tuple[int, int]
    name: str = "model"
    version: str = "1"
    outputs: str = "probabilities"
    metadata: dict = field(default_factory=dict)
    source: str = ""
    warmed_up: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Scores for a batch.

        Args:
            images: float32 ``[n, height, width, 3]`` with values in ``[0, 1]``.

        Returns:
            float32 ``[n, num_labels]``; each row sums to 1.
        """
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (*self.input_size, 3):
            raise ValueError(f"expected [n, {self.input_size[0]}, {self.input_size[1]}, 3], "
                             f"got {list(images.shape)}")
        scores = np.asarray(self.predict_fn(images), dtype=np.float32)
        if self.outputs == "logits":
            scores = _softmax(scores)
        if scores.shape != (images.shape[0], self.num_labels):
            raise ModelLoadError(f"model returned shape {list(scores.shape)} for "
                                 f"{images.shape[0]} images and {self.num_labels} labels")
        return scores

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run the model once per batch size so the first real request is not slower.

        Also the start-up check that labels and model outputs agree. Returns seconds taken.
        """
        started = time.perf_counter()
        for n in batch_sizes:
            scores = np.asarray(self.predict_fn(np.zeros((n, *self.input_size, 3), np.float32)))
            if scores.ndim != 2 or scores.shape[1] != self.num_labels:
                raise ModelLoadError(
                    f"{self.source}: the model outputs {scores.shape[-1] if scores.ndim else 0} "
                    f"scores per image but there are {self.num_labels} labels")
        self.warmed_up = True
        return time.perf_counter() - started

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

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version}


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def read_labels(path: str) -> list[str]:
    """One label per line; blank lines at the end are ignored, blank lines inside are an error."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.rstrip("\r\n") for line in fh]
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels file {path}: {exc.strerror}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if not labels:
        raise ModelLoadError(f"labels file {path} is empty")
    if any(not label for label in labels):
        raise ModelLoadError(f"labels file {path} has an empty line inside")
    if len(set(labels)) != len(labels):
        raise ModelLoadError(f"labels file {path} has duplicate labels")
    return labels


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def configure_tensorflow(intra_op: int = 0, inter_op: int = 0, precision: str = "fp32") -> str:
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


def load_classifier(path: str, *, labels_path: str | None = None,
                    input_layer: str = "Placeholder", output_layer: str = "final_result",
                    input_size: tuple[int, int] | None = None, input_mean: float = 0.0,
                    input_std: float = 255.0) -> Classifier:
    """Load a model folder or a legacy frozen graph; raises ModelLoadError with a clear reason."""
    if not os.path.exists(path):
        raise ModelLoadError(f"model not found: {path}")
    if os.path.isdir(path):
        return load_saved_model(path, labels_path=labels_path)
    if path.endswith(".pb"):
        if labels_path is None:
            candidate = os.path.join(os.path.dirname(path), "retrained_labels.txt")
            labels_path = candidate if os.path.exists(candidate) else None
        if labels_path is None:
            raise ModelLoadError(f"{path} is a frozen graph: set LABELS_PATH to its labels file")
        return load_frozen_graph(path, labels_path, input_layer=input_layer,
                                 output_layer=output_layer, input_size=input_size,
                                 input_mean=input_mean, input_std=input_std)
    raise ModelLoadError(f"{path} is neither a model folder nor a .pb frozen graph")


def read_model_json(folder: str) -> dict:
    path = os.path.join(folder, "model.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return meta


def load_saved_model(folder: str, *, labels_path: str | None = None) -> Classifier:
    """Load ``tf_files/<name>/``: SavedModel + labels.txt + model.json."""
    import tensorflow as tf

    if not os.path.exists(os.path.join(folder, "saved_model.pb")):
        raise ModelLoadError(f"{folder} has no saved_model.pb")
    meta = read_model_json(folder)
    labels = read_labels(labels_path or os.path.join(folder, "labels.txt"))
    try:
        loaded = tf.saved_model.load(folder)
    except Exception as exc:  # TensorFlow raises many types for a broken SavedModel
        raise ModelLoadError(f"cannot load SavedModel {folder} (is saved_model.pb or a file "
                             f"under variables/ damaged or truncated?): {exc}") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ModelLoadError(f"{folder} has no serving_default signature")
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise ModelLoadError(f"{folder}: serving_default must take one input, has {list(inputs)}")
    (input_name, spec), = inputs.items()
    outputs = signature.structured_outputs
    output_name = "probabilities" if "probabilities" in outputs else next(iter(outputs))

    size = meta.get("input_size")
    if size is None and spec.shape.rank == 4 and None not in spec.shape[1:3]:
        size = [int(spec.shape[1]), int(spec.shape[2])]
    if size is None:
        raise ModelLoadError(f"{folder}: input size unknown; put input_size in model.json")
    declared = outputs[output_name].shape
    if declared.rank == 2 and declared[-1] is not None and declared[-1] != len(labels):
        raise ModelLoadError(f"{folder}: the model outputs {declared[-1]} scores but "
                             f"labels.txt has {len(labels)} labels")

    def predict_fn(images: np.ndarray) -> np.ndarray:
        return signature(**{input_name: tf.constant(images)})[output_name].numpy()

    clf = Classifier(
        predict_fn=predict_fn, labels=labels, input_size=(int(size[0]), int(size[1])),
        name=str(meta.get("name") or os.path.basename(os.path.normpath(folder))),
        version=str(meta.get("version", "1")), outputs=meta.get("outputs", "probabilities"),
        metadata=meta, source=folder)
    clf._keepalive = loaded  # the signature needs the loaded object's variables alive
    return clf


def load_frozen_graph(pb_path: str, labels_path: str, *, input_layer: str = "Placeholder",
                      output_layer: str = "final_result",
                      input_size: tuple[int, int] | None = None, input_mean: float = 0.0,
                      input_std: float = 255.0) -> Classifier:
    """Load a TF1 frozen GraphDef as a pruned ``tf.function``.

    The service's ``[0, 1]`` images are mapped to the graph's range as
    ``(x * 255 - input_mean) / input_std`` (defaults give ``[0, 1]`` back, as the TF Hub based
    retrain.py expected; Inception's original graph used mean 128, std 128).
    """
    import tensorflow as tf

    labels = read_labels(labels_path)
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(pb_path, "rb") as fh:
            graph_def.ParseFromString(fh.read())
        wrapped = tf.compat.v1.wrap_function(
            lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
        graph = wrapped.graph
        input_tensor = graph.as_graph_element(_tensor_name(input_layer))
        output_tensor = graph.as_graph_element(_tensor_name(output_layer))
        fn = wrapped.prune(input_tensor, output_tensor)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load frozen graph {pb_path}: {exc}") from None

    shape = input_tensor.shape
    if input_size is None and shape.rank == 4 and None not in shape[1:3]:
        input_size = (int(shape[1]), int(shape[2]))
    if input_size is None:
        input_size = (299, 299)
    declared = output_tensor.shape
    if declared.rank == 2 and declared[-1] is not None and declared[-1] != len(labels):
        raise ModelLoadError(f"{pb_path}: the graph outputs {declared[-1]} scores but "
                             f"{labels_path} has {len(labels)} labels")
    scale = np.float32(255.0 / input_std)
    offset = np.float32(input_mean / input_std)

    def predict_fn(images: np.ndarray) -> np.ndarray:
        x = images * scale - offset if (scale != 1 or offset != 0) else images
        return fn(tf.constant(x, dtype=input_tensor.dtype)).numpy()

    name = os.path.splitext(os.path.basename(pb_path))[0]
    return Classifier(predict_fn=predict_fn, labels=labels, input_size=tuple(input_size),
                      name=name, version="1", metadata={"format": "frozen_graph"},
                      source=pb_path)


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


class ClassifierHolder:
    """Owns the worker's classifier: loads it in the background so /healthz answers at once.

    ``state`` goes ``loading`` -> ``ready`` (loaded and warmed up) or ``failed``. ``on_failure``
    is called with the error when loading fails (the server uses it to exit non-zero, so no
    half-alive process keeps answering).
    """

    def __init__(self, classifier: Classifier | None = None):
        self._classifier = classifier
        self.state = "ready" if classifier is not None else "loading"
        self.error: BaseException | None = None
        self.load_seconds = 0.0
        self.warmup_seconds = 0.0
        self._ready = threading.Event()
        if classifier is not None:
            self._ready.set()
        self._thread: threading.Thread | None = None

    def start(self, loader: Callable[[], Classifier], *, warmup_batch_sizes=(1,),
              on_failure: Callable[[BaseException], None] | None = None,
              on_ready: Callable[[Classifier], None] | None = None) -> None:
        """Load, warm up for ``warmup_batch_sizes``, call ``on_ready``, then report ready."""
        def run():
            try:
                t0 = time.perf_counter()
                clf = loader()
                self.load_seconds = time.perf_counter() - t0
                self.warmup_seconds = clf.warm_up(warmup_batch_sizes)
                if on_ready is not None:
                    on_ready(clf)
                self._classifier = clf
                self.state = "ready"
                log.info("model %s v%s ready: loaded in %.2f s, warmed up in %.2f s",
                         clf.name, clf.version, self.load_seconds, self.warmup_seconds)
            except BaseException as exc:  # report every failure; the process must not limp on
                self.error = exc
                self.state = "failed"
                log.critical("model failed to load: %s", exc)
                if on_failure is not None:
                    on_failure(exc)
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=run, name="model-loader", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading ends; True when the model is ready."""
        self._ready.wait(timeout)
        return self.state == "ready"

    @property
    def classifier(self) -> Classifier | None:
        return self._classifier if self.state == "ready" else None
