"""What both gRPC servicers need to turn a protobuf tensor into the DataPlane's ``Images``:
the bounds of a request, shapes checked in exact arithmetic, raw
little-endian numbers and Triton's length-prefixed BYTES elements read into numpy or bytes.

(``common/web/protocols/base.py`` has the REST side's equivalents; it imports Flask, which the
engine side may not, so the few pieces gRPC shares are here.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.dataplane import DataPlane, pixels_refused
from common.errors import InvalidParameter, TooManyImages
from common.oip import MAX_RANK
from common.versions.manager import Route



@dataclass(frozen=True)
class Limits:
    """What the largest valid request holds: ``max_images`` images (MAX_IMAGES_PER_REQUEST),
    each encoded or as one ``image_shape`` tensor (the model's input without the batch)."""

    max_images: int
    image_shape: tuple[int, ...]
    #: The model's input name when it takes encoded images only (a tensor is refused 400).
    encoded_only: str | None = None

    @property
    def max_values(self) -> int:
        """Numbers in ``max_images`` tensor images: ``N * prod(image_shape)``."""
        return self.max_images * math.prod(self.image_shape)


def limits_for(dataplane: DataPlane, target: Route) -> Limits:
    """The limits of a request to ``target``: the settings and the model's input shape."""
    classifier = dataplane.served(target).classifier
    return Limits(dataplane.config.max_images_per_request, tuple(classifier.input_shape),
                  classifier.input_name if classifier.spec.encoded else None)


def check_shape(shape, encoded: bool, limits: Limits) -> int:
    """A tensor's shape (1 to ``MAX_RANK`` whole numbers) -> its element count, refused (400)
    when it or any dimension is more than ``limits`` allow (encoded: images; else numbers),
    and when it is a tensor for a model that takes encoded images only."""
    if not encoded and limits.encoded_only is not None:
        raise pixels_refused(limits.encoded_only)
    shape = list(shape)
    if not 1 <= len(shape) <= MAX_RANK or any(d < 0 for d in shape):
        raise InvalidParameter(f"the input shape must be 1 to {MAX_RANK} whole numbers >= 0, "
                               f"got {shape[:MAX_RANK + 1]}")
    count = math.prod(shape)
    most = limits.max_images if encoded else limits.max_values
    if count > most or max(shape) > most:  # a dimension too, in case another is 0
        raise TooManyImages(f"input shape {shape} holds more elements than "
                            f"{limits.max_images} images (MAX_IMAGES_PER_REQUEST) can ({most})")
    return count


def raw_numbers(data: bytes, dtype: str, shape: list[int], count: int) -> np.ndarray:
    """Raw little-endian ``dtype`` numbers (``<f4`` or ``u1``) of ``shape`` -> float32; 400
    when the byte count does not match or a value is NaN or infinite."""
    width = np.dtype(dtype).itemsize
    if len(data) != count * width:
        raise InvalidParameter(f"shape {shape} needs {count * width} bytes of {dtype}, got "
                               f"{len(data)}")
    return finite(np.frombuffer(data, dtype=dtype).astype(np.float32).reshape(shape))


def listed_numbers(values, shape: list[int], count: int, most: float | None = None
                   ) -> np.ndarray:
    """A protobuf repeated number field -> float32 of ``shape``; 400 when the count does not
    match, a value is past ``most`` (uint8: 255) or NaN or infinite."""
    if len(values) != count:
        raise InvalidParameter(f"shape {shape} needs {count} values, got {len(values)}")
    array = np.asarray(values, dtype=np.float64)
    if most is not None and array.size and array.max() > most:
        raise InvalidParameter(f"values must be at most {most:g} for this datatype")
    return finite(array.astype(np.float32).reshape(shape))


def finite(array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise InvalidParameter("the input has NaN or infinite values (or numbers too large "
                               "for float32)")
    return array
