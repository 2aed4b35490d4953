"""One envelope for every error: each ApiError class, werkzeug's own errors, and the unexpected."""
import inspect

import pytest

from common import errors

ERROR_CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(c, errors.ApiError)]


def assert_envelope(response, status):
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "status"}
    assert body["error"]["status"] == status
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.get_data(as_text=True)
    return body["error"]


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
