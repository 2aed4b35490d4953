#!/usr/bin/env python3
"""PRECISION=bf16 against fp32, in one run: top-1 agreement and speed.

Agreement is measured on the demo's held-out test sketches (the demo model, each precision in
its own process, since TensorFlow's precision setting is process-wide); speed on a model given
by --speed_model (an Inception-v3-sized one from make_inception_model.py), best batch in-process.

    python scripts/bf16_check.py --speed_model build/models/inception_v3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _measure(precision: str, demo_model: str, data_dir: str, speed_model: str | None) -> dict:
    """Runs inside a child process: predictions on the demo test split, and images/s."""
    from common.inference.loader import load_classifier
    from common.inference.runtimes import tfruntime
    from scripts.label_image import label_images
    from scripts.training import create_image_lists

    effective = tfruntime.configure(precision=precision)
    demo = load_classifier(demo_model)
    lists = create_image_lists(data_dir)
    paths = [os.path.join(data_dir, p) for p, _ in lists.paths("testing")]
    top1 = [r["predictions"][0]["label"] for r in label_images(demo, paths, top_k=1)]
    out = {"precision": effective, "paths": paths, "top1": top1}
    if speed_model:
        clf = load_classifier(speed_model)
        x = np.random.default_rng(0).random((8, *clf.input_size, 3), dtype=np.float32)
        clf.predict(x)
        clf.predict(x)
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            clf.predict(x)
            times.append(time.perf_counter() - t0)
        out["images_per_s_batch8"] = round(8 / float(np.median(times)), 2)
    return out


def compare(demo_model: str, data_dir: str, speed_model: str | None) -> dict:
    runs = {}
    for precision in ("fp32", "bf16"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", precision,
               "--demo_model", demo_model, "--data_dir", data_dir]
        if speed_model:
            cmd += ["--speed_model", speed_model]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        runs[precision] = json.loads(done.stdout.strip().splitlines()[-1])
    a, b = runs["fp32"]["top1"], runs["bf16"]["top1"]
    result = {"test_images": len(a), "top1_agreement": round(sum(x == y for x, y in zip(a, b))
                                                             / len(a), 4),
              "bf16_in_effect": runs["bf16"]["precision"] == "bf16"}
    if speed_model:
        result["fp32_images_per_s"] = runs["fp32"]["images_per_s_batch8"]
        result["bf16_images_per_s"] = runs["bf16"]["images_per_s_batch8"]
        result["speedup"] = round(result["bf16_images_per_s"] / result["fp32_images_per_s"], 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_model", default=os.path.join(ROOT, "tf_files", "demo"))
    parser.add_argument("--data_dir", default=os.path.join(ROOT, "build", "demo_data"),
                        help="the demo data (make demo writes it); its test split is used")
    parser.add_argument("--speed_model", help="model folder to time (e.g. Inception-v3-sized)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(_measure(args._child, args.demo_model, args.data_dir, args.speed_model)))
        return 0
    print(json.dumps(compare(args.demo_model, args.data_dir, args.speed_model), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
