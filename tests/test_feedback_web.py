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
    buttons = {b.text: b for b in box.find_elements(By.CSS_SELECTOR, "#feedback-labels button")}
    assert set(buttons) == set(labels) - {"star"}  # the model's other labels
    buttons["heart"].click()
    done = browser.find_element(By.ID, "feedback-done")
    WebDriverWait(browser, 10).until(lambda d: "Thank you" in done.text)
    assert "feedback/heart/" in done.text
    kept = os.listdir(os.path.join(server.feedback_dir, "heart"))
    assert len([f for f in kept if f.endswith(".png")]) == 1
    assert all(b.get_attribute("disabled") for b in
               box.find_elements(By.CSS_SELECTOR, "#feedback-labels button"))
    # a new picture offers the buttons again, for its own answer
    browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                               "heart.png"))
    WebDriverWait(browser, 30).until(lambda d: "heart" not in [
        b.text for b in d.find_elements(By.CSS_SELECTOR, "#feedback-labels button")])
    assert browser.find_element(By.ID, "feedback-done").text == ""
