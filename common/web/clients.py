"""Who is asking, for the fair share (``common/fairshare.py``): :func:`client_id`, and the
address the access log and the audit trail name (:func:`request_address`), from Flask's request
by the rules of ``common/clients.py`` (shared with gRPC); :func:`init_app` moves a connection to
another worker after an answer when the fair share says so (``FairShare.should_move``: its
client would do better there, or it is one of the connections of a client alone on the server
and the workers hold them unevenly).

A request that carried a valid API key is its key's client (``"key:<name>"``; the key check in
``auth.py`` sets ``g.key_name``); any other is its address's (``"addr:<ip>"``).
"""
from __future__ import annotations

from typing import Iterable

from flask import Flask, g, request

from common.clients import client_address, client_name, networks
from common.web.deadlines import MOVE_CONNECTION, movable


def client_id(trusted_proxies: Iterable[str] = ()) -> str:
    """This request's client: ``"key:<name>"`` when it carried a valid key, else
    ``"addr:<ip>"`` (``X-Forwarded-For`` believed only from ``trusted_proxies``)."""
    return client_name(g.get("key_name"), request.remote_addr,
                       request.headers.getlist("X-Forwarded-For"), tuple(trusted_proxies))


def request_address(trusted_proxies: Iterable[str] = ()) -> str:
    """This request's client address as the access log and the audit trail name it."""
    return client_address(request.remote_addr, request.headers.getlist("X-Forwarded-For"),
                          networks(tuple(trusted_proxies)))


def init_app(app: Flask, share, metrics, trusted_proxies: Iterable[str] = ()) -> None:
    """After each answer, ask for the connection to be handed to another worker
    (``MOVE_CONNECTION``) when it can move (``deadlines.movable``) and ``share`` (a
    ``FairShare``, or None when off) says it should move there: the client's next request on
    the same connection is that worker's.
    ``metrics.client_moved`` counts each (``classifier_fair_share_moves_total``)."""
    if share is None:
        return
    trusted = tuple(trusted_proxies)

    @app.after_request
    def move_out_of_a_crowded_worker(response):
        if share.may_move() and movable(request.environ):
            target = share.should_move(client_id(trusted))
            if target is not None:
                request.environ[MOVE_CONNECTION] = target
                metrics.client_moved()
        return response
