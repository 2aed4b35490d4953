"""The one reader and writer of a model folder. No TensorFlow and no web framework here.

A model folder (DESIGN.md) holds

* ``saved_model.pb`` + ``variables/``: a SavedModel whose ``serving_default`` takes ``images``
  float32 ``[batch, h, w, 3]`` in ``[0, 1]`` and returns ``probabilities`` ``[batch, labels]``
  (or logits, declared as ``"outputs": "logits"`` in model.json);
* ``labels.txt``: one label per output, in output order;
* ``model.json``: ``name``, ``version``, ``input_size``, ``created``, ``base_module``,
  ``metrics``, the training record;
* optionally ``report.json`` (the evaluation) and ``confusion_matrix.png``;
* optionally exports of the same model for other runtimes (``scripts/export.py``):
  ``model.onnx`` (ONNX Runtime, in the server or the browser) and ``model*.tflite`` (LiteRT,
  phones), each with its record under ``exports`` in model.json (file, size, sha256, how it was
  verified against TensorFlow, and reference outputs the loaders check).

A legacy TF1 frozen graph (``retrained_graph.pb``, ``Placeholder`` -> ``final_result``, with a
labels file) is a model folder too, with the graph's own settings in :class:`LegacyGraph`.

Everything that knows these file names, the label rules, the label-count check and the input-size
rule lives here; retrain.py writes through it and the server, label_image.py and the page's
routes read through it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass

SAVED_MODEL = "saved_model.pb"
LABELS = "labels.txt"
MODEL_JSON = "model.json"
REPORT_JSON = "report.json"
BUILD_JSON = "build.json"  # how the bundled demo was built (scripts/build_demo.py)
CONFUSION_MATRIX = "confusion_matrix.png"
LEGACY_LABELS = "retrained_labels.txt"  # looked for beside a frozen graph
ONNX = "model.onnx"
TFLITE = "model.tflite"
#: Export key (model.json ``exports``) -> its file in the folder.
EXPORT_FILES = {
    "onnx": ONNX,
    "tflite": TFLITE,  # float32
    "tflite-float16": "model.float16.tflite",
    "tflite-dynamic": "model.dynamic.tflite",  # int8 weights, float activations
    "tflite-int8": "model.int8.tflite",  # int8 weights and activations (calibrated)
}
#: An imported model's own file (``scripts/import_model.py``), by model.json ``format``;
#: ``saved_model`` and ``frozen_graph`` folders keep SAVED_MODEL and ``retrained_graph.pb``.
MODEL_FILES = {"onnx": ONNX, "tflite": TFLITE, "keras": "model.keras", "h5": "model.h5"}
#: Files of the folder that the HTTP routes may hand out, by name (never a name from a URL).
PUBLIC_FILES = {CONFUSION_MATRIX: "image/png", ONNX: "application/octet-stream"}
#: Input side of a legacy graph whose input shape is not fixed and not configured (Inception v3).
DEFAULT_LEGACY_INPUT_SIDE = 299


class ModelLoadError(RuntimeError):
    """A model folder cannot be served: missing, damaged, or its parts disagree."""


@dataclass(frozen=True)
class LegacyGraph:
    """How to call a TF1 frozen graph: tensor names and the value range it was trained on.

    The service's ``[0, 1]`` pixels ``x`` reach the graph as ``(x * 255 - input_mean) /
    input_std``; the defaults give ``[0, 1]`` back, as the TF Hub based retrain.py trained them
    (Inception's original graph used mean 128, std 128).
    """

    input_layer: str = "Placeholder"
    output_layer: str = "final_result"
    input_mean: float = 0.0
    input_std: float = 255.0
    input_size: tuple[int, int] | None = None  # (height, width) when the graph does not fix it


class ModelFolder:
    """One model folder on disk, or one legacy ``.pb`` file with its labels file.

    Args:
        path: the folder, or a ``.pb`` frozen graph.
        labels_path: a labels file to use instead of the folder's own.
        legacy: tensor names and scaling of a frozen graph (ignored for a SavedModel).
    """

    def __init__(self, path: str, *, labels_path: str | None = None,
                 legacy: LegacyGraph | None = None):
        self.path = path
        self._labels_path = labels_path
        self.legacy = legacy or LegacyGraph()

    def __repr__(self) -> str:
        return f"ModelFolder({self.path!r})"

    LEGACY_GRAPH = "retrained_graph.pb"  # a frozen graph's name in a repository's version folder

    @staticmethod
    def holds_model(directory: str) -> bool:
        """Whether ``directory`` is a model folder: a SavedModel, a legacy frozen graph, or a
        model imported from elsewhere (ONNX, TFLite, Keras)."""
        return any(os.path.isfile(os.path.join(directory, name))
                   for name in (SAVED_MODEL, ModelFolder.LEGACY_GRAPH, *MODEL_FILES.values()))

    @classmethod
    def in_directory(cls, directory: str, legacy: LegacyGraph | None = None) -> "ModelFolder":
        """The model a repository's version folder holds: its SavedModel, or else its
        ``retrained_graph.pb`` with the labels file beside it."""
        graph = os.path.join(directory, cls.LEGACY_GRAPH)
        if not os.path.isfile(os.path.join(directory, SAVED_MODEL)) and os.path.isfile(graph):
            return cls(graph, legacy=legacy)
        return cls(directory, legacy=legacy)

    # -- what kind of folder ------------------------------------------------------------------
    @property
    def is_frozen_graph(self) -> bool:
        return self.path.endswith(".pb") and not os.path.isdir(self.path)

    @property
    def folder(self) -> str | None:
        """The directory holding the model's files (None for a bare frozen graph)."""
        return None if self.is_frozen_graph else self.path

    def file(self, name: str) -> str:
        """Path of one of the folder's own files (``name`` is one of this module's constants)."""
        if self.folder is None:
            raise ModelLoadError(f"{self.path} is a frozen graph, not a model folder")
        return os.path.join(self.folder, name)

    def check_exists(self) -> None:
        """Raise ModelLoadError unless the path is a model folder (a SavedModel, or an imported
        model's file) or a ``.pb`` file."""
        if not os.path.exists(self.path):
            raise ModelLoadError(f"model not found: {self.path}")
        if self.is_frozen_graph:
            return
        if not os.path.isdir(self.path):
            raise ModelLoadError(f"{self.path} is neither a model folder nor a .pb frozen graph")
        if self.format is None:
            raise ModelLoadError(f"{self.path} has no {SAVED_MODEL} (nor an imported model: "
                                 f"{', '.join(MODEL_FILES.values())} with its model.json; "
                                 f"scripts/import_model.py writes one)")

    @property
    def format(self) -> str | None:
        """What the folder's model is: ``frozen_graph`` (a ``.pb`` path), ``saved_model``, or an
        imported model's ``onnx`` / ``tflite`` / ``keras`` / ``h5`` (model.json ``format``,
        its file present); None when it holds none of these."""
        if self.is_frozen_graph:
            return "frozen_graph"
        if os.path.isfile(self.file(SAVED_MODEL)):
            return "saved_model"
        declared = self.read_metadata().get("format")
        if declared in MODEL_FILES and os.path.isfile(self.file(MODEL_FILES[declared])):
            return declared
        return None

    def model_file(self) -> str:
        """The path of an imported model's own file (``MODEL_FILES``)."""
        return self.file(MODEL_FILES[self.format])

    def external_data(self) -> list[str]:
        """The files an imported ONNX model keeps its weights in, beside ``model.onnx``
        (model.json ``external_data``, written by import_model.py)."""
        files = self.read_metadata().get("external_data") or []
        return [str(f) for f in files] if isinstance(files, list) else []

    def preprocessing(self, meta: dict):
        """The model's preprocessing spec (model.json ``preprocessing``; none: ours, ``tfhub``,
        with model.json's older ``"outputs": "logits"`` honoured); ModelLoadError when it
        cannot be applied."""
        from common.inference.preprocessing import Preprocessing, SpecError

        outputs = meta.get("outputs")
        if outputs is not None and outputs not in ("probabilities", "logits"):
            raise ModelLoadError(f"{self.path}: model.json outputs must be probabilities or "
                                 f"logits, got {outputs!r}")
        try:
            return Preprocessing.from_dict(meta.get("preprocessing"), outputs=outputs)
        except (SpecError, TypeError) as exc:
            raise ModelLoadError(f"{self.path}: model.json preprocessing: {exc}") from None

    # -- labels -------------------------------------------------------------------------------
    @property
    def labels_path(self) -> str:
        if self._labels_path:
            return self._labels_path
        if not self.is_frozen_graph:
            return self.file(LABELS)
        for name in (LEGACY_LABELS, LABELS):  # an imported graph's folder has labels.txt
            beside = os.path.join(os.path.dirname(self.path), name)
            if os.path.exists(beside):
                return beside
        raise ModelLoadError(f"{self.path} is a frozen graph: set LABELS_PATH to its labels file")

    def read_labels(self) -> list[str]:
        """One label per line; blank lines at the end are ignored, blank lines inside, duplicate
        labels or an empty file are errors."""
        return parse_labels(self.labels_path)

    def write_labels(self, labels: list[str]) -> None:
        _write_text(self.file(LABELS), "\n".join(labels) + "\n")

    @staticmethod
    def check_label_count(outputs: int | None, labels: list[str], where: str,
                          label_offset: int = 0) -> None:
        """The one label-count check: a model's output width, less ``label_offset`` leading
        outputs (a background class), must equal the number of labels.

        ``outputs`` None means the model does not declare it (checked again at warm-up).
        """
        if outputs is not None and outputs - label_offset != len(labels):
            skipped = f" ({label_offset} skipped by label_offset)" if label_offset else ""
            raise ModelLoadError(f"{where}: the model outputs {outputs} scores per image"
                                 f"{skipped} but there are {len(labels)} labels")

    # -- model.json and the evaluation ----------------------------------------------------------
    def read_metadata(self) -> dict:
        """model.json as a dict ({} when absent, and for a frozen graph)."""
        if self.folder is None:  # an imported graph has its model.json beside it
            beside = os.path.join(os.path.dirname(self.path), MODEL_JSON)
            meta = _read_json_file(beside) if os.path.isfile(beside) else {}
            return {**(meta or {}), "format": "frozen_graph"}
        return self._read_json(MODEL_JSON) or {}

    def write_metadata(self, meta: dict) -> None:
        _write_text(self.file(MODEL_JSON), json.dumps(meta, indent=2))

    def read_report(self) -> dict | None:
        """report.json (the evaluation retrain.py wrote), or None when absent or unreadable."""
        if self.folder is None:
            return None
        try:
            return self._read_json(REPORT_JSON)
        except ModelLoadError:
            return None

    def write_report(self, report: dict) -> None:
        _write_text(self.file(REPORT_JSON), json.dumps(report, indent=2))

    def write_build_record(self, record: dict) -> None:
        """build.json: how a bundled model was built (steps, times, data seed)."""
        _write_text(self.file(BUILD_JSON), json.dumps(record, indent=2))

    def public_file(self, name: str) -> str | None:
        """Path of a file the routes may serve (``PUBLIC_FILES``), or None when there is none.
        A symlink is never served, wherever it points: what the routes hand out is the
        folder's own file."""
        if name not in PUBLIC_FILES or self.folder is None:
            return None
        path = self.file(name)
        return path if _regular_file(path) else None

    # -- exports for other runtimes (scripts/export.py) ------------------------------------------
    def export_record(self, key: str) -> dict | None:
        """model.json's record of the export ``key`` (an ``EXPORT_FILES`` key), or None."""
        return (self.read_metadata().get("exports") or {}).get(key)

    def verified_export(self, key: str) -> tuple[str, dict] | None:
        """``(path, record)`` of an export that passed its verification and whose file is the
        one verified (same SHA-256), else None."""
        record = self.export_record(key)
        if self.folder is None or not record or not record.get("verification", {}).get("passed"):
            return None
        path = self.file(EXPORT_FILES[key])
        if not os.path.isfile(path) or file_sha256(path) != record.get("sha256"):
            return None
        return path, record

    def write_export(self, key: str, data: bytes, record: dict) -> str:
        """Write an export's file (atomically) and its record into model.json; returns the
        path. ``record`` gains ``file``, ``bytes`` and ``sha256``."""
        path = self.file(EXPORT_FILES[key])
        tmp = path + ".part"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        meta = self.read_metadata()
        meta.setdefault("exports", {})[key] = {
            "file": EXPORT_FILES[key], "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **record}
        self.write_metadata(meta)
        return path

    def evaluation_summary(self) -> dict | None:
        """What the page and ``GET /model`` show of report.json, or None without one.

        ``extra_tests``: accuracy and size of the separate test sets report.json lists beside
        the test split (the demo's canvas drawings), ``[{"name", "description", "accuracy",
        "images"}]``. ``confusion_matrix``: ``{"labels", "rows_true_columns_predicted"}`` (the
        page draws it as a table), or None when report.json has none of that shape.
        """
        report = self.read_report()
        if report is None:
            return None
        extra = [{key: test.get(key) for key in ("name", "description", "accuracy", "images")}
                 for test in report.get("extra_tests") or [] if isinstance(test, dict)]
        return {"accuracy": report.get("accuracy"), "test_images": report.get("test_images"),
                "per_class": report.get("per_class", {}),
                "confusion_matrix_png": self.public_file(CONFUSION_MATRIX) is not None,
                "confusion_matrix": _confusion_matrix(report.get("confusion_matrix")),
                "extra_tests": extra}

    def _read_json(self, name: str) -> dict | None:
        path = self.file(name)
        if not os.path.exists(path):
            return None
        return _read_json_file(path)

    # -- identity -----------------------------------------------------------------------------
    def identity(self, meta: dict) -> tuple[str, int]:
        """(name, version): model.json's, else the folder's name (a frozen graph: the folder
        holding it); the version is model.json's when it is a whole number >= 1, else 1."""
        where = os.path.dirname(os.path.abspath(self.path)) if self.is_frozen_graph else self.path
        default = os.path.basename(os.path.normpath(where)) or "model"
        version = str(meta.get("version", "1"))
        return (str(meta.get("name") or default),
                int(version) if version.isascii() and version.isdigit() and int(version) > 0
                else 1)

    def input_size(self, meta: dict, static_shape: tuple | None) -> tuple[int, int]:
        """The one input-size rule: the configured size (legacy graphs), else model.json's
        ``input_size``, else the model's static ``(height, width)``, else (legacy graphs only)
        299 x 299. Raises ModelLoadError when a SavedModel's size cannot be told."""
        configured = self.legacy.input_size if self.is_frozen_graph else None
        size = configured or meta.get("input_size")
        if size is None and static_shape and None not in static_shape:
            size = static_shape
        if size is None and self.is_frozen_graph:
            size = (DEFAULT_LEGACY_INPUT_SIDE, DEFAULT_LEGACY_INPUT_SIDE)
        if size is None:
            raise ModelLoadError(f"{self.path}: input size unknown; put input_size in "
                                 f"{MODEL_JSON}")
        return infer_size(size)


def publish(staging: str, target: str, *, replace: bool = False) -> str:
    """The one publish rule: a finished model folder built at ``staging`` appears at ``target``
    in one rename, so a reader (a polling server) sees the whole folder or nothing, and a
    folder already at ``target`` is never written into.

    A folder already there is refused (FileExistsError): a repository's version may be live,
    so a new one gets a new number. ``replace`` (a plain output folder, not a repository
    version) moves it aside whole first and removes it once the new one is in place. Returns
    ``target``.
    """
    target = os.path.normpath(target)
    if os.path.exists(target):
        if not replace:
            raise FileExistsError(f"{target} exists; a published version is never overwritten")
        old = target + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, target)
    return target


def infer_size(size) -> tuple[int, int]:
    """``299``, ``[299, 299]`` or ``(h, w)`` -> ``(height, width)`` of positive ints."""
    if isinstance(size, (int, float)):
        size = (size, size)
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ModelLoadError(f"input size must be positive, got {size}")
    return height, width


_SHA256_CACHE: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks; remembered while its size and mtime stay."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


#: Largest confusion matrix ``GET /model`` passes on (labels): a bigger one stays a picture.
MAX_MATRIX_LABELS = 100


def _confusion_matrix(found) -> dict | None:
    """report.json's ``confusion_matrix`` when it is C labels (strings) and C x C counts
    (whole numbers >= 0), C <= MAX_MATRIX_LABELS; else None."""
    if not isinstance(found, dict):
        return None
    labels, rows = found.get("labels"), found.get("rows_true_columns_predicted")
    if not (isinstance(labels, list) and isinstance(rows, list)
            and 0 < len(labels) <= MAX_MATRIX_LABELS and len(rows) == len(labels)
            and all(isinstance(label, str) for label in labels)
            and all(isinstance(row, list) and len(row) == len(labels) for row in rows)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for row in rows for v in row)):
        return None
    return {"labels": labels, "rows_true_columns_predicted": rows}


def _read_json_file(path: str) -> dict:
    """A JSON object from a file; ModelLoadError when unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def parse_labels(path: str) -> list[str]:
    """Read a labels file under the rules of :meth:`ModelFolder.read_labels`."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [line.rstrip("\r\n") for line in fh]
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels file {path}: {exc.strerror}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if not labels:
        raise ModelLoadError(f"labels file {path} is empty")
    if any(not label for label in labels):
        raise ModelLoadError(f"labels file {path} has an empty line inside")
    if len(set(labels)) != len(labels):
        raise ModelLoadError(f"labels file {path} has duplicate labels")
    return labels


def _regular_file(path: str) -> bool:
    """Whether ``path`` is a regular file itself (not a symlink to one)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_text(path: str, text: str) -> None:
    """Write a small file atomically (a reader never sees half of it)."""
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
