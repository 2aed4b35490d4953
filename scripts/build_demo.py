#!/usr/bin/env python3
"""Build the offline demo in one command: synthetic data -> feature module -> retrained model.

    python scripts/build_demo.py            # or: make demo

Writes tf_files/modules/sketch_features/ (the TF Hub style feature extractor),
tf_files/demo/ (the classifier the server serves by default, with report.json and
confusion_matrix.png) and tf_files/demo/build.json (what each step took, and the speed-up of
the feature cache on a second pass). Data and caches go to build/ (not committed).

Then the demo is measured on tf_files/canvas_drawings/, the independent test set drawn in the
real page (scripts/make_canvas_drawings.py, ``make canvas-drawings``; never trained on): its
accuracy goes into report.json's ``extra_tests`` beside the synthetic test split's, and the page
shows both.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.modelfolder import ModelFolder  # noqa: E402
from scripts import cli, make_demo_data, make_feature_module, training  # noqa: E402

log = logging.getLogger(__name__)


#: report.json's record of the canvas test set (its figures are added by _canvas_test).
CANVAS_TEST = {"name": "canvas drawings",
               "description": "drawn with pointer strokes in the real page, never trained on",
               "path": os.path.join("tf_files", "canvas_drawings"),
               "command": "make canvas-drawings"}


def build(root: str = ".", per_class: int = 300, data_seed: int = 2,
          min_test_accuracy: float = 0.95, progress: bool = True) -> dict:
    """Run the three steps, then measure the demo on the canvas drawings (when present);
    returns the build record written to tf_files/demo/build.json."""
    build_dir = os.path.join(root, "build")
    data_dir = os.path.join(build_dir, "demo_data")
    cache_dir = os.path.join(build_dir, "bottlenecks")
    module_dir = os.path.join(root, "tf_files", "modules", "sketch_features")
    demo_dir = os.path.join(root, "tf_files", "demo")
    timings = {}

    t0 = time.perf_counter()
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    make_demo_data.make_dataset(data_dir, make_demo_data.DataParams(
        per_class=per_class, seed=data_seed), progress=progress)
    timings["data_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    module_metrics = _make_module(module_dir, progress)
    timings["module_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    result = training.retrain(
        data_dir, demo_dir, module_dir,
        training.TrainParams(how_many_training_steps=1000, min_test_accuracy=min_test_accuracy),
        bottleneck_dir=cache_dir, name="demo", version="1", progress=progress)
    timings["retrain_seconds"] = round(time.perf_counter() - t0, 1)

    record = {
        **timings,
        "total_seconds": round(sum(timings.values()), 1),
        "images": per_class * len(make_demo_data.DEMO_SHAPES),
        "data_seed": data_seed,
        "module": {"path": os.path.relpath(module_dir, root), **module_metrics},
        "test_accuracy": result.report["accuracy"],
        "test_images": result.report["test_images"],
        "feature_cache": _cache_record(result.feature_stats, data_dir, module_dir, cache_dir),
        "machine": f"{os.cpu_count()} CPU cores",
    }
    canvas = _canvas_test(root, demo_dir, progress)
    if canvas:
        record["canvas_accuracy"], record["canvas_images"] = canvas["accuracy"], canvas["images"]
    ModelFolder(demo_dir).write_build_record(record)
    return record


def _canvas_test(root: str, demo_dir: str, progress: bool) -> dict | None:
    """The demo's figures on the canvas drawings, added to its report.json (``extra_tests``);
    None (and a warning) when the set has not been drawn."""
    canvas_dir = os.path.join(root, CANVAS_TEST["path"])
    if not os.path.isdir(canvas_dir):
        log.warning("no %s: run `make canvas-drawings` to measure the demo on drawings made in "
                    "the page", canvas_dir)
        return None
    folder = ModelFolder(demo_dir)
    evaluation = training.evaluate_image_folder(folder, canvas_dir, progress=progress)
    entry = {**CANVAS_TEST, "accuracy": evaluation["test_accuracy"],
             "images": evaluation["test_images"], "per_class": evaluation["per_class"],
             "confusion_matrix": evaluation["confusion_matrix"],
             "misclassified": evaluation["misclassified"]}
    report = folder.read_report() or {}
    report["extra_tests"] = [entry]
    folder.write_report(report)
    return entry


def _make_module(module_dir: str, progress: bool) -> dict:
    """Pretrain and save the feature module; returns its metrics."""
    params = make_feature_module.ModuleParams()
    module, module_metrics = make_feature_module.train_module(params, progress=progress)
    shutil.rmtree(module_dir, ignore_errors=True)
    make_feature_module.save_module(module, module_dir, params, module_metrics)
    return module_metrics


def _cache_record(first: training.FeatureStats, data_dir: str, module_dir: str,
                  cache_dir: str) -> dict:
    """The cache's worth: the same feature pass again, now served from build/bottlenecks."""
    lists = training.create_image_lists(data_dir)
    loaded = training.load_module(module_dir)
    size = training.module_input_size(loaded, module_dir)
    cache = training.feature_cache_dir(cache_dir, module_dir)
    _, second = training.compute_features(loaded, lists, size, cache, progress=False)
    return {"first_run": {"computed": first.computed, "seconds": first.seconds},
            "second_run": {"computed": second.computed, "cached": second.cached,
                           "seconds": second.seconds},
            "speedup": round(first.seconds / max(second.seconds, 1e-3), 1)}


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per_class", type=int, default=300, help="demo images per shape")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = cli.parse_args(parser, argv)
    record = build(per_class=args.per_class, progress=not args.quiet)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
