"""Writing the trained classifier: the SavedModel of a model folder, and a legacy frozen graph.

Both compute ``softmax(module(images) @ weights + biases)`` for images float32
``[n, h, w, 3]`` in ``[0, 1]``, giving float32 ``[n, C]`` probabilities.
"""
from __future__ import annotations

import os

from common.modelfolder import LegacyGraph


def export_saved_model(module, weights, biases, size: tuple[int, int], folder: str) -> None:
    """One SavedModel: ``serving_default(images [n, h, w, 3] in [0, 1]) -> probabilities``.

    ``weights`` [F, C] and ``biases`` [C] are the trained layer; ``size`` = (h, w) is fixed in
    the signature. Writes ``folder`` (the SavedModel files only).
    """
    import tensorflow as tf

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__(name="retrained_classifier")
            self.features = module
            self.weights = weights
            self.biases = biases

        @tf.function(input_signature=[tf.TensorSpec([None, size[0], size[1], 3], tf.float32,
                                                    name="images")])
        def serve(self, images):
            logits = tf.matmul(self.features(images), self.weights) + self.biases
            return {"probabilities": tf.nn.softmax(logits)}

    model = Classifier()
    tf.saved_model.save(model, folder, signatures={"serving_default": model.serve})


def export_frozen_graph(module, weights, biases, size: tuple[int, int], path: str) -> None:
    """A TF1-style frozen graph for old tools, with the tensor names of ``LegacyGraph()``.

    Its input placeholder takes float32 ``[n, h, w, 3]`` in ``[0, 1]`` (the ``LegacyGraph``
    default mean 0 and std 255 on 0..255 pixels) and its output is the probabilities.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    names = LegacyGraph()

    # The TensorSpec's name becomes the placeholder's name in the graph.
    @tf.function(input_signature=[tf.TensorSpec([None, size[0], size[1], 3], tf.float32,
                                                name=names.input_layer)])
    def graph(images):
        logits = tf.matmul(module(images), weights) + biases
        return tf.nn.softmax(logits, name=names.output_layer)

    frozen = convert_variables_to_constants_v2(graph.get_concrete_function())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(frozen.graph.as_graph_def().SerializeToString())
