"""Driving Debian's Chromium with Selenium for the browser tests (test_web.py,
test_browser_onnx.py): the driver, the page, results, drawing on the canvas.

Importing this module skips the importing test module when chromium or chromedriver is missing
(and fails under CI, which must install them: .ci/run does).
"""
import math
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install chromium and chromium-driver (.ci/run does)")
    pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

__all__ = ["CHROMIUM", "CHROMEDRIVER", "By", "EC", "WebDriverWait", "browser", "open_page",
           "wait_for_result", "star_points", "shape_points", "draw"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def open_page(browser, server, width=1200, height=1000):
    browser.set_window_size(width, height)
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(
        EC.text_to_be_present_in_element((By.ID, "model-name"), "labels"))


def wait_for_result(browser):
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#bars li")
        or d.find_element(By.ID, "error").is_displayed())
    return [li.find_element(By.CLASS_NAME, "label").text
            for li in browser.find_elements(By.CSS_SELECTOR, "#bars li")]


def star_points(cx, cy, outer, inner):
    points = []
    for k in range(11):
        angle = -math.pi / 2 + k * math.pi / 5
        r = outer if k % 2 == 0 else inner
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def shape_points(shape: str, side: float) -> list[tuple[float, float]]:
    """A star or a circle across most of a canvas ``side`` pixels wide, as stroke points."""
    c = side / 2
    if shape == "star":
        return star_points(c, c, side * 0.38, side * 0.16)
    return [(c + side * 0.35 * math.cos(t / 24 * 2 * math.pi),
             c + side * 0.35 * math.sin(t / 24 * 2 * math.pi)) for t in range(25)]


def draw(browser, points):
    canvas = browser.find_element(By.ID, "canvas")
    size = canvas.size
    # ActionChains offsets are from the element's centre.
    to_offset = [(x - size["width"] / 2, y - size["height"] / 2) for x, y in points]
    chain = ActionChains(browser, duration=10).move_to_element_with_offset(
        canvas, *map(int, to_offset[0]))
    chain.click_and_hold()
    prev = to_offset[0]
    for x, y in to_offset[1:]:
        steps = 6
        for s in range(1, steps + 1):
            tx, ty = prev[0] + (x - prev[0]) * s / steps, prev[1] + (y - prev[1]) * s / steps
            chain.move_to_element_with_offset(canvas, int(tx), int(ty))
        prev = (x, y)
    chain.release().perform()
