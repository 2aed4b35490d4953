"""The data plane: what every route and protocol adapter asks of the engine, with no web
framework (KServe's ``dataplane.py`` in spirit).

Every image that is classified goes through one pipeline, :meth:`DataPlane.infer` (TorchServe's
``handle()``: preprocess -> inference -> postprocess, composed once). Our own API's upload,
several-images upload and ``?image_url=`` call it through :meth:`DataPlane.classify`, which
shapes DESIGN.md's answer; TF Serving's ``:predict`` / ``:classify`` and the Open Inference
Protocol's ``infer`` call it directly and write its scores in their shapes. A request's path:

1. ``parse_options``: ``top_k`` / ``threshold`` checked before any work (400 when bad; our API);
2. the manager's precheck: the served version must be ready and its batcher must expect to
   start the request within ``QUEUE_MAX_WAIT_MS`` (503 + Retry-After otherwise), before the
   body is read or a URL downloaded: a refused request does no work; then the client's fair
   share (``fairshare.py``): while the model is pressed, a client holding its share already
   beside other clients is refused (429 + Retry-After), also before any work;
3. the body is read (parsed by the adapter), or the URL downloaded under ``fetch.py``'s rules,
   in one of ``BODIES_IN_FLIGHT`` slots and holding no room in the model's queue;
4. the images it holds are counted (``MAX_IMAGES_PER_REQUEST``) and the manager leases room
   for them in the version's queue (503 + Retry-After when they do not fit);
5. preprocess: ``classifier.preprocess``, bytes -> float32 ``[h, w, 3]`` in [0, 1] (4xx for bad
   bytes; a model that takes encoded images gets the bytes, once decoded and checked all the
   same; a pixel tensor sent to it is 400), the decode's memory estimated from the header and
   taken from ``DECODE_MEMORY_MB``;
   the bytes are stored in temp/ under their content hash (``storage.py``);
6. inference: ``lease.ticket.submit``, through the batcher, always (503 when timed out);
7. postprocess (our API): ``classifier.postprocess`` ranks ``[{"label", "score"}]``, and an
   uncertain answer is kept for review (``feedback.py``).
"""
from __future__ import annotations

import base64
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import numpy as np

from common.config import Config
from common.errors import (
    ApiError,
    EmptyImage,
    InvalidParameter,
    ModelNotReady,
    NotFound,
    Overloaded,
    TooManyImages,
)
from common.fairshare import FairShare
from common.feedback import Feedback
from common.fetch import UrlFetcher
from common.inference.classifier import Classifier, Options
from common.inference.images import DecodeBudget, DecodeLimits
from common.modelfolder import ONNX, file_sha256
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


@dataclass(frozen=True)
class Images:
    """A request's images as its adapter read them: encoded images (``list[bytes]``, decoded
    and stored like uploads) or a float32 ``[n, h, w, 3]`` batch in [0, 1] (the SavedModel's
    own input). An adapter's parsed request subclasses it to carry what else its body asks."""

    inputs: list[bytes] | np.ndarray


@dataclass(frozen=True)
class Inference:
    """One request after the pipeline.

    ``request`` is what the adapter's reader returned; ``classifier`` the version that served
    every image; ``scores`` float32 ``[n, labels]``, one row per image classified, in order.
    ``results`` has one dict per encoded image, in order: ``{"filename"}`` (the stored name;
    with ``"predictions"`` and ``"labels"`` when ranked) or ``{"error": {...}}`` (the error
    envelope's inner object) for an image that could not be classified; empty for a tensor.
    """

    request: Images
    classifier: Classifier
    scores: np.ndarray
    results: list[dict]


class DataPlane:
    """What every route needs: settings, the image store, the URL fetcher, feedback and the
    manager of served model versions. Every classification takes a :class:`Route` (which model,
    version or label; the default model when omitted).

    The web adapters are handed it when they are built; :meth:`attach` also keeps it in the
    app's ``extensions`` for the code Flask hands only the app (gunicorn's hooks, tests), which
    finds it with :meth:`of`.
    """

    _KEY = "dataplane"  # its key in the app's ``extensions``

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
        #: Each client's requests in flight in this worker (FAIR_SHARE; None when off).
        self.share = FairShare() if config.fair_share else None
        #: Under gunicorn, says which sibling workers are still loading (None: all warm);
        #: gunicorn.conf.py sets it (``WarmWorkers.waiting``).
        self.workers_waiting: Callable[[], str | None] = lambda: None

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
    def classify(self, read: Callable[[], list[bytes]], args: Mapping[str, str],
                 route: Route = Route(), started: float | None = None,
                 client: str | None = None) -> dict:
        """Our API: the images ``read()`` returns (an upload's body, its multipart ``image``
        parts, or a URL's download) -> DESIGN.md's 200 answer, ranked by the ``top_k`` and
        ``threshold`` in ``args``; ``elapsed_ms`` counts from ``started``. ``client`` (see
        :meth:`infer`) is who asks, for the fair share.

        One image gets the single-image answer; several get one result per image, in order:
        the single-image answer's ``filename``/``predictions``/``labels``, or ``{"error":
        {...}}`` for an image that could not be classified; one version serves them all.
        """
        started = time.perf_counter() if started is None else started
        options = parse_options(args, self.config.top_k)
        done = self.infer(lambda: Images(read()), route, options, client)
        model = done.classifier.describe()
        if len(done.results) > 1:
            return {"model": model, "results": done.results, "elapsed_ms": _since(started)}
        (result,) = done.results
        return {"filename": result["filename"], "model": model,
                "predictions": result["predictions"], "labels": result["labels"],
                "elapsed_ms": _since(started)}

    def infer(self, read: Callable[[], Images], route: Route = Route(),
              options: Options | None = None, client: str | None = None) -> Inference:
        """The pipeline every classification runs: ``read()`` the request's images when
        :meth:`_leased` allows, preprocess them, submit them to the batcher, and, with
        ``options`` (our API), postprocess: rank each image and keep an uncertain one for
        review.

        With ``options``, several images are answered one by one (a bad image gets its error in
        :attr:`Inference.results`); without (the protocols), one bad image fails the request
        (400/413/415/422, as a tensor call would), and so does a tensor whose shape does not
        fit the model (400).

        ``client`` is who asks (``common/web/clients.py``: ``"key:<name>"`` or
        ``"addr:<ip>"``): while the model is pressed, a client over its fair share is refused
        (429) before its body is read. None: no share (scripts, tests).
        """
        with self._leased(route, read, client) as (lease, request):
            classifier = lease.classifier
            if isinstance(request.inputs, list):
                one_by_one = options is not None and len(request.inputs) > 1
                results, arrays = self._preprocess(classifier, request.inputs, one_by_one)
            else:
                results, arrays = [], _tensor_rows(classifier, request.inputs)
            scores = lease.ticket.submit(arrays)
            if options is not None:
                self._postprocess(classifier, results, scores, options)
        stacked = (np.stack(scores) if scores
                   else np.zeros((0, len(classifier.labels)), np.float32))
        return Inference(request, classifier, stacked, results)

    @contextmanager
    def _leased(self, route: Route, read: Callable[[], Images],
                client: str | None = None) -> Iterator[tuple[Lease, Images]]:
        """Admit -> read -> count -> lease, the way every classification gets its images.

        First the route is checked as the lease would check it (404; 503 when the version is
        not ready or its queue would refuse), then the client's fair share (429 while the model
        is pressed and the client holds its share already), so a refused request reads
        nothing; the request then counts in its client's share until it is answered. ``read()``
        then reads the body (or downloads the URL) in one of ``BODIES_IN_FLIGHT`` slots (503
        when all are taken), holding no room in the model's queue: a slow upload or download
        delays only itself. The images it holds are counted (400 for none, or past
        ``MAX_IMAGES_PER_REQUEST``), and the lease takes room for them (503 when they do not
        fit) until the context ends.
        """
        self.manager.precheck(route)
        with self._fair_share(route, client) as served:
            with self.bodies:
                request = read()
            count = served[0] = len(request.inputs)
            if count == 0:
                raise InvalidParameter("no images in the request")
            if count > self.config.max_images_per_request:
                raise TooManyImages(f"at most {self.config.max_images_per_request} images in "
                                    f"one request (MAX_IMAGES_PER_REQUEST), got {count}")
            with self.manager.lease(route, count) as lease:
                yield lease, request

    @contextmanager
    def _fair_share(self, route: Route, client: str | None) -> Iterator[list[int]]:
        """Count the request in ``client``'s share while it runs; refuse it first (429,
        paced by the version's batcher) when that version's model is pressed and the client
        is over its share. Yields ``[images]``, which the caller sets once the body is read,
        so that the client's rate counts images, not requests. Nothing without a client or
        with FAIR_SHARE off."""
        served = [1]
        if client is None or self.share is None:
            yield served
            return
        batcher = self.manager.find(route).running().batcher
        if not self.share.enter(client, batcher.pressed()):
            batcher.refuse_over_share()
        try:
            yield served
        finally:
            self.share.leave(client, images=served[0])

    def _preprocess(self, classifier: Classifier, inputs: list[bytes],
                    one_by_one: bool) -> tuple[list[dict], list[np.ndarray]]:
        """Encoded images -> (``[{"filename"} or {"error"}]`` per image, the model inputs of
        those that decoded: float32 ``[h, w, 3]`` in [0, 1]). Each is stored under its content
        hash. 400 when empty, 413/415/422 from decoding: raised, or with ``one_by_one`` kept
        in that image's result."""
        results, arrays = [], []
        for data in inputs:
            try:
                if not data:
                    raise EmptyImage()
                array, decoded = classifier.preprocess(data, self.decode_limits)
                results.append({"filename": self.store.save(data, decoded.extension)})
                arrays.append(array)
            except ApiError as err:
                if not one_by_one:
                    raise
                results.append({"error": err.to_dict()["error"]})
        return results, arrays

    def _postprocess(self, classifier: Classifier, results: list[dict],
                     scores: list[np.ndarray], options: Options) -> None:
        """Rank each classified image's scores into its result (``predictions``, and
        ``labels`` in the same order) and keep it for review when its top score is low."""
        rows = iter(scores)
        for result in results:
            if "error" not in result:
                image_scores = next(rows)
                predictions = classifier.postprocess(image_scores, options)
                self.feedback.review(result["filename"], classifier, image_scores)
                result.update(predictions=predictions,
                              labels={p["label"]: p["score"] for p in predictions})

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
        return {"default_model": self.manager.default_name, "models": self.model_status(),
                "config_error": self.manager.settings_error()}

    def model_status(self, name: str | None = None) -> list[dict]:
        """Every model (or ``name``; 404 when unknown): its versions, newest first, each
        ``{"version": int, "state", "error"}``, its labels and its version policy."""
        return self.manager.status(name)

    def served(self, route: Route) -> ServedVersion:
        """The served version ``route`` names (404 when none), for status and metadata;
        classifying goes through :meth:`infer`."""
        return self.manager.find(route)

    # -- the repository extension ---------------------------------------------------------------
    def repository_index(self) -> list[dict]:
        """Every version on disk or served, ``{"name", "version": int, "state", "reason"}``
        (``Manager.index``)."""
        return self.manager.index()

    def load_model(self, name: str) -> None:
        """Serve model ``name`` again in every worker; returns once it has loaded (404 unknown,
        400 failed to load: ``Manager.request_load``)."""
        self.manager.request_load(name)

    def unload_model(self, name: str) -> None:
        """Stop serving model ``name`` in every worker until it is loaded again
        (``Manager.request_unload``)."""
        self.manager.request_unload(name)

    # -- the model ------------------------------------------------------------------------------
    def readiness(self) -> dict:
        """``/readyz``'s answer when the default model is ready; its 503 error otherwise."""
        health = self.manager.ready()
        if not health.ready:
            raise health.error()
        waiting = self.workers_waiting()
        if waiting:
            raise ModelNotReady(waiting)
        clf = self.model.classifier
        return {"status": "ready", "model": clf.describe(), "labels": len(clf.labels),
                "input_size": list(clf.input_size)}

    def model_summary(self) -> dict:
        """Name, version, labels, metrics and, when the folder has report.json, its summary."""
        clf = self.model.classifier
        return {**clf.describe(), "labels": list(clf.labels), "input_size": list(clf.input_size),
                "metrics": clf.metadata.get("metrics", {}),
                "evaluation": clf.folder.evaluation_summary() if clf.folder else None,
                "runtime": clf.runtime, "input": clf.describe_input(),
                "preprocessing": clf.spec.as_dict(), "onnx": self.onnx_export()}

    def onnx_export(self) -> dict | None:
        """The folder's verified model.onnx for the page's in-browser mode: its URL (versioned
        by its hash), size and Subresource Integrity hash; None without one."""
        found = self.onnx_file(required=False)
        if found is None:
            return None
        path, sha256 = found
        clf = self.model.classifier
        return {"url": f"/model/{ONNX}?v={sha256[:16]}", "bytes": os.path.getsize(path),
                "sha256": sha256, "integrity": "sha256-" + digest_b64(sha256),
                "outputs": clf.outputs, "preprocessing": clf.spec.as_dict(),
                "input": clf.describe_input()}

    def onnx_file(self, required: bool = True) -> tuple[str, str] | None:
        """(path, sha256) of the model.onnx the page may run: our own verified export, or an
        imported ONNX model whose weights are inside the file (an external data file is not
        handed out); 404 (or None) when there is none."""
        clf = self.model.classifier
        folder = clf.folder if clf.folder and clf.folder.folder else None
        found = folder.verified_export("onnx") if folder else None
        if found is not None:
            found = (found[0], found[1]["sha256"])
        elif folder is not None and folder.format == "onnx" and not folder.external_data():
            path = folder.public_file(ONNX)
            found = (path, file_sha256(path)) if path else None
        if found is None and required:
            raise NotFound(f"this model has no {ONNX} a browser can run")
        return found

    def model_file(self, name: str) -> str:
        """Path of one of the model folder's public files (404 when it has none)."""
        clf = self.model.classifier
        path = clf.folder.public_file(name) if clf.folder else None
        if path is None:
            raise NotFound(f"this model has no {name}")
        return path

    def close(self) -> None:
        self.manager.close()


def _tensor_rows(classifier: Classifier, inputs: np.ndarray) -> list[np.ndarray]:
    """A tensor batch as the model takes it (``[n, *input_shape]``: for our own models float
    ``[n, h, w, 3]`` in [0, 1]; an imported model's own layout and scaling, as its metadata
    says) -> its rows in the model's dtype; 400 when its shape does not fit, or a uint8
    model's values are not whole numbers 0..255, and for a model that takes encoded images
    (it has no pixel tensor input: send the images as BYTES / base64)."""
    if classifier.spec.encoded:
        raise pixels_refused(classifier.input_name)
    batch = np.asarray(inputs)
    expected = classifier.input_shape
    if batch.ndim != 4 or batch.shape[1:] != expected:
        raise InvalidParameter(f"expected a tensor [n, {', '.join(map(str, expected))}] "
                               f"({classifier.spec.layout}), got shape {list(batch.shape)}")
    dtype = classifier.spec.numpy_dtype
    if dtype == np.uint8 and (np.any(batch < 0) or np.any(batch > 255)
                              or np.any(np.rint(batch) != batch)):
        raise InvalidParameter("this model takes uint8 pixels: whole numbers 0..255")
    return list(batch.astype(dtype, copy=False))


def pixels_refused(input_name: str) -> InvalidParameter:
    """The 400 for a pixel tensor sent to a model that takes encoded images."""
    return InvalidParameter(f"this model takes encoded images (its input {input_name!r} is a "
                            f"string of JPEG/PNG bytes), not a tensor of pixels: send each "
                            f"image's bytes (BYTES, or base64 as {{\"b64\": ...}})")


def _since(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()``), to 0.1 ms."""
    return round((time.perf_counter() - started) * 1000.0, 1)
