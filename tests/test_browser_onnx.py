"""The page's "run in this browser" mode in real Chromium: the demo's model.onnx and imported
ONNX models (NCHW torchvision crops, NHWC uint8 letterboxes) on the vendored onnxruntime-web
must answer like the server (same top label, scores within 0.01) for pictures and drawings,
its preprocessing must equal the server's bit for bit, and it must keep answering with the
server gone."""
import base64
import io
import os

import numpy as np
import pytest
import requests
from browser_models import TORCHVISION, UINT8_LETTERBOX, save_onnx_model
from browser_models import pictures as banded_pictures
from browsers import By, WebDriverWait, browser, draw, open_page, shape_points  # noqa: F401
from helpers import DEMO, ROOT, post_image, start_server
from PIL import Image

from common.inference.images import load_for_model
from common.inference.preprocessing import INTERPOLATIONS, RESIZES, Preprocessing

pytestmark = pytest.mark.server

ORT = os.path.join(ROOT, "static", "vendor", "onnxruntime-web", "ort.wasm.min.js")
if not os.path.exists(ORT):
    if os.environ.get("CI"):
        raise RuntimeError("CI must vendor onnxruntime-web (scripts/vendor_ort.sh; .ci/run does)")
    pytest.skip("onnxruntime-web not vendored (scripts/vendor_ort.sh)", allow_module_level=True)

DRAWINGS = os.path.join(ROOT, "tf_files", "canvas_drawings")
#: Scores may differ by rounding only: a different resize or value range shows up far above it.
TOLERANCE = 0.01


def pictures(tmp_path) -> list[str]:
    """Image files of every kind the page may get: the examples, drawings made in the page,
    a transparent PNG, a large JPEG (the server decodes it at 1/8 scale) and a large PNG (the
    server reduces it by an integer factor before the resize)."""
    paths = [os.path.join(ROOT, "docs", "examples", f) for f in ("star.png", "heart.png")]
    paths += [os.path.join(DRAWINGS, shape, f"{shape}_00{i}.png")
              for shape in sorted(os.listdir(DRAWINGS)) for i in (1, 7)]
    star = Image.open(paths[0]).convert("RGB")
    alpha = star.convert("L").point(lambda v: 255 - v)  # the ink opaque, the paper clear
    transparent = Image.merge("RGBA", (*Image.new("RGB", star.size, (30, 60, 200)).split(), alpha))
    transparent.save(tmp_path / "transparent.png")
    star.resize((900, 700)).save(tmp_path / "big.jpg", quality=92)
    star.resize((1500, 1100)).save(tmp_path / "big.png")  # box-reduced before the resize
    return paths + [str(tmp_path / f) for f in ("transparent.png", "big.jpg", "big.png")]


def switch_on(browser, server):
    open_page(browser, server)
    WebDriverWait(browser, 20).until(
        lambda d: d.find_element(By.ID, "in-browser-panel").is_displayed())
    browser.find_element(By.ID, "in-browser").click()
    WebDriverWait(browser, 60).until(lambda d: "runs in this browser" in d.find_element(
        By.ID, "in-browser-note").text)


def classify_file(browser, path: str) -> dict:
    """Give the page ``path`` and return its in-browser answer (counted, not compared with the
    previous one: two pictures may well get equal answers)."""
    before = browser.execute_script("return window.InBrowser.answered")
    browser.find_element(By.ID, "file").send_keys(path)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return window.InBrowser.answered") > before)
    error = browser.execute_script("return window.InBrowser.error")
    assert error is None, (os.path.basename(path), error)
    return browser.execute_script("return window.InBrowser.last")


def assert_agrees(in_browser: dict, server: dict, what: str) -> None:
    mine = {p["label"]: p["score"] for p in in_browser["predictions"]}
    theirs = {p["label"]: p["score"] for p in server["predictions"]}
    assert in_browser["predictions"][0]["label"] == server["predictions"][0]["label"], \
        (what, in_browser["predictions"][:3], server["predictions"][:3])
    worst = max(abs(mine[label] - theirs[label]) for label in theirs)
    assert worst <= TOLERANCE, (what, worst, in_browser["predictions"], server["predictions"])


def test_pictures_in_the_browser_agree_with_the_server(browser, demo_server, tmp_path):
    switch_on(browser, demo_server)
    for path in pictures(tmp_path):
        mine = classify_file(browser, path)
        with open(path, "rb") as fh:
            server = post_image(demo_server, fh.read()).json()
        assert_agrees(mine, server, os.path.basename(path))
    meta = browser.find_element(By.ID, "meta").text
    assert "in your browser" in meta and "ms" in meta
    # the README's screenshot: the demo's star, classified in this browser
    browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                               "star.png"))
    WebDriverWait(browser, 30).until(
        lambda d: "It looks like: star" in d.find_element(By.ID, "status").text
        and "in your browser" in d.find_element(By.ID, "meta").text)
    # written to build/ (git-ignored): a test run must not change a tracked file; copy it over
    # docs/screenshot.png by hand when the page's look changes
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    browser.save_screenshot(os.path.join(ROOT, "build", "screenshot.png"))


def settled_result(browser) -> dict:
    """The in-browser answer for the finished drawing (once no debounced call is pending)."""
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return window.InBrowser.pending === 0 && window.InBrowser.last !== null"))
    return browser.execute_script("return window.InBrowser.last")


def canvas_png(browser) -> bytes:
    url = browser.execute_script("return document.getElementById('canvas').toDataURL()")
    return base64.b64decode(url.split(",", 1)[1])


@pytest.mark.parametrize("shape", ["star", "circle"])
def test_drawings_are_classified_live_as_the_server_would(browser, demo_server, shape):
    switch_on(browser, demo_server)
    browser.find_element(By.ID, "draw-clear").click()
    points = shape_points(shape, browser.find_element(By.ID, "canvas").size["width"])
    draw(browser, points)  # no button: the page classifies as the stroke goes on
    result = settled_result(browser)
    assert result["predictions"][0]["label"] == shape
    assert_agrees(result, post_image(demo_server, canvas_png(browser)).json(), shape)


def test_the_page_keeps_classifying_with_the_server_gone(browser, tmp_path):
    server = start_server(tmp_path, {"MODEL_PATH": DEMO, "WORKERS": "1"})
    try:
        switch_on(browser, server)
    finally:
        server.stop()
    browser.find_element(By.ID, "draw-clear").click()
    draw(browser, shape_points("star", browser.find_element(By.ID, "canvas").size["width"]))
    assert settled_result(browser)["predictions"][0]["label"] == "star"
    assert "in your browser" in browser.find_element(By.ID, "meta").text
    with pytest.raises(requests.ConnectionError):  # the server really is gone
        requests.get(server.url + "/healthz", timeout=2)


@pytest.mark.parametrize("preprocessing", [TORCHVISION, UINT8_LETTERBOX],
                         ids=["torchvision-nchw-crop", "uint8-bgr-letterbox"])
def test_an_imported_onnx_model_answers_in_the_browser_as_on_the_server(browser, tmp_path,
                                                                         preprocessing):
    folder = save_onnx_model(str(tmp_path / "model"), preprocessing)
    server = start_server(tmp_path, {"MODEL_PATH": folder, "WORKERS": "1"})
    try:
        model = requests.get(server.url + "/model", timeout=10).json()
        assert model["onnx"]["preprocessing"] == model["preprocessing"], model
        assert model["onnx"]["input"]["name"] == "input", model
        switch_on(browser, server)
        for path in banded_pictures(tmp_path):
            mine = classify_file(browser, path)
            with open(path, "rb") as fh:
                server_answer = post_image(server, fh.read()).json()
            assert_agrees(mine, server_answer, os.path.basename(path))
    finally:
        server.stop()


#: (width, height) of the pictures the port is checked on: wider and taller than the input,
#: smaller than it (the crop enlarges), and large enough to be box-reduced before the resize.
PORT_SIZES = [(50, 37), (37, 50), (20, 12), (129, 400), (350, 240)]


def port_specs() -> list[dict]:
    """Every filter with every resize, and the channel steps: colour order, layout, mean/std,
    uint8 pixels and a crop larger than the resized picture (padded with black)."""
    specs = [{"resize": resize, "interpolation": interpolation, "layout": "NCHW",
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
             for interpolation in INTERPOLATIONS for resize in RESIZES]
    specs += [{"preset": "keras-caffe"}, {"preset": "inception", "resize": "letterbox"},
              {"resize": "crop", "resize_shorter": 20, "interpolation": "bicubic"},
              {"resize": "crop", "resize_shorter": 90, "dtype": "uint8", "colour": "BGR",
               "layout": "NCHW"}]
    return specs


def test_the_page_preprocesses_bit_for_bit_as_the_server(browser, demo_server):
    """The page's port of the preprocessing (decode aside) against the server's own
    load_for_model on the same PNG: every value equal, for every filter, resize and channel
    step (the JPEG draft is the decoder's and is only checked through the scores above)."""
    open_page(browser, demo_server)
    rng = np.random.default_rng(7)
    images, cases = [], []
    for width, height in PORT_SIZES:
        coarse = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), dtype=np.uint8)
        pixels = np.array(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
        pixels[rng.random((height, width)) < 0.05] = 255  # sharp dots: filters differ
        images.append({"rgb": base64.b64encode(pixels.tobytes()).decode(), "w": width,
                       "h": height})
    for n, given in enumerate(port_specs()):
        spec = Preprocessing.from_dict(given)
        for index, (width, height) in enumerate(PORT_SIZES):
            size = [(32, 32), (24, 30), (30, 17)][(n + index) % 3]
            png = io.BytesIO()
            Image.frombytes("RGB", (width, height),
                            base64.b64decode(images[index]["rgb"])).save(png, "PNG")
            expected, _ = load_for_model(png.getvalue(), size, spec=spec)
            cases.append({"image": index, "size": list(size), "spec": spec.as_dict(),
                          "dtype": str(expected.dtype),
                          "expected": base64.b64encode(expected.tobytes()).decode()})
    results = browser.execute_script("""
        const [images, cases] = arguments;
        const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const rgba = images.map(({ rgb, w, h }) => {
          const src = bytes(rgb), data = new Uint8ClampedArray(w * h * 4);
          for (let i = 0; i < w * h; i++) {
            data.set(src.subarray(i * 3, i * 3 + 3), i * 4); data[i * 4 + 3] = 255;
          }
          return { data, width: w, height: h };
        });
        return cases.map((c) => {
          const got = window.InBrowser.toModelInput(rgba[c.image], c.size[0], c.size[1],
                                                     false, c.spec);
          const raw = bytes(c.expected);
          const want = c.dtype === "uint8" ? raw : new Float32Array(raw.buffer);
          if (got.length !== want.length) return ["length", got.length, want.length];
          let wrong = 0, first = -1;
          for (let i = 0; i < got.length; i++) {
            if (got[i] !== want[i]) { wrong++; if (first < 0) first = i; }
          }
          return wrong ? [wrong, first, got[first], want[first]] : null;
        });""", images, cases)
    failed = [(PORT_SIZES[c["image"]], c["size"], c["spec"], r)
              for c, r in zip(cases, results) if r is not None]
    assert not failed, failed[:5]
    # what the page refuses to port (the switch stays hidden, pictures go to the server): a
    # value or a setting it does not know, an input shape that is not the spec's
    spec = Preprocessing.from_dict(TORCHVISION).as_dict()
    refusals = browser.execute_script("""
        const [spec] = arguments, check = window.InBrowser.unsupported;
        return [check(spec, [32, 32], [-1, 3, 32, 32]),
                check({ ...spec, resize: "squash" }, [32, 32], null),
                check({ ...spec, interpolation: "hamming" }, [32, 32], null),
                check({ ...spec, gamma: 2.2 }, [32, 32], null),
                check(spec, [32, 32], [-1, 32, 32, 3])];""", spec)
    assert refusals[0] is None, refusals
    assert all(refusals[1:]), refusals
