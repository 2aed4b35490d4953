"""The web page in real headless Chromium (Debian's chromium + chromedriver, via Selenium),
against the real gunicorn server serving the demo model."""
import html
import json
import os

import imagegen as ig
import pytest
from browsers import (  # noqa: F401 (browser is a fixture)
    By,
    WebDriverWait,
    browser,
    draw,
    open_page,
    shape_points,
    wait_for_result,
)
from helpers import DEMO, ROOT, post_image
from webservers import Recorder, body

ORT = os.path.join(ROOT, "static", "vendor", "onnxruntime-web", "ort.wasm.min.js")
#: Run in every new document before its own scripts: records Content-Security-Policy violations.
VIOLATIONS = """window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => window.cspViolations.push(
  e.effectiveDirective + " " + e.blockedURI + " " + e.sourceFile + ":" + e.lineNumber));"""


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
    # The evaluation summary of the demo model, with its confusion matrix.
    assert "Accuracy" in browser.find_element(By.ID, "eval-summary").text
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.confusion"))


def test_before_any_picture_the_result_panel_shows_no_broken_image(browser, demo_server):
    """The preview is hidden (and has no address) until there is a picture: before, its CSS
    display rule beat ``hidden`` and the panel showed a broken image with its alt text."""
    open_page(browser, demo_server)
    preview = browser.find_element(By.ID, "preview")
    assert not preview.is_displayed()
    assert preview.get_attribute("src") in (None, "")
    assert preview.size["height"] == 0 and preview.size["width"] == 0
    # No picture on the page is broken: each shown one has loaded with real pixels.
    broken = browser.execute_script(
        "return [...document.images].filter((i) => i.getClientRects().length &&"
        " !(i.complete && i.naturalWidth > 0)).map((i) => i.id || i.src)")
    assert broken == []
    browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                               "star.png"))
    assert wait_for_result(browser)[0] == "star"
    assert preview.is_displayed() and browser.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0", preview)


@pytest.mark.parametrize("width", [1200, 375])
def test_the_confusion_matrix_labels_are_readable(browser, demo_server, width):
    """The confusion matrix is a table of the report's counts whose column labels each stay
    on one line (the picture had them one letter a line), and it never makes the page scroll
    sideways."""
    report = json.load(open(os.path.join(DEMO, "report.json")))["confusion_matrix"]
    open_page(browser, demo_server, width=width)
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "table.confusion"))
    table = browser.find_element(By.CSS_SELECTOR, "table.confusion")
    columns = table.find_elements(By.CSS_SELECTOR, "thead th.predicted")
    assert [c.get_attribute("title") for c in columns] == [
        "predicted " + label for label in report["labels"]]
    assert [r.text for r in table.find_elements(By.CSS_SELECTOR, "tbody th.truth")] == \
        report["labels"]
    counts = [[int(td.text) for td in row.find_elements(By.TAG_NAME, "td")]
              for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert counts == report["rows_true_columns_predicted"]
    # One line of each label: the row headers' text (a Range over each), written across.
    lines = browser.execute_script(
        "return [...document.querySelectorAll('table.confusion tbody th.truth')].map((th) => {"
        " const r = document.createRange(); r.selectNodeContents(th);"
        " const b = r.getBoundingClientRect(); return [b.width, b.height]; })")
    line = lines[0][1]
    assert line > 5
    for column, label, (across, _) in zip(columns, report["labels"], lines):
        span = column.find_element(By.CLASS_NAME, "col-label")
        # Its text's line boxes (a Range's client rects): one, one line thick (written
        # across or upwards), not a line per letter.
        rects = browser.execute_script(
            "const r = document.createRange(); r.selectNodeContents(arguments[0]);"
            "return [...r.getClientRects()].map((b) => [b.width, b.height])", span)
        assert len(rects) == 1, (label, rects)
        assert min(rects[0]) < 1.5 * line, (label, rects, line)
        assert abs(max(rects[0]) - across) < 0.2 * across + 2, (label, rects, across)
        assert span.get_attribute("textContent") == label
    inner = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= inner


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


def test_the_page_runs_under_its_policy_without_a_violation(browser, demo_server):
    """Upload (preview from an object URL), the confusion matrix, the error words, and the
    in-browser mode (onnxruntime-web compiling its WebAssembly) all work under the page's
    Content-Security-Policy, and the browser reports no violation; the listener does see one
    when something the policy forbids is tried."""
    watch = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": VIOLATIONS})
    try:
        open_page(browser, demo_server)
        browser.find_element(By.ID, "file").send_keys(os.path.join(ROOT, "docs", "examples",
                                                                   "star.png"))
        assert wait_for_result(browser)[0] == "star"
        WebDriverWait(browser, 10).until(  # the matrix, its cells shaded through the CSSOM
            lambda d: d.find_elements(By.CSS_SELECTOR, "table.confusion td.diagonal"))
        preview = browser.execute_script("return document.getElementById('preview').src")
        assert preview.startswith("blob:")
        browser.find_element(By.ID, "draw-classify").click()  # nothing drawn: the page's own words
        assert "Draw something first" in browser.find_element(By.ID, "error").text
        if os.path.exists(ORT):
            WebDriverWait(browser, 20).until(
                lambda d: d.find_element(By.ID, "in-browser-panel").is_displayed())
            browser.find_element(By.ID, "in-browser").click()
            WebDriverWait(browser, 60).until(lambda d: "runs in this browser" in d.find_element(
                By.ID, "in-browser-note").text)
            side = browser.find_element(By.ID, "canvas").size["width"]
            draw(browser, shape_points("star", side))
            WebDriverWait(browser, 30).until(lambda d: d.execute_script(
                "return window.InBrowser.pending === 0 && window.InBrowser.last !== null"))
            assert "in your browser" in browser.find_element(By.ID, "meta").text
            assert browser.execute_script(  # onnxruntime-web was loaded pinned by its hash
                "return document.querySelector('script[src$=\"/ort.wasm.min.js\"]').integrity"
            ).startswith("sha384-")
        assert browser.execute_script("return window.cspViolations") == []
        browser.execute_script("const i = new Image(); i.src = 'http://example.invalid/x.png';"
                               "document.body.append(i)")
        WebDriverWait(browser, 10).until(lambda d: d.execute_script(
            "return window.cspViolations.length") == 1)
        assert browser.execute_script("return window.cspViolations")[0].startswith("img-src")
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", watch)


def test_a_form_on_another_site_cannot_post_feedback(browser, demo_server, tmp_path):
    """CSRF: a page on another site (localhost is another site than 127.0.0.1) submits a form
    to /feedback as the visitor's browser; the server refuses it (403) and keeps nothing."""
    picture = ig.encode(ig.noisy(ig.BLUE, (64, 64), seed=20_404), "PNG")  # no other test's
    filename = post_image(demo_server, picture, "mine.png", "image/png").json()["filename"]
    attack = (f'<!doctype html><body onload="document.forms[0].submit()">'
              f'<form method="post" action="{demo_server.url}/feedback">'
              f'<input name="filename" value="{html.escape(filename)}">'
              f'<input name="label" value="star"></form>').encode()
    site = Recorder("127.0.0.1", {"/attack.html": body(attack, "text/html")})
    try:
        browser.get(f"http://localhost:{site.server_address[1]}/attack.html")
        WebDriverWait(browser, 20).until(lambda d: d.current_url.startswith(demo_server.url))
        answer = browser.find_element(By.TAG_NAME, "body").text
    finally:
        site.close()
    assert '"cross_site_request"' in answer and '"status":403' in answer
    feedback = os.path.join(os.path.dirname(demo_server.temp_dir), "feedback")
    kept = [name for _, _, names in os.walk(feedback) for name in names]
    assert filename not in kept  # the server is shared: other tests' feedback may be there
