"""A loaded model as three steps, in the style of TorchServe's handlers. No web framework here.

* :meth:`Classifier.preprocess`: image bytes -> one image as the model takes it, by the model's
  preprocessing spec (``common.inference.images.load_for_model`` and
  ``common.inference.preprocessing``): for our own models float32 ``[h, w, 3]`` in ``[0, 1]``;
  for a model that decodes images itself (spec ``dtype: string``) the encoded bytes, checked
  by our own decoder first, as a 0-d object array (a batch is ``[n]`` of bytes);
* :meth:`Classifier.predict`: a batch of those ``[n, *input_shape]`` -> float32 ``[n, labels]``
  scores (one runtime call, then the spec's softmax / sigmoid / label offset; thread-safe, so
  one instance serves every request thread of a worker through its batcher);
* :meth:`Classifier.postprocess`: one image's scores -> ``[{"label", "score"}, ...]`` ranked,
  the shape of the API's ``predictions`` and of ``label_image.py --json``.

``common.inference.loader.load_classifier`` builds one from a model folder and a runtime.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from common.inference.images import DecodedImage, DecodeLimits, load_for_model
from common.inference.preprocessing import OURS, Preprocessing
from common.modelfolder import ModelFolder

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
        predict_fn: the model's input batch ``[n, *input_shape]`` -> raw outputs
            ``[n, num_labels + spec.label_offset]``.
        labels: one label per score, in output order.
        input_size: ``(height, width)`` the model expects.
        spec: its preprocessing (layout, colour order, resize, scaling, dtype, what the
            outputs are); our own models' is ``tfhub``. ``outputs="logits"`` is the older way
            to say ``spec.output``.
        name, version: what answers call it (the manager sets them to the name and number it
            serves the model as); ``describe`` writes the version as a string, as every answer
            has it.
        folder: where it was loaded from (None for a model built in memory).
        input_name, input_dtype: the graph's own input name and dtype (metadata shows them).
    """

    predict_fn: Callable[[np.ndarray], np.ndarray]
    labels: list[str]
    input_size: tuple[int, int]
    name: str = "model"
    version: int = 1
    outputs: str | None = None
    metadata: dict = field(default_factory=dict)
    folder: ModelFolder | None = None
    #: What runs ``predict_fn``: tensorflow, onnx or tflite (see ``RuntimeOptions``).
    runtime: str = "tensorflow"
    spec: Preprocessing = OURS
    input_name: str = "images"
    input_dtype: str = "float32"
    warmed_up: bool = False
    #: Seconds of one call per batch size, measured by the warm-up's second pass.
    batch_seconds: dict = field(default_factory=dict)
    #: The worker's seat on the server's board of work in hand (``common.machine.Seat``),
    #: where ``predict_fn`` counts its calls and the batcher its images in hand; None outside
    #: gunicorn.
    seat: Any = None

    def __post_init__(self):
        if self.outputs is not None and self.outputs != self.spec.output:
            self.spec = replace(self.spec, output=self.outputs)
        self.outputs = self.spec.output

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image as the model takes it: ``(h, w, 3)`` (NHWC) or ``(3, h, w)`` (NCHW); ``()``
        for encoded images."""
        return self.spec.input_shape(self.input_size)

    def image_bytes(self, max_upload_bytes: int) -> int:
        """Bytes one queued image may hold, for admission's queue bound: one preprocessed
        image; for a model that takes encoded images the upload limit (``max_upload_bytes``,
        what an image's bytes may be), so that QUEUE_MEMORY_MB stays a bound."""
        if self.spec.encoded:
            return max(1, int(max_upload_bytes))
        return int(np.prod(self.input_shape)) * self.spec.numpy_dtype.itemsize

    # -- 1. preprocess ------------------------------------------------------------------------
    def preprocess(self, data: bytes,
                   limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, DecodedImage]:
        """Image bytes -> (one image as the model takes it, ``[*input_shape]``, the decoded
        image): for our own models float32 ``[h, w, 3]`` in ``[0, 1]``.

        Raises the 4xx ApiErrors of ``common.inference.images.decode_image`` for bad bytes, and
        its 503 when the decode does not fit in ``limits.budget``.
        """
        return load_for_model(data, self.input_size, limits=limits, spec=self.spec)

    # -- 2. inference -------------------------------------------------------------------------
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Scores for a batch.

        Args:
            images: ``[n, *input_shape]`` in the spec's dtype (for our own models float32
                ``[n, height, width, 3]`` in ``[0, 1]``; ``[n]`` bytes objects for a model
                that takes encoded images).

        Returns:
            float32 ``[n, num_labels]`` in [0, 1]; each row sums to 1 unless the model's
            outputs are independent sigmoids.

        Raises:
            ValueError: the batch has the wrong shape, or the model answered with one.
        """
        images = np.asarray(images, dtype=self.spec.numpy_dtype)
        if images.ndim != 1 + len(self.input_shape) or images.shape[1:] != self.input_shape:
            raise ValueError(f"expected [n, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(images.shape)}")
        raw = np.asarray(self.predict_fn(images), dtype=np.float32)
        wanted = self.num_labels + self.spec.label_offset
        if raw.shape != (images.shape[0], wanted):
            raise ValueError(f"model returned shape {list(raw.shape)} for "
                             f"{images.shape[0]} images and {wanted} outputs")
        return self.spec.to_scores(raw)

    #: A larger batch size is measured only while the last one served at least this many times
    #: the images per second of the best before it (``warm_up``).
    WARM_UP_GAIN = 1.02

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run the model twice per batch size so the first real request is not slower, and
        time the second call of each (``batch_seconds``: the batcher's first estimates).

        Sizes go smallest first and stop after one that gains less than ``WARM_UP_GAIN`` in
        images per second over the best before it: the batcher never uses a larger one then
        (``batcher.efficient_batch_size`` takes the smallest within 2% of the best), and on a
        CPU the gains of larger batches only shrink. An Inception-sized model gains nothing
        past 1, and measuring it at 4 and 8 as well took 3.1 of its 3.9 s of warm-up, CPU taken
        from the version serving while a new one rolls out.

        A function that runs on more threads while no other worker has work in hand
        (``common.machine.Seat.either``) is timed on the session it runs under load (its
        ``under_load``), whatever the other workers do meanwhile, and its ``alone`` runs once
        at batch 1; both are counted on the worker's seat like any call.

        Also the start-up check that labels and model outputs agree (for models that do not
        declare their output width). Returns seconds taken.
        """
        started = time.perf_counter()
        predict = getattr(self.predict_fn, "under_load", self.predict_fn)
        best = 0.0
        for n in batch_sizes:
            zeros = self.blank_batch(n)
            scores = np.asarray(predict(zeros))  # the first call traces the shape
            width = scores.shape[-1] if scores.ndim == 2 else 0
            ModelFolder.check_label_count(width, self.labels, self.name, self.spec.label_offset)
            t0 = time.perf_counter()
            predict(zeros)
            self.batch_seconds[n] = seconds = time.perf_counter() - t0
            rate = n / seconds if seconds > 0 else float("inf")
            if rate < self.WARM_UP_GAIN * best:
                break
            best = max(best, rate)
        alone = getattr(self.predict_fn, "alone", None)
        if alone is not None:
            alone(self.blank_batch(1))
        self.warmed_up = True
        return time.perf_counter() - started

    def blank_batch(self, n: int) -> np.ndarray:
        """``n`` blank images as the model takes them: zeros ``[n, *input_shape]``; for a model
        that takes encoded images ``[n]`` grey pictures of its input size, PNG and JPEG in
        turn (so that the warm-up runs both of its decoders)."""
        if not self.spec.encoded:
            return np.zeros((n, *self.input_shape), self.spec.numpy_dtype)
        samples = grey_images(self.input_size)
        batch = np.empty((n,), dtype=object)
        for i in range(n):
            batch[i] = samples[i % len(samples)]
        return batch

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

    def describe_input(self) -> dict:
        """The model's real input: ``{"name", "dtype", "shape" ([-1, ...] per its layout),
        "layout", "runtime_dtype"}`` (``dtype`` what the service feeds it; ``runtime_dtype``
        what the graph declares, e.g. ``int8`` for a quantised TFLite input). A model that
        takes encoded images: ``dtype`` ``string``, shape ``[-1]``, layout None."""
        if self.spec.encoded:
            return {"name": self.input_name, "dtype": "string", "shape": [-1], "layout": None,
                    "runtime_dtype": self.input_dtype}
        return {"name": self.input_name, "dtype": self.spec.dtype,
                "shape": [-1, *self.input_shape], "layout": self.spec.layout,
                "runtime_dtype": self.input_dtype}

    @property
    def platform(self) -> str:
        """What actually runs the model, in Triton's words where it has one:
        ``onnxruntime_onnx``, ``tensorflow_savedmodel``, ``tensorflow_graphdef`` (a frozen
        graph), ``tensorflow_keras`` or ``tflite`` (LiteRT)."""
        if self.runtime in ("onnx", "tflite"):
            return {"onnx": "onnxruntime_onnx", "tflite": "tflite"}[self.runtime]
        kind = self.folder.format if self.folder is not None else None
        return {"frozen_graph": "tensorflow_graphdef", "keras": "tensorflow_keras",
                "h5": "tensorflow_keras"}.get(kind, "tensorflow_savedmodel")

    def describe(self) -> dict:
        """``{"name", "version"}`` as answers show the model (the version as a string)."""
        return {"name": self.name, "version": str(self.version)}


def grey_images(size: tuple[int, int]) -> tuple[bytes, bytes]:
    """A mid-grey picture of ``size`` = ``(height, width)`` as PNG and as JPEG bytes (the
    warm-up's images for a model that takes encoded images)."""
    import io

    from PIL import Image

    picture = Image.new("RGB", (size[1], size[0]), (128, 128, 128))
    out = []
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        picture.save(buffer, fmt)
        out.append(buffer.getvalue())
    return tuple(out)
