"""common/versions/served.py: one served version's life cycle and its one health value."""
import threading

import numpy as np
import pytest

from common.config import Config
from common.errors import ModelFailed, ModelNotReady, ModelTimeout, ServiceUnavailable
from common.inference.classifier import Classifier
from common.versions.served import ServedVersion, State

CONFIG = Config.from_mapping({"batch_max_size": 2, "request_timeout": 0.5,
                              "model_hang_timeout": 1.0})


def classify(version: ServedVersion, array: np.ndarray) -> np.ndarray:
    """One image through a version's batcher, as a request's lease does."""
    with version.running().batcher.admit(1) as ticket:
        return ticket.submit([array])[0]


def tiny(predict_fn=None) -> Classifier:
    return Classifier(predict_fn=predict_fn or (lambda x: np.ones((len(x), 2)) / 2),
                      labels=["a", "b"], input_size=(2, 2))


def image() -> np.ndarray:
    return np.zeros((2, 2, 3), np.float32)


def test_loading_then_ready_in_the_background():
    gate = threading.Event()
    model = ServedVersion(lambda: (gate.wait(30), tiny())[1], CONFIG).start()
    try:
        assert model.health().state is State.LOADING
        with pytest.raises(ModelNotReady):
            classify(model, image())
        assert model.describe() is None
        gate.set()
        assert model.wait(30).state is State.READY
        assert classify(model, image()).tolist() == [0.5, 0.5]
        assert model.classifier.warmed_up and model.describe() == {"name": "model",
                                                                   "version": "1"}
    finally:
        gate.set()
        model.close()


def test_a_failed_load_is_failed_with_its_reason_and_reported():
    failures = []

    def broken():
        raise FileNotFoundError("no model here")

    model = ServedVersion(broken, CONFIG, on_failure=failures.append).start()
    health = model.wait(30)
    assert health.state is State.FAILED and "no model here" in health.reason
    assert isinstance(failures[0], FileNotFoundError)
    error = health.error()
    assert isinstance(error, ModelNotReady) and "no model here" in error.message


def test_a_warm_up_failure_is_a_failed_load():
    bad = tiny(lambda x: np.ones((len(x), 3)))  # three scores, two labels
    health = ServedVersion(bad, CONFIG).start().wait(30)
    assert health.state is State.FAILED and "3 scores" in health.reason


def test_hung_while_one_call_runs_past_request_timeout_then_ready_again():
    entered, release = threading.Event(), threading.Event()

    def slow(x):
        if slow.armed:  # not during warm-up
            entered.set()
            release.wait(30)
        return np.ones((len(x), 2)) / 2

    slow.armed = False
    model = ServedVersion(tiny(slow), CONFIG).start(background=False)
    slow.armed = True
    caller = threading.Thread(target=lambda: pytest.raises(ModelTimeout, classify, model, image()))
    caller.start()
    try:
        assert entered.wait(30)
        while model.health().busy_seconds <= CONFIG.request_timeout:
            threading.Event().wait(0.05)
        health = model.health()
        assert health.state is State.HUNG and "REQUEST_TIMEOUT" in health.reason
        assert isinstance(health.error(), ModelTimeout)
    finally:
        release.set()
        caller.join(30)
        slow.armed = False
    for _ in range(600):  # until the model thread has finished that call
        if model.running().batcher.busy_seconds == 0:
            break
        threading.Event().wait(0.05)
    assert model.health().state is State.READY
    model.close()


def test_the_watchdog_reports_a_call_past_model_hang_timeout():
    hung_for = []
    release = threading.Event()
    fired = threading.Event()

    def spin(x):
        if spin.armed:  # not during warm-up
            release.wait(30)
        return np.ones((len(x), 2)) / 2

    spin.armed = False
    model = ServedVersion(tiny(spin), CONFIG,
                        on_hung=lambda s: (hung_for.append(s), fired.set())).start(False)
    spin.armed = True
    threading.Thread(target=lambda: pytest.raises(ModelTimeout, classify, model, image()),
                     daemon=True).start()
    try:
        assert fired.wait(30)
        assert hung_for[0] > CONFIG.model_hang_timeout
    finally:
        release.set()
        model.close()


def test_model_errors_are_503_not_500():
    def broken(x):
        if broken.armed:  # not during warm-up
            raise RuntimeError("kaput")
        return np.ones((len(x), 2)) / 2

    broken.armed = False
    model = ServedVersion(tiny(broken), CONFIG).start(False)
    broken.armed = True
    with pytest.raises(ModelFailed) as info:
        classify(model, image())
    assert info.value.status == 503 and "kaput" not in info.value.message
    model.close()


def test_stopped_after_close():
    model = ServedVersion(tiny(), CONFIG).start(False)
    model.close()
    assert model.health().state is State.STOPPED
    assert isinstance(model.health().error(), ServiceUnavailable)
    with pytest.raises(ServiceUnavailable):
        classify(model, image())


def test_the_load_and_warm_up_happen_within_the_turn():
    """A roll-out's version loads and warms up while holding its turn (under gunicorn, one
    worker at a time), and lets go of it before it serves."""
    events = []

    class Turn:
        def __enter__(self):
            events.append("turn")

        def __exit__(self, *exc):
            events.append("done")

    def load():
        events.append("load")
        return tiny(lambda x: (events.append("call"), np.ones((len(x), 2)) / 2)[1])

    model = ServedVersion(load, CONFIG, turn=Turn).start(background=False)
    try:
        assert model.health().state is State.READY
        assert events[:2] == ["turn", "load"] and events[-1] == "done"
        assert "call" in events[2:-1]  # the warm-up ran inside the turn
        classify(model, image())
        assert events[-1] == "call"
    finally:
        model.close()


def test_one_load_at_a_time_across_processes(tmp_path):
    """OneLoadAtATime is a lock between processes: while a child holds it, this process
    waits for its turn."""
    import subprocess
    import sys

    from common.web.gunicorn_worker import OneLoadAtATime

    path = str(tmp_path / "load.lock")
    child = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; fh = open(sys.argv[1], 'a'); "
         "fcntl.flock(fh, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        entered = threading.Event()

        def take_turn():
            with OneLoadAtATime(path)():
                entered.set()

        waiter = threading.Thread(target=take_turn, daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert not entered.is_set()  # the child holds it
        child.stdin.close()  # the child exits, its lock goes with it
        assert entered.wait(30)
    finally:
        child.kill()
        child.wait()


def test_a_turn_held_too_long_is_not_waited_for_forever(tmp_path):
    """A load that hangs holding the turn holds up the other workers only for ``patience``."""
    import fcntl

    from common.web.gunicorn_worker import OneLoadAtATime

    path = str(tmp_path / "load.lock")
    with open(path, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: as another worker would
        with OneLoadAtATime(path, patience=0.3)():
            entered = True
    assert entered


def test_a_versions_queued_images_and_calls_are_counted_on_the_workers_seat():
    """RUNTIME_THREADS_ALONE: the other workers see this one's work in hand, from a request's
    admission to the end of its model call (``Classifier.seat``: the batcher's queue through
    its hooks, the call through the seat's function)."""
    from common.machine import WorkBoard

    board = WorkBoard(seats=2)
    seat = board.seat(0)
    hold, inside, leave = threading.Event(), threading.Event(), threading.Event()

    def slow(x):
        if hold.is_set():  # not in the warm-up
            inside.set()
            assert leave.wait(30)
        return np.ones((len(x), 2)) / 2

    clf = tiny(seat.either(slow))
    clf.seat = seat
    model = ServedVersion(clf, CONFIG).start()
    try:
        ticket = model.running().batcher.admit(1)
        assert board.busy() == 1  # admitted, not yet decoded
        ticket.release()
        assert board.busy() == 0
        answered = []
        hold.set()
        request = threading.Thread(target=lambda: answered.append(classify(model, image())))
        request.start()
        assert inside.wait(30)
        assert board.busy() == 1  # in the model
        leave.set()
        request.join(30)
        assert answered and board.busy() == 0
    finally:
        leave.set()
        model.close()


def test_an_image_stays_in_hand_while_its_batch_waits_for_more():
    """With BATCH_MAX_WAIT_MS the model thread takes an image and waits for more before the
    call: the worker's seat must not read empty meanwhile (a sibling would take every CPU)."""
    import time

    from common.machine import WorkBoard

    board = WorkBoard(seats=2)
    seat = board.seat(0)
    called = threading.Event()

    def predict(x):
        called.set()
        return np.ones((len(x), 2)) / 2

    clf = tiny(seat.either(predict))
    clf.seat = seat
    config = Config.from_mapping({"batch_max_size": 2, "batch_max_wait_ms": 300,
                                  "request_timeout": 5.0})
    model = ServedVersion(clf, config).start()
    called.clear()  # the warm-up's calls
    try:
        answered, samples = [], []
        request = threading.Thread(target=lambda: answered.append(classify(model, image())))
        request.start()
        while not called.is_set() and request.is_alive():
            samples.append(board.busy())
            time.sleep(0.001)
        request.join(30)
        admitted = samples[samples.index(1):]  # from its admission to its call
        assert answered and len(admitted) > 10 and set(admitted) == {1}, samples
        assert board.busy() == 0
    finally:
        model.close()
