"""HTTP-level safety against the real server: security headers on every answer, Subresource
Integrity of the page's scripts, no redirect built from ``Host``, the ``Host`` allowlist
(DNS rebinding) and cross-site posts to ``/feedback`` refused (CSRF). The page itself in
Chromium (no CSP violation, a cross-site form post refused): tests/test_web.py."""
import base64
import hashlib
import http.client
import io
import os
import re
from html.parser import HTMLParser

import pytest
import requests
from helpers import DEMO, ROOT, assert_envelope, post_image, start_server
from PIL import Image

from common.web.security import HostAllowlist, is_cross_site

pytestmark = pytest.mark.server

#: The names the guarded server answers to; 127.0.0.1 so that the tests' own requests pass.
ALLOWED = "service.example,.corp.example,10.0.0.0/8,127.0.0.1"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    work = tmp_path_factory.mktemp("web-security")
    server = start_server(work, {"MODEL_PATH": DEMO, "WORKERS": "1", "ALLOWED_HOSTS": ALLOWED})
    server.feedback_dir = str(work / "feedback")
    yield server
    server.stop()


def send(server, method: str, path: str, host: str, headers: dict | None = None,
         body: bytes = b""):
    """One request with exactly this path (no client-side normalisation) and ``Host``."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


class Tags(HTMLParser):
    """The page's ``<script>`` and ``<link>`` tags, with their attributes and inline text."""

    def __init__(self):
        super().__init__()
        self.scripts, self.links, self._in_script = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._in_script = {**dict(attrs), "text": ""}
            self.scripts.append(self._in_script)
        elif tag == "link":
            self.links.append(dict(attrs))

    def handle_data(self, data):
        if self._in_script is not None:
            self._in_script["text"] += data

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None


def page_tags(server) -> Tags:
    tags = Tags()
    tags.feed(requests.get(server.url + "/", timeout=10).text)
    return tags


def sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


# -- headers ---------------------------------------------------------------------------------
def test_the_page_has_a_strict_content_security_policy_and_no_inline_script(guarded):
    response = requests.get(guarded.url + "/", timeout=10)
    assert response.status_code == 200
    policy = dict(part.strip().split(" ", 1) for part in
                  response.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self' 'wasm-unsafe-eval'"  # no inline, no eval
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    scripts = page_tags(guarded).scripts
    assert len(scripts) == 2
    assert all(s.get("src") and not s["text"].strip() for s in scripts), scripts


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/", 200), ("GET", "/healthz", 200), ("GET", "/model", 200),
    ("GET", "/static/app.js", 200), ("GET", "/model/confusion_matrix.png", 200),
    ("GET", "/openapi.json", 200), ("GET", "/nope", 404), ("POST", "/classify", 415),
    ("GET", "/v2/models/nope", 404), ("DELETE", "/healthz", 405),
])
def test_every_answer_carries_the_security_headers(guarded, method, path, status):
    response = requests.request(method, guarded.url + path, timeout=10)
    assert response.status_code == status
    headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    if not headers["Content-Type"].startswith("text/html"):
        assert headers["Content-Security-Policy"].startswith("default-src 'none';")


# -- Subresource Integrity -------------------------------------------------------------------
def test_every_script_and_stylesheet_is_pinned_by_the_hash_of_what_is_served(guarded):
    tags = page_tags(guarded)
    pinned = [(s["src"], s.get("integrity")) for s in tags.scripts]
    pinned += [(link["href"], link.get("integrity")) for link in tags.links
               if link.get("rel") == "stylesheet"]
    assert len(pinned) == 3
    for url, integrity in pinned:
        served = requests.get(guarded.url + url, timeout=10)
        assert served.status_code == 200, url
        assert integrity and integrity == sri(served.content), url
    # onnxruntime-web, which inbrowser.js loads only when switched on, is pinned too
    ort = next(s for s in tags.scripts if "data-ort-integrity" in s)["data-ort-integrity"]
    path = os.path.join(ROOT, "static", "vendor", "onnxruntime-web", "ort.wasm.min.js")
    if not os.path.exists(path):
        assert ort == ""  # not vendored: the page does not offer the in-browser mode
        return
    served = requests.get(guarded.url + "/static/vendor/onnxruntime-web/ort.wasm.min.js",
                          timeout=10)
    assert ort == sri(served.content)  # tests/test_web.py checks the browser loads it so


# -- no redirect built from Host ---------------------------------------------------------------
SAMPLE = {"int": "1", "path": "app.js"}


def concrete(rule: str) -> str:
    """``/models/<name>/versions/<int:version>/classify`` -> ``/models/demo/versions/1/...``."""
    return re.sub(r"<(?:(\w+)(?:\([^)]*\))?:)?\w+>", lambda m: SAMPLE.get(m.group(1), "demo"),
                  rule)


def variants(path: str) -> list[str]:
    """The path, with a trailing slash, with each slash doubled in turn and with all doubled."""
    slashes = [i for i, c in enumerate(path) if c == "/"]
    return ([path, path.rstrip("/") + "/", path.replace("/", "//")]
            + [path[:i] + "/" + path[i:] for i in slashes])


def test_no_route_answers_a_redirect(app, guarded):
    """Every route of the app, with doubled and trailing slashes, by each of its methods:
    never a 3xx or a Location (werkzeug's slash redirects name the client's Host), and
    errors are JSON."""
    checked, wrong = 0, []
    paths = {concrete(rule.rule): sorted(rule.methods - {"HEAD", "OPTIONS"})
             for rule in app.url_map.iter_rules()}
    # The repository extension's load and unload change what the server serves: ask them for a
    # model it does not have (404), so that the tests after this one still find "demo" served.
    paths = {path.replace("/repository/models/demo/", "/repository/models/no-such-model/"): m
             for path, m in paths.items()}
    paths["/static//etc/passwd"] = ["GET"]
    paths["///evil.example/x"] = ["GET"]
    for path, methods in paths.items():
        for variant in variants(path):
            for method in methods:
                status, headers, body = send(guarded, method, variant, "service.example",
                                             {"Content-Type": "application/json"})
                checked += 1
                if (300 <= status < 400 or headers.get("Location")
                        or status >= 400 and headers.get("Content-Type") != "application/json"):
                    wrong.append((method, variant, status, headers.get("Location"), body[:60]))
    assert checked > 150
    assert not wrong, wrong


def test_the_reported_redirect_is_a_json_404(guarded, demo_server):
    status, headers, body = send(guarded, "GET", "/static//etc/passwd", "service.example")
    assert status == 404 and "Location" not in headers
    assert b'"not_found"' in body
    # the request to the default server (loopback, no ALLOWED_HOSTS), whose allowlist
    # refuses that name on every route: a path no route matches is a 404 whatever the Host
    status, headers, body = send(demo_server, "GET", "/static//etc/passwd", "evil.example")
    assert status == 404 and "Location" not in headers
    assert headers["Content-Type"] == "application/json" and b'"not_found"' in body


# -- Host allowlist (DNS rebinding) -------------------------------------------------------------
@pytest.mark.parametrize("host", ["service.example", "SERVICE.example:8000", "a.corp.example",
                                  "10.1.2.3:8000", "127.0.0.1"])
def test_allowed_hosts_are_answered(guarded, host):
    status, _, _ = send(guarded, "GET", "/models", host)
    assert status == 200


@pytest.mark.parametrize("method,path", [("GET", "/models"), ("GET", "/"), ("GET", "/model"),
                                         ("POST", "/feedback"), ("GET", "/metrics")])
@pytest.mark.parametrize("host", ["evil.example", "service.example.evil.example", "corp.example.x",
                                  "192.168.1.1", "[::1]:80", ""])
def test_other_hosts_are_refused_400(guarded, method, path, host):
    status, headers, body = send(guarded, method, path, host,
                                 {"Content-Type": "application/json"}, b"{}")
    assert status == 400, body
    assert headers["Content-Type"] == "application/json"
    assert b'"host_not_allowed"' in body and b"Traceback" not in body


def test_protocol_routes_refuse_in_their_own_envelope(guarded):
    status, _, body = send(guarded, "GET", "/v2/models/demo", "evil.example")
    assert status == 400 and body.startswith(b'{"error":"')


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_whatever_the_host(guarded, path):
    """Kubernetes' probes send the pod's IP, which no allowlist names."""
    status, _, _ = send(guarded, "GET", path, "172.17.0.5:8000")
    assert status == 200


@pytest.mark.parametrize("host,answered", [
    ("127.0.0.1:{port}", True), ("localhost:{port}", True), ("[::1]:{port}", True),
    ("app.localhost", True), ("x", True), ("evil.example", False),
    ("attacker.example.com:{port}", False), ("127.0.0.1.nip.io", False)])
def test_on_loopback_without_allowed_hosts_only_names_rebinding_cannot_use(demo_server, host,
                                                                           answered):
    """The default (HOST a loopback address, ALLOWED_HOSTS empty): an attacker's DNS name that
    resolves to 127.0.0.1 is refused; addresses, localhost and dotless names are answered."""
    status, _, body = send(demo_server, "GET", "/model", host.format(port=demo_server.port))
    assert (status == 200) == answered, body
    if not answered:
        assert status == 400 and b"host_not_allowed" in body


@pytest.mark.parametrize("entries,loopback,host,allowed", [
    ((), False, "anything.example", True),
    (("*",), True, "anything.example", True),
    (("service.example",), False, "service.example:443", True),
    (("service.example",), False, "www.service.example", False),
    ((".service.example",), False, "www.service.example", True),
    (("::1",), False, "[::1]:8000", True),
    (("10.0.0.0/8",), False, "11.0.0.1", False),
])
def test_allowlist_rules(entries, loopback, host, allowed):
    assert HostAllowlist(entries, loopback_only=loopback).allows(host) == allowed


# -- cross-site posts (CSRF) -----------------------------------------------------------------
def store(server, colour: tuple[int, int, int]) -> str:
    """Classify a picture of one colour; the name the server keeps it under."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, "PNG")
    answer = post_image(server, out.getvalue(), "plain.png", "image/png")
    assert answer.status_code == 200, answer.text
    return answer.json()["filename"]


@pytest.fixture
def stored(guarded) -> str:
    return store(guarded, (200, 10, 10))


def kept(server, label: str) -> list[str]:
    folder = os.path.join(server.feedback_dir, label)
    return [f for f in os.listdir(folder) if f.endswith(".png")] if os.path.isdir(folder) else []


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:1"},  # same host, another port: another origin
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://a.127.0.0.1.nip.io"},
], ids=["other-origin", "null-origin", "other-port", "fetch-metadata", "same-site"])
@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_cross_site_feedback_is_refused_403(guarded, stored, headers, as_json):
    fields = {"filename": stored, "label": "heart"}
    response = requests.post(guarded.url + "/feedback", headers=headers, timeout=10,
                             **({"json": fields} if as_json else {"data": fields}))
    assert_envelope(response, 403, "cross_site_request")
    assert kept(guarded, "heart") == []


def test_same_origin_and_non_browser_feedback_is_kept(guarded):
    own = {"Origin": guarded.url, "Sec-Fetch-Site": "same-origin"}
    response = requests.post(guarded.url + "/feedback", headers=own, timeout=10,
                             json={"filename": store(guarded, (10, 200, 10)), "label": "circle"})
    assert response.status_code == 201, response.text
    # curl and scripts send neither Origin nor Sec-Fetch-Site
    response = requests.post(guarded.url + "/feedback", timeout=10,
                             data={"filename": store(guarded, (10, 10, 200)), "label": "square"})
    assert response.status_code == 201, response.text
    assert len(kept(guarded, "circle")) == 1 and len(kept(guarded, "square")) == 1


@pytest.mark.parametrize("headers,cross", [
    ({}, False), ({"Origin": "https://service.example"}, False),
    ({"Origin": "http://service.example:80"}, False), ({"Sec-Fetch-Site": "none"}, False),
    ({"Origin": "https://service.example:8443"}, True), ({"Origin": "ftp://service.example"}, True),
    ({"Origin": "http://service.example:99999"}, True),
])
def test_cross_site_rules(headers, cross):
    """Behind a TLS proxy the page is https and the proxied Host is the bare name."""
    assert is_cross_site(headers, "service.example") == cross
