"""scripts/benchmark.py runs end to end (tiny model, one second a level). It checks the report's
shape and that nothing failed; speed itself is never asserted in tests."""
import pytest

from scripts import benchmark, loadgen


@pytest.mark.server
def test_benchmark_end_to_end(colour_model_dir):
    params = benchmark.BenchParams(model=colour_model_dir, concurrency=(1, 4),
                                   large_concurrency=(1,), duration=1.0, warmup_requests=1,
                                   inprocess_batches=(1, 2))
    result = benchmark.run(params)
    assert result["first_request_status"] == 200 and result["time_to_ready_s"] > 0
    assert [(lv["image"], lv["concurrency"]) for lv in result["levels"]] == [
        ("500x375", 1), ("500x375", 4), ("4000x3000", 1)]
    assert all(lv["ok"] > 0 and lv["errors"] == 0 for lv in result["levels"])
    assert result["peak_rss_mb"] and all(v > 0 for v in result["peak_rss_mb"].values())
    assert result["in_process"]["best_images_per_s"] > 0
    assert set(result["ratios"]) >= {"p50_c1_vs_batch1", "first_request_vs_median",
                                     "large_vs_small_p50_c1"}
    table = benchmark.markdown(result)
    assert "| 500x375 | 4 |" in table and "In-process" in table


def test_photo_jpeg_sizes():
    from io import BytesIO

    from PIL import Image
    assert Image.open(BytesIO(loadgen.photo_jpeg(500, 375))).size == (500, 375)
