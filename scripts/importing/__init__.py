"""Importing a model trained elsewhere: the library behind ``scripts/import_model.py``.

An ONNX file (with its external data files), a TFLite file, a Keras ``.keras`` / ``.h5``, a
SavedModel folder or a frozen ``.pb`` becomes a model folder (``common.modelfolder``) the
service, label_image.py and a model repository serve on the model's own runtime:

1. **inspect** (:func:`scripts.importing.models.inspect_model`): inputs, outputs, shapes,
   dtypes, fixed or dynamic batch, ONNX opset, TFLite quantisation, without running it
   (and without TensorFlow for ONNX and TFLite);
2. **decide** the preprocessing spec (:func:`decide_spec`): a preset (``--preset``) and explicit
   settings, and what the model itself shows: the layout from where its 3 channels are, the
   input size from its fixed dimensions, uint8 pixels for a uint8 input (a quantised TFLite
   input takes floats, quantised by the runtime), and, unless given, whether its outputs are
   probabilities (on generated images: each row in [0, 1] and summing to 1) or logits. Every
   guess is written down as a sentence in model.json ``import.assumed``. A SavedModel whose
   signature takes encoded images (one ``tf.string`` input, shape ``[None]`` or ``[]``, as TF
   Hub, TF Serving and AutoML image exports have) gets ``dtype: "string"``: it decodes and
   resizes in its own graph, so no pixel setting applies; ``input_size`` (given, else 224)
   only sizes the warm-up's pictures;
3. **write** the folder in a staging folder beside the target: the model's file under its
   model-folder name (``common.modelfolder.MODEL_FILES``; an ONNX model's external data files
   beside it under the names it references), ``labels.txt``, ``model.json`` (format,
   input_size, preprocessing, name, version, created, ``import``: source, sha256, found,
   assumed);
4. **check** that the staged folder loads with ``load_classifier(..., RuntimeOptions("auto"))``
   and answers a generated (Pillow-made) image with one score per label (a model that takes
   encoded images: a PNG and a JPEG, the formats its graph must decode); only then
   **publish** it (``common.modelfolder.publish``: an output folder replaced whole, or the next
   free version number of a repository's model, never overwritten).

What the service cannot serve raises :class:`CannotImport` with one sentence: more than one
input, an input that is not an image batch (4-D, 3 channels), an output that is not one score
per label (``[n, k]``), labels that do not match the outputs (``k - label_offset``), a string
input of another rank than ``[None]`` or ``[]`` (or not a SavedModel's), pixel settings for a
model that takes encoded images, an unknown preset.
"""
from __future__ import annotations

import io
import os
import shutil
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

from common.inference.preprocessing import (
    PRESETS,
    TFHUB,
    Preprocessing,
    SpecError,
    preset,
)
from common.modelfolder import (
    MODEL_FILES,
    ModelFolder,
    ModelLoadError,
    file_sha256,
    infer_size,
    parse_labels,
    publish,
)

from .models import (
    SAVED_MODEL_PARTS,
    WITHOUT_TENSORFLOW,
    CannotImport,
    Found,
    Tensor,
    inspect_model,
    model_format,
)

__all__ = ["CannotImport", "Found", "ImportResult", "SPEC_FIELDS", "Tensor", "decide_spec",
           "import_model", "inspect_model", "model_format", "needs_tensorflow"]


#: Preprocessing settings an import may set explicitly (everything but ``preset``).
SPEC_FIELDS = tuple(f.name for f in fields(Preprocessing) if f.name != "preset")
#: Input side when neither the model nor ``input_size`` fixes it (ImageNet models' usual).
DEFAULT_SIDE = 224
#: Generated images the output check runs (the probability test and the final answer).
CHECK_IMAGES = 6
#: The runtimes' names in the summary.
RUNTIME_NAMES = {"onnx": "ONNX Runtime", "tflite": "LiteRT", "tensorflow": "TensorFlow"}
#: Tries at the next free version number when another publisher takes it first.
PUBLISH_TRIES = 5


@dataclass
class ImportResult:
    """What :func:`import_model` made: the published ``folder``, its ``model_json``, what it
    ``found``, the ``spec`` it serves with, the ``runtime`` that ran the check and the check's
    answer (``check``: ``{"image", "scores", "top": {"label", "score"}}``)."""

    folder: str
    model_json: dict
    found: Found
    spec: Preprocessing
    runtime: str
    check: dict = field(default_factory=dict)

    @property
    def assumed(self) -> list[str]:
        return self.model_json["import"]["assumed"]

    def summary(self) -> str:
        """A few lines for the terminal: where, runtime, input, preprocessing, the check."""
        spec, found = self.spec, self.found
        runtime = RUNTIME_NAMES.get(self.runtime, self.runtime)
        size = self.model_json["input_size"]
        top = self.check["top"]
        steps = [spec.preset or "custom", spec.layout, spec.colour, f"{spec.resize} to "
                 f"{size[0]}x{size[1]}"]
        if spec.encoded:
            steps = [spec.preset or "custom", "encoded images (JPEG/PNG bytes, decoded by the "
                     "model; checked by the service's decoder first)"]
        elif spec.resize == "crop":
            steps[-1] += f" (shorter side {spec.shorter_side(tuple(size))} first)"
        if spec.dtype == "uint8":
            steps.append("uint8 0..255")
        elif not spec.encoded:
            steps.append(f"mean {_numbers(spec.mean)} std {_numbers(spec.std)}")
        steps.append(spec.output + (f", first {spec.label_offset} output(s) skipped"
                                    if spec.label_offset else ""))
        lines = [f"imported {self.model_json['import']['source']} -> {self.folder} "
                 f"({found.format}, runs on {runtime})",
                 f"  input: {found.input.describe()}"
                 + (f", quantised {found.quantisation['input']['dtype']}"
                    if found.input_quantised else ""),
                 f"  preprocessing: {', '.join(steps)}",
                 f"  check: a generated image -> {self.check['scores']} scores, top "
                 f"{top['label']!r} {top['score']:.4f}"]
        lines += [f"  assumed: {sentence}" for sentence in self.assumed]
        return "\n".join(lines)


def needs_tensorflow(source: str) -> bool:
    """Whether importing ``source`` needs TensorFlow (Keras, SavedModel, frozen graph)."""
    try:
        return model_format(source) not in WITHOUT_TENSORFLOW
    except CannotImport:
        return False


def import_model(source: str, *, output_dir: str | None = None, repository: str | None = None,
                 name: str | None = None, labels: list[str] | str | None = None,
                 num_labels: int | None = None, preset_name: str | None = None,
                 settings: dict | None = None, input_size=None, signature: str | None = None,
                 input_name: str | None = None, output_name: str | None = None
                 ) -> ImportResult:
    """Import ``source`` (see the module docstring) into ``output_dir`` (replaced whole when
    it exists) or into ``repository``/``name``/<next version>.

    Args:
        labels: the labels (a list, or a labels file's path); else ``num_labels`` unnamed
            classes ``class_0``...; else one unnamed class per output (an assumption).
        preset_name: a preprocessing preset (``common.inference.preprocessing.PRESETS``).
        settings: explicit preprocessing settings (:data:`SPEC_FIELDS`), over the preset's.
        input_size: ``(height, width)`` or a side, for a model whose input does not fix it.
        signature, input_name, output_name: a SavedModel's signature, and a SavedModel's or
            frozen graph's input and output tensor names.

    Raises CannotImport (one sentence) for what cannot be served or loaded; nothing is
    published then.
    """
    if (output_dir is None) == (repository is None):
        raise CannotImport("give either an output folder or a repository (with a name)")
    if repository is not None:
        from common.versions.source import routable
        if not name or not routable(name):
            raise CannotImport(f"a repository model needs a name usable in URLs (letters, "
                               f"digits, '.', '_', '-'), got {name!r}")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SPEC_FIELDS))
    if unknown:
        raise CannotImport(f"unknown preprocessing setting(s): {', '.join(unknown)}")
    if preset_name is not None and preset_name not in PRESETS:
        raise CannotImport(f"unknown preset {preset_name!r} (known: {', '.join(PRESETS)})")
    source = os.path.normpath(source)
    if os.path.basename(source) == "saved_model.pb":
        source = os.path.dirname(source) or "."
    found = inspect_model(source, signature=signature, input_name=input_name,
                          output_name=output_name)
    check_servable(found)
    label_list = _labels(labels, num_labels, found, settings.get("label_offset", 0))
    spec, size, assumed = decide_spec(found, preset_name, settings, input_size)
    if label_list is None:
        raise CannotImport("the model does not fix its number of outputs: give --labels or "
                           "--num_labels")
    check_label_count(found, label_list, spec.label_offset)
    if len(found.outputs) > 1 and found.format in ("onnx", "tflite"):
        assumed.append(f"of the outputs {', '.join(t.name for t in found.outputs)} the "
                       f"service reads {found.output.name} (the runtime's rule: "
                       f"{'probabilities, else ' if found.format == 'onnx' else ''}the first)")
    if labels is None and num_labels is None:
        assumed.append(f"no labels given: {len(label_list)} unnamed classes class_0..."
                       f"class_{len(label_list) - 1}")

    if output_dir is not None:
        target = os.path.normpath(output_dir)
        version = 1
        staging = target + ".incoming"
        name = name or os.path.basename(target)
    else:
        from common.versions.source import next_version, version_staging
        model_dir = os.path.join(repository, name)
        version = next_version(model_dir)
        target = os.path.join(model_dir, str(version))
        staging = version_staging(model_dir, version)
    parent = os.path.dirname(os.path.abspath(staging))
    made_parent = not os.path.isdir(parent)
    os.makedirs(parent, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(staging)
        meta = _write_folder(staging, source, found, label_list, name, version)
        meta["input_size"] = list(size)
        clf, spec = _stage_and_check(staging, meta, spec, found, assumed,
                                     output_given="output" in settings,
                                     declared=spec.output if preset_name else None)
        check = _answer(clf)
        if repository is not None:
            target, version = _publish_version(staging, model_dir, version, meta)
        else:
            publish(staging, target, replace=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made_parent and not os.listdir(parent):  # a repository's model folder made for it
            os.rmdir(parent)
        raise
    return ImportResult(target, meta, found, spec, clf.runtime, check)


# -- what can be served ---------------------------------------------------------------------------
def check_servable(found: Found) -> None:
    """One input, image-like; one output of one score per class (``[n, k]``)."""
    if len(found.inputs) > 1 and (found.format != "frozen_graph" or found.input is None):
        names = ", ".join(t.name for t in found.inputs)
        hint = (" (a frozen graph: pass --input_name to feed one of them)"
                if found.format == "frozen_graph" else "")
        raise CannotImport(f"the model takes {len(found.inputs)} inputs ({names}); the service "
                           f"feeds one image batch{hint}")
    if found.input is None:
        raise CannotImport("the model has no input the service could feed it images through")
    shape, name = found.input.shape, found.input.name
    if found.input.dtype == "string":
        if found.format != "saved_model":
            raise CannotImport(f"input {name} is a string tensor: encoded images are served "
                               f"from a SavedModel's signature only")
        if shape is not None and len(shape) > 1:
            raise CannotImport(f"input {found.input.describe()} is a string tensor of rank "
                               f"{len(shape)}: encoded images are [N] (a batch) or [] (one)")
        _check_output(found)
        return
    channels = None if shape is None or len(shape) != 4 else (shape[1], shape[3])
    if shape is not None and (channels is None or (
            3 not in channels and channels != (None, None))):
        raise CannotImport(f"input {found.input.describe()} is not an image batch: the "
                           f"service feeds [N, height, width, 3] or [N, 3, height, width]")
    if not (found.input.dtype.startswith("float") or found.input.dtype == "uint8"
            or found.input_quantised):
        raise CannotImport(f"input {name} is {found.input.dtype}: an image model's input must "
                           f"be float or uint8 pixels (or encoded images, a string)")
    _check_output(found)


def _check_output(found: Found) -> None:
    out = found.output
    if out is None:
        raise CannotImport("cannot tell which output holds the scores: pass --output_name")
    one_image = found.input.dtype == "string" and found.input.shape == []  # one image a call
    if out.shape is not None and len(out.shape) != 2 and not (one_image and len(out.shape) == 1):
        raise CannotImport(f"output {out.describe()} is not one row of scores per image "
                           f"([N, classes]); the service cannot rank it")
    if not (out.dtype.startswith("float") or found.quantisation.get("output")):
        raise CannotImport(f"output {out.name} is {out.dtype}, not scores; pass the name of "
                           f"the scores output (--output_name)")


def check_label_count(found: Found, labels: list[str], label_offset: int) -> None:
    width = found.output.shape[-1] if found.output.shape else None
    if width is not None and width - label_offset != len(labels):
        hint = (" (is output 0 a background class? pass --label_offset 1)"
                if width - label_offset == len(labels) + 1 else "")
        skipped = f" less {label_offset} skipped" if label_offset else ""
        raise CannotImport(f"the model gives {width} scores per image{skipped} but there are "
                           f"{len(labels)} labels{hint}")


def _labels(labels, num_labels, found: Found, label_offset: int) -> list[str] | None:
    if labels is not None and num_labels is not None:
        raise CannotImport("give labels or a number of labels, not both")
    if isinstance(labels, str):
        try:
            return parse_labels(labels)
        except ModelLoadError as exc:
            raise CannotImport(str(exc)) from None
    if labels is not None:
        labels = [str(label).strip() for label in labels]
        if not labels or any(not label for label in labels) or len(set(labels)) != len(labels):
            raise CannotImport("labels must be distinct and not empty")
        return labels
    if num_labels is None:
        width = found.output.shape[-1] if found.output and found.output.shape else None
        if width is None:
            return None
        num_labels = width - label_offset
    if num_labels < 1:
        raise CannotImport(f"the number of labels must be at least 1, got {num_labels}")
    return [f"class_{i}" for i in range(num_labels)]


# -- the spec -------------------------------------------------------------------------------------
def decide_spec(found: Found, preset_name: str | None, settings: dict, input_size=None
                ) -> tuple[Preprocessing, tuple[int, int], list[str]]:
    """(spec, (height, width), assumptions) from the preset, the explicit ``settings`` and
    what the model shows (see the module docstring). The spec's ``output`` here is the
    preset's or the setting's; :func:`import_model` tests the outputs when not given."""
    assumed: list[str] = []
    try:
        spec = preset(preset_name) if preset_name else TFHUB
    except SpecError as exc:
        raise CannotImport(str(exc)) from None
    if found.input.dtype == "string":
        return _encoded_spec(spec, settings, input_size, assumed)
    if not preset_name:
        assumed.append("no preset given: the pixels go in as they are (tfhub: RGB in [0, 1], "
                       "stretched to the input size); pass --preset for another convention")
    shape = found.input.shape
    # layout: given, else where the model's 3 channels are, else the preset's
    layout = settings.get("layout")
    if layout is None and shape is not None:
        at1, at3 = shape[1] == 3, shape[3] == 3
        if at1 != at3:
            layout = "NCHW" if at1 else "NHWC"
            if layout != spec.layout and preset_name:
                assumed.append(f"the preset {preset_name} says {spec.layout} but the input "
                               f"[{_dims(shape)}] has its channels at position "
                               f"{1 if at1 else 3}: {layout}")
        else:
            assumed.append(f"the input [{_dims(shape)}] does not show where its channels are: "
                           f"{spec.layout} ({'the preset' if preset_name else 'the default'})")
    if layout is not None:
        spec = _replace(spec, layout=layout)
    size = _input_size(found, spec.layout, input_size, assumed)
    # dtype: given, else uint8 for a plain uint8 input (a quantised one takes floats)
    if "dtype" not in settings:
        dtype = found.input.dtype
        if dtype == "uint8" and not found.input_quantised:
            if (spec.mean, spec.std) != ((0.0,) * 3, (1.0,) * 3):
                assumed.append(f"the input is uint8 pixels: the {spec.preset} preset's mean "
                               f"and std are left to the model")
            spec = _replace(spec, dtype="uint8", mean=(0.0,) * 3, std=(1.0,) * 3)
        elif found.input_quantised:
            q = found.quantisation["input"]
            assumed.append(f"the input is quantised {q['dtype']} (scale {q['scale']:.6g}, zero "
                           f"point {q['zero_point']}): the runtime quantises the float pixels "
                           f"the preprocessing makes")
    extra = {k: v for k, v in settings.items() if k != "layout"}
    if extra.get("dtype") == "uint8" and not {"mean", "std"} & set(extra):
        extra.update(mean=(0.0,) * 3, std=(1.0,) * 3)
    return _replace(spec, **extra), size, assumed


#: The settings that still apply to a model that decodes its images itself.
ENCODED_SETTINGS = ("output", "label_offset", "decode")


def _encoded_spec(spec: Preprocessing, settings: dict, input_size, assumed: list[str]
                  ) -> tuple[Preprocessing, tuple[int, int], list[str]]:
    """A model that takes encoded images: ``dtype: string``, no pixel settings (refused when
    given); the preset keeps only its outputs' kind and label offset."""
    pixel = sorted(k for k in settings if k not in ENCODED_SETTINGS
                   and not (k == "dtype" and settings[k] == "string"))
    if pixel:
        raise CannotImport(f"the model takes encoded images and decodes them itself: "
                           f"{', '.join(pixel)} do(es) not apply")
    spec = _replace(TFHUB, dtype="string", output=spec.output, label_offset=spec.label_offset,
                    preset=spec.preset, **{k: settings[k] for k in ENCODED_SETTINGS
                                           if k in settings})
    assumed.append("the model takes encoded images (a string input) and decodes them in its "
                   "graph: the service checks each image with its own decoder, then feeds the "
                   "original JPEG/PNG/GIF/BMP bytes (another format as a PNG)")
    if input_size is None:
        size = (DEFAULT_SIDE, DEFAULT_SIDE)
        assumed.append(f"the model resizes its images itself: input_size {DEFAULT_SIDE}x"
                       f"{DEFAULT_SIDE} only sizes the warm-up's grey pictures")
    else:
        try:
            size = infer_size(input_size)
        except (ModelLoadError, TypeError, ValueError):
            raise CannotImport(f"input size must be one or two positive numbers, got "
                               f"{input_size!r}") from None
    return spec, size, assumed


def _replace(spec: Preprocessing, **changes) -> Preprocessing:
    try:
        return replace(spec, **changes)
    except (SpecError, TypeError) as exc:
        raise CannotImport(f"preprocessing: {exc}") from None


def _input_size(found: Found, layout: str, input_size, assumed: list[str]) -> tuple[int, int]:
    shape = found.input.shape
    fixed = None
    if shape is not None:
        h, w = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
        fixed = (h, w) if h is not None and w is not None else None
    wanted = None
    if input_size is not None:
        try:
            wanted = infer_size(input_size)
        except (ModelLoadError, TypeError, ValueError):
            raise CannotImport(f"input size must be one or two positive numbers, got "
                               f"{input_size!r}") from None
    if fixed and wanted and fixed != wanted:
        raise CannotImport(f"the model's input is fixed at {fixed[0]}x{fixed[1]} but the input "
                           f"size given is {wanted[0]}x{wanted[1]}")
    if fixed or wanted:
        return fixed or wanted
    assumed.append(f"the input size is not fixed by the model nor given: "
                   f"{DEFAULT_SIDE}x{DEFAULT_SIDE}")
    return DEFAULT_SIDE, DEFAULT_SIDE


# -- the folder -----------------------------------------------------------------------------------
def _write_folder(staging: str, source: str, found: Found, labels: list[str], name: str,
                  version: int) -> dict:
    """Copy the model's files and write labels.txt; returns model.json (not yet written)."""
    folder = ModelFolder(staging)
    record = {"source": os.path.basename(source.rstrip(os.sep)),
              "tool": "scripts/import_model.py"}
    meta: dict = {"name": name, "version": str(version), "format": found.format}
    if found.format in MODEL_FILES:
        shutil.copyfile(source, folder.file(MODEL_FILES[found.format]))
        record["sha256"] = file_sha256(source)
        record["bytes"] = os.path.getsize(source)
        if found.external_data:
            where = os.path.dirname(source)
            record["external_data"] = []
            for rel in found.external_data:
                os.makedirs(os.path.dirname(os.path.join(staging, rel)) or staging,
                            exist_ok=True)
                shutil.copyfile(os.path.join(where, rel), os.path.join(staging, rel))
                record["external_data"].append({"file": rel, "sha256": file_sha256(
                    os.path.join(where, rel))})
            meta["external_data"] = list(found.external_data)
    elif found.format == "saved_model":
        for part in SAVED_MODEL_PARTS:
            path = os.path.join(source, part)
            if os.path.isdir(path):
                shutil.copytree(path, os.path.join(staging, part))
            elif os.path.isfile(path):
                shutil.copyfile(path, os.path.join(staging, part))
        record["sha256"] = file_sha256(os.path.join(source, "saved_model.pb"))
        record["sha256_of"] = "saved_model.pb"
        meta["signature"] = {"name": found.signature, "input": found.input.name,
                             "output": found.output.name}
    else:  # frozen graph
        shutil.copyfile(source, os.path.join(staging, ModelFolder.LEGACY_GRAPH))
        record["sha256"] = file_sha256(source)
        meta["signature"] = {"input": found.input.name, "output": found.output.name}
    folder.write_labels(labels)
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["import"] = record
    return meta


def _write_meta(staging: str, meta: dict, spec: Preprocessing, found: Found,
                assumed: list[str]) -> None:
    """model.json: identity, format, input_size, preprocessing, labels, the runtime's file
    details, created, then the import record."""
    meta["preprocessing"] = spec.as_dict()
    meta["labels"] = len(ModelFolder(staging).read_labels())
    meta["import"].update(found=found.as_dict(), assumed=list(assumed))
    order = ("name", "version", "format", "input_size", "preprocessing", "labels", "signature",
             "external_data", "created", "import")
    ordered = {k: meta[k] for k in order if k in meta}
    meta.clear()
    meta.update(ordered)
    ModelFolder(staging).write_metadata(meta)


def _load(staging: str):
    from common.inference.loader import RuntimeOptions, load_classifier

    try:
        clf = load_classifier(ModelFolder.in_directory(staging), RuntimeOptions(runtime="auto"))
        clf.warm_up()
    except ModelLoadError as exc:
        raise CannotImport(f"the imported folder does not load: "
                           f"{str(exc).replace(staging, '<folder>')}") from None
    except Exception as exc:  # the runtime refused the batch (a shape the graph rejects)
        raise CannotImport(f"the model failed on a batch its preprocessing makes: "
                           f"{_first_line(exc)}") from None
    return clf


def _stage_and_check(staging: str, meta: dict, spec: Preprocessing, found: Found,
                     assumed: list[str], output_given: bool, declared: str | None):
    """Write model.json and load the folder; unless the output kind was given, run generated
    images through it and decide probabilities or logits (written back and loaded again
    when that changes the spec). Returns (classifier, spec)."""
    _write_meta(staging, meta, spec, found, assumed)
    clf = _load(staging)
    if output_given:
        return clf, spec
    kind, sentence = output_kind(_raw_outputs(clf), found, declared)
    assumed.append(sentence)
    changed = kind != spec.output
    spec = _replace(spec, output=kind)
    _write_meta(staging, meta, spec, found, assumed)
    return (_load(staging) if changed else clf), spec


def _raw_outputs(clf) -> np.ndarray:
    """The model's own outputs float32 ``[n, outputs]`` for the generated images."""
    try:
        batch = np.stack([clf.preprocess(data)[0] for data in generated_images()])
        return np.asarray(clf.predict_fn(batch), np.float64)
    except Exception as exc:
        raise CannotImport(f"the model failed on generated images: "
                           f"{_first_line(exc)}") from None


def output_kind(raw: np.ndarray, found: Found, declared: str | None = None
                ) -> tuple[str, str]:
    """``probabilities`` when every row of ``raw`` (the model's outputs ``[n, k]`` for
    generated images) lies in [0, 1] and sums to 1 (within a quantised output's step), else
    ``logits``; with the sentence model.json records (naming ``declared``, the preset's
    kind, when it differs)."""
    quantised = found.quantisation.get("output")
    tolerance = 1e-3 + (quantised["scale"] * raw.shape[1] / 2 if quantised else 0.0)
    low, high = float(raw.min()), float(raw.max())
    sums = raw.sum(axis=1)
    in_range = low >= -1e-3 and high <= 1 + 1e-3
    sum_one = bool(np.all(np.abs(sums - 1.0) <= tolerance))
    n, kind = len(raw), "probabilities" if in_range and sum_one else "logits"
    note = f" (the preset says {declared})" if declared not in (None, kind) else ""
    if kind == "probabilities":
        return kind, (f"the outputs are probabilities: on {n} generated images every row "
                      f"lies in [0, 1] and sums to 1; served as they are{note}")
    hint = ("; if they are independent (multi-label) scores, pass --output probabilities"
            if in_range else "; pass --output sigmoid for independent (multi-label) logits")
    return "logits", (f"the outputs are logits: on {n} generated images they range "
                      f"{low:.3g}..{high:.3g} and rows sum to {float(sums.min()):.3g}.."
                      f"{float(sums.max()):.3g}; softmax applied{note}{hint}")


def _answer(clf) -> dict:
    """The check: one generated image through preprocess and predict -> one score per label."""
    data = generated_images(1, seed=7)[0]
    try:
        x, _ = clf.preprocess(data)
        scores = clf.predict(x[None])
        if clf.spec.encoded:  # the model's own decoder must read JPEG too
            jpeg, _ = clf.preprocess(generated_images(1, seed=7, fmt="JPEG")[0])
            clf.predict(jpeg[None])
    except Exception as exc:
        raise CannotImport(f"the imported model failed on a generated image: "
                           f"{_first_line(exc)}") from None
    if scores.shape != (1, clf.num_labels) or not np.all(np.isfinite(scores)):
        raise CannotImport(f"the imported model answered {list(scores.shape)} scores (or "
                           f"non-finite ones) for {clf.num_labels} labels")
    top = clf.rank(scores[0], top_k=1)[0]
    return {"image": "generated 64x48 PNG", "scores": int(scores.shape[1]),
            "top": {"label": top.label, "score": round(top.score, 6)}}


def _publish_version(staging: str, model_dir: str, version: int, meta: dict):
    """Publish as ``model_dir``/<version>, moving to the next free number (model.json's
    version rewritten) when another publisher took it first."""
    from common.versions.source import next_version

    for _ in range(PUBLISH_TRIES):
        target = os.path.join(model_dir, str(version))
        try:
            return publish(staging, target), version
        except FileExistsError:
            version = max(version + 1, next_version(model_dir))
            meta["version"] = str(version)
            ModelFolder(staging).write_metadata(meta)
    raise CannotImport(f"could not find a free version number in {model_dir}")


# -- generated images -----------------------------------------------------------------------------
def generated_images(count: int = CHECK_IMAGES, seed: int = 0, fmt: str = "PNG"
                     ) -> list[bytes]:
    """``count`` PNG (or ``fmt``) pictures, 64x48 (not square, so a crop and a letterbox
    differ from a stretch): colour gradients with a few filled shapes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, 64)[None, :, None]
        row = a[None, None, :] * (1 - t) + b[None, None, :] * t
        picture = Image.fromarray(np.repeat(row, 48, axis=0).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(picture)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, 40, 2))
            draw.rectangle((x0, y0, x0 + int(rng.integers(6, 24)), y0 + int(rng.integers(6, 24))),
                           fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        picture.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _dims(shape) -> str:
    return ", ".join("?" if d is None else str(d) for d in shape)


def _numbers(values) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
