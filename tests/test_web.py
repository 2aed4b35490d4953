"""The web page in real headless Chromium (Debian's chromium + chromedriver, via Selenium),
against the real gunicorn server serving the demo model."""
import os

import pytest

from browsers import (By, WebDriverWait, browser, draw, open_page,  # noqa: F401
                      shape_points, wait_for_result)
from helpers import ROOT


pytestmark = pytest.mark.server


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


@pytest.mark.parametrize("shape", ["star", "circle"])
def test_draw_on_the_canvas(browser, demo_server, shape):
    open_page(browser, demo_server)
    browser.find_element(By.ID, "draw-clear").click()
    points = shape_points(shape, browser.find_element(By.ID, "canvas").size["width"])
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
