"""common/keys.py and scripts/api_key.py: parsing API_KEYS and API_KEYS_FILE (errors that never
quote a key), authenticate's constant-time path, and rotation by re-reading the file."""
import hashlib
import io
import os
import sys

import pytest

from common import keys as keys_module
from common.config import Config, ConfigError
from common.keys import (
    MAX_KEY_LENGTH,
    KeyConfigError,
    KeyRing,
    file_line,
    hash_key,
    parse_file_text,
    parse_inline,
)
from common.web.auth import presented_key, scope_for
from common.clients import client_address
from scripts import api_key

SECRET = "s3cret-Qw8Er5Ty2Ui9Op"


def test_inline_keys_are_parsed_and_hashed():
    entries = parse_inline("ci:k3y-one:classify,ops:k3y-two:classify+feedback+admin")
    assert [e.name for e in entries] == ["ci", "ops"]
    assert entries[0].digest == hashlib.sha256(b"k3y-one").digest()
    assert entries[1].scopes == {"classify", "feedback", "admin"}
    assert parse_inline(f"x:{SECRET}:with:colons:metrics")[0].digest == \
        hashlib.sha256(f"{SECRET}:with:colons".encode()).digest()


@pytest.mark.parametrize("raw,words", [
    (f"ci:{SECRET}:classfy", "entry 1"),
    (f"ci:{SECRET}:", "entry 1"),
    (f"{SECRET}", "entry 1"),
    (f"ci:{SECRET}", "entry 1"),
    (f"ok:k:classify,ci:{SECRET} with space:classify", "entry 2"),
    (f"bad name:{SECRET}:classify", "entry 1"),
    (f"ci:{SECRET}:classify:{SECRET}", "entry 1"),  # the key where the scopes go
    (f"{SECRET}:classify:ci", "entry 1"),  # fields swapped: the "name" is the key
    (f"ci:{'k' * (MAX_KEY_LENGTH + 1)}:classify", "entry 1"),
    (f"ci:{SECRET}:classify,ci:other:admin", "used twice"),
    (f"ci:{SECRET}:classify,cd:{SECRET}:admin", "same key"),
])
def test_malformed_api_keys_stop_start_up_without_quoting_the_key(raw, words):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"API_KEYS": raw})
    message = str(caught.value)
    assert "API_KEYS" in message and words in message
    assert SECRET not in message and "kkkk" not in message


def test_the_file_holds_digests_comments_and_blank_lines():
    text = (f"# rotated 2024-05-01\n\nci:sha256:{hash_key(SECRET)}:classify\n"
            f"  ops:sha256:{hash_key('other')}:admin+feedback  \n")
    entries = parse_file_text(text)
    assert [(e.name, sorted(e.scopes)) for e in entries] == [
        ("ci", ["classify"]), ("ops", ["admin", "feedback"])]


@pytest.mark.parametrize("line", [
    f"ci:{SECRET}:classify",  # a plain key pasted by mistake
    f"ci:sha256:{hash_key(SECRET)[:-1]}:classify",
    f"ci:sha256:{hash_key(SECRET).upper()}:classify",
    f"ci:md5:{hash_key(SECRET)}:classify",
    f"ci:sha256:{hash_key(SECRET)}:root",
    f"{SECRET}:sha256:{hash_key(SECRET)}:nope",
])
def test_malformed_file_lines_name_the_line_only(line):
    with pytest.raises(KeyConfigError) as caught:
        parse_file_text(f"# header\n{line}\n")
    assert "line 2" in str(caught.value)
    assert SECRET not in str(caught.value) and hash_key(SECRET) not in str(caught.value)


def test_authenticate_finds_the_entry_and_refuses_everything_else():
    ring = KeyRing(f"ci:{SECRET}:classify,ops:other-key:admin")
    assert ring.enabled and ring.authenticate(SECRET).name == "ci"
    assert ring.authenticate("other-key").name == "ops"
    for bad in (None, "", SECRET[:-1], SECRET + "x", SECRET.upper(), " " + SECRET,
                "k" * 10_000, "clé", "\x00" + SECRET, SECRET + "\n"):
        assert ring.authenticate(bad) is None, repr(bad)
    assert not KeyRing().enabled


def test_authenticate_compares_every_digest_in_constant_time(monkeypatch):
    """No early exit: one SHA-256 of at most MAX_KEY_LENGTH characters and one compare_digest
    per stored key, whatever the presented key shares with a real one, or when it is too long
    to be a key."""
    ring = KeyRing(",".join(f"k{i}:{SECRET}{i}:classify" for i in range(5)))
    compared, hashed = [], []
    real_compare, real_sha = keys_module.hmac.compare_digest, keys_module.hashlib.sha256
    monkeypatch.setattr(keys_module.hmac, "compare_digest",
                        lambda a, b: compared.append(1) or real_compare(a, b))
    monkeypatch.setattr(keys_module.hashlib, "sha256",
                        lambda data=b"": hashed.append(len(data)) or real_sha(data))
    for presented in (f"{SECRET}0", f"{SECRET}9", "x", "y" * 100_000, None):
        compared.clear()
        hashed.clear()
        ring.authenticate(presented)
        assert len(compared) == 5, presented
        assert all(n <= MAX_KEY_LENGTH for n in hashed)


def test_the_file_is_re_read_when_it_changes_and_a_broken_one_keeps_the_last_keys(tmp_path,
                                                                                   caplog):
    path = tmp_path / "keys.txt"
    path.write_text(f"ci:sha256:{hash_key('old-key')}:classify\n")
    now = [0.0]
    ring = KeyRing(path=str(path), clock=lambda: now[0])
    assert ring.authenticate("old-key").name == "ci"
    path.write_text(f"ci:sha256:{hash_key('new-key')}:classify\n")
    assert ring.authenticate("new-key") is None  # looked at once a second at most
    now[0] += 1.5
    assert ring.authenticate("new-key").name == "ci"
    assert ring.authenticate("old-key") is None
    for broken in (f"ci:{SECRET}:classify\n".encode(), b"\xff\xfe"):
        path.write_bytes(broken)
        now[0] += 1.5
        assert ring.authenticate("new-key").name == "ci"
    os.remove(path)
    now[0] += 1.5
    assert ring.authenticate("new-key").name == "ci"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 3 and all("API_KEYS_FILE" in e for e in errors)
    assert not any(SECRET in e for e in errors)


def test_a_missing_or_broken_file_at_start_up_is_an_error(tmp_path):
    with pytest.raises(KeyConfigError, match="API_KEYS_FILE"):
        KeyRing(path=str(tmp_path / "absent"))
    (tmp_path / "k").write_text(f"ci:{SECRET}:classify\n")
    with pytest.raises(KeyConfigError) as caught:
        KeyRing(path=str(tmp_path / "k"))
    assert SECRET not in str(caught.value)


def test_api_key_script_makes_a_key_and_its_line(capsys, monkeypatch):
    assert api_key.main(["--name", "ci", "--scopes", "feedback+classify"]) == 0
    out, err = capsys.readouterr()
    key = err.strip().rsplit(" ", 1)[-1]
    assert len(key) >= 43
    assert out.strip() == file_line("ci", key, ["classify", "feedback"])
    assert parse_file_text(out)[0].digest == hashlib.sha256(key.encode()).digest()
    monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + "\n"))
    assert api_key.main(["--name", "ci", "--hash"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"ci:sha256:{hash_key(SECRET)}:classify" and not err
    monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + " x"))
    assert api_key.main(["--name", "ci", "--hash"]) == 2
    assert SECRET not in capsys.readouterr().err
    assert api_key.main(["--name", "ci", "--scopes", "root"]) == 2


# -- the web side's plain functions (common/web/auth.py) ---------------------------------------
@pytest.mark.parametrize("path,metrics_auth,scope", [
    ("/healthz", False, None), ("/readyz", True, None), ("/v2/health/ready", False, None),
    ("/", False, None), ("/static/app.js", False, None), ("/openapi.json", False, None),
    ("/metrics", False, None), ("/metrics", True, "metrics"),
    ("/classify", False, "classify"), ("/models/x/versions/2/classify", False, "classify"),
    ("/model", False, "classify"), ("/v1/models/x:predict", False, "classify"),
    ("/v2/models/x/infer", False, "classify"), ("/v2", False, "classify"),
    ("/feedback", False, "feedback"), ("/v2/repository/index", False, "admin"),
    ("/v2/repository/models/x/load", False, "admin"), ("/nope", False, "classify"),
    ("/healthz/", False, "classify"), ("/feedbackx", False, "classify"),
])
def test_scope_for(path, metrics_auth, scope):
    assert scope_for(path, metrics_auth) == scope


def test_presented_key():
    from werkzeug.datastructures import Headers
    assert presented_key(Headers({"Authorization": "Bearer abc"})) == ("abc", None)
    assert presented_key(Headers({"authorization": "BEARER abc"})) == ("abc", None)
    assert presented_key(Headers({"X-API-Key": " abc "})) == ("abc", None)
    assert presented_key(Headers()) == (None, "missing")
    for bad in ([("Authorization", "Bearer")], [("Authorization", "Token abc")],
                [("Authorization", "Bearer a b")], [("X-API-Key", "")],
                [("Authorization", "Bearer a"), ("X-API-Key", "a")],
                [("X-API-Key", "a"), ("X-API-Key", "a")]):
        assert presented_key(Headers(bad)) == (None, "malformed"), bad


def test_client_address_believes_forwarded_for_only_from_trusted_proxies():
    import ipaddress
    trusted = [ipaddress.ip_network("10.0.0.0/8")]
    # (the audit trail and the access log name the address as the fair share finds it)
    trusted = tuple(trusted)
    assert client_address("1.2.3.4", ["5.6.7.8"], trusted) == "1.2.3.4"
    assert client_address("10.0.0.2", ["9.9.9.9, 5.6.7.8, 10.0.0.3"], trusted) == "5.6.7.8"
    assert client_address("10.0.0.2", ["junk"], trusted) == "10.0.0.2"
    assert client_address("10.0.0.2", ["5.6.7.8"], ()) == "10.0.0.2"
    assert client_address("10.0.0.2", ["2001:db8::1:2"], trusted) == "2001:db8::1:2"
    assert client_address("10.0.0.2", ["2001:db8::1:2"], trusted, grouped=True) == \
        "2001:db8::/64"
