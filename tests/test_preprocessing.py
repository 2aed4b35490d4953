"""common/inference/preprocessing.py: the spec, its presets and each step, against numbers
worked out here from the conventions' documentation (torchvision's Resize + CenterCrop, Keras'
preprocess_input modes)."""
import io

import numpy as np
import pytest
from PIL import Image

from common.inference.images import load_for_model
from common.inference.preprocessing import (
    OURS,
    PRESETS,
    TFHUB,
    Preprocessing,
    SpecError,
    preset,
    softmax,
)


def gradient(width: int, height: int) -> Image.Image:
    """An RGB picture whose every pixel differs from its neighbours (red: x, green: y)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def test_a_folder_without_a_spec_is_ours_and_older_logits_are_honoured():
    assert Preprocessing.from_dict(None) == OURS and OURS.decode == "draft"
    assert Preprocessing.from_dict(None, outputs="logits").output == "logits"
    assert TFHUB.decode == "exact" and TFHUB.is_identity


def test_explicit_settings_win_over_the_preset():
    spec = Preprocessing.from_dict({"preset": "torchvision", "resize": "stretch"})
    assert (spec.layout, spec.resize, spec.output) == ("NCHW", "stretch", "logits")
    assert Preprocessing.from_dict(spec.as_dict()) == spec  # the JSON form round-trips


@pytest.mark.parametrize("data, words", [
    ({"preset": "resnet"}, "unknown preprocessing preset"),
    ({"layout": "CHW"}, "layout must be one of"),
    ({"mean": [0.5, 0.5]}, "mean must be three numbers"),
    ({"std": [1, 0, 1]}, "std must not be 0"),
    ({"label_offset": -1}, "label_offset"),
    ({"resize_shorter": 0}, "resize_shorter"),
    ({"dtype": "uint8", "mean": [0.5] * 3}, "uint8"),
    ({"colour_order": "BGR"}, "unknown preprocessing setting"),
])
def test_a_spec_that_cannot_be_applied_says_why(data, words):
    with pytest.raises(SpecError, match=words):
        Preprocessing.from_dict(data)


def test_torchvision_crop_is_resize_shorter_then_centre_crop():
    """Resize(256) on a 500x375 picture gives 341x256 (int(256 * 500 / 375)), then the centre
    224 x 224 whose corner is round((341 - 224) / 2) = 58 (half to even), round(16) = 16."""
    image = gradient(500, 375)
    got = preset("torchvision").pixels(image, (224, 224))
    resized = image.resize((341, 256), Image.Resampling.BILINEAR)
    want = np.asarray(resized.crop((58, 16, 58 + 224, 16 + 224)), np.float32) / 255
    assert got.shape == (224, 224, 3) and np.allclose(got, want, atol=1e-7)
    assert preset("torchvision").shorter_side((224, 224)) == 256


def test_letterbox_keeps_the_aspect_and_pads_with_black():
    got = Preprocessing(resize="letterbox").pixels(gradient(60, 30), (20, 20))
    assert got.shape == (20, 20, 3)
    assert np.all(got[:5] == 0) and np.all(got[15:] == 0) and got[5:15].max() > 0


@pytest.mark.parametrize("name, formula", [
    ("inception", lambda p: p / 127.5 - 1.0),  # Keras "tf" mode
    ("keras-caffe", lambda p: p[..., ::-1] - np.array([103.939, 116.779, 123.68])),
    ("keras-torch", lambda p: (p / 255 - np.array([0.485, 0.456, 0.406]))
     / np.array([0.229, 0.224, 0.225])),
])
def test_scaling_presets_are_the_documented_formulas(name, formula):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3)).astype(np.float32)
    got = PRESETS[name].to_input(pixels / np.float32(255))
    assert got.dtype == np.float32
    assert np.allclose(got, formula(pixels.astype(np.float64)), atol=2e-4)


def test_nchw_and_uint8_inputs():
    pixels = np.random.default_rng(1).integers(0, 256, (2, 4, 5, 3)).astype(np.float32) / 255
    nchw = Preprocessing(layout="NCHW").to_input(pixels)
    assert nchw.shape == (2, 3, 4, 5) and np.array_equal(nchw[:, 1], pixels[..., 1])
    raw = Preprocessing(dtype="uint8").to_input(pixels)
    assert raw.dtype == np.uint8 and np.array_equal(raw, np.rint(pixels * 255).astype(np.uint8))


def test_outputs_become_scores():
    logits = np.array([[9.0, 1.0, 2.0, 3.0]], np.float32)
    assert np.allclose(Preprocessing(output="logits").to_scores(logits), softmax(logits))
    offset = Preprocessing(output="logits", label_offset=1).to_scores(logits)
    assert offset.shape == (1, 3) and np.allclose(offset, softmax(logits[:, 1:]))
    sig = Preprocessing(output="sigmoid").to_scores(logits)
    assert np.allclose(sig, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-7)


def test_exact_decoding_reads_the_whole_jpeg_where_draft_reduces_it():
    """A 1600x1200 JPEG for a 224 crop: ``draft`` may decode it at 1/4 (>= 256 both sides),
    ``exact`` decodes it whole, as torchvision's and Keras' loaders do."""
    buf = io.BytesIO()
    gradient(1600, 1200).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    exact = preset("torchvision")
    draft = Preprocessing.from_dict({"preset": "torchvision", "decode": "draft"})
    assert exact.draft_target((224, 224)) is None and draft.draft_target((224, 224)) == (256, 256)
    with Image.open(io.BytesIO(data)) as im:
        whole = exact.to_input(exact.pixels(im.convert("RGB"), (224, 224)))
    got_exact, _ = load_for_model(data, (224, 224), spec=exact)
    got_draft, _ = load_for_model(data, (224, 224), spec=draft)
    assert np.array_equal(got_exact, whole)
    assert not np.array_equal(got_draft, whole)
