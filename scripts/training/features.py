"""The frozen feature extractor (a TF Hub image feature-vector module) and its feature cache.

A module maps float32 ``[n, h, w, 3]`` images in ``[0, 1]`` to float32 ``[n, F]`` feature
vectors ("bottlenecks"). Features are cached per (module, file content) as ``.npy`` files, so a
second run over the same images does not call the module.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

from common.errors import ApiError
from common.inference.images import load_image_file
from common.inference.runtimes.tfruntime import static_size

from . import hub
from .data import ImageLists, RetrainError

log = logging.getLogger(__name__)

DEFAULT_MODULE = "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/5"
#: Input sizes of well-known TF Hub modules whose signature does not fix the size.
KNOWN_INPUT_SIZES = {"inception_v3": 299, "inception_resnet_v2": 299, "nasnet_large": 331,
                     "pnasnet_large": 331, "efficientnet/b0": 224, "resnet_v2_50": 224}


@dataclass
class FeatureStats:
    """How the features were obtained in one run."""

    computed: int = 0  # images run through the module
    cached: int = 0  # images read from the cache
    skipped: list[str] = field(default_factory=list)  # relative paths that could not be decoded
    seconds: float = 0.0


def load_module(handle: str, progress: bool = True):
    """Load a TF Hub image feature vector (handle, URL or local folder) as ``hub.load`` does
    (see :mod:`.hub`: the tensorflow_hub package would bring a second TensorFlow)."""
    return hub.load(handle, progress=progress)


def module_input_size(module, handle: str, override: int | None = None) -> tuple[int, int]:
    """The module's input (height, width): the flag, the traced signature, or a known handle."""
    if override:
        return (override, override)
    call = getattr(module, "__call__", None)
    for concrete in getattr(call, "concrete_functions", []) or []:
        args = concrete.structured_input_signature[0]
        if args and hasattr(args[0], "shape"):
            size = static_size(args[0].shape)
            if size:
                return size
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


def feature_cache_dir(bottleneck_dir: str | None, handle: str) -> str | None:
    """The cache folder of one module under ``bottleneck_dir`` (None: no cache)."""
    return os.path.join(bottleneck_dir, module_key(handle)) if bottleneck_dir else None


def compute_features(module, lists: ImageLists, size: tuple[int, int], cache_dir: str | None,
                     batch_size: int = 32, progress: bool = True):
    """Features of every listed image, cached per (module, file content).

    Images are decoded at ``size`` = (height, width) as float32 ``[h, w, 3]`` in ``[0, 1]``
    (the server's preprocessing) and run through the module ``batch_size`` at a time.
    Returns ``({rel_path: float32 [F]}, FeatureStats)``. An image that cannot be decoded
    is skipped with a warning and counted; a second run over the same images reads the cache and
    does not call the module.
    """
    stats = FeatureStats()
    started = time.perf_counter()
    features: dict[str, np.ndarray] = {}
    pending = _read_cache(lists, cache_dir, features, stats)
    _extract(module, lists, size, pending, batch_size, features, stats, progress)
    stats.seconds = round(time.perf_counter() - started, 2)
    return features, stats


def _cache_path(cache_dir: str, rel_path: str, data_hash: str) -> str:
    return os.path.join(cache_dir, rel_path + f".{data_hash[:12]}.npy")


def _read_cache(lists: ImageLists, cache_dir: str | None, features: dict,
                stats: FeatureStats) -> list[tuple[str, str | None]]:
    """Fill ``features`` from the cache; returns ``[(rel_path, cache file or None)]`` still to
    compute."""
    pending: list[tuple[str, str | None]] = []
    for rel in lists.all_paths():
        cached = None
        if cache_dir:
            with open(os.path.join(lists.image_dir, rel), "rb") as fh:
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
    return pending


def _extract(module, lists: ImageLists, size: tuple[int, int],
             pending: list[tuple[str, str | None]], batch_size: int, features: dict,
             stats: FeatureStats, progress: bool) -> None:
    """Run the module over ``pending`` in batches, with a progress bar; saves to the cache."""
    from tqdm import tqdm

    with tqdm(total=len(pending), desc="extracting features", unit="img",
              disable=not progress or not pending) as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            _extract_batch(module, lists, size, chunk, features, stats)
            bar.update(len(chunk))


def _extract_batch(module, lists: ImageLists, size: tuple[int, int],
                   chunk: list[tuple[str, str | None]], features: dict,
                   stats: FeatureStats) -> None:
    """Decode one batch (skipping unreadable images), run the module, store and cache."""
    import tensorflow as tf

    decoded, arrays = [], []
    for rel, cached in chunk:
        try:
            arrays.append(load_image_file(os.path.join(lists.image_dir, rel), size))
            decoded.append((rel, cached))
        except (ApiError, OSError) as exc:
            log.warning("skipping unreadable image %s: %s", rel, exc)
            stats.skipped.append(rel)
    if not arrays:
        return
    out = module(tf.constant(np.stack(arrays))).numpy().astype(np.float32)  # [n, F]
    for (rel, cached), vector in zip(decoded, out):
        features[rel] = vector
        if cached:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            np.save(cached, vector)
    stats.computed += len(arrays)
