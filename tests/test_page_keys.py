"""The web page against a server that wants API keys (README "Access control"), in real headless
Chromium: the page asks for a key on 401, keeps it for the tab (sessionStorage) and sends it
with every API call, says when a key is refused or lacks a scope, and forgets it on demand."""
import os

import pytest
from browsers import (  # noqa: F401 (browser is a fixture)
    By,
    EC,
    WebDriverWait,
    browser,
    draw,
    shape_points,
    wait_for_result,
)
from helpers import DEMO, ROOT, start_server

pytestmark = pytest.mark.server

STAR = os.path.join(ROOT, "docs", "examples", "star.png")
ORT = os.path.join(ROOT, "static", "vendor", "onnxruntime-web", "ort.wasm.min.js")
#: A key for classifying and feedback, and one for classifying only (test values, not secrets).
FULL_KEY = "page-test-key-0123456789abcdefghijklmnopqrstu"
VIEW_KEY = "view-test-key-0123456789abcdefghijklmnopqrstu"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("keyed"), {
        "MODEL_PATH": DEMO, "WORKERS": "1",
        "API_KEYS": f"page:{FULL_KEY}:classify+feedback,viewer:{VIEW_KEY}:classify"})
    yield server
    server.stop()


def fresh_tab(browser, server):
    """The page in a tab that holds no key yet."""
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear(); localStorage.clear()")
    browser.refresh()


def form_shown(browser, note: str):
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "key-form").is_displayed()
                                     and note in d.find_element(By.ID, "key-note").text)


def enter_key(browser, key: str):
    field = browser.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    browser.find_element(By.ID, "key-use").click()


def model_shown(browser):
    WebDriverWait(browser, 20).until(
        EC.text_to_be_present_in_element((By.ID, "model-name"), "labels"))


def held_key(browser):
    return browser.execute_script("return sessionStorage.getItem('classifier-api-key')")


def test_the_page_asks_for_a_key_keeps_it_for_the_tab_and_forgets_it(browser, keyed_server):
    fresh_tab(browser, keyed_server)
    # GET /model answered 401 at load: the form asks, with a label and a password field.
    form_shown(browser, "needs an API key")
    assert browser.find_elements(By.CSS_SELECTOR, "label[for=api-key]")
    assert browser.find_element(By.ID, "api-key").get_attribute("type") == "password"
    assert browser.switch_to.active_element.get_attribute("id") == "api-key"
    # A wrong key: refused, said so, not kept.
    enter_key(browser, "not-the-key")
    form_shown(browser, "not accepted")
    assert held_key(browser) is None
    # The right one: the waiting request goes through, and a picture is classified.
    enter_key(browser, FULL_KEY)
    model_shown(browser)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    assert held_key(browser) == FULL_KEY
    browser.find_element(By.ID, "file").send_keys(STAR)
    assert wait_for_result(browser)[0] == "star"
    # The key is in sessionStorage only: not in localStorage, the URL, or the page.
    assert browser.execute_script("return localStorage.length") == 0
    assert FULL_KEY not in browser.current_url
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == ""
    assert FULL_KEY not in browser.execute_script("return document.documentElement.outerHTML")
    # A reload in the same tab keeps it: no form, the model and a classification as before.
    browser.refresh()
    model_shown(browser)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    browser.find_element(By.ID, "file").send_keys(STAR)
    assert wait_for_result(browser)[0] == "star"
    # "Forget key": gone from the tab; the next load asks again.
    forget = browser.find_element(By.ID, "key-forget")
    assert forget.is_displayed()
    forget.click()
    assert held_key(browser) is None
    assert not forget.is_displayed()
    assert "forgotten" in browser.find_element(By.ID, "key-state").text
    browser.refresh()
    form_shown(browser, "needs an API key")


def test_a_request_made_before_the_key_is_sent_again_with_it(browser, keyed_server):
    """A picture given while the page has no key waits for the form, then is classified."""
    fresh_tab(browser, keyed_server)
    form_shown(browser, "needs an API key")
    browser.find_element(By.ID, "file").send_keys(STAR)
    WebDriverWait(browser, 10).until(
        lambda d: "Classifying" in d.find_element(By.ID, "status").text)
    enter_key(browser, FULL_KEY)
    assert wait_for_result(browser)[0] == "star"
    model_shown(browser)


def test_a_key_without_the_feedback_scope_is_told_so(browser, keyed_server):
    fresh_tab(browser, keyed_server)
    form_shown(browser, "needs an API key")
    enter_key(browser, VIEW_KEY)
    model_shown(browser)
    browser.find_element(By.ID, "file").send_keys(STAR)
    assert wait_for_result(browser)[0] == "star"
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "feedback").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#feedback-labels button").click()
    WebDriverWait(browser, 20).until(lambda d: "does not allow sending feedback" in
                                     d.find_element(By.ID, "feedback-done").text)
    # The key is still good for classifying: kept, the form not shown again.
    assert held_key(browser) == VIEW_KEY
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    # And with the key that has the scope, the feedback is taken.
    browser.find_element(By.ID, "key-forget").click()
    browser.refresh()
    form_shown(browser, "needs an API key")
    enter_key(browser, FULL_KEY)
    browser.find_element(By.ID, "file").send_keys(STAR)
    assert wait_for_result(browser)[0] == "star"
    WebDriverWait(browser, 10).until(lambda d: d.find_element(By.ID, "feedback").is_displayed())
    browser.find_element(By.CSS_SELECTOR, "#feedback-labels button").click()
    WebDriverWait(browser, 20).until(
        lambda d: "Thank you" in d.find_element(By.ID, "feedback-done").text)


@pytest.mark.skipif(not os.path.exists(ORT), reason="onnxruntime-web not vendored "
                                                    "(scripts/vendor_ort.sh)")
def test_the_in_browser_mode_fetches_the_model_with_the_key(browser, keyed_server):
    """model.onnx is behind the key too: the in-browser switch loads it with the tab's key
    (and its integrity) and classifies a drawing."""
    fresh_tab(browser, keyed_server)
    form_shown(browser, "needs an API key")
    enter_key(browser, FULL_KEY)
    model_shown(browser)
    WebDriverWait(browser, 20).until(
        lambda d: d.find_element(By.ID, "in-browser-panel").is_displayed())
    browser.find_element(By.ID, "in-browser").click()
    WebDriverWait(browser, 60).until(
        lambda d: "runs in this browser" in d.find_element(By.ID, "in-browser-note").text)
    draw(browser, shape_points("star", browser.find_element(By.ID, "canvas").size["width"]))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return window.InBrowser.pending === 0 && window.InBrowser.last !== null"))
    assert "in your browser" in browser.find_element(By.ID, "meta").text
