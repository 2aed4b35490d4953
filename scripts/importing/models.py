"""What a model file from elsewhere holds, read without running it: the inspection half of
``scripts/import_model.py``.

:func:`inspect_model` reads an ONNX file (``onnx``, its weights left on disk), a ``.tflite``
(LiteRT's interpreter), a Keras ``.keras`` / ``.h5``, a SavedModel folder or a frozen ``.pb``
(TensorFlow, imported only for these three) and returns a :class:`Found`: its inputs and outputs
(names, shapes with None for a dimension not fixed, dtypes), the one input and output the
service would use, the fixed batch size, the ONNX opset, a TFLite model's quantisation, an
ONNX model's external data files. What the service cannot serve at all (a string input, a
missing external data file) raises :class:`CannotImport` here; the checks that depend on the
preprocessing (an image-like input, one score per label) are the importer's.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

#: What the importer accepts, by how the path ends (a folder with saved_model.pb: a SavedModel).
SUFFIXES = {".onnx": "onnx", ".tflite": "tflite", ".keras": "keras", ".h5": "h5",
            ".hdf5": "h5", ".pb": "frozen_graph"}
#: Formats inspected and run without TensorFlow.
WITHOUT_TENSORFLOW = ("onnx", "tflite")
#: SavedModel files and folders an import copies (the rest of a folder is not the model's).
SAVED_MODEL_PARTS = ("saved_model.pb", "variables", "assets", "assets.extra", "fingerprint.pb")


class CannotImport(ValueError):
    """The model cannot be served as an image classifier; the message is one sentence saying
    why (and, where there is one, what to do)."""


@dataclass
class Tensor:
    """One input or output: ``shape`` with None where a dimension is not fixed (None: rank
    unknown), ``dtype`` numpy's name (``string`` for text)."""

    name: str
    shape: list | None
    dtype: str

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join(
            "N" if i == 0 and d is None else "?" if d is None else str(d)
            for i, d in enumerate(self.shape))
        return f"{self.name} {self.dtype} [{dims}]"


@dataclass
class Found:
    """What :func:`inspect_model` found (model.json ``import.found`` is :meth:`as_dict`).

    ``input`` / ``output``: the tensors the service feeds and reads (for ONNX the output named
    ``probabilities``, else the first, as ONNX Runtime's loader picks; for TFLite the first).
    ``fixed_batch``: the batch the input fixes (1 for many exports), None when dynamic.
    ``quantisation``: TFLite only: ``{"input"|"output": {"dtype", "scale", "zero_point"}}`` of a
    quantised input or output. ``external_data``: an ONNX model's weight files, relative to
    the model file. ``signature``: a SavedModel's signature name.
    """

    format: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    input: Tensor | None = None
    output: Tensor | None = None
    fixed_batch: int | None = None
    opset: int | None = None
    quantisation: dict = field(default_factory=dict)
    external_data: list[str] = field(default_factory=list)
    signature: str | None = None
    producer: str | None = None

    def as_dict(self) -> dict:
        out = {"format": self.format,
               "inputs": [asdict(t) for t in self.inputs],
               "outputs": [asdict(t) for t in self.outputs],
               "input": self.input.name if self.input else None,
               "output": self.output.name if self.output else None,
               "fixed_batch": self.fixed_batch}
        for key in ("opset", "signature", "producer"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.quantisation:
            out["quantisation"] = self.quantisation
        if self.external_data:
            out["external_data"] = list(self.external_data)
        return out

    @property
    def input_quantised(self) -> bool:
        return "input" in self.quantisation


def model_format(source: str) -> str:
    """``onnx``, ``tflite``, ``keras``, ``h5``, ``saved_model`` or ``frozen_graph``, by the
    path; CannotImport for anything else."""
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "saved_model.pb")):
            return "saved_model"
        raise CannotImport(f"{source} is a folder without saved_model.pb: give a SavedModel "
                           f"folder or a model file (.onnx, .tflite, .keras, .h5, .pb)")
    if not os.path.isfile(source):
        raise CannotImport(f"{source} does not exist")
    if os.path.basename(source) == "saved_model.pb":
        return "saved_model"
    kind = SUFFIXES.get(os.path.splitext(source)[1].lower())
    if kind is None:
        raise CannotImport(f"cannot tell what {os.path.basename(source)} is: give an .onnx, "
                           f".tflite, .keras, .h5 or frozen .pb file, or a SavedModel folder")
    return kind


def inspect_model(source: str, *, signature: str | None = None, input_name: str | None = None,
                  output_name: str | None = None) -> Found:
    """Read ``source``'s inputs and outputs (see the module docstring); ``signature``,
    ``input_name``, ``output_name`` choose among a SavedModel's signatures and a SavedModel's
    or frozen graph's tensors."""
    kind = model_format(source)
    if kind == "saved_model" and os.path.isfile(source):
        source = os.path.dirname(source) or "."
    if kind == "onnx":
        found = _inspect_onnx(source)
    elif kind == "tflite":
        found = _inspect_tflite(source)
    elif kind in ("keras", "h5"):
        found = _inspect_keras(source, kind)
    elif kind == "saved_model":
        found = _inspect_saved_model(source, signature, input_name, output_name)
    else:
        found = _inspect_frozen_graph(source, input_name, output_name)
    if found.input is None and len(found.inputs) == 1:
        found.input = found.inputs[0]
    if kind in ("onnx", "tflite", "keras", "h5"):
        _check_names(found, signature, input_name, output_name)
    if found.input is not None and found.fixed_batch is None and found.input.shape:
        first = found.input.shape[0]
        found.fixed_batch = first if isinstance(first, int) else None
    return found


def _check_names(found: Found, signature, input_name, output_name) -> None:
    """An ONNX, TFLite or Keras model is run through its one input and the output its runtime
    picks: names given that are not those are refused (they choose nothing)."""
    if signature:
        raise CannotImport("a signature applies to SavedModels only")
    for given, chosen, what in ((input_name, found.input, "input"),
                                (output_name, found.output, "output")):
        if given and (chosen is None or chosen.name != given):
            used = f"its {what} {chosen.name!r}" if chosen is not None else f"one {what}"
            raise CannotImport(f"{what} names choose tensors of SavedModels and frozen graphs; "
                               f"the {found.format} runtime reads {used}, not {given!r}")


# -- ONNX (no TensorFlow) -----------------------------------------------------------------------
def _onnx_tensor(value) -> Tensor:
    from onnx import helper

    kind = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(kind.elem_type)).name
    except (KeyError, TypeError, ValueError):
        dtype = f"onnx type {kind.elem_type}"
    if dtype == "object":
        dtype = "string"
    shape = None
    if kind.HasField("shape"):
        shape = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in kind.shape.dim]
    return Tensor(value.name, shape, dtype)


def _onnx_tensors(graph):
    """Every TensorProto of a graph: initializers, constants in attributes, subgraphs'."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from _onnx_tensors(sub)


def onnx_external_files(model, where: str) -> list[str]:
    """The external data files ``model``'s tensors name (their ``location``, relative to the
    model file's folder ``where``), in first-use order; CannotImport when one is missing or
    would lie outside that folder."""
    from onnx.external_data_helper import uses_external_data

    files = []
    for tensor in _onnx_tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        normal = os.path.normpath(location)
        if (not location or os.path.isabs(location) or normal.startswith("..")
                or normal.startswith(os.sep)):
            raise CannotImport(f"weight {tensor.name} names the external data file "
                               f"{location!r}, which is not a file beside the model")
        if not os.path.isfile(os.path.join(where, normal)):
            raise CannotImport(f"the model keeps its weights in {location}, which is not "
                               f"beside it in {where or '.'}")
        if normal not in files:
            files.append(normal)
    return files


def _inspect_onnx(path: str) -> Found:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # a damaged protobuf
        raise CannotImport(f"cannot read {os.path.basename(path)} as ONNX: {exc}") from None
    initialised = {t.name for t in model.graph.initializer}
    inputs = [_onnx_tensor(v) for v in model.graph.input if v.name not in initialised]
    outputs = [_onnx_tensor(v) for v in model.graph.output]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    output = next((o for o in outputs if o.name == "probabilities"),
                  outputs[0] if outputs else None)
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p) or None
    return Found("onnx", inputs, outputs, output=output, opset=opset, producer=producer,
                 external_data=onnx_external_files(model, os.path.dirname(path)))


# -- TFLite (LiteRT, no TensorFlow) --------------------------------------------------------------
def _inspect_tflite(path: str) -> Found:
    from common.inference.runtimes import litert
    from common.modelfolder import ModelLoadError

    try:
        interp = litert.interpreter(path)
    except ModelLoadError as exc:
        raise CannotImport(str(exc)) from None
    quantisation, tensors = {}, {}
    for side, details in (("input", interp.get_input_details()),
                          ("output", interp.get_output_details())):
        tensors[side] = []
        for i, d in enumerate(details):
            dims = d.get("shape_signature", d["shape"])
            dtype = np.dtype(d["dtype"]).name
            tensors[side].append(Tensor(str(d["name"]), [int(v) if v > 0 else None
                                                         for v in dims], dtype))
            scale, zero = d.get("quantization", (0.0, 0))
            if i == 0 and scale > 0 and np.dtype(d["dtype"]).kind in "iu":
                quantisation[side] = {"dtype": dtype, "scale": float(scale),
                                      "zero_point": int(zero)}
    outputs = tensors["output"]
    return Found("tflite", tensors["input"], outputs, output=outputs[0] if outputs else None,
                 quantisation=quantisation)


# -- TensorFlow formats ---------------------------------------------------------------------------
def _tf_tensor(name: str, spec) -> Tensor:
    shape = None if spec.shape.rank is None else [
        int(d) if d is not None else None for d in spec.shape.as_list()]
    dtype = spec.dtype.name if spec.dtype.name != "string" else "string"
    return Tensor(name, shape, dtype)


def _inspect_keras(path: str, kind: str) -> Found:
    try:
        import keras
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # custom layers not registered, a damaged file...
        raise CannotImport(f"cannot load {os.path.basename(path)} with Keras "
                           f"{_version('keras')}: {_first_line(exc)}") from None

    def tensor(t) -> Tensor:
        return Tensor(str(t.name), [int(d) if d is not None else None for d in t.shape],
                      str(t.dtype).replace("tf.", ""))

    outputs = [tensor(t) for t in model.outputs]
    if len(outputs) != 1:
        raise CannotImport(f"the Keras model gives {len(outputs)} outputs "
                           f"({', '.join(t.name for t in outputs)}); the service reads one "
                           f"tensor of scores")
    return Found(kind, [tensor(t) for t in model.inputs], outputs, output=outputs[0],
                 producer=f"keras {_version('keras')}")


def _inspect_saved_model(folder: str, signature: str | None, input_name: str | None,
                         output_name: str | None) -> Found:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(folder)
    except Exception as exc:
        raise CannotImport(f"cannot load the SavedModel {folder}: {_first_line(exc)}") from None
    names = sorted(loaded.signatures)
    if signature is None:
        if "serving_default" in loaded.signatures or len(names) != 1:
            signature = "serving_default"
        else:
            signature = names[0]
    fn = loaded.signatures.get(signature)
    if fn is None:
        raise CannotImport(f"the SavedModel has no signature {signature!r} (it has "
                           f"{', '.join(names) or 'none'}): pass --signature")
    inputs = [_tf_tensor(n, s) for n, s in sorted(fn.structured_input_signature[1].items())]
    outputs = [_tf_tensor(n, s) for n, s in sorted(fn.structured_outputs.items())]
    found = Found("saved_model", inputs, outputs, signature=signature)
    found.input = _choose(inputs, input_name, "input", signature)
    by_name = {t.name: t for t in outputs}
    if output_name is None and "probabilities" in by_name:
        output_name = "probabilities"
    if output_name is None:
        scores = [t for t in outputs if t.shape is not None and len(t.shape) == 2
                  and t.dtype.startswith("float")]
        found.output = scores[0] if len(scores) == 1 else (outputs[0] if len(outputs) == 1
                                                           else None)
        if found.output is None:
            raise CannotImport(f"signature {signature} has several outputs "
                               f"({', '.join(by_name)}): pass --output_name")
    else:
        found.output = _choose(outputs, output_name, "output", signature)
    return found


def _choose(tensors: list[Tensor], name: str | None, what: str, where: str) -> Tensor | None:
    if name is None:
        return tensors[0] if len(tensors) == 1 else None
    for t in tensors:
        if t.name == name:
            return t
    raise CannotImport(f"{where} has no {what} {name!r} (it has "
                       f"{', '.join(t.name for t in tensors) or 'none'})")


def _inspect_frozen_graph(path: str, input_name: str | None,
                          output_name: str | None) -> Found:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as fh:
            graph_def.ParseFromString(fh.read())
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
    except Exception as exc:
        raise CannotImport(f"cannot read {os.path.basename(path)} as a frozen graph: "
                           f"{_first_line(exc)}") from None
    ops = graph.get_operations()
    placeholders = [op for op in ops if op.type == "Placeholder"]
    consumed = {t.op.name for op in ops for t in op.inputs}
    sinks = [op for op in ops if op.name not in consumed and op.outputs
             and op.type not in ("Const", "Placeholder", "NoOp")]

    def tensor(op_or_name) -> Tensor:
        name = op_or_name if isinstance(op_or_name, str) else op_or_name.name
        try:
            t = graph.get_tensor_by_name(name if ":" in name else f"{name}:0")
        except (KeyError, ValueError):
            raise CannotImport(f"the graph has no tensor {name!r}") from None
        shape = None if t.shape.rank is None else [
            int(d) if d is not None else None for d in t.shape.as_list()]
        return Tensor(name, shape, t.dtype.name)

    inputs = [tensor(op) for op in placeholders]
    outputs = [tensor(op) for op in sinks]
    found = Found("frozen_graph", inputs, outputs, producer=f"tensorflow {tf.__version__}")
    found.input = tensor(input_name) if input_name else None
    if output_name:
        found.output = tensor(output_name)
    elif len(outputs) == 1:
        found.output = outputs[0]
    else:
        raise CannotImport(f"cannot tell the graph's output among "
                           f"{', '.join(t.name for t in outputs) or 'no candidates'}: "
                           f"pass --output_name")
    return found


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"
