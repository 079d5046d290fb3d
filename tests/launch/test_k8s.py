"""The Kubernetes files (launch/k8s) as the cluster would get them: every variant rendered by
`kubectl kustomize` (the plain Deployments, the LeaderWorkerSet, the model volume, and each variant
with every optional component), and the rendered objects checked against the code: layout,
commands and addresses, probes, resources and placement. (Pod Security, Secrets, NetworkPolicies
and metrics: test_k8s_security.py.)

Nothing is applied: no cluster is needed, only kubectl (skipped with the reason without it). The
containers' command lines are expanded as the kubelet would and parsed by the real parsers
(`specpipe serve`, the draft worker, the probe); then addresses must lead where they must (the
draft's Service or pod name, the target's data plane), probes must ask the health services the
coordinator registers on the port it serves them on, with windows that fit a large model, and
the LeaderWorkerSet must run the same containers as the Deployments.
"""

from __future__ import annotations

import copy

import pytest
import yaml

from specpipe.config import (
    DEFAULT_DATA_PORT,
    DEFAULT_DRAFT_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    zmq_endpoint,
)
from specpipe.coordinator.server import LIVENESS_SERVICE, SERVICE_NAME
from specpipe.launch import probe as probe_entry

from deploy_parsers import flag_value, strict_parsers  # noqa: F401
from k8s_render import (
    K8S,
    LWS_GROUP,
    NEEDS_KUBECTL,
    VARIANTS,
    argv_of,
    bytes_of,
    container_ports,
    draft_config,
    kustomize,
    lws_of,
    pod_templates,
    rendered,  # noqa: F401  (a pytest fixture)
    serve_args,
    the_container,
)  # noqa: F401

pytestmark = NEEDS_KUBECTL
GPU = "nvidia.com/gpu"
# Start-up: a large model (tens of GB from network storage) gets at least this long before a probe
# gives up on it; a live process that stops answering is restarted within this long.
MIN_STARTUP_WINDOW_S = 20 * 60
MAX_LIVENESS_WINDOW_S = 5 * 60
# The example target (Llama-3.1-8B in bfloat16) is held whole in host memory while it loads.
EXAMPLE_TARGET_BYTES = 16e9


# ---- rendering and layout ---------------------------------------------------------------------


def test_every_folder_lists_its_yaml_files():
    for kustomization in K8S.rglob("kustomization.yaml"):
        folder = kustomization.parent
        listed = yaml.safe_load(kustomization.read_text())
        named = set(listed.get("resources", [])) | set(listed.get("components", []))
        for path in folder.glob("*.yaml"):
            if path.name != "kustomization.yaml":
                assert path.name in named, f"{path.relative_to(K8S)} is in no kustomization"
        assert not listed.get("namePrefix") and not listed.get("nameSuffix"), (
            f"{folder.name}: a name prefix would break the names inside container args"
        )


@pytest.mark.parametrize("variant", [*VARIANTS, *(f"{name}+all" for name in VARIANTS)])
def test_variant_renders_one_pair(rendered, variant):
    objects = rendered[variant]
    pods = pod_templates(objects)
    images = {the_container(pod)["image"] for pod in pods.values()}
    assert len(images) == 1 and "/" in images.pop(), "both pods run the image named in common/"
    for (kind, _), doc in objects.items():
        if kind in ("Deployment", "LeaderWorkerSet", "Service", "NetworkPolicy", "ConfigMap"):
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "specpipe"
    assert not [key for key in objects if key[0] == "PersistentVolumeClaim"], (
        "the model volume must live outside the app (launch/k8s/models): deleting the app keeps the models"
    )


def test_models_volume_can_be_filled_and_is_what_the_pods_mount(rendered):
    models = kustomize(K8S / "models")
    [claim] = [doc for (kind, _), doc in models.items() if kind == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "pods on two nodes, filled once: ReadWriteMany"
    [job] = [doc for (kind, _), doc in models.items() if kind == "Job"]
    job_pod = job["spec"]["template"]["spec"]
    [mount] = the_container(job["spec"]["template"])["volumeMounts"]
    assert not mount.get("readOnly"), "the fill job writes the volume"
    assert {v["name"]: v for v in job_pod["volumes"]}[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim[
        "metadata"
    ]["name"]
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
    assert (args.port, args.health_port, args.metrics_port, args.target_data_port) == (
        DEFAULT_GRPC_PORT,
        DEFAULT_HEALTH_PORT,
        DEFAULT_METRICS_PORT,
        DEFAULT_DATA_PORT,
    )
    assert (ports["grpc"], ports["health"], ports["metrics"], ports["data"]) == (
        args.port,
        args.health_port,
        args.metrics_port,
        args.target_data_port,
    )
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
    if lws is None:  # Services: the draft's, and the target's data-plane port
        draft_service = objects[("Service", "specpipe-draft")]
        assert (
            draft_service["spec"]["selector"].items() <= pod_templates(objects)["draft"]["metadata"]["labels"].items()
        )
        [port] = draft_service["spec"]["ports"]
        assert args.draft_addr == f"tcp://specpipe-draft:{port['port']}" and port["targetPort"] == "draft"
        target_service = objects[("Service", "specpipe")]
        [data] = [p for p in target_service["spec"]["ports"] if p["name"] == "data"]
        assert config.target_data_addr == f"tcp://specpipe:{data['port']}" and data["targetPort"] == "data"
    else:  # pod DNS names in the LeaderWorkerSet's headless Service
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
        assert bytes_of(resources["requests"]["memory"]) == bytes_of(resources["limits"]["memory"]), (
            f"{role}: memory requests equal limits (not evicted first, not OOM-killed for a neighbour)"
        )
        memory[role] = bytes_of(resources["limits"]["memory"])
        assert pod["spec"]["nodeSelector"], f"{role}: no GPU node selection knob"
        assert any(t["key"] == GPU for t in pod["spec"]["tolerations"]), f"{role}: no GPU taint toleration"
        shm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in the_container(pod)["volumeMounts"]
    assert memory["target"] >= EXAMPLE_TARGET_BYTES * 1.25, "the target is held in host memory while it loads"
    assert memory["target"] > memory["draft"]
