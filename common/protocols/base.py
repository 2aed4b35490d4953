"""What both protocol adapters need: the model a URL names, a version's number, base64 and
JSON-number tensors checked into numpy, and the request and response plumbing. Names and
versions from a URL are looked up in the registry, never used as paths."""
from __future__ import annotations

import base64
import binascii
import json
import re

import numpy as np
from flask import current_app, g, request

from ..errors import BadRequest, ImageTooLarge, InvalidParameter, ModelNotFound
from ..registry import Route
from ..served import ServedModel
from ..service import Service

_NUMBER = re.compile(r"^[0-9]{1,18}$")


def service() -> Service:
    return Service.of(current_app)


def route(name: str, version: str | None = None, label: str | None = None) -> Route:
    """The Route a protocol URL names. A version that is not a number names no version (404)."""
    if version is None:
        return Route(name, None, label)
    if not _NUMBER.match(version):
        raise ModelNotFound(f"model {name!r} has no version {version[:40]!r}")
    return Route(name, int(version), label)


def version_number(served: ServedModel) -> int:
    """The number a served version has in the registry: a repository's version folder, the
    version ``MODEL_PATH``'s model is served as, or 1 for a model given in memory."""
    return int(served.identity[1]) if served.identity else 1


def read_json(raw: bytes) -> dict:
    """A request body that must be one JSON object (400 otherwise). NaN and Infinity parse, as
    both protocols allow them; :func:`float_tensor` refuses them where a model would see them."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {str(exc)[:120]}") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def decode_b64(text, what: str) -> bytes:
    """Standard or URL-safe base64 (padding optional) -> bytes; 400 when it is not base64."""
    if not isinstance(text, str):
        raise InvalidParameter(f"{what} must be a base64 string, got {type(text).__name__}")
    if len(text) > service().config.max_upload_bytes * 4 // 3 + 4:
        raise ImageTooLarge(f"{what} is larger than the upload limit (MAX_UPLOAD_MB)")
    cleaned = text.strip().replace("\n", "").replace("\r", "")
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(padded.encode("ascii"))
        return base64.b64decode(padded.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(f"{what} is not valid base64") from None


def is_b64(value) -> bool:
    """TF Serving's binary value: an object with the one key ``b64``."""
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def float_tensor(data, what: str) -> np.ndarray:
    """JSON numbers, nested or flat -> float32 array; 400 for anything else (strings, booleans,
    ragged lists, NaN or infinities: a model's answer to those is not JSON)."""
    try:
        array = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InvalidParameter(f"{what} is not a rectangular list of numbers") from None
    if array.dtype.kind not in "iuf" or array.size == 0:
        raise InvalidParameter(f"{what} must be a non-empty (nested) list of numbers")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidParameter(f"{what} has NaN or infinite values (or numbers too large for "
                               f"float32)")
    return array


def note(classifier, source: str) -> None:
    """What the access log line says about this request (views._finish_request)."""
    g.model = classifier.describe()
    g.source = source


def body_bytes() -> bytes:
    """The request body (413 past the upload limit, via werkzeug's MAX_CONTENT_LENGTH)."""
    return request.get_data(cache=False)


__all__ = ["service", "route", "version_number", "read_json", "decode_b64", "is_b64",
           "float_tensor", "note", "body_bytes"]
