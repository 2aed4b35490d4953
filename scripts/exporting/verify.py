"""Checking an export against TensorFlow before it is written: on the model's own test images
when they are given, else on generated ones."""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

from common.inference.exports import Tolerance, compare, within
from common.inference.images import load_image_file
from common.inference.preprocessing import to_model_input

Predict = Callable[[np.ndarray], np.ndarray]


def generated_images(size: tuple[int, int], count: int = 32, seed: int = 1) -> np.ndarray:
    """float32 ``[count, h, w, 3]`` in ``[0, 1]``: seeded pictures of every kind a model may
    meet (smooth colour fields at several scales, strokes on white, noise), made with the one
    preprocessing function from 8-bit images."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        kind = i % 3
        if kind == 0:  # a smooth colour field, coarse to fine
            grid = rng.integers(0, 256, (2 ** (1 + i % 5),) * 2 + (3,), dtype=np.uint8)
            picture = Image.fromarray(grid).resize((size[1] * 2, size[0] * 2),
                                                   Image.Resampling.BICUBIC)
        elif kind == 1:  # dark strokes on white, like the drawing canvas
            from PIL import ImageDraw
            picture = Image.new("RGB", (size[1] * 3, size[0] * 3), "white")
            draw = ImageDraw.Draw(picture)
            points = [tuple(int(v) for v in rng.integers(0, min(picture.size), 2))
                      for _ in range(int(rng.integers(3, 8)))]
            draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 80, 3)),
                      width=int(rng.integers(2, 10)))
        else:  # noise
            picture = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        images.append(to_model_input(picture, size))
    return np.stack(images)


def image_files(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """Image files -> float32 ``[n, h, w, 3]`` in ``[0, 1]``, as the server preprocesses them
    (unreadable files are skipped)."""
    arrays = []
    for path in paths:
        try:
            arrays.append(load_image_file(path, size))
        except Exception:  # noqa: BLE001 - an unreadable test image is left out, as retrain does
            continue
    return np.stack(arrays) if arrays else np.zeros((0, *size, 3), np.float32)


def batched(predict: Predict, images: np.ndarray, batch_size: int = 16,
            progress: bool = False, desc: str = "verifying") -> np.ndarray:
    """``predict`` over ``images`` in batches -> float32 ``[n, labels]``."""
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch",
                      disable=not progress):
        rows.append(np.asarray(predict(images[start:start + batch_size]), np.float32))
    return np.concatenate(rows)


def verify(reference: np.ndarray, candidate: np.ndarray, tolerance: Tolerance,
           source: str) -> dict:
    """model.json's ``verification`` of an export: the comparison, the tolerance, the verdict."""
    result = compare(candidate, reference)
    return {**result, "source": source, "tolerance": tolerance.as_dict(),
            "passed": within(result, tolerance)}
