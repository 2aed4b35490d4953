"""A loaded model as three steps, in the style of TorchServe's handlers. No web framework here.

* :meth:`Classifier.preprocess`: image bytes -> float32 ``[h, w, 3]`` in ``[0, 1]`` at the
  model's input size (``common.inference.images.load_for_model``, the one preprocessing function);
* :meth:`Classifier.predict`: float32 ``[n, h, w, 3]`` in ``[0, 1]`` -> float32
  ``[n, labels]`` probabilities (one ``tf.function`` call; thread-safe, so one instance serves
  every request thread of a worker through its batcher);
* :meth:`Classifier.postprocess`: one image's scores -> ``[{"label", "score"}, ...]`` ranked,
  the shape of the API's ``predictions`` and of ``label_image.py --json``.

``common.inference.loader.load_classifier`` builds one from a model folder and a runtime.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from common.inference.images import DecodedImage, DecodeLimits, load_for_model
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
        predict_fn: float32 ``[n, h, w, 3]`` in ``[0, 1]`` -> ``[n, num_labels]``.
        labels: one label per output, in output order.
        input_size: ``(height, width)`` the model expects.
        outputs: ``"probabilities"`` (already softmaxed) or ``"logits"`` (softmax applied here).
        name, version: what answers call it (the manager sets them to the name and number it
            serves the model as); ``describe`` writes the version as a string, as every answer
            has it.
        folder: where it was loaded from (None for a model built in memory).
    """

    predict_fn: Callable[[np.ndarray], np.ndarray]
    labels: list[str]
    input_size: tuple[int, int]
    name: str = "model"
    version: int = 1
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

    @property
    def image_bytes(self) -> int:
        """Bytes of one preprocessed image (a float32 ``[h, w, 3]``): what a queued image holds."""
        return self.input_size[0] * self.input_size[1] * 3 * np.dtype(np.float32).itemsize

    # -- 1. preprocess ------------------------------------------------------------------------
    def preprocess(self, data: bytes,
                   limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, DecodedImage]:
        """Image bytes -> (float32 ``[h, w, 3]`` in ``[0, 1]``, the decoded image).

        Raises the 4xx ApiErrors of ``common.inference.images.decode_image`` for bad bytes, and
        its 503 when the decode does not fit in ``limits.budget``.
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
        """``{"name", "version"}`` as answers show the model (the version as a string)."""
        return {"name": self.name, "version": str(self.version)}


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


