"""Mutations of real image bytes, shared by the hypothesis tests (tests/test_fuzz.py) and the
atheris harness (scripts/fuzz_upload.py).

Seeds are one small image of every accepted format (noisy, so the compressed streams are not
trivial); mutations are bit flips, truncation, splices of random bytes, and rewriting the
dimensions a header claims (0, 1, huge, the 16/32-bit maxima) with checksums fixed so the
decoder gets past the header.
"""
from __future__ import annotations

import struct
import zlib

import imagegen as ig

# 7000 x 7000 is just under the default 50-megapixel limit: the most a header may claim.
ABSURD = (0, 1, 2, 255, 4096, 7000, 32767, 65535, 65536, 100_000, 2**31 - 1, 2**32 - 1)


def seeds() -> dict[str, bytes]:
    picture = ig.noisy(ig.RED, (40, 30), seed=11)
    out = {name: data for name, (data, _) in ig.ALL_FORMATS.items()}
    out.update({
        "noisy_jpeg": ig.encode(picture, "JPEG", quality=80),
        "noisy_png": ig.encode(picture, "PNG"),
        "noisy_webp": ig.encode(picture, "WEBP", quality=80),
        "noisy_tiff_lzw": ig.encode(picture, "TIFF", compression="tiff_lzw"),
        "noisy_gif": ig.encode(picture.convert("P"), "GIF"),
        "rle8_bmp": ig.rle8_bmp(ig.GREEN, (40, 30)),
    })
    return out


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[(p // 8) % len(out)] ^= 1 << (p % 8)
    return bytes(out)


def truncate(data: bytes, fraction: float) -> bytes:
    return data[: int(len(data) * fraction)]


def splice(data: bytes, at: float, junk: bytes, replace: bool) -> bytes:
    i = int(len(data) * at)
    return data[:i] + junk + data[i + (len(junk) if replace else 0):]


def claim_dimensions(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the width and height the header claims, where the format has a simple header."""
    w16, h16, w32, h32 = width & 0xFFFF, height & 0xFFFF, width & 0xFFFFFFFF, height & 0xFFFFFFFF
    if data.startswith(b"\x89PNG") and data[12:16] == b"IHDR":
        ihdr = struct.pack(">II", w32, h32) + data[24:29]
        return (data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
                + data[33:])
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return data[:6] + struct.pack("<HH", w16, h16) + data[10:]
    if data.startswith(b"BM"):
        return data[:18] + struct.pack("<ii", w32 & 0x7FFFFFFF, h32 & 0x7FFFFFFF) + data[26:]
    if data.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
            i = data.find(marker)
            if i > 0:  # SOFn: length(2) precision(1) height(2) width(2)
                return data[:i + 5] + struct.pack(">HH", h16, w16) + data[i + 9:]
    if data.startswith(b"RIFF") and data[12:16] == b"VP8 ":
        return data[:26] + struct.pack("<HH", w16 & 0x3FFF, h16 & 0x3FFF) + data[30:]
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_dimensions(data, w32, h32)
    return data


def _tiff_dimensions(data: bytes, width: int, height: int) -> bytes:
    little = data[:2] == b"II"
    e = "<" if little else ">"
    out = bytearray(data)
    (ifd,) = struct.unpack(e + "I", data[4:8])
    if ifd + 2 > len(data):
        return data
    (count,) = struct.unpack(e + "H", data[ifd:ifd + 2])
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(data):
            break
        tag, kind = struct.unpack(e + "HH", data[entry:entry + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = width if tag == 256 else height
            if kind == 3:
                out[entry + 8:entry + 10] = struct.pack(e + "H", value & 0xFFFF)
            else:
                out[entry + 8:entry + 12] = struct.pack(e + "I", value)
    return bytes(out)
