"""A model's preprocessing spec, and the one function per step that applies it: shared by
serving, label_image.py, retrain.py, the protocols and (ported step for step) the page's
in-browser mode. No TensorFlow and no web framework here.

Whatever a model was trained on must be what it is served with. Each model folder says how in
model.json's ``preprocessing`` (written by retrain.py, export.py and import_model.py; a folder
without one is ours: :data:`TFHUB`). The steps, in order:

1. :meth:`Preprocessing.pixels`: a decoded RGB image -> float32 ``[h, w, 3]`` in ``[0, 1]`` at
   the model's input size (``stretch``; ``crop``: shorter side to ``resize_shorter``, then the
   centre ``h x w``, as torchvision's ``Resize`` + ``CenterCrop``; ``letterbox``: the whole
   image scaled to fit, centred on black).
2. :meth:`Preprocessing.to_input`: those pixels (one image or a batch) -> the model's own input:
   colour order, ``(x - mean) / std`` per channel (``mean`` and ``std`` in ``[0, 1]`` pixel
   units, RGB order), layout (``NHWC`` or ``NCHW``) and dtype (``float32``, or ``uint8`` for the
   raw 0..255 pixels; a quantised model's scale and zero point are its runtime's business).
   Before step 1, ``decode`` says whether a large image may be decoded reduced
   (:meth:`Preprocessing.draft_target`): ``exact`` (the whole image, as other frameworks' loaders
   read it) or ``draft`` (ours: faster, and what retrain.py trained on).
3. :meth:`Preprocessing.to_scores`: the model's outputs ``[n, outputs]`` -> ``[n, labels]``
   scores: ``label_offset`` leading outputs dropped (a background class), then ``softmax`` for
   logits or ``sigmoid`` for independent (multi-label) scores; probabilities pass as they are.

A model that decodes images itself (a SavedModel whose signature takes a ``tf.string`` input of
encoded JPEG/PNG bytes, as TF Hub, TF Serving and AutoML image exports often do) has ``dtype:
"string"`` (:attr:`Preprocessing.encoded`): one image is the image file's bytes, a 0-d object
array (``input_shape`` ``()``, so a batch is ``[n]`` of bytes), and steps 1 and 2 do not apply
(``layout``, ``colour``, ``resize``, ``mean``/``std`` are left at their defaults). The service
still decodes every image first with its own bounded decoder (``images.load_for_model``: the
pixel limit, the decoding budget, 413/415/422 exactly as for other models), then hands the model
the original bytes when its graph reads that format (:data:`MODEL_DECODES`), else a PNG of the
decoded image; step 3 applies as to any model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image

#: Resampling filters by name (Pillow's resize antialiases when it shrinks, as torchvision's
#: ``Resize`` on PIL images and ``antialias=True`` do).
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
                  "box": Image.Resampling.BOX}
#: The filter of our own models (and of the default spec).
RESAMPLE = INTERPOLATIONS["bilinear"]
LAYOUTS = ("NHWC", "NCHW")
COLOURS = ("RGB", "BGR")
RESIZES = ("stretch", "crop", "letterbox")
#: ``string``: the model takes encoded images and decodes them in its graph (see above).
DTYPES = ("float32", "uint8", "string")
#: The formats (Pillow's names) an encoded-input model is handed as the client sent them:
#: those ``tf.io.decode_image`` reads; any other accepted format goes in as a PNG.
MODEL_DECODES = ("JPEG", "MPO", "PNG", "GIF", "BMP")
#: ``exact``: the whole image is decoded, as torchvision's and Keras' loaders do; ``draft``:
#: a large JPEG decodes at 1/2, 1/4 or 1/8 scale and a large image is box-reduced first,
#: staying at least the size the resize needs (faster and smaller; what our own models are
#: trained with).
DECODES = ("exact", "draft")
OUTPUTS = ("probabilities", "logits", "sigmoid")
#: ImageNet's channel means and standard deviations in [0, 1] units (torchvision's numbers).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Keras' "caffe" mode subtracts these means (0..255, RGB order here) from BGR pixels.
CAFFE_MEAN_255 = (123.68, 116.779, 103.939)
#: torchvision's evaluation crop: resize the shorter side to size / 0.875 (256 for 224).
CROP_FRACTION = 0.875


class SpecError(ValueError):
    """A preprocessing spec that cannot be applied (an unknown preset, layout, size...)."""


@dataclass(frozen=True)
class Preprocessing:
    """How one model wants its images and what its outputs are (see the module docstring).

    ``preset`` names the family the spec started from (``tfhub``, ``inception``,
    ``torchvision``, ``keras-caffe``, ``keras-torch``); the fields are what applies.
    """

    layout: str = "NHWC"
    colour: str = "RGB"
    resize: str = "stretch"
    resize_shorter: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dtype: str = "float32"
    output: str = "probabilities"
    label_offset: int = 0
    decode: str = "exact"
    preset: str | None = None

    def __post_init__(self):
        for name, allowed in (("layout", LAYOUTS), ("colour", COLOURS), ("resize", RESIZES),
                              ("interpolation", tuple(INTERPOLATIONS)), ("dtype", DTYPES),
                              ("output", OUTPUTS), ("decode", DECODES)):
            if getattr(self, name) not in allowed:
                raise SpecError(f"preprocessing {name} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (not isinstance(values, (tuple, list)) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)):
                raise SpecError(f"preprocessing {name} must be three numbers, got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(v == 0 for v in self.std):
            raise SpecError("preprocessing std must not be 0")
        if self.resize_shorter is not None and (
                not isinstance(self.resize_shorter, int) or self.resize_shorter < 1):
            raise SpecError(f"preprocessing resize_shorter must be a positive whole number, "
                            f"got {self.resize_shorter!r}")
        if not isinstance(self.label_offset, int) or self.label_offset < 0:
            raise SpecError(f"preprocessing label_offset must be a whole number >= 0, got "
                            f"{self.label_offset!r}")
        if self.dtype == "uint8" and (self.mean, self.std) != ((0.0,) * 3, (1.0,) * 3):
            raise SpecError("a uint8 input takes the raw 0..255 pixels: mean and std do not "
                            "apply")
        if self.encoded and (self.layout, self.colour, self.mean, self.std) != (
                "NHWC", "RGB", (0.0,) * 3, (1.0,) * 3):
            raise SpecError("a string input takes encoded images, decoded by the model: "
                            "layout, colour, mean and std do not apply")

    # -- (de)serialising: model.json's "preprocessing" ----------------------------------------
    @classmethod
    def from_dict(cls, data: dict | None, *, outputs: str | None = None) -> "Preprocessing":
        """model.json's ``preprocessing`` (a preset name and/or fields; fields win over the
        preset's) -> a spec. None: our own models' :data:`OURS`, with model.json's older
        ``"outputs": "logits"`` honoured. SpecError for unknown keys or values."""
        if data is None:
            return replace(OURS, output=outputs) if outputs else OURS
        if not isinstance(data, dict):
            raise SpecError(f"preprocessing must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown preprocessing setting(s): {', '.join(unknown)} (known: "
                            f"{', '.join(sorted(known))})")
        base = preset(data["preset"]) if data.get("preset") else TFHUB
        settings = {k: v for k, v in data.items() if k != "preset"}
        return replace(base, **settings)

    def as_dict(self) -> dict:
        """The JSON form (model.json, ``GET /model``, the page's in-browser mode)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    # -- 1. pixels ----------------------------------------------------------------------------
    def shorter_side(self, size: tuple[int, int]) -> int:
        """``crop``: the side the shorter image side is resized to before the centre crop."""
        return self.resize_shorter or int(round(max(size) / CROP_FRACTION))

    def draft_target(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The size a decoder may reduce the image to (JPEG draft, box reduce) and still give
        :meth:`pixels` all it needs: both sides at least this; None (``decode: exact``): the
        whole image."""
        if self.decode == "exact":
            return None
        if self.resize == "crop":
            side = max(self.shorter_side(size), *size)
            return side, side
        return size

    def pixels(self, image: Image.Image, size: tuple[int, int]) -> np.ndarray:
        """An RGB PIL image -> float32 ``[h, w, 3]`` in ``[0, 1]``, ``size`` = ``(h, w)``."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        height, width = size
        resample = INTERPOLATIONS[self.interpolation]
        if self.resize == "crop":
            image = _crop(image, self.shorter_side(size), (height, width), resample)
        elif self.resize == "letterbox":
            image = _letterbox(image, (height, width), resample)
        elif image.size != (width, height):
            image = image.resize((width, height), resample)
        return np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)

    # -- 2. the model's input -----------------------------------------------------------------
    @property
    def is_identity(self) -> bool:
        """True when the model takes the pixels as they are (NHWC float32 RGB in [0, 1])."""
        return (self.layout, self.colour, self.dtype, self.mean, self.std) == (
            "NHWC", "RGB", "float32", (0.0,) * 3, (1.0,) * 3)

    @property
    def encoded(self) -> bool:
        """True when the model takes encoded images (``dtype: string``) and decodes them."""
        return self.dtype == "string"

    def input_shape(self, size: tuple[int, int]) -> tuple[int, ...]:
        """One image's shape as the model takes it: ``(h, w, 3)`` or ``(3, h, w)``; ``()``
        for encoded images (one bytes object)."""
        if self.encoded:
            return ()
        return (*size, 3) if self.layout == "NHWC" else (3, *size)

    @property
    def numpy_dtype(self) -> np.dtype:
        """float32, uint8, or object (bytes) for encoded images."""
        return np.dtype(object) if self.encoded else np.dtype(self.dtype)

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        """float32 pixels ``[..., h, w, 3]`` in ``[0, 1]`` (one image or a batch) -> the model's
        input: ``[..., h, w, 3]`` or ``[..., 3, h, w]``, float32 ``(x - mean) / std`` per
        channel in the spec's colour order, or uint8 0..255. Not for encoded images."""
        if self.encoded:
            raise SpecError("this model takes encoded images, not pixels")
        if self.is_identity:
            return pixels
        x = pixels[..., ::-1] if self.colour == "BGR" else pixels
        if self.dtype == "uint8":
            x = np.rint(x * np.float32(255.0)).astype(np.uint8)
        else:
            mean, std = self.channel_mean(), self.channel_std()
            x = (x - mean) * (np.float32(1.0) / std)
        if self.layout == "NCHW":
            x = np.moveaxis(x, -1, -3)
        return np.ascontiguousarray(x)

    def channel_mean(self) -> np.ndarray:
        """float32 ``[3]``: the means in the spec's colour order."""
        values = self.mean[::-1] if self.colour == "BGR" else self.mean
        return np.asarray(values, np.float32)

    def channel_std(self) -> np.ndarray:
        values = self.std[::-1] if self.colour == "BGR" else self.std
        return np.asarray(values, np.float32)

    # -- 3. scores ----------------------------------------------------------------------------
    def to_scores(self, outputs: np.ndarray) -> np.ndarray:
        """float ``[n, outputs]`` -> float32 ``[n, outputs - label_offset]`` scores in [0, 1]
        (rows sum to 1 unless ``output`` is ``sigmoid``)."""
        scores = np.asarray(outputs, np.float32)
        if self.label_offset:
            scores = scores[:, self.label_offset:]
        if self.output == "logits":
            return softmax(scores)
        if self.output == "sigmoid":
            return (1.0 / (1.0 + np.exp(-scores.astype(np.float64)))).astype(np.float32)
        return scores


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32 (stable for any finite logits)."""
    z = np.asarray(x, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _crop(image: Image.Image, shorter: int, size: tuple[int, int], resample) -> Image.Image:
    """torchvision's ``Resize(shorter)`` then ``CenterCrop(size)`` on a PIL image: the shorter
    side becomes ``shorter``, the longer ``int(shorter * long / short)``; the crop's corner is
    ``round((side - crop) / 2)``; a crop larger than the image is padded with black."""
    width, height = image.size
    if width <= height:
        new = (shorter, int(shorter * height / width))
    else:
        new = (int(shorter * width / height), shorter)
    if new != image.size:
        image = image.resize(new, resample)
    crop_h, crop_w = size
    if crop_w > new[0] or crop_h > new[1]:
        padded = Image.new("RGB", (max(crop_w, new[0]), max(crop_h, new[1])))
        padded.paste(image, ((padded.width - new[0]) // 2, (padded.height - new[1]) // 2))
        image, new = padded, padded.size
    top = int(round((new[1] - crop_h) / 2.0))
    left = int(round((new[0] - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _letterbox(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    """The whole image scaled (aspect kept) to fit ``size`` and centred on black."""
    height, width = size
    scale = min(width / image.width, height / image.height)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if new != image.size:
        image = image.resize(new, resample)
    if new == (width, height):
        return image
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image, ((width - new[0]) // 2, (height - new[1]) // 2))
    return canvas


#: TF Hub's image convention: stretched to the input size (bilinear), RGB, NHWC float32 in
#: [0, 1], probabilities out.
TFHUB = Preprocessing(preset="tfhub")
#: Our own models (retrain.py, the demo, folders without a spec): TF Hub's convention, decoded
#: in draft mode as retrain.py reads its training images.
OURS = replace(TFHUB, decode="draft")
#: Presets by name (model.json ``preprocessing.preset``, ``import_model.py --preset``).
PRESETS = {
    "tfhub": TFHUB,
    # Inception / MobileNet / Keras "tf" mode: [-1, 1].
    "inception": Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), preset="inception"),
    # torchvision / timm evaluation transforms, exported to ONNX: NCHW, logits out.
    "torchvision": Preprocessing(layout="NCHW", resize="crop", mean=IMAGENET_MEAN,
                                 std=IMAGENET_STD, output="logits", preset="torchvision"),
    # Keras applications' "caffe" mode (ResNet50, VGG): BGR, ImageNet means subtracted, 0..255.
    "keras-caffe": Preprocessing(colour="BGR", mean=tuple(m / 255.0 for m in CAFFE_MEAN_255),
                                 std=(1 / 255.0,) * 3, preset="keras-caffe"),
    # Keras applications' "torch" mode (DenseNet): ImageNet mean/std, NHWC, softmax inside.
    "keras-torch": Preprocessing(mean=IMAGENET_MEAN, std=IMAGENET_STD, preset="keras-torch"),
}


def preset(name: str) -> Preprocessing:
    """A named preset; SpecError naming the known ones."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise SpecError(f"unknown preprocessing preset {name!r} (known: "
                        f"{', '.join(PRESETS)})") from None


def to_model_input(image: Image.Image, size: tuple[int, int],
                   spec: Preprocessing = OURS) -> np.ndarray:
    """An RGB PIL image -> the model's input for one image (``spec``'s pixels, then its
    :meth:`~Preprocessing.to_input`); with the default spec float32 ``[h, w, 3]`` in ``[0, 1]``
    (the TF Hub image convention our own models use); stack them for a batch."""
    return spec.to_input(spec.pixels(image, size))
