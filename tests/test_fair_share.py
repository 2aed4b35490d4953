"""A fair share per client (issue 24): the share's arithmetic, who a request's client is, and a
real server where a client with many connections is refused 429 beside one that is served."""
import ipaddress
import threading
import time

import imagegen as ig
import pytest
import requests
from flask import Flask, g
from helpers import assert_envelope, metric, start_server
from tiny_models import save_colour_model

from common.fairshare import FairShare
from common.inference.batcher import BusyFraction
from common.clients import MAX_HOPS, client_address, networks
from common.web.clients import client_id

# -- the share ---------------------------------------------------------------------------------


def test_a_client_alone_is_never_over_its_share():
    share = FairShare()
    assert all(share.enter("greedy", pressed=True, now=0.0) for _ in range(50))
    assert share.in_flight() == {"greedy": 50}


def test_beside_another_client_a_client_holds_about_as_many_as_it():
    share = FairShare()
    for _ in range(5):
        assert share.enter("greedy", pressed=True, now=0.0)
    assert share.enter("polite", pressed=True, now=0.0)  # holds nothing: never refused
    assert share.share(now=0.0) == 3  # 6 in flight, 2 clients
    assert not share.enter("greedy", pressed=True, now=0.0)
    assert share.in_flight() == {"greedy": 5, "polite": 1}  # the refusal counted nothing
    for _ in range(4):
        share.leave("greedy", now=0.0)
    assert not share.enter("greedy", pressed=True, now=0.0)  # 1 >= ceil(2 / 2)
    assert not share.enter("polite", pressed=True, now=0.0)  # the same rule for both
    share.leave("greedy", now=0.0)
    assert share.enter("greedy", pressed=True, now=0.0)  # held nothing


def test_four_single_connection_clients_hold_a_greedy_one_to_one_request():
    share = FairShare()
    for client in ("a", "b", "c", "d"):
        assert share.enter(client, pressed=True, now=0.0)
    assert share.enter("greedy", pressed=True, now=0.0)
    assert not share.enter("greedy", pressed=True, now=0.0)


def test_nothing_is_refused_while_the_model_is_not_pressed():
    share = FairShare()
    assert share.enter("other", pressed=True, now=0.0)
    assert all(share.enter("greedy", pressed=False, now=0.0) for _ in range(20))
    assert not share.enter("greedy", pressed=True, now=0.0)


def test_a_client_between_two_requests_still_counts_for_grace_seconds():
    share = FairShare(grace=0.5)
    share.enter("polite", pressed=True, now=0.0)
    share.enter("greedy", pressed=True, now=0.0)
    share.leave("polite", now=1.0)  # answered; its next request is on its way
    assert not share.enter("greedy", pressed=True, now=1.2)
    assert share.active(now=1.2) == 2
    assert share.enter("greedy", pressed=True, now=1.6)  # gone: greedy is alone
    assert share.active(now=1.6) == 1


def test_min_share():
    share = FairShare(min_share=2)
    share.enter("a", pressed=True, now=0.0)
    assert share.enter("b", pressed=True, now=0.0)
    assert share.enter("b", pressed=True, now=0.0)  # 1 < min_share
    assert not share.enter("b", pressed=True, now=0.0)


def test_the_table_is_bounded():
    """Clients with nothing in flight leave the table; idle ones are remembered for the grace
    period only, and never more than max_recent of them."""
    share = FairShare(grace=10.0, max_recent=100)
    for i in range(10_000):
        client = f"addr:10.0.{i // 256}.{i % 256}"
        assert share.enter(client, pressed=True, now=0.0)
        share.leave(client, now=0.0)
    assert share.in_flight() == {}
    assert share.active(now=0.0) == 100
    assert share.active(now=20.0) == 0


def test_leave_without_enter_is_a_bug():
    with pytest.raises(RuntimeError):
        FairShare().leave("nobody")


def test_busy_fraction_averages_the_model_threads_busy_time():
    busy = BusyFraction(tau=1.0, now=0.0)
    assert busy.value(now=5.0) == 0.0
    busy.change(True, now=5.0)
    assert busy.value(now=6.0) == pytest.approx(1 - 0.3679, abs=1e-3)
    assert busy.value(now=20.0) == pytest.approx(1.0, abs=1e-5)
    busy.change(False, now=20.0)
    assert busy.value(now=21.0) == pytest.approx(0.3679, abs=1e-3)


# -- who the client is -------------------------------------------------------------------------

TRUSTED = networks(("127.0.0.1", "10.1.0.0/16"))


@pytest.mark.parametrize("remote, forwarded, expected", [
    ("203.0.113.7", [], "203.0.113.7"),
    # from an untrusted peer the header is ignored, whatever it says
    ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
    # a trusted proxy: the right-most hop that is not a trusted proxy
    ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
    ("127.0.0.1", ["6.6.6.6, 198.51.100.1, 10.1.2.3"], "198.51.100.1"),
    ("127.0.0.1", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # several header lines
    ("127.0.0.1", ["10.1.0.5, 10.1.0.6"], "127.0.0.1"),  # all trusted: the peer
    # malformed: the header is ignored
    ("127.0.0.1", ["not-an-address"], "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.1, unknown"], "127.0.0.1"),
    ("127.0.0.1", ["198.51.100.1:8080"], "127.0.0.1"),
    ("127.0.0.1", [""], "127.0.0.1"),
    ("127.0.0.1", ["x" * 100_000], "127.0.0.1"),
    # IPv6 by its /64; IPv4-mapped as IPv4
    ("2001:db8::1", [], "2001:db8::/64"),
    ("::ffff:203.0.113.7", [], "203.0.113.7"),
    (None, [], "-"),
])
def test_client_address(remote, forwarded, expected):
    """The share counts an IPv6 client by its /64; the logs keep the address itself."""
    assert client_address(remote, forwarded, TRUSTED, grouped=True) == expected
    if "/64" not in expected:
        assert client_address(remote, forwarded, TRUSTED) == expected


def test_a_long_header_is_read_from_the_right():
    """A client cannot push the address its proxy appended out of the part that is read."""
    spoof = ", ".join(["6.6.6.6"] * 5000)
    assert client_address("127.0.0.1", [spoof + ", 198.51.100.1"], TRUSTED) == "198.51.100.1"
    many_trusted = ", ".join(["10.1.0.1"] * (MAX_HOPS + 5))
    assert client_address("127.0.0.1", ["198.51.100.1, " + many_trusted], TRUSTED) == "127.0.0.1"


def test_no_trusted_proxies_means_the_peer():
    assert client_address("127.0.0.1", ["198.51.100.1"], ()) == "127.0.0.1"


def test_client_id_is_the_key_when_one_was_presented():
    app = Flask(__name__)
    headers = {"X-Forwarded-For": "198.51.100.1"}
    with app.test_request_context("/", headers=headers, environ_base={"REMOTE_ADDR": "127.0.0.1"}):
        assert client_id(("127.0.0.1",)) == "addr:198.51.100.1"
        assert client_id(()) == "addr:127.0.0.1"
        g.key_name = "team-a"
        assert client_id(("127.0.0.1",)) == "key:team-a"


def test_networks_parse_addresses_and_networks():
    assert networks(("127.0.0.1", "10.0.0.0/8")) == (ipaddress.ip_network("127.0.0.1/32"),
                                                     ipaddress.ip_network("10.0.0.0/8"))


# -- the real server ---------------------------------------------------------------------------


@pytest.mark.server
def test_a_greedy_client_gets_429_while_a_single_connection_client_is_served(tmp_path):
    """One worker, a model whose every call takes 0.15 s (so it is pressed as soon as requests
    keep it busy); two clients from this machine, told apart by X-Forwarded-For from the trusted
    127.0.0.1: eight connections resending at once, and one connection."""
    model = save_colour_model(str(tmp_path / "model"), call_seconds=0.15)
    server = start_server(tmp_path, {"MODEL_PATH": model, "WORKERS": "1",
                                     "TRUSTED_PROXIES": "127.0.0.1", "QUEUE_MAX_WAIT_MS": "5000",
                                     "REQUEST_TIMEOUT": "60"})
    try:
        body = ig.png(ig.GREEN, size=(32, 32))
        stop = threading.Event()
        answers = {"greedy": [], "single": []}
        refused = []
        lock = threading.Lock()

        def client(name, address):
            with requests.Session() as session:
                while not stop.is_set():
                    try:
                        response = session.post(server.url + "/classify", data=body,
                                                timeout=60,
                                                headers={"Content-Type": "image/png",
                                                         "X-Forwarded-For": address})
                    except requests.ConnectionError:  # a refusal closes the connection
                        with lock:
                            answers[name].append("closed")
                        continue
                    with lock:
                        answers[name].append(response.status_code)
                        if response.status_code == 429 and not refused:
                            refused.append(response)

        threads = [threading.Thread(target=client, args=("greedy", "198.51.100.1"))
                   for _ in range(8)]
        threads.append(threading.Thread(target=client, args=("single", "198.51.100.2")))
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                refused and answers["single"].count(200) >= 10):
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(70)
        assert refused, f"the greedy client was never refused: {answers['greedy'][:50]}"
        error = assert_envelope(refused[0], 429, "over_fair_share")
        assert int(refused[0].headers["Retry-After"]) >= 1, error
        assert set(answers["single"]) == {200}, answers["single"]
        assert answers["single"].count(200) >= 10
        assert 200 in answers["greedy"]
        text = requests.get(server.url + "/metrics", timeout=10).text
        assert metric(text, "classifier_rejected_total", reason="over_fair_share") >= 1
    finally:
        server.stop()
