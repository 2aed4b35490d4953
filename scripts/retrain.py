#!/usr/bin/env python3
"""Retrain an image classifier on top of a pretrained feature extractor (TensorFlow 2).

The TF2 successor of the image_retraining tutorial's retrain.py. Point it at a folder with one
sub-folder of images per category (the flower_photos layout) and a TF Hub image feature-vector
module; it caches the module's features ("bottlenecks"), trains a softmax layer on them, and
exports ONE SavedModel (module + new layer) in the model-folder layout of DESIGN.md, with
labels.txt, model.json and an evaluation report.

    python scripts/retrain.py --image_dir ~/flower_photos --output_dir tf_files/flowers

The module (a TF Hub handle or URL, or a local SavedModel folder) is loaded as ``hub.load``
loads it, by scripts/training/hub.py (downloads cached in ``$TFHUB_CACHE_DIR``), without the
tensorflow_hub package, whose tf-keras dependency would install a second TensorFlow; no Keras
layer is involved, so it works with Keras 3.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.modelfolder import CONFUSION_MATRIX, REPORT_JSON, LegacyGraph  # noqa: E402
from common.versions.source import next_version  # noqa: E402
from scripts import cli  # noqa: E402
from scripts.training import (  # noqa: E402
    DEFAULT_MODULE,
    RUNS_LOG,
    RetrainError,
    RetrainResult,
    TrainParams,
    default_runs_log,
    retrain,
)

#: Flags that change what is printed, not what is trained: left out of the run record.
NOT_RECORDED = ("quiet", "verbose", "print_misclassified_test_images", "no_export")


def build_parser() -> argparse.ArgumentParser:
    legacy = LegacyGraph()
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_dir", required=True, help="folder with one sub-folder per category")
    p.add_argument("--extra_image_dir", action="append", default=[], metavar="DIR",
                   help="another folder of the same layout trained on too, such as the "
                   "service's FEEDBACK_DIR (its _review/ is left out); may be repeated; the "
                   "report counts each class's images from these folders")
    p.add_argument("--tfhub_module", default=DEFAULT_MODULE,
                   help="TF Hub image feature-vector handle or URL, or a local SavedModel folder")
    p.add_argument("--output_dir", help="model folder to write, e.g. tf_files/flowers")
    p.add_argument("--repository", help="publish a new numbered version of --name into this "
                   "model repository (MODEL_REPOSITORY): built beside the versions, renamed "
                   "into <repository>/<name>/<n> in one step; nothing there is replaced")
    p.add_argument("--output_graph", help="also write a TF1-style frozen graph (.pb) with "
                   f"input '{legacy.input_layer}' and output '{legacy.output_layer}', for old "
                   "tools")
    p.add_argument("--output_labels", help="also write the labels file here")
    p.add_argument("--bottleneck_dir", default="/tmp/bottleneck",
                   help="cache of feature vectors; '' to disable")
    p.add_argument("--summaries_dir", help="TensorBoard logs of loss and accuracy, and the "
                   "run's hyper-parameters (HParams); one folder per run")
    p.add_argument("--runs_log", help=f"append this run's record to this file (default: "
                   f"{RUNS_LOG} beside the output folder; '' for none); compare runs with "
                   "scripts/compare_runs.py")
    p.add_argument("--input_size", type=int, help="module input side, when it cannot be told")
    _add_training_flags(p)
    p.add_argument("--print_misclassified_test_images", action="store_true")
    p.add_argument("--name", help="model name in model.json (default: the folder name)")
    p.add_argument("--version", default="1", help="model version in model.json")
    p.add_argument("--no_export", action="store_true", help="do not also write model.onnx "
                   "and model.tflite (written by default where the converters of "
                   "requirements-export.txt are installed; see scripts/export.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainParams field (same name, same default)."""
    defaults = TrainParams()
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
    p.add_argument("--random_crop", type=int, default=defaults.random_crop,
                   help=f"%% margin to crop ({aug})")
    p.add_argument("--random_scale", type=int, default=defaults.random_scale,
                   help=f"%% to upscale ({aug})")
    p.add_argument("--random_brightness", type=int, default=defaults.random_brightness,
                   help=f"%% brightness ({aug})")
    p.add_argument("--min_test_accuracy", type=float, default=defaults.min_test_accuracy,
                   help="refuse to export a model whose test accuracy is lower")


def main(argv=None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    output_dir = args.output_dir
    if args.repository:
        if output_dir or not args.name:
            parser.error("--repository needs --name (the model) and no --output_dir")
        model_dir = os.path.join(args.repository, args.name)
        args.version = str(next_version(model_dir))
        output_dir = os.path.join(model_dir, args.version)
    if not output_dir:
        if not args.output_graph:
            parser.error("give --output_dir (or the old --output_graph)")
        output_dir = os.path.splitext(args.output_graph)[0] + "_model"
    params = TrainParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainParams)
                            if hasattr(args, f.name)})
    runs_log = default_runs_log(output_dir) if args.runs_log is None else args.runs_log
    flags = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    try:
        result = retrain(args.image_dir, output_dir, args.tfhub_module, params,
                         bottleneck_dir=args.bottleneck_dir or None,
                         summaries_dir=args.summaries_dir, input_size=args.input_size,
                         name=args.name, version=args.version, output_graph=args.output_graph,
                         output_labels=args.output_labels, progress=not args.quiet,
                         flags=flags, runs_log=runs_log or None, exports=not args.no_export,
                         new_version=bool(args.repository),
                         extra_image_dirs=args.extra_image_dir)
    except RetrainError as exc:
        print(f"retrain.py: error: {exc}", file=sys.stderr)
        return 2
    print_summary(result, args.print_misclassified_test_images)
    return 0


def print_summary(result: RetrainResult, misclassified: bool = False) -> None:
    """What the run did, on stdout (and the misclassified test images, when asked)."""
    report = result.report
    if misclassified:
        for item in report["misclassified"]:
            print(f"misclassified: {item['image']} ({item['label']} -> {item['predicted']})")
    stats = result.feature_stats
    print(f"features: {stats.computed} computed, {stats.cached} from cache, "
          f"{len(stats.skipped)} skipped, {stats.seconds:.1f} s")
    extra = report.get("extra_images", {})
    if extra.get("folders"):
        counts = ", ".join(f"{label} {n}" for label, n in extra["per_class"].items())
        print(f"images from {', '.join(extra['folders'])}: {counts}")
    print(f"test accuracy {report['accuracy']} on {report['test_images']} images; "
          f"model written to {result.output_dir} ({REPORT_JSON}, {CONFUSION_MATRIX})")
    if result.runs_log:
        print(f"run {result.run['id']} ({result.run['seconds']} s) recorded in {result.runs_log}")


if __name__ == "__main__":
    sys.exit(main())
