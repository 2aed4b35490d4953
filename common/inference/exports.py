"""How an export is compared with TensorFlow, shared by the exporter and the loaders. No
TensorFlow and no web framework here.

Every export (``scripts/export.py``) records two comparisons in model.json:

* ``verification``: the export against TensorFlow on real or generated images (max absolute
  difference of the scores, top-1 agreement), with the tolerance it had to meet;
* ``reference``: scores for a few seeded inputs (:func:`reference_inputs`), so that a runtime
  loading the export later (the server's ONNX Runtime, label_image's LiteRT) can check its own
  outputs without TensorFlow (:func:`check_reference`): TensorFlow's scores for float32
  exports; for quantized ones, the export's own scores when it was verified (on noise a
  quantized model may stray far from TensorFlow while being good on real images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from common.modelfolder import ModelLoadError

#: Inputs and seed of the reference outputs recorded with every export.
REFERENCE_SEED = 0
REFERENCE_COUNT = 2


@dataclass(frozen=True)
class Tolerance:
    """How far an export may stray from TensorFlow: the largest absolute difference of any
    score, and the smallest share of images whose top label agrees."""

    max_abs_diff: float
    min_top1_agreement: float

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "min_top1_agreement": self.min_top1_agreement}


#: Default tolerance per export key (modelfolder.EXPORT_FILES). Float32 exports must match to
#: rounding; the quantized ones trade accuracy for size and are held to their top label.
TOLERANCES = {
    "onnx": Tolerance(1e-4, 1.0),
    "tflite": Tolerance(1e-4, 1.0),
    "tflite-float16": Tolerance(0.02, 0.98),
    "tflite-dynamic": Tolerance(0.1, 0.95),
    "tflite-int8": Tolerance(0.35, 0.95),
}
#: A quantized export at load against its own scores when verified: other CPUs' kernels may
#: round a step (1/256) differently, nothing more.
QUANTIZED_REPLAY = Tolerance(0.02, 0.0)


def reference_inputs(size: tuple[int, int], count: int = REFERENCE_COUNT,
                     seed: int = REFERENCE_SEED) -> np.ndarray:
    """float32 ``[count, h, w, 3]`` in ``[0, 1]``: seeded uniform noise (NumPy's PCG64, the
    same values on every machine)."""
    return np.random.default_rng(seed).random((count, *size, 3), dtype=np.float32)


def compare(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """Scores ``[n, labels]`` of an export against TensorFlow's:
    ``{"max_abs_diff", "top1_agreement", "images"}``."""
    candidate = np.asarray(candidate, np.float64)
    reference = np.asarray(reference, np.float64)
    if candidate.shape != reference.shape:
        raise ValueError(f"shapes differ: {list(candidate.shape)} vs {list(reference.shape)}")
    return {"images": int(reference.shape[0]),
            "max_abs_diff": float(np.abs(candidate - reference).max()),
            "top1_agreement": float((candidate.argmax(-1) == reference.argmax(-1)).mean())}


def within(result: dict, tolerance: Tolerance) -> bool:
    return (result["max_abs_diff"] <= tolerance.max_abs_diff
            and result["top1_agreement"] >= tolerance.min_top1_agreement)


def reference_record(scores: np.ndarray, tolerance: Tolerance, source: str) -> dict:
    """model.json's ``reference`` of an export: scores for :func:`reference_inputs`, whose
    (``source``: ``tensorflow`` or the export itself), and the tolerance a loader checks the
    export's scores against them with."""
    return {"seed": REFERENCE_SEED, "count": int(scores.shape[0]), "source": source,
            "outputs": [[float(np.float32(v)) for v in row] for row in scores],
            "tolerance": tolerance.as_dict()}


def check_reference(predict_fn: Callable[[np.ndarray], np.ndarray], record: dict,
                    size: tuple[int, int], where: str) -> dict:
    """Run ``predict_fn`` on the recorded reference inputs; ModelLoadError unless its scores
    are within the recorded tolerance of TensorFlow's. Returns the comparison."""
    reference = record.get("reference")
    if not reference:
        raise ModelLoadError(f"{where}: model.json records no reference outputs for it; export "
                             f"it again with scripts/export.py")
    expected = np.asarray(reference["outputs"], np.float32)
    inputs = reference_inputs(size, int(reference["count"]), int(reference["seed"]))
    try:
        result = compare(predict_fn(inputs), expected)
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None
    tolerance = Tolerance(**reference["tolerance"])
    if not within(result, tolerance):
        raise ModelLoadError(
            f"{where} does not reproduce the recorded outputs of {reference.get('source')}: "
            f"max difference {result['max_abs_diff']:.3g} (allowed {tolerance.max_abs_diff:g}), "
            f"top-1 agreement {result['top1_agreement']:.2f} (needed "
            f"{tolerance.min_top1_agreement:g})")
    return result
