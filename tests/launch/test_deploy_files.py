"""The Dockerfile checked statically against the code: nothing is built (no Docker engine needed).

Its build targets (`cuda`, the default, and `cpu`) are read stage by stage: each installs the
torch that pyproject pins from the index its name says, then the project, and runs as the non-root
user the Kubernetes manifests expect; the ports it exposes are specpipe.config's; the entrypoint is
pyproject's console script; .dockerignore keeps what `pip install .` needs. The Kubernetes files
are checked in test_k8s.py, the Slurm scripts in test_slurm.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from specpipe.config import (
    DEFAULT_DATA_PORT,
    DEFAULT_DRAFT_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HEALTH_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_TARGET_PORT,
    zmq_endpoint,
)

from deploy_parsers import flag_value, parse_draft_worker, parse_serve, strict_parsers  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# The uid the Kubernetes manifests run as (runAsUser): the image's user must have it.
POD_UID = 1000


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def stages() -> dict[str, list[tuple[str, str]]]:
    """stage name -> its instructions, each stage with those of the stages it is built FROM."""
    found, current, global_args = {}, None, []
    for op, rest in instructions():
        if op == "FROM":
            base, _, name = rest.partition(" AS ")
            current = name.strip()
            found[current] = list(found.get(base.strip(), [("FROM", base.strip())]))
        elif current is None:
            global_args.append((op, rest))
        else:
            found[current].append((op, rest))
    return {name: global_args + body for name, body in found.items()}


def build_args(body) -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in body if op == "ARG" and "=" in rest)


def test_targets_and_default(pyproject):
    built = stages()
    assert {"cuda", "cpu"} <= set(built)
    assert list(built)[-1] == "cuda", "a plain `docker build .` must give the GPU image"
    # The image installs the tested torch (constraints.txt), inside the range the package declares.
    [tested] = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    [torch_range] = [dep for dep in pyproject["project"]["dependencies"] if re.match(r"torch\b", dep)]
    for target, index in (("cuda", "CUDA_INDEX_URL"), ("cpu", "CPU_INDEX_URL")):
        body = built[target]
        args = build_args(body)
        assert tested == f"torch=={args['TORCH_VERSION']}", target
        assert SpecifierSet(torch_range.removeprefix("torch")).contains(args["TORCH_VERSION"]), torch_range
        url = args[index]
        assert url.startswith("https://download.pytorch.org/whl/") and (url.endswith("/cpu") == (target == "cpu"))
        runs = [rest for op, rest in body if op == "RUN"]
        assert any(f'--index-url "${index}"' in run and '"torch==$TORCH_VERSION"' in run for run in runs), target
        assert runs[-1] == "pip install .", f"{target}: the project is installed last, over its torch"
        assert dict(body)["FROM"] == "python:3.11-slim"


def test_cuda_target_says_what_driver_it_needs():
    env = " ".join(rest for op, rest in stages()["cuda"] if op == "ENV")
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "compute" in env
    assert re.search(r'NVIDIA_REQUIRE_CUDA="cuda>=\d+\.\d+"', env)
    version = re.search(r"cu(\d+)(\d)$", build_args(stages()["cuda"])["CUDA_INDEX_URL"])
    assert f'cuda>={version.group(1)}.{version.group(2)}"' in env, "the requirement matches the wheel's CUDA"


def test_exposes_the_default_ports():
    for target, body in stages().items():
        if target in ("cuda", "cpu"):
            exposed = {int(port.split("/")[0]) for op, rest in body if op == "EXPOSE" for port in rest.split()}
            assert exposed == {
                DEFAULT_GRPC_PORT,
                DEFAULT_HEALTH_PORT,
                DEFAULT_DRAFT_PORT,
                DEFAULT_TARGET_PORT,
                DEFAULT_DATA_PORT,
                DEFAULT_METRICS_PORT,
            }


def test_entrypoint_and_user(pyproject):
    assert pyproject["project"]["scripts"]["specpipe"] == "specpipe.launch.cli:main"
    for target in ("cuda", "cpu"):
        body = stages()[target]
        ops = dict(body)
        assert yaml.safe_load(ops["ENTRYPOINT"]) == list(pyproject["project"]["scripts"])
        users = [rest for op, rest in body if op == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{target}: the image must not run as root"
        assert any(op == "RUN" and f"--uid {POD_UID} {users[-1]}" in rest for op, rest in body)


def test_docker_run_examples_publish_mount_and_give_gpus(strict_parsers):
    """Each `docker run` example in the Dockerfile's header: the container command parses with the
    real parser, binds the container's interface, its port is published, and a CUDA one gets GPUs,
    the models read-only and a named CUDA device."""
    text = DOCKERFILE.read_text()
    runs = re.findall(r"^#\s+docker run (.*?)(?=\n#\s*$|\n#\s+#|\n# [`A-Za-z])", text, re.S | re.M)
    assert len(runs) >= 3, "examples: serve on GPUs, serve on the CPU, a draft worker alone"
    for run in (re.sub(r"\\\n#\s*", " ", r) for r in runs):
        words = shlex.split(run)
        image = next(i for i, word in enumerate(words) if word.startswith("specpipe:"))
        options, command = words[:image], words[image + 1 :]
        if flag_value(options, "--entrypoint") == "python":
            assert command[:2] == ["-m", "specpipe.draft_worker"]
            config = parse_draft_worker(command[2:])
            bind, device = config.bind, config.device
        else:
            args = parse_serve(command[1:])
            assert command[0] == "serve"
            bind, device = zmq_endpoint(args.host, args.port), args.target_device
        host, port = bind.removeprefix("tcp://").rsplit(":", 1)
        assert host == "0.0.0.0", f"inside a container the processes must bind its interface: {run}"
        published = [options[i + 1].rsplit(":", 1)[-1] for i, word in enumerate(options) if word == "-p"]
        assert port in published, f"the port is published: {run}"
        if words[image].endswith(":cuda"):
            assert "--gpus" in options and any(v.endswith(":ro") for v in options if v.startswith("/")), run
            assert device.startswith("cuda"), f"name the CUDA device, never auto: {run}"


def test_dockerignore_keeps_what_the_install_needs(pyproject):
    ignored = {
        line.strip().strip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *pyproject["tool"]["setuptools"]["package-dir"].values(),
    }
    assert not ignored & needed
