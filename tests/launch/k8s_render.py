"""Rendering launch/k8s with `kubectl kustomize` and reading the rendered objects as the kubelet
would: the helpers of test_k8s.py and test_k8s_security.py. Each container's command line is
expanded as the kubelet expands it ($(VAR) from env, envFrom ConfigMaps, downward-API fields, and
the LeaderWorkerSet's injected variables with the values it would give group 0) and parsed by the
real parsers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from specpipe.config import ENV_CURVE_KEYS

from deploy_parsers import parse_draft_worker, parse_serve

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "launch" / "k8s"
VARIANTS = {"deployments": K8S, "lws": K8S / "lws"}  # launch/k8s itself is the Deployments variant
COMPONENTS = ["auth", "tls", "servicemonitor"]
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
# The LeaderWorkerSet's names for group 0 (pods <name>-0 and <name>-0-1, DNS under Service <name>)
# and the address it puts in LWS_LEADER_ADDRESS; `name` is the LeaderWorkerSet's.
LWS_GROUP = 0

# For the test modules: `pytestmark = NEEDS_KUBECTL`.
NEEDS_KUBECTL = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed"
)


def kustomize(path: Path) -> dict[tuple[str, str], dict]:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    objects = {}
    for doc in yaml.safe_load_all(result.stdout):
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in objects, f"{key} rendered twice"
        assert doc.get("apiVersion"), f"{key} has no apiVersion"
        objects[key] = doc
    return objects


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """variant -> rendered objects; "<variant>+all": with every optional component (an overlay in a
    temporary folder, as an operator would write one)."""
    out = {name: kustomize(path) for name, path in VARIANTS.items()}
    for name, path in VARIANTS.items():
        overlay = tmp_path_factory.mktemp(f"overlay-{name}")
        # kustomize refuses absolute paths
        components = [os.path.relpath(K8S / "components" / component, overlay) for component in COMPONENTS]
        (overlay / "kustomization.yaml").write_text(
            yaml.safe_dump({"resources": [os.path.relpath(path, overlay)], "components": components})
        )
        out[f"{name}+all"] = kustomize(overlay)
    return out


# ---- reading pods out of either variant ------------------------------------------------------


def pod_templates(objects: dict) -> dict[str, dict]:
    """role ("target" / "draft") -> pod template (metadata + spec), whatever the workload kind."""
    pods = {}
    for (kind, name), doc in objects.items():
        if kind == "Deployment":
            pods[doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]] = doc["spec"]["template"]
        elif kind == "LeaderWorkerSet":
            template = doc["spec"]["leaderWorkerTemplate"]
            pods["target"], pods["draft"] = template["leaderTemplate"], template["workerTemplate"]
    assert set(pods) == {"target", "draft"}, f"expected a target and a draft pod, got {sorted(pods)}"
    return pods


def the_container(pod: dict) -> dict:
    [container] = pod["spec"]["containers"]
    return container


def lws_of(objects: dict) -> dict | None:
    return next((doc for (kind, _), doc in objects.items() if kind == "LeaderWorkerSet"), None)


def container_env(container: dict, objects: dict, pod_name: str, lws: dict | None) -> dict[str, str]:
    """The environment the kubelet gives the container: envFrom ConfigMaps, env values, downward-API
    fields of the pod named `pod_name`, and (in a LeaderWorkerSet) the variables it injects."""
    labels = {LWS_NAME_LABEL: lws["metadata"]["name"]} if lws else {}
    fields = {
        "metadata.name": pod_name,
        "metadata.namespace": "default",
        **{f"metadata.labels['{key}']": value for key, value in labels.items()},
    }
    env = {}
    if lws:
        env["LWS_LEADER_ADDRESS"] = f"{lws['metadata']['name']}-{LWS_GROUP}.{lws['metadata']['name']}.default"
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert ("ConfigMap", name) in objects, f"envFrom names a missing ConfigMap {name}"
        env.update(objects[("ConfigMap", name)]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "fieldRef" in item["valueFrom"]:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in fields, f"{container['name']}: env {item['name']} from an unknown field {path}"
            env[item["name"]] = fields[path]
    return env


def expand(word: str, env: dict) -> str:
    word = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(word))
    assert "$(" not in word, f"unresolved variable in {word!r}"
    return word


def pod_name(role: str, objects: dict) -> str:
    lws = lws_of(objects)
    if lws is None:
        return f"specpipe-{role}-abc12"
    return f"{lws['metadata']['name']}-{LWS_GROUP}" + ("" if role == "target" else "-1")


def argv_of(role: str, objects: dict) -> tuple[list[str], dict]:
    """(command + args as the process gets them, its environment)."""
    container = the_container(pod_templates(objects)[role])
    env = container_env(container, objects, pod_name(role, objects), lws_of(objects))
    return [expand(word, env) for word in [*container.get("command", []), *container.get("args", [])]], env


def serve_args(objects: dict, monkeypatch):
    argv, env = argv_of("target", objects)
    assert argv[:2] == ["specpipe", "serve"]
    for name in ("SPECPIPE_AUTH_TOKEN_FILE", ENV_CURVE_KEYS):  # defaults the CLI reads from the env
        if name in env:
            monkeypatch.setenv(name, env[name])
    return parse_serve(argv[2:])


def draft_config(objects: dict):
    argv, _ = argv_of("draft", objects)
    assert argv[:3] == ["python", "-m", "specpipe.draft_worker"]
    return parse_draft_worker(argv[3:])


def container_ports(container: dict) -> dict:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def bytes_of(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity))
    return float(match.group(1)) * units.get(match.group(2), 1)
