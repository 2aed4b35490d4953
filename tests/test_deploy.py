"""deploy/: the Kubernetes manifests checked against the code, and the compose setup run for real.

The manifest tests need no cluster (there is none here): every manifest is validated with
``kubernetes-validate --strict`` against the newest Kubernetes it knows, and its probe paths,
port, environment variables, user and timings are read back and compared with what the code
really has (the routes of ``common/views.py``, ``common/config.py``, the Dockerfile and
gunicorn.conf.py), so the manifests cannot drift from the service.

The compose tests (marked ``docker``: ``make test-docker``) start nginx and three replicas.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml
from flask import Flask

from common.config import Config, documented_variables
from common.views import bp
from dockerhelp import build_image, docker, graceful_timeout, readable_copy, require_engine
from helpers import ROOT, metric
from tiny_models import save_colour_model

K8S = os.path.join(ROOT, "deploy", "k8s")
COMPOSE = os.path.join(ROOT, "deploy", "compose", "docker-compose.yml")
STAR = os.path.join(ROOT, "docs", "examples", "star.png")


def load_yaml(path: str) -> list[dict]:
    with open(path) as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def kustomization() -> dict:
    return load_yaml(os.path.join(K8S, "kustomization.yaml"))[0]


def resources() -> dict[str, dict]:
    """kind -> the resource, for every file the kustomization lists."""
    docs = [doc for name in kustomization()["resources"]
            for doc in load_yaml(os.path.join(K8S, name))]
    return {doc["kind"]: doc for doc in docs}


def container() -> dict:
    return resources()["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def routes() -> set[str]:
    """The GET paths the service answers without parameters (from the blueprint, not a list)."""
    app = Flask(__name__)
    app.register_blueprint(bp)
    return {rule.rule for rule in app.url_map.iter_rules()
            if "GET" in rule.methods and not rule.arguments}


def dockerfile_user() -> str:
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    return re.findall(r"^USER\s+(\S+)", text, re.M)[-1]


def test_every_manifest_is_valid_kubernetes_in_strict_mode():
    files = [os.path.join(K8S, name) for name in kustomization()["resources"]]
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"),
                           "--strict", "--quiet", *files], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_kustomization_lists_every_manifest():
    on_disk = {n for n in os.listdir(K8S) if n.endswith(".yaml") and n != "kustomization.yaml"}
    assert set(kustomization()["resources"]) == on_disk
    assert set(resources()) == {"Deployment", "Service", "PersistentVolumeClaim",
                                "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_probes_port_and_variables_are_ones_the_service_has():
    box = container()
    env = {item["name"]: item["value"] for item in box["env"]}
    assert set(env) <= set(documented_variables()), set(env) - set(documented_variables())
    config = Config.from_env(env)  # every value is one the service accepts
    port = box["ports"][0]
    assert port["containerPort"] == config.port
    assert f"EXPOSE {config.port}" in open(os.path.join(ROOT, "Dockerfile")).read()
    paths = routes()
    assert box["startupProbe"]["httpGet"]["path"] == "/readyz" in paths
    assert box["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert box["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert box[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    annotations = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in paths
    assert int(annotations["prometheus.io/port"]) == config.port
    service = resources()["Service"]["spec"]["ports"][0]
    assert service["targetPort"] in (port["name"], port["containerPort"])


def test_the_pod_is_non_root_read_only_and_writes_only_to_its_volumes():
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    box = container()
    user, group = dockerfile_user().split(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user
    assert str(pod["securityContext"]["runAsGroup"]) == group
    assert box["securityContext"]["readOnlyRootFilesystem"] is True
    env = {item["name"]: item["value"] for item in box["env"]}
    mounts = {m["mountPath"]: m for m in box["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["TEMP_DIR"]]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # gunicorn's run folder, metrics
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    models = mounts[env["MODEL_REPOSITORY"]]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == \
        resources()["PersistentVolumeClaim"]["metadata"]["name"]


def test_termination_outlasts_the_drain():
    pod = resources()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful_timeout()
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60  # load + warm-up


def test_hpa_pdb_and_service_select_the_deployment():
    deployment = resources()["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        spec = resources()[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    hpa = resources()["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert resources()["PodDisruptionBudget"]["spec"]["minAvailable"] < \
        hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"]


def test_the_compose_file_uses_only_real_settings():
    compose = load_yaml(COMPOSE)[0]
    service = compose["services"]["classifier"]
    assert set(service["environment"]) <= set(documented_variables())
    assert service["read_only"] is True
    assert int(service["stop_grace_period"].rstrip("s")) > graceful_timeout()
    assert any(v.endswith(":/models:ro") for v in service["volumes"])
    assert service["environment"]["MODEL_REPOSITORY"] == "/models"


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
        return self("ps", "-q", "classifier").split()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """nginx and three replicas serving a repository with model ``colours`` version 1."""
    require_engine()
    image = build_image()
    repo = tmp_path_factory.mktemp("compose") / "repo"
    (repo / "colours").mkdir(parents=True)
    readable_copy(save_colour_model(str(repo.parent / "v1")), repo / "colours" / "1")
    for folder in (repo, repo / "colours"):
        os.chmod(folder, 0o755)
    port = free_port()
    compose = Compose(f"clstest{os.getpid()}", {
        "IMAGE": image, "MODELS": str(repo), "PROXY_PORT": str(port),
        "DEFAULT_MODEL": "colours", "MODEL_POLL_SECONDS": "1"})
    compose.repo = repo
    compose.url = f"http://127.0.0.1:{port}"
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
    """/classify requests one replica answered (its own /metrics, read inside it)."""
    text = docker("exec", container_id, "python", "-c",
                  "import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:8000/metrics').read().decode())")
    try:
        return metric(text, "classifier_requests_total", route="/classify", method="POST",
                      status="200")
    except AssertionError:
        return 0.0


def classify(url: str, data: bytes) -> requests.Response:
    return requests.post(url + "/classify", files={"image": ("star.png", data)}, timeout=60)


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
def test_a_new_version_reaches_every_replica_without_a_failed_request(stack):
    """Version 2 is published by atomic rename while clients run; every replica serves it
    within the poll interval (plus load and warm-up), and no request fails meanwhile."""
    data = open(STAR, "rb").read()
    statuses, versions = closed_loop(stack.url, data, clients=4, seconds=20, action=lambda: (
        os.rename(readable_copy(save_colour_model(str(stack.repo.parent / "v2-build")),
                                stack.repo / "colours" / ".2-staging"),
                  stack.repo / "colours" / "2")), at=4)
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert versions[0] == "1" and versions[-20:] == ["2"] * 20
    for replica in stack.replicas():
        models = json.loads(docker("exec", replica, "python", "-c",
                                   "import urllib.request; print(urllib.request.urlopen("
                                   "'http://127.0.0.1:8000/models').read().decode())"))
        (colours,) = [m for m in models["models"] if m["name"] == "colours"]
        assert (2, "ready") in [(v["version"], v["state"]) for v in colours["versions"]], models


@pytest.mark.docker
def test_a_killed_replica_loses_no_request(stack):
    """`docker kill` (SIGKILL) of one replica under load: nginx retries what it sent there on
    another replica (connection refused, reset or 502; classification POSTs are repeatable)."""
    data = open(STAR, "rb").read()
    victim = stack.replicas()[0]
    statuses, _ = closed_loop(stack.url, data, clients=6, seconds=15,
                              action=lambda: docker("kill", victim), at=4)
    counts = {s: statuses.count(s) for s in set(statuses)}
    print(f"kill under load: {counts}")
    assert set(statuses) == {200}, counts
    assert len(statuses) > 50


def closed_loop(url: str, data: bytes, clients: int, seconds: float, action, at: float):
    """``clients`` threads post ``data`` back to back for ``seconds``; ``action()`` runs at
    ``at`` seconds. Returns (statuses, served model versions in answer order)."""
    statuses: list = []
    versions: list = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        with requests.Session() as session:
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
