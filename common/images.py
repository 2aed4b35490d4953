"""Bytes -> RGB image, decided by the bytes' content and bounded in cost.

The client's file name and Content-Type are never consulted. Pillow is only asked to try the
formats in the allow-list, the pixel count is checked from the header before any pixel is decoded,
and large JPEGs are decoded in draft mode straight to a size near the model input.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .config import DEFAULT_MAX_IMAGE_PIXELS
from .errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType
from .preprocessing import to_model_input

log = logging.getLogger(__name__)

#: Pillow format name -> file extension used when the image is stored.
FORMATS = {
    "JPEG": "jpg",
    "MPO": "jpg",  # multi-picture JPEG from cameras; Pillow's JPEG opener may return it
    "PNG": "png",
    "GIF": "gif",
    "BMP": "bmp",
    "WEBP": "webp",
    "TIFF": "tiff",
}
DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
#: File name endings the command-line tools pick up from folders (content still decides).
FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
# Pillow decodes run-length BMPs (compression 1 = RLE8, 2 = RLE4) in a Python loop, about 0.1 us
# a pixel while holding the GIL: a 3.5 KB file claiming 16.8 megapixels took 1.7 s (found by
# atheris). One RLE pair (2 bytes) paints at most 255 pixels, so a file cannot honestly hold
# more than ~128 pixels per byte; anything claiming more is refused before decoding.
_BMP_RLE = (1, 2)
_RLE_PIXELS_PER_BYTE = 128
# Pillow keeps one pointer (and per-row work) for every row: a 100-byte PNG claiming 1 x 50
# million pixels cost 400 MB of row pointers and 2-3 s before failing (found by the fuzz tests).
# No photograph is that thin; a side longer than this is refused before decoding.
MAX_SIDE = 30_000


@dataclass(frozen=True)
class DecodedImage:
    """An upload after decoding: ``image`` is mode RGB, ``format`` is Pillow's format name."""

    image: Image.Image
    format: str
    original_size: tuple[int, int]  # (width, height) as stated in the file header

    @property
    def extension(self) -> str:
        return FORMATS[self.format]


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 formats: tuple[str, ...] = DEFAULT_FORMATS,
                 target_size: tuple[int, int] | None = None) -> DecodedImage:
    """Decode image bytes to an upright RGB image.

    Args:
        data: the raw bytes of the file.
        max_pixels: images whose header states more pixels are refused before decoding.
        formats: Pillow format names to try; nothing else is even attempted.
        target_size: ``(height, width)`` the image will be resized to; lets JPEG decode in draft
            mode at a reduced scale that is still at least this size.

    Raises:
        UnsupportedMediaType (415): the bytes are not an image in one of ``formats``.
        ImageTooLarge (413): the header states more than ``max_pixels`` pixels.
        UndecodableImage (422): recognised, but truncated or corrupt.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"the upload is not an image Pillow can read (accepted: {', '.join(formats)})") from None
    except Exception as exc:  # Pillow's plugins raise a zoo of types for a broken header
        log.debug("header parse failed: %r", exc)
        raise UndecodableImage("the image header is corrupt") from None

    fmt = im.format or ""
    if fmt not in FORMATS:
        raise UnsupportedMediaType(f"image format {fmt or 'unknown'} is not accepted")
    width, height = im.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height}, more than {max_pixels} pixels")
    if width < 1 or height < 1:
        raise UndecodableImage("the image has no pixels")
    if max(width, height) > MAX_SIDE:
        raise ImageTooLarge(f"the image is {width}x{height}; no side may exceed {MAX_SIDE} "
                            f"pixels")
    if fmt == "BMP" and im.info.get("compression") in _BMP_RLE and \
            width * height > _RLE_PIXELS_PER_BYTE * len(data):
        raise UndecodableImage(f"the run-length BMP claims {width}x{height} pixels, more than "
                               f"its {len(data)} bytes can hold")

    try:
        if target_size is not None and fmt in ("JPEG", "MPO"):
            # Scale by 1/2, 1/4 or 1/8 in the decoder while staying >= the target size.
            im.draft("RGB", (target_size[1], target_size[0]))
        im.load()  # decodes the first frame only (GIF, WebP, TIFF, MPO)
    except Exception as exc:  # truncated data, bad chunks, broken codecs: all the client's bytes
        log.debug("decode failed: %r", exc)
        raise UndecodableImage("the image is truncated or corrupt") from None
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as exc:  # a broken EXIF block should not reject a good picture
        log.debug("ignoring bad EXIF orientation: %r", exc)
    try:
        rgb = _to_rgb(im)
    except Exception as exc:
        log.debug("mode conversion failed: %r", exc)
        raise UndecodableImage(f"cannot convert image mode {im.mode} to RGB") from None
    return DecodedImage(image=rgb, format=fmt, original_size=(width, height))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; 16-bit scaled to 8-bit; transparency composited on white."""
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im, dtype=np.float32) / 257.0
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return im.convert("RGB")


def load_for_model(data: bytes, size: tuple[int, int], *,
                   max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   formats: tuple[str, ...] = DEFAULT_FORMATS) -> tuple[np.ndarray, DecodedImage]:
    """Decode bytes and preprocess them for a model of input ``size`` = (height, width).

    Returns ``(array, decoded)`` where ``array`` is float32 ``[height, width, 3]`` in ``[0, 1]``.
    """
    decoded = decode_image(data, max_pixels=max_pixels, formats=formats, target_size=size)
    return to_model_input(decoded.image, size), decoded


def load_image_file(path: str, size: tuple[int, int], *,
                    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file -> float32 ``[height, width, 3]`` in [0, 1], exactly as the server would
    preprocess its bytes (for retrain.py and label_image.py). Raises OSError or an ApiError."""
    with open(path, "rb") as fh:
        return load_for_model(fh.read(), size, max_pixels=max_pixels)[0]
