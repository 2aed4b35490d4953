"""Triton's model repository extension over REST, ``/v2/repository``, over the DataPlane that
``blueprint(dataplane)`` is handed (the ``admin`` scope when API keys are on: ``auth.SCOPED``).

* ``POST /v2/repository/index`` (body empty or ``{"ready": bool}``): a JSON list, one entry a
  version on disk or served, ``{"name", "version": "<n>", "state", "reason"}``; ``state`` is
  Triton's: ``READY``, ``LOADING`` or ``UNAVAILABLE`` (failed, hung, stopping, unloaded by
  request, or not chosen by the version policy: ``reason`` says which). ``"ready": true``
  lists only the ``READY`` ones.
* ``POST /v2/repository/models/{m}/load`` (body empty or ``{"parameters": {...}}``): serve
  ``m`` again (and scan the repository now); answered ``200 {}`` once every worker has loaded
  it, 400 with the reason when it failed to load, 404 when the repository has no such model.
  The ``config`` and ``file:...`` parameters (a configuration or files overriding the model
  folder's) are refused (400): a model is loaded from its folder as published.
* ``POST /v2/repository/models/{m}/unload`` (body empty or ``{"parameters":
  {"unload_dependents": bool}}``; a model here has no dependents): every version of ``m``
  stops serving in every worker until it is loaded again; ``200 {}``.

Bodies are at most ``MAX_BODY`` bytes. Each load or unload request is an audit record
(``model_load_requested`` / ``model_unload_requested``, with the key's name and the outcome).
Errors are ``{"error": "message"}`` (400, 404, 413, 503).
"""
from __future__ import annotations

from flask import Blueprint, jsonify

from common.dataplane import DataPlane
from common.errors import ApiError, InvalidParameter
from common.web import auth, error_handlers
from common.web.binding import Views
from common.web.protocols.base import json_object
from common.web.routes import body_bytes

#: The largest body taken (a request here carries a few parameters).
MAX_BODY = 64 * 1024
#: The dataplane's states -> Triton's (anything else is UNAVAILABLE).
STATES = {"ready": "READY", "loading": "LOADING"}

views = Views()


def blueprint(dataplane: DataPlane) -> Blueprint:
    """The ``/v2/repository`` routes over ``dataplane``, answering errors in the protocol's
    shape."""
    bp = Blueprint("repository", __name__, url_prefix="/v2/repository")
    error_handlers.install_handler(bp, "message")
    return views.bind(bp, dataplane)


@views.post("/index")
def index(dataplane: DataPlane):
    body = _body(allowed={"ready"})
    ready_only = body.get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidParameter("'ready' must be true or false")
    entries = [{"name": e["name"], "version": str(e["version"]),
                "state": STATES.get(e["state"], "UNAVAILABLE"), "reason": e["reason"]}
               for e in dataplane.repository_index()]
    return jsonify([e for e in entries if e["state"] == "READY" or not ready_only])


@views.post("/models/<name>/load")
def load(dataplane: DataPlane, name):
    parameters = _parameters(_body(allowed={"parameters"}))
    overrides = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if overrides:
        raise InvalidParameter(f"the load parameter {overrides[0][:60]!r} is not supported: a "
                               "model is loaded from its folder in the repository as published")
    _audited("model_load_requested", name, lambda: dataplane.load_model(name))
    return jsonify({})


@views.post("/models/<name>/unload")
def unload(dataplane: DataPlane, name):
    parameters = _parameters(_body(allowed={"parameters"}))
    if not isinstance(parameters.get("unload_dependents", False), bool):
        raise InvalidParameter("'unload_dependents' must be true or false")
    _audited("model_unload_requested", name, lambda: dataplane.unload_model(name))
    return jsonify({})


def _audited(event: str, name: str, action) -> None:
    """Run ``action``, then write ``event``'s audit record with its outcome (``ok`` or the
    error's code)."""
    outcome = "error"
    try:
        action()
        outcome = "ok"
    except ApiError as err:
        outcome = err.code
        raise
    finally:
        auth.audit(event, model=name, outcome=outcome)


def _body(allowed: set[str]) -> dict:
    """The request's JSON object (``{}`` for an empty body); 400 for anything else or a field
    not in ``allowed``, 413 past ``MAX_BODY``."""
    raw = body_bytes(MAX_BODY)
    if not raw.strip():
        return {}
    body = json_object(raw)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidParameter(f"unexpected field {unknown[0][:60]!r}; expected "
                               f"{' or '.join(repr(a) for a in sorted(allowed))}")
    return body


def _parameters(body: dict) -> dict:
    """The body's ``parameters`` object (``{}`` when absent); 400 when it is not an object."""
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidParameter("'parameters' must be a JSON object")
    return parameters
