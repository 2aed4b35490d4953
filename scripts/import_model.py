#!/usr/bin/env python3
"""Import a model trained elsewhere (ONNX, TFLite, Keras, SavedModel, frozen graph) as a model
folder the service serves on the model's own runtime.

    python scripts/import_model.py --model resnet18.onnx --labels imagenet.txt \\
        --preset torchvision --output_dir tf_files/resnet
    python scripts/import_model.py --model mobilenet.keras --preset inception \\
        --repository models --name mobilenet          # publishes models/mobilenet/<next>
    python scripts/import_model.py --model saved_model_dir --preset inception \\
        --signature predict --output_name logits --label_offset 1 --num_labels 1000 \\
        --output_dir tf_files/inception

The model is inspected (inputs, outputs, shapes, dtypes, batch, opset, quantisation), its
preprocessing decided from the preset, the settings given and what the model shows (what was
guessed is printed and kept in model.json under ``import.assumed``), the folder written,
loaded and checked on a generated image, and only then published. What the service cannot
serve is refused with one sentence and exit status 2. The library is scripts/importing/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.inference.preprocessing import (  # noqa: E402
    COLOURS,
    DTYPES,
    INTERPOLATIONS,
    LAYOUTS,
    OUTPUTS,
    PRESETS,
    RESIZES,
)
from scripts import cli  # noqa: E402
from scripts.importing import CannotImport, import_model, needs_tensorflow  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model: a .onnx (its external data files "
                   "beside it), .tflite, .keras, .h5 or frozen .pb file, or a SavedModel folder")
    where = p.add_argument_group("where to")
    where.add_argument("--output_dir", help="the model folder to write (replaced whole if it "
                       "exists)")
    where.add_argument("--repository", help="a model repository (MODEL_REPOSITORY): publish "
                       "as <repository>/<name>/<next version>")
    where.add_argument("--name", help="the model's name (needed with --repository; default: "
                       "the output folder's name)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="labels file, one per line, in output order")
    labels.add_argument("--num_labels", type=int, help="that many unnamed classes "
                        "(class_0, class_1, ...); default without --labels: one per output")
    spec = p.add_argument_group("preprocessing (a preset, then any of these over it)")
    spec.add_argument("--preset", help=f"the model's convention: {', '.join(PRESETS)} "
                      f"(default: tfhub, pixels in [0, 1])")
    spec.add_argument("--layout", choices=LAYOUTS, help="default: where the input's 3 "
                      "channels are")
    spec.add_argument("--colour", "--color", dest="colour", choices=COLOURS)
    spec.add_argument("--resize", choices=RESIZES)
    spec.add_argument("--resize_shorter", type=int, help="crop: the shorter side before the "
                      "centre crop (default: size / 0.875)")
    spec.add_argument("--interpolation", choices=list(INTERPOLATIONS))
    spec.add_argument("--mean", type=_triple, help="r,g,b channel means in [0, 1] pixel units")
    spec.add_argument("--std", type=_triple, help="r,g,b standard deviations in [0, 1] units")
    spec.add_argument("--dtype", choices=DTYPES, help="default: uint8 for a uint8 input, string "
                      "for a SavedModel taking encoded images")
    spec.add_argument("--output", choices=OUTPUTS, help="what the outputs are (default: "
                      "tested on generated images: probabilities or logits)")
    spec.add_argument("--label_offset", type=int, help="leading outputs without a label "
                      "(1 for a background class)")
    spec.add_argument("--input_size", type=_size, help="H[,W] for a model whose input does "
                      "not fix it (default 224)")
    names = p.add_argument_group("SavedModel and frozen graph tensors")
    names.add_argument("--signature", help="a SavedModel's signature (default serving_default "
                       "or its only one)")
    names.add_argument("--input_name", help="the input tensor (default: the only one)")
    names.add_argument("--output_name", help="the scores tensor (default: probabilities, or "
                       "the only 2-D float output)")
    p.add_argument("--json", action="store_true", help="print model.json's import record as "
                   "JSON instead of the summary")
    return p


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers a,b,c, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers a,b,c, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or H,W, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W, got {text!r}")
    return (values[0], values[-1])


def main(argv=None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv, tensorflow=False)
    if bool(args.output_dir) == bool(args.repository):
        parser.error("give --output_dir or --repository (with --name)")
    if args.repository and not args.name:
        parser.error("--repository needs --name")
    settings = {k: getattr(args, k) for k in ("layout", "colour", "resize", "resize_shorter",
                                             "interpolation", "mean", "std", "dtype", "output",
                                             "label_offset") if getattr(args, k) is not None}
    for key in ("mean", "std"):
        if key in settings and max(settings[key]) > 1.5:
            print(f"import_model.py: error: --{key} is in [0, 1] pixel units; "
                  f"{','.join(f'{v:g}' for v in settings[key])} looks like 0..255 (divide by "
                  f"255)", file=sys.stderr)
            return 2
    if needs_tensorflow(args.model):
        cli.quiet_tensorflow(args.verbose)
    try:
        result = import_model(args.model, output_dir=args.output_dir,
                              repository=args.repository, name=args.name, labels=args.labels,
                              num_labels=args.num_labels, preset_name=args.preset,
                              settings=settings, input_size=args.input_size,
                              signature=args.signature, input_name=args.input_name,
                              output_name=args.output_name)
    except CannotImport as exc:
        print(f"import_model.py: cannot import {args.model}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"folder": result.folder, "check": result.check,
                          **result.model_json["import"]}, indent=2))
    else:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
