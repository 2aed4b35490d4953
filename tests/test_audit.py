"""common/audit.py: one JSON object a line, to a file or the log stream; rejections
rate-limited with a summary; the file bounded by one rotation."""
import json
import logging

from common.audit import Audit


def lines(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_a_record_is_one_json_line_with_the_fields(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = Audit(str(path), clock=lambda: 1700000000.5)
    trail.record("feedback_written", key="ci", client="10.0.0.7", request_id="r1",
                 filename="ab.png", label="x" * 500)
    [record] = lines(path)
    assert record == {"time": "2023-11-14T22:13:20.500Z", "event": "feedback_written",
                      "key": "ci", "client": "10.0.0.7", "request_id": "r1",
                      "details": {"filename": "ab.png", "label": "x" * 200}}


def test_rejections_are_capped_per_minute_then_summed_up(tmp_path):
    path = tmp_path / "audit.jsonl"
    now = [1000.0]
    trail = Audit(str(path), per_minute=5, clock=lambda: now[0])
    for i in range(50):
        trail.rejected(client="1.2.3.4", request_id=f"r{i}", reason="unknown")
    assert len(lines(path)) == 5
    now[0] += 61
    trail.rejected(client="1.2.3.4", request_id="late", reason="unknown")
    records = lines(path)
    assert [r["event"] for r in records[5:]] == ["key_rejected_suppressed", "key_rejected"]
    assert records[5]["details"]["dropped"] == 45
    trail.close()


def test_the_summary_comes_when_the_minute_ends_without_more_rejections(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = Audit(str(path), per_minute=1)
    for _ in range(3):
        trail.rejected(client="1.2.3.4", reason="missing")
    assert trail._timer is not None  # fires at the end of the minute; here at once
    trail._timer.cancel()
    trail.flush()
    assert [r["event"] for r in lines(path)] == ["key_rejected", "key_rejected_suppressed"]
    assert lines(path)[1]["details"]["dropped"] == 2


def test_the_file_is_rotated_once_past_its_size(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = Audit(str(path), max_bytes=2000)
    for i in range(100):
        trail.record("model_loaded", model="m", version=i)
    assert path.stat().st_size <= 2200
    assert (tmp_path / "audit.jsonl.1").stat().st_size <= 2200
    assert not (tmp_path / "audit.jsonl.2").exists()
    assert lines(path)[-1]["details"]["version"] == 99


def test_another_process_rotating_the_file_is_followed(tmp_path):
    path = tmp_path / "audit.jsonl"
    trail = Audit(str(path))
    trail.record("model_loaded", model="m", version=1)
    path.rename(tmp_path / "audit.jsonl.1")
    trail.record("model_loaded", model="m", version=2)
    assert [r["details"]["version"] for r in lines(path)] == [2]


def test_the_log_stream_and_off(caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="classifier.audit"):
        Audit("-").record("model_unloaded", model="m", version=3)
    [record] = [r for r in caplog.records if r.name == "classifier.audit"]
    assert record.event == "model_unloaded" and record.details == {"model": "m", "version": 3}
    assert not Audit("off").enabled
    off = Audit(None)
    off.record("model_loaded", model="m", version=1)
    off.rejected(reason="missing")
    assert not off.enabled and not list(tmp_path.iterdir())
