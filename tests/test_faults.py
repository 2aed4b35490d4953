"""Faults on the real server: a worker killed under load, a model that is missing, corrupt or
hangs, and a temp/ folder that cannot be written."""
import os
import shutil
import signal
import socket
import threading
import time

import imagegen as ig
import pytest
import requests
from helpers import LiveServer, assert_envelope, metric, post_image, start_server
from reliability import record
from tiny_models import TRAP, save_colour_model

pytestmark = pytest.mark.server


# -- kill -9 -------------------------------------------------------------------------------

def test_kill_9_one_worker_under_load(colour_model_dir, tmp_path):
    """Only the killed worker's in-flight requests fail; gunicorn replaces it; ready again."""
    server = start_server(tmp_path, {"MODEL_PATH": colour_model_dir, "WORKERS": "2",
                                     "THREADS": "8"})
    clients, results, stop = 8, [], threading.Event()
    images = [ig.encode(ig.noisy(ig.RED, seed=s), "PNG") for s in range(16)]

    def client(i):
        n = 0
        while not stop.is_set():
            t = time.monotonic()
            try:  # a new connection per request: no stale keep-alive sockets
                response = post_image(server, images[(i + n) % 16])
                results.append((t, response.status_code, response.headers.get("Retry-After")))
            except requests.RequestException as exc:
                results.append((t, type(exc).__name__, None))
            n += 1

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for th in threads:
            th.start()
        time.sleep(2.0)
        before = sorted(server.worker_pids())
        victim = before[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # gunicorn forks a replacement, which loads
            pids = server.worker_pids()
            text = requests.get(server.url + "/metrics", timeout=10).text
            ready = [p for p in pids if p not in before and
                     f'classifier_model_info{{model="colours",pid="{p}"' in text]
            if len(pids) == 2 and victim not in pids and ready:
                break
            time.sleep(0.2)
        replaced_at = time.monotonic()
        assert victim not in server.worker_pids() and len(server.worker_pids()) == 2
        assert ready, "the replacement worker did not report its model ready"
        assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
        time.sleep(2.0)  # keep the load on after the replacement
        stop.set()
        for th in threads:
            th.join(60)
        metrics_text = requests.get(server.url + "/metrics", timeout=10).text
    finally:
        stop.set()
        server.stop()
    failed = [r for r in results if r[1] != 200]
    assert all(isinstance(r[1], str) or (r[1] == 503 and r[2]) for r in failed), failed
    dropped = [r for r in failed if isinstance(r[1], str)]
    assert len(dropped) <= clients, dropped  # at most the requests in flight at the kill
    assert all(r[0] <= killed_at for r in dropped), "a request sent after the kill failed"
    after = [r for r in results if r[0] > replaced_at]
    assert after and all(r[1] == 200 for r in after)
    # /metrics: the dead worker's gauges are gone, its counted requests are not
    info = [line for line in metrics_text.splitlines() if line.startswith("classifier_model_info{")]
    assert len(info) == 2 and not any(f'pid="{victim}"' in line for line in info)
    # Counted when the answer is made: one the killed worker made but never sent is counted
    # and seen by its client as a dropped connection.
    served = metric(metrics_text, "classifier_requests_total", route="/classify", status="200")
    ok = sum(1 for r in results if r[1] == 200)
    assert ok <= served <= ok + len(dropped), (served, ok, len(dropped))
    record("kill_worker", {"clients": clients, "requests": len(results),
                           "failed_in_flight": len(dropped),
                           "replacement_ready_s": round(replaced_at - killed_at, 2),
                           "ok_after_replacement": len(after)})


# -- a model that cannot be served --------------------------------------------------------

def _corrupt_saved_model(folder):
    save_colour_model(folder)
    with open(os.path.join(folder, "saved_model.pb"), "wb") as fh:
        fh.write(b"\x08\x01\x12\x04this is not a SavedModel protobuf" * 10)
    return folder


@pytest.mark.parametrize("case,message", [
    ("missing", "model not found"),
    ("corrupt", "saved_model.pb"),
    ("truncated_variables", "variables/"),
    ("labels_disagree", "labels"),
    ("empty_labels", "labels"),
])
def test_unservable_model_stops_the_server(tmp_path, case, message):
    folder = str(tmp_path / "model")
    if case == "corrupt":
        _corrupt_saved_model(folder)
    elif case == "truncated_variables":
        save_colour_model(folder)
        data_file = next(f for f in os.listdir(os.path.join(folder, "variables"))
                         if f.startswith("variables.data"))
        with open(os.path.join(folder, "variables", data_file), "r+b") as fh:
            fh.truncate(2)
    elif case == "labels_disagree":
        save_colour_model(folder, extra_outputs=2)
    elif case == "empty_labels":
        save_colour_model(folder)
        open(os.path.join(folder, "labels.txt"), "w").close()
    server = LiveServer({"MODEL_PATH": folder, "TEMP_DIR": str(tmp_path / "temp"),
                         "WORKERS": "2"})
    server.start(str(tmp_path / "log"), wait_ready=False)
    try:
        code = server.proc.wait(120)
    finally:
        server.stop()
    output = server.output(tail=None)
    assert code != 0, output[-3000:]
    assert "cannot serve without a model" in output and message in output, output[-3000:]
    with pytest.raises(OSError):  # nothing half-alive is left listening
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


# -- temp/ not writable ---------------------------------------------------------------------

def test_temp_not_writable_is_503_not_500(colour_model_dir, tmp_path):
    server = start_server(tmp_path, {"MODEL_PATH": colour_model_dir, "WORKERS": "1"})
    try:
        data = ig.encode(ig.noisy(ig.GREEN, seed=77), "PNG")
        assert post_image(server, data).status_code == 200
        shutil.rmtree(server.temp_dir)  # a file where the folder was: unwritable even for root
        with open(server.temp_dir, "w") as fh:
            fh.write("not a folder")
        response = post_image(server, ig.encode(ig.noisy(ig.GREEN, seed=78), "PNG"))
        assert_envelope(response, 503, "storage_unavailable")
        assert "cannot store the image" in response.json()["error"]["message"]
        assert response.headers["Retry-After"]
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        os.unlink(server.temp_dir)  # repaired: the service recovers by itself
        os.makedirs(server.temp_dir)
        assert post_image(server, ig.encode(ig.noisy(ig.GREEN, seed=79), "PNG")).status_code == 200
        if os.geteuid() != 0:  # permissions only bind non-root users
            os.chmod(server.temp_dir, 0o500)
            try:
                image = ig.encode(ig.noisy(ig.RED, seed=80), "PNG")
                assert_envelope(post_image(server, image), 503, "storage_unavailable")
            finally:
                os.chmod(server.temp_dir, 0o700)
    finally:
        server.stop()
    assert "Traceback" not in server.output(tail=None)


# -- a hung model call ----------------------------------------------------------------------

def test_hung_model_call_answers_503_and_the_worker_survives(tmp_path):
    hang = 8.0
    folder = save_colour_model(str(tmp_path / "hang"), hang_seconds=hang)
    server = start_server(tmp_path, {"MODEL_PATH": folder, "WORKERS": "1", "THREADS": "16",
                              "REQUEST_TIMEOUT": "2"})
    try:
        pid = server.worker_pids()
        trap = ig.encode(ig.solid(TRAP), "PNG")
        results = {}

        def send_trap():
            t = time.monotonic()
            results["trap"] = (post_image(server, trap), time.monotonic() - t)

        th = threading.Thread(target=send_trap)
        th.start()
        time.sleep(0.5)
        other = post_image(server, ig.encode(ig.noisy(ig.RED, seed=5), "PNG"))  # queued behind it
        th.join(30)
        trap_response, trap_seconds = results["trap"]
        assert_envelope(trap_response, 503, "model_timeout")
        assert trap_response.headers["Retry-After"]
        assert other.status_code == 503 and other.json()["error"]["code"] in (
            "model_timeout", "overloaded")
        health = requests.get(server.url + "/healthz", timeout=5)
        ready = requests.get(server.url + "/readyz", timeout=5)
        assert health.status_code == 200  # the process is alive ...
        assert_envelope(ready, 503, "model_timeout")  # ... but says it cannot take work
        deadline = time.monotonic() + hang + 30
        while time.monotonic() < deadline:  # the call ends; the worker serves again
            if requests.get(server.url + "/readyz", timeout=5).status_code == 200:
                break
            time.sleep(0.2)
        recovered = post_image(server, ig.encode(ig.noisy(ig.BLUE, seed=6), "PNG"))
        assert recovered.status_code == 200 and \
            recovered.json()["predictions"][0]["label"] == "blue"
        assert server.worker_pids() == pid  # same worker: not killed by gunicorn's timeout
    finally:
        server.stop()
    record("hung_model", {"hang_s": hang, "request_timeout_s": 2,
                          "trap_answered_after_s": round(trap_seconds, 2)})


def test_model_call_that_never_returns_gets_the_worker_replaced(tmp_path):
    """TensorFlow cannot cancel a running op: past MODEL_HANG_TIMEOUT the worker exits and
    gunicorn forks a fresh one, which loads the model and serves."""
    folder = save_colour_model(str(tmp_path / "hang"), hang_seconds=3600)
    server = start_server(tmp_path, {"MODEL_PATH": folder, "WORKERS": "1", "REQUEST_TIMEOUT": "1",
                              "MODEL_HANG_TIMEOUT": "3"})
    try:
        (old,) = server.worker_pids()
        assert_envelope(post_image(server, ig.encode(ig.solid(TRAP), "PNG")), 503, "model_timeout")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = server.worker_pids()
            if pids and old not in pids:
                try:
                    if requests.get(server.url + "/readyz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
            time.sleep(0.2)
        assert old not in server.worker_pids() and len(server.worker_pids()) == 1
        response = post_image(server, ig.encode(ig.noisy(ig.GREEN, seed=9), "PNG"))
        assert response.status_code == 200
        assert response.json()["predictions"][0]["label"] == "green"
        assert server.proc.poll() is None  # the server itself never stopped
    finally:
        server.stop()
    assert "MODEL_HANG_TIMEOUT=3" in server.output(tail=None)
