"""Bytes -> RGB image, decided by the bytes' content and bounded in cost.

The client's file name and Content-Type are never consulted. Pillow is only asked to try the
formats in the allow-list. Before any pixel is decoded, the header's size is checked
(``max_pixels``, sides, a TIFF's strip table) and the memory the decoding will take is
estimated (:func:`decode_cost`): an image whose estimate passes the per-image bound is refused
(413), and the estimate is reserved from the worker's :class:`DecodeBudget` while it decodes
(503 when it does not fit beside the decodes in progress).

The pipeline keeps few full-size copies: JPEGs decode in draft mode near the model input; the
decoded image is brought to an opaque mode in place or strip by strip (transparency composited
on white, 16-bit and float scaled to 8 bits); an image at least ``REDUCE_GAP`` times the model
input on both sides is then reduced by an integer factor in its own mode (a box filter, Pillow's
``reducing_gap``) before anything else is done to it, so the conversion to RGB, the EXIF
rotation and the final resize work on a small image.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import logging
import math
import struct
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

from common.config import DEFAULT_MAX_IMAGE_PIXELS, MIB
from common.errors import ImageTooLarge, Overloaded, UndecodableImage, UnsupportedMediaType
from common.inference.preprocessing import MODEL_DECODES, OURS, Preprocessing, to_model_input

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
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
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
#: An image at least this many times the model input on both sides is reduced by an integer
#: factor (box filter) before it is converted and resized; Pillow's documentation calls the
#: result of ``reducing_gap=3`` indistinguishable from a direct resize.
REDUCE_GAP = 3
#: Bytes a decode may take beyond its estimate (Pillow's and numpy's small buffers).
_SLACK = MIB
#: A strip of this many bytes at most (at 4 bytes a pixel) is converted at a time.
_STRIP_BYTES = MIB
#: Bytes per pixel of a strip while it is converted: its RGBA and RGB copies, and a
#: transparent colour's numpy copy and masks (measured: 15).
_STRIP_COPY_BYTES = 16
# Bytes per pixel Pillow keeps for an image of each mode (every 3- and 4-channel mode takes 4).
_NATIVE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# A WebP is decoded by libwebp into its own canvas, copied into a bytes object and read from
# there into Pillow's image: four copies of 4 bytes a pixel (measured: 15.8 bytes a pixel).
_WEBP_BYTES = 16
# A text chunk of a PNG may inflate to 1 MB; Pillow allows 64 MB of them in one file.
PngImagePlugin.MAX_TEXT_MEMORY = 4 * MIB
#: The per-image bound never goes below this (a small MAX_IMAGE_PIXELS still decodes).
MIN_DECODE_BYTES = 32 * MIB
# Worker memory is given back to the system after a decode that reserved at least this much.
TRIM_BYTES = 32 * MIB


@dataclass(frozen=True)
class DecodedImage:
    """An upload after decoding: ``image`` is mode RGB, ``format`` is Pillow's format name."""

    image: Image.Image
    format: str
    original_size: tuple[int, int]  # (width, height) as stated in the file header

    @property
    def extension(self) -> str:
        return FORMATS[self.format]


class DecodeBudget:
    """The bytes one worker may spend decoding images at once (``DECODE_MEMORY_MB``).

    :meth:`reserve` takes an image's estimate (:func:`decode_cost`) for as long as it decodes;
    an estimate that does not fit beside those in progress is refused at once with 503
    (``Retry-After: 1``: decodes take milliseconds to a second). Thread-safe.
    """

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self.used = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, nbytes: int):
        with self._lock:
            fits = self.used + nbytes <= self.limit
            if fits:
                self.used += nbytes
        if not fits:
            raise Overloaded(f"this worker is decoding other images; this one needs "
                             f"{math.ceil(nbytes / MIB)} MiB of its {self.limit // MIB} MiB "
                             f"(DECODE_MEMORY_MB)")
        try:
            yield
        finally:
            if nbytes >= TRIM_BYTES:  # returned to the system before the room is given back
                release_free_memory()
            with self._lock:
                self.used -= nbytes


@dataclass(frozen=True)
class DecodeLimits:
    """What one image may cost: ``max_pixels`` in its header, and at most ``max_bytes`` of
    memory to decode (twice the RGB size of a ``max_pixels`` image, at least
    ``MIN_DECODE_BYTES``, and never more than the budget), reserved from ``budget`` (none: not
    shared with other requests)."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    budget: DecodeBudget | None = None

    @property
    def max_bytes(self) -> int:
        bound = max(2 * 3 * self.max_pixels, MIN_DECODE_BYTES)
        return bound if self.budget is None else min(bound, self.budget.limit)


def decode_image(data: bytes, *, limits: DecodeLimits = DecodeLimits(),
                 formats: tuple[str, ...] = DEFAULT_FORMATS,
                 target_size: tuple[int, int] | None = None) -> DecodedImage:
    """Decode image bytes to an upright RGB image.

    Args:
        data: the raw bytes of the file.
        limits: the pixel and memory bounds (see :class:`DecodeLimits`), checked from the
            header before any pixel is decoded.
        formats: Pillow format names to try; nothing else is even attempted.
        target_size: ``(height, width)`` the image will be resized to: JPEGs decode in draft
            mode and large images are reduced, staying at least ``REDUCE_GAP`` times this size
            (and the result is then at least this size).

    Raises:
        UnsupportedMediaType (415): the bytes are not an image in one of ``formats``.
        ImageTooLarge (413): the header states more than ``max_pixels`` pixels, a side longer
            than ``MAX_SIDE``, or an image whose decoding would take more than ``max_bytes``.
        Overloaded (503): the estimate does not fit in the budget beside other decodes.
        UndecodableImage (422): recognised, but truncated or corrupt.
    """
    max_pixels = limits.max_pixels
    _check_tiff_header(data, max_pixels)
    _check_jpeg_scans(data)
    try:
        im = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"the image has more than {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        raise UnsupportedMediaType(f"the upload is not an image Pillow can read "
                                   f"(accepted: {', '.join(formats)})") from None
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

    cost = decode_cost(im, target_size)
    if cost > limits.max_bytes:
        raise ImageTooLarge(
            f"decoding this {width}x{height} {fmt} image ({im.mode}) would take "
            f"{math.ceil(cost / MIB)} MiB, more than the {limits.max_bytes // MIB} MiB an image "
            f"may take (twice the RGB size of a MAX_IMAGE_PIXELS image, at most "
            f"DECODE_MEMORY_MB)")
    reserved = limits.budget.reserve(cost) if limits.budget else contextlib.nullcontext()
    with reserved:
        rgb = _decode(im, fmt, target_size)
        del im  # the decoded image's memory goes back before the reservation does
    return DecodedImage(image=rgb, format=fmt, original_size=(width, height))


def _decode(im: Image.Image, fmt: str, target_size: tuple[int, int] | None) -> Image.Image:
    """The opened image -> a small upright RGB image (see the module's docstring)."""
    try:
        if target_size is not None and fmt in ("JPEG", "MPO"):
            # Scale by 1/2, 1/4 or 1/8 in the decoder while staying >= the target size.
            im.draft("RGB", (target_size[1], target_size[0]))
        im.load()  # decodes the first frame only (GIF, WebP, TIFF, MPO)
    except Exception as exc:  # truncated data, bad chunks, broken codecs: all the client's bytes
        log.debug("decode failed: %r", exc)
        raise UndecodableImage("the image is truncated or corrupt") from None
    orientation = _orientation(im)
    try:
        im = _to_rgb(im, _reduce_factor(im.size, target_size, orientation))
    except Exception as exc:
        log.debug("mode conversion failed: %r", exc)
        raise UndecodableImage(f"cannot convert image mode {im.mode} to RGB") from None
    method = _TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable: a broken EXIF block should not
    reject a good picture)."""
    try:
        value = im.getexif().get(0x0112, 1)
        return value if value in _TRANSPOSE else 1
    except Exception as exc:
        log.debug("ignoring bad EXIF orientation: %r", exc)
        return 1


def _reduce_factor(size: tuple[int, int], target_size: tuple[int, int] | None,
                   orientation: int) -> int:
    """The integer factor that keeps the image at least ``REDUCE_GAP`` times ``target_size``
    (``(height, width)``, upright) on both sides; 1 when there is no target."""
    if target_size is None:
        return 1
    height, width = target_size
    if orientation >= 5:  # stored on its side: its width becomes the upright height
        height, width = width, height
    return max(1, min(size[0] // (width * REDUCE_GAP), size[1] // (height * REDUCE_GAP)))


def _to_rgb(im: Image.Image, factor: int) -> Image.Image:
    """A decoded image of any mode -> RGB, reduced by ``factor`` (a box filter, 1: not at all).

    Converted strip by strip into the (small) result, so no full-size copy is made beside the
    decoded image: transparency composited on white, 16-bit scaled to 8 bits (divided by 257),
    float clipped to [0, 255], every other mode converted as Pillow converts it. Strips are a
    whole number of ``factor`` rows high, so the result equals reducing the converted image.
    """
    if im.mode in ("L", "RGB") and "transparency" not in im.info:  # no conversion per pixel
        small = im.reduce(factor) if factor > 1 else im
        return small if small.mode == "RGB" else small.convert("RGB")
    convert = _strip_converter(im)
    width, height = im.size
    out = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    rows = max(factor, _STRIP_BYTES // (4 * width) // factor * factor)
    for top in range(0, height, rows):
        strip = convert(im.crop((0, top, width, min(height, top + rows))))
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def _strip_converter(im: Image.Image):
    """The function that turns a strip of ``im`` into RGB, chosen once for the image."""
    mode, transparency = im.mode, im.info.get("transparency")
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return lambda strip: _to_eight_bits(strip).convert("RGB")
    if mode == "P" and transparency is not None:
        _palette_on_white(im, transparency)  # the palette only: no pixel is copied
        return lambda strip: strip.convert("RGB")
    if mode in ("1", "L") and isinstance(transparency, int):
        grey = (255 if transparency else 0) if mode == "1" else transparency
        lut = [255 if v == grey else v for v in range(256)]
        return lambda strip: strip.convert("L").point(lut).convert("RGB")
    if mode == "RGB" and transparency is not None:
        if max(transparency) > 255:  # a 16-bit PNG's key: Pillow's own conversion applies it
            def convert(strip):
                strip.info["transparency"] = transparency
                return _on_white(strip.convert("RGBA")).convert("RGB")
            return convert
        return lambda strip: _colour_on_white(strip, transparency)
    if mode in _ALPHA_MODES:
        return lambda strip: _on_white(strip.convert("RGBA")).convert("RGB")
    return lambda strip: strip.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    """An RGBA image composited over opaque white (the result is opaque RGBA)."""
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def _colour_on_white(strip: Image.Image, colour) -> Image.Image:
    """An RGB strip with its transparent colour (a tRNS chunk's) made white."""
    pixels = np.array(strip)
    pixels[(pixels == np.asarray(colour, dtype=pixels.dtype)).all(axis=-1)] = 255
    return Image.fromarray(pixels, mode="RGB")


def _palette_on_white(im: Image.Image, transparency) -> None:
    """Composite a P image's palette on white, in place, and drop its transparency: the
    palette's colours, with their alpha, go through the same compositing as RGBA pixels."""
    colours = im.getpalette("RGB") or []
    count = len(colours) // 3
    alpha = [255] * count
    if isinstance(transparency, int):
        if 0 <= transparency < count:
            alpha[transparency] = 0
    else:
        for i, a in enumerate(bytes(transparency)[:count]):
            alpha[i] = a
    entries = Image.frombytes("RGB", (count, 1), bytes(colours[:count * 3]))
    entries.putalpha(Image.frombytes("L", (count, 1), bytes(alpha)))
    im.putpalette(_on_white(entries).convert("RGB").tobytes(), "RGB")
    im.info.pop("transparency", None)


def _to_eight_bits(strip: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer strip (divided by 257) or a float strip (clipped) -> L."""
    values = np.asarray(strip, dtype=np.float32)
    if strip.mode != "F":
        values = values / 257.0
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode="L")


def decode_cost(im: Image.Image, target_size: tuple[int, int] | None = None) -> int:
    """Bytes of memory decoding the opened (not yet loaded) ``im`` will take at its peak,
    from its header: the decoded image in Pillow's layout (after JPEG's draft scaling), the
    decoder's own buffers (a progressive JPEG's coefficients, libwebp's canvas and its
    copies), the conversion to an opaque mode, and the reduced and final RGB images."""
    fmt = im.format or ""
    width, height = im.size
    pixels = width * height
    mode = im.mode
    decoded = pixels  # pixels held after decoding (fewer with JPEG's draft scaling)
    buffers = 0
    if fmt in ("JPEG", "MPO"):
        if target_size is not None:
            scale = _draft_scale(im.size, target_size)
            decoded = math.ceil(width / scale) * math.ceil(height / scale)
        if im.info.get("progressive") or im.info.get("progression"):
            buffers = math.ceil(2 * _jpeg_samples_per_pixel(im) * pixels)  # 16-bit coefficients
    if fmt == "WEBP":
        buffers = (_WEBP_BYTES - 4) * pixels
    if fmt == "TIFF" and im.info.get("compression", "raw") != "raw":
        buffers = 4 * _tiff_chunk_pixels(im)  # libtiff decodes a whole strip or tile at once
    total = decoded * _NATIVE_BYTES.get(mode, 4) + buffers
    orientation = _header_orientation(im)
    factor = 1
    if target_size is not None:
        source = _draft_size(im.size, target_size) if fmt in ("JPEG", "MPO") else im.size
        factor = _reduce_factor(source, target_size, orientation)
    small = math.ceil(decoded / (factor * factor))
    plain = mode in ("L", "RGB") and "transparency" not in im.info
    if factor > 1 or not plain or mode == "L":
        total += small * 4  # the RGB result (an RGB image at its size is its own result)
    if orientation != 1:
        total += small * 4  # its rotated copy
    total += min(pixels, max(_STRIP_BYTES // 4, width)) * _STRIP_COPY_BYTES  # one strip
    if target_size is not None:
        total += target_size[0] * target_size[1] * (4 + 3 + 4 * 2)  # resized, uint8, float32
    return total + _SLACK


def _header_orientation(im: Image.Image) -> int:
    """The EXIF orientation known before decoding (a PNG's eXIf chunk may follow its pixels,
    and reading it would decode them: 1 unless it came first)."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    return _orientation(im)


def _tiff_chunk_pixels(im: Image.Image) -> int:
    """Pixels in one strip or tile of an opened TIFF (its tags, before decoding)."""
    tags = getattr(im, "tag_v2", {})
    width, height = im.size
    if 322 in tags and 323 in tags:  # TileWidth, TileLength
        return min(int(tags[322]), width) * min(int(tags[323]), height)
    return width * min(int(tags.get(278, height) or height), height)  # RowsPerStrip


def _jpeg_samples_per_pixel(im: Image.Image) -> float:
    """Samples a JPEG stores per pixel over all its components (3 for 4:4:4 colour, 1.5 for
    4:2:0), from the sampling factors of its frame header (all components when unknown)."""
    layers = getattr(im, "layer", None) or []
    if not layers:
        return float(len(im.getbands()))
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    return sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max)


def _draft_scale(size: tuple[int, int], target_size: tuple[int, int]) -> int:
    """The denominator (1, 2, 4 or 8) libjpeg's draft mode scales a JPEG by so that it stays
    at least ``target_size`` (``(height, width)``), as ``Image.draft`` chooses it."""
    width, height = size
    scale = 1
    while scale < 8 and width // (scale * 2) >= target_size[1] and \
            height // (scale * 2) >= target_size[0]:
        scale *= 2
    return scale


def _draft_size(size: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, int]:
    scale = _draft_scale(size, target_size)
    return math.ceil(size[0] / scale), math.ceil(size[1] / scale)


#: Scans a JPEG may have: libjpeg decodes each over the whole image, so a file repeating a
#: tiny scan thousands of times costs minutes of CPU (libjpeg-turbo's djpeg suggests a limit).
#: Encoders write 1 (baseline) to about 10 (progressive).
MAX_JPEG_SCANS = 100


def _check_jpeg_scans(data: bytes) -> None:
    """Refuse a JPEG with more than ``MAX_JPEG_SCANS`` start-of-scan markers (FF DA; inside
    entropy-coded data a 0xFF byte is always followed by 00, so only real markers match)."""
    if data[:2] == b"\xff\xd8" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise UndecodableImage(f"the JPEG has more than {MAX_JPEG_SCANS} scans")


# TIFF tags read before Pillow parses the file: the size, and the strip and tile tables.
_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_SAMPLES = 256, 257, 277
_TIFF_TABLES = (273, 279, 324, 325)  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_TIFF_MAX_ENTRIES = 1000


def _check_tiff_header(data: bytes, max_pixels: int) -> None:
    """Refuse a TIFF whose first directory states too many pixels, or more strips or tiles
    than its size can have, before Pillow turns its tables into Python objects (a 9 MB file
    with a million strips cost 1.8 s and 350 MB to open). Other formats pass untouched; a
    directory that cannot be read is left to Pillow."""
    if data[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")
    try:
        if big:
            (offset,) = struct.unpack_from(order + "Q", data, 8)
            (count,) = struct.unpack_from(order + "Q", data, offset)
            entry, start, value_format = 20, offset + 8, "HHQ"
        else:
            (offset,) = struct.unpack_from(order + "I", data, 4)
            (count,) = struct.unpack_from(order + "H", data, offset)
            entry, start, value_format = 12, offset + 2, "HHI"
        if count > _TIFF_MAX_ENTRIES:
            raise UndecodableImage(f"the TIFF directory has {count} entries")
        fields, tables = {}, 0
        for i in range(count):
            tag, kind, n = struct.unpack_from(order + value_format, data, start + i * entry)
            if tag in _TIFF_TABLES:
                tables = max(tables, n)
            elif tag in (_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_SAMPLES) and n == 1:
                value_at = start + i * entry + (12 if big else 8)
                fields[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), data,
                                                 value_at)[0]
    except (struct.error, OverflowError):
        return  # truncated, or offsets past any file: Pillow says what is wrong
    width, height = fields.get(_TIFF_WIDTH, 0), fields.get(_TIFF_LENGTH, 0)
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height}, more than {max_pixels} pixels")
    if max(width, height) > MAX_SIDE:
        raise ImageTooLarge(f"the image is {width}x{height}; no side may exceed {MAX_SIDE} "
                            f"pixels")
    samples = max(1, min(fields.get(_TIFF_SAMPLES, 1), 8))
    most = samples * max(height, math.ceil(width / 16) * math.ceil(height / 16))
    if tables > most:
        raise UndecodableImage(f"the TIFF claims {tables} strips or tiles for a "
                               f"{width}x{height} image")


_libc = None


def release_free_memory() -> None:
    """Give the allocator's free memory back to the system (glibc's ``malloc_trim``): a big
    decode's buffers would otherwise stay in the worker's arenas. Nothing elsewhere."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_for_model(data: bytes, size: tuple[int, int], *,
                   limits: DecodeLimits = DecodeLimits(),
                   formats: tuple[str, ...] = DEFAULT_FORMATS,
                   spec: Preprocessing = OURS) -> tuple[np.ndarray, DecodedImage]:
    """Decode bytes and preprocess them for a model of input ``size`` = (height, width) with
    preprocessing ``spec`` (``common.inference.preprocessing``).

    Returns ``(array, decoded)`` where ``array`` is one image as the model takes it: with the
    default spec (our own models) float32 ``[height, width, 3]`` in ``[0, 1]``; for a model
    that takes encoded images (``spec.encoded``) a 0-d object array holding the bytes it is
    fed (:func:`encoded_for_model`), decoded here all the same, so that the pixel limit, the
    decoding budget and the 413/415/422 apply before any byte reaches the model's decoder.
    """
    decoded = decode_image(data, limits=limits, formats=formats,
                           target_size=spec.draft_target(size))
    if spec.encoded:
        return encoded_for_model(data, decoded), decoded
    return to_model_input(decoded.image, size, spec), decoded


def encoded_for_model(data: bytes, decoded: DecodedImage) -> np.ndarray:
    """What an encoded-input model is fed for ``data`` (already decoded and checked as
    ``decoded``): the original bytes when its format is one TensorFlow's ``decode_image`` reads
    (``preprocessing.MODEL_DECODES``: the model decodes exactly what the client sent, as TF
    Serving would), else a PNG of the decoded (upright RGB) image. A 0-d object array."""
    if decoded.format not in MODEL_DECODES:
        buffer = io.BytesIO()
        decoded.image.save(buffer, "PNG", compress_level=1)
        data = buffer.getvalue()
    encoded = np.empty((), dtype=object)
    encoded[()] = bytes(data)
    return encoded


def load_image_file(path: str, size: tuple[int, int], *,
                    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                    spec: Preprocessing = OURS) -> np.ndarray:
    """An image file -> the model's input for it, exactly as the server would preprocess its
    bytes (for retrain.py and label_image.py; with the default spec float32
    ``[height, width, 3]`` in [0, 1]). Raises OSError or an ApiError."""
    with open(path, "rb") as fh:
        return load_for_model(fh.read(), size, limits=DecodeLimits(max_pixels), spec=spec)[0]
