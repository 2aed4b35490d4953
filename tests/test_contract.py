"""The OpenAPI document is the contract: served at /openapi.json, complete, and the live server
keeps it under schemathesis' generated requests (no 5xx, every response conforms)."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import requests
from helpers import ROOT
from reliability import record

pytestmark = pytest.mark.server

SPEC = os.path.join(ROOT, "common", "openapi.json")
# `make test` runs a fixed seed; `make test-long` sets more examples and a fresh seed.
EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "100"))
SEED = os.environ.get("CONTRACT_SEED", "1")


def test_openapi_is_served_and_documents_every_route(demo_server, app):
    response = requests.get(demo_server.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    with open(SPEC) as fh:
        spec = json.load(fh)
    assert response.json() == spec
    assert spec["openapi"].startswith("3.")
    # every Flask route and method is in the document, and back
    routes = {(re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(rule.rule)), method.lower())
              for rule in app.url_map.iter_rules()
              if rule.endpoint != "static"
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert routes == documented


def test_schemathesis_finds_nothing(demo_server, tmp_path):
    """Every built-in check but positive_data_acceptance (tests/contract/schemathesis.toml
    says why); the only 5xx allowed are 502/504 for image URLs whose host does not exist."""
    command = [os.path.join(os.path.dirname(sys.executable), "schemathesis"),
               "--config-file", os.path.join(ROOT, "tests", "contract", "schemathesis.toml"),
               "run", demo_server.url + "/openapi.json",
               "--checks", "all", "--exclude-checks", "positive_data_acceptance",
               "--phases", "examples,coverage,fuzzing", "--max-examples", str(EXAMPLES),
               "--seed", SEED, "--workers", "1", "--request-timeout", "30",
               "--generation-database", "none", "--no-color",
               "--report", "ndjson", "--report-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    summary = [line for line in output.splitlines() if "generated" in line]
    shown = ["schemathesis", "--config-file", "tests/contract/schemathesis.toml", "run",
             "<server>/openapi.json"] + command[5:-4]
    record("contract", {"command": " ".join(shown),
                        "examples_per_operation": EXAMPLES, "seed": SEED,
                        "result": summary[-1].strip() if summary else "",
                        "exit_code": result.returncode})
    assert result.returncode == 0, output[-8000:]


def _raw(server, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(payload)
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.mark.parametrize("payload,status,code", [
    (b"GET /classify?image_url=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
     "uri_too_long"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200))
     + b"\r\n", 431, "headers_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", 431,
     "headers_too_large"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n", 400, "bad_request"),
])
def test_protocol_errors_answered_with_the_json_envelope(demo_server, payload, status, code):
    """Errors gunicorn answers before the app sees the request are JSON too (not HTML)."""
    raw = _raw(demo_server, payload)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].startswith(b"HTTP/1.1 %d " % status), raw[:300]
    assert b"Content-Type: application/json" in head
    assert json.loads(body) == {"error": {"code": code, "message": json.loads(body)["error"][
        "message"], "status": status}}
    assert requests.get(demo_server.url + "/healthz", timeout=5).status_code == 200
