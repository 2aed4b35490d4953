#!/usr/bin/env python3
"""Train a tiny image feature-vector module on synthetic sketches and save it in TF Hub form.

Pretrained weights cannot be downloaded here, so the offline demo brings its own "Inception v3":
a small CNN pretrained on ten synthetic shape classes (the demo's six and four others) from a
seed of its own, then saved as a TF Hub image feature vector:

    module = tf.saved_model.load(path)  # what hub.load(path) does with a folder
    features = module(images)          # float32 [batch, H, W, 3] in [0, 1] -> [batch, 128]

retrain.py treats it exactly as it treats Inception v3. The classification layer used for
pretraining is thrown away; only the feature extractor is saved.

    python scripts/make_feature_module.py --output_dir tf_files/modules/sketch_features
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.inference.preprocessing import to_model_input  # noqa: E402
from scripts import cli  # noqa: E402
from scripts.make_demo_data import DEMO_SHAPES, EXTRA_SHAPES, sketch_batch  # noqa: E402


@dataclass
class ModuleParams:
    """Hyper-parameters of the feature module and its pretraining, one line each."""

    input_size: int = 64  # square input side the module expects, pixels
    channels: tuple[int, ...] = (16, 32, 64, 128)  # conv widths; the last is the feature size
    images_per_class: int = 800  # synthetic pretraining images per class
    epochs: int = 20  # passes over the pretraining images
    batch_size: int = 64  # pretraining batch size
    learning_rate: float = 2e-3  # Adam learning rate
    seed: int = 1  # seed for data and weights (the demo data uses another)
    shapes: tuple[str, ...] = DEMO_SHAPES + EXTRA_SHAPES  # pretraining classes


def build_module(params: ModuleParams):
    """The feature extractor as a ``tf.Module`` with a traced ``__call__``."""
    import tensorflow as tf

    class SketchFeatures(tf.Module):
        """conv3x3-relu-maxpool blocks, then global average pooling.

        ``__call__(images)``: float32 ``[batch, S, S, 3]`` in ``[0, 1]`` ->
        ``[batch, channels[-1]]`` non-negative features.
        """

        def __init__(self):
            super().__init__(name="sketch_features")
            init = tf.keras.initializers.HeNormal(seed=params.seed)
            widths = (3,) + tuple(params.channels)
            self.kernels = [tf.Variable(init((3, 3, cin, cout)), name=f"conv{i}/kernel")
                            for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))]
            self.biases = [tf.Variable(tf.zeros([cout]), name=f"conv{i}/bias")
                           for i, cout in enumerate(widths[1:])]
            self.input_size = tf.Variable([params.input_size, params.input_size],
                                          trainable=False, name="input_size")

        @tf.function(input_signature=[tf.TensorSpec(
            [None, params.input_size, params.input_size, 3], tf.float32, name="images")])
        def __call__(self, images):
            x = images * 2.0 - 1.0
            last = len(self.kernels) - 1
            for i, (k, b) in enumerate(zip(self.kernels, self.biases)):
                x = tf.nn.relu(tf.nn.conv2d(x, k, strides=1, padding="SAME") + b)
                if i < last:
                    x = tf.nn.max_pool2d(x, 2, 2, "VALID")
            return tf.reduce_mean(x, axis=[1, 2])

    return SketchFeatures()


def make_images(params: ModuleParams, n: int, rng: np.random.Generator):
    """``n`` preprocessed sketches: float32 [n, S, S, 3] in [0, 1], and int labels [n]."""
    images, labels = sketch_batch(params.shapes, n, rng, size=128)
    size = (params.input_size, params.input_size)
    return np.stack([to_model_input(im, size) for im in images]), labels.astype(np.int64)


def train_module(params: ModuleParams = ModuleParams(), progress: bool = True):
    """Pretrain the module; returns (module, {"train_accuracy", "holdout_accuracy", ...})."""
    import tensorflow as tf
    from tqdm import tqdm

    tf.random.set_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    n = params.images_per_class * len(params.shapes)
    t0 = time.perf_counter()
    x, y = make_images(params, n, rng)
    hx, hy = make_images(params, max(200, n // 10), rng)
    module = build_module(params)
    head_w = tf.Variable(tf.random.normal([params.channels[-1], len(params.shapes)], 0, 0.01,
                                          seed=params.seed))
    head_b = tf.Variable(tf.zeros([len(params.shapes)]))
    trainable = module.trainable_variables + (head_w, head_b)
    optimizer = tf.keras.optimizers.Adam(params.learning_rate)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.matmul(module(images), head_w) + head_b
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, trainable), trainable))
        return loss, tf.reduce_mean(tf.cast(tf.argmax(logits, 1) == labels, tf.float32))

    def accuracy(images, labels):
        correct = 0
        for i in range(0, len(images), 256):
            logits = tf.matmul(module(images[i:i + 256]), head_w) + head_b
            correct += int(np.sum(np.argmax(logits.numpy(), 1) == labels[i:i + 256]))
        return correct / len(images)

    steps_per_epoch = int(np.ceil(n / params.batch_size))
    with tqdm(total=params.epochs * steps_per_epoch, desc="pretraining features",
              unit="step", disable=not progress) as bar:
        for epoch in range(params.epochs):
            order = rng.permutation(n)
            for i in range(steps_per_epoch):
                idx = order[i * params.batch_size:(i + 1) * params.batch_size]
                loss, acc = step(tf.constant(x[idx]), tf.constant(y[idx]))
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.3f}", acc=f"{float(acc):.2f}")
                bar.update()
    metrics = {"train_accuracy": accuracy(x, y), "holdout_accuracy": accuracy(hx, hy),
               "train_images": n, "seconds": round(time.perf_counter() - t0, 1)}
    return module, metrics


def save_module(module, output_dir: str, params: ModuleParams, metrics: dict) -> str:
    """Save as a TF Hub style SavedModel (callable, feature vector out) plus module.json."""
    import tensorflow as tf

    tf.saved_model.save(module, output_dir)
    with open(os.path.join(output_dir, "module.json"), "w") as fh:
        json.dump({"kind": "image_feature_vector", "input_size": [params.input_size] * 2,
                   "feature_size": params.channels[-1], "pretrained_on": list(params.shapes),
                   "params": asdict(params), "metrics": metrics}, fh, indent=2)
    return output_dir


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where the module is saved")
    parser.add_argument("--images_per_class", type=int, default=ModuleParams.images_per_class)
    parser.add_argument("--epochs", type=int, default=ModuleParams.epochs)
    parser.add_argument("--input_size", type=int, default=ModuleParams.input_size)
    parser.add_argument("--seed", type=int, default=ModuleParams.seed)
    args = cli.parse_args(parser, argv)
    params = ModuleParams(input_size=args.input_size, images_per_class=args.images_per_class,
                          epochs=args.epochs, seed=args.seed)
    module, metrics = train_module(params)
    save_module(module, args.output_dir, params, metrics)
    print(f"saved feature module to {args.output_dir}: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
