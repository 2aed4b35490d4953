"""Loading a model folder: which runtime runs it (``RUNTIME``) and the checks an export must
pass before it is served. No web framework here.

``load_classifier`` builds a :class:`~common.inference.classifier.Classifier` from a
:class:`~common.modelfolder.ModelFolder` (files and checks) and a runtime from
``runtimes/``: TensorFlow (the SavedModel), ONNX Runtime (``model.onnx``) or LiteRT
(``.tflite``). A new runtime is a new file there plus one branch in ``_exported_graph``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from common.inference.classifier import Classifier
from common.inference.exports import check_reference
from common.modelfolder import EXPORT_FILES, TFLITE, ModelFolder, ModelLoadError

log = logging.getLogger(__name__)


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
    #: ONNX Runtime intra-op threads for a call that starts while no other worker has work in
    #: hand (a second session of the model; 0: none); used only with a ``seat`` and when more
    #: than ``onnx_intra_op_threads``.
    alone_threads: int = 0
    #: This worker's seat on the server's board of work in hand (``common.machine.Seat``):
    #: every call of the loaded model, the load's own included, is counted there; the
    #: batcher counts its images there too (``Classifier.seat``). None outside gunicorn.
    seat: Any = field(default=None, compare=False)

    @classmethod
    def from_config(cls, config, seat=None) -> "RuntimeOptions":
        """The server's: RUNTIME, TF_*_THREADS, PRECISION, ONNX_*_THREADS, ONNX_SPINNING and
        RUNTIME_THREADS_ALONE; an intra-op count left at 0 is RUNTIME_THREADS, by default the
        CPUs this process may use (under gunicorn, that divided among the workers:
        gunicorn.conf.py), and RUNTIME_THREADS_ALONE's ``auto`` all of those CPUs."""
        from common.machine import alone_setting, alone_threads, usable_cpus

        cpus = usable_cpus()
        threads = config.runtime_threads or cpus
        onnx_threads = config.onnx_intra_op_threads or threads
        return cls(runtime=config.runtime, configure_tensorflow=True,
                   tf_intra_op_threads=config.tf_intra_op_threads or threads,
                   tf_inter_op_threads=config.tf_inter_op_threads, precision=config.precision,
                   onnx_intra_op_threads=onnx_threads,
                   onnx_inter_op_threads=config.onnx_inter_op_threads,
                   onnx_spinning=config.onnx_spinning,
                   alone_threads=alone_threads(alone_setting(config), cpus, onnx_threads),
                   seat=seat)

    @property
    def onnx_alone(self) -> bool:
        """Whether an ONNX model gets a second session for calls that run alone."""
        return (self.seat is not None
                and self.alone_threads > max(self.onnx_intra_op_threads, 1))



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
        graph = _onnx_graph(path, options)
    else:
        from common.inference.runtimes import litert
        graph = litert.load_graph(path)
    return graph, record, path



def load_classifier(folder: ModelFolder | str, options: RuntimeOptions | None = None
                    ) -> Classifier:
    """Load a model folder (or a legacy frozen graph) on the runtime ``options`` choose
    (default: TensorFlow, settings untouched); ModelLoadError with a clear reason.

    Our own folders: an ONNX or TFLite export is checked against the TensorFlow outputs
    recorded in model.json before it is used. An imported model (``scripts/import_model.py``)
    runs on its own runtime: ONNX on ONNX Runtime, TFLite on LiteRT, Keras and SavedModels on
    TensorFlow. The Classifier is the same whichever runtime runs it, with the folder's
    preprocessing spec.
    """
    from common.inference.runtimes import tfruntime

    options = options or RuntimeOptions()
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    folder.check_exists()
    meta = folder.read_metadata()
    labels = folder.read_labels()
    spec = folder.preprocessing(meta)
    kind = folder.format
    record = None
    runtime = runtime_for(folder, options)
    if kind in IMPORTED:
        if options.runtime not in ("auto", runtime):
            log.info("%s is an imported %s model: it runs on %s whatever RUNTIME says",
                     folder.path, kind, runtime)
        graph, where = _imported_graph(folder, options, runtime), folder.model_file()
    else:
        if runtime == "tensorflow":
            _configure_tensorflow(options)
            graph, where = tfruntime.load_graph(folder), folder.path
        elif runtime in ("onnx", "tflite"):
            graph, record, where = _exported_graph(folder, options, runtime)
        else:
            raise ModelLoadError(f"unknown runtime {runtime!r}")
    if runtime in ("tensorflow", "onnx"):
        _STARTED.add(runtime)
    folder.check_label_count(graph.outputs, labels, where, spec.label_offset)
    name, version = folder.identity(meta)
    size = folder.input_size(meta, graph.static_size(spec.layout))
    _check_input(graph, spec, size, where)
    predict_fn = graph.predict_fn
    if options.seat is not None:  # every call counted, so the other workers see it running
        predict_fn = options.seat.either(predict_fn, graph.alone_fn)
    if record is not None:  # on the session used under load
        check_reference(getattr(predict_fn, "under_load", predict_fn), record, size, where)
    clf = Classifier(predict_fn=predict_fn, labels=labels, input_size=size, name=name,
                     version=version, metadata=meta, folder=folder, runtime=runtime, spec=spec,
                     input_name=graph.input_name, input_dtype=graph.input_dtype,
                     seat=options.seat)
    clf._keepalive = graph.keepalive  # the function needs the loaded object's variables alive
    return clf


#: An imported model's format -> the runtime that runs it.
IMPORTED = {"onnx": "onnx", "tflite": "tflite", "keras": "tensorflow", "h5": "tensorflow"}

#: Runtimes that have loaded a model in this process (their process-wide threads exist); a
#: forked child has none of those threads.
_STARTED: set[str] = set()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_STARTED.clear)


def runtime_for(folder: ModelFolder, options: RuntimeOptions) -> str:
    """The runtime :func:`load_classifier` runs ``folder`` on: an imported model's own, else
    :func:`choose_runtime`'s."""
    if folder.format in IMPORTED:
        return IMPORTED[folder.format]
    return choose_runtime(folder, options.runtime, options.precision)


def load_starts_threads(folder: ModelFolder | str, options: RuntimeOptions) -> bool:
    """Whether loading ``folder`` (and warming it up) starts threads that the model keeps
    using under load, such as a runtime's pools. Such a load must run at normal priority: a
    thread inherits the priority of the thread that starts it, and an unprivileged process
    cannot raise it back (``machine.lower_thread_priority``). The pool of the session for calls
    that run alone (``RUNTIME_THREADS_ALONE``) is not counted: it runs only while no other
    model call does, when a lower priority takes nothing from it but what a sibling's call
    started meanwhile needs more. Measured (2026-12-06, threads alive before and after):

    * ONNX Runtime's first load in a process may start one (it did on one machine, not on
      another); after that none with one intra-op thread (the calling thread runs the graph),
      and with more, or 0 (its default, one per core), a pool for each session;
    * TensorFlow starts its process-wide pools on its first load (4 threads at one intra-op
      thread) and none on later loads;
    * LiteRT is taken to start some (XNNPACK's pool).
    """
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
    runtime = runtime_for(folder, options)
    if runtime not in _STARTED:
        return True
    if runtime == "onnx":
        return options.onnx_intra_op_threads != 1
    return runtime != "tensorflow"


def _onnx_graph(path: str, options: RuntimeOptions):
    """The RuntimeGraph of an ONNX file on ONNX Runtime with the options' threads; with
    ``options.onnx_alone`` a second session on ``alone_threads`` (``alone_fn``) for the calls
    that start while no other worker has work in hand (``Seat.either``). The second session
    costs memory (measured: 32 MB for MobileNetV2, 136 MB for Inception v3; ``machine``'s
    ``ALONE_MB_*``) and its pool's threads, idle while the workers are busy."""
    from common.inference.runtimes import onnxrt

    def session(threads: int):
        return onnxrt.load_graph(path, intra_op=threads, inter_op=options.onnx_inter_op_threads,
                                 spinning=options.onnx_spinning)

    graph = session(options.onnx_intra_op_threads)
    if not options.onnx_alone:
        return graph
    alone = session(options.alone_threads)
    return replace(graph, alone_fn=alone.predict_fn, keepalive=(graph.keepalive, alone.keepalive))


def _configure_tensorflow(options: RuntimeOptions) -> None:
    from common.inference.runtimes import tfruntime

    if options.configure_tensorflow:
        tfruntime.configure(options.tf_intra_op_threads, options.tf_inter_op_threads,
                            options.precision)


def _imported_graph(folder: ModelFolder, options: RuntimeOptions, runtime: str):
    """The RuntimeGraph of an imported model's own file."""
    path = folder.model_file()
    if runtime == "onnx":
        return _onnx_graph(path, options)
    if runtime == "tflite":
        from common.inference.runtimes import litert
        return litert.load_graph(path, threads=options.onnx_intra_op_threads or None)
    from common.inference.runtimes import tfruntime
    _configure_tensorflow(options)
    return tfruntime.load_keras(path)


def _check_input(graph, spec, size: tuple[int, int], where: str) -> None:
    """The graph's declared input must be what the spec makes: one image of ``size`` in the
    spec's layout (three channels), in a dtype the spec can give; encoded images (a string
    input) exactly when the spec says ``dtype: string``."""
    if (graph.input_dtype == "string") != spec.encoded:
        takes, wanted = (("encoded images (a string input)", "string") if not spec.encoded
                         else (f"{graph.input_dtype} pixels", graph.input_dtype))
        raise ModelLoadError(f"{where}: the model takes {takes} but its preprocessing says "
                             f"dtype {spec.dtype}; set preprocessing dtype to {wanted} "
                             f"(scripts/import_model.py)")
    dims = graph.input_dims
    if dims is None:
        return  # not declared: the warm-up finds out
    wanted = spec.input_shape(size)
    if any(d is not None and d != w for d, w in zip(dims, wanted)):
        declared = ", ".join("?" if d is None else str(d) for d in dims)
        raise ModelLoadError(f"{where}: the model takes [n, {declared}] but its preprocessing "
                             f"({spec.layout}, {size[0]}x{size[1]}) makes "
                             f"[n, {', '.join(map(str, wanted))}]; set the layout or "
                             f"input_size in model.json (scripts/import_model.py)")
    if graph.input_dtype == "uint8" and not graph.quantised and spec.dtype != "uint8":
        raise ModelLoadError(f"{where}: the model takes uint8 pixels but its preprocessing "
                             f"makes {spec.dtype}; set preprocessing dtype to uint8")
