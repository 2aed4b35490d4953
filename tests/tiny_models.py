"""Models small enough to read their answer: the dominant colour of the image.

The colour model averages the image's channels and softmaxes them (times a gain), so a red
picture scores "red" highest. It is a real SavedModel with DESIGN.md's signature, saved in a few
hundred milliseconds.
"""
from __future__ import annotations

import tensorflow as tf

from common.modelfolder import LegacyGraph, ModelFolder

COLOUR_LABELS = ["red", "green", "blue"]
TRAP = (255, 0, 255)  # the colour that makes a hang_seconds model spin
TRAP_MEANS = tuple(c / 255.0 for c in TRAP)


class _ColourModel(tf.Module):
    def __init__(self, size):
        super().__init__()
        self.gain = tf.Variable(20.0)
        self.size = size

    def scores(self, images):
        means = tf.reduce_mean(images, axis=[1, 2])  # [batch, 3]
        return tf.nn.softmax(self.gain * means, axis=-1)


def save_colour_model(folder: str, *, size=(32, 32), labels=COLOUR_LABELS, name="colours",
                      extra_outputs: int = 0, hang_seconds: float = 0.0,
                      call_seconds: float = 0.0) -> str:
    """Write a model folder (SavedModel + labels.txt + model.json) for the colour model.

    ``extra_outputs`` pads the output with that many more columns: a model whose outputs and
    labels disagree, for the start-up check. ``hang_seconds`` makes a model that spins (a
    busy ``tf.while_loop`` on ``tf.timestamp``, in the graph itself) for that long whenever a
    batch holds a pure magenta image (TRAP): a model call that hangs, for the fault tests.
    ``call_seconds`` makes every call spin that long, whatever its batch size: a model whose
    batches take a known time, for the admission tests.
    """
    model = _ColourModel(size)

    @tf.function(input_signature=[tf.TensorSpec([None, size[0], size[1], 3], tf.float32,
                                                name="images")])
    def serve(images):
        probs = model.scores(images)
        if hang_seconds or call_seconds:
            means = tf.reduce_mean(images, axis=[1, 2])
            trapped = tf.reduce_any(tf.reduce_all(tf.abs(means - TRAP_MEANS) < 0.03, axis=1))
            start = tf.timestamp()
            until = start + call_seconds + tf.where(trapped, tf.constant(hang_seconds,
                                                                         tf.float64), 0.0)
            spun = tf.while_loop(lambda t: t < until, lambda t: [tf.timestamp()], [start])
            probs = probs + tf.cast(spun[0] - spun[0], tf.float32)  # depend on the loop
        if extra_outputs:
            probs = tf.concat([probs, tf.zeros([tf.shape(probs)[0], extra_outputs])], axis=1)
        return {"probabilities": probs}

    model.serve = serve
    tf.saved_model.save(model, folder, signatures={"serving_default": serve})
    written = ModelFolder(folder)
    written.write_labels(list(labels))
    written.write_metadata({"name": name, "version": "7", "input_size": list(size),
                            "created": "test", "base_module": "none", "metrics": {}})
    return folder


def save_colour_frozen_graph(path: str, *, size=(32, 32), input_name=LegacyGraph.input_layer,
                             output_name=LegacyGraph.output_layer, scale=1.0) -> str:
    """A TF1-style frozen GraphDef of the colour model, with old retrain.py's tensor names.

    ``scale`` is the value range the graph expects (1.0 = [0, 1], 255.0 = [0, 255]).
    """
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, size[0], size[1], 3], name=input_name)
        means = tf.reduce_mean(x, axis=[1, 2]) / scale
        tf.nn.softmax(20.0 * means, axis=-1, name=output_name)
    with open(path, "wb") as fh:
        fh.write(graph.as_graph_def().SerializeToString())
    return path
