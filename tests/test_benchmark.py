"""scripts/benchmark.py runs end to end (tiny model, one second a level). It checks the report's
shape and that nothing failed; speed itself is never asserted in tests."""
import time

import pytest

from scripts import bench_fairness, benchmark, loadgen


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
    assert result["in_process"]["best_cpu_ms_per_image"] > 0
    # the worker's CPU per answer, and the ceiling it puts on goodput ÷ in-process
    assert all(lv["server_cpu_ms_per_200"] > 0 for lv in result["levels"])
    assert set(result["ratios"]) >= {"p50_c1_vs_batch1", "first_request_vs_median",
                                     "large_vs_small_p50_c1", "cpu_ceiling_c4"}
    table = benchmark.markdown(result)
    assert "| 500x375 | 4 |" in table and "In-process" in table


@pytest.mark.server
def test_fairness_benchmark_end_to_end(colour_model_dir, tmp_path):
    """scripts/bench_fairness.py's phases, on a tiny model for a second each: the capacity
    before and after the fair share's phase, their mean the ratios' base, every client
    counted, the table written."""
    params = bench_fairness.FairnessParams(model=colour_model_dir, duration=1.0, warmup=0.5,
                                           greedy_connections=4, polite_clients=2)
    result = bench_fairness.run(params, log_dir=str(tmp_path))
    before, after = (result[name]["total_goodput"] for name in ("capacity", "capacity_again"))
    assert before > 0 and after > 0
    assert result["capacity_goodput"] == round((before + after) / 2, 2)
    assert result["fair"] == round(result["capacity_goodput"] / 3, 2)
    for phase in ("fair_share_on", "fair_share_off"):
        clients = result[phase]["clients"]
        assert set(clients) == {"greedy", "polite1", "polite2"}
        assert all(c["ok"] > 0 and c["errors"] == 0 for c in clients.values()), clients
        assert set(result["ratios"][phase]) == {"polite1", "polite2"}
        assert abs(result["ratios"][phase]["polite1"] - clients["polite1"]["goodput"]
                   / (result["capacity_goodput"] / 3)) < 1e-3
    table = bench_fairness.markdown(result)
    assert "| capacity_again | greedy | 4 |" in table and "| fair_share_on | polite2 | 1 |" in table


def test_photo_jpeg_sizes():
    from io import BytesIO

    from PIL import Image
    assert Image.open(BytesIO(loadgen.photo_jpeg(500, 375))).size == (500, 375)


@pytest.mark.server
def test_refusal_cpu_at_once_and_paced(tmp_path):
    """The refused-request measurement: every flood request is refused (the spinning model holds
    the batcher), a paced server answers fewer refusals than one answering at once, and the
    slope between them is reported."""
    body = tmp_path / "photo.jpg"
    body.write_bytes(loadgen.photo_jpeg(500, 375))
    out = benchmark.refused_request_cpu(1.0, str(body), str(tmp_path),
                                        benchmark.choose_driver("auto"), clients=(2,),
                                        rates=(0, 20))
    at_once, paced = out["runs"]
    assert (at_once["refusals_per_second"], paced["refusals_per_second"]) == (0, 20)
    for run in out["runs"]:
        (flood,) = run["floods"]
        assert run["probe_status"] == 503 and flood["accepted"] == 0 and flood["refused"] > 0
        assert flood["load"]["errors"] == 0
    assert paced["floods"][0]["refused"] <= 20 * paced["floods"][0]["wall_s"] + 10
    assert at_once["floods"][0]["refused"] > paced["floods"][0]["refused"]
    assert [m["rates"] for m in out["marginal"]] == [[0, 20]]


def test_a_sweep_setting_may_carry_variables_of_its_own():
    assert benchmark.parse_sweep("1x2, 2x1,auto,auto:RUNTIME_THREADS_ALONE=0,4:A=1:B=x=y") == [
        (1, 2, {}), (2, 1, {}), (None, None, {}), (None, None, {"RUNTIME_THREADS_ALONE": "0"}),
        (4, None, {"A": "1", "B": "x=y"})]


@pytest.mark.server
def test_the_connections_each_worker_holds_are_counted(colour_model_dir, tmp_path):
    """Five kept-alive connections to a server of two workers: every one is counted, in the
    worker that holds it; the sampler's medians list the most loaded worker first."""
    import requests
    from helpers import start_server

    server = start_server(tmp_path, {"MODEL_PATH": colour_model_dir, "WORKERS": "2"})
    sessions = [requests.Session() for _ in range(5)]
    try:
        pids = server.worker_pids()
        assert len(pids) == 2
        for session in sessions:
            assert session.get(server.url + "/healthz", timeout=10).status_code == 200
        counts = benchmark.connections_per_worker(pids, server.port)
        assert sum(counts) == 5 and len(counts) == 2
        with benchmark.ConnectionSplit(pids, server.port, every=0.05, settle=0.0) as split:
            deadline = time.monotonic() + 10
            while len(split.samples) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert sum(split.medians()) == 5 and split.medians() == sorted(counts, reverse=True)
        assert benchmark.connections_per_worker(pids, server.port + 1) == [0, 0]
        assert benchmark.connections_moved(server.port) == 0.0  # nothing pressed: none moved
        assert benchmark.connections_per_worker([pids[0], 2 ** 22 + 7], server.port)[1] == 0
    finally:
        for session in sessions:
            session.close()
        server.stop()
