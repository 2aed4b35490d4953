"""Access control against the real server (README "Access control"): API keys with scopes
(common/keys.py, common/web/auth.py), CORS (common/web/cors.py) and the audit trail
(common/audit.py). Every refusal is the right status in the right envelope, the server stays
healthy after the bad-input cases, and no key ever shows in the log, the metrics, an error body
or the audit trail."""
import http.client
import json
import os
import time

import imagegen as ig
import pytest
import requests
from helpers import assert_envelope, start_failing, start_server
from tiny_models import save_colour_model

from common.keys import hash_key

pytestmark = pytest.mark.server

#: Keys shaped like real ones (scripts/api_key.py makes 43 characters), so that grepping the
#: log for them cannot match anything else.
CI_KEY = "ci-Zq8vN3xw5Lr2Tk7Hc9Pm4Bd6Fy1Js0Ga-inline"
OPS_KEY = "ops-Vb5Xn8Qw2Er4Ty6Ui7Op9As1Df3Gh-inline"
FILE_KEY = "file-Kp3Lm5Nb7Vc9Xz1Qa2Ws4Ed6Rf8Tg-rotated0"
NEW_FILE_KEY = "file-Yh7Uj9Ik1Ol3Pm5Nb2Vc4Xz6As8Qw-rotated1"
SCRAPER_KEY = "scrape-Jh4Kg6Lf8Md1Ns3Bp5Vo7Ci9Xu2Zy0"
WRONG_KEY = "ci-Zq8vN3xw5Lr2Tk7Hc9Pm4Bd6Fy1Js0Ga-inlinf"  # a real key's long prefix
ALL_KEYS = (CI_KEY, OPS_KEY, FILE_KEY, NEW_FILE_KEY, SCRAPER_KEY, WRONG_KEY)
ALLOWED_ORIGIN = "https://app.example"


def key_file(path, *entries) -> None:
    """Write API_KEYS_FILE atomically: ``(name, key, scopes)`` entries, hashed."""
    lines = ["# keys for the access tests"]
    lines += [f"{name}:sha256:{hash_key(key)}:{scopes}" for name, key, scopes in entries]
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    work = tmp_path_factory.mktemp("access")
    model = save_colour_model(str(work / "colours"))
    keys = work / "keys.txt"
    key_file(keys, ("filed", FILE_KEY, "classify"), ("scraper", SCRAPER_KEY, "metrics"))
    server = start_server(work, {
        "MODEL_PATH": model, "WORKERS": "1", "THREADS": "8",
        "API_KEYS": f"ci:{CI_KEY}:classify,ops:{OPS_KEY}:classify+feedback+admin",
        "API_KEYS_FILE": str(keys), "METRICS_AUTH": "true",
        "CORS_ORIGINS": f"{ALLOWED_ORIGIN},http://localhost:3000",
        "AUDIT_LOG": str(work / "audit.jsonl")})
    server.keys_file = keys
    server.audit_path = str(work / "audit.jsonl")
    yield server
    server.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def raw_request(server, method: str, path: str, headers: list[tuple[bytes, bytes]],
                body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request with header bytes exactly as given (non-ASCII, duplicates)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader(b"Content-Length", str(len(body)).encode())
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        conn.close()


def assert_message(response, status: int) -> str:
    """The protocols' error shape ``{"error": "<message>"}``."""
    body = response.json()
    assert response.status_code == status, response.text
    assert set(body) == {"error"} and isinstance(body["error"], str), response.text
    return body["error"]


def classify(server, key: str | None, path: str = "/classify"):
    headers = bearer(key) if key else {}
    return requests.post(server.url + path, files={"image": ("x.png", ig.png(), "image/png")},
                         headers=headers, timeout=30)


INFER = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                     "data": ["aGVsbG8="]}]}


# -- who may call what -------------------------------------------------------------------------
def test_probes_and_the_page_stay_open(guarded):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/",
                 "/openapi.json"):
        assert requests.get(guarded.url + path, timeout=10).status_code == 200, path


@pytest.mark.parametrize("path,envelope", [
    ("/classify", "api"), ("/models", "api"), ("/model", "api"),
    ("/v1/models/default", "message"), ("/v1/models/default:predict", "message"),
    ("/v2/models/default/infer", "message"), ("/v2/models/default", "message"),
    ("/v2/no/such/route", "message"), ("/no/such/route", "api"),
])
def test_a_missing_key_is_401_with_www_authenticate(guarded, path, envelope):
    method = requests.post if path.endswith((":predict", "/infer", "/classify")) else requests.get
    r = method(guarded.url + path, json=INFER, timeout=10)
    assert r.headers["WWW-Authenticate"].startswith("Bearer realm=")
    if envelope == "api":
        assert_envelope(r, 401, "unauthorized")
    else:
        assert_message(r, 401)


def test_the_right_key_classifies_on_every_route(guarded):
    assert classify(guarded, CI_KEY).status_code == 200
    r = requests.get(guarded.url + "/v1/models/colours", headers={"X-API-Key": CI_KEY},
                     timeout=10)
    assert r.status_code == 200, r.text
    r = requests.post(guarded.url + "/v2/models/colours/infer", json={"inputs": [{
        "name": "image_bytes", "datatype": "BYTES", "shape": [1],
        "data": [__import__("base64").b64encode(ig.png()).decode()]}]},
        headers=bearer(OPS_KEY), timeout=30)
    assert r.status_code == 200, r.text
    r = requests.get(guarded.url + "/models", headers={"authorization": f"bearer {FILE_KEY}"},
                     timeout=10)
    assert r.status_code == 200, r.text  # the scheme is case-insensitive; the file's key


def test_a_wrong_key_is_401_invalid_key(guarded):
    r = classify(guarded, WRONG_KEY)
    error = assert_envelope(r, 401, "invalid_key")
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    assert WRONG_KEY not in json.dumps(error)
    r = requests.post(guarded.url + "/v1/models/default:predict", json={"instances": []},
                      headers={"X-API-Key": WRONG_KEY}, timeout=10)
    assert WRONG_KEY not in assert_message(r, 401)


def test_a_key_without_the_scope_is_403(guarded):
    r = requests.post(guarded.url + "/feedback", json={"filename": "x", "label": "red"},
                      headers=bearer(CI_KEY), timeout=10)
    assert_envelope(r, 403, "forbidden_scope")
    r = requests.get(guarded.url + "/v2/repository/index", headers=bearer(CI_KEY), timeout=10)
    assert_message(r, 403)
    r = requests.get(guarded.url + "/metrics", headers=bearer(OPS_KEY), timeout=10)
    assert_envelope(r, 403, "forbidden_scope")
    r = requests.get(guarded.url + "/classify?image_url=http://x", headers=bearer(SCRAPER_KEY),
                     timeout=10)
    assert_envelope(r, 403, "forbidden_scope")


def test_metrics_need_the_metrics_scope_and_never_show_a_key(guarded):
    assert_envelope(requests.get(guarded.url + "/metrics", timeout=10), 401, "unauthorized")
    r = requests.get(guarded.url + "/metrics", headers=bearer(SCRAPER_KEY), timeout=10)
    assert r.status_code == 200 and "classifier_requests_in_flight" in r.text
    for key in ALL_KEYS:
        assert key not in r.text


@pytest.mark.parametrize("headers", [
    [(b"Authorization", b"Bearer")],
    [(b"Authorization", b"Bearer ")],
    [(b"Authorization", b"Basic Y2k6c2VjcmV0")],
    [(b"Authorization", b"Bearer " + CI_KEY.encode() + b" extra")],
    [(b"Authorization", b"Bearer " + CI_KEY.encode()), (b"Authorization", b"Bearer x")],
    [(b"Authorization", b"Bearer " + CI_KEY.encode()), (b"X-API-Key", CI_KEY.encode())],
    [(b"X-API-Key", b"")],
    [(b"X-API-Key", "clé-\u00e9\u00e8".encode("utf-8"))],
    [(b"X-API-Key", b"\xff\xfe\x80key")],
    [(b"Authorization", b"Bearer " + b"k" * 4096)],
    [(b"Authorization", b"Bearer " + CI_KEY.encode() + b"x" * 300)],
], ids=["bearer-alone", "bearer-space", "basic", "trailing", "two-authorization",
        "two-schemes", "empty", "utf8", "bytes", "4kb", "prefix-then-long"])
def test_malformed_keys_are_401(guarded, headers):
    for path, envelope in (("/models", "api"), ("/v2/models/default", "message")):
        status, got, body = raw_request(guarded, "GET", path, headers)
        assert status == 401, body
        assert got["WWW-Authenticate"].startswith("Bearer realm=")
        parsed = json.loads(body)
        if envelope == "api":
            assert parsed["error"]["code"] == "invalid_key"
        else:
            assert set(parsed) == {"error"} and isinstance(parsed["error"], str)
        assert CI_KEY.encode() not in body


def test_an_oversized_key_is_refused_before_the_app_and_the_server_stays_healthy(guarded):
    status, _, body = raw_request(guarded, "GET", "/models",
                                  [(b"Authorization", b"Bearer " + b"k" * 60_000)])
    assert status in (400, 401, 431), body
    assert status != 500
    assert requests.get(guarded.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(guarded.url + "/readyz", timeout=10).status_code == 200
    assert classify(guarded, CI_KEY).status_code == 200


# -- rotation ----------------------------------------------------------------------------------
def test_a_rotated_key_file_takes_effect_without_a_restart(guarded):
    assert classify(guarded, FILE_KEY).status_code == 200
    pid = guarded.proc.pid
    key_file(guarded.keys_file, ("filed", NEW_FILE_KEY, "classify"),
             ("scraper", SCRAPER_KEY, "metrics"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if classify(guarded, NEW_FILE_KEY).status_code == 200:
            break
        time.sleep(0.2)
    assert classify(guarded, NEW_FILE_KEY).status_code == 200
    assert_envelope(classify(guarded, FILE_KEY), 401, "invalid_key")
    # a broken file keeps the last good keys
    with open(guarded.keys_file, "w") as fh:
        fh.write(f"broken:{NEW_FILE_KEY}:classify\n")  # a plain key pasted by mistake
    time.sleep(2.5)
    classify(guarded, CI_KEY)  # a request looks at the file
    time.sleep(0.2)
    assert classify(guarded, NEW_FILE_KEY).status_code == 200
    assert guarded.proc.pid == pid and guarded.proc.poll() is None
    # leave the file as the fixture made it, so that the tests after this one find FILE_KEY
    key_file(guarded.keys_file, ("filed", FILE_KEY, "classify"),
             ("scraper", SCRAPER_KEY, "metrics"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and classify(guarded, FILE_KEY).status_code != 200:
        time.sleep(0.2)
    assert classify(guarded, FILE_KEY).status_code == 200


# -- CORS -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/classify", "/v2/models/default/infer", "/feedback"])
def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(guarded, path):
    r = requests.options(guarded.url + path, headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"}, timeout=10)
    assert r.status_code == 204, r.text
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "Origin" in r.headers["Vary"]
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "x-api-key", "content-type", "inference-header-content-length",
            "x-request-id"} <= allowed
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert int(r.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in r.headers


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://app.example.evil",
                                    "http://app.example"])
def test_a_preflight_from_another_origin_is_403_without_cors_headers(guarded, origin):
    for path, envelope in (("/classify", "api"), ("/v2/models/default/infer", "message")):
        r = requests.options(guarded.url + path, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"}, timeout=10)
        if envelope == "api":
            assert_envelope(r, 403, "origin_not_allowed")
        else:
            assert_message(r, 403)
        assert not [h for h in r.headers if h.lower().startswith("access-control-allow")]


def test_actual_requests_from_an_allowed_origin_can_read_the_answer(guarded):
    r = requests.get(guarded.url + "/models", headers={"Origin": ALLOWED_ORIGIN, **bearer(
        CI_KEY)}, timeout=10)
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "X-Request-ID" in r.headers["Access-Control-Expose-Headers"]
    r = requests.get(guarded.url + "/models", headers={"Origin": ALLOWED_ORIGIN}, timeout=10)
    assert_envelope(r, 401)  # an error a page can read too
    assert r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    r = requests.get(guarded.url + "/models", headers={"Origin": "https://evil.example",
                                                       **bearer(CI_KEY)}, timeout=10)
    assert "Access-Control-Allow-Origin" not in r.headers
    assert "Origin" in r.headers["Vary"]


def test_a_post_from_an_allowed_origin_passes_the_cross_site_check(guarded):
    body = {"filename": "0123456789abcdef.png", "label": "red"}
    r = requests.post(guarded.url + "/feedback", json=body, headers={
        "Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", **bearer(OPS_KEY)},
        timeout=10)
    assert_envelope(r, 403, "cross_site_request")
    r = requests.post(guarded.url + "/feedback", json=body, headers={
        "Origin": ALLOWED_ORIGIN, "Sec-Fetch-Site": "cross-site", **bearer(OPS_KEY)},
        timeout=10)
    assert r.status_code != 403, r.text  # 404: the image is not stored; the origin passed


# -- the audit trail and what never shows a key ----------------------------------------------
def read_audit(server) -> list[dict]:
    with open(server.audit_path) as fh:
        return [json.loads(line) for line in fh]


def test_feedback_written_is_audited_with_the_key_name(guarded):
    answer = classify(guarded, OPS_KEY).json()
    r = requests.post(guarded.url + "/feedback", json={
        "filename": answer["filename"], "label": "green"},
        headers={**bearer(OPS_KEY), "X-Request-ID": "audit-feedback-1"}, timeout=10)
    assert r.status_code == 201, r.text
    records = [r for r in read_audit(guarded) if r["event"] == "feedback_written"]
    assert records, read_audit(guarded)
    record = records[-1]
    assert (record["key"], record["client"], record["request_id"]) == (
        "ops", "127.0.0.1", "audit-feedback-1")
    assert record["details"]["label"] == "green"
    assert record["details"]["filename"] == answer["filename"]


def test_rejections_are_audited_and_rate_limited(guarded):
    # one rejection of each kind first, before the flood fills this minute's allowance
    requests.get(guarded.url + "/models", timeout=10)  # missing
    requests.get(guarded.url + "/models", headers={"Authorization": "Basic Y2k6c2VjcmV0"},
                 timeout=10)  # malformed
    requests.get(guarded.url + "/models", headers={"X-API-Key": WRONG_KEY}, timeout=10)
    requests.get(guarded.url + "/metrics", headers=bearer(CI_KEY), timeout=10)  # scope
    before = len(read_audit(guarded))
    for i in range(80):
        classify_headers = {"X-API-Key": f"{WRONG_KEY}{i}", "X-Request-ID": f"flood-{i}"}
        requests.get(guarded.url + "/models", headers=classify_headers, timeout=10)
    rejected = [r for r in read_audit(guarded)[before:] if r["event"] == "key_rejected"]
    assert len(rejected) < 80  # at most 60 a minute per worker (tests/test_audit.py: the rest)
    everything = [r for r in read_audit(guarded) if r["event"] == "key_rejected"]
    assert everything
    assert all(r["client"] == "127.0.0.1" and r["request_id"] for r in everything)
    assert {r["details"]["reason"] for r in everything} >= {"missing", "unknown", "malformed",
                                                           "scope"}
    assert {r["key"] for r in everything if r["details"]["reason"] == "scope"} <= {
        "ci", "ops", "scraper"}
    assert requests.get(guarded.url + "/healthz", timeout=10).status_code == 200


def test_model_loaded_is_audited(guarded):
    loaded = [r for r in read_audit(guarded) if r["event"] == "model_loaded"]
    assert loaded and isinstance(loaded[0]["details"]["version"], int)
    assert loaded[0]["key"] is None


def test_no_key_appears_in_the_log_the_audit_trail_or_the_metrics(guarded):
    # every kind of key and request, made here so that this test stands alone
    for key in (CI_KEY, OPS_KEY, FILE_KEY):
        answer = classify(guarded, key)
        assert answer.status_code == 200, answer.text
    requests.post(guarded.url + "/feedback", json={
        "filename": answer.json()["filename"], "label": "green"}, headers=bearer(OPS_KEY),
        timeout=10)
    requests.post(guarded.url + "/feedback", json={"filename": "x.png", "label": "green"},
                  headers=bearer(CI_KEY), timeout=10)  # out of scope
    requests.get(guarded.url + "/models", headers={"X-API-Key": WRONG_KEY}, timeout=10)
    metrics = requests.get(guarded.url + "/metrics", headers=bearer(SCRAPER_KEY), timeout=10)
    time.sleep(0.5)
    log = guarded.output(tail=None)
    with open(guarded.audit_path) as fh:
        trail = fh.read()
    for key in ALL_KEYS:
        assert key not in log, "a key is in the server log"
        assert key not in trail, "a key is in the audit trail"
        assert key not in metrics.text, "a key is in the metrics"
        assert hash_key(key) not in log
    # the access log names the key instead
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    names = {line.get("key") for line in lines if line.get("logger") == "classifier.access"}
    assert {"ci", "ops", "filed", "scraper"} <= names


@pytest.mark.parametrize("env", [
    {"API_KEYS": f"ci:{CI_KEY}:classify+root"},
    {"API_KEYS": f"{CI_KEY}"},
    {"API_KEYS_FILE": "keys.txt"},
], ids=["unknown-scope", "no-fields", "file-with-a-plain-key"])
def test_malformed_keys_stop_start_up_with_a_message_that_has_no_key(tmp_path, env):
    if "API_KEYS_FILE" in env:
        (tmp_path / "keys.txt").write_text(f"ci:{CI_KEY}:classify\n")
        env = {"API_KEYS_FILE": str(tmp_path / "keys.txt")}
    code, log = start_failing(tmp_path, {"MODEL_PATH": str(tmp_path / "none"), "WORKERS": "1",
                                         **env})
    assert code != 0
    assert "API_KEYS" in log and "ConfigError" in log
    assert CI_KEY not in log
