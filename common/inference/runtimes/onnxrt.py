"""ONNX Runtime: a runtime beside TensorFlow, for model folders with a verified ``model.onnx``.
No TensorFlow and no web framework here (a serving image without TensorFlow runs on this alone).

``load_graph(path)`` gives the same :class:`~common.inference.runtimes.tfruntime.RuntimeGraph` as
the TensorFlow loader: a thread-safe ``predict_fn`` (the model's own input batch, NHWC or
NCHW, float32 or uint8 -> float32 ``[n, outputs]``; a graph fixed at batch 1 runs once per
image), so the classifier, the batcher and the warm-up do not care which runtime runs. Weights
in an external data file beside the model are found by ONNX Runtime itself. For our own
exports ``common.inference.loader.load_classifier`` checks its outputs against TensorFlow's
reference outputs recorded in model.json before it is used (``common.inference.exports``).
"""
from __future__ import annotations

import logging

import numpy as np

from common.inference.runtimes.tfruntime import RuntimeGraph, dims_of, per_image
from common.modelfolder import ModelLoadError

log = logging.getLogger(__name__)


def available() -> bool:
    """True when onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def session_options(intra_op: int = 0, inter_op: int = 0, spinning: bool = False):
    """ONNX Runtime session options: thread pools (0 = its own choice, one per core).

    ``spinning`` False stops the pools' threads from busy-waiting for the next op once their part
    of one is done (ONNX Runtime's default is to spin). Alone on a machine spinning shaves a
    little latency; in the server it burned a core that the request threads (decode, resize,
    HTTP) needed: ``docs/BENCHMARKS.md`` has the measurement behind the default.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op
    options.inter_op_num_threads = inter_op
    options.log_severity_level = 3  # errors only
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options


def load_graph(path: str | bytes, *, intra_op: int = 0, inter_op: int = 0,
               spinning: bool = False) -> RuntimeGraph:
    """An ONNX file (or its bytes) as a RuntimeGraph; ModelLoadError with the reason when
    onnxruntime is missing or the file is damaged."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("RUNTIME=onnx needs the onnxruntime package "
                             "(pip install -r requirements.txt)") from None
    where = path if isinstance(path, str) else "the ONNX model"
    try:
        session = ort.InferenceSession(path,
                                       sess_options=session_options(intra_op, inter_op, spinning),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for a damaged file
        raise ModelLoadError(f"cannot load {where}: {exc}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{where}: the model must take one input, has "
                             f"{[i.name for i in inputs]}")
    input_name = inputs[0].name
    dtype = _DTYPES.get(inputs[0].type)
    if dtype is None:
        raise ModelLoadError(f"{where}: input {input_name} is {inputs[0].type}; an image "
                             f"model's input must be float or uint8 pixels")
    output = next((o for o in outputs if o.name == "probabilities"), outputs[0])
    output_name = output.name
    numpy_dtype = np.dtype(np.float16 if inputs[0].type == "tensor(float16)" else dtype)

    def run(images: np.ndarray) -> np.ndarray:
        result = session.run([output_name], {input_name: np.asarray(images, numpy_dtype)})[0]
        return np.asarray(result, np.float32).reshape(len(images), -1)

    batch = inputs[0].shape[0] if inputs[0].shape else None
    fixed = int(batch) if isinstance(batch, int) and batch > 0 else None
    declared = output.shape
    width = declared[-1] if len(declared) >= 2 and isinstance(declared[-1], int) else None
    log.info("ONNX Runtime %s loaded %s (threads: intra %s, inter %s, spinning %s)",
             ort.__version__, where, intra_op or "auto", inter_op or "auto",
             "on" if spinning else "off")
    return RuntimeGraph(per_image(run) if fixed == 1 else run, dims_of(inputs[0].shape), width,
                        session, input_dtype=dtype, input_name=input_name, fixed_batch=fixed)


#: ONNX input types an image model may take, as the spec calls them (float16 is fed float16).
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float32", "tensor(double)": "float32",
           "tensor(uint8)": "uint8"}
