"""Retraining as a library: the pipeline behind ``scripts/retrain.py``.

Modules, in pipeline order:

* :mod:`.data`: list a folder of category sub-folders and split it by file-name hash;
* :mod:`.features`: load the TF Hub feature module, compute and cache its features;
* :mod:`.train`: train the new softmax layer (optionally on distorted images);
* :mod:`.export`: write the SavedModel (and a legacy frozen graph);
* :mod:`.evaluate`: test-split metrics of the exported folder, loaded as the server loads it;
* :mod:`.report`: report.json / model.json contents and the confusion-matrix PNG;
* :mod:`.runs`: the run record (flags, module, data fingerprints, splits, duration, metrics) in
  model.json, a ``runs.jsonl`` and TensorBoard's HParams.

:func:`retrain` runs them all, writes the model folder through
:class:`common.modelfolder.ModelFolder` and publishes it by :func:`common.modelfolder.publish`.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass

from common.modelfolder import CONFUSION_MATRIX, LABELS, ModelFolder, publish
from common.versions.source import version_staging

from .data import SPLITS, ImageLists, RetrainError, create_image_lists, which_set
from .evaluate import evaluate_image_folder, evaluate_test_split, per_class_metrics
from .export import export_frozen_graph, export_saved_model
from .features import (
    DEFAULT_MODULE,
    KNOWN_INPUT_SIZES,
    FeatureStats,
    compute_features,
    feature_cache_dir,
    load_module,
    module_input_size,
    module_key,
)
from .report import build_model_json, build_report, draw_confusion_matrix
from .runs import (
    RUNS_LOG,
    append_run,
    build_run_record,
    data_record,
    default_runs_log,
    log_hparams,
    new_run_id,
    read_runs,
)
from .train import TrainParams, distort, train_head

__all__ = [
    "DEFAULT_MODULE", "KNOWN_INPUT_SIZES", "RUNS_LOG", "SPLITS", "FeatureStats", "ImageLists",
    "RetrainError", "RetrainResult", "TrainParams", "append_run", "build_model_json",
    "build_report", "build_run_record", "compute_features", "create_image_lists", "data_record",
    "default_runs_log", "distort", "draw_confusion_matrix", "evaluate_image_folder",
    "evaluate_test_split",
    "export_frozen_graph", "export_saved_model", "feature_cache_dir", "load_module",
    "log_hparams", "module_input_size", "module_key", "new_run_id", "per_class_metrics",
    "read_runs", "retrain", "train_head", "which_set",
]

log = logging.getLogger(__name__)


@dataclass
class RetrainResult:
    """What :func:`retrain` wrote: the published folder and the contents of its JSON files
    (``model_json["run"]`` is the run record, also appended to ``runs_log`` when one was given)."""

    output_dir: str
    model_json: dict
    report: dict
    feature_stats: FeatureStats
    runs_log: str | None = None

    @property
    def run(self) -> dict:
        return self.model_json["run"]


@dataclass
class _Trained:
    """A trained head: ``softmax(module(images [n, h, w, 3] in [0, 1]) @ weights [F, C] +
    biases [C])``, with what it was trained on."""

    handle: str
    module: object
    size: tuple[int, int]
    lists: ImageLists
    params: TrainParams
    stats: FeatureStats
    weights: object
    biases: object
    metrics: dict


def retrain(image_dir: str, output_dir: str, module_handle: str = DEFAULT_MODULE,
            params: TrainParams | None = None, bottleneck_dir: str | None = None,
            summaries_dir: str | None = None, input_size: int | None = None,
            name: str | None = None, version: str = "1", output_graph: str | None = None,
            output_labels: str | None = None, progress: bool = True, flags: dict | None = None,
            runs_log: str | None = None, exports: bool = True,
            new_version: bool = False,
            extra_image_dirs: list[str] | tuple[str, ...] = ()) -> RetrainResult:
    """The whole pipeline: list and split images, features, train, export, evaluate, publish.

    The folder is built at ``<output_dir>.incoming`` and renamed into ``output_dir`` only when
    complete (and at least ``params.min_test_accuracy`` good), replacing a folder there whole;
    otherwise nothing is written there. Raises RetrainError with what to fix.

    The run record (:mod:`.runs`) goes into model.json; ``flags`` are the options to record
    (the CLI's; default: ``params`` and the arguments above). It is also appended to
    ``runs_log`` when given, and logged as HParams under ``summaries_dir`` when given.

    ``new_version``: ``output_dir`` is a new numbered version of a model in a repository
    (``<repository>/<name>/<n>``): it is built in a hidden folder beside the versions and
    renamed into place, and an existing folder there is never replaced (RetrainError).

    ``extra_image_dirs``: more folders of category sub-folders (the service's feedback folder)
    trained on with ``image_dir``; report.json counts each class's images from them.

    With ``exports`` the folder also gets model.onnx and model.tflite, each verified on the
    test images, where the converters are installed (:func:`scripts.exporting.export_default`).
    """
    started = time.perf_counter()
    params = params or TrainParams()
    if flags is None:
        flags = {**asdict(params), "image_dir": image_dir, "tfhub_module": module_handle,
                 "input_size": input_size, "output_dir": output_dir,
                 "extra_image_dir": list(extra_image_dirs)}
    trained = _train(image_dir, module_handle, params, bottleneck_dir, summaries_dir,
                     input_size, progress, extra_image_dirs)
    output_dir = output_dir.rstrip("/")
    staging = ModelFolder(version_staging(os.path.dirname(output_dir),
                                          int(os.path.basename(output_dir)))
                          if new_version else output_dir + ".incoming")
    try:
        model_json, report = _write_folder(staging, trained, output_dir, name, version, started,
                                           flags, progress)
        if exports:
            from scripts.exporting import export_default
            export_default(staging, tuple(os.path.join(trained.lists.image_dir, p) for p, _
                                          in trained.lists.paths("testing")), progress)
    except BaseException:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise
    try:
        publish(staging.path, output_dir, replace=not new_version)
    except FileExistsError as exc:
        shutil.rmtree(staging.path, ignore_errors=True)
        raise RetrainError(str(exc)) from None
    folder = ModelFolder(output_dir)
    _write_legacy_files(trained, folder, output_graph, output_labels)
    if runs_log:
        append_run(runs_log, model_json["run"])
    if summaries_dir:
        log_hparams(summaries_dir, model_json["run"])
    return RetrainResult(output_dir, model_json, report, trained.stats, runs_log)


def _train(image_dir: str, module_handle: str, params: TrainParams, bottleneck_dir: str | None,
           summaries_dir: str | None, input_size: int | None, progress: bool,
           extra_image_dirs: list[str] | tuple[str, ...] = ()) -> _Trained:
    """Images -> features -> trained softmax layer."""
    lists = create_image_lists(image_dir, params.validation_percentage, params.testing_percentage,
                               extra_image_dirs)
    module = load_module(module_handle)
    size = module_input_size(module, module_handle, input_size)
    if params.augment and bottleneck_dir:
        log.warning("augmentation is on: training images go through the module at every step; "
                    "the feature cache serves only validation and test images")
    features, stats = compute_features(module, lists, size,
                                       feature_cache_dir(bottleneck_dir, module_handle),
                                       params.feature_batch_size, progress)
    if stats.skipped:
        log.warning("skipped %d unreadable images", len(stats.skipped))
    weights, biases, metrics = train_head(module, lists, features, size, params, summaries_dir,
                                          progress)
    return _Trained(module_handle, module, size, lists, params, stats, weights, biases, metrics)


def _write_folder(staging: ModelFolder, trained: _Trained, output_dir: str, name: str | None,
                  version: str, started: float, flags: dict,
                  progress: bool) -> tuple[dict, dict]:
    """Export and evaluate into ``staging``; returns (model.json, report.json) as written.

    Raises RetrainError (the caller removes ``staging``) below the accuracy gate.
    """
    shutil.rmtree(staging.path, ignore_errors=True)
    export_saved_model(trained.module, trained.weights, trained.biases, trained.size,
                       staging.path)
    staging.write_labels(trained.lists.labels)
    evaluation = evaluate_test_split(staging, trained.lists, trained.stats.skipped,
                                     trained.params.feature_batch_size, progress)
    accuracy, gate = evaluation["test_accuracy"], trained.params.min_test_accuracy
    if accuracy is not None and accuracy < gate:
        raise RetrainError(f"test accuracy {accuracy:.4f} is below --min_test_accuracy "
                           f"{gate}; the model was not exported")
    report = build_report(evaluation, trained.metrics, trained.lists, trained.stats,
                          time.perf_counter() - started)
    model_json = build_model_json(output_dir, name, version, trained.size, trained.handle,
                                  evaluation, trained.metrics, trained.params,
                                  len(trained.lists.labels))
    model_json["run"] = build_run_record(
        new_run_id(), flags, trained.handle, data_record(trained.lists, trained.stats.skipped),
        evaluation, trained.metrics, time.perf_counter() - started, output_dir,
        model_json["name"], version)
    staging.write_metadata(model_json)
    staging.write_report(report)
    draw_confusion_matrix(trained.lists.labels,
                          evaluation["confusion_matrix"]["rows_true_columns_predicted"],
                          staging.file(CONFUSION_MATRIX))
    return model_json, report


def _write_legacy_files(trained: _Trained, folder: ModelFolder, output_graph: str | None,
                        output_labels: str | None) -> None:
    """The TF1 retrain.py outputs, when asked for: a frozen graph and a copy of the labels."""
    if output_graph:
        export_frozen_graph(trained.module, trained.weights, trained.biases, trained.size,
                            output_graph)
    if output_labels:
        os.makedirs(os.path.dirname(os.path.abspath(output_labels)), exist_ok=True)
        shutil.copyfile(folder.file(LABELS), output_labels)
