"""What both protocol adapters need: the model a URL names, the bounds a
body is checked against before it is parsed (and the input names it may use), base64 and
JSON-number tensors checked into numpy, and the request and response plumbing (answers
compressed as ``Accept-Encoding`` asks). Names and versions from a URL are looked up in the
manager, never used as paths."""
from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flask import Response, g, request

from common import oip
from common.dataplane import DataPlane, Images, Inference
from common.errors import BadRequest, ImageTooLarge, InvalidParameter, TooManyImages
from common.tfserving import MAX_FEATURES
from common.versions.manager import Route
from common.web.clients import client_id
from common.web.routes import body_bytes


def route(name: str, version: str | None = None, label: str | None = None) -> Route:
    """The Route a protocol URL names. A version that is not a number names no version (404)."""
    return oip.route(name, version, label)


MAX_RANK = oip.MAX_RANK
#: Entries of a v2 ``outputs`` list: the model has one output, asked for at most once.
MAX_OUTPUTS = 8
#: JSON objects and strings per image the largest valid body holds (an example with
#: ``MAX_FEATURES`` features, each ``{"b64": ...}`` under a name), and room for the rest of the
#: body (names, parameters, ``context``, ``outputs``).
_PER_IMAGE, _SLACK = 2 * MAX_FEATURES + 2, 256


@dataclass(frozen=True)
class Limits:
    """What the largest valid request can hold: ``max_images`` images
    (``MAX_IMAGES_PER_REQUEST``), each as encoded bytes of at most ``max_upload_bytes`` or as
    a float ``[h, w, 3]`` tensor of the model's ``input_size``. Bodies are checked against it
    before they are parsed, so a request costs a bounded multiple of what a valid one does."""

    max_images: int
    input_size: tuple[int, int]
    max_upload_bytes: int
    #: The names an input may be given under: the model's own input tensor's, and
    #: ``image_bytes`` (encoded images); empty: any name (in-process callers that do not
    #: know the model).
    input_names: tuple[str, ...] = ()

    def check_input_name(self, name, where: str) -> None:
        """400 naming the expected inputs when ``name`` is not one of ``input_names``, as TF
        Serving and Triton refuse an input the signature does not have."""
        if self.input_names and name not in self.input_names:
            expected = " or ".join(repr(n) for n in self.input_names)
            raise InvalidParameter(f"{where}: unexpected input {str(name)[:60]!r}; the model's "
                                   f"inputs are {expected}")

    @property
    def max_tensor_values(self) -> int:
        """Numbers in ``max_images`` float images: ``N * h * w * 3``."""
        h, w = self.input_size
        return self.max_images * h * w * 3

    @property
    def max_json_values(self) -> int:
        """JSON values (numbers and the lists that nest them) a valid body may hold."""
        h, w = self.input_size
        return self.max_tensor_values + self.max_images * (h + 1) * (w + 1) + _SLACK

    @property
    def max_json_objects(self) -> int:
        return self.max_images * _PER_IMAGE + _SLACK

    @property
    def max_json_strings(self) -> int:
        return self.max_images * 2 * _PER_IMAGE + _SLACK


def limits_for(dataplane: DataPlane, target: Route) -> Limits:
    """The limits of a request to ``target``: the settings, and the model's input size."""
    config = dataplane.config
    classifier = dataplane.served(target).classifier
    return Limits(config.max_images_per_request, tuple(classifier.input_size),
                  config.max_upload_bytes,
                  tuple(dict.fromkeys((classifier.input_name, oip.BYTES_INPUT))))


def check_image_count(count: int, limits: Limits, what: str) -> None:
    """400 ``too_many_images`` past ``MAX_IMAGES_PER_REQUEST``, checked on a list's length
    before anything is built per element."""
    if count > limits.max_images:
        raise TooManyImages(f"at most {limits.max_images} images in one request "
                            f"(MAX_IMAGES_PER_REQUEST), got {count} {what}")


def check_json_size(raw: bytes, limits: Limits) -> None:
    """Refuse a body that holds more JSON objects, strings or values than the largest valid
    request (400 ``too_many_images``), by counting bytes before parsing: ``{`` opens an object,
    two ``"`` make a string, and every array element but the first follows a ``,`` (the first
    a ``[``). Base64 holds none of these bytes, so the counts only over-estimate by what free
    text (a caption, an id) holds. Counting costs a few percent of parsing a valid tensor, and
    spares building millions of Python objects for a body that must be refused anyway."""
    found = {"objects": (raw.count(b"{"), limits.max_json_objects),
             "strings": (raw.count(b'"') // 2, limits.max_json_strings),
             "values": (raw.count(b",") + raw.count(b"["), limits.max_json_values)}
    for what, (count, most) in found.items():
        if count > most:
            raise TooManyImages(
                f"the body holds {count} JSON {what}, more than a request of at most "
                f"{limits.max_images} images (MAX_IMAGES_PER_REQUEST) of this model can "
                f"({most})")


def read_json(raw: bytes, limits: Limits) -> dict:
    """A request body that must be one JSON object (400 otherwise), checked by
    :func:`check_json_size` before it is parsed. NaN and Infinity parse, as both protocols
    allow them; :func:`float_tensor` refuses them where a model would see them."""
    check_json_size(raw, limits)
    return json_object(raw)


def json_object(raw: bytes) -> dict:
    """``raw`` parsed, when it is one JSON object; 400 otherwise (not JSON, nested too
    deeply, or another JSON value). The caller bounds ``raw`` first."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {str(exc)[:120]}") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def decode_b64(text, what: str, max_bytes: int) -> bytes:
    """Standard or URL-safe base64 (padding optional) -> bytes; 400 when it is not base64, 413
    when it would decode to more than ``max_bytes`` (the upload limit)."""
    if not isinstance(text, str):
        raise InvalidParameter(f"{what} must be a base64 string, got {type(text).__name__}")
    if len(text) > max_bytes * 4 // 3 + 4:
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


def run(dataplane: DataPlane, target: Route, parse: Callable[[bytes, Limits], Images],
        source: str) -> Inference:
    """One protocol request through the data plane's pipeline: ``parse(body, limits)`` reads
    the body only once the request is admitted, within ``target``'s limits; the access log
    notes the version that served it (``source``: the protocol's name). The request counts
    in its client's fair share (``clients.client_id``)."""
    done = dataplane.infer(lambda: parse(body_bytes(), limits_for(dataplane, target)), target,
                           client=client_id(dataplane.config.trusted_proxies))
    note(done.classifier, source)
    return done


#: Content-Encodings an answer may be compressed with, as the client's Accept-Encoding asks
#: (Triton compresses its answers the same way): zlib's ``wbits`` for each.
ANSWER_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def compressed(response: Response) -> Response:
    """``response`` compressed with the first of gzip or deflate that the request's
    ``Accept-Encoding`` takes (by its quality; none: unchanged), with ``Content-Encoding``
    and ``Vary: Accept-Encoding``. Headers that count bytes of the body
    (``Inference-Header-Content-Length``) keep counting the uncompressed bytes, as Triton's."""
    accepted = request.accept_encodings
    choice = max(ANSWER_ENCODINGS, key=lambda e: accepted[e])
    response.vary.add("Accept-Encoding")
    if accepted[choice] <= 0 or response.direct_passthrough:
        return response
    packer = zlib.compressobj(6, zlib.DEFLATED, ANSWER_ENCODINGS[choice])
    response.set_data(packer.compress(response.get_data()) + packer.flush())
    response.headers["Content-Encoding"] = choice
    return response


def note(classifier, source: str) -> None:
    """What the access log line says about this request (``routes._finish_request``)."""
    g.model = classifier.describe()
    g.source = source


__all__ = ["route", "Limits", "limits_for", "check_image_count",
           "check_json_size", "read_json", "decode_b64", "is_b64", "float_tensor", "note", "run",
           "body_bytes", "compressed", "MAX_RANK", "MAX_FEATURES", "MAX_OUTPUTS"]
