#!/usr/bin/env python3
"""Draw the demo's independent test set in the real web page: pointer strokes on its canvas.

    python scripts/make_canvas_drawings.py          # or: make canvas-drawings

Starts the real server, opens its page in headless Chromium (Debian's chromium and
chromium-driver, through Selenium) and draws each shape on the page's canvas with W3C pointer
actions, as a person would: a hand-like path (wobble, overshoot, unclosed ends, corners cut
when drawn fast), mouse strokes and pen strokes of varied pressure (the page scales its line
width by a pen's pressure: thin and thick lines), at varied sizes (small ones too), positions
(off-centre) and rotations. Each drawing is saved as the PNG the page itself makes of its canvas
(``canvas.toDataURL``: the same pixels the *Classify drawing* button sends) into
``<output_dir>/<shape>/``.

The shapes are drawn by code of their own, not by make_demo_data.py's generator, and the set
is never used for training: scripts/build_demo.py only measures the demo on it (report.json's
``extra_tests``).
"""
from __future__ import annotations

import base64
import math
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, ROOT)

from scripts import cli  # noqa: E402
from scripts.make_demo_data import DEMO_SHAPES  # noqa: E402

DEFAULT_OUTPUT = os.path.join(ROOT, "tf_files", "canvas_drawings")
CANVAS = 280  # the page's canvas, in canvas pixels (templates/index.html)
LINE_WIDTH = 12  # the page's line width at pressure 0.5 (static/app.js); a pen's is 24 x pressure
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
                  "--window-size=1200,1000")


@dataclass
class DrawingParams:
    """What make_drawings draws, one line each."""

    shapes: tuple[str, ...] = DEMO_SHAPES  # class names, one sub-folder each
    per_class: int = 30  # drawings per shape
    seed: int = 7  # one seed for every path, size, place, pen and speed
    pen_share: float = 0.5  # share of drawings made with a pen (pressure: line width)


# -- shapes: strokes in unit coordinates (about [-1, 1]^2, y down) ------------------------------
def shape_strokes(shape: str, rng: np.random.Generator) -> list[np.ndarray]:
    """The strokes a person makes for ``shape``, before rotation, size and place."""
    return _SHAPES[shape](rng)


def _circle(rng):
    start, sweep = rng.uniform(0, 2 * np.pi), 2 * np.pi + rng.uniform(-0.45, 0.5)
    t = start + np.sign(rng.uniform(-1, 1)) * np.linspace(0, sweep, 48)
    return [np.stack([np.cos(t) * rng.uniform(0.8, 1.2), np.sin(t)], axis=1)]


def _closed(corners: np.ndarray, rng) -> list[np.ndarray]:
    """A polygon drawn in one stroke from a random corner, back to where it started."""
    k = int(rng.integers(len(corners)))
    order = np.roll(corners, -k, axis=0)
    return [np.vstack([order, order[:1]])]


def _triangle(rng):
    angles = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
    radii = rng.uniform(0.8, 1.0, 3)
    return _closed(np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1), rng)


def _square(rng):
    aspect = rng.uniform(0.85, 1.15)
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [aspect, 1.0] * 0.75
    corners = corners + rng.normal(0, 0.04, corners.shape)
    if rng.random() < 0.2:  # two L-shaped strokes
        return [corners[[0, 1, 2]], corners[[2, 3, 0]]]
    return _closed(corners, rng)


def _star(rng):
    angles = -np.pi / 2 + np.arange(5) * 2 * np.pi / 5
    tips = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if rng.random() < 0.5:  # the pentagram, one stroke: every second tip
        order = tips[[0, 2, 4, 1, 3, 0]]
        return [order + rng.normal(0, 0.03, order.shape)]
    inner = rng.uniform(0.35, 0.5)
    between = np.stack([np.cos(angles + np.pi / 5), np.sin(angles + np.pi / 5)], axis=1) * inner
    outline = np.empty((10, 2))
    outline[0::2], outline[1::2] = tips, between
    return _closed(outline, rng)


def _cross(rng):
    a, b = rng.uniform(0.75, 1.0, 2)
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    first = np.array([[-a, cy], [a, cy]])
    second = np.array([[cx, -b], [cx, b]])
    strokes = [first, second] if rng.random() < 0.5 else [second, first]
    return [s[::-1] if rng.random() < 0.3 else s for s in strokes]


def _heart(rng):
    t = np.linspace(0, 2 * np.pi, 64)
    x = 16 * np.sin(t) ** 3 / 17.0
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17.0 + 0.1
    pts = np.stack([x * rng.uniform(0.85, 1.15), y], axis=1)
    if rng.random() < 0.4:  # two halves, each from the top cusp down to the tip
        return [pts[:33][::-1], pts[32:]]
    return [pts]


_SHAPES = {"circle": _circle, "triangle": _triangle, "square": _square, "star": _star,
           "cross": _cross, "heart": _heart}
#: Rotation range in degrees: people draw hearts upright, the rest any way round.
ROTATION = {"heart": 25, "star": 180}


# -- a hand's path ------------------------------------------------------------------------------
def hand_path(stroke: np.ndarray, rng: np.random.Generator, wobble: float) -> np.ndarray:
    """Points along ``stroke`` as a hand draws them: resampled, wobbling, with the end
    overshooting or stopping short (by up to 8% and 6% of its length, and a quarter of the
    shape's radius)."""
    seg = np.diff(stroke, axis=0)
    cum = np.concatenate([[0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
    end = cum[-1] + float(np.clip(cum[-1] * rng.uniform(-0.06, 0.08), -0.35, 0.25))
    s = np.linspace(0, end, max(8, int(end / 0.05)))
    pts = np.stack([np.interp(s, cum, stroke[:, i]) for i in (0, 1)], axis=1)
    if end > cum[-1]:  # overshoot: carry on along the last segment
        direction = seg[-1] / max(np.hypot(*seg[-1]), 1e-9)
        beyond = s > cum[-1]
        pts[beyond] = stroke[-1] + np.outer(s[beyond] - cum[-1], direction)
    u = s / max(end, 1e-9)
    for axis in (0, 1):
        for freq in (1, 2, 3):
            pts[:, axis] += wobble / freq * rng.normal() * np.sin(
                2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))
    return pts


def place(strokes: list[np.ndarray], shape: str, rng: np.random.Generator,
          side: float = CANVAS) -> list[np.ndarray]:
    """Rotate, size and place unit strokes on a ``side`` x ``side`` canvas, keeping them on it:
    radius 12-42% of the side, anywhere that fits."""
    limit = ROTATION.get(shape, 180)
    angle = math.radians(rng.uniform(-limit, limit))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    turned = [s @ rot.T for s in strokes]
    allpts = np.vstack(turned)
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    scale = rng.uniform(0.12, 0.42) * side / max(np.abs(allpts).max(), 1e-6)
    margin = 8.0
    span = (hi - lo) * scale
    scale *= min(1.0, (side - 2 * margin) / max(span.max(), 1e-6))
    span = (hi - lo) * scale
    offset = np.array([rng.uniform(margin, max(margin, side - margin - span[i]))
                       for i in (0, 1)]) - lo * scale
    return [s * scale + offset for s in turned]


def pointer_steps(points: np.ndarray, step: float) -> np.ndarray:
    """The pointer positions sent to the page: every ``step`` canvas pixels along the path
    (a fast hand: few, far-apart events, so curves become corners)."""
    seg = np.diff(points, axis=0)
    cum = np.concatenate([[0], np.cumsum(np.hypot(seg[:, 0], seg[:, 1]))])
    s = np.linspace(0, cum[-1], max(2, int(cum[-1] / step) + 1))
    return np.stack([np.interp(s, cum, points[:, i]) for i in (0, 1)], axis=1)


@dataclass
class Drawing:
    """One planned drawing: strokes in canvas pixels, pen or mouse, pressure, speed."""

    shape: str
    strokes: list[np.ndarray]
    pen: bool
    pressure: float  # 0.5 for the mouse (the page then draws its standard width)
    move_ms: int  # duration of each pointer move


def plan(shape: str, rng: np.random.Generator, pen_share: float = 0.5) -> Drawing:
    """A seeded, hand-like drawing of ``shape``."""
    wobble = rng.uniform(0.01, 0.05)
    strokes = [hand_path(s, rng, wobble) for s in shape_strokes(shape, rng)]
    placed = place(strokes, shape, rng)
    step = rng.uniform(3, 14)
    pen = bool(rng.random() < pen_share)
    extent = np.ptp(np.vstack(placed), axis=0).max()
    # A person draws a thick line on a big shape: the line's width at most 1/5 of the extent.
    heaviest = min(0.8, extent / 5 / (2 * LINE_WIDTH))
    pressure = float(rng.uniform(0.18, max(0.2, heaviest))) if pen else 0.5
    return Drawing(shape, [pointer_steps(s, step) for s in placed], pen, pressure,
                   int(rng.integers(5, 25)))


# -- the page -----------------------------------------------------------------------------------
def chromium(profile_dir: str):
    """Headless Debian Chromium through chromedriver (flags as the browser tests use them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile_dir}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")
                                              or "/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(30)
    return driver


def draw_in_page(driver, drawing: Drawing) -> bytes:
    """Clear the page's canvas, draw ``drawing`` with pointer actions, return the canvas PNG."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "draw-clear").click()
    canvas = driver.find_element(By.ID, "canvas")
    css = canvas.size["width"] / CANVAS  # CSS pixels per canvas pixel
    kind = interaction.POINTER_PEN if drawing.pen else interaction.POINTER_MOUSE
    for stroke in drawing.strokes:
        builder = ActionBuilder(driver, mouse=PointerInput(kind, "pen" if drawing.pen else "mouse"),
                                duration=drawing.move_ms)
        actions = builder.pointer_action

        def at(p):  # offsets from the element's centre, in CSS pixels
            return int(round((p[0] - CANVAS / 2) * css)), int(round((p[1] - CANVAS / 2) * css))

        pressure = {"pressure": drawing.pressure} if drawing.pen else {}
        actions.move_to(canvas, *at(stroke[0]))
        actions.pointer_down(**pressure)
        for p in stroke[1:]:
            actions.move_to(canvas, *at(p), **pressure)
        actions.pointer_up()
        builder.perform()
    data_url = driver.execute_script(
        "return document.getElementById('canvas').toDataURL('image/png')")
    return base64.b64decode(data_url.split(",", 1)[1])


def make_drawings(output_dir: str = DEFAULT_OUTPUT, params: DrawingParams = DrawingParams(),
                  progress: bool = True) -> dict:
    """Draw ``params.per_class`` drawings of each shape in the real page into
    ``output_dir/<shape>/<shape>_<i>.png`` (the folder is replaced); returns {shape: count}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    from tqdm import tqdm

    from scripts.liveserver import LiveServer

    rng = np.random.default_rng(params.seed)
    plans = [plan(shape, rng, params.pen_share) for shape in params.shapes
             for _ in range(params.per_class)]
    staging = output_dir.rstrip("/") + ".incoming"
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as work:
        server = LiveServer({"TEMP_DIR": os.path.join(work, "temp")})
        server.start(os.path.join(work, "server.log"))
        driver = None
        try:
            driver = chromium(os.path.join(work, "profile"))
            driver.get(server.url + "/")
            WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.ID, "canvas")))
            counts: dict[str, int] = {}
            for drawing in tqdm(plans, desc="drawing in the page", unit="drawing",
                                disable=not progress):
                i = counts.get(drawing.shape, 0)
                folder = os.path.join(staging, drawing.shape)
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, f"{drawing.shape}_{i:03d}.png"), "wb") as fh:
                    fh.write(draw_in_page(driver, drawing))
                counts[drawing.shape] = i + 1
        finally:
            if driver is not None:
                driver.quit()
            server.stop()
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staging, output_dir)
    return counts


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], verbose_flag=False)
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT, help="where the shape folders go")
    parser.add_argument("--per_class", type=int, default=DrawingParams.per_class)
    parser.add_argument("--seed", type=int, default=DrawingParams.seed)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = cli.parse_args(parser, argv, tensorflow=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server and browser too
    counts = make_drawings(args.output_dir, DrawingParams(per_class=args.per_class,
                                                          seed=args.seed), not args.quiet)
    print(f"drew {sum(counts.values())} drawings in {len(counts)} classes into {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
