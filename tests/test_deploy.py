"""deploy/: the Kubernetes manifests and nginx configurations checked against the code, and the
compose setup and the pod's proxy run for real.

The manifest tests need no cluster (there is none here): every manifest (and the ConfigMap the
kustomization generates) is validated with ``kubernetes-validate --strict`` against the newest
Kubernetes it knows, and its probe addresses, ports, environment variables, user and timings
are read back and compared with what the code really has (the routes of ``common/web/routes.py``,
``common/config.py``, the Dockerfile and gunicorn.conf.py), so the manifests cannot drift from
the service. The two nginx configurations (compose's and the pod's) are read the same way.

The tests marked ``docker`` (``make test-docker``) check both nginx configurations with the real
nginx (``nginx -t``), run the pod's two containers as the Deployment describes them, and start
compose's nginx with three replicas.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import imagegen as ig
import pytest
import requests
import yaml
from dockerhelp import (
    Container,
    base_image,
    build_image,
    build_nginx_image,
    docker,
    graceful_timeout,
    readable_copy,
    require_engine,
)
from flask import Flask
from helpers import ROOT, config_variables, metric, metric_so_far
from tiny_models import TRAP, save_colour_model

from common import errors
from common.config import Config
from common.keys import file_line, parse_file_text
from common.web.auth import scope_for
from common.web.routes import blueprint

K8S = os.path.join(ROOT, "deploy", "k8s")
COMPOSE = os.path.join(ROOT, "deploy", "compose", "docker-compose.yml")
COMPOSE_NGINX = os.path.join(ROOT, "deploy", "compose", "nginx")
COMPOSE_KEYS = os.path.join(ROOT, "deploy", "compose", "api-keys")
STAR = os.path.join(ROOT, "docs", "examples", "star.png")
#: The key the docker tests' pod and compose stack accept (a test value, not a secret).
TEST_KEY = "deploy-test-key-not-a-secret-0123456789"
KEY = {"X-API-Key": TEST_KEY}
DEFAULTS = Config.from_env({})


def load_yaml(path: str) -> list[dict]:
    with open(path) as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def kustomization() -> dict:
    return load_yaml(os.path.join(K8S, "kustomization.yaml"))[0]


def manifests() -> list[dict]:
    """Every resource of the files the kustomization lists."""
    return [doc for name in kustomization()["resources"]
            for doc in load_yaml(os.path.join(K8S, name))]


def resource(kind: str, name: str | None = None) -> dict:
    """The one resource of ``kind`` (and ``name``, where a kind has several)."""
    found = [doc for doc in manifests() if doc["kind"] == kind
             and (name is None or doc["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def generated_config_map() -> dict:
    """The ConfigMap the kustomization's configMapGenerator makes (without its name's hash)."""
    (generator,) = kustomization()["configMapGenerator"]
    data = {name: open(os.path.join(K8S, name)).read() for name in generator["files"]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
            "data": data}


def pod() -> dict:
    return resource("Deployment")["spec"]["template"]["spec"]


def container() -> dict:
    """The service's container."""
    (box,) = [c for c in pod()["containers"] if c["name"] == "classifier"]
    return box


def proxy() -> dict:
    """The proxy sidecar (a native sidecar: an init container that keeps running)."""
    (box,) = [c for c in pod()["initContainers"] if c["name"] == "proxy"]
    return box


def container_env(box: dict | None = None) -> dict[str, str]:
    return {item["name"]: item["value"] for item in (box or container())["env"]}


def named_port(box: dict, name: str) -> int:
    return next(p["containerPort"] for p in box["ports"] if p["name"] == name)


def routes() -> set[str]:
    """The GET paths the service answers without parameters (from the blueprint, not a list)."""
    app = Flask(__name__)
    app.register_blueprint(blueprint(None))  # the rules only: no request is made
    return {rule.rule for rule in app.url_map.iter_rules()
            if "GET" in rule.methods and not rule.arguments}


def dockerfile() -> str:
    return open(os.path.join(ROOT, "Dockerfile")).read()


def dockerfile_env(name: str) -> str:
    """The value the Dockerfile's ENV gives ``name``."""
    (value,) = re.findall(rf"\b{name}=(\S+)", dockerfile())
    return value


def dockerfile_user() -> str:
    return re.findall(r"^USER\s+(\S+)", dockerfile(), re.M)[-1]


def probe_url(probe: dict) -> tuple[str, int, str]:
    """(host, port, path) that an exec probe's command asks."""
    command = " ".join(probe["exec"]["command"])
    m = re.search(r"http://([^/:']+):(\d+)(/[\w/]*)", command)
    assert m, command
    return m.group(1), int(m.group(2)), m.group(3)


# ---------------------------------------------------------------- nginx configurations, read

NGINX_CONFS = {"compose": os.path.join(COMPOSE_NGINX, "nginx.conf"),
               "pod": os.path.join(K8S, "nginx.conf")}


def nginx_text(which: str) -> str:
    """A configuration without its comments."""
    return re.sub(r"#[^\n]*", "", open(NGINX_CONFS[which]).read())


def nginx_servers(which: str) -> dict[int, str]:
    """listen port -> the text of that server block (blocks found by brace matching)."""
    text, servers = nginx_text(which), {}
    for m in re.finditer(r"\bserver\s*\{", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        block = text[m.start():i]
        servers[int(re.search(r"\blisten\s+(\d+)", block).group(1))] = block
    return servers


def directive(block: str, name: str) -> str | None:
    """The value of a directive of ``block`` itself (not of its locations)."""
    flat = re.sub(r"location[^{]*\{[^{}]*\}", "", block)
    found = re.findall(rf"^\s*{name}\s+([^;]*);", flat, re.M)
    assert len(found) <= 1, (name, found)
    return found[0].strip() if found else None


def seconds(value: str) -> float:
    return float(value.rstrip("s"))


def megabytes(value: str) -> float:
    return float(value.rstrip("mM"))


# ---------------------------------------------------------------- the manifests

def test_every_manifest_is_valid_kubernetes_in_strict_mode(tmp_path):
    files = [os.path.join(K8S, name) for name in kustomization()["resources"]]
    config_map = tmp_path / "configmap.yaml"
    config_map.write_text(yaml.safe_dump(generated_config_map()))
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"),
                           "--strict", "--quiet", *files, str(config_map)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_kustomization_lists_every_manifest_and_the_proxy_configuration():
    on_disk = {n for n in os.listdir(K8S) if n.endswith(".yaml") and n != "kustomization.yaml"}
    assert set(kustomization()["resources"]) == on_disk
    assert sorted(doc["kind"] for doc in manifests()) == sorted([
        "Deployment", "Service", "PersistentVolumeClaim", "PersistentVolumeClaim",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy", "Secret"])
    config_map = generated_config_map()
    volume = next(v for v in pod()["volumes"] if v["name"] == "proxy-config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in proxy()["volumeMounts"] if m["name"] == "proxy-config")
    args = proxy()["args"]
    assert args[args.index("-c") + 1] == mount["mountPath"] + "/nginx.conf"
    assert set(config_map["data"]) == {"nginx.conf", "api-errors.conf"}
    images = {i["name"] for i in kustomization()["images"]}
    assert {container()["image"], proxy()["image"]} <= images


def test_probes_port_and_variables_are_ones_the_service_has():
    box = container()
    env = container_env()
    assert set(env) <= config_variables(), set(env) - config_variables()
    config = Config.from_env(env)  # every value is one the service accepts
    assert box["ports"][0]["containerPort"] == config.port
    assert named_port(box, "grpc-local") == config.grpc_port
    assert re.search(rf"^EXPOSE {config.port} {config.grpc_port}$", dockerfile(), re.M)
    # The pod is ready once gRPC answers through the proxy (grpc.health.v1 of a warm worker).
    assert proxy()["readinessProbe"]["grpc"]["port"] == named_port(proxy(), "grpc")
    paths = routes()
    # The probes ask gunicorn where it listens (on 127.0.0.1, inside the pod).
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        assert probe_url(box[probe]) == (config.host, config.port, path)
        assert path in paths
    assert resource("Deployment")["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/path"] == "/metrics" in paths


def test_gunicorn_is_reachable_only_through_the_proxy():
    """gunicorn binds 127.0.0.1; the proxy's upstream is that address; the Service exposes the
    proxy's public port, where /metrics is 404; Prometheus scrapes the proxy's metrics port,
    whose server passes /metrics alone."""
    config = Config.from_env(container_env())
    assert config.host == "127.0.0.1"
    text = nginx_text("pod")
    assert re.findall(r"^\s*server\s+([^;{\s]+);", text, re.M) == [
        f"127.0.0.1:{config.port}", f"127.0.0.1:{config.grpc_port}"]
    public, metrics_port = named_port(proxy(), "http"), named_port(proxy(), "metrics")
    grpc_port = named_port(proxy(), "grpc")
    servers = nginx_servers("pod")
    assert set(servers) == {public, metrics_port, grpc_port}
    assert re.search(r"location / \{\s*grpc_pass grpc://classifier_grpc;", servers[grpc_port])
    assert "classifier_grpc" not in servers[public] + servers[metrics_port]
    assert re.search(r"location = /metrics \{\s*add_header[^;]*;\s*return 404", servers[public])
    assert re.search(r"location = /metrics \{\s*proxy_pass http://classifier;",
                     servers[metrics_port])
    assert re.search(r"location / \{\s*add_header[^;]*;\s*return 404", servers[metrics_port])
    service_ports = {p["name"]: p for p in resource("Service")["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc"}
    assert service_ports["http"]["targetPort"] in (public, "http")
    assert service_ports["grpc"]["targetPort"] == grpc_port
    assert service_ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    annotations = resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port


def test_the_network_policy_opens_the_public_port_to_all_and_metrics_to_monitoring():
    policy = resource("NetworkPolicy")["spec"]
    labels = resource("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    opened = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            opened[port["port"]] = rule.get("from")
    public, metrics_port = named_port(proxy(), "http"), named_port(proxy(), "metrics")
    grpc_port = named_port(proxy(), "grpc")
    assert set(opened) == {public, metrics_port, grpc_port}   # never gunicorn's ports
    assert opened[public] is None and opened[grpc_port] is None  # from anywhere
    assert opened[metrics_port] == [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    dns, web = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert {p["port"] for p in web["ports"]} == {80, 443}
    v4 = next(b["ipBlock"] for b in web["to"] if b["ipBlock"]["cidr"] == "0.0.0.0/0")
    for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                    "127.0.0.0/8", "100.64.0.0/10"):
        assert private in v4["except"]


def test_the_pod_is_non_root_read_only_and_writes_only_to_its_volumes():
    spec = pod()
    box = container()
    user, group = dockerfile_user().split(":")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == user
    assert str(spec["securityContext"]["runAsGroup"]) == group
    for each in (box, proxy()):
        assert each["securityContext"]["readOnlyRootFilesystem"] is True
        assert each["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = container_env()
    config = Config.from_env(env)
    mounts = {m["mountPath"]: m for m in box["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts[config.temp_dir]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # gunicorn's run folder, metrics
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    # FEEDBACK_DIR: a writable volume, the feedback PVC, at the image's own FEEDBACK_DIR.
    feedback = mounts[config.feedback_dir]
    assert not feedback.get("readOnly")
    assert volumes[feedback["name"]]["persistentVolumeClaim"]["claimName"] == \
        resource("PersistentVolumeClaim", "image-classifier-feedback")["metadata"]["name"]
    assert dockerfile_env("FEEDBACK_DIR") == config.feedback_dir
    models = mounts[env["MODEL_REPOSITORY"]]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == \
        resource("PersistentVolumeClaim", "image-classifier-models")["metadata"]["name"]
    # The proxy writes only to its /tmp (pid, buffered bodies and answers).
    assert [m["mountPath"] for m in proxy()["volumeMounts"] if not m.get("readOnly")] == ["/tmp"]
    paths = re.findall(r"^\s*(?:pid|\w+_temp_path)\s+(\S+);", nginx_text("pod"), re.M)
    assert paths and all(p.startswith("/tmp/") for p in paths), paths


def test_termination_outlasts_the_drain():
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod()["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful_timeout()
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # load + warm-up
    # The proxy is a native sidecar: up before the service, stopped after it has drained.
    assert proxy()["restartPolicy"] == "Always"


def test_hpa_pdb_and_service_select_the_deployment():
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        spec = resource(kind)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    hpa = resource("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert resource("PodDisruptionBudget")["spec"]["minAvailable"] < \
        hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"]


# ---------------------------------------------------------------- API keys

#: What a key made by scripts/api_key.py looks like (secrets.token_urlsafe(32): 43 characters).
KEY_LIKE = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


def deploy_texts() -> dict[str, str]:
    """Every file under deploy/, by path."""
    found = {}
    for folder, _, names in os.walk(os.path.join(ROOT, "deploy")):
        for name in names:
            found[os.path.join(folder, name)] = open(os.path.join(folder, name)).read()
    return found


def test_api_keys_come_from_the_secret_mounted_read_only():
    """API_KEYS_FILE is the api-keys Secret's file, mounted as a read-only folder (not a
    subPath, which the kubelet never updates: rotation needs the file to change in place);
    the Secret is part of the kustomization and holds a key file the service accepts."""
    env = container_env()
    assert "API_KEYS" not in env  # keys in plain text in the manifest: never
    path = env["API_KEYS_FILE"]
    folder, name = os.path.split(path)
    (mount,) = [m for m in container()["volumeMounts"] if m["mountPath"] == folder]
    assert mount["readOnly"] is True and "subPath" not in mount
    (volume,) = [v for v in pod()["volumes"] if v["name"] == mount["name"]]
    secret = resource("Secret", volume["secret"]["secretName"])
    assert secret["metadata"]["name"] == "api-keys"
    assert [(i["key"], i["path"]) for i in volume["secret"]["items"]] == [(name, name)]
    assert volume["secret"]["defaultMode"] & 0o222 == 0  # nobody writes it
    assert secret["metadata"]["labels"].items() <= \
        resource("Deployment")["metadata"]["labels"].items()
    # The placeholder is a valid key file (the service starts) with no key in it.
    assert parse_file_text(secret["stringData"][name]) == []
    # Nothing else of the pod mounts or names the key file.
    assert all(m["mountPath"] != folder for m in proxy()["volumeMounts"])


def test_the_probes_and_healthchecks_need_no_key():
    """With keys on, the kubelet's probes and Docker's HEALTHCHECK ask paths that stay open."""
    box = container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert scope_for(probe_url(box[probe])[2]) is None, probe
    (health,) = re.findall(r"HEALTHCHECK[^\n]*\n[^\n]*?http://[^/]+(/\w+)", dockerfile())
    assert scope_for(health) is None


def test_the_compose_file_mounts_its_key_folder_read_only():
    service = load_yaml(COMPOSE)[0]["services"]["classifier"]
    assert "API_KEYS" not in service["environment"]
    path = service["environment"]["API_KEYS_FILE"]
    folder, name = os.path.split(path)
    (volume,) = [v for v in service["volumes"] if v.rsplit(":", 2)[1:] == [folder, "ro"]]
    assert volume.rsplit(":", 2)[0] == "${KEYS_DIR:-./api-keys}"
    shipped = os.path.join(COMPOSE_KEYS, name)
    assert os.path.join(os.path.dirname(COMPOSE), "api-keys") == COMPOSE_KEYS
    assert parse_file_text(open(shipped).read()) == []  # valid, and no key
    assert os.stat(shipped).st_mode & 0o004 and os.stat(COMPOSE_KEYS).st_mode & 0o005 == 0o005


def test_no_key_is_written_in_the_deploy_files():
    """No file under deploy/ holds a key: no API_KEYS value, nothing shaped like a key, and
    every entry of a key file a digest line (whose format alone cannot hold a key)."""
    for path, text in deploy_texts().items():
        assert not re.search(r"API_KEYS\s*[:=]\s*[^\s/$]", text), path
        assert not KEY_LIKE.search(text), (path, KEY_LIKE.search(text).group())
    for text in (resource("Secret", "api-keys")["stringData"]["api_keys"],
                 open(os.path.join(COMPOSE_KEYS, "api_keys")).read()):
        assert [line for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")] == []


def test_the_compose_file_uses_only_real_settings():
    compose = load_yaml(COMPOSE)[0]
    service = compose["services"]["classifier"]
    assert set(service["environment"]) <= config_variables()
    assert service["read_only"] is True
    assert int(service["stop_grace_period"].rstrip("s")) > graceful_timeout()
    assert any(v.endswith(":/models:ro") for v in service["volumes"])
    assert service["environment"]["MODEL_REPOSITORY"] == "/models"
    # FEEDBACK_DIR on a named volume (writable on the read-only root, kept, shared).
    assert f"feedback:{dockerfile_env('FEEDBACK_DIR')}" in service["volumes"]
    assert "feedback" in compose["volumes"]
    # Only the proxy is published (HTTP and gRPC); the replicas (and their /metrics) are not.
    assert "ports" not in service
    assert compose["services"]["proxy"]["ports"] == ["${PROXY_PORT:-8080}:8080",
                                                     "${GRPC_PROXY_PORT:-8500}:8500"]


# ---------------------------------------------------------------- nginx configurations

def test_the_proxies_have_the_services_deadlines_and_limits():
    """Compose's nginx and the pod's have the same client deadlines, request buffering up to
    the upload limit, and answer buffering, taken from the service's settings."""
    public = {"compose": nginx_servers("compose")[8080],
              "pod": nginx_servers("pod")[named_port(proxy(), "http")]}
    names = ("client_header_timeout", "client_body_timeout", "send_timeout",
             "client_max_body_size", "proxy_request_buffering", "proxy_buffering",
             "proxy_max_temp_file_size", "proxy_read_timeout")
    for name in names:
        assert directive(public["compose"], name) == directive(public["pod"], name), name
    block = public["pod"]
    assert seconds(directive(block, "client_header_timeout")) == DEFAULTS.header_timeout
    assert seconds(directive(block, "send_timeout")) == DEFAULTS.send_timeout
    assert seconds(directive(block, "client_body_timeout")) <= DEFAULTS.upload_timeout
    assert DEFAULTS.max_upload_mb < megabytes(directive(block, "client_max_body_size")) \
        <= DEFAULTS.max_upload_mb + 2
    assert directive(block, "proxy_request_buffering") == "on"
    assert directive(block, "proxy_buffering") == "on"
    assert seconds(directive(block, "proxy_read_timeout")) > DEFAULTS.request_timeout


def test_the_proxies_pass_grpc_with_the_services_deadlines_and_limits():
    """Each proxy has one gRPC server (HTTP/2 without TLS) passing every call to the service's
    GRPC_PORT, with the same deadlines in both and a body bound above the service's own
    (MAX_UPLOAD_MB + 64 KiB), so the service refuses an oversized message in gRPC's terms."""
    blocks = {}
    for which in NGINX_CONFS:
        (block,) = [b for b in nginx_servers(which).values() if "grpc_pass" in b]
        assert re.search(r"\blisten\s+\d+\s+http2;", block), which
        assert directive(block, "grpc_next_upstream") == "off", which
        blocks[which] = block
    assert re.search(r"upstream classifier_grpc \{\s*server classifier:8500\b",
                     nginx_text("compose"))
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout",
                 "client_max_body_size", "grpc_read_timeout"):
        assert directive(blocks["compose"], name) == directive(blocks["pod"], name), name
    block = blocks["pod"]
    assert DEFAULTS.max_upload_mb + 0.0625 < megabytes(directive(block, "client_max_body_size"))
    assert seconds(directive(block, "grpc_read_timeout")) > DEFAULTS.request_timeout


def test_no_proxy_resends_a_request_that_reached_the_service():
    """Retries only for what nginx may repeat (it never resends a POST once sent without
    `non_idempotent`), and not on the service's own 502/504 (an image URL's server failed)."""
    for which in NGINX_CONFS:
        text = nginx_text(which)
        assert "non_idempotent" not in text, which
        for value in re.findall(r"proxy_next_upstream\s+([^;]*);", text):
            assert not {"http_502", "http_504", "http_500", "http_503"} & set(value.split())


def test_nginx_errors_are_the_apis_envelope():
    """The proxies' own errors use the envelope, codes and statuses of common/errors.py, from
    one file that both include."""
    compose_errors = open(os.path.join(COMPOSE_NGINX, "api-errors.conf")).read()
    assert open(os.path.join(K8S, "api-errors.conf")).read() == compose_errors
    for which in NGINX_CONFS:
        for block in nginx_servers(which).values():
            # (a gRPC client reads nginx's own failures as gRPC statuses, not JSON pages)
            assert "include api-errors.conf;" in block or "grpc_pass" in block, which
    known = {(cls.code, cls.status) for cls in _subclasses(errors.ApiError)}
    bodies = re.findall(r"return (\d+) '([^']*)'", compose_errors + nginx_text("pod"))
    assert len(bodies) >= 8
    for status, body in bodies:
        error = json.loads(body.replace("\\n", ""))["error"]
        assert error["status"] == int(status)
        assert (error["code"], error["status"]) in known, error
    for status in re.findall(r"error_page\s+(\d+)", compose_errors):
        assert status in {"400", "408", "413", "414", "494", "502", "503", "504"}


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_the_dockerfiles_build_on_a_base_pinned_by_digest():
    """Every FROM of the service's image takes BASE_IMAGE, whose default names a digest (or the
    placeholder scripts/docker_base.sh --pin replaces); `make docker` passes the reference
    scripts/docker_base.sh prints; compose builds nginx on BASE_IMAGE."""
    text = dockerfile()
    assert set(re.findall(r"^FROM\s+(\S+)", text, re.M)) == {"${BASE_IMAGE}"}
    assert re.search(r"^ARG BASE_IMAGE=[^@\s]+@sha256:([0-9a-f]{64}|UNPINNED)$", text, re.M)
    nginx = load_yaml(COMPOSE)[0]["services"]["proxy"]["build"]
    assert nginx["args"]["BASE"].startswith("${BASE_IMAGE")


# ---------------------------------------------------------------- the real nginx

@pytest.mark.docker
def test_both_nginx_configurations_pass_nginx_t(tmp_path):
    """`nginx -t` of the nginx image compose builds (Debian's nginx) on each configuration: the
    compose one as baked in the image, the pod's as its ConfigMap mounts it, as uid 10001."""
    require_engine()
    image = build_nginx_image()
    # docker() fails the test, with nginx's message, when `nginx -t` exits non-zero.
    docker("run", "--rm", "--add-host", "classifier:127.0.0.1", image, "nginx", "-t")
    conf = config_map_folder(tmp_path)
    docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", "10001:10001",
           "-v", f"{conf}:/etc/nginx/pod:ro", image,
           *[a for a in proxy()["args"] if a not in ("-g", "daemon off;")], "-t")


def keys_folder(folder, *keys: tuple[str, str]) -> str:
    """A folder holding the key file ``api_keys`` with these ``(name, key)`` entries (scopes
    classify and feedback), readable by the service's user, as the Secret or compose mounts
    it; replaced atomically, as an editor or the kubelet does."""
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o755)
    part = os.path.join(folder, ".api_keys.part")
    with open(part, "w") as fh:
        fh.write("".join(file_line(name, key, ["classify", "feedback"]) + "\n"
                         for name, key in keys))
    os.chmod(part, 0o644)
    os.replace(part, os.path.join(folder, "api_keys"))
    return str(folder)


def config_map_folder(tmp_path) -> str:
    """The generated ConfigMap's files in a folder, as the pod mounts them."""
    folder = tmp_path / "proxy-config"
    folder.mkdir()
    for name, text in generated_config_map()["data"].items():
        (folder / name).write_text(text)
        os.chmod(folder / name, 0o644)
    os.chmod(folder, 0o755)
    return str(folder)


# ---------------------------------------------------------------- the pod, run for real

@pytest.fixture(scope="module")
def pod_run(tmp_path_factory):
    """The Deployment's two containers as docker runs: the service with the manifest's
    environment (the image's demo model instead of the repository volume) and the proxy in its
    network namespace (as containers of one pod share one), both as uid 10001 on read-only
    roots with the manifest's volumes. ``urls``: the proxy's public and metrics ports and
    gunicorn's port, published from outside the "pod"."""
    require_engine()
    image, nginx = build_image(), build_nginx_image()
    env = {k: v for k, v in container_env().items()
           if k not in ("MODEL_REPOSITORY", "DEFAULT_MODEL")}
    public, metrics_port = named_port(proxy(), "http"), named_port(proxy(), "metrics")
    grpc_port = named_port(proxy(), "grpc")
    hardening = ("--read-only", "--user", "10001:10001", "--cap-drop", "ALL",
                 "--security-opt", "no-new-privileges")
    keys = keys_folder(tmp_path_factory.mktemp("pod-keys") / "api-keys", ("test", TEST_KEY))
    service = Container(image, *hardening, "--tmpfs", "/tmp",
                        "--mount", "type=volume,dst=/app/temp",
                        "--mount", "type=volume,dst=/app/feedback",
                        "-v", f"{keys}:{os.path.dirname(env['API_KEYS_FILE'])}:ro", env=env,
                        ports=(public, metrics_port, Config.from_env(env).port, grpc_port))
    sidecar = None
    try:
        sidecar = Container(nginx, *hardening, "--network", f"container:{service.id}",
                            "--tmpfs", "/tmp",
                            "-v", f"{config_map_folder(tmp_path_factory.mktemp('pod'))}"
                                  ":/etc/nginx/pod:ro",
                            ports=(), command=tuple(proxy()["args"]))
        service.wait_ready(bound=180)
        yield service
    finally:
        if sidecar:
            print(sidecar.logs()[-2000:])
            sidecar.remove()
        service.remove()


METRICS_SPELLINGS = ("/metrics", "//metrics", "/%6Detrics", "/./metrics", "/metrics?x=1",
                     "/x/../metrics")


@pytest.mark.docker
def test_the_pod_is_reached_through_its_proxy_and_metrics_on_their_own_port(pod_run):
    public, metrics_port = named_port(proxy(), "http"), named_port(proxy(), "metrics")
    url = pod_run.urls[public]
    with open(STAR, "rb") as fh:
        r = requests.post(url + "/classify", files={"image": ("star.png", fh)}, headers=KEY,
                          timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "star", r.text
    for path in METRICS_SPELLINGS:
        r = requests.get(url + path, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        assert "classifier_" not in r.text and r.headers.get("X-Request-ID"), path
    r = requests.get(pod_run.urls[metrics_port] + "/metrics", timeout=10)
    assert r.status_code == 200 and metric(r.text, "classifier_requests_total",
                                           route="/classify", method="POST") >= 1
    for path in ("/classify", "/readyz", "/"):
        assert requests.get(pod_run.urls[metrics_port] + path, timeout=10).status_code == 404
    # gunicorn itself listens on 127.0.0.1 inside the pod: its port, published, leads nowhere.
    with pytest.raises(requests.ConnectionError):
        requests.get(pod_run.urls[Config.from_env(container_env()).port] + "/healthz", timeout=5)


@pytest.mark.docker
def test_the_pod_wants_a_key_and_its_probes_and_page_do_not(pod_run):
    """Keys on, from the mounted key file: through the proxy, /classify without a key or with a
    wrong one is 401 in the envelope with WWW-Authenticate; the probes' paths and the page
    answer without one."""
    url = pod_run.urls[named_port(proxy(), "http")]
    data = open(STAR, "rb").read()
    for key, code in ((None, "unauthorized"), ("not-the-key", "invalid_key")):
        r = requests.post(url + "/classify", files={"image": ("star.png", data)},
                          headers={"X-API-Key": key} if key else {}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == code, r.text
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="classifier"')
    for path in ("/healthz", "/readyz", "/"):
        assert requests.get(url + path, timeout=10).status_code == 200, path
    assert classify(url, data).status_code == 200


def grpc_top_label(address: str, model: str, key: str | None = TEST_KEY) -> str:
    """The top label tritonclient.grpc gets for the star image from ``model`` at ``address``
    (host:port), with ``key`` in the metadata; raises InferenceServerException on a refusal."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    image = grpcclient.InferInput("image_bytes", [1], "BYTES")
    image.set_data_from_numpy(np.array([open(STAR, "rb").read()], dtype=object))
    top = grpcclient.InferRequestedOutput("probabilities", class_count=1)
    result = client.infer(model, [image], outputs=[top], client_timeout=60,
                          headers={"x-api-key": key} if key else None)
    return result.as_numpy("probabilities")[0][0].decode().split(":", 2)[2]


def grpc_health(address: str) -> int:
    """grpc.health.v1's status for the whole server (1: SERVING), without a key."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=30).status


@pytest.mark.docker
def test_grpc_reaches_the_pod_through_its_proxy_and_wants_a_key(pod_run):
    """Through the proxy's gRPC port (HTTP/2 to the service's 127.0.0.1:8500): the health check
    the readiness probe makes answers SERVING without a key; ModelInfer wants one."""
    from tritonclient.utils import InferenceServerException

    address = pod_run.urls[named_port(proxy(), "grpc")].removeprefix("http://")
    assert grpc_health(address) == 1
    model = requests.post(pod_run.urls[named_port(proxy(), "http")] + "/classify",
                          files={"image": ("star.png", open(STAR, "rb").read())}, headers=KEY,
                          timeout=30).json()["model"]["name"]
    assert grpc_top_label(address, model) == "star"
    with pytest.raises(InferenceServerException) as refused:
        grpc_top_label(address, model, key=None)
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


@pytest.mark.docker
def test_the_pods_proxy_holds_slow_clients_and_drops_them(pod_run):
    """80 connections with half-sent headers and 48 trickling bodies are held by nginx, not
    gunicorn: a normal upload meanwhile answers 200 at once; a connection whose headers stall
    is closed after client_header_timeout."""
    url = pod_run.urls[named_port(proxy(), "http")]
    data = open(STAR, "rb").read()
    slow = []
    try:
        for _ in range(80):
            s = raw(url)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: pod\r\n")
            slow.append(s)
        for _ in range(48):
            s = raw(url)
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: pod\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100000\r\n\r\n" + data[:4])
            slow.append(s)
        started = time.monotonic()
        r = classify(url, data)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 5
        assert requests.get(url + "/healthz", timeout=5).status_code == 200
        header_timeout = seconds(directive(nginx_servers("pod")[named_port(proxy(), "http")],
                                           "client_header_timeout"))
        slow[0].settimeout(header_timeout + 10)
        started = time.monotonic()
        assert slow[0].recv(1024) == b""                 # closed, without an answer
        assert time.monotonic() - started < header_timeout + 10
    finally:
        for s in slow:
            s.close()


@pytest.mark.docker
def test_the_pods_proxy_bounds_requests_and_answers_in_the_envelope(pod_run):
    """An upload over the limit is refused before its body (413), requests past the proxy's
    limit of requests in progress are refused (503 overloaded, Retry-After), both in the API's
    envelope; the limit frees up with the connections."""
    url = pod_run.urls[named_port(proxy(), "http")]
    s = raw(url)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: pod\r\nContent-Type: image/png\r\n"
              b"Content-Length: %d\r\n\r\n" % (18 * 2 ** 20))
    head, _, body = s.recv(65536).partition(b"\r\n\r\n")
    s.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    limit = int(re.search(r"limit_conn requests (\d+);", nginx_text("pod")).group(1))
    held = []
    try:
        for _ in range(limit):
            s = raw(url)
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: pod\r\nContent-Length: 1000\r\n\r\n")
            held.append(s)
        time.sleep(0.5)
        r = requests.get(url + "/healthz", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert r.headers["Retry-After"] == "1"
    finally:
        for s in held:
            s.close()
    wait_until(lambda: requests.get(url + "/healthz", timeout=5).status_code == 200, 10)


# ---------------------------------------------------------------- compose, run for real

class Compose:
    """``docker-compose`` on deploy/compose with its own project name, port and repository."""

    def __init__(self, project: str, env: dict):
        self.project = project
        self.env = {**os.environ, **env}

    def __call__(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run(["docker-compose", "-f", COMPOSE, "-p", self.project, *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    def replicas(self) -> list[str]:
        """The replicas still running."""
        return [c for c in self("ps", "-q", "classifier").split()
                if docker("inspect", "--format", "{{.State.Running}}", c) == "true"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """nginx and three replicas serving a repository with model ``colours`` version 1 (whose
    model call spins 4 s on a magenta image)."""
    require_engine()
    image = build_image()
    repo = tmp_path_factory.mktemp("compose") / "repo"
    (repo / "colours").mkdir(parents=True)
    readable_copy(save_colour_model(str(repo.parent / "v1"), hang_seconds=4),
                  repo / "colours" / "1")
    for folder in (repo, repo / "colours"):
        os.chmod(folder, 0o755)
    port, grpc_port = free_port(), free_port()
    keys = keys_folder(repo.parent / "api-keys", ("test", TEST_KEY))
    compose = Compose(f"clstest{os.getpid()}", {
        "IMAGE": image, "BASE_IMAGE": base_image(), "MODELS": str(repo), "PROXY_PORT": str(port),
        "GRPC_PROXY_PORT": str(grpc_port),
        "DEFAULT_MODEL": "colours", "MODEL_POLL_SECONDS": "1", "KEYS_DIR": keys})
    compose.repo = repo
    compose.keys = keys
    compose.url = f"http://127.0.0.1:{port}"
    compose.grpc_address = f"127.0.0.1:{grpc_port}"
    try:
        compose("up", "-d", "--build", "--scale", "classifier=3", timeout=900)
        wait_until(lambda: requests.get(compose.url + "/readyz", timeout=2).status_code == 200,
                   120)
        yield compose
    finally:
        subprocess.run(["docker-compose", "-f", COMPOSE, "-p", compose.project, "down", "-v",
                        "-t", "5"], capture_output=True, env=compose.env, timeout=300)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, bound: float) -> None:
    deadline = time.monotonic() + bound
    while True:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.5)


def replica_requests(container_id: str) -> float:
    """/classify requests one replica answered (its own /metrics, read inside it); 0 for a
    replica that has answered none yet."""
    text = docker("exec", container_id, "python", "-c",
                  "import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:8000/metrics').read().decode())")
    return metric_so_far(text, "classifier_requests_total", route="/classify", method="POST",
                         status="200")


def classify(url: str, data: bytes, key: str = TEST_KEY) -> requests.Response:
    return requests.post(url + "/classify", files={"image": ("star.png", data)},
                         headers={"X-API-Key": key}, timeout=60)


@pytest.mark.docker
def test_requests_spread_over_the_replicas(stack):
    data = open(STAR, "rb").read()
    before = {c: replica_requests(c) for c in stack.replicas()}
    for _ in range(60):
        r = classify(stack.url, data)
        assert r.status_code == 200, r.text
    served = {c: replica_requests(c) - before[c] for c in before}
    assert len(served) == 3 and sum(served.values()) == 60, served
    assert all(n >= 5 for n in served.values()), served


@pytest.mark.docker
def test_grpc_reaches_the_replicas_through_compose_nginx(stack):
    """gRPC on the published GRPC_PROXY_PORT, HTTP/2 through nginx to the replicas' GRPC_PORT:
    the same answer as /classify."""
    wait_until(lambda: grpc_health(stack.grpc_address) == 1, 60)
    rest = classify(stack.url, open(STAR, "rb").read())
    assert rest.status_code == 200, rest.text
    expected = rest.json()["predictions"][0]["label"]
    assert [grpc_top_label(stack.grpc_address, "colours") for _ in range(3)] == [expected] * 3


@pytest.mark.docker
def test_a_new_version_reaches_every_replica_without_a_failed_request(stack):
    """Version 2 is published by atomic rename while clients run; every replica serves it
    within the poll interval (plus load and warm-up), and no request fails meanwhile."""
    data = open(STAR, "rb").read()
    statuses, versions = closed_loop(stack.url, data, clients=4, seconds=20, action=lambda: (
        os.rename(readable_copy(save_colour_model(str(stack.repo.parent / "v2-build"),
                                                  hang_seconds=4),
                                stack.repo / "colours" / ".2-staging"),
                  stack.repo / "colours" / "2")), at=4)
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert versions[0] == "1" and versions[-20:] == ["2"] * 20
    for replica in stack.replicas():
        models = json.loads(docker("exec", replica, "python", "-c",
                                   "import urllib.request as u; print(u.urlopen(u.Request("
                                   "'http://127.0.0.1:8000/models', headers={'X-API-Key': "
                                   f"'{TEST_KEY}'}})).read().decode())"))
        (colours,) = [m for m in models["models"] if m["name"] == "colours"]
        assert (2, "ready") in [(v["version"], v["state"]) for v in colours["versions"]], models


@pytest.mark.docker
def test_the_public_port_has_no_metrics_and_nginx_errors_are_json(stack):
    for path in METRICS_SPELLINGS:
        r = requests.get(stack.url + path, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        assert "classifier_" not in r.text
    s = raw(stack.url)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: compose\r\nContent-Type: image/png\r\n"
              b"Content-Length: %d\r\n\r\n" % (18 * 2 ** 20))
    head, _, body = s.recv(65536).partition(b"\r\n\r\n")
    s.close()
    assert head.startswith(b"HTTP/1.1 413") and b"X-Request-ID" in head, head
    assert json.loads(body)["error"]["code"] == "payload_too_large"


@pytest.mark.docker
def test_a_key_added_to_the_compose_key_folder_works_without_a_restart(stack):
    """The key file replaced in the mounted folder (a new inode, as an editor or the kubelet
    writes it): every replica takes the new key within seconds, and drops a removed one."""
    data = open(STAR, "rb").read()
    new_key = "deploy-test-second-key-0123456789"
    assert classify(stack.url, data, new_key).status_code == 401

    def all_answer(key: str, status: int) -> bool:  # 9 in a row: each replica more than once
        return all(classify(stack.url, data, key).status_code == status for _ in range(9))

    try:
        keys_folder(stack.keys, ("test", TEST_KEY), ("second", new_key))
        wait_until(lambda: all_answer(new_key, 200), 15)
        keys_folder(stack.keys, ("second", new_key))
        wait_until(lambda: all_answer(TEST_KEY, 401), 15)
        assert classify(stack.url, data, new_key).status_code == 200
    finally:
        keys_folder(stack.keys, ("test", TEST_KEY))
        wait_until(lambda: all_answer(TEST_KEY, 200), 15)


# What nginx answers for a request in flight on a replica that died: the connection reset (502)
# or, where the reset never arrives, no answer within proxy_read_timeout (504).
FAILED_REPLICA = {(502, "upstream_error"), (504, "upstream_timeout")}


@pytest.mark.docker
def test_a_killed_replica_under_load_fails_only_what_it_was_running(stack):
    """`docker kill` (SIGKILL) of one replica under load: what was in flight on it fails (at
    most one request per client: nginx does not resend a POST that reached a replica),
    everything else is answered by the other replicas (a connection the dead one refuses is
    tried on the next)."""
    data = open(STAR, "rb").read()
    victim = stack.replicas()[0]
    clients = 6
    statuses, _ = closed_loop(stack.url, data, clients=clients, seconds=15,
                              action=lambda: docker("kill", victim), at=4)
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"kill under load: {counts}")
    # A request whose answer the replica was sending when it died: nginx had passed the head
    # on (200, chunked) and can only cut the body (the client's ChunkedEncodingError). It was
    # in flight on the victim too, and counts among the failures below (a CI run met one).
    assert set(statuses) <= ({200, "ChunkedEncodingError"}
                             | {status for status, _ in FAILED_REPLICA}), counts
    assert len(statuses) - counts.get(200, 0) <= clients, counts
    assert len(statuses) > 50


def in_flight(container_id: str) -> float:
    """Requests one replica is handling, apart from the /metrics request that asks."""
    text = docker("exec", container_id, "python", "-c",
                  "import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:8000/metrics').read().decode())")
    return metric(text, "classifier_requests_in_flight") - 1


@pytest.mark.docker
def test_a_post_in_flight_on_a_replica_that_dies_is_not_resent(stack):
    """A POST whose model call spins on one replica; that replica is killed: the client gets
    502 (in the envelope), and no other replica ever sees the request. (With `non_idempotent`
    retries nginx replayed it on the next replica: a request that kills replicas would have
    killed them all, one after another.)"""
    replicas = stack.replicas()
    before = {c: replica_requests(c) for c in replicas}
    answer: list = []
    poster = threading.Thread(target=lambda: answer.append(requests.post(
        stack.url + "/classify", files={"image": ("trap.png", ig.png(TRAP, (32, 32)))},
        headers=KEY, timeout=60)))
    poster.start()
    deadline = time.monotonic() + 3
    victim = None
    while victim is None and time.monotonic() < deadline:
        victim = next((c for c in replicas if in_flight(c) >= 1), None)
    assert victim, "the magenta request is on no replica"
    docker("kill", victim)
    poster.join(60)
    (r,) = answer
    assert r.status_code != 200, "resent to another replica, which answered"
    assert (r.status_code, r.json()["error"]["code"]) in FAILED_REPLICA, r.text
    time.sleep(5)  # longer than the spin: a resent request would have been answered by now
    others = [c for c in replicas if c != victim]
    assert [in_flight(c) for c in others] == [0] * len(others)
    assert {c: replica_requests(c) for c in others} == {c: before[c] for c in others}


def closed_loop(url: str, data: bytes, clients: int, seconds: float, action, at: float):
    """``clients`` threads post ``data`` back to back for ``seconds``; ``action()`` runs at
    ``at`` seconds. Returns (statuses, served model versions in answer order)."""
    statuses: list = []
    versions: list = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        with requests.Session() as session:
            session.headers.update(KEY)
            while time.monotonic() < stop:
                try:
                    r = session.post(url + "/classify", files={"image": ("s.png", data)},
                                     timeout=60)
                    with lock:
                        statuses.append(r.status_code)
                        if r.status_code == 200:
                            versions.append(r.json()["model"]["version"])
                except requests.RequestException as exc:
                    with lock:
                        statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(at)
    action()
    for t in threads:
        t.join(seconds + 90)
    return statuses, versions
