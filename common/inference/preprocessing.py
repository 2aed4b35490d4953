"""The one preprocessing function, shared by serving, label_image.py and retrain.py.

Whatever a model is trained on must be what it is served with; keeping the resize and scaling in
one function means training and serving cannot drift apart.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

#: Resampling filter used everywhere an image is brought to the model's input size.
RESAMPLE = Image.Resampling.BILINEAR


def to_model_input(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB PIL image to ``size`` and scale it for the model.

    Args:
        image: a PIL image in mode ``RGB`` (``common.inference.images.decode_image`` returns one).
        size: ``(height, width)`` of the model input.

    Returns:
        float32 array of shape ``[height, width, 3]`` with values in ``[0, 1]`` (the TF Hub image
        convention); stack them to get the ``[batch, height, width, 3]`` model input.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), RESAMPLE)
    return np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
