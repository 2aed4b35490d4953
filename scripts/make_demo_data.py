#!/usr/bin/env python3
"""Synthetic hand-drawn-looking sketches in the folder-per-class layout (like flower_photos).

Each picture is one shape drawn as a wobbly stroke: jittered outline, random stroke width (thin
lines of 1% of the side to heavy ones of 7%), size (small ones too), position (off-centre),
rotation (any way round but for hearts), ends that stop short or overshoot, stars as outlines
or pentagrams, colours and background (plain white as on a drawing canvas, solid colours,
gradients, noise). Everything comes from one seed, so a data set can be rebuilt exactly.

    python scripts/make_demo_data.py --output_dir build/demo_data --per_class 300 --seed 2
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import cli  # noqa: E402

#: The demo's classes. make_feature_module.py pretrains on these and EXTRA_SHAPES, from
#: another seed.
DEMO_SHAPES = ("circle", "triangle", "square", "star", "cross", "heart")
EXTRA_SHAPES = ("diamond", "hexagon", "arrow", "moon")


def _polygon(n: int, phase: float = 0.0) -> list[np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + phase
    pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    return [np.vstack([pts, pts[:1]])]


def _outline(shape: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Strokes of a shape in unit coordinates (about [-1, 1]^2, y down), before transforms."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi + rng.uniform(0.0, 0.5), 60)
        ratio = rng.uniform(0.8, 1.2)
        return [np.stack([np.cos(t) * ratio, np.sin(t)], axis=1)]
    if shape == "triangle":  # any triangle, not only equilateral ones
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) - np.pi / 2 + rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * rng.uniform(0.8, 1.0, (3, 1))
        return [np.vstack([pts, pts[:1]])]
    if shape == "square":
        (pts,) = _polygon(4, np.pi / 4)
        return [pts + rng.normal(0, 0.03, pts.shape)]
    if shape == "diamond":  # narrow, so that a square turned 45 degrees is not one
        (pts,) = _polygon(4, 0.0)
        return [pts * np.array([rng.uniform(0.45, 0.65), 1.0])]
    if shape == "hexagon":
        return _polygon(6, 0.0)
    if shape == "star" and rng.random() < 0.5:  # the pentagram: five lines in one stroke
        t = np.arange(0, 6) * 4 * np.pi / 5 - np.pi / 2
        return [np.stack([np.cos(t), np.sin(t)], axis=1)]
    if shape == "star":
        t = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.35, 0.5))
        pts = np.stack([np.cos(t) * r, np.sin(t) * r], axis=1)
        return [np.vstack([pts, pts[:1]])]
    if shape == "cross":  # arms of unequal length, crossing off-centre
        arm, cx, cy = rng.uniform(0.7, 1.0), *rng.uniform(-0.2, 0.2, 2)
        return [np.array([[-arm, cy], [arm, cy]]), np.array([[cx, -1.0], [cx, 1.0]])]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 80)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x / 17.0 * rng.uniform(0.85, 1.15), (y + 2.0) / 17.0], axis=1)]
    if shape == "arrow":
        head = rng.uniform(0.35, 0.5)
        return [np.array([[-1.0, 0.0], [1.0, 0.0]]),
                np.array([[1.0 - head, -head], [1.0, 0.0], [1.0 - head, head]])]
    if shape == "moon":
        t = np.linspace(-np.pi / 2, np.pi / 2, 40)
        outer = np.stack([np.cos(t), np.sin(t)], axis=1)
        inner = np.stack([np.cos(t[::-1]) * rng.uniform(0.3, 0.55), np.sin(t[::-1])], axis=1)
        return [np.vstack([outer, inner])]
    raise ValueError(f"unknown shape {shape!r}")


def _resample(stroke: np.ndarray, step: float) -> np.ndarray:
    """Points every ``step`` units along a polyline, so jitter looks like a hand's wobble."""
    seg = np.diff(stroke, axis=0)
    lengths = np.hypot(seg[:, 0], seg[:, 1])
    total = lengths.sum()
    if total == 0:
        return stroke
    positions = np.concatenate([[0], np.cumsum(lengths)])
    samples = np.linspace(0, total, max(2, int(total / step)))
    return np.stack([np.interp(samples, positions, stroke[:, i]) for i in (0, 1)], axis=1)


def _loose_end(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hand's stroke end (points every 0.08 units): stop up to 6% (at most 0.32 units) short,
    or overshoot up to 8% (at most 0.24 units) along the last step."""
    n = len(points)
    change = int(round(n * rng.uniform(-0.06, 0.08)))
    if change < 0:
        return points[:max(2, n + max(change, -4))]
    step = points[-1] - points[-2]
    return np.vstack([points, points[-1] + step * np.arange(1, min(change, 3) + 1)[:, None]])


#: Rotation range of each shape in degrees: hearts are drawn upright, the rest any way round.
ROTATION = {"heart": 30}


def _wobble(points: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Smooth random displacement: a few low-frequency sines per axis plus fine jitter."""
    n = len(points)
    s = np.linspace(0, 1, n)
    out = points.copy()
    for axis in (0, 1):
        for freq in (1, 2, 3):
            out[:, axis] += amount / freq * rng.normal() * np.sin(2 * np.pi * freq * s
                                                                   + rng.uniform(0, 2 * np.pi))
        out[:, axis] += rng.normal(0, amount * 0.15, n)
    return out


def _background(size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A background and its mean colour. 60% are plain white, as on a drawing canvas."""
    kind = rng.choice(["white", "solid", "gradient", "noise"], p=[0.6, 0.16, 0.12, 0.12])
    if kind == "white":
        arr = np.full((size, size, 3), 255.0)
    elif kind == "solid":
        arr = np.ones((size, size, 3)) * rng.uniform(0, 255, 3)
    elif kind == "gradient":
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        ramp = np.linspace(0, 1, size)[:, None, None]
        arr = a * (1 - ramp) + b * ramp
        if rng.random() < 0.5:
            arr = arr.transpose(1, 0, 2)
        arr = np.broadcast_to(arr, (size, size, 3))
    else:
        base = rng.uniform(40, 220, 3)
        arr = base + rng.normal(0, 25, (size, size, 3))
    arr = np.clip(arr, 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB"), arr.reshape(-1, 3).mean(axis=0)


def _stroke_colour(background_mean: np.ndarray, rng: np.random.Generator) -> tuple:
    """Dark ink on light paper most of the time; otherwise any colour far from the background."""
    if background_mean.mean() > 200 and rng.random() < 0.7:
        return tuple(int(v) for v in rng.uniform(0, 60, 3))
    for _ in range(20):
        colour = rng.uniform(0, 255, 3)
        if np.abs(colour - background_mean).sum() > 220:
            return tuple(int(v) for v in colour)
    return (0, 0, 0) if background_mean.mean() > 127 else (255, 255, 255)


def draw_sketch(shape: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """One RGB ``size`` x ``size`` sketch of ``shape``."""
    image, bg_mean = _background(size, rng)
    draw = ImageDraw.Draw(image)
    colour = _stroke_colour(bg_mean, rng)
    scale = rng.uniform(0.12, 0.42) * size
    # Line width 1% to 7% of the side, but at most a fifth of the shape's radius.
    width = max(1, int(round(size * rng.uniform(0.008, min(0.07, 0.2 * scale / size)))))
    limit = ROTATION.get(shape, 180)
    angle = math.radians(rng.uniform(-limit, limit))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    stretch = np.array([rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)])
    margin = scale * 1.1
    centre = rng.uniform(margin, size - margin, 2) if size - 2 * margin > 0 else \
        np.array([size / 2, size / 2])
    filled = shape not in ("cross", "arrow") and rng.random() < 0.08
    wobble = rng.uniform(0.01, 0.05)
    for stroke in _outline(shape, rng):
        pts = _resample(stroke, 0.08)
        if not filled:
            pts = _loose_end(pts, rng)
        pts = _wobble(pts, rng, wobble)
        pts = (pts * stretch) @ rot.T * scale + centre
        xy = [tuple(p) for p in pts]
        if filled:
            draw.polygon(xy, fill=colour)
        draw.line(xy, fill=colour, width=width, joint="curve")
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image


@dataclass
class DataParams:
    """What make_dataset draws."""

    shapes: tuple[str, ...] = DEMO_SHAPES  # class names, one sub-folder each
    per_class: int = 300  # images per class
    size: int = 128  # side of each PNG, pixels
    seed: int = 0  # one seed for everything


def make_dataset(output_dir: str, params: DataParams = DataParams(), progress: bool = True) -> dict:
    """Write ``output_dir/<shape>/<shape>_<i>.png``; returns {shape: count}."""
    from tqdm import tqdm

    rng = np.random.default_rng(params.seed)
    counts = {}
    total = len(params.shapes) * params.per_class
    with tqdm(total=total, desc="drawing sketches", unit="img", disable=not progress) as bar:
        for shape in params.shapes:
            folder = os.path.join(output_dir, shape)
            os.makedirs(folder, exist_ok=True)
            for i in range(params.per_class):
                draw_sketch(shape, rng, params.size).save(
                    os.path.join(folder, f"{shape}_{i:05d}.png"), optimize=False)
                bar.update()
            counts[shape] = params.per_class
    return counts


def sketch_batch(shapes: tuple[str, ...], n: int, rng: np.random.Generator,
                 size: int) -> tuple[list[Image.Image], np.ndarray]:
    """``n`` sketches of random classes, in memory: (images, class indices)."""
    labels = rng.integers(0, len(shapes), n)
    return [draw_sketch(shapes[k], rng, size) for k in labels], labels


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], verbose_flag=False)
    parser.add_argument("--output_dir", required=True, help="where the class folders go")
    parser.add_argument("--per_class", type=int, default=DataParams.per_class)
    parser.add_argument("--size", type=int, default=DataParams.size, help="image side, pixels")
    parser.add_argument("--seed", type=int, default=DataParams.seed)
    parser.add_argument("--shapes", default=",".join(DEMO_SHAPES),
                        help=f"comma-separated, from {', '.join(DEMO_SHAPES + EXTRA_SHAPES)}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    unknown = set(shapes) - set(DEMO_SHAPES + EXTRA_SHAPES)
    if unknown:
        parser.error(f"unknown shapes: {', '.join(sorted(unknown))}")
    counts = make_dataset(args.output_dir, DataParams(shapes, args.per_class, args.size, args.seed),
                          progress=not args.quiet)
    print(f"wrote {sum(counts.values())} images in {len(counts)} classes to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
