"""common/fetch.py: the address rules on literal addresses (no connection), and real downloads
from servers on 127.0.0.1 (allowed by the allow-list) and 127.0.0.2 (forbidden)."""
import ipaddress
import time

import imagegen as ig
import pytest
import webservers as ws

from common.errors import ForbiddenUrl, InvalidUrl, PayloadTooLarge, UpstreamError, UpstreamTimeout
from common.fetch import AddressPolicy, UrlFetcher, is_forbidden_address

FORBIDDEN = [
    "127.0.0.1", "127.255.255.254", "0.0.0.0", "10.0.0.1", "172.16.5.4", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "100.127.255.254", "224.0.0.1", "239.255.255.250",
    "240.0.0.1", "255.255.255.255", "192.0.0.8", "198.18.0.1", "192.0.2.1",
    "::1", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",   # NAT64 of loopback and metadata
    "2002:7f00:1::1", "2002:a9fe:a9fe::",     # 6to4 wrapping loopback and metadata
    "2001:0:4136:e378:8000:63bf:80ff:fffe",   # Teredo whose client is 127.0.0.1
    "::127.0.0.1",                             # IPv4-compatible
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address):
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_global_addresses_are_allowed(address):
    assert not is_forbidden_address(ipaddress.ip_address(address))


def test_allow_list_takes_networks_and_names():
    policy = AddressPolicy(("127.0.0.1", "10.1.0.0/16", "images.internal"))
    assert policy.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert policy.address_allowed(ipaddress.ip_address("10.1.2.3"))
    assert not policy.address_allowed(ipaddress.ip_address("10.2.0.1"))
    assert not policy.address_allowed(ipaddress.ip_address("127.0.0.2"))
    assert policy.name_allowed("Images.Internal.")


@pytest.mark.parametrize("url,error", [
    ("file:///etc/hostname", ForbiddenUrl),
    ("gopher://example.com/", ForbiddenUrl),
    ("ftp://example.com/x.jpg", ForbiddenUrl),
    ("data:image/png;base64,iVBORw0KGgo=", ForbiddenUrl),
    ("javascript:alert(1)", ForbiddenUrl),
    ("example.com/x.jpg", InvalidUrl),
    ("http://", InvalidUrl),
    ("http://user:pw@example.com/x.jpg", InvalidUrl),
    ("http://example.com:99999/", InvalidUrl),
    ("http://exa mple.com/", InvalidUrl),
    ("http://example.com/" + "a" * 3000, InvalidUrl),
    ("", InvalidUrl),
    ("http://169.254.169.254/latest/meta-data/", ForbiddenUrl),
    ("http://[::ffff:127.0.0.1]/", ForbiddenUrl),
    ("http://[::1]:80/", ForbiddenUrl),
    ("http://0.0.0.0/", ForbiddenUrl),
    ("http://10.0.0.1/", ForbiddenUrl),
    ("http://100.64.1.1/", ForbiddenUrl),
    ("http://[fe80::1%25eth0]/", ForbiddenUrl),
])
def test_url_form_checked_without_connecting(url, error):
    with pytest.raises(error):
        UrlFetcher().check_url(url)


@pytest.fixture
def forbidden_server():
    """A server on 127.0.0.2, outside the allow-list: it must never receive a request."""
    server = ws.Recorder("127.0.0.2", {"/secret": ws.body(ig.jpeg())})
    yield server
    server.close()


@pytest.fixture
def allowed_server(forbidden_server):
    routes = {
        "/red.jpg": ws.body(ig.jpeg(ig.RED)),
        "/text": ws.body(b"not an image", "text/plain"),
        "/missing-length": ws.endless(),
        "/to-forbidden": ws.redirect(forbidden_server.base + "/secret"),
        "/to-metadata": ws.redirect("http://169.254.169.254/latest/meta-data/"),
        "/to-file": ws.redirect("file:///etc/hostname"),
        "/hop1": ws.redirect("/hop2"), "/hop2": ws.redirect("/hop3"),
        "/hop3": ws.redirect("/red.jpg"), "/hop0": ws.redirect("/hop1"),
        "/slow": ws.trickle(ig.jpeg(), 0.5),
        "/error": ws.body(b"boom", "text/plain", status=500),
    }
    server = ws.Recorder("127.0.0.1", routes)
    yield server
    server.close()


@pytest.fixture
def fetcher():
    return UrlFetcher(allow_hosts=("127.0.0.1",), max_bytes=1024 * 1024, timeout=3.0)


def test_download_from_allowed_server(fetcher, allowed_server):
    assert fetcher.fetch(allowed_server.base + "/red.jpg") == ig.jpeg(ig.RED)


def test_redirects_followed_up_to_the_limit(fetcher, allowed_server):
    assert fetcher.fetch(allowed_server.base + "/hop1") == ig.jpeg(ig.RED)  # 3 redirects
    with pytest.raises(UpstreamError):
        fetcher.fetch(allowed_server.base + "/hop0")  # 4 redirects


@pytest.fixture
def loopback_server():
    """A server on 127.0.0.1 that a fetcher without an allow-list must never reach."""
    server = ws.Recorder("127.0.0.1", {"/secret": ws.body(ig.jpeg())})
    yield server
    server.close()


@pytest.mark.parametrize("name", [
    "127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "localhost",
    "LocalHost", "[::1]", "[::ffff:127.0.0.1]", "0.0.0.0", "127.000.000.001",
])
def test_loopback_spellings_are_refused(name, loopback_server):
    fetcher = UrlFetcher(timeout=2.0)
    port = loopback_server.server_address[1]
    with pytest.raises(ForbiddenUrl):
        fetcher.fetch(f"http://{name}:{port}/secret")
    assert loopback_server.hits == []


def test_address_outside_the_allow_list_is_refused(forbidden_server):
    fetcher = UrlFetcher(allow_hosts=("127.0.0.1/32",), timeout=2.0)
    with pytest.raises(ForbiddenUrl):
        fetcher.fetch(forbidden_server.base + "/secret")
    assert forbidden_server.hits == []


def test_redirect_to_forbidden_address_is_refused(fetcher, allowed_server, forbidden_server):
    with pytest.raises(ForbiddenUrl):
        fetcher.fetch(allowed_server.base + "/to-forbidden")
    assert allowed_server.hits == ["/to-forbidden"]
    assert forbidden_server.hits == []


@pytest.mark.parametrize("path", ["/to-metadata", "/to-file"])
def test_redirect_to_metadata_or_file_is_refused(fetcher, allowed_server, path):
    with pytest.raises(ForbiddenUrl):
        fetcher.fetch(allowed_server.base + path)


def test_body_over_the_cap_is_413(allowed_server):
    fetcher = UrlFetcher(allow_hosts=("127.0.0.1",), max_bytes=100_000, timeout=5.0)
    with pytest.raises(PayloadTooLarge):
        fetcher.fetch(allowed_server.base + "/missing-length")
    small = UrlFetcher(allow_hosts=("127.0.0.1",), max_bytes=100)
    with pytest.raises(PayloadTooLarge):
        small.fetch(allowed_server.base + "/red.jpg")  # Content-Length says too much


def test_slow_server_hits_the_total_deadline(allowed_server):
    fetcher = UrlFetcher(allow_hosts=("127.0.0.1",), timeout=1.5)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        fetcher.fetch(allowed_server.base + "/slow")
    assert time.monotonic() - started < 3.0  # deadline + one read, not per-read timeouts


def test_remote_errors_are_502(fetcher, allowed_server):
    with pytest.raises(UpstreamError):
        fetcher.fetch(allowed_server.base + "/error")
    with pytest.raises(UpstreamError):
        fetcher.fetch(allowed_server.base + "/nothing-here")


def test_connection_refused_is_502(fetcher):
    with pytest.raises(UpstreamError):
        fetcher.fetch("http://127.0.0.1:9/")  # discard port, nothing listens
