"""The real server: gunicorn started with the Dockerfile's command, real bytes over loopback."""
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import imagegen as ig
import pytest
import requests
import webservers as ws
from helpers import ROOT, LiveServer, assert_envelope, post_image, start_server

pytestmark = pytest.mark.server


def test_health_and_ready(live_server):
    assert requests.get(live_server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(live_server.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["model"]["name"] == "colours"
    assert ready.headers["X-Request-ID"]


def test_workers_default_to_the_usable_cpus(colour_model_dir, tmp_path):
    """WORKERS=auto (the default): one worker per CPU this process may use, one runtime thread
    each on this machine's model (a lone ONNX model's call on all of them), said in the log;
    ready only once all of them are warm."""
    from common.config import Config
    from common.machine import plan_for

    plan = plan_for(Config.from_env({"MODEL_PATH": colour_model_dir}))  # memory may cut it
    server = start_server(tmp_path, {"MODEL_PATH": colour_model_dir})
    try:
        assert len(server.worker_pids()) == plan.workers
        log = server.output(tail=None)  # the first lines
        assert f"{plan.workers} worker(s) x {plan.runtime_threads} runtime thread(s) " \
               f"({plan.cpus} usable CPU" in log
        assert f"a lone call of an ONNX model on {plan.alone_threads or plan.runtime_threads}\n" \
            in log
    finally:
        server.stop()


@pytest.mark.parametrize("fmt", sorted(ig.ALL_FORMATS))
def test_every_format_over_http(live_server, fmt):
    data, ext = ig.ALL_FORMATS[fmt]
    response = post_image(live_server, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["label"] == "red"
    assert body["filename"].endswith("." + ext)
    assert os.path.exists(os.path.join(live_server.temp_dir, body["filename"]))


def test_jpeg_with_wrong_name_and_content_type(live_server):
    response = post_image(live_server, ig.jpeg(ig.GREEN), name="document.pdf",
                          content_type="application/pdf")
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == "green"


def test_raw_body(live_server):
    response = requests.post(live_server.url + "/classify", data=ig.png(ig.BLUE),
                             headers={"Content-Type": "image/png"}, timeout=30)
    assert response.json()["predictions"][0]["label"] == "blue"


@pytest.mark.parametrize("name", ["../../x.jpg", "/etc/passwd", "/tmp/evil.jpg", "a" * 4000,
                                  "x\x00.jpg", "..\\..\\x.jpg", "~/.bashrc"])
def test_hostile_file_names_stay_in_temp(live_server, name, tmp_path):
    before = set(os.listdir(os.path.dirname(live_server.temp_dir)))
    data = ig.encode(ig.noisy(ig.RED, seed=hash(name) % 1000), "PNG")
    response = post_image(live_server, data, name=name)
    assert response.status_code == 200, response.text
    stored = response.json()["filename"]
    assert "/" not in stored and ".." not in stored and len(stored) == 20
    assert os.path.isfile(os.path.join(live_server.temp_dir, stored))
    assert set(os.listdir(os.path.dirname(live_server.temp_dir))) == before
    assert not os.path.exists(os.path.join(ROOT, "x.jpg"))


def test_32_threads_same_name_each_get_their_own_answer(live_server):
    colours = [ig.RED, ig.GREEN, ig.BLUE]
    names = ["red", "green", "blue"]
    jobs = [(names[i % 3], ig.encode(ig.noisy(colours[i % 3], seed=i), "PNG")) for i in range(32)]
    barrier = threading.Barrier(32)

    def send(job):
        expected, data = job
        barrier.wait()
        response = post_image(live_server, data, name="same.jpg")
        return expected, data, response

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(send, jobs))
    filenames = set()
    for expected, data, response in results:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["predictions"][0]["label"] == expected
        with open(os.path.join(live_server.temp_dir, body["filename"]), "rb") as fh:
            assert fh.read() == data  # the stored file is this client's own image
        filenames.add(body["filename"])
    assert len(filenames) == 32


@pytest.mark.parametrize("case,status,code", [
    ("missing_part", 400, "missing_image"),
    ("empty_file", 400, "empty_image"),
    ("text", 415, "unsupported_media_type"),
    ("svg", 415, "unsupported_media_type"),
    ("truncated_jpeg", 422, "undecodable_image"),
    ("bomb_png", 413, "image_too_large"),
    ("oversize_body", 413, "payload_too_large"),
    ("json_body", 415, "unsupported_media_type"),
])
def test_bad_uploads(live_server, case, status, code):
    url = live_server.url + "/classify"
    big = ig.encode(ig.noisy(ig.RED, (300, 300)), "JPEG")
    if case == "missing_part":
        response = requests.post(url, files={"picture": ("a.jpg", big)}, timeout=30)
    elif case == "json_body":
        response = requests.post(url, json={"image": "x"}, timeout=30)
    else:
        data = {"empty_file": b"", "text": b"just some text\n", "svg": ig.SVG,
                "truncated_jpeg": big[: len(big) // 2], "bomb_png": ig.png_claiming(40000, 40000),
                "oversize_body": os.urandom(3 * 1024 * 1024)}[case]
        response = post_image(live_server, data)
    assert_envelope(response, status, code)


@pytest.mark.parametrize("method,path,status", [
    ("get", "/no/such/route", 404), ("put", "/classify", 405), ("delete", "/classify", 405),
    ("patch", "/healthz", 405), ("get", "/classify", 400), ("get", "/classify?image_url=", 400),
    ("get", "/classify?image_url=http://x.example/&top_k=zero", 400),
])
def test_routing_errors(live_server, method, path, status):
    assert_envelope(getattr(requests, method)(live_server.url + path, timeout=10), status)


@pytest.fixture(scope="module")
def image_host():
    server = ws.Recorder("127.0.0.1", {"/cat.jpg": ws.body(ig.jpeg(ig.BLUE))})
    yield server
    server.close()


@pytest.fixture(scope="module")
def forbidden_host():
    server = ws.Recorder("127.0.0.2", {"/secret": ws.body(ig.jpeg(ig.RED))})
    yield server
    server.close()


def test_url_download(live_server, image_host):
    response = requests.get(live_server.url + "/classify",
                            params={"image_url": image_host.base + "/cat.jpg"}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == "blue"


@pytest.mark.parametrize("url,status", [
    ("file:///etc/hostname", 403), ("gopher://127.0.0.1:70/", 403), ("ftp://127.0.0.1/x", 403),
    ("data:image/png;base64,iVBORw0KGgo=", 403), ("http://169.254.169.254/latest/", 403),
    ("http://10.0.0.1/x.jpg", 403), ("http://192.168.0.1/", 403), ("http://100.64.0.1/", 403),
    ("http://[::ffff:127.0.0.2]/", 403), ("http://user:pw@example.com/", 400),
    ("not a url", 400),
])
def test_forbidden_urls(live_server, url, status):
    response = requests.get(live_server.url + "/classify", params={"image_url": url}, timeout=30)
    assert_envelope(response, status)


@pytest.mark.parametrize("spelling", ["127.0.0.2", "127.0.0.3", "2130706434", "0x7f000002",
                                      "127.2", "[::ffff:127.0.0.2]"])
def test_loopback_spellings_never_reach_the_server(live_server, forbidden_host, spelling):
    port = forbidden_host.server_address[1]
    response = requests.get(live_server.url + "/classify",
                            params={"image_url": f"http://{spelling}:{port}/secret"}, timeout=30)
    assert_envelope(response, 403, "forbidden_url")
    assert forbidden_host.hits == []


def test_redirect_from_allowed_to_forbidden(live_server, forbidden_host):
    hop = ws.Recorder("127.0.0.1", {"/go": ws.redirect(forbidden_host.base + "/secret")})
    try:
        response = requests.get(live_server.url + "/classify",
                                params={"image_url": hop.base + "/go"}, timeout=30)
    finally:
        hop.close()
    assert_envelope(response, 403, "forbidden_url")
    assert hop.hits == ["/go"] and forbidden_host.hits == []


SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".hypothesis"}


def snapshot(folder) -> dict:
    """Every file below ``folder`` (outside SKIP_DIRS) -> (size, mtime)."""
    found = {}
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            path = os.path.join(top, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            found[path] = (st.st_size, st.st_mtime_ns)
    return found


def test_nothing_written_outside_temp(tmp_path, colour_model_dir, image_host, forbidden_host):
    """Good, bad and hostile requests to a server of its own: afterwards the only new files are
    images under TEMP_DIR, with the store's names; the checkout, HOME, the system temp folder
    and the work folder are as before."""
    home, tmpdir, work = tmp_path / "home", tmp_path / "tmp", tmp_path / "work"
    for folder in (home, tmpdir, work):
        folder.mkdir()
    before = {"root": snapshot(ROOT), "home": snapshot(home), "tmp": snapshot(tmpdir)}
    server = start_server(work, {"MODEL_PATH": colour_model_dir, "URL_ALLOW_HOSTS": "127.0.0.1",
                                 "HOME": str(home), "TMPDIR": str(tmpdir), "MAX_UPLOAD_MB": "1"})
    try:
        big = ig.encode(ig.noisy(ig.RED, (300, 300)), "JPEG")
        for i, name in enumerate(["../../x.jpg", "/tmp/evil.jpg", "~/.bashrc", "a" * 300]):
            assert post_image(server, ig.encode(ig.noisy(ig.RED, seed=i), "PNG"),
                              name=name).status_code == 200
        for data in (b"text", big[:len(big) // 2], ig.png_claiming(40000, 40000),
                     os.urandom(2 * 1024 * 1024)):
            assert 400 <= post_image(server, data, name="../../y.jpg").status_code < 500
        for url in (image_host.base + "/cat.jpg", forbidden_host.base + "/secret",
                    "file:///etc/passwd"):
            requests.get(server.url + "/classify", params={"image_url": url}, timeout=30)
        stored = sorted(os.listdir(server.temp_dir))
    finally:
        server.stop()
    assert snapshot(ROOT) == before["root"]
    assert snapshot(home) == before["home"] and snapshot(tmpdir) == before["tmp"]
    assert sorted(os.listdir(work)) == ["server.log", "temp"]
    assert stored[0] == ".ledger"  # the store's count of what it holds
    assert len(stored) == 6 and all(re.fullmatch(r"[0-9a-f]{16}\.(png|jpg)", n) for n in stored[1:])


def test_missing_model_exits_non_zero(tmp_path):
    server = LiveServer({"MODEL_PATH": str(tmp_path / "no-such-model"),
                         "TEMP_DIR": str(tmp_path / "temp")})
    server.start(str(tmp_path / "log"), wait_ready=False)
    try:
        code = server.proc.wait(90)
    finally:
        server.stop()
    assert code != 0
    assert "model not found" in server.output()


def test_bad_setting_exits_non_zero(tmp_path):
    server = LiveServer({"PORT": "not-a-port"})
    server.env["PORT"] = "not-a-port"
    server.start(str(tmp_path / "log"), wait_ready=False)
    try:
        code = server.proc.wait(60)
    finally:
        server.stop()
    assert code != 0 and "PORT" in server.output()
