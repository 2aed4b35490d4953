#!/usr/bin/env python3
"""Export a model folder to ONNX or TFLite, verified against TensorFlow before it is written.

    python scripts/export.py --model tf_files/demo --format onnx
    python scripts/export.py --model tf_files/demo --format tflite --quantize float16
    python scripts/export.py --model tf_files/demo --format tflite --quantize int8 \\
        --calibration-dir build/demo_data --images build/demo_data

Writes model.onnx or model[.<quantize>].tflite beside the SavedModel and records the export
(size, SHA-256, verification, reference outputs) in the folder's model.json. An export whose
outputs stray from TensorFlow's past the tolerance is refused and nothing is written.
The converters are in requirements-export.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import cli  # noqa: E402
from scripts.exporting import (  # noqa: E402
    DEFAULT_OPSET,
    FORMATS,
    OPSETS,
    QUANTIZATIONS,
    ExportError,
    ExportParams,
    export,
    find_images,
    resolve_model,
)


def build_parser() -> argparse.ArgumentParser:
    defaults = ExportParams()
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model folder, tf_files/<name> or tf_files/<name>/<version>")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--quantize", default="fp32", choices=QUANTIZATIONS,
                   help="tflite only: float32, float16 weights, int8 weights (dynamic range), "
                        "or int8 weights and activations (needs --calibration-dir)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   choices=list(OPSETS), help="onnx only")
    p.add_argument("--images", help="folder of images to verify on; a retrain.py --image_dir "
                   "(one folder per label) gives its test split; default: generated images")
    p.add_argument("--max_images", type=int, default=200, help="at most this many of --images")
    p.add_argument("--calibration_dir", help="images for --quantize int8")
    p.add_argument("--max_abs_diff", type=float, help="tolerance: largest score difference "
                   "(default per format, see common/inference/exports.py)")
    p.add_argument("--min_top1_agreement", type=float, help="tolerance: share of images whose "
                   "top label must agree")
    p.add_argument("--generated", type=int, default=defaults.generated,
                   help="generated images to verify on without --images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = cli.parse_args(build_parser(), argv)
    try:
        folder = resolve_model(args.model)
        params = ExportParams(
            format=args.format, quantize=args.quantize, opset=args.opset,
            images=find_images(args.images, args.max_images, folder), generated=args.generated,
            calibration=find_images(args.calibration_dir, args.max_images),
            max_abs_diff=args.max_abs_diff, min_top1_agreement=args.min_top1_agreement)
        record = export(folder, params, progress=not args.quiet)
    except ExportError as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2
    summary = {k: record[k] for k in ("file", "bytes", "sha256", "converter")}
    summary["verification"] = {k: v for k, v in record["verification"].items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
