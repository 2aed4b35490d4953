"""The web page in real headless Chromium (Debian's chromium + chromedriver, via Selenium),
against the real gunicorn server serving the demo model."""
import math
import os
import shutil

import pytest

from helpers import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = os.path.join(ROOT, "docs", "screenshot.png")

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

pytestmark = pytest.mark.server


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


def test_upload_a_demo_image(browser, demo_server):
    open_page(browser, demo_server)
    browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                               "star.png"))
    labels = wait_for_result(browser)
    assert labels[0] == "star"
    assert "It looks like: star" in browser.find_element(By.ID, "status").text
    assert "demo v1" in browser.find_element(By.ID, "meta").text
    assert browser.find_element(By.ID, "preview").is_displayed()
    assert "%" in browser.find_element(By.CSS_SELECTOR, "#bars li .pct").text
    # The evaluation summary of the demo model, with its confusion matrix picture.
    assert "Accuracy" in browser.find_element(By.ID, "eval-summary").text
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const i = document.getElementById('confusion'); return i.complete && i.naturalWidth > 0"))
    browser.save_screenshot(SCREENSHOT)


def star_points(cx, cy, outer, inner):
    points = []
    for k in range(11):
        angle = -math.pi / 2 + k * math.pi / 5
        r = outer if k % 2 == 0 else inner
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw(browser, points):
    canvas = browser.find_element(By.ID, "canvas")
    size = canvas.size
    # ActionChains offsets are from the element's centre.
    to_offset = [(x - size["width"] / 2, y - size["height"] / 2) for x, y in points]
    chain = ActionChains(browser, duration=10).move_to_element_with_offset(canvas, *map(int, to_offset[0]))
    chain.click_and_hold()
    prev = to_offset[0]
    for x, y in to_offset[1:]:
        steps = 6
        for s in range(1, steps + 1):
            tx, ty = prev[0] + (x - prev[0]) * s / steps, prev[1] + (y - prev[1]) * s / steps
            chain.move_to_element_with_offset(canvas, int(tx), int(ty))
        prev = (x, y)
    chain.release().perform()


@pytest.mark.parametrize("shape", ["star", "circle"])
def test_draw_on_the_canvas(browser, demo_server, shape):
    open_page(browser, demo_server)
    browser.find_element(By.ID, "draw-clear").click()
    w = browser.find_element(By.ID, "canvas").size["width"]
    c = w / 2
    if shape == "star":
        points = star_points(c, c, w * 0.38, w * 0.16)
    else:
        points = [(c + w * 0.35 * math.cos(t / 24 * 2 * math.pi),
                   c + w * 0.35 * math.sin(t / 24 * 2 * math.pi)) for t in range(25)]
    draw(browser, points)
    browser.find_element(By.ID, "draw-classify").click()
    assert wait_for_result(browser)[0] == shape


def test_forbidden_url_shows_its_error(browser, demo_server):
    open_page(browser, demo_server)
    field = browser.find_element(By.ID, "url")
    field.clear()
    field.send_keys("http://169.254.169.254/latest/meta-data/")
    browser.find_element(By.ID, "url-go").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "That address is not allowed" in browser.find_element(By.ID, "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "#bars li") == []


def test_not_an_image_shows_its_error(browser, demo_server, tmp_path):
    open_page(browser, demo_server)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    browser.find_element(By.ID, "file").send_keys(str(text))
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "That file is not an image" in browser.find_element(By.ID, "error").text


def test_phone_sized_screen(browser, demo_server):
    open_page(browser, demo_server, width=375, height=800)
    inner = browser.execute_script("return window.innerWidth")
    scroll = browser.execute_script("return document.documentElement.scrollWidth")
    assert scroll <= inner, f"page scrolls sideways at {inner}px: {scroll}px wide"
    for element_id in ("drop", "url", "url-go", "canvas", "draw-classify", "draw-clear"):
        rect = browser.execute_script(
            "return arguments[0].getBoundingClientRect().toJSON()",
            browser.find_element(By.ID, element_id))
        assert rect["left"] >= 0 and rect["right"] <= inner + 0.5, (element_id, rect)
    browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                               "heart.png"))
    assert wait_for_result(browser)[0] == "heart"


def test_labels_and_keyboard(browser, demo_server):
    open_page(browser, demo_server)
    for control in ("file", "url"):
        assert browser.find_elements(By.CSS_SELECTOR, f"label[for={control}]")
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
    # Tab reaches the file picker and the URL field (the drop zone is the picker's label).
    body = browser.find_element(By.TAG_NAME, "body")
    reached = set()
    for _ in range(12):
        body.send_keys("\ue004")  # Tab
        reached.add(browser.switch_to.active_element.get_attribute("id"))
    assert {"file", "url", "url-go", "draw-classify"} <= reached
