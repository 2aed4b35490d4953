#!/usr/bin/env python3
"""Label images from the command line with the loader and preprocessing the server uses.

    python scripts/label_image.py --model tf_files/demo --image star.png
    python scripts/label_image.py --graph retrained_graph.pb --labels retrained_labels.txt \
        --image photos/ --top_k 3 --json
    python scripts/label_image.py --model tf_files/demo --tflite --image star.png

Prints ranked ``label score`` lines per image, like the original label_image.py, or JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import ApiError  # noqa: E402
from common.inference.classifier import Classifier, Options  # noqa: E402
from common.inference.images import FILE_EXTENSIONS, load_image_file  # noqa: E402
from common.inference.loader import RuntimeOptions, load_classifier  # noqa: E402
from common.modelfolder import TFLITE, LegacyGraph, ModelFolder, ModelLoadError  # noqa: E402
from scripts import cli  # noqa: E402


def expand_images(items: list[str]) -> list[str]:
    """Files as given; folders become their image files (recursively, sorted)."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            for folder, _, files in sorted(os.walk(item)):
                paths.extend(os.path.join(folder, f) for f in sorted(files)
                             if f.lower().endswith(FILE_EXTENSIONS))
        else:
            paths.append(item)
    return paths


def label_images(classifier: Classifier, paths: list[str], top_k: int | None = None,
                 batch_size: int = 32) -> list[dict]:
    """``[{"image", "predictions": [{"label", "score"}]}]`` or ``{"image", "error"}`` per path.

    Images are decoded as the server decodes them (float32 ``[h, w, 3]`` in ``[0, 1]``) and
    classified ``batch_size`` at a time; ``predictions`` is ``classifier.postprocess``'s ranked
    list (the API's shape), the best ``top_k`` (None: all labels).
    """
    results: list[dict] = []
    batch: list[tuple[str, np.ndarray]] = []

    def flush():
        if not batch:
            return
        scores = classifier.predict(np.stack([a for _, a in batch]))
        for (path, _), row in zip(batch, scores):
            results.append({"image": path,
                            "predictions": classifier.postprocess(row, Options(top_k=top_k))})
        batch.clear()

    for path in paths:
        try:
            batch.append((path, load_image_file(path, classifier.input_size,
                                                spec=classifier.spec)))
        except (OSError, ApiError) as exc:
            flush()  # keep output in input order
            results.append({"image": path, "error": getattr(exc, "message", None) or str(exc)})
        if len(batch) >= batch_size:
            flush()
    flush()
    return results


def build_parser() -> argparse.ArgumentParser:
    legacy = LegacyGraph()
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder (SavedModel + labels.txt + model.json)")
    source.add_argument("--graph", help="legacy TF1 frozen graph (.pb)")
    parser.add_argument("--labels", help="labels file for --graph")
    parser.add_argument("--input_layer", default=legacy.input_layer,
                        help="input tensor of --graph")
    parser.add_argument("--output_layer", default=legacy.output_layer,
                        help="output tensor of --graph")
    parser.add_argument("--input_size", type=int, help="input side of --graph if not fixed")
    parser.add_argument("--input_mean", type=float, default=legacy.input_mean)
    parser.add_argument("--input_std", type=float, default=legacy.input_std)
    parser.add_argument("--image", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--top_k", type=int, default=5, help="labels per image")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    parser.add_argument("--tflite", nargs="?", const=TFLITE, metavar="FILE",
                        help="with --model: run the folder's TFLite export (default "
                        f"{TFLITE}; or model.float16.tflite, ...) on LiteRT, as a phone would, "
                        "instead of the SavedModel; needs ai-edge-litert")
    return parser


def model_folder(args: argparse.Namespace) -> ModelFolder:
    """The folder (or frozen graph) the flags name, with the legacy graph's settings."""
    return ModelFolder(args.model or args.graph, labels_path=args.labels, legacy=LegacyGraph(
        input_layer=args.input_layer, output_layer=args.output_layer,
        input_mean=args.input_mean, input_std=args.input_std,
        input_size=(args.input_size, args.input_size) if args.input_size else None))


def print_results(results: list[dict], as_json: bool) -> None:
    """JSON (one object for one image), or ranked ``label score`` lines per image."""
    if as_json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return
    for result in results:
        if len(results) > 1:
            print(f"{result['image']}:")
        if "error" in result:
            print(f"  error: {result['error']}")
            continue
        for p in result["predictions"]:
            print(f"{p['label']} {p['score']:.5f}")


def main(argv=None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    if args.top_k < 1:
        parser.error("--top_k must be >= 1")
    if args.tflite and not args.model:
        parser.error("--tflite needs --model (the folder holding the export)")
    runtime = RuntimeOptions("tflite", tflite_file=args.tflite) if args.tflite else None
    try:
        classifier = load_classifier(model_folder(args), runtime)
        classifier.warm_up()
    except ModelLoadError as exc:
        print(f"label_image.py: error: {exc}", file=sys.stderr)
        return 2
    paths = expand_images(args.image)
    if not paths:
        print("label_image.py: error: no images found", file=sys.stderr)
        return 2
    results = label_images(classifier, paths, args.top_k)
    print_results(results, args.json)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
