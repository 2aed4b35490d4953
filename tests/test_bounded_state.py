"""State a request can make grow stays bounded, on the real server with real bytes: /feedback's
body whatever its transfer encoding and how many feedbacks a worker records at once; the metric
series; the feedback folders (moves leave no empty folder and are atomic across workers, labels
measured in bytes); no server paths in answers; symlinks never followed; and the page offers
feedback only when the folder can be written."""
import concurrent.futures as cf
import fcntl
import http.client
import os
import shutil
import socket
import threading
import time

import imagegen as ig
import pytest
import requests
from helpers import PeakMemory, assert_envelope, start_server
from tiny_models import save_colour_model

pytestmark = pytest.mark.server

SECRET = "secret-of-the-server-7c1d\n"


@pytest.fixture(scope="module")
def server(colour_model_dir, tmp_path_factory):
    """Two workers (moves must be atomic across processes), new labels allowed."""
    work = tmp_path_factory.mktemp("bounded")
    server = start_server(work, {"MODEL_PATH": colour_model_dir, "WORKERS": "2",
                                 "THREADS": "16", "FEEDBACK_NEW_LABELS": "true"})
    server.work = work
    server.feedback_dir = str(work / "feedback")
    yield server
    server.stop()


def upload(server, seed: int) -> str:
    """Classify a picture of its own; the stored file's name."""
    data = ig.encode(ig.noisy((90, 90, 200), (24, 24), seed=seed), "PNG")
    response = requests.post(server.url + "/classify", files={"image": ("b.png", data)},
                             timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["filename"]


def send_feedback(server, filename: str, label: str, session=requests) -> requests.Response:
    return session.post(server.url + "/feedback", json={"filename": filename, "label": label},
                        timeout=30)


def places(feedback_dir: str, filename: str) -> list[str]:
    """The label folders holding ``filename``."""
    return sorted(d for d in os.listdir(feedback_dir)
                  if os.path.isfile(os.path.join(feedback_dir, d, filename)))


def label_folders(feedback_dir: str) -> list[str]:
    return sorted(d for d in os.listdir(feedback_dir)
                  if d[0] not in "._" and os.path.isdir(os.path.join(feedback_dir, d)))


def chunked_post(server, path: str, content_type: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` with ``Transfer-Encoding: chunked`` (no Content-Length) from a thread of
    its own while the answer is read: the server may answer before the body has arrived."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                 f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())

    def send():
        try:
            for i in range(0, len(body), 65536):
                chunk = body[i:i + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed first

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except ConnectionResetError:
        pass
    sender.join(30)
    sock.close()
    status = int(received.split(b" ", 2)[1]) if received.startswith(b"HTTP/1.1 ") else 0
    return status, received


# -- /feedback: its body and its concurrency -----------------------------------------------------
def test_a_chunked_feedback_body_is_cut_at_its_limit(server):
    """8 MiB of JSON numbers sent chunked (no Content-Length to check): reading stops at
    16 KiB with 413, and the worker's peak barely moves (parsed in full, such a body costs
    +157 MB)."""
    body = b'{"filename": "0123456789abcdef.png", "label": "red", "pad": [' + \
        b"0," * (4 * 2 ** 20) + b"0]}"
    peaks = [PeakMemory(pid).reset() for pid in server.worker_pids()]
    status, received = chunked_post(server, "/feedback", "application/json", body)
    assert status == 413, received[:300]
    assert b'"payload_too_large"' in received
    rise = max(peak.rise_mb() for peak in peaks)
    assert rise < 40, f"a worker's peak rose {rise:.0f} MiB"
    for content_type, big in [("application/x-www-form-urlencoded", b"label=" + b"x" * 2 ** 20),
                              ("multipart/form-data; boundary=b",
                               b"--b\r\nContent-Disposition: form-data; name=\"f\"; "
                               b"filename=\"f\"\r\n\r\n" + b"x" * 2 ** 20 + b"\r\n--b--\r\n")]:
        status, received = chunked_post(server, "/feedback", content_type, big)
        assert status == 413, received[:300]
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200


def test_a_worker_records_a_bounded_number_of_feedbacks_at_once(server):
    """While the feedback folder's lock is held, each worker keeps at most a few feedbacks
    waiting for it; the others are told 503 with Retry-After within seconds instead of piling
    up threads."""
    filename = upload(server, 1)
    state = os.path.join(server.feedback_dir, ".state")
    os.makedirs(state, exist_ok=True)
    with open(os.path.join(state, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        with cf.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(send_feedback, server, filename, "red") for _ in range(12)]
            time.sleep(3.0)
            fcntl.flock(lock, fcntl.LOCK_UN)
            answers = [f.result() for f in futures]
    assert time.monotonic() - started < 15
    refused = [a for a in answers if a.status_code == 503]
    assert len(refused) >= 4, [a.status_code for a in answers]  # 2 workers x 4 slots at most
    for answer in refused:
        assert_envelope(answer, 503, "overloaded")
        assert int(answer.headers["Retry-After"]) >= 1
    assert {a.status_code for a in answers} - {503} <= {200, 201}
    assert places(server.feedback_dir, filename) == ["red"]


# -- feedback folders ----------------------------------------------------------------------------
def test_relabels_leave_no_empty_folders(server):
    """Hundreds of relabels of one image leave one folder (1,500 left 1,510 before)."""
    filename = upload(server, 2)
    with requests.Session() as session:
        for i in range(300):
            response = send_feedback(server, filename, f"kind{i}", session)
            assert response.status_code == 201, response.text
            assert response.json()["moved_from"] == (f"kind{i - 1}" if i else None)
    assert places(server.feedback_dir, filename) == ["kind299"]
    assert not [d for d in label_folders(server.feedback_dir) if d.startswith("kind")
                and d != "kind299"]


def test_concurrent_relabels_leave_the_image_in_exactly_one_place(server):
    """Six clients relabel one image at once, spread over both workers, round after round:
    the image ends in exactly one label folder (it ended in none in 38 of 40 rounds), with its
    note, and no folder is left empty."""
    for round_ in range(15):
        filename = upload(server, 100 + round_)
        labels = [f"r{round_}x{i}" for i in range(6)]
        with cf.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda label: send_feedback(server, filename, label),
                                    labels))
        assert all(a.status_code in (200, 201) for a in answers), [a.text for a in answers]
        where = places(server.feedback_dir, filename)
        assert len(where) == 1 and where[0] in labels, where
        assert os.path.isfile(os.path.join(server.feedback_dir, where[0],
                                           filename.split(".")[0] + ".json"))
        for label in labels:
            folder = os.path.join(server.feedback_dir, label)
            assert label == where[0] or not os.path.exists(folder), os.listdir(folder)


def test_labels_are_measured_in_bytes(server):
    """64 emoji are 64 characters but 256 bytes, more than a file name takes: a clean 400 (it
    was a 503 naming a path); 63 of them fit."""
    filename = upload(server, 3)
    error = assert_envelope(send_feedback(server, filename, "\U0001F600" * 64), 400,
                            "invalid_label")
    assert "bytes" in error["message"]
    response = send_feedback(server, filename, "\U0001F600" * 63)
    assert response.status_code == 201, response.text
    assert places(server.feedback_dir, filename) == ["\U0001F600" * 63]


# -- symlinks ------------------------------------------------------------------------------------
def test_symlinks_in_temp_and_in_the_feedback_folder_are_not_followed(server, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    planted = "fedcba9876543210.png"
    os.symlink(secret, os.path.join(server.temp_dir, planted))
    assert_envelope(send_feedback(server, planted, "red"), 404, "image_not_found")
    assert not places(server.feedback_dir, planted)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, os.path.join(server.feedback_dir, "green"))
    filename = upload(server, 4)
    error = assert_envelope(send_feedback(server, filename, "green"), 503,
                            "storage_unavailable")
    assert str(tmp_path) not in error["message"] and server.feedback_dir not in error["message"]
    assert os.listdir(elsewhere) == []
    assert send_feedback(server, filename, "blue").status_code == 201  # other labels still work


# -- metrics -------------------------------------------------------------------------------------
def _series(server) -> tuple[set[str], int]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line.startswith("classifier_")}, len(text)


def _made_up(i: int) -> tuple[str, str]:
    """Request ``i`` of the flood: a made-up method every other time, and a made-up route or
    model name of one of seven kinds."""
    word = "".join(chr(ord("A") + int(d)) for d in str(i))
    method = f"ZX{word}" if i % 2 else ("POST" if i % 7 in (1, 2, 3) else "GET")
    path = [f"/nowhere{i}", f"/models/m{i}/classify", f"/v2/models/m{i}/infer",
            f"/v1/models/m{i}:predict", f"/models/m{i}/versions/{i}/classify",
            f"/v1/models/m{i}", f"/static/{i}.js"][i % 7]
    return method, path


def test_made_up_methods_routes_and_models_add_no_series(server):
    """10,000 requests with made-up methods (2,000 once made 2,000 series), routes and model
    names add no series to /metrics once each kind has been seen once."""

    def flood(numbers):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        statuses = set()
        for i in numbers:
            method, path = _made_up(i)
            try:
                conn.request(method, path, headers={"Content-Length": "0"})
                response = conn.getresponse()
                response.read()
                statuses.add(response.status)
                if response.will_close:
                    conn.close()
            except (http.client.HTTPException, OSError):
                conn.close()
        conn.close()
        return statuses

    flood(range(28))  # each kind, with a made-up method and without, once
    _series(server)  # and a scrape: its own series appear after its answer
    before, size = _series(server)
    with cf.ThreadPoolExecutor(8) as pool:
        statuses = set().union(*pool.map(flood, [range(28 + k, 10028, 8) for k in range(8)]))
    after, size_after = _series(server)
    assert 500 not in statuses
    assert after - before == set()
    assert size_after < size * 1.1 + 1024
    assert "ZX" not in "".join(after) and 'model="m' not in "".join(after)


# -- a repository: public files, version folders, errors without paths, read-only feedback ------
@pytest.fixture(scope="module")
def repository_server(tmp_path_factory):
    """A repository whose colours/1 has a confusion_matrix.png linked to a secret, colours/2
    linked to a model folder outside the repository (with the same link), and broken/1 that
    cannot load; a settings file that cannot be parsed; and a FEEDBACK_DIR that cannot be
    created (read-only run)."""
    work = tmp_path_factory.mktemp("repo-bounded")
    repo = work / "models"
    repo.mkdir()
    (work / "secret.txt").write_text(SECRET)
    v1 = save_colour_model(str(repo / "colours" / "1"))
    os.symlink(work / "secret.txt", os.path.join(v1, "confusion_matrix.png"))
    outside = save_colour_model(str(work / "outside"), labels=["x", "y", "z"])
    os.symlink(work / "secret.txt", os.path.join(outside, "confusion_matrix.png"))
    os.symlink(outside, repo / "colours" / "2")
    shutil.copytree(v1, repo / "broken" / "1", symlinks=True)
    (repo / "broken" / "1" / "saved_model.pb").write_bytes(b"not a saved model")
    (work / "models.yaml").write_text("models: [unclosed\n")
    (work / "a-file").write_text("not a folder")
    old = time.time() - 60  # settled: written long enough ago
    for root, dirs, files in os.walk(repo):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (old, old), follow_symlinks=False)
    server = start_server(work, {"MODEL_REPOSITORY": str(repo), "DEFAULT_MODEL": "colours",
                                 "MODEL_CONFIG": str(work / "models.yaml"), "WORKERS": "1",
                                 "FEEDBACK_DIR": str(work / "a-file" / "feedback")})
    server.work = work
    yield server
    server.stop()


def test_a_linked_public_file_is_not_served(repository_server):
    response = requests.get(repository_server.url + "/model/confusion_matrix.png", timeout=10)
    assert_envelope(response, 404)
    assert SECRET.strip() not in response.text


def test_a_version_linked_outside_the_repository_is_not_served(repository_server):
    models = {m["name"]: m for m in
              requests.get(repository_server.url + "/models", timeout=10).json()["models"]}
    assert [v["version"] for v in models["colours"]["versions"]] == [1]
    assert_envelope(requests.get(repository_server.url + "/models/colours/versions/2/classify",
                                 params={"image_url": "http://127.0.0.1/x.png"}, timeout=10),
                    404, "model_not_found")


def test_answers_name_no_server_paths(repository_server):
    """/models (a version's error, config_error), the protocols' status and the 503 of a
    broken version say what is wrong without the server's folders."""
    work = str(repository_server.work)
    deadline = time.monotonic() + 60
    while True:
        body = requests.get(repository_server.url + "/models", timeout=10).json()
        broken = {m["name"]: m for m in body["models"]}.get("broken")
        if broken and broken["versions"][0]["state"] == "failed":
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    texts = {"/models": requests.get(repository_server.url + "/models", timeout=10).text}
    assert broken["versions"][0]["error"] and body["config_error"]
    assert body["config_error"].startswith("models.yaml: ")
    for path in ("/v1/models/broken", "/v2/models/broken", "/models/broken/classify"):
        texts[path] = requests.get(repository_server.url + path, timeout=10,
                                   params={"image_url": "http://127.0.0.1/x.png"}).text
    for path, text in texts.items():
        assert work not in text and os.path.realpath(work) not in text, (path, text)
        assert "/tmp/" not in text, (path, text)


def test_the_page_offers_feedback_only_when_it_can_be_kept(repository_server, server):
    """A FEEDBACK_DIR that cannot be written (a read-only run) hides the buttons; /feedback
    answers 503 storage_unavailable without the folder's path."""
    page = requests.get(repository_server.url + "/", timeout=10).text
    assert 'id="feedback"' not in page
    error = assert_envelope(requests.post(repository_server.url + "/feedback", timeout=10,
                                          json={"filename": "0123456789abcdef.png",
                                                "label": "red"}),
                            503, "storage_unavailable")
    assert str(repository_server.work) not in error["message"]
    assert 'id="feedback"' in requests.get(server.url + "/", timeout=10).text
