"""common/inference/batcher.py: batches form under concurrency, results go to the right caller,
the queue sheds load, deadlines hold, failures reach everyone, shutdown drains, no thread is left
behind."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from common.errors import ModelFailed, ModelTimeout, Overloaded, ServiceUnavailable
from common.inference.batcher import Batcher, Pacer, bucket_sizes, efficient_batch_size


def image(value: float) -> np.ndarray:
    return np.full((4, 4, 3), value, np.float32)


class Recorder:
    """A 'model' whose score is the image's mean value; it records the batch shapes it saw."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.shapes = []

    def __call__(self, x):
        self.shapes.append(x.shape[0])
        time.sleep(self.delay)
        return x.mean(axis=(1, 2, 3))[:, None].repeat(2, axis=1)


class Hooks:
    """The batcher's metrics hooks (the interface of ``common.metrics.VersionMetrics``),
    recorded: what /metrics would show of it."""

    def __init__(self):
        self.queue_depth = 0  # admitted images whose batch has not started
        self.sizes: list[int] = []  # each batch's real size
        self.rejected: list[str] = []  # "overloaded" | "model_timeout"
        self._lock = threading.Lock()

    def queue_changed(self, delta: int) -> None:
        with self._lock:
            self.queue_depth += delta

    def batch_done(self, size: int, seconds: float) -> None:
        self.sizes.append(size)

    def rejected_request(self, reason: str) -> None:
        self.rejected.append(reason)

    @property
    def shed(self) -> int:
        return self.rejected.count("overloaded")


def run(batcher: Batcher, array: np.ndarray, timeout: float | None = None) -> np.ndarray:
    """Admit one image and wait for its scores, as the data plane does."""
    with batcher.admit(1) as ticket:
        return ticket.submit([array], timeout)[0]


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(16) == (1, 2, 4, 8, 16)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)


def test_lone_request_runs_at_once_in_a_batch_of_one():
    model, hooks = Recorder(), Hooks()
    batcher = Batcher(model, max_batch_size=8, metrics=hooks)
    try:
        for v in (0.1, 0.2, 0.3):
            assert run(batcher, image(v))[0] == pytest.approx(v)
        assert model.shapes == [1, 1, 1] and hooks.sizes == [1, 1, 1]
    finally:
        batcher.close()


def test_concurrent_requests_share_batches_and_get_their_own_answer():
    model, hooks = Recorder(delay=0.05), Hooks()
    batcher = Batcher(model, max_batch_size=8, max_queue=64, metrics=hooks)
    values = [i / 100 for i in range(40)]
    try:
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(lambda v: run(batcher, image(v))[0], values))
    finally:
        batcher.close()
    assert results == pytest.approx(values)
    assert max(hooks.sizes) > 1  # batches formed
    assert set(model.shapes) <= set(bucket_sizes(8))  # always a padded, warmed-up size
    assert sum(hooks.sizes) == 40


def test_a_short_batch_is_padded_with_zero_rows_after_its_own():
    """Three images queued behind a running call run as one batch padded to 4: the model sees
    them in order and a fourth row of zeros."""
    gate, entered, batches = threading.Event(), threading.Event(), []

    def model(x):
        batches.append(x.copy())
        entered.set()
        gate.wait(10)
        return x.mean(axis=(1, 2, 3))[:, None].repeat(2, axis=1)

    hooks = Hooks()
    batcher = Batcher(model, max_batch_size=4, max_queue=8, metrics=hooks)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(run, batcher, image(0.9))
            assert entered.wait(5)
            rest = [pool.submit(run, batcher, image(v)) for v in (0.1, 0.2, 0.3)]
            deadline = time.monotonic() + 5
            while hooks.queue_depth < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            assert first.result(5)[0] == pytest.approx(0.9)
            assert [f.result(5)[0] for f in rest] == pytest.approx([0.1, 0.2, 0.3])
    finally:
        gate.set()
        batcher.close()
    padded = batches[1]
    assert padded.shape == (4, 4, 4, 3) and padded.dtype == np.float32
    assert sorted(padded[:3, 0, 0, 0].tolist()) == pytest.approx([0.1, 0.2, 0.3])
    assert not padded[3].any()


def test_full_queue_sheds_at_once():
    """With the model blocked and the queue full, a new request is refused without waiting: the
    model is blocked (a waiting call could only end at its 60 s deadline, as ModelTimeout), and
    the model is not called again."""
    gate, entered = threading.Event(), threading.Event()
    calls = []

    def model(x):
        calls.append(len(x))
        entered.set()
        gate.wait(30)
        return np.zeros((len(x), 1))

    hooks = Hooks()
    batcher = Batcher(model, max_batch_size=1, max_queue=2, timeout=60, metrics=hooks)
    pool = ThreadPoolExecutor(4)
    try:
        running = [pool.submit(run, batcher, image(0))]
        assert entered.wait(10)  # the first is in the model now; two more fill the queue
        running += [pool.submit(run, batcher, image(0)) for _ in range(2)]
        for _ in range(200):
            if hooks.queue_depth == 2:
                break
            threading.Event().wait(0.05)
        assert hooks.queue_depth == 2
        outcome = []
        refused = threading.Thread(target=lambda: outcome.append(
            pytest.raises(Overloaded, run, batcher, image(0)).value))
        refused.start()
        refused.join(10)
        assert not refused.is_alive() and outcome, "the refused request waited"
        assert outcome[0].headers["Retry-After"] and outcome[0].status == 503
        assert calls == [1] and hooks.shed == 1
        gate.set()
        assert all(f.result(5).shape == (1,) for f in running)
        assert calls == [1, 1, 1]
    finally:
        gate.set()
        batcher.close()
        pool.shutdown()


def test_hung_model_hits_the_deadline_and_the_batcher_recovers():
    gate = threading.Event()
    calls = []

    def model(x):
        calls.append(len(x))
        if len(calls) == 1:
            gate.wait(10)
        return np.ones((len(x), 1))

    batcher = Batcher(model, max_batch_size=4, timeout=0.3)
    try:
        with pytest.raises(ModelTimeout):
            run(batcher, image(0))
        gate.set()
        assert run(batcher, image(0))[0] == 1.0
    finally:
        batcher.close()


def test_model_errors_reach_every_caller():
    def broken(x):
        time.sleep(0.05)
        raise RuntimeError("kaput")

    batcher = Batcher(broken, max_batch_size=4)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(run, batcher, image(0)) for _ in range(4)]
        for f in futures:
            with pytest.raises(ModelFailed) as info:  # a 503 for every caller, never a 500
                f.result(5)
            assert info.value.status == 503 and "kaput" not in info.value.message
    finally:
        batcher.close()


def test_close_drains_the_queue_and_ends_the_thread():
    before = threading.active_count()
    model = Recorder(delay=0.05)
    batcher = Batcher(model, max_batch_size=2, max_queue=16)
    pool = ThreadPoolExecutor(8)
    futures = [pool.submit(run, batcher, image(0.5)) for _ in range(8)]
    time.sleep(0.02)
    batcher.close()
    assert all(f.result(5)[0] == pytest.approx(0.5) for f in futures)
    pool.shutdown()
    with pytest.raises(ServiceUnavailable):
        run(batcher, image(0))
    assert not batcher._thread.is_alive()
    assert threading.active_count() <= before


def test_max_wait_gathers_a_bigger_batch():
    model, hooks = Recorder(), Hooks()
    batcher = Batcher(model, max_batch_size=8, batch_wait_ms=200, metrics=hooks)
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda v: run(batcher, image(v)), [0.1, 0.2, 0.3, 0.4]))
    finally:
        batcher.close()
    assert max(hooks.sizes) >= 2


class GatedModel:
    """A 'model' whose calls each wait for the test's go-ahead (scores: the image's mean value).

    ``calls`` holds the size of each batch it was given; :meth:`entered` waits until call
    ``n`` has begun, :meth:`finish` lets calls up to ``n`` return.
    """

    def __init__(self):
        self.calls: list[int] = []
        self._allowed = 0
        self._cond = threading.Condition()

    def __call__(self, x):
        with self._cond:
            self.calls.append(len(x))
            number = len(self.calls)
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: self._allowed >= number, 30), "never let go"
        return x.mean(axis=(1, 2, 3))[:, None].repeat(2, axis=1)

    def entered(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, 30), f"no call {n}"

    def finish(self, n: int) -> None:
        with self._cond:
            self._allowed = n
            self._cond.notify_all()


def wait_queued(batcher: Batcher, images: int) -> None:
    """Block until ``images`` submitted images wait in the batcher's queue for the model thread.

    Admission alone does not put an image there (a request admitted is still decoding); its
    ``submit`` does. Waits on the queue's own condition, which every put notifies; call it only
    while the model thread is inside a model call, so that no other thread waits on it.
    """
    jobs = batcher._queue
    with jobs.not_empty:
        assert jobs.not_empty.wait_for(lambda: jobs._qsize() >= images, 30), (
            f"{jobs._qsize()} of {images} images queued")


def test_clients_coming_straight_back_find_room():
    """Answered clients that resubmit at once find room although the queue, while the batch ran,
    had no room for them: the model thread takes the next batch off the queue before it answers
    the last one.

    Four clients loop over one image each; batches of two, room for three. The test holds each
    model call until every client not in it has submitted (so the queue is as full as these
    clients can make it), checks that two more images would be refused at that moment, and
    lets the call end; the two clients answered come straight back. No request may be shed.
    """
    model, hooks = GatedModel(), Hooks()
    batcher = Batcher(model, max_batch_size=2, max_queue=3, metrics=hooks)
    clients, calls = 4, 12
    stop = threading.Event()

    def client(i):
        while not stop.is_set():
            assert run(batcher, image(i / 10))[0] == pytest.approx(i / 10)

    pool = ThreadPoolExecutor(clients)
    try:
        running = [pool.submit(client, 0)]
        model.entered(1)  # the first client's image alone: the others start behind it
        running += [pool.submit(client, i) for i in range(1, clients)]
        for n in range(1, calls + 1):
            model.entered(n)
            wait_queued(batcher, clients - model.calls[n - 1])
            if n > 1:  # a full batch ran; its two clients will not fit beside the two queued
                with pytest.raises(Overloaded):
                    batcher.check_room(2)
            if n == calls:
                stop.set()
            model.finish(n)
        model.finish(10 ** 6)
        for future in running:
            future.result(30)  # raises Overloaded if a client coming back was shed
    finally:
        stop.set()
        model.finish(10 ** 6)
        batcher.close()
        pool.shutdown()
    assert model.calls[:calls] == [1] + [2] * (calls - 1)
    assert hooks.shed == calls - 1  # the check_room probes, no request


def idle_batcher(seconds_per_batch: float, budget_ms: float, max_queue: int = 100,
                 metrics: Hooks | None = None) -> Batcher:
    """A batcher whose batches are known to take ``seconds_per_batch`` (max size 2)."""
    return Batcher(Recorder(), max_batch_size=2, max_queue=max_queue, max_wait_ms=budget_ms,
                   batch_seconds={1: seconds_per_batch, 2: seconds_per_batch}, metrics=metrics)


def admitted(batcher: Batcher, limit: int = 1000) -> list:
    """Tickets taken until the first refusal (no model call runs: tickets only reserve)."""
    tickets = []
    while len(tickets) < limit:
        try:
            tickets.append(batcher.admit(1))
        except Overloaded as refused:
            tickets.append(refused)
            break
    return tickets


@pytest.mark.parametrize("seconds,budget_ms,expected_admitted,retry_after", [
    (0.2, 300, 4, "1"),    # wait = (admitted // 2) * 0.2 s: 0, 0, 0.2, 0.2 admitted; 0.4 not
    (2.0, 3000, 4, "4"),   # ten times slower, ten times the budget: same queue, longer retry
    (2.0, 300, 2, "2"),    # a slow model with a short budget gets a short queue
    (0.01, 300, 20, "1"),  # a fast model: 60 would fit the budget, the hard cap of 20 holds
])
def test_admission_honours_the_budget(seconds, budget_ms, expected_admitted, retry_after):
    hooks = Hooks()
    batcher = idle_batcher(seconds, budget_ms, max_queue=20, metrics=hooks)
    try:
        *tickets, refused = admitted(batcher)
        assert len(tickets) == expected_admitted and isinstance(refused, Overloaded)
        assert refused.status == 503 and refused.headers["Retry-After"] == retry_after
        assert hooks.queue_depth == expected_admitted and hooks.shed == 1
        tickets[0].release()  # room given back is room for the next request
        assert batcher.admit(1).left == 1
    finally:
        batcher.close()


def test_a_ticket_gives_back_unused_room_and_answers_what_it_used():
    hooks = Hooks()
    batcher = idle_batcher(0.01, 300, metrics=hooks)
    try:
        with batcher.admit(3) as ticket:
            assert hooks.queue_depth == 3
            assert ticket.submit([image(0.25)])[0][0] == pytest.approx(0.25)
            assert hooks.queue_depth == 2  # one went to the model
        assert hooks.queue_depth == 0
    finally:
        batcher.close()


def test_a_call_running_past_its_estimate_sheds_new_work():
    """A hung call makes the expected wait grow with its overrun: once past the budget, new
    requests are refused at once instead of queueing behind it."""
    gate, entered = threading.Event(), threading.Event()

    def model(x):
        entered.set()
        gate.wait(30)
        return np.zeros((len(x), 1))

    batcher = Batcher(model, max_batch_size=2, max_queue=100, max_wait_ms=200, timeout=60,
                      batch_seconds={1: 0.001, 2: 0.001})
    pool = ThreadPoolExecutor(1)
    try:
        running = pool.submit(run, batcher, image(0))
        assert entered.wait(10)
        assert batcher.admit(1) is not None  # just started: within the budget
        for _ in range(600):
            if batcher.busy_seconds > 0.25:
                break
            threading.Event().wait(0.01)
        with pytest.raises(Overloaded):
            batcher.admit(1)
        gate.set()
        assert running.result(10).shape == (1,)
    finally:
        gate.set()
        batcher.close()
        pool.shutdown()


def test_pacer_lets_a_burst_through_then_spaces_events_out():
    pacer = Pacer(rate=10, burst=3, max_delay=0.35)
    delays = [pacer.delay() for _ in range(8)]  # all at (almost) the same instant
    assert delays[:3] == [0.0, 0.0, 0.0]
    # then one interval (0.1 s) more each, never past max_delay
    assert [round(d, 2) for d in delays[3:]] == [0.1, 0.2, 0.3, 0.35, 0.35]


def test_refusals_past_the_rate_wait_for_their_turn(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    gate = threading.Event()
    batcher = Batcher(lambda x: gate.wait(5) and np.zeros((len(x), 2), np.float32) or
                      np.zeros((len(x), 2), np.float32), max_batch_size=1, max_queue=1,
                      refusals_per_second=20)
    try:
        ticket = batcher.admit(1)  # fills the queue: every further request is refused
        for _ in range(4):
            with pytest.raises(Overloaded):
                batcher.admit(1)
        ticket.release()
    finally:
        gate.set()
        batcher.close()
    # a burst of 2 (a tenth of 20/s) at once, then one 1/20 s interval more each
    assert [round(s, 2) for s in slept] == [0.0, 0.0, 0.05, 0.1]


@pytest.mark.parametrize("seconds,expected", [
    ({1: 0.0816, 2: 0.160, 4: 0.314, 8: 0.620}, 4),  # Inception on 2 cores: flat after 4
    ({1: 0.0128, 2: 0.0209, 4: 0.0335, 8: 0.0606}, 8),  # MobileNet: faster per image up to 8
    ({1: 0.001, 2: 0.0011, 4: 0.0012, 8: 0.0013}, 8),  # call overhead dominates: the largest
    ({}, 8),  # nothing measured: the limit
])
def test_batches_stop_where_bigger_ones_are_no_faster(seconds, expected):
    assert efficient_batch_size(seconds, 8) == expected
