"""Training the new softmax layer on the module's features, with optional augmentation.

The layer is ``logits = features @ weights + biases``: features float32 ``[n, F]``, weights
``[F, C]``, biases ``[C]`` for C labels. Without augmentation it trains on the cached features;
with augmentation every batch is decoded, distorted and run through the module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from common.inference.images import load_image_file

from .data import ImageLists, RetrainError


@dataclass
class TrainParams:
    """Hyper-parameters, one line of doc each (the CLI flags have the same names)."""

    how_many_training_steps: int = 4000  # training steps of the new softmax layer
    learning_rate: float = 0.01  # Adam learning rate of the new layer
    train_batch_size: int = 100  # images per training step
    validation_percentage: int = 10  # % of images held out for validation
    testing_percentage: int = 10  # % of images held out for the final test
    eval_step_interval: int = 100  # steps between validation evaluations
    seed: int = 0  # seed of weight init, batch sampling and augmentation
    flip_left_right: bool = False  # augmentation: random horizontal flips
    random_crop: int = 0  # augmentation: % margin randomly cropped
    random_scale: int = 0  # augmentation: % random upscaling before the crop
    random_brightness: int = 0  # augmentation: % random brightness change
    min_test_accuracy: float = 0.0  # refuse to export a model below this test accuracy
    feature_batch_size: int = 32  # images per feature-extractor call

    @property
    def augment(self) -> bool:
        return bool(self.flip_left_right or self.random_crop or self.random_scale
                    or self.random_brightness)


def distort(images, params: TrainParams, seed_stream):
    """Random augmentation of a batch: float32 [n, h, w, 3] in [0, 1] -> same shape and range.

    Follows the original script: upscale by (1 + crop%) x random(1, 1 + scale%), crop back to
    size at a random place, maybe flip left-right, multiply brightness by 1 +/- brightness%.
    ``seed_stream`` is a ``numpy.random.Generator``; the same generator state gives the same
    result. Returns a ``tf.Tensor``.
    """
    import tensorflow as tf

    return tf.stack([_distort_one(images[i], params, seed_stream)
                     for i in range(images.shape[0])])


def _distort_one(image, params: TrainParams, seed_stream):
    """One float32 [h, w, 3] image in [0, 1] -> a distorted one, same shape, clipped to [0, 1]."""
    import tensorflow as tf

    h, w = image.shape[0], image.shape[1]
    scale = (1.0 + params.random_crop / 100.0) * float(
        seed_stream.uniform(1.0, 1.0 + params.random_scale / 100.0))
    if scale > 1.0:
        big = tf.image.resize(image[None], (int(h * scale), int(w * scale)))[0]
        y = int(seed_stream.integers(0, big.shape[0] - h + 1))
        x = int(seed_stream.integers(0, big.shape[1] - w + 1))
        image = big[y:y + h, x:x + w]
    if params.flip_left_right and seed_stream.random() < 0.5:
        image = image[:, ::-1]
    if params.random_brightness:
        image = image * float(seed_stream.uniform(1 - params.random_brightness / 100.0,
                                                  1 + params.random_brightness / 100.0))
    return tf.clip_by_value(tf.convert_to_tensor(image), 0.0, 1.0)


def train_head(module, lists: ImageLists, features: dict, size: tuple[int, int],
               params: TrainParams, summaries_dir: str | None = None, progress: bool = True):
    """Train the softmax layer; returns (weights [F, C], biases [C], metrics dict).

    ``features`` maps relative paths to float32 ``[F]`` (images missing from it were unreadable
    and are left out). Without augmentation it trains on those features; with augmentation
    every batch is decoded at ``size``, distorted and run through the module (slow, and the
    cache cannot be used). ``metrics``: ``train_accuracy``, ``validation_accuracy`` (None
    without validation images) and ``history`` (one entry per evaluation step).
    """
    import tensorflow as tf

    tf.random.set_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    train = [(p, c) for p, c in lists.paths("training") if p in features]
    valid = [(p, c) for p, c in lists.paths("validation") if p in features]
    if not train:
        raise RetrainError("no readable training images")
    feature_size = next(iter(features.values())).shape[-1]
    head = _SoftmaxHead(feature_size, len(lists.labels), params)
    batches = _Batches(module, lists, features, train, size, params, rng)
    summaries = _Summaries(summaries_dir)
    history = _train_loop(head, batches, lambda: head.accuracy(features, valid), params,
                          summaries, progress)
    summaries.close()
    metrics = {"train_accuracy": head.accuracy(features, train),
               "validation_accuracy": head.accuracy(features, valid), "history": history}
    return head.weights, head.biases, metrics


class _SoftmaxHead:
    """The new layer and its optimizer: Adam on the mean sparse softmax cross-entropy."""

    def __init__(self, feature_size: int, n_classes: int, params: TrainParams):
        import tensorflow as tf

        self.weights = tf.Variable(tf.random.truncated_normal(
            [feature_size, n_classes], stddev=0.001, seed=params.seed), name="final_weights")
        self.biases = tf.Variable(tf.zeros([n_classes]), name="final_biases")
        self.optimizer = tf.keras.optimizers.Adam(params.learning_rate)
        self.step = tf.function(self._step)

    def _step(self, x, y):
        """One update on features x float32 [n, F] and labels y int64 [n] -> (loss, accuracy)."""
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = tf.matmul(x, self.weights) + self.biases
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=y, logits=logits))
        grads = tape.gradient(loss, [self.weights, self.biases])
        self.optimizer.apply_gradients(zip(grads, [self.weights, self.biases]))
        return loss, tf.reduce_mean(tf.cast(tf.argmax(logits, 1) == y, tf.float32))

    def accuracy(self, features: dict, items: list[tuple[str, int]]) -> float | None:
        """Top-1 accuracy on cached features of ``[(rel_path, class)]``; None when empty."""
        if not items:
            return None
        x = np.stack([features[p] for p, _ in items])
        y = np.array([c for _, c in items])
        return float(np.mean(np.argmax(x @ self.weights.numpy() + self.biases.numpy(), 1) == y))


class _Batches:
    """Random training batches: ``next()`` -> (x float32 [batch, F], y int64 [batch])."""

    def __init__(self, module, lists: ImageLists, features: dict,
                 train: list[tuple[str, int]], size: tuple[int, int], params: TrainParams,
                 rng: np.random.Generator):
        self.module, self.lists, self.train, self.size = module, lists, train, size
        self.params, self.rng = params, rng
        self.train_x = np.stack([features[p] for p, _ in train])
        self.train_y = np.array([c for _, c in train], dtype=np.int64)

    def next(self):
        import tensorflow as tf

        idx = self.rng.integers(0, len(self.train), self.params.train_batch_size)
        if self.params.augment:
            x = self.module(distort(self._images(idx), self.params, self.rng))
        else:
            x = tf.constant(self.train_x[idx])
        return x, tf.constant(self.train_y[idx])

    def _images(self, idx) -> np.ndarray:
        """The chosen training images, float32 [batch, h, w, 3] in [0, 1]."""
        return np.stack([load_image_file(os.path.join(self.lists.image_dir, self.train[j][0]),
                                         self.size) for j in idx])


class _Summaries:
    """TensorBoard logs (``train/`` and ``validation/`` under ``summaries_dir``), or nothing."""

    def __init__(self, summaries_dir: str | None):
        import tensorflow as tf

        self.writers = {k: tf.summary.create_file_writer(os.path.join(summaries_dir, k))
                        for k in ("train", "validation")} if summaries_dir else {}

    def write(self, step: int, loss, accuracy, validation: float | None) -> None:
        import tensorflow as tf

        if not self.writers:
            return
        with self.writers["train"].as_default():
            tf.summary.scalar("cross_entropy", loss, step=step)
            tf.summary.scalar("accuracy", accuracy, step=step)
        if validation is not None:
            with self.writers["validation"].as_default():
                tf.summary.scalar("accuracy", validation, step=step)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.flush()


def _train_loop(head: _SoftmaxHead, batches: _Batches, validate, params: TrainParams,
                summaries: _Summaries, progress: bool) -> list[dict]:
    """Run the training steps with a progress bar; returns the evaluation history."""
    from tqdm import tqdm

    steps = params.how_many_training_steps
    history = []
    with tqdm(total=steps, desc="training", unit="step", disable=not progress) as bar:
        for step in range(1, steps + 1):
            loss, acc = head.step(*batches.next())
            if step % params.eval_step_interval == 0 or step == steps:
                val = validate()
                history.append({"step": step, "loss": float(loss), "train_accuracy": float(acc),
                                "validation_accuracy": val})
                bar.set_postfix(loss=f"{float(loss):.3f}",
                                val=f"{val if val is not None else 0:.3f}")
                summaries.write(step, loss, acc, val)
            bar.update()
    return history
