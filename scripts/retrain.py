#!/usr/bin/env python3
"""Retrain an image classifier on top of a pretrained feature extractor (TensorFlow 2).

The TF2 successor of the image_retraining tutorial's retrain.py. Point it at a folder with one
sub-folder of images per category (the flower_photos layout) and a TF Hub image feature-vector
module; it caches the module's features ("bottlenecks"), trains a softmax layer on them, and
exports ONE SavedModel (module + new layer) in the model-folder layout of DESIGN.md, with
labels.txt, model.json and an evaluation report.

    python scripts/retrain.py --image_dir ~/flower_photos --output_dir tf_files/flowers

The module is loaded with ``hub.load`` (a TF Hub handle or URL, or a local SavedModel folder);
``hub.KerasLayer`` is not used, so it works with Keras 3.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ApiError  # noqa: E402
from common.images import FILE_EXTENSIONS, load_image_file  # noqa: E402

log = logging.getLogger("retrain")

DEFAULT_MODULE = "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/5"
MAX_NUM_IMAGES_PER_CLASS = 2 ** 27 - 1  # as in the original retrain.py: keeps splits stable
MIN_IMAGES_PER_CLASS = 3
#: Input sizes of well-known TF Hub modules whose signature does not fix the size.
KNOWN_INPUT_SIZES = {"inception_v3": 299, "inception_resnet_v2": 299, "nasnet_large": 331,
                     "pnasnet_large": 331, "efficientnet/b0": 224, "resnet_v2_50": 224}


class RetrainError(RuntimeError):
    """The data or options cannot produce a model; the message says what to fix."""


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


@dataclass
class ImageLists:
    """Image paths by label and split: ``lists[label]["training"|"validation"|"testing"]``."""

    image_dir: str
    labels: list[str]
    lists: dict[str, dict[str, list[str]]]

    def paths(self, split: str) -> list[tuple[str, int]]:
        return [(p, i) for i, label in enumerate(self.labels) for p in self.lists[label][split]]


@dataclass
class FeatureStats:
    """How the features were obtained in one run."""

    computed: int = 0
    cached: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def which_set(file_name: str, validation_percentage: int, testing_percentage: int) -> str:
    """Split by a hash of the file name, so adding images never moves the others.

    ``_nohash_`` and anything after it are ignored, as in the original script, so variants of one
    picture land in the same split.
    """
    base = re.sub(r"_nohash_.*$", "", os.path.basename(file_name))
    digest = int(hashlib.sha1(base.encode("utf-8")).hexdigest(), 16)
    percentage = (digest % (MAX_NUM_IMAGES_PER_CLASS + 1)) * (100.0 / MAX_NUM_IMAGES_PER_CLASS)
    if percentage < validation_percentage:
        return "validation"
    if percentage < validation_percentage + testing_percentage:
        return "testing"
    return "training"


def create_image_lists(image_dir: str, validation_percentage: int = 10,
                       testing_percentage: int = 10) -> ImageLists:
    """List images per category folder (sorted names = labels, in output order) and split them."""
    if not os.path.isdir(image_dir):
        raise RetrainError(f"image folder not found: {image_dir}")
    if validation_percentage + testing_percentage >= 100:
        raise RetrainError("validation and testing percentages must leave images for training")
    labels = sorted(d for d in os.listdir(image_dir)
                    if os.path.isdir(os.path.join(image_dir, d)) and not d.startswith("."))
    lists = {}
    for label in labels:
        folder = os.path.join(image_dir, label)
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(FILE_EXTENSIONS) and not f.startswith("."))
        if not files:
            log.warning("skipping folder %s: no images in it", label)
            continue
        if len(files) < MIN_IMAGES_PER_CLASS:
            raise RetrainError(f"category {label!r} has {len(files)} images; "
                               f"at least {MIN_IMAGES_PER_CLASS} are needed (20+ advised)")
        if len(files) < 20:
            log.warning("category %r has only %d images; results may be poor", label, len(files))
        split = {"training": [], "validation": [], "testing": []}
        for name in files:
            split[which_set(name, validation_percentage, testing_percentage)].append(
                os.path.join(label, name))
        if not split["training"]:
            raise RetrainError(f"category {label!r} got no training images; add more images")
        lists[label] = split
    if len(lists) < 2:
        raise RetrainError(f"{image_dir} needs at least 2 category folders with images, "
                           f"found {len(lists)}")
    return ImageLists(image_dir, sorted(lists), lists)


def load_module(handle: str):
    """Load a TF Hub image feature vector (handle, URL or local folder) with ``hub.load``."""
    import tensorflow_hub as hub

    try:
        return hub.load(handle)
    except Exception as exc:  # network, format and not-found errors all surface here
        raise RetrainError(f"cannot load module {handle}: {exc}") from None


def module_input_size(module, handle: str, override: int | None = None) -> tuple[int, int]:
    """The module's input (height, width): the flag, the traced signature, or a known handle."""
    if override:
        return (override, override)
    call = getattr(module, "__call__", None)
    for concrete in getattr(call, "concrete_functions", []) or []:
        args = concrete.structured_input_signature[0]
        if args and hasattr(args[0], "shape") and args[0].shape.rank == 4:
            h, w = args[0].shape[1], args[0].shape[2]
            if h is not None and w is not None:
                return (int(h), int(w))
    for key, size in KNOWN_INPUT_SIZES.items():
        if key in handle:
            return (size, size)
    match = re.search(r"_(\d{3})(?:/|$)", handle)
    if match:
        return (int(match.group(1)),) * 2
    raise RetrainError(f"cannot tell the input size of {handle}; pass --input_size")


def module_key(handle: str) -> str:
    """A short name for the module in the feature cache; a local folder's contents count."""
    ident = handle
    pb = os.path.join(handle, "saved_model.pb")
    if os.path.exists(pb):
        stat = os.stat(pb)
        ident = f"{os.path.abspath(handle)}:{stat.st_size}:{stat.st_mtime_ns}"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", handle.rstrip("/").split("/")[-1] or "module")[:40]
    return f"{slug}_{hashlib.sha1(ident.encode()).hexdigest()[:10]}"


def _cache_path(cache_dir: str, rel_path: str, data_hash: str) -> str:
    return os.path.join(cache_dir, rel_path + f".{data_hash[:12]}.npy")


def compute_features(module, lists: ImageLists, size: tuple[int, int], cache_dir: str | None,
                     batch_size: int = 32, progress: bool = True):
    """Features of every listed image, cached per (module, file content).

    Returns ``({rel_path: float32 [features]}, FeatureStats)``. An image that cannot be decoded
    is skipped with a warning and counted; a second run over the same images reads the cache and
    does not call the module.
    """
    import tensorflow as tf
    from tqdm import tqdm

    stats = FeatureStats()
    started = time.perf_counter()
    features: dict[str, np.ndarray] = {}
    pending: list[tuple[str, str | None]] = []
    rel_paths = [p for split in ("training", "validation", "testing")
                 for p, _ in lists.paths(split)]
    for rel in rel_paths:
        path = os.path.join(lists.image_dir, rel)
        cached = None
        if cache_dir:
            with open(path, "rb") as fh:
                digest = hashlib.sha1(fh.read()).hexdigest()
            cached = _cache_path(cache_dir, rel, digest)
            if os.path.exists(cached):
                try:
                    features[rel] = np.load(cached)
                    stats.cached += 1
                    continue
                except (OSError, ValueError):
                    log.warning("rebuilding unreadable cache file %s", cached)
        pending.append((rel, cached))

    with tqdm(total=len(pending), desc="extracting features", unit="img",
              disable=not progress or not pending) as bar:
        for start in range(0, len(pending), batch_size):
            chunk, arrays = [], []
            for rel, cached in pending[start:start + batch_size]:
                try:
                    arrays.append(load_image_file(os.path.join(lists.image_dir, rel), size))
                    chunk.append((rel, cached))
                except (ApiError, OSError) as exc:
                    log.warning("skipping unreadable image %s: %s", rel, exc)
                    stats.skipped.append(rel)
            if arrays:
                out = module(tf.constant(np.stack(arrays))).numpy().astype(np.float32)
                for (rel, cached), vector in zip(chunk, out):
                    features[rel] = vector
                    if cached:
                        os.makedirs(os.path.dirname(cached), exist_ok=True)
                        np.save(cached, vector)
                stats.computed += len(arrays)
            bar.update(len(pending[start:start + batch_size]))
    stats.seconds = round(time.perf_counter() - started, 2)
    return features, stats


def distort(images, params: TrainParams, seed_stream):
    """Random augmentation of a batch: float32 [n, h, w, 3] in [0, 1] -> same shape and range.

    Follows the original script: upscale by (1 + crop%) x random(1, 1 + scale%), crop back to
    size at a random place, maybe flip left-right, multiply brightness by 1 +/- brightness%.
    """
    import tensorflow as tf

    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    out = []
    for i in range(n):
        image = images[i]
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
        out.append(tf.clip_by_value(tf.convert_to_tensor(image), 0.0, 1.0))
    return tf.stack(out)


def train_head(module, lists: ImageLists, features: dict, size: tuple[int, int],
               params: TrainParams, summaries_dir: str | None = None, progress: bool = True):
    """Train the softmax layer; returns (weights [F, C], biases [C], metrics dict).

    Without augmentation it trains on cached features; with augmentation every batch is decoded,
    distorted and run through the module (slow, and the cache cannot be used).
    """
    import tensorflow as tf
    from tqdm import tqdm

    tf.random.set_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    train = [(p, c) for p, c in lists.paths("training") if p in features]
    valid = [(p, c) for p, c in lists.paths("validation") if p in features]
    if not train:
        raise RetrainError("no readable training images")
    feature_size = next(iter(features.values())).shape[-1]
    n_classes = len(lists.labels)
    weights = tf.Variable(tf.random.truncated_normal([feature_size, n_classes], stddev=0.001,
                                                     seed=params.seed), name="final_weights")
    biases = tf.Variable(tf.zeros([n_classes]), name="final_biases")
    optimizer = tf.keras.optimizers.Adam(params.learning_rate)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.matmul(x, weights) + biases
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y,
                                                                                logits=logits))
        grads = tape.gradient(loss, [weights, biases])
        optimizer.apply_gradients(zip(grads, [weights, biases]))
        return loss, tf.reduce_mean(tf.cast(tf.argmax(logits, 1) == y, tf.float32))

    def accuracy(items):
        if not items:
            return None
        x = np.stack([features[p] for p, _ in items])
        y = np.array([c for _, c in items])
        return float(np.mean(np.argmax(x @ weights.numpy() + biases.numpy(), 1) == y))

    writers = None
    if summaries_dir:
        writers = {k: tf.summary.create_file_writer(os.path.join(summaries_dir, k))
                   for k in ("train", "validation")}
    train_x = np.stack([features[p] for p, _ in train])
    train_y = np.array([c for _, c in train], dtype=np.int64)
    history = []
    with tqdm(total=params.how_many_training_steps, desc="training", unit="step",
              disable=not progress) as bar:
        for i in range(params.how_many_training_steps):
            idx = rng.integers(0, len(train), params.train_batch_size)
            if params.augment:
                images = np.stack([load_image_file(os.path.join(lists.image_dir, train[j][0]), size)
                                   for j in idx])
                x = module(distort(images, params, rng))
            else:
                x = tf.constant(train_x[idx])
            loss, acc = step(x, tf.constant(train_y[idx]))
            last = i + 1 == params.how_many_training_steps
            if (i + 1) % params.eval_step_interval == 0 or last:
                val = accuracy(valid)
                history.append({"step": i + 1, "loss": float(loss), "train_accuracy": float(acc),
                                "validation_accuracy": val})
                bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{val if val is not None else 0:.3f}")
                if writers:
                    with writers["train"].as_default():
                        tf.summary.scalar("cross_entropy", loss, step=i + 1)
                        tf.summary.scalar("accuracy", acc, step=i + 1)
                    if val is not None:
                        with writers["validation"].as_default():
                            tf.summary.scalar("accuracy", val, step=i + 1)
            bar.update()
    if writers:
        for w in writers.values():
            w.flush()
    metrics = {"train_accuracy": accuracy(train), "validation_accuracy": accuracy(valid),
               "history": history}
    return weights, biases, metrics


def export_saved_model(module, weights, biases, size: tuple[int, int], folder: str) -> None:
    """One SavedModel: ``serving_default(images [n, h, w, 3] in [0, 1]) -> probabilities``."""
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
            return {"probabilities": tf.nn.softmax(logits, name="final_result")}

    model = Classifier()
    tf.saved_model.save(model, folder, signatures={"serving_default": model.serve})


def export_frozen_graph(module, weights, biases, size: tuple[int, int], path: str) -> None:
    """A TF1-style frozen graph (input ``Placeholder``, output ``final_result``) for old tools."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2)

    @tf.function(input_signature=[tf.TensorSpec([None, size[0], size[1], 3], tf.float32,
                                                name="Placeholder")])
    def graph(Placeholder):  # noqa: N803 - the tensor name old clients look for
        logits = tf.matmul(module(Placeholder), weights) + biases
        return tf.nn.softmax(logits, name="final_result")

    frozen = convert_variables_to_constants_v2(graph.get_concrete_function())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(frozen.graph.as_graph_def().SerializeToString())


def evaluate(model_dir: str, lists: ImageLists, skipped: list[str], batch_size: int = 32,
             progress: bool = True) -> dict:
    """Test-set metrics of the exported model, loaded the way the server loads it."""
    from tqdm import tqdm

    from common.classifier import load_classifier

    clf = load_classifier(model_dir)
    items = [(p, c) for p, c in lists.paths("testing") if p not in skipped]
    n = len(lists.labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    misclassified = []
    for start in tqdm(range(0, len(items), batch_size), desc="testing", unit="batch",
                      disable=not progress or not items):
        chunk = items[start:start + batch_size]
        x = np.stack([load_image_file(os.path.join(lists.image_dir, p), clf.input_size)
                      for p, _ in chunk])
        scores = clf.predict(x)
        for (path, truth), row in zip(chunk, scores):
            guess = int(np.argmax(row))
            confusion[truth, guess] += 1
            if guess != truth:
                misclassified.append({"image": path, "label": lists.labels[truth],
                                      "predicted": lists.labels[guess],
                                      "score": round(float(row[guess]), 4)})
    total = int(confusion.sum())
    per_class = {}
    for i, label in enumerate(lists.labels):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": round(precision, 4), "recall": round(recall, 4),
                            "f1": round(f1, 4), "support": actual}
    return {"test_accuracy": round(float(np.trace(confusion)) / total, 4) if total else None,
            "test_images": total, "per_class": per_class,
            "confusion_matrix": {"labels": lists.labels, "rows_true_columns_predicted":
                                 confusion.tolist()},
            "misclassified": misclassified}


def draw_confusion_matrix(labels: list[str], matrix, path: str) -> None:
    """The confusion matrix as a PNG heat map (rows: true label, columns: predicted)."""
    from PIL import Image, ImageDraw

    m = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    cell, left, top = 48, 12 + 8 * max(len(s) for s in labels), 40
    img = Image.new("RGB", (left + cell * n + 20, top + cell * n + 12 + 8 * max(
        len(s) for s in labels)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), "rows: true label, columns: predicted", fill="black")
    row_sums = m.sum(axis=1, keepdims=True)
    share = np.divide(m, row_sums, out=np.zeros_like(m), where=row_sums > 0)
    for i in range(n):
        draw.text((6, top + i * cell + cell // 2 - 5), labels[i], fill="black")
        for j in range(n):
            v = share[i, j]
            colour = (int(255 - 200 * v), int(255 - 120 * v), 255) if i == j else \
                (255, int(255 - 200 * v), int(255 - 200 * v))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 2,
                   top + (i + 1) * cell - 2)
            draw.rectangle(box, fill=colour, outline=(200, 200, 200))
            draw.text((box[0] + 6, box[1] + cell // 2 - 6), str(int(m[i, j])),
                      fill="black" if v < 0.6 else "white")
    for j, label in enumerate(labels):
        for k, ch in enumerate(label):
            draw.text((left + j * cell + cell // 2 - 3, top + n * cell + 4 + 8 * k), ch,
                      fill="black")
    img.save(path)


@dataclass
class RetrainResult:
    output_dir: str
    model_json: dict
    report: dict
    feature_stats: FeatureStats


def retrain(image_dir: str, output_dir: str, module_handle: str = DEFAULT_MODULE,
            params: TrainParams = TrainParams(), bottleneck_dir: str | None = None,
            summaries_dir: str | None = None, input_size: int | None = None,
            name: str | None = None, version: str = "1", output_graph: str | None = None,
            output_labels: str | None = None, progress: bool = True) -> RetrainResult:
    """The whole pipeline: list and split images, features, train, export, evaluate."""
    started = time.perf_counter()
    lists = create_image_lists(image_dir, params.validation_percentage, params.testing_percentage)
    module = load_module(module_handle)
    size = module_input_size(module, module_handle, input_size)
    cache = os.path.join(bottleneck_dir, module_key(module_handle)) if bottleneck_dir else None
    if params.augment and bottleneck_dir:
        log.warning("augmentation is on: training images go through the module at every step; "
                    "the feature cache serves only validation and test images")
    features, stats = compute_features(module, lists, size, cache, params.feature_batch_size,
                                       progress)
    if stats.skipped:
        log.warning("skipped %d unreadable images", len(stats.skipped))
    weights, biases, train_metrics = train_head(module, lists, features, size, params,
                                                summaries_dir, progress)

    staging = output_dir.rstrip("/") + ".incoming"
    shutil.rmtree(staging, ignore_errors=True)
    export_saved_model(module, weights, biases, size, staging)
    with open(os.path.join(staging, "labels.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lists.labels) + "\n")
    evaluation = evaluate(staging, lists, stats.skipped, params.feature_batch_size, progress)
    accuracy = evaluation["test_accuracy"]
    if accuracy is not None and accuracy < params.min_test_accuracy:
        shutil.rmtree(staging, ignore_errors=True)
        raise RetrainError(f"test accuracy {accuracy:.4f} is below --min_test_accuracy "
                           f"{params.min_test_accuracy}; the model was not exported")

    counts = {split: len(lists.paths(split)) for split in ("training", "validation", "testing")}
    report = {
        "accuracy": accuracy, **evaluation,
        "validation_accuracy": train_metrics["validation_accuracy"],
        "train_accuracy": train_metrics["train_accuracy"],
        "training_history": train_metrics["history"],
        "images": counts, "skipped_images": stats.skipped,
        "features": {"computed": stats.computed, "cached": stats.cached,
                     "seconds": stats.seconds},
        "seconds": round(time.perf_counter() - started, 1),
    }
    model_json = {
        "name": name or os.path.basename(os.path.normpath(output_dir)),
        "version": str(version),
        "input_size": list(size),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_module": module_handle,
        "outputs": "probabilities",
        "metrics": {"test_accuracy": accuracy, "validation_accuracy":
                    train_metrics["validation_accuracy"],
                    "train_accuracy": train_metrics["train_accuracy"],
                    "test_images": evaluation["test_images"]},
        "training": {k: v for k, v in asdict(params).items()},
        "labels": len(lists.labels),
    }
    with open(os.path.join(staging, "model.json"), "w") as fh:
        json.dump(model_json, fh, indent=2)
    with open(os.path.join(staging, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    draw_confusion_matrix(lists.labels, evaluation["confusion_matrix"]
                          ["rows_true_columns_predicted"],
                          os.path.join(staging, "confusion_matrix.png"))
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)

    if output_graph:
        export_frozen_graph(module, weights, biases, size, output_graph)
    if output_labels:
        os.makedirs(os.path.dirname(os.path.abspath(output_labels)), exist_ok=True)
        shutil.copyfile(os.path.join(output_dir, "labels.txt"), output_labels)
    return RetrainResult(output_dir, model_json, report, stats)


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainParams()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_dir", required=True, help="folder with one sub-folder per category")
    p.add_argument("--tfhub_module", default=DEFAULT_MODULE,
                   help="TF Hub image feature-vector handle or URL, or a local SavedModel folder")
    p.add_argument("--output_dir", help="model folder to write, e.g. tf_files/flowers")
    p.add_argument("--output_graph", help="also write a TF1-style frozen graph (.pb) with "
                   "input 'Placeholder' and output 'final_result', for old tools")
    p.add_argument("--output_labels", help="also write the labels file here")
    p.add_argument("--bottleneck_dir", default="/tmp/bottleneck",
                   help="cache of feature vectors; '' to disable")
    p.add_argument("--summaries_dir", help="TensorBoard logs of loss and accuracy")
    p.add_argument("--input_size", type=int, help="module input side, when it cannot be told")
    p.add_argument("--how_many_training_steps", type=int,
                   default=defaults.how_many_training_steps)
    p.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    p.add_argument("--train_batch_size", type=int, default=defaults.train_batch_size)
    p.add_argument("--validation_percentage", type=int, default=defaults.validation_percentage)
    p.add_argument("--testing_percentage", type=int, default=defaults.testing_percentage)
    p.add_argument("--eval_step_interval", type=int, default=defaults.eval_step_interval)
    p.add_argument("--seed", type=int, default=defaults.seed)
    aug = "augmentation: every training step then runs the module on decoded images, so the " \
          "feature cache cannot be used for training and training is much slower"
    p.add_argument("--flip_left_right", action="store_true", help=f"random flips ({aug})")
    p.add_argument("--random_crop", type=int, default=0, help=f"%% margin to crop ({aug})")
    p.add_argument("--random_scale", type=int, default=0, help=f"%% to upscale ({aug})")
    p.add_argument("--random_brightness", type=int, default=0, help=f"%% brightness ({aug})")
    p.add_argument("--min_test_accuracy", type=float, default=0.0,
                   help="refuse to export a model whose test accuracy is lower")
    p.add_argument("--print_misclassified_test_images", action="store_true")
    p.add_argument("--name", help="model name in model.json (default: the folder name)")
    p.add_argument("--version", default="1", help="model version in model.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    output_dir = args.output_dir
    if not output_dir:
        if not args.output_graph:
            parser.error("give --output_dir (or the old --output_graph)")
        output_dir = os.path.splitext(args.output_graph)[0] + "_model"
    params = TrainParams(
        how_many_training_steps=args.how_many_training_steps, learning_rate=args.learning_rate,
        train_batch_size=args.train_batch_size,
        validation_percentage=args.validation_percentage,
        testing_percentage=args.testing_percentage, eval_step_interval=args.eval_step_interval,
        seed=args.seed, flip_left_right=args.flip_left_right, random_crop=args.random_crop,
        random_scale=args.random_scale, random_brightness=args.random_brightness,
        min_test_accuracy=args.min_test_accuracy)
    try:
        result = retrain(args.image_dir, output_dir, args.tfhub_module, params,
                         bottleneck_dir=args.bottleneck_dir or None,
                         summaries_dir=args.summaries_dir, input_size=args.input_size,
                         name=args.name, version=args.version, output_graph=args.output_graph,
                         output_labels=args.output_labels, progress=not args.quiet)
    except RetrainError as exc:
        print(f"retrain.py: error: {exc}", file=sys.stderr)
        return 2
    report = result.report
    if args.print_misclassified_test_images:
        for item in report["misclassified"]:
            print(f"misclassified: {item['image']} ({item['label']} -> {item['predicted']})")
    stats = result.feature_stats
    print(f"features: {stats.computed} computed, {stats.cached} from cache, "
          f"{len(stats.skipped)} skipped, {stats.seconds:.1f} s")
    print(f"test accuracy {report['accuracy']} on {report['test_images']} images; "
          f"model written to {result.output_dir} (report.json, confusion_matrix.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
