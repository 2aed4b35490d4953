"""Structured request logs and Prometheus metrics, on the real server with two workers."""
import json
import re
import time

import imagegen as ig
import pytest
import requests
from helpers import metric, metric_so_far
from PIL import PngImagePlugin

pytestmark = pytest.mark.server

MARKER = "IMAGE-CONTENT-MARKER-7f3a"


def log_lines(server) -> list[dict]:
    lines = []
    for line in server.output(tail=None).splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                pass
    return lines


def test_one_log_line_per_request_without_image_content(live_server):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", MARKER)
    data = ig.encode(ig.noisy(ig.GREEN, seed=4242), "PNG", pnginfo=info)
    response = requests.post(live_server.url + "/classify?top_k=1",
                             files={"image": (f"{MARKER}-name.png", data, "image/png")},
                             headers={"X-Request-ID": "test-log-0001"}, timeout=30)
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "test-log-0001"
    time.sleep(0.3)
    entries = [e for e in log_lines(live_server) if e.get("request_id") == "test-log-0001"]
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["route"] == "/classify" and entry["method"] == "POST"
    assert entry["status"] == 200 and entry["source"] == "upload"
    assert entry["model"] == "colours/7"  # tiny_models.save_colour_model
    assert entry["bytes_in"] >= len(data) and entry["bytes_out"] == len(response.content)
    assert entry["latency_ms"] > 0 and isinstance(entry["worker"], int)
    assert MARKER not in live_server.output(tail=None)  # neither the bytes nor the client's name


def test_errors_are_logged_and_bad_request_ids_replaced(live_server):
    response = requests.get(live_server.url + "/classify", params={"image_url": "ftp://x/y"},
                            headers={"X-Request-ID": "bad id with spaces"}, timeout=30)
    assert response.status_code == 403
    rid = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    time.sleep(0.3)
    entry = next(e for e in log_lines(live_server) if e.get("request_id") == rid)
    assert entry["status"] == 403 and entry["source"] == "url" and entry["route"] == "/classify"


def test_metrics_add_up_over_two_workers(live_server):
    before = requests.get(live_server.url + "/metrics", timeout=10).text
    start = {status: metric_so_far(before, "classifier_requests_total", route="/classify",
                                   method="POST", status=status) for status in ("200", "415")}
    batches_before = metric_so_far(before, "classifier_batch_size_count")
    sent = 0

    def served_by() -> set:
        time.sleep(0.2)
        return {e["worker"] for e in log_lines(live_server) if e.get("route") == "/classify"}

    # a new connection each: the kernel hands them to either worker, but may give a run of
    # them to one (CI met 24 in a row), so more are sent until both have served (at most 200)
    while sent < 24 or (sent < 200 and len(served_by()) < 2):
        data = ig.encode(ig.noisy(ig.BLUE, seed=9000 + sent), "PNG")
        assert requests.post(live_server.url + "/classify", files={"image": ("b.png", data)},
                             timeout=30).status_code == 200
        sent += 1
    for _ in range(3):
        assert requests.post(live_server.url + "/classify",
                             files={"image": ("t.txt", b"not an image")},
                             timeout=30).status_code == 415
    workers = served_by()
    assert len(workers) == 2, f"both workers should have served ({sent} requests)"
    for _ in range(6):  # whichever worker answers the scrape, the totals are the same
        text = requests.get(live_server.url + "/metrics", timeout=10).text
        assert metric(text, "classifier_requests_total", route="/classify", method="POST",
                      status="200") - start["200"] == sent
        assert metric(text, "classifier_requests_total", route="/classify", method="POST",
                      status="415") - start["415"] == 3
        assert metric(text, "classifier_batch_size_count") - batches_before == sent
        assert metric(text, "classifier_request_duration_seconds_count",
                      route="/classify") >= sent + 3
        assert metric(text, "classifier_queue_depth") == 0
        assert metric(text, "classifier_requests_in_flight") == 1  # this scrape
        info = [line for line in text.splitlines() if line.startswith("classifier_model_info{")]
        assert len(info) == 2 and all('model="colours"' in line for line in info)
        loads = [line for line in text.splitlines()
                 if line.startswith("classifier_model_load_seconds{")]
        assert len(loads) == 2 and all(float(line.split()[-1]) > 0 for line in loads)
        assert "classifier_model_warmup_seconds{" in text
