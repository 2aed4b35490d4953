"""Who is asking, for the fair share (``common/fairshare.py``): :func:`client_id`, and the
address the access log and the audit trail name (:func:`request_address`), from Flask's request
by the rules of ``common/clients.py`` (shared with gRPC).

A request that carried a valid API key is its key's client (``"key:<name>"``; the key check in
``auth.py`` sets ``g.key_name``); any other is its address's (``"addr:<ip>"``).
"""
from __future__ import annotations

from typing import Iterable

from flask import g, request

from common.clients import client_address, client_name, networks


def client_id(trusted_proxies: Iterable[str] = ()) -> str:
    """This request's client: ``"key:<name>"`` when it carried a valid key, else
    ``"addr:<ip>"`` (``X-Forwarded-For`` believed only from ``trusted_proxies``)."""
    return client_name(g.get("key_name"), request.remote_addr,
                       request.headers.getlist("X-Forwarded-For"), tuple(trusted_proxies))


def request_address(trusted_proxies: Iterable[str] = ()) -> str:
    """This request's client address as the access log and the audit trail name it."""
    return client_address(request.remote_addr, request.headers.getlist("X-Forwarded-For"),
                          networks(tuple(trusted_proxies)))
