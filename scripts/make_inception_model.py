#!/usr/bin/env python3
"""Model folders with the cost of real backbones but random weights, for benchmarks.

Real Inception v3 or MobileNetV2 weights cannot be downloaded here; the forward pass costs the
same with random ones, and that cost is what the benchmark measures. Each folder has the layout
of DESIGN.md (SavedModel with ``serving_default(images) -> probabilities``, labels.txt,
model.json), so the server loads it like any retrained model. Its answers mean nothing.

    python scripts/make_inception_model.py --arch inception_v3 \
        --output_dir build/models/inception_v3
    python scripts/make_inception_model.py --arch mobilenet_v2 \
        --output_dir build/models/mobilenet_v2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHS = {"inception_v3": 299, "mobilenet_v2": 224}


def make_model(arch: str, output_dir: str, classes: int = 1000, seed: int = 0) -> str:
    """Write a random-weight ``arch`` classifier as a model folder; returns the folder."""
    import keras
    import tensorflow as tf

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}")
    keras.utils.set_random_seed(seed)
    size = ARCHS[arch]
    if arch == "inception_v3":
        net = keras.applications.InceptionV3(weights=None, classes=classes,
                                             input_shape=(size, size, 3))
    else:
        net = keras.applications.MobileNetV2(weights=None, classes=classes,
                                             input_shape=(size, size, 3))

    class Served(tf.Module):
        def __init__(self):
            super().__init__(name=arch)
            self.net = net

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32,
                                                    name="images")])
        def serve(self, images):
            # Both Keras backbones expect [-1, 1]; the service hands [0, 1].
            return {"probabilities": self.net(images * 2.0 - 1.0, training=False)}

    served = Served()
    tf.saved_model.save(served, output_dir, signatures={"serving_default": served.serve})
    with open(os.path.join(output_dir, "labels.txt"), "w") as fh:
        fh.write("\n".join(f"class_{i:04d}" for i in range(classes)) + "\n")
    with open(os.path.join(output_dir, "model.json"), "w") as fh:
        json.dump({"name": f"{arch}_random", "version": "1", "input_size": [size, size],
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "base_module": f"keras.applications {arch}, random weights (benchmark only)",
                   "metrics": {}}, fh, indent=2)
    return output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="inception_v3")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args(argv)
    make_model(args.arch, args.output_dir, args.classes)
    print(f"wrote {args.arch} ({ARCHS[args.arch]}x{ARCHS[args.arch]}, random weights) to "
          f"{args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
