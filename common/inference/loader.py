"""Loading a model folder: which runtime runs it (``RUNTIME``) and the checks an export must
pass before it is served. No web framework here.

``load_classifier`` builds a :class:`~common.inference.classifier.Classifier` from a
:class:`~common.modelfolder.ModelFolder` (files and checks) and a runtime from
``runtimes/``: TensorFlow (the SavedModel), ONNX Runtime (``model.onnx``) or LiteRT
(``.tflite``). A new runtime is a new file there plus one branch in ``_exported_graph``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from common.inference.classifier import Classifier
from common.inference.exports import check_reference
from common.modelfolder import EXPORT_FILES, TFLITE, ModelFolder, ModelLoadError


@dataclass(frozen=True)
class RuntimeOptions:
    """Which runtime runs a model folder, and its settings.

    ``runtime``: ``tensorflow`` (the SavedModel), ``onnx`` (the folder's verified
    ``model.onnx`` on ONNX Runtime), ``auto`` (the server's default: ``onnx`` when the folder
    has a verified ``model.onnx`` and onnxruntime is installed, else ``tensorflow``), or
    ``tflite`` (the
    ``tflite_file`` export on LiteRT, for label_image.py). ``configure_tensorflow`` applies the
    TensorFlow thread and precision settings, once per process, when TensorFlow is chosen.
    """

    runtime: str = "tensorflow"
    tflite_file: str | None = None
    configure_tensorflow: bool = False
    tf_intra_op_threads: int = 0
    tf_inter_op_threads: int = 0
    precision: str = "fp32"
    onnx_intra_op_threads: int = 0
    onnx_inter_op_threads: int = 0
    onnx_spinning: bool = False

    @classmethod
    def from_config(cls, config) -> "RuntimeOptions":
        """The server's: RUNTIME, TF_*_THREADS, PRECISION, ONNX_*_THREADS and ONNX_SPINNING;
        an intra-op count left at 0 is RUNTIME_THREADS, by default the CPUs this process may
        use (under gunicorn, that divided among the workers: gunicorn.conf.py)."""
        from common.machine import usable_cpus

        threads = config.runtime_threads or usable_cpus()
        return cls(runtime=config.runtime, configure_tensorflow=True,
                   tf_intra_op_threads=config.tf_intra_op_threads or threads,
                   tf_inter_op_threads=config.tf_inter_op_threads, precision=config.precision,
                   onnx_intra_op_threads=config.onnx_intra_op_threads or threads,
                   onnx_inter_op_threads=config.onnx_inter_op_threads,
                   onnx_spinning=config.onnx_spinning)



def choose_runtime(folder: ModelFolder, runtime: str, precision: str = "fp32") -> str:
    """``auto`` -> ``onnx`` when the folder has a verified model.onnx and onnxruntime is
    installed (and ``PRECISION=bf16``, a TensorFlow feature, was not asked for), else
    ``tensorflow``; any other runtime is returned as asked."""
    if runtime != "auto":
        return runtime
    if precision == "bf16":
        return "tensorflow"
    from common.inference.runtimes import onnxrt

    if folder.folder is not None and folder.verified_export("onnx") and onnxrt.available():
        return "onnx"
    return "tensorflow"



def _exported_graph(folder: ModelFolder, options: RuntimeOptions, runtime: str):
    """(graph, export record) of the folder's ONNX or TFLite export; ModelLoadError when it
    has none that passed verification, or its file is not the one verified."""
    if runtime == "onnx":
        key = "onnx"
    else:
        name = os.path.basename(options.tflite_file or TFLITE)
        key = next((k for k, f in EXPORT_FILES.items() if f == name and k != "onnx"), None)
        if key is None:
            raise ModelLoadError(f"{name} is not one of the exports of a model folder "
                                 f"({', '.join(f for f in EXPORT_FILES.values())})")
    found = folder.verified_export(key) if folder.folder is not None else None
    if found is None:
        reason = "no record in model.json" if not (folder.folder and folder.export_record(key)) \
            else "its file differs from the verified one"
        raise ModelLoadError(f"{folder.path} has no verified {EXPORT_FILES[key]} ({reason}); "
                             f"make one with scripts/export.py --model {folder.path} "
                             f"--format {key.split('-')[0]}")
    path, record = found
    if runtime == "onnx":
        from common.inference.runtimes import onnxrt
        graph = onnxrt.load_graph(path, intra_op=options.onnx_intra_op_threads,
                                  inter_op=options.onnx_inter_op_threads,
                                  spinning=options.onnx_spinning)
    else:
        from common.inference.runtimes import litert
        graph = litert.load_graph(path)
    return graph, record, path



def load_classifier(folder: ModelFolder | str, options: RuntimeOptions | None = None
                    ) -> Classifier:
    """Load a model folder (or a legacy frozen graph) on the runtime ``options`` choose
    (default: TensorFlow, settings untouched); ModelLoadError with a clear reason.

    An ONNX or TFLite export is checked against the TensorFlow outputs recorded in model.json
    before it is used; the Classifier is the same whichever runtime runs it.
    """
    from common.inference.runtimes import tfruntime

    options = options or RuntimeOptions()
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    folder.check_exists()
    meta = folder.read_metadata()
    labels = folder.read_labels()
    runtime = choose_runtime(folder, options.runtime, options.precision)
    if runtime == "tensorflow":
        if options.configure_tensorflow:
            tfruntime.configure(options.tf_intra_op_threads, options.tf_inter_op_threads,
                                options.precision)
        graph, record, where = tfruntime.load_graph(folder), None, folder.path
    elif runtime in ("onnx", "tflite"):
        graph, record, where = _exported_graph(folder, options, runtime)
    else:
        raise ModelLoadError(f"unknown runtime {runtime!r}")
    folder.check_label_count(graph.outputs, labels, where)
    name, version = folder.identity(meta)
    outputs = meta.get("outputs", "probabilities")
    if outputs not in ("probabilities", "logits"):
        raise ModelLoadError(f"{folder.path}: model.json outputs must be probabilities or "
                             f"logits, got {outputs!r}")
    size = folder.input_size(meta, graph.static_size)
    if record is not None:
        check_reference(graph.predict_fn, record, size, where)
    clf = Classifier(predict_fn=graph.predict_fn, labels=labels, input_size=size, name=name,
                     version=version, outputs=outputs, metadata=meta, folder=folder,
                     runtime=runtime)
    clf._keepalive = graph.keepalive  # the function needs the loaded object's variables alive
    return clf

