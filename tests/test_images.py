"""common/inference/images.py: decoding by content, every format, limits, orientation,
transparency."""

import imagegen as ig
import numpy as np
import pytest
from PIL import Image

from common.errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType
from common.inference.images import DecodeLimits, decode_image, load_for_model
from common.inference.preprocessing import to_model_input


@pytest.mark.parametrize("name", sorted(ig.ALL_FORMATS))
def test_every_accepted_format_decodes_to_rgb(name):
    data, ext = ig.ALL_FORMATS[name]
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    assert decoded.extension == ext
    r, g, b = np.asarray(decoded.image, dtype=np.float32).reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 90 and b < 90, (name, r, g, b)


def test_sixteen_bit_png_is_scaled_not_clipped():
    decoded = decode_image(ig.png16((100, 0, 0)))
    value = np.asarray(decoded.image)[0, 0]
    assert 95 <= value[0] <= 105 and value[0] == value[1] == value[2]


def test_gif_uses_first_frame():
    decoded = decode_image(ig.gif(ig.GREEN, second=ig.BLUE))
    r, g, b = np.asarray(decoded.image, np.float32).reshape(-1, 3).mean(axis=0)
    assert g > r and g > b


def test_transparent_pixels_are_composited_on_white():
    decoded = decode_image(ig.alpha_png(ig.RED, alpha=0))
    assert tuple(np.asarray(decoded.image)[0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), ig.RED)
    image.paste(Image.new("RGB", (20, 20), ig.BLUE), (0, 0))  # blue on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = ig.encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(data)
    assert decoded.image.size == (20, 40)
    top = np.asarray(decoded.image, np.float32)[:10].reshape(-1, 3).mean(axis=0)
    assert top[2] > top[0]  # blue ends up on top after a clockwise turn


def test_not_an_image_is_415():
    with pytest.raises(UnsupportedMediaType):
        decode_image(b"hello, this is text")


def test_svg_is_415():
    with pytest.raises(UnsupportedMediaType):
        decode_image(ig.SVG)


def test_format_outside_allow_list_is_415():
    with pytest.raises(UnsupportedMediaType):
        decode_image(ig.png(), formats=("JPEG",))


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg_is_422(cut):
    data = ig.encode(ig.noisy(ig.RED, (200, 200)), "JPEG")
    with pytest.raises(UndecodableImage):
        decode_image(data[: int(len(data) * cut)])


def test_corrupt_png_is_422():
    data = bytearray(ig.encode(ig.noisy(ig.RED, (50, 50)), "PNG"))
    data[60:80] = b"\xff" * 20
    with pytest.raises(UndecodableImage):
        decode_image(bytes(data))


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(ImageTooLarge):
        decode_image(ig.png_claiming(40000, 40000))


def test_pixel_limit_is_configurable():
    data = ig.png(size=(100, 100))
    with pytest.raises(ImageTooLarge):
        decode_image(data, limits=DecodeLimits(9999))
    assert decode_image(data, limits=DecodeLimits(10000)).image.size == (100, 100)


def test_large_jpeg_is_decoded_in_draft_mode():
    data = ig.jpeg(size=(4000, 3000))
    decoded = decode_image(data, target_size=(299, 299))
    assert decoded.original_size == (4000, 3000)
    assert decoded.image.size == (500, 375)  # 1/8 scale, still >= 299 on both sides


def test_load_for_model_gives_shape_and_range():
    array, decoded = load_for_model(ig.jpeg(ig.BLUE, size=(300, 200)), (32, 48))
    assert array.shape == (32, 48, 3) and array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0
    assert np.allclose(array, to_model_input(decoded.image, (32, 48)))


def test_preprocessing_refuses_non_rgb():
    with pytest.raises(ValueError):
        to_model_input(Image.new("L", (4, 4)), (4, 4))


def test_run_length_bmp_decodes():
    decoded = decode_image(ig.rle8_bmp(ig.GREEN, (200, 50)))
    assert decoded.format == "BMP" and decoded.image.size == (200, 50)
    assert decoded.image.getpixel((100, 25)) == ig.GREEN


def test_run_length_bmp_claiming_more_pixels_than_its_bytes_can_hold_is_refused_early():
    """Found by atheris: Pillow decodes RLE BMPs pixel by pixel in Python (seconds per file)."""
    data = ig.rle8_bmp(ig.GREEN, (200, 50), claim=(6000, 6000))
    with pytest.raises(UndecodableImage, match="more than its"):
        decode_image(data)


@pytest.mark.parametrize("size", [(1, 40_000_000), (40_000_000, 1), (30_001, 30)])
def test_absurdly_thin_images_are_refused_before_decoding(size):
    """Found by the fuzz tests: Pillow spends a row pointer (and time) per row."""
    with pytest.raises(ImageTooLarge, match="no side may exceed"):
        decode_image(ig.png_claiming(*size))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def test_a_jpeg_repeating_a_scan_is_refused_before_decoding():
    """libjpeg decodes every scan over the whole image: 20,000 copies of one 75-byte scan cost
    78 s of CPU. More than MAX_JPEG_SCANS scans is refused from the bytes."""
    data = ig.encode(Image.new("RGB", (64, 64)), "JPEG", progressive=True)
    last = data.rfind(b"\xff\xda")
    repeated = data[:-2] + data[last:-2] * 150 + b"\xff\xd9"
    with pytest.raises(UndecodableImage, match="scans"):
        decode_image(repeated)
    assert decode_image(data[:-2] + data[last:-2] * 5 + b"\xff\xd9").image.size == (64, 64)


def test_a_long_thin_tiff_is_refused_before_its_strip_table_is_read():
    """1 x 1,000,000 with a million strips: the strips fit its height, but no side may pass
    MAX_SIDE, and that is checked before Pillow builds the tables (2.1 s and +329 MB)."""
    import time

    data = ig.tiff_with_strips(1_000_000, size=(1, 1_000_000), pixels=64)
    started = time.process_time()
    with pytest.raises(ImageTooLarge, match="no side"):
        decode_image(data)
    assert time.process_time() - started < 0.5  # Pillow's tables took 2 s


def test_a_bigtiff_pointing_past_any_file_is_a_client_error():
    import struct
    data = b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 2**64 - 1)
    with pytest.raises((UndecodableImage, UnsupportedMediaType)):
        decode_image(data)


def test_a_sixteen_bit_png_with_a_transparent_colour_composites_it_on_white():
    """tRNS in a 16-bit PNG holds 16-bit values (65535, 0, 0)."""
    import struct
    import zlib
    red, blue = struct.pack(">HHH", 65535, 0, 0), struct.pack(">HHH", 0, 0, 65535)
    rows = b"".join(b"\x00" + (red + blue) * 2 for _ in range(4))
    header = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"tRNS", red) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))
    pixels = np.asarray(decode_image(data).image)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 1]) == (0, 0, 255)


def test_a_wide_rgb_image_is_not_charged_for_copies_it_does_not_make():
    """An RGB image whose short side is under three model inputs is not reduced and is its own
    RGB result: a 12000 x 600 PNG (7.2 MP, bound 43 MB) decodes; counting a result copy and a
    rotated copy that are never made (12 bytes a pixel) refused it."""
    data = ig.encode(Image.new("RGB", (12000, 600), (20, 200, 30)), "PNG")
    decoded = decode_image(data, limits=DecodeLimits(7_200_000), target_size=(224, 224))
    assert decoded.image.size == (12000, 600)
