"""The deployment files (Dockerfile, launch/k8s, launch/slurm) checked statically against the code.

Nothing is built, applied or submitted: Docker, kubectl and Slurm need not be installed (bash
is). Instead every number and flag in the files is compared with what the code really has:
ports with `specpipe.config`'s defaults, each container or job-step command with the real
argparse parsers (`add_serve_args` for `specpipe serve`, `launch.worker.parse_config` for the
draft worker), the serve command's `--draft-addr` with the draft Service, the draft's `--target-data-addr` with
the target's data-plane port and Service, the probes with the grpc.health.v1 service the
coordinator registers, the model paths with the volume mount, the entrypoint with pyproject's
console script; the torchrun job's command with torchrun's own parser and the torchrun entry's.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import types
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from specpipe.config import DEFAULT_DATA_PORT, DEFAULT_DRAFT_PORT, DEFAULT_GRPC_PORT, DEFAULT_TARGET_PORT, zmq_endpoint
from specpipe.launch import torchrun as torchrun_entry
from specpipe.launch import worker as worker_entry
from specpipe.launch.cli import add_serve_args
from specpipe.proto.specpipe.v1 import specpipe_pb2

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "launch" / "k8s"
SBATCH = ROOT / "launch" / "slurm" / "specpipe.sbatch"
SBATCH_TORCHRUN = ROOT / "launch" / "slurm" / "specpipe-torchrun.sbatch"
DOCKERFILE = ROOT / "Dockerfile"
# The health service names the coordinator sets (coordinator/server.py: "" and the API service).
HEALTH_SERVICES = {"", specpipe_pb2.DESCRIPTOR.services_by_name["SpecPipe"].full_name}
GPU = "nvidia.com/gpu"
MODEL_FLAGS = ("--model", "--target", "--draft")


class StrictParser(argparse.ArgumentParser):
    """argparse that takes flags only as spelled in full (a file must not lean on argparse's
    prefix matching) and raises with argparse's own message instead of exiting."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message):
        raise AssertionError(f"{self.prog}: {message}")


@pytest.fixture(autouse=True)
def _strict_argparse(monkeypatch):
    # parse_config builds its own parser: make that one strict too (through the worker module's
    # view of argparse only; argparse itself stays untouched).
    strict = types.SimpleNamespace(**{**vars(argparse), "ArgumentParser": StrictParser})
    monkeypatch.setattr(worker_entry, "argparse", strict)
    monkeypatch.setattr(torchrun_entry, "argparse", strict)


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = StrictParser(prog="specpipe serve")
    add_serve_args(parser)
    return parser.parse_args(argv)


def parse_draft_worker(argv: list[str]):
    return worker_entry.parse_config("draft", argv)


def flag_value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.fixture(autouse=True)
def _no_address_env(monkeypatch):
    # add_serve_args reads these as defaults; the files must not depend on the test's environment.
    for name in ("SPECPIPE_DRAFT_ADDR", "SPECPIPE_TARGET_ADDR", "SPECPIPE_BIND_HOST"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- Kubernetes ---------------------------------------------------------------------------------

def k8s_objects() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    by_key = {}
    for doc in k8s_objects():
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in by_key, f"{key} defined twice"
        by_key[key] = doc
    return by_key


def deployments(objects) -> list[dict]:
    found = [doc for (kind, _), doc in objects.items() if kind in ("Deployment", "StatefulSet")]
    assert len(found) == 2, "expected one workload for the draft and one for target + coordinator"
    return found


def the_container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container per pod"
    return containers[0]


def argv_of(container: dict, objects) -> list[str]:
    """command + args with Kubernetes' $(VAR) expansion from env and envFrom ConfigMaps."""
    env = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert ("ConfigMap", name) in objects, f"envFrom names a missing ConfigMap {name}"
        env.update(objects[("ConfigMap", name)]["data"])
    env.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    argv = []
    for word in [*container.get("command", []), *container.get("args", [])]:
        word = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(word))
        assert "$(" not in word, f"{container['name']}: unresolved variable in {word!r}"
        argv.append(word)
    return argv


def workload_for(objects, module_or_script: str) -> tuple[dict, list[str]]:
    for workload in deployments(objects):
        argv = argv_of(the_container(workload), objects)
        if module_or_script in argv[:3]:
            return workload, argv
    pytest.fail(f"no workload runs {module_or_script}")


def service_for(objects, workload: dict) -> dict:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    found = [doc for (kind, _), doc in objects.items()
             if kind == "Service" and doc["spec"]["selector"].items() <= labels.items()]
    assert len(found) == 1, f"expected one Service selecting {workload['metadata']['name']}'s pods"
    return found[0]


def service_port(service: dict, number: int) -> dict:
    found = [port for port in service["spec"]["ports"] if port["port"] == number]
    assert len(found) == 1, f"Service {service['metadata']['name']} has no single port {number}"
    return found[0]


def container_port(container: dict, target_port) -> int:
    for port in container["ports"]:
        if target_port in (port["containerPort"], port.get("name")):
            return port["containerPort"]
    pytest.fail(f"Service targetPort {target_port!r} is no port of container {container['name']}")


def test_kustomization_lists_every_yaml():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert not kustomization.get("namePrefix") and not kustomization.get("nameSuffix"), \
        "a name prefix would break the DNS name in --draft-addr"
    images = {image["name"] for image in kustomization.get("images", [])}
    for workload in deployments({(d["kind"], d["metadata"]["name"]): d for d in k8s_objects()}):
        assert the_container(workload)["image"] in images


def test_every_object_is_well_formed(objects):
    for (kind, name), doc in objects.items():
        assert doc.get("apiVersion"), f"{kind} {name} has no apiVersion"
    for workload in deployments(objects):
        spec = workload["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_draft_worker_pod_and_service(objects):
    workload, argv = workload_for(objects, "specpipe.draft_worker")
    assert argv[:3] == ["python", "-m", "specpipe.draft_worker"]
    assert importlib.util.find_spec("specpipe.draft_worker.__main__") is not None
    config = parse_draft_worker(argv[3:])
    # Inside a pod the worker must bind every interface, and it says so with a flag.
    assert flag_value(argv, "--host") == "0.0.0.0"
    assert config.bind == zmq_endpoint("0.0.0.0", DEFAULT_DRAFT_PORT)

    service = service_for(objects, workload)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    [port] = service["spec"]["ports"]
    assert port["port"] == DEFAULT_DRAFT_PORT
    assert container_port(the_container(workload), port.get("targetPort", port["port"])) == DEFAULT_DRAFT_PORT


def test_serve_pod_uses_the_draft_service(objects):
    draft_workload, _ = workload_for(objects, "specpipe.draft_worker")
    draft_service = service_for(objects, draft_workload)
    workload, argv = workload_for(objects, "specpipe")
    assert argv[:2] == ["specpipe", "serve"]
    args = parse_serve(argv[2:])
    assert args.host == "0.0.0.0" and flag_value(argv, "--host") == "0.0.0.0"
    assert args.port == DEFAULT_GRPC_PORT
    assert args.draft_addr == f"tcp://{draft_service['metadata']['name']}:{draft_service['spec']['ports'][0]['port']}"
    assert args.target_addr is None, "serve spawns the target worker in its own pod"
    assert args.target and args.draft, "serve needs both models named (no demo-pair fallback in a pod)"

    service = service_for(objects, workload)
    port = service_port(service, DEFAULT_GRPC_PORT)
    assert container_port(the_container(workload), port.get("targetPort", port["port"])) == DEFAULT_GRPC_PORT


def test_draft_reaches_the_target_data_plane(objects):
    """The draft sends its q to tcp://<target Service>:<port>, that port leads to the container port
    the spawned target binds (--target-data-port), on an interface the Service can reach."""
    workload, serve_argv = workload_for(objects, "specpipe")
    args = parse_serve(serve_argv[2:])
    assert args.target_data_port == DEFAULT_DATA_PORT
    assert args.worker_host == "0.0.0.0", "the target must bind the pod's interfaces for the draft pod"
    service = service_for(objects, workload)
    port = service_port(service, DEFAULT_DATA_PORT)
    assert container_port(the_container(workload), port.get("targetPort", port["port"])) == args.target_data_port

    _, draft_argv = workload_for(objects, "specpipe.draft_worker")
    config = parse_draft_worker(draft_argv[3:])
    assert config.target_data_addr == f"tcp://{service['metadata']['name']}:{port['port']}"


def test_serve_pod_probes_are_grpc_health(objects):
    workload, _ = workload_for(objects, "specpipe")
    container = the_container(workload)
    for kind in ("readinessProbe", "livenessProbe"):
        assert kind in container, f"the serve container has no {kind}"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            probe = container[kind]
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
            assert probe["grpc"]["port"] == DEFAULT_GRPC_PORT, kind
            assert probe["grpc"].get("service", "") in HEALTH_SERVICES, kind


@pytest.mark.parametrize("resources", ["requests", "limits"])
def test_each_pod_gets_a_gpu(objects, resources):
    for workload in deployments(objects):
        assert int(the_container(workload)["resources"][resources][GPU]) == 1, workload["metadata"]["name"]


def test_models_come_from_the_read_only_volume(objects):
    for workload in deployments(objects):
        container = the_container(workload)
        volumes = {volume["name"]: volume for volume in workload["spec"]["template"]["spec"]["volumes"]}
        [mount] = container["volumeMounts"]
        assert mount.get("readOnly") is True
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert ("PersistentVolumeClaim", claim) in objects, f"no PersistentVolumeClaim {claim}"
        argv = argv_of(container, objects)
        paths = [flag_value(argv, flag) for flag in MODEL_FLAGS if flag in argv]
        assert paths, f"{workload['metadata']['name']} names no model"
        for path in paths:
            assert path.startswith(mount["mountPath"].rstrip("/") + "/"), path


def test_knobs_come_from_the_configmap(objects):
    for workload in deployments(objects):
        container = the_container(workload)
        names = {source["configMapRef"]["name"] for source in container.get("envFrom", [])}
        assert names, f"{workload['metadata']['name']} reads no ConfigMap"
        for name in names:
            assert "SPECPIPE_LOG_LEVEL" in objects[("ConfigMap", name)]["data"]


# ---- Slurm --------------------------------------------------------------------------------------

# What the scripts compute at run time (node names and addresses), set to fixed values for the test.
SLURM_RUNTIME = {"DRAFT_ADDR_HOST": "10.0.0.2", "DRAFT_HOST": "10.0.0.2", "GRPC_HOST": "10.0.0.1",
                 "SERVE_ADDR_HOST": "10.0.0.1", "TARGET_HOST": "10.0.0.1", "HEAD": "node1"}


def sbatch_command(pattern: str, path: Path = SBATCH) -> list[str]:
    """The words of the script's one line matching `pattern`, as bash expands them with the
    script's own knob defaults (the block between the `# ---- knobs` and `# ----` lines)."""
    text = path.read_text()
    knobs = re.search(r"^# ---- knobs.*?\n(.*?)^# ----", text, re.S | re.M)
    assert knobs, "the knob block is gone"
    [line] = [line for line in text.splitlines() if re.search(pattern, line)]
    words = line.strip().rstrip("\\").strip()
    assignments = "".join(f"{name}={value}\n" for name, value in SLURM_RUNTIME.items())
    script = f"{knobs.group(1)}\nPYTHON=\"$VENV/bin/python\"\n{assignments}printf '%s\\0' {words}"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=5,
                            env={"HOME": "/home/user", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\0")[:-1]


@pytest.mark.parametrize("path", [SBATCH, SBATCH_TORCHRUN], ids=lambda path: path.name)
def test_sbatch_is_valid_bash(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=5)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", [SBATCH, SBATCH_TORCHRUN], ids=lambda path: path.name)
def test_sbatch_asks_for_two_nodes_and_cleans_up(path):
    text = path.read_text()
    assert re.search(r"^#SBATCH --nodes=2\b", text, re.M)
    assert "scontrol show hostnames" in text
    assert re.search(r"^trap \S+ .*EXIT", text, re.M), "no clean-up trap on exit"


def test_sbatch_draft_worker_command_parses():
    argv = sbatch_command(r"-m specpipe\.draft_worker ")
    assert argv[0] == "/home/user/specpipe/.venv/bin/python" and argv[1:3] == ["-m", "specpipe.draft_worker"]
    config = parse_draft_worker(argv[3:])
    # Bound to the draft node's own address, not every interface.
    assert config.bind == zmq_endpoint(SLURM_RUNTIME["DRAFT_HOST"], DEFAULT_DRAFT_PORT)
    # Its q go to the target's data plane on the first node (the port serve gives the target).
    assert config.target_data_addr == zmq_endpoint(SLURM_RUNTIME["SERVE_ADDR_HOST"], DEFAULT_DATA_PORT)


def test_sbatch_serve_command_parses_and_reaches_the_draft(pyproject):
    argv = sbatch_command(r'/specpipe" serve ')
    [script] = pyproject["project"]["scripts"]
    assert argv[0] == f"/home/user/specpipe/.venv/bin/{script}" and argv[1] == "serve"
    args = parse_serve(argv[2:])
    assert (args.host, args.port) == (SLURM_RUNTIME["GRPC_HOST"], DEFAULT_GRPC_PORT)
    assert args.draft_addr == zmq_endpoint(SLURM_RUNTIME["DRAFT_ADDR_HOST"], DEFAULT_DRAFT_PORT)
    assert args.target_addr is None and args.target and args.draft
    # The spawned target binds the first node's address (reachable from the draft's node) with
    # the data-plane port the draft sends to.
    assert args.worker_host == SLURM_RUNTIME["TARGET_HOST"] == SLURM_RUNTIME["SERVE_ADDR_HOST"]
    assert args.target_data_port == DEFAULT_DATA_PORT


def test_sbatch_torchrun_command_parses():
    from torch.distributed.run import get_args_parser

    argv = sbatch_command(r"-m specpipe\.launch\.torchrun ", SBATCH_TORCHRUN)
    assert argv[0] == "/home/user/specpipe/.venv/bin/torchrun"
    launcher = get_args_parser().parse_args(argv[1:])
    assert (launcher.nnodes, launcher.nproc_per_node) == ("2", "1")
    assert launcher.rdzv_backend == "c10d" and launcher.rdzv_endpoint == f"{SLURM_RUNTIME['HEAD']}:29500"
    assert launcher.module and launcher.training_script == "specpipe.launch.torchrun"
    args = torchrun_entry.build_parser().parse_args(launcher.training_script_args)
    assert args.port == DEFAULT_GRPC_PORT and args.target and args.draft
    # One command for both nodes: each binds its own address, whichever becomes rank 0.
    assert args.host == args.worker_host == torchrun_entry.AUTO_HOST
    assert args.transport == "torch"
    assert args.target_device is None and args.draft_device is None, "devices come from LOCAL_RANK"


# ---- Docker -------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_exposes_the_default_ports():
    exposed = {int(port.split("/")[0]) for op, rest in dockerfile_instructions() if op == "EXPOSE"
               for port in rest.split()}
    assert exposed == {DEFAULT_GRPC_PORT, DEFAULT_DRAFT_PORT, DEFAULT_TARGET_PORT, DEFAULT_DATA_PORT}


def test_dockerfile_entrypoint_and_pins(pyproject):
    instructions = dockerfile_instructions()
    ops = dict(instructions)
    assert ops["FROM"] == "python:3.11-slim"
    assert yaml.safe_load(ops["ENTRYPOINT"]) == list(pyproject["project"]["scripts"])
    assert pyproject["project"]["scripts"]["specpipe"] == "specpipe.launch.cli:main"
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # The image installs the tested torch (constraints.txt), inside the range the package declares.
    [tested] = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    assert tested == f"torch=={args['TORCH_VERSION']}"
    [torch_range] = [dep for dep in pyproject["project"]["dependencies"] if re.match(r"torch\b", dep)]
    assert SpecifierSet(torch_range.removeprefix("torch")).contains(args["TORCH_VERSION"]), torch_range
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"


def test_dockerignore_keeps_what_the_install_needs(pyproject):
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    needed = {"pyproject.toml", pyproject["project"]["readme"],
              *pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert not ignored & needed
