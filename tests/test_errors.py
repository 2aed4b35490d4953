"""One envelope for every error: each ApiError class, werkzeug's own errors, and the unexpected."""
import inspect
import json
import re

import pytest
from helpers import assert_envelope

from common import errors
from common.web import error_handlers

ERROR_CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(c, errors.ApiError)]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_renders_the_envelope(app, cls):
    @app.get(f"/raise-{cls.__name__}")
    def boom():
        raise cls()

    response = app.test_client().get(f"/raise-{cls.__name__}")
    error = assert_envelope(response, cls.status)
    assert error["code"] == cls.code
    if issubclass(cls, errors.ServiceUnavailable):
        assert response.headers["Retry-After"].isdigit()


def test_unexpected_exception_is_500_without_details(app, caplog):
    @app.get("/explode")
    def explode():
        raise RuntimeError("secret internal detail")

    response = app.test_client().get("/explode", headers={"X-Request-ID": "req-123"})
    error = assert_envelope(response, 500)
    assert "secret" not in response.get_data(as_text=True)
    assert error["code"] == "internal_error"
    assert any("req-123" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method,path,status", [
    ("get", "/nope", 404), ("put", "/classify", 405), ("delete", "/healthz", 405),
    ("post", "/readyz", 405), ("get", "/classify", 400), ("post", "/classify", 415),
])
def test_http_errors_render_the_envelope(client, method, path, status):
    response = getattr(client, method)(path)
    assert_envelope(response, status)
    if status == 405:
        assert "GET" in response.headers["Allow"] or "POST" in response.headers["Allow"]


CLIENT_FACING = ["forbidden_url", "invalid_url", "unsupported_media_type", "undecodable_image",
                 "image_too_large", "payload_too_large", "empty_image", "missing_image",
                 "upstream_error", "upstream_timeout", "model_not_ready", "overloaded",
                 "storage_unavailable", "invalid_parameter", "model_timeout", "request_timeout",
                 "model_error"]


def test_every_code_has_plain_words_and_the_page_reads_them_from_the_server(client):
    catalogue = errors.catalogue()
    assert set(catalogue) == {c.code for c in ERROR_CLASSES}
    for code in CLIENT_FACING:  # each with words of its own, not the generic fallback
        assert catalogue[code] and catalogue[code] != errors.ApiError.plain, code
    page = client.get("/").get_data(as_text=True)
    embedded = re.search(r"data-error-messages='([^']*)'", page)
    assert embedded and json.loads(embedded.group(1)) == catalogue


@pytest.mark.parametrize("cls", [errors.UriTooLong, errors.HeadersTooLarge,
                                 errors.MalformedRequest], ids=lambda c: c.__name__)
def test_wire_response_carries_the_same_envelope(cls):
    raw = error_handlers.wire_response(cls())
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {cls.status} ")
    assert "Content-Type: application/json" in lines and "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == cls().to_dict()
