"""The Kubernetes files (launch/k8s), rendered by `kubectl kustomize` (k8s_render.py), checked for
what keeps a cluster safe: every pod meets Pod Security "restricted"; the Secret layouts are what
the key loaders read (a real CURVE folder is projected as the kubelet would and loaded; the auth
and TLS components mount the files serve is pointed at); the NetworkPolicies select the pods'
labels and open exactly the ports the processes use, each to whom it must; metrics are scraped
from the port serve serves them on. No cluster is needed, only kubectl (skipped without it).
"""

from __future__ import annotations

import argparse
import os

import pytest

from specpipe import curve
from specpipe.config import ENV_CURVE_KEYS
from specpipe.launch import endpoints
from specpipe.launch.errors import UsageError

from deploy_parsers import strict_parsers  # noqa: F401
from k8s_render import (
    K8S,
    NEEDS_KUBECTL,
    VARIANTS,
    container_ports,
    draft_config,
    kustomize,
    pod_templates,
    rendered,  # noqa: F401  (a pytest fixture)
    serve_args,
    the_container,
)  # noqa: F401

pytestmark = NEEDS_KUBECTL
# The volume types Pod Security "restricted" allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_problems(where: str, pod_spec: dict) -> list[str]:
    """Pod Security Standards, "restricted" profile (Kubernetes 1.25+), as the admission checks it."""
    problems = []
    pod_ctx = pod_spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(flag):
            problems.append(f"{where}: {flag}")
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{where}: volume {volume['name']} of type {kinds}")
    for container in pod_spec.get("initContainers", []) + pod_spec["containers"]:
        ctx = container.get("securityContext", {})
        name = f"{where}/{container['name']}"
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"] or set(ctx.get("capabilities", {}).get("add", [])) - {
            "NET_BIND_SERVICE"
        }:
            problems.append(f"{name}: capabilities must drop ALL")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0 or ctx.get("privileged"):
            problems.append(f"{name}: runs as root or privileged")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any("hostPort" in port for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


def test_every_pod_meets_pod_security_restricted(rendered):
    problems = []
    for variant in [*rendered, "models"]:
        objects = kustomize(K8S / "models") if variant == "models" else rendered[variant]
        for (kind, name), doc in objects.items():
            if kind in ("Deployment", "Job"):
                problems += restricted_problems(f"{variant}/{name}", doc["spec"]["template"]["spec"])
            elif kind == "LeaderWorkerSet":
                for role, pod in pod_templates(objects).items():
                    problems += restricted_problems(f"{variant}/{name}/{role}", pod["spec"])
    assert not problems, "\n".join(problems)


# ---- Secrets ------------------------------------------------------------------------------------


def mounted_secret(pod: dict, mount_path: str) -> dict:
    """The `secret` source of the volume mounted at mount_path (read-only)."""
    [mount] = [m for m in the_container(pod)["volumeMounts"] if m["mountPath"] == mount_path]
    assert mount.get("readOnly") is True, f"{mount_path} must be mounted read-only"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "secret files must not be world-readable"
    return volume["secret"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_curve_keys_come_from_a_secret_the_key_loader_reads(rendered, variant, tmp_path):
    """Project the Secret as the kubelet would (its items, from a real `curve-keygen` folder) and
    load it as the coordinator and both workers do."""
    keys = tmp_path / "generated"
    curve.generate_keys(keys)
    secret_data = {path.name: path.read_bytes() for path in keys.iterdir() if path.is_file()}
    for role, pod in pod_templates(rendered[variant]).items():
        container = the_container(pod)
        env = {item["name"]: item.get("value") for item in container["env"]}
        folder = env[ENV_CURVE_KEYS]
        secret = mounted_secret(pod, folder)
        assert secret["secretName"] == "specpipe-curve"
        projected = tmp_path / variant / role
        for item in secret["items"]:
            assert item["key"] in secret_data, f"{item['key']} is no file `specpipe curve-keygen` writes"
            (projected / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (projected / item["path"]).write_bytes(secret_data[item["key"]])
        loaded = curve.load_keys(projected, server=True, client=True)
        assert loaded.client_public in loaded.allowed_clients, "the workers must let the coordinator's key in"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_sockets_between_the_pods_pass_the_check_across_hosts_with_the_keys(
    rendered, variant, strict_parsers, monkeypatch
):
    """serve (--worker-host 0.0.0.0, a draft in another pod) and the draft (--host 0.0.0.0) cross
    the network: they start only with CURVE keys (issue 23), which the pods' env names."""
    args = serve_args(rendered[variant], monkeypatch)  # the target container's env, the keys' folder among it
    draft = draft_config(rendered[variant])
    assert args.curve_keys == draft.curve_keys != "" and not args.insecure_internal and not draft.insecure_internal
    endpoints.check_serve(args)
    endpoints.check_worker(draft)
    with pytest.raises(UsageError, match="--curve-keys DIR"):
        endpoints.check_serve(argparse.Namespace(**{**vars(args), "curve_keys": ""}))


@pytest.mark.parametrize("variant", VARIANTS)
def test_auth_and_tls_components_mount_their_secrets(rendered, variant, strict_parsers, monkeypatch):
    objects = rendered[f"{variant}+all"]
    args = serve_args(objects, monkeypatch)
    pod = pod_templates(objects)["target"]
    token_folder, token_name = os.path.split(args.auth_token_file)
    assert mounted_secret(pod, token_folder)["secretName"] == "specpipe-auth" and token_name == "token"
    cert_folder = os.path.dirname(args.tls_cert)
    assert os.path.dirname(args.tls_key) == cert_folder
    tls_secret = mounted_secret(pod, cert_folder)
    assert tls_secret["secretName"] == "specpipe-tls"
    assert (os.path.basename(args.tls_cert), os.path.basename(args.tls_key)) == ("tls.crt", "tls.key"), (
        "the file names of a kubernetes.io/tls Secret"
    )
    # The draft pod is untouched: it serves no API.
    assert pod_templates(objects)["draft"] == pod_templates(rendered[variant])["draft"]


# ---- network ------------------------------------------------------------------------------------


def policy_for(objects: dict, labels: dict) -> dict:
    found = [
        doc
        for (kind, _), doc in objects.items()
        if kind == "NetworkPolicy" and doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(found) == 1, f"expected one NetworkPolicy selecting {labels}"
    return found[0]


def allowed(policy: dict) -> dict[int, list]:
    """port -> the `from` list that may reach it ([] = anyone)."""
    ports = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP"
            ports.setdefault(port["port"], []).extend(rule.get("from", []))
    return ports


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policies_open_only_what_the_processes_use(rendered, variant, strict_parsers, monkeypatch):
    objects = rendered[variant]
    pods = pod_templates(objects)
    labels = {role: pod["metadata"]["labels"] for role, pod in pods.items()}
    args, config = serve_args(objects, monkeypatch), draft_config(objects)

    def only_from(sources: list, role: str) -> bool:
        return bool(sources) and all(
            source["podSelector"]["matchLabels"].items() <= labels[role].items()
            and not source["podSelector"]["matchLabels"].items()
            <= labels["draft" if role == "target" else "target"].items()
            for source in sources
        )

    draft_policy = policy_for(objects, labels["draft"])
    assert not draft_policy["spec"]["podSelector"]["matchLabels"].items() <= labels["target"].items()
    assert draft_policy["spec"]["policyTypes"] == ["Ingress"]
    draft_port = int(config.bind.rsplit(":", 1)[1])
    assert allowed(draft_policy).keys() == {draft_port}
    assert only_from(allowed(draft_policy)[draft_port], "target"), "the draft's port: from the target pod only"

    target_policy = policy_for(objects, labels["target"])
    target_allowed = allowed(target_policy)
    assert only_from(target_allowed[args.target_data_port], "draft"), "the data plane: from the draft pod only"
    assert {port for port, sources in target_allowed.items() if not sources} == {
        args.port,
        args.health_port,
        args.metrics_port,
    }, "open to all: the API, the probes' port, metrics"
    for role, policy in (("draft", draft_policy), ("target", target_policy)):
        assert set(allowed(policy)) <= set(container_ports(the_container(pods[role])).values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_metrics_are_scraped(rendered, variant, strict_parsers, monkeypatch):
    args = serve_args(rendered[variant], monkeypatch)
    pod = pod_templates(rendered[variant])["target"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == args.metrics_port
    objects = rendered[f"{variant}+all"]
    [monitor] = [doc for (kind, _), doc in objects.items() if kind == "ServiceMonitor"]
    [service] = [
        doc
        for (kind, _), doc in objects.items()
        if kind == "Service" and monitor["spec"]["selector"]["matchLabels"].items() <= doc["metadata"]["labels"].items()
    ]
    [endpoint] = monitor["spec"]["endpoints"]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert container_ports(the_container(pod))[port["targetPort"]] == args.metrics_port


def test_knobs_come_from_the_configmap(rendered):
    for variant in VARIANTS:
        for role, pod in pod_templates(rendered[variant]).items():
            names = {source["configMapRef"]["name"] for source in the_container(pod).get("envFrom", [])}
            assert names, f"{variant}/{role} reads no ConfigMap"
            for name in names:
                assert "SPECPIPE_LOG_LEVEL" in rendered[variant][("ConfigMap", name)]["data"]
