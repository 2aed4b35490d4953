"""Safe download of an image URL.

Rules (DESIGN.md, Limits):
- http and https only, no ``user:password@``, at most ``max_url_length`` characters;
- the host is resolved once, inside the connection; *every* address it resolves to must be global
  unicast (IPv4-mapped, 6to4, NAT64 and Teredo forms are unwrapped and the embedded IPv4 checked
  too; CGNAT, multicast, reserved, loopback, private and link-local are refused), and the socket
  connects to one of exactly those checked addresses, so there is no second lookup to race.
  Because the URL keeps its host name, the Host header and TLS SNI/certificate checks are the
  usual ones;
- redirects are followed by hand, at most ``max_redirects`` hops, each one checked again;
- the body is streamed with a byte cap and a total deadline (each socket read gets the time left,
  not requests' per-read timeout), without content-encoding so a gzip bomb cannot inflate.

``allow_hosts`` names hosts (exact, case-insensitive) or CIDR networks exempt from the address
rules: for tests and private deployments.

The published package requests-hardened was evaluated: it checks only the first address a host
resolves to and has no allow-list of networks, so the guard here is our own, small and at the
connection level like its.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from common.errors import ForbiddenUrl, InvalidUrl, PayloadTooLarge, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Not caught by ipaddress's is_global on every Python version, or global but never a photo host.
_EXTRA_FORBIDDEN = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15",
    "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
    "2001:db8::/32", "2002::/16", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8",
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses carried inside an IPv6 address (mapped, 6to4, Teredo, NAT64, compatible)."""
    if ip.version != 6:
        return []
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # (server, client)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_forbidden_address(ip: IPAddress) -> bool:
    """True unless ``ip`` (and every IPv4 address embedded in it) is global unicast."""
    for candidate in [ip, *embedded_ipv4(ip)]:
        if (not candidate.is_global or candidate.is_multicast or candidate.is_reserved
                or candidate.is_unspecified or candidate.is_loopback or candidate.is_link_local
                or candidate.is_private):
            return True
        if any(candidate.version == net.version and candidate in net for net in _EXTRA_FORBIDDEN):
            return True
    return False


class AddressPolicy:
    """Decides which hosts and addresses a download may connect to."""

    def __init__(self, allow_hosts: tuple[str, ...] = ()):
        self.allow_names = {h.lower().rstrip(".") for h in allow_hosts if "/" not in h}
        self.allow_networks = []
        for item in allow_hosts:
            try:
                self.allow_networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                continue  # a host name, kept in allow_names

    def name_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.allow_names

    def address_allowed(self, ip: IPAddress) -> bool:
        if any(ip.version == net.version and ip in net for net in self.allow_networks):
            return True
        return not is_forbidden_address(ip)

    def check_literal(self, host: str) -> None:
        """Refuse an IP-literal host at once, before any connection (403)."""
        try:
            ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
        except ValueError:
            return  # a name (or a legacy numeric form): checked after resolution
        if not self.name_allowed(host) and not self.address_allowed(ip):
            raise ForbiddenUrl(f"the address {ip} is not allowed")

    def resolve(self, host: str, port: int) -> list[tuple]:
        """Resolve ``host`` once; every address must pass. Returns getaddrinfo tuples."""
        host = host.strip("[]")
        infos = socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
        if not infos:
            raise socket.gaierror(f"no address for {host}")
        if self.name_allowed(host):
            return infos
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if not self.address_allowed(ip):
                log.warning("refused download from %s: resolves to %s", host, ip)
                raise ForbiddenUrl(f"the host {host} resolves to a forbidden address")
        return infos


class _GuardedConnectionMixin:
    """urllib3 connection that resolves through the policy and connects to a checked address."""

    policy: AddressPolicy

    def _new_conn(self) -> socket.socket:
        try:
            infos = self.policy.resolve(self._dns_host, self.port)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        last_error: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                return sock
            except socket.timeout as exc:
                sock.close()
                raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from exc
            except OSError as exc:
                sock.close()
                last_error = exc
        raise NewConnectionError(self, f"failed to connect to {self.host}: {last_error}")


def _guarded_adapter(policy: AddressPolicy) -> HTTPAdapter:
    http_conn = type("GuardedHTTPConnection", (_GuardedConnectionMixin, HTTPConnection),
                     {"policy": policy})
    https_conn = type("GuardedHTTPSConnection", (_GuardedConnectionMixin, HTTPSConnection),
                      {"policy": policy})
    pools = {
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }
    adapter = HTTPAdapter(max_retries=0, pool_connections=1, pool_maxsize=1)
    adapter.poolmanager.pool_classes_by_scheme = pools
    return adapter


class UrlFetcher:
    """Downloads one URL at a time under the rules above; safe to share between threads."""

    def __init__(self, *, max_bytes: int = 16 * 1024 * 1024, timeout: float = 10.0,
                 connect_timeout: float = 3.0, max_redirects: int = 3,
                 max_url_length: int = 2048, allow_hosts: tuple[str, ...] = (),
                 user_agent: str = "image-classifier-service/1.0"):
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_redirects = max_redirects
        self.max_url_length = max_url_length
        self.policy = AddressPolicy(allow_hosts)
        self.user_agent = user_agent

    def check_url(self, url: str) -> str:
        """Validate a URL's form and, for an IP literal, its address; returns the URL."""
        if not url or not url.strip():
            raise InvalidUrl("image_url is empty")
        if len(url) > self.max_url_length:
            raise InvalidUrl(f"image_url is longer than {self.max_url_length} characters")
        if any(ord(c) < 33 or ord(c) == 127 for c in url):
            raise InvalidUrl("image_url contains spaces or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidUrl(f"image_url is malformed: {exc}") from None
        scheme = parts.scheme.lower()
        if not scheme:
            raise InvalidUrl("image_url needs an http:// or https:// scheme")
        if scheme not in ("http", "https"):
            raise ForbiddenUrl(f"the scheme {scheme!r} is not allowed; use http or https")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise InvalidUrl("credentials in image_url are not accepted")
        if not parts.hostname:
            raise InvalidUrl("image_url has no host")
        if port == 0:
            raise InvalidUrl("image_url has an invalid port")
        self.policy.check_literal(parts.hostname)
        return url

    def fetch(self, url: str) -> bytes:
        """Download ``url`` and return its body; raises an ApiError on any rule or failure."""
        deadline = time.monotonic() + self.timeout
        session = requests.Session()
        session.trust_env = False  # no proxies or netrc from the environment
        adapter = _guarded_adapter(self.policy)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        headers = {"User-Agent": self.user_agent, "Accept": "image/*",
                   "Accept-Encoding": "identity"}
        try:
            for hop in range(self.max_redirects + 1):
                self.check_url(url)
                response = self._request(session, url, headers, deadline)
                if response.is_redirect:
                    location = response.headers.get("Location", "")
                    response.close()
                    if hop == self.max_redirects:
                        raise UpstreamError(f"more than {self.max_redirects} redirects")
                    url = urljoin(url, location)
                    continue
                with response:
                    if response.status_code != 200:
                        raise UpstreamError(
                            f"the remote server answered HTTP {response.status_code}")
                    return self._read_body(response, deadline)
            raise UpstreamError("too many redirects")  # unreachable: the loop returns or raises
        finally:
            session.close()

    def _request(self, session, url, headers, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout(f"the download took longer than {self.timeout:g} s")
        try:
            return session.get(url, headers=headers, stream=True, allow_redirects=False,
                               timeout=(min(self.connect_timeout, remaining), remaining))
        except requests.exceptions.Timeout:
            raise UpstreamTimeout("the remote server did not answer in time") from None
        except requests.exceptions.InvalidURL as exc:
            raise InvalidUrl(f"image_url is malformed: {exc}") from None
        except requests.exceptions.SSLError:
            raise UpstreamError("TLS handshake with the remote server failed") from None
        except requests.exceptions.ConnectionError as exc:
            if _caused_by(exc, NameResolutionError):
                raise UpstreamError("the host name could not be resolved") from None
            raise UpstreamError("could not connect to the remote server") from None
        except requests.exceptions.RequestException as exc:
            raise UpstreamError(f"the download failed: {type(exc).__name__}") from None

    def _read_body(self, response, deadline) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(f"the remote file is larger than {self.max_bytes} bytes")
        chunks, total = [], 0
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeout(f"the download took longer than {self.timeout:g} s")
            if sock is not None:
                sock.settimeout(remaining)
            try:
                chunk = response.raw.read1(64 * 1024)  # what has arrived, not a full 64 KiB
            except Exception as exc:  # socket timeouts and protocol errors, wrapped by urllib3
                if time.monotonic() >= deadline or _caused_by(exc, TimeoutError):
                    raise UpstreamTimeout(
                        f"the download took longer than {self.timeout:g} s") from None
                raise UpstreamError("the remote server broke off the download") from None
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.max_bytes:
                raise PayloadTooLarge(f"the remote file is larger than {self.max_bytes} bytes")
            chunks.append(chunk)


def _caused_by(exc: BaseException, kind: type) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__ or (exc.args[0] if exc.args and
                                                    isinstance(exc.args[0], BaseException)
                                                    else None)
    return False
