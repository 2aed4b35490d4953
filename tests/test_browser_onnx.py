"""The page's "run in this browser" mode in real Chromium: the demo's model.onnx on the vendored
onnxruntime-web must answer like the server (same top label, scores within 0.01) for pictures
and drawings, and keep answering with the server gone."""
import base64
import os

import pytest
import requests
from browsers import By, WebDriverWait, browser, draw, open_page, shape_points  # noqa: F401
from helpers import DEMO, ROOT, post_image, start_server
from PIL import Image

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
