"""The data plane: one plain method per route, bytes or a URL in, the response dict out.

No web framework here (KServe's ``dataplane.py`` in spirit): the views parse HTTP and call one
method of :class:`Service`; the protocol adapters of later issues will do the same. A request's
path, top to bottom:

1. ``parse_options``: ``top_k`` / ``threshold`` checked before any work (400 when bad);
2. admission: the served model must be ready and its batcher must expect to start the request
   within ``QUEUE_MAX_WAIT_MS`` (503 + Retry-After otherwise), before the body is read or a
   URL downloaded: a refused request does no work and stores nothing;
3. the body is read, or the URL downloaded under ``fetch.py``'s rules;
4. ``classifier.preprocess``: bytes -> float32 ``[h, w, 3]`` in [0, 1] (4xx for bad bytes);
5. the bytes are stored in temp/ under their content hash (``storage.py``);
6. ``admission.infer``: through the batcher, always (503 when timed out);
7. ``classifier.postprocess``: ranked ``[{"label", "score"}]``, shaped into DESIGN.md's answer.
"""
from __future__ import annotations

import base64
import os
import time
from typing import Callable, Mapping

from .classifier import Options
from .config import Config
from .errors import EmptyImage, InvalidParameter, NotFound
from .fetch import UrlFetcher
from .modelfolder import ONNX, LegacyGraph, ModelFolder
from .served import Admission, ServedModel
from .storage import ImageStore


def parse_options(args: Mapping[str, str], default_top_k: int | None = None) -> Options:
    """Validate the ``top_k`` and ``threshold`` query parameters (400 when bad)."""
    top_k = _parameter(args, "top_k", int, lambda v: v >= 1, "an integer >= 1")
    threshold = _parameter(args, "threshold", float, lambda v: 0.0 <= v <= 1.0,  # refuses nan
                           "a number in [0, 1]")
    return Options(top_k=default_top_k if top_k is None else top_k, threshold=threshold)


def _parameter(args: Mapping[str, str], name: str, cast, valid, expected: str):
    raw = args.get(name)
    if raw is None:  # absent; present but empty ("top_k=") is invalid like any other non-number
        return None
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise InvalidParameter(f"{name} must be {expected}, got {raw[:40]!r}")
    return value


def digest_b64(sha256_hex: str) -> str:
    """A hex SHA-256 in base64, as Subresource Integrity and Repr-Digest write it."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def model_folder(config: Config) -> ModelFolder:
    """The model folder ``MODEL_PATH`` names, with the legacy-graph settings."""
    return ModelFolder(config.model_path, labels_path=config.labels_path, legacy=LegacyGraph(
        input_layer=config.input_layer, output_layer=config.output_layer,
        input_mean=config.input_mean, input_std=config.input_std,
        input_size=config.input_size))


class Service:
    """What every route needs: settings, the image store, the URL fetcher, the served model.

    ``Service.of(app)`` is the one way to reach it from an app (views, gunicorn's hooks, tests).
    """

    _KEY = "classifier_service"  # its key in the app's ``extensions``

    def __init__(self, config: Config, model: ServedModel, store: ImageStore,
                 fetcher: UrlFetcher, metrics):
        self.config = config
        self.model = model
        self.store = store
        self.fetcher = fetcher
        self.metrics = metrics

    def attach(self, app) -> "Service":
        app.extensions[self._KEY] = self
        return self

    @classmethod
    def of(cls, app) -> "Service":
        return app.extensions[cls._KEY]

    # -- classification -------------------------------------------------------------------------
    def classify_upload(self, read_body: Callable[[], bytes], args: Mapping[str, str],
                        started: float | None = None) -> dict:
        """An uploaded image -> DESIGN.md's 200 answer. ``read_body`` is called only once the
        request is admitted: a refused request never reads its body."""
        options = parse_options(args, self.config.top_k)
        with self.model.admit(1) as admission:
            return self._classify(admission, read_body(), options, started)

    def classify_url(self, url: str, args: Mapping[str, str],
                     started: float | None = None) -> dict:
        """An image URL, downloaded only once the request is admitted -> the answer."""
        options = parse_options(args, self.config.top_k)
        with self.model.admit(1) as admission:
            return self._classify(admission, self.fetcher.fetch(url), options, started)

    def _classify(self, admission: Admission, data: bytes, options: Options,
                  started: float | None) -> dict:
        started = time.perf_counter() if started is None else started
        if not data:
            raise EmptyImage()
        classifier = admission.classifier
        array, decoded = classifier.preprocess(data, self.config.max_image_pixels)
        filename = self.store.save(data, decoded.extension)
        predictions = classifier.postprocess(admission.infer(array), options)
        return {
            "filename": filename,
            "model": classifier.describe(),
            "predictions": predictions,
            "labels": {p["label"]: p["score"] for p in predictions},
            "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 1),
        }

    # -- the model ------------------------------------------------------------------------------
    def readiness(self) -> dict:
        """``/readyz``'s answer when the model is ready; its 503 error otherwise."""
        health = self.model.health()
        if not health.ready:
            raise health.error()
        clf = self.model.classifier
        return {"status": "ready", "model": clf.describe(), "labels": len(clf.labels),
                "input_size": list(clf.input_size)}

    def model_summary(self) -> dict:
        """Name, version, labels, metrics and, when the folder has report.json, its summary."""
        clf = self.model.classifier
        return {**clf.describe(), "labels": list(clf.labels), "input_size": list(clf.input_size),
                "metrics": clf.metadata.get("metrics", {}),
                "evaluation": clf.folder.evaluation_summary() if clf.folder else None,
                "runtime": clf.runtime, "onnx": self.onnx_export()}

    def onnx_export(self) -> dict | None:
        """The folder's verified model.onnx for the page's in-browser mode: its URL (versioned
        by its hash), size and Subresource Integrity hash; None without one."""
        found = self.onnx_file(required=False)
        if found is None:
            return None
        path, sha256 = found
        return {"url": f"/model/{ONNX}?v={sha256[:16]}", "bytes": os.path.getsize(path),
                "sha256": sha256, "integrity": "sha256-" + digest_b64(sha256),
                "outputs": self.model.classifier.outputs}

    def onnx_file(self, required: bool = True) -> tuple[str, str] | None:
        """(path, sha256) of the verified model.onnx; 404 (or None) when there is none."""
        clf = self.model.classifier
        found = clf.folder.verified_export("onnx") if clf.folder and clf.folder.folder else None
        if found is None and required:
            raise NotFound(f"this model has no verified {ONNX}")
        return None if found is None else (found[0], found[1]["sha256"])

    def model_file(self, name: str) -> str:
        """Path of one of the model folder's public files (404 when it has none)."""
        clf = self.model.classifier
        path = clf.folder.public_file(name) if clf.folder else None
        if path is None:
            raise NotFound(f"this model has no {name}")
        return path

    def close(self) -> None:
        self.model.close()
