"""Image bytes for tests, in every accepted format and a few hostile shapes."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from scripts.attacks import bombs, tiff_with_strips  # noqa: F401 (the tests' hostile files)

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 30), (20, 30, 220)


def solid(colour=RED, size=(64, 48), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noisy(colour, size=(64, 48), seed=0, amount=25) -> Image.Image:
    """A picture dominated by ``colour`` with random noise, so that bytes differ per seed."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.int16)[None, None, :]
    arr = base + rng.integers(-amount, amount + 1, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def jpeg(colour=RED, size=(64, 48), **params) -> bytes:
    return encode(solid(colour, size), "JPEG", quality=90, **params)


def png(colour=RED, size=(64, 48)) -> bytes:
    return encode(solid(colour, size), "PNG")


def cmyk_jpeg(colour=RED, size=(64, 48)) -> bytes:
    return encode(solid(colour, size).convert("CMYK"), "JPEG")


def progressive_jpeg(colour=RED, size=(64, 48)) -> bytes:
    return encode(noisy(colour, size), "JPEG", progressive=True, quality=90)


def png16(colour=RED, size=(64, 48)) -> bytes:
    """A 16-bit greyscale PNG whose brightness follows the colour's red channel."""
    value = colour[0] * 257
    return encode(Image.fromarray(np.full((size[1], size[0]), value, np.uint16)), "PNG")


def palette_png(colour=RED, size=(64, 48)) -> bytes:
    return encode(solid(colour, size).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")


def alpha_png(colour=RED, size=(64, 48), alpha=255) -> bytes:
    return encode(solid((*colour, alpha), size, "RGBA"), "PNG")


def gif(colour=RED, size=(64, 48), second=BLUE) -> bytes:
    """A two-frame GIF: the first frame is ``colour``, the second ``second``."""
    frames = [solid(colour, size).convert("P"), solid(second, size).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def bmp(colour=RED, size=(64, 48)) -> bytes:
    return encode(solid(colour, size), "BMP")


def webp(colour=RED, size=(64, 48)) -> bytes:
    return encode(solid(colour, size), "WEBP", quality=90)


def tiff(colour=RED, size=(64, 48)) -> bytes:
    return encode(solid(colour, size), "TIFF")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def rle8_bmp(colour=RED, size=(64, 48), claim: tuple[int, int] | None = None) -> bytes:
    """A run-length (RLE8) BMP of one colour; ``claim`` overrides the (width, height) its
    header states, keeping the pixel data of ``size``."""
    width, height = size
    rows = b"".join(bytes([width, 0, 0, 0]) for _ in range(height))  # run of index 0, EOL
    pixels = rows + b"\x00\x01"  # end of bitmap
    palette = bytes([colour[2], colour[1], colour[0], 0])
    cw, ch = claim or size
    info = struct.pack("<IiiHHIIiiII", 40, cw, ch, 1, 8, 1, len(pixels), 2835, 2835, 1, 0)
    offset = 14 + len(info) + len(palette)
    head = struct.pack("<2sIHHI", b"BM", offset + len(pixels), 0, 0, offset)
    return head + info + palette + pixels


SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b'<rect width="10" height="10" fill="red"/></svg>')

#: name -> (bytes, expected stored extension), every accepted format, all red
ALL_FORMATS = {
    "jpeg": (jpeg(RED), "jpg"),
    "cmyk_jpeg": (cmyk_jpeg(RED), "jpg"),
    "progressive_jpeg": (progressive_jpeg(RED), "jpg"),
    "png": (png(RED), "png"),
    "palette_png": (palette_png(RED), "png"),
    "alpha_png": (alpha_png(RED), "png"),
    "gif": (gif(RED), "gif"),
    "bmp": (bmp(RED), "bmp"),
    "webp": (webp(RED), "webp"),
    "tiff": (tiff(RED), "tiff"),
}

