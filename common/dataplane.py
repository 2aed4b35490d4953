"""The data plane: one plain method per route, bytes or a URL in, the response dict out.

No web framework here (KServe's ``dataplane.py`` in spirit): the views parse HTTP and call one
method of :class:`DataPlane`; so do the protocol adapters. A request's
path, top to bottom:

1. ``parse_options``: ``top_k`` / ``threshold`` checked before any work (400 when bad);
2. a check as admission would make it: the served model must be ready and its batcher must
   expect to start the request within ``QUEUE_MAX_WAIT_MS`` (503 + Retry-After otherwise),
   before the body is read or a URL downloaded: a refused request does no work;
3. the body is read, or the URL downloaded under ``fetch.py``'s rules, in one of
   ``BODIES_IN_FLIGHT`` slots and holding no room in the model's queue;
4. admission for the images the body holds (503 + Retry-After when they do not fit);
5. ``classifier.preprocess``: bytes -> float32 ``[h, w, 3]`` in [0, 1] (4xx for bad bytes),
   the decode's memory estimated from the header and reserved from ``DECODE_MEMORY_MB``;
6. the bytes are stored in temp/ under their content hash (``storage.py``);
7. ``lease.ticket.submit``: through the batcher, always (503 when timed out);
8. ``classifier.postprocess``: ranked ``[{"label", "score"}]``, shaped into DESIGN.md's answer.
"""
from __future__ import annotations

import base64
import os
import threading
import time
from typing import Callable, Mapping

from common.config import Config
from common.errors import (
    ApiError,
    EmptyImage,
    InvalidParameter,
    NotFound,
    Overloaded,
    TooManyImages,
)
from common.feedback import Feedback
from common.fetch import UrlFetcher
from common.inference.classifier import Options
from common.inference.images import DecodeBudget, DecodeLimits
from common.modelfolder import ONNX
from common.storage import ImageStore
from common.versions.manager import Lease, Manager, Route
from common.versions.served import ServedVersion


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


class Slots:
    """At most ``limit`` holders at once (a context manager); one more is refused at once with
    503 (Overloaded, ``Retry-After: 1``) instead of waiting. Thread-safe."""

    def __init__(self, limit: int, what: str, setting: str):
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)
        self._message = f"{limit} {what} in this worker already ({setting}); retry"

    def __enter__(self) -> "Slots":
        if not self._free.acquire(blocking=False):
            raise Overloaded(self._message)
        return self

    def __exit__(self, *exc) -> None:
        self._free.release()


def digest_b64(sha256_hex: str) -> str:
    """A hex SHA-256 in base64, as Subresource Integrity and Repr-Digest write it."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


class DataPlane:
    """What every route needs: settings, the image store, the URL fetcher, the manager of
    served model versions.

    ``DataPlane.of(app)`` is the one way to reach it from an app (views, protocol adapters,
    gunicorn's hooks, tests). Every classification method takes a :class:`Route` (which model,
    version or label; the default model when omitted).
    """

    _KEY = "classifier_service"  # its key in the app's ``extensions``

    def __init__(self, config: Config, manager: Manager, store: ImageStore,
                 fetcher: UrlFetcher, metrics):
        self.config = config
        self.manager = manager
        self.store = store
        self.fetcher = fetcher
        self.metrics = metrics
        self.feedback = Feedback.from_config(config, store)
        self.decode_limits = DecodeLimits(config.max_image_pixels,
                                          DecodeBudget(config.decode_memory_bytes))
        self.bodies = Slots(config.body_slots, "request bodies are being received",
                            "BODIES_IN_FLIGHT")

    def attach(self, app) -> "DataPlane":
        app.extensions[self._KEY] = self
        return self

    @classmethod
    def of(cls, app) -> "DataPlane":
        return app.extensions[cls._KEY]

    @property
    def model(self) -> ServedVersion:
        """The default model's served version (the page, ``/model``)."""
        return self.manager.default()

    # -- classification -------------------------------------------------------------------------
    def classify_upload(self, read_body: Callable[[], bytes], args: Mapping[str, str],
                        started: float | None = None, route: Route = Route()) -> dict:
        """An uploaded image -> DESIGN.md's 200 answer (see :meth:`_receive` for when
        ``read_body`` is called)."""
        options = parse_options(args, self.config.top_k)
        data = self._receive(route, read_body)
        with self.manager.lease(route, 1) as lease:
            return self._classify(lease, data, options, started)

    def classify_url(self, url: str, args: Mapping[str, str],
                     started: float | None = None, route: Route = Route()) -> dict:
        """An image URL, downloaded like an upload's body is read -> the answer."""
        options = parse_options(args, self.config.top_k)
        data = self._receive(route, lambda: self.fetcher.fetch(url))
        with self.manager.lease(route, 1) as lease:
            return self._classify(lease, data, options, started)

    def classify_many(self, read_images: Callable[[], list[bytes]], args: Mapping[str, str],
                      started: float | None = None, route: Route = Route()) -> dict:
        """Uploaded images of one request: one image gets the single-image answer, several get
        one result per image, in order.

        Admitted for all of them once they are read (``MAX_IMAGES_PER_REQUEST`` at most, 400
        past it; 503 when they do not fit). Each result is the single-image answer's
        ``filename``/``predictions``/``labels``, or ``{"error": {...}}`` (the error envelope's
        inner object) for an image that could not be classified; one version serves them all.
        """
        started = time.perf_counter() if started is None else started
        options = parse_options(args, self.config.top_k)
        images = self._receive(route, read_images)
        if len(images) == 1:  # one image: the single-image answer
            with self.manager.lease(route, 1) as lease:
                return self._classify(lease, images[0], options, started)
        self._check_count(len(images))
        with self.manager.lease(route, len(images)) as lease:
            classifier = lease.classifier
            results: list[dict] = []
            arrays = []
            for data in images:
                try:
                    array, filename = self._prepare(classifier, data)
                    results.append({"filename": filename})
                    arrays.append(array)
                except ApiError as err:
                    results.append({"error": err.to_dict()["error"]})
            scores = iter(lease.ticket.submit_many(arrays))
            for result in results:
                if "error" not in result:
                    image_scores = next(scores)
                    predictions = classifier.postprocess(image_scores, options)
                    self.feedback.review(result["filename"], classifier, image_scores)
                    result.update(predictions=predictions,
                                  labels={p["label"]: p["score"] for p in predictions})
            return {"model": classifier.describe(), "results": results,
                    "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 1)}

    def infer(self, read_inputs: Callable[[], "list[bytes] | np.ndarray"],
              route: Route = Route()):
        """A protocol request (TF Serving, Open Inference Protocol) -> ``(classifier,
        [n, labels] scores)``, through the batcher.

        ``read_inputs`` reads and parses the body (see :meth:`_receive` for when); the request
        is then admitted for the images it counted (``MAX_IMAGES_PER_REQUEST`` at most, 400
        past it; 503 when they do not fit). It returns either encoded images (base64 or binary
        elements; decoded and stored like uploads) or a float32 ``[n, h, w, 3]`` batch in
        ``[0, 1]`` (the SavedModel's own input). Unlike :meth:`classify_many`, one bad image
        fails the request (400/413/415/422, as a tensor call would), and so does a tensor whose
        shape does not fit the model (400).
        """
        import numpy as np

        inputs = self._receive(route, read_inputs)
        if len(inputs) == 0:
            raise InvalidParameter("no images in the request")
        self._check_count(len(inputs))
        with self.manager.lease(route, len(inputs)) as lease:
            classifier = lease.classifier
            if isinstance(inputs, list):
                arrays = [self._prepare(classifier, data)[0] for data in inputs]
            else:
                batch = np.asarray(inputs, dtype=np.float32)
                expected = (*classifier.input_size, 3)
                if batch.ndim != 4 or batch.shape[1:] != expected:
                    raise InvalidParameter(f"expected a float tensor [n, {expected[0]}, "
                                           f"{expected[1]}, 3], got shape {list(batch.shape)}")
                arrays = list(batch)
            return classifier, np.stack(lease.ticket.submit_many(arrays))

    def _receive(self, route: Route, read: Callable):
        """``read()`` the request's body (or download its URL), the way every classification
        request gets its images.

        First the route is checked as admission would check it (404; 503 when the version is
        not ready or its queue would refuse), so a refused request reads nothing. The body is
        then read in one of ``BODIES_IN_FLIGHT`` slots (503 when all are taken), holding no
        room in the model's queue: a slow upload or download delays only itself. The caller
        is admitted once the body has arrived."""
        self.manager.precheck(route)
        with self.bodies:
            return read()

    def _check_count(self, count: int) -> None:
        if count > self.config.max_images_per_request:
            raise TooManyImages(f"at most {self.config.max_images_per_request} images in one "
                                f"request (MAX_IMAGES_PER_REQUEST), got {count}")

    def _prepare(self, classifier, data: bytes):
        """One uploaded or downloaded image -> ``(model input, stored file name)``: decoded and
        preprocessed for ``classifier`` (float32 ``[h, w, 3]`` in ``[0, 1]``), and stored.
        400 when empty; 413/415/422 from decoding."""
        if not data:
            raise EmptyImage()
        array, decoded = classifier.preprocess(data, self.decode_limits)
        return array, self.store.save(data, decoded.extension)

    def _classify(self, lease: Lease, data: bytes, options: Options,
                  started: float | None) -> dict:
        started = time.perf_counter() if started is None else started
        classifier = lease.classifier
        array, filename = self._prepare(classifier, data)
        scores = lease.ticket.submit(array)
        predictions = classifier.postprocess(scores, options)
        self.feedback.review(filename, classifier, scores)
        return {
            "filename": filename,
            "model": classifier.describe(),
            "predictions": predictions,
            "labels": {p["label"]: p["score"] for p in predictions},
            "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 1),
        }

    # -- feedback -------------------------------------------------------------------------------
    def record_feedback(self, read_fields: Callable[[], Mapping]) -> tuple[dict, bool]:
        """``POST /feedback``: ``read_fields()`` reads the body (in a ``BODIES_IN_FLIGHT``
        slot) into ``filename``, ``label`` and optionally ``model``, ``version`` (default: the
        default model), ``predicted`` and ``score``. Returns (answer, created); see
        :meth:`common.feedback.Feedback.record`."""
        self.feedback.require()  # 403 when off, before the body is read or the model looked at
        with self.bodies:
            fields = read_fields()
        name, version = fields.get("model"), fields.get("version")
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 100):
            raise InvalidParameter("model must be a model's name")
        if version is not None:
            text = str(version) if type(version) is int else version  # JSON or form
            if not isinstance(text, str) or not text.isdecimal() or int(text) < 1:
                raise InvalidParameter(f"version must be an integer >= 1, got {text!r:.40}")
            version = int(text)
        classifier = self.manager.find(Route(name or None, version)).classifier
        with self.feedback.writing():  # a few at once per worker (503 beyond)
            return self.feedback.record(fields.get("filename"), fields.get("label"),
                                        classifier.describe(), classifier.labels,
                                        fields.get("predicted"), fields.get("score"))

    # -- models ---------------------------------------------------------------------------------
    def models(self) -> dict:
        """``GET /models``: every model, its versions (state, error), labels and policy."""
        return {"default_model": self.manager.default_name, "models": self.manager.status(),
                "config_error": self.manager.settings_error()}

    # -- the model ------------------------------------------------------------------------------
    def readiness(self) -> dict:
        """``/readyz``'s answer when the default model is ready; its 503 error otherwise."""
        health = self.manager.ready()
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
        self.manager.close()
