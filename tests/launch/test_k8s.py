"""The Kubernetes files (launch/k8s) as the cluster would get them: every variant rendered by
`kubectl kustomize` (the plain Deployments, the LeaderWorkerSet, the model volume, and each variant
with every optional component), and the rendered objects checked against the code.

Nothing is applied: no cluster is needed, only kubectl (skipped with the reason without it). Each
container's command line is expanded as the kubelet would ($(VAR) from env, envFrom ConfigMaps,
downward-API fields, and the LeaderWorkerSet's injected variables with the values it would give
group 0) and parsed by the real parsers (`specpipe serve`, the draft worker, the probe). Then:
addresses lead where they must (the draft's Service or pod name, the target's data plane), probes
ask the health services the coordinator registers on the port it serves them on, with timeouts
that fit a large model, resources and GPU placement are set, every pod meets Pod Security
"restricted", the Secret layouts are what the key loaders read (a real CURVE folder is projected
as the kubelet would and loaded), the NetworkPolicies select the pods' labels and open exactly the
ports the processes use, and the LeaderWorkerSet runs the same containers as the Deployments.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from specpipe import curve
from specpipe.config import (DEFAULT_DATA_PORT, DEFAULT_DRAFT_PORT, DEFAULT_GRPC_PORT, DEFAULT_HEALTH_PORT,
                             DEFAULT_METRICS_PORT, ENV_CURVE_KEYS, zmq_endpoint)
from specpipe.coordinator.server import LIVENESS_SERVICE, SERVICE_NAME
from specpipe.launch import probe as probe_entry

from deploy_parsers import flag_value, parse_draft_worker, parse_serve, strict_parsers  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "launch" / "k8s"
VARIANTS = {"deployments": K8S, "lws": K8S / "lws"}   # launch/k8s itself is the Deployments variant
COMPONENTS = ["auth", "tls", "servicemonitor"]
GPU = "nvidia.com/gpu"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
# The LeaderWorkerSet's names for group 0 (pods <name>-0 and <name>-0-1, DNS under Service <name>)
# and the address it puts in LWS_LEADER_ADDRESS; `name` is the LeaderWorkerSet's.
LWS_GROUP = 0
# Start-up: a large model (tens of GB from network storage) gets at least this long before a probe
# gives up on it; a live process that stops answering is restarted within this long.
MIN_STARTUP_WINDOW_S = 20 * 60
MAX_LIVENESS_WINDOW_S = 5 * 60
# The example target (Llama-3.1-8B in bfloat16) is held whole in host memory while it loads.
EXAMPLE_TARGET_BYTES = 16e9
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed")


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
        relative = lambda target: os.path.relpath(target, overlay)   # kustomize refuses absolute paths
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": [relative(path)],
            "components": [relative(K8S / "components" / component) for component in COMPONENTS]}))
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
    fields = {"metadata.name": pod_name, "metadata.namespace": "default",
              **{f"metadata.labels['{key}']": value for key, value in labels.items()}}
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
    for name in ("SPECPIPE_AUTH_TOKEN_FILE", ENV_CURVE_KEYS):   # defaults the CLI reads from the env
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


# ---- rendering and layout ---------------------------------------------------------------------

def test_every_folder_lists_its_yaml_files():
    for kustomization in K8S.rglob("kustomization.yaml"):
        folder = kustomization.parent
        listed = yaml.safe_load(kustomization.read_text())
        named = set(listed.get("resources", [])) | set(listed.get("components", []))
        for path in folder.glob("*.yaml"):
            if path.name != "kustomization.yaml":
                assert path.name in named, f"{path.relative_to(K8S)} is in no kustomization"
        assert not listed.get("namePrefix") and not listed.get("nameSuffix"), \
            f"{folder.name}: a name prefix would break the names inside container args"


@pytest.mark.parametrize("variant", [*VARIANTS, *(f"{name}+all" for name in VARIANTS)])
def test_variant_renders_one_pair(rendered, variant):
    objects = rendered[variant]
    pods = pod_templates(objects)
    images = {the_container(pod)["image"] for pod in pods.values()}
    assert len(images) == 1 and "/" in images.pop(), "both pods run the image named in common/"
    for (kind, _), doc in objects.items():
        if kind in ("Deployment", "LeaderWorkerSet", "Service", "NetworkPolicy", "ConfigMap"):
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "specpipe"
    assert not [key for key in objects if key[0] == "PersistentVolumeClaim"], \
        "the model volume must live outside the app (launch/k8s/models): deleting the app keeps the models"


def test_models_volume_can_be_filled_and_is_what_the_pods_mount(rendered):
    models = kustomize(K8S / "models")
    [claim] = [doc for (kind, _), doc in models.items() if kind == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on two nodes, filled once: ReadWriteMany"
    [job] = [doc for (kind, _), doc in models.items() if kind == "Job"]
    job_pod = job["spec"]["template"]["spec"]
    [mount] = the_container(job["spec"]["template"])["volumeMounts"]
    assert not mount.get("readOnly"), "the fill job writes the volume"
    assert {v["name"]: v for v in job_pod["volumes"]}[mount["name"]]["persistentVolumeClaim"]["claimName"] == \
        claim["metadata"]["name"]
    script = " ".join(the_container(job["spec"]["template"])["command"])
    env = {item["name"] for item in the_container(job["spec"]["template"])["env"]}
    assert {"TARGET_MODEL", "DRAFT_MODEL"} <= env and "/models/{role}" in script
    for variant in VARIANTS:
        for role, pod in pod_templates(rendered[variant]).items():
            volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
            [models_mount] = [m for m in the_container(pod)["volumeMounts"] if m["mountPath"] == "/models"]
            assert models_mount["readOnly"] is True
            assert volumes[models_mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            argv, _ = argv_of(role, rendered[variant])
            for flag in ("--model", "--target", "--draft"):
                if flag in argv:
                    assert flag_value(argv, flag).startswith("/models/"), (variant, role, flag)


# ---- commands and addresses -------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_command(rendered, variant, strict_parsers, monkeypatch):
    objects = rendered[variant]
    args = serve_args(objects, monkeypatch)
    container = the_container(pod_templates(objects)["target"])
    ports = container_ports(container)
    assert args.host == "0.0.0.0" and args.worker_host == "0.0.0.0", "a pod's processes must bind its interfaces"
    assert (args.port, args.health_port, args.metrics_port, args.target_data_port) == \
        (DEFAULT_GRPC_PORT, DEFAULT_HEALTH_PORT, DEFAULT_METRICS_PORT, DEFAULT_DATA_PORT)
    assert (ports["grpc"], ports["health"], ports["metrics"], ports["data"]) == \
        (args.port, args.health_port, args.metrics_port, args.target_data_port)
    assert args.target_device == "cuda", "a CPU-only image must fail, not run a GPU pod on the CPU"
    assert args.target_startup_timeout == 0, "the startup probe decides how long a load may take"
    assert args.target_addr is None and args.target and args.draft
    assert args.curve_keys, "the worker sockets run CURVE"


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_reaches_its_draft_and_the_draft_the_target_data_plane(rendered, variant, strict_parsers, monkeypatch):
    objects = rendered[variant]
    args, config = serve_args(objects, monkeypatch), draft_config(objects)
    assert config.bind == zmq_endpoint("0.0.0.0", DEFAULT_DRAFT_PORT)
    assert config.device == "cuda"
    lws = lws_of(objects)
    if lws is None:   # Services: the draft's, and the target's data-plane port
        draft_service = objects[("Service", "specpipe-draft")]
        assert draft_service["spec"]["selector"].items() <= pod_templates(objects)["draft"]["metadata"]["labels"].items()
        [port] = draft_service["spec"]["ports"]
        assert args.draft_addr == f"tcp://specpipe-draft:{port['port']}" and port["targetPort"] == "draft"
        target_service = objects[("Service", "specpipe")]
        [data] = [p for p in target_service["spec"]["ports"] if p["name"] == "data"]
        assert config.target_data_addr == f"tcp://specpipe:{data['port']}" and data["targetPort"] == "data"
    else:             # pod DNS names in the LeaderWorkerSet's headless Service
        name = lws["metadata"]["name"]
        assert lws["spec"]["networkConfig"]["subdomainPolicy"] == "Shared"
        assert args.draft_addr == f"tcp://{name}-{LWS_GROUP}-1.{name}:{DEFAULT_DRAFT_PORT}"
        assert config.target_data_addr == f"tcp://{name}-{LWS_GROUP}.{name}.default:{DEFAULT_DATA_PORT}"
    assert config.target_data_addr.endswith(f":{args.target_data_port}")


def test_lws_pairs_are_one_unit_running_the_deployments_containers(rendered):
    lws = lws_of(rendered["lws"])
    spec = lws["spec"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    assert spec["leaderWorkerTemplate"]["size"] == 2, "one leader (target + coordinator), one worker (draft)"
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart", "the pair restarts together"
    assert spec["startupPolicy"] == "LeaderCreated", "the draft does not wait for the target to be ready"
    assert int(spec["replicas"]) >= 1
    # The API Service selects the leaders only.
    service = rendered["lws"][("Service", "specpipe")]
    pods = pod_templates(rendered["lws"])
    assert service["spec"]["selector"].items() <= pods["target"]["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= pods["draft"]["metadata"]["labels"].items()
    # Same containers as the plain variant, but for the addresses.
    plain = pod_templates(rendered["deployments"])
    for role, pod in pods.items():
        ours, theirs = copy.deepcopy(the_container(pod)), copy.deepcopy(the_container(plain[role]))
        for container in (ours, theirs):
            for flag in ("--draft-addr", "--target-data-addr"):
                if flag in container["args"]:
                    container["args"][container["args"].index(flag) + 1] = "ADDR"
            container["env"] = [item for item in container["env"] if "valueFrom" not in item]
        assert ours == theirs, f"the {role} container differs between the LeaderWorkerSet and the Deployment"
        assert pod["spec"]["volumes"] == plain[role]["spec"]["volumes"]
        assert pod["spec"]["securityContext"] == plain[role]["spec"]["securityContext"]


# ---- probes, resources, placement --------------------------------------------------------------

@pytest.mark.parametrize("variant", [*VARIANTS, "deployments+all"])
def test_target_probes_ask_the_plain_health_port(rendered, variant, strict_parsers, monkeypatch):
    objects = rendered[variant]
    args = serve_args(objects, monkeypatch)
    container = the_container(pod_templates(objects)["target"])
    expected = {"startupProbe": SERVICE_NAME, "readinessProbe": SERVICE_NAME, "livenessProbe": LIVENESS_SERVICE}
    for kind, service in expected.items():
        probe = container[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        # The kubelet's gRPC probes speak no TLS: the plain-text health port, never the API's.
        assert probe["grpc"]["port"] == args.health_port != args.port, kind
        assert probe["grpc"]["service"] == service, kind
        assert probe["timeoutSeconds"] >= 2, f"{kind}: the 1 s default is too short for a busy host"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_WINDOW_S
    liveness = container["livenessProbe"]
    assert 30 <= liveness["periodSeconds"] * liveness["failureThreshold"] <= MAX_LIVENESS_WINDOW_S


@pytest.mark.parametrize("variant", VARIANTS)
def test_draft_probes_ping_its_event_loop(rendered, variant, strict_parsers):
    objects = rendered[variant]
    config = draft_config(objects)
    container = the_container(pod_templates(objects)["draft"])
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        command = probe["exec"]["command"]
        assert command[:3] == ["python", "-m", "specpipe.launch.probe"], kind
        probe_args = probe_entry.build_parser().parse_args(command[3:])
        # The worker binds 0.0.0.0, so the pod's loopback reaches the same socket.
        assert probe_args.endpoint == zmq_endpoint("127.0.0.1", int(config.bind.rsplit(":", 1)[1])), kind
        assert probe_args.timeout < probe["timeoutSeconds"], f"{kind}: the kubelet must outwait the probe"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_WINDOW_S
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= MAX_LIVENESS_WINDOW_S


@pytest.mark.parametrize("variant", VARIANTS)
def test_resources_and_gpu_placement(rendered, variant):
    pods = pod_templates(rendered[variant])
    memory = {}
    for role, pod in pods.items():
        resources = the_container(pod)["resources"]
        for kind in ("requests", "limits"):
            assert int(resources[kind][GPU]) == 1, (role, kind)
            assert resources[kind]["cpu"] and resources[kind]["memory"], (role, kind)
        assert bytes_of(resources["requests"]["memory"]) == bytes_of(resources["limits"]["memory"]), \
            f"{role}: memory requests equal limits (not evicted first, not OOM-killed for a neighbour)"
        memory[role] = bytes_of(resources["limits"]["memory"])
        assert pod["spec"]["nodeSelector"], f"{role}: no GPU node selection knob"
        assert any(t["key"] == GPU for t in pod["spec"]["tolerations"]), f"{role}: no GPU taint toleration"
        shm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in the_container(pod)["volumeMounts"]
    assert memory["target"] >= EXAMPLE_TARGET_BYTES * 1.25, "the target is held in host memory while it loads"
    assert memory["target"] > memory["draft"]


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
        if ctx.get("capabilities", {}).get("drop") != ["ALL"] or \
                set(ctx.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities must drop ALL")
        if not (ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True):
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
    assert (os.path.basename(args.tls_cert), os.path.basename(args.tls_key)) == ("tls.crt", "tls.key"), \
        "the file names of a kubernetes.io/tls Secret"
    # The draft pod is untouched: it serves no API.
    assert pod_templates(objects)["draft"] == pod_templates(rendered[variant])["draft"]


# ---- network ------------------------------------------------------------------------------------

def policy_for(objects: dict, labels: dict) -> dict:
    found = [doc for (kind, _), doc in objects.items() if kind == "NetworkPolicy"
             and doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
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
        return bool(sources) and all(source["podSelector"]["matchLabels"].items() <= labels[role].items()
                                     and not source["podSelector"]["matchLabels"].items() <= labels[
                                         "draft" if role == "target" else "target"].items()
                                     for source in sources)

    draft_policy = policy_for(objects, labels["draft"])
    assert not draft_policy["spec"]["podSelector"]["matchLabels"].items() <= labels["target"].items()
    assert draft_policy["spec"]["policyTypes"] == ["Ingress"]
    draft_port = int(config.bind.rsplit(":", 1)[1])
    assert allowed(draft_policy).keys() == {draft_port}
    assert only_from(allowed(draft_policy)[draft_port], "target"), "the draft's port: from the target pod only"

    target_policy = policy_for(objects, labels["target"])
    target_allowed = allowed(target_policy)
    assert only_from(target_allowed[args.target_data_port], "draft"), "the data plane: from the draft pod only"
    assert {port for port, sources in target_allowed.items() if not sources} == \
        {args.port, args.health_port, args.metrics_port}, "open to all: the API, the probes' port, metrics"
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
    [service] = [doc for (kind, _), doc in objects.items() if kind == "Service"
                 and monitor["spec"]["selector"]["matchLabels"].items() <= doc["metadata"]["labels"].items()]
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
