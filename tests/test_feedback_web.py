"""The page's "Wrong? It is a ..." buttons in real headless Chromium, against the real server
with the demo model: one click keeps the picture under the right label in FEEDBACK_DIR."""
import os

import pytest
from browsers import By, WebDriverWait, browser, open_page, wait_for_result  # noqa: F401
from helpers import DEMO, ROOT, start_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("feedback-web")
    server = start_server(work, {"MODEL_PATH": DEMO, "WORKERS": "1", "URL_ALLOW_HOSTS": ""})
    server.feedback_dir = str(work / "feedback")
    yield server
    server.stop()


def test_wrong_answer_buttons_send_the_right_label(browser, server):
    open_page(browser, server)
    assert not browser.find_element(By.ID, "feedback").is_displayed()  # nothing to correct yet
    browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                               "star.png"))
    labels = wait_for_result(browser)
    assert labels[0] == "star"
    box = browser.find_element(By.ID, "feedback")
    WebDriverWait(browser, 10).until(lambda d: box.is_displayed())
    assert "Wrong? It is a" in box.text
    # read and click through one script: the buttons are re-rendered, so elements found earlier
    # may be stale by the time they are used
    WebDriverWait(browser, 10).until(lambda d: set(button_texts(d)) == set(labels) - {"star"})
    browser.execute_script(
        "[...document.querySelectorAll('#feedback-labels button')]"
        ".find(b => b.textContent === 'heart').click()")
    done = browser.find_element(By.ID, "feedback-done")
    WebDriverWait(browser, 10).until(lambda d: "Thank you" in done.text)
    assert "feedback/heart/" in done.text
    kept = os.listdir(os.path.join(server.feedback_dir, "heart"))
    assert len([f for f in kept if f.endswith(".png")]) == 1
    assert browser.execute_script(
        "return [...document.querySelectorAll('#feedback-labels button')]"
        ".every(b => b.disabled)")
    # a new picture offers the buttons again, for its own answer
    browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                               "heart.png"))
    WebDriverWait(browser, 30).until(lambda d: button_texts(d) and "heart" not in button_texts(d))
    assert browser.find_element(By.ID, "feedback-done").text == ""


def button_texts(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#feedback-labels button')].map(b => b.textContent)")
