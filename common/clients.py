"""Who is asking, by address, for the fair share (``common/fairshare.py``), the access log
and the audit trail: the rules HTTP (``web/clients.py``) and gRPC (``rpc/calls.py``) share.

The address is the peer's, unless the peer is one of ``TRUSTED_PROXIES``: then it is the
right-most address of ``X-Forwarded-For`` (HTTP header or gRPC metadata) that is not itself a
trusted proxy (the one the outermost trusted proxy saw). ``X-Forwarded-For`` from anyone else
is ignored: a client cannot spoof its way into another client's share, or out of its own. An
IPv6 client counts by its /64 (one subscriber's usual allocation), so that one host cannot take
a share per address of its network. A client is ``"key:<name>"`` when it presented a valid API
key, else ``"addr:<ip>"`` (:func:`client_name`).

Bounded parsing: only the last :data:`MAX_HEADER_CHARS` characters of the header(s) and the
last :data:`MAX_HOPS` hops are read; a malformed hop (not an IP address) ends the walk and the
peer's address is used, as with no header at all. No web framework.
"""
from __future__ import annotations

import functools
import ipaddress

MAX_HEADER_CHARS = 2048  # of X-Forwarded-For read, from the right
MAX_HOPS = 32  # hops of X-Forwarded-For looked at, from the right

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_name(key_name: str | None, remote: str | None, forwarded_for: list[str],
                trusted_proxies: tuple[str, ...]) -> str:
    """The fair share's client: ``"key:<name>"`` for a valid key, else ``"addr:<ip>"`` (an IPv6
    address by its /64), the address as :func:`client_address` finds it."""
    if key_name:
        return f"key:{key_name}"
    return "addr:" + client_address(remote, forwarded_for, networks(tuple(trusted_proxies)),
                                    grouped=True)


def client_address(remote: str | None, forwarded_for: list[str],
                   trusted: tuple[_Network, ...], grouped: bool = False) -> str:
    """The client's address: ``remote`` (the peer's), or when the peer is a trusted proxy the
    right-most hop of ``forwarded_for`` (every ``X-Forwarded-For`` header, in order) that is
    not a trusted proxy; ``"-"`` without a peer address. ``grouped``: an IPv6 address as its
    /64 (:func:`_normalised`: one host cannot take a share per address)."""
    peer = _parse(remote)
    if peer is None:
        return "-"
    shown = _normalised if grouped else str
    if not trusted or not forwarded_for or not _within(peer, trusted):
        return shown(peer)
    joined = ",".join(forwarded_for)
    tail = joined[-MAX_HEADER_CHARS:]
    hops = tail.split(",")
    if len(tail) < len(joined):
        hops = hops[1:]  # the first may be cut in the middle
    for hop in reversed(hops[-MAX_HOPS:]):
        address = _parse(hop.strip())
        if address is None:
            return shown(peer)  # malformed: ignore the header
        if not _within(address, trusted):
            return shown(address)
    return shown(peer)  # every hop is a trusted proxy


@functools.lru_cache(maxsize=8)
def networks(items: tuple[str, ...]) -> tuple[_Network, ...]:
    """``TRUSTED_PROXIES`` (addresses or networks, validated by config.py) as networks."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def _parse(text: str | None):
    if not text or len(text) > 45:  # the longest IPv6 text form
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _within(address, trusted: tuple[_Network, ...]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def _normalised(address) -> str:
    """An IPv4 address as written; an IPv6 one as its /64 network."""
    if address.version == 6:
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)
