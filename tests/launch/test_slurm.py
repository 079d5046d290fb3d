"""The Slurm scripts (launch/slurm/*.sbatch), dry-run for real: each script runs under bash with the
SLURM_* variables a job would have and stub `srun`, `scontrol` and `getent` first on PATH (no
Slurm needed). The stub srun records its command line and prints what the real process would (a
worker's READY line, serve's "specpipe serving on"), so the script goes through its whole course:
node addresses, ports derived from the job id, step placement, waiting for the ready line, the
address it prints. Then every recorded command is parsed by the real parsers (`specpipe serve`,
the draft worker, torchrun's and the torchrun entry's) and its addresses are checked to meet up.
The scripts across nodes give every process the CURVE key folder (CURVE_KEYS, mounted into a
container), refuse to start without one in one line naming `specpipe curve-keygen` and
INSECURE_INTERNAL, and pass --insecure-internal when that is set (issue 23).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

import pytest

from specpipe import curve
from specpipe.config import zmq_endpoint

from deploy_parsers import parse_draft_worker, parse_serve, parse_torchrun_entry, strict_parsers  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
JOB_ID = 4242
# The scripts' derivation: 10 ports per job from 20000, the job id modulo 1200 (under 32768, where
# Linux's ephemeral ports start). Ports: +0 gRPC, +1 health, +2 draft, +3 data plane, +4 metrics,
# +5 rendezvous.
PORT_BASE = 20000 + JOB_ID % 1200 * 10
VENV_BIN = "/home/user/specpipe/.venv/bin"
NODES = {"node1": "10.0.0.1", "node2": "10.0.0.2"}
STUBS = {
    "scontrol": 'test "$1 $2" = "show hostnames" || exit 2\ntr "," "\\n" <<< "$3"\n',
    "getent": 'test "$1" = ahostsv4 || exit 2\necho "10.0.0.${2//[!0-9]/} STREAM $2"\n',
    # Record the command line (NUL-separated), then print what the real step prints once up.
    "srun": r"""printf '%s\0' "$@" > "$STUB_LOG/srun.$$.$RANDOM"
words=" $* "
value() { local flag="$1" previous=""; shift; for word in "$@"; do [ "$previous" = "$flag" ] && { echo "$word"; return; }; previous="$word"; done; }
case "$words" in
  *" -m specpipe.draft_worker "*) echo "READY tcp://stub:1" ;;
  *" serve "*|*" -m specpipe.launch.torchrun "*)
      host="$(value --host "$@")"; [ "$host" = auto ] && host=10.0.0.1
      echo "specpipe serving on $host:$(value --port "$@")" ;;
esac
sleep 0.2
""",
}


@pytest.fixture
def dry_run(tmp_path):
    """dry_run(script, **env) -> (completed process, [recorded srun argv])."""
    bin_dir, log = tmp_path / "bin", tmp_path / "srun"
    bin_dir.mkdir()
    log.mkdir()
    curve.generate_keys(tmp_path / "keys")
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)

    def run(script: Path, **extra) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        env = {
            "HOME": "/home/user",
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "STUB_LOG": str(log),
            "SLURM_JOB_ID": str(JOB_ID),
            "SLURM_JOB_NODELIST": ",".join(NODES),
            "SLURM_CPUS_PER_TASK": "8",
            "SLURM_JOB_NODELIST_HET_GROUP_0": "node1",
            "SLURM_JOB_NODELIST_HET_GROUP_1": "node2",
            "CURVE_KEYS": str(tmp_path / "keys"),
            **extra,
        }
        result = subprocess.run(
            ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        commands = [path.read_text().split("\0")[:-1] for path in sorted(log.iterdir())]
        for path in log.iterdir():
            path.unlink()
        return result, commands

    return run


def split_srun(argv: list[str]) -> tuple[list[str], list[str]]:
    """(srun's options, the command it runs). Every option is --name=value but -w NODE."""
    index = 0
    while argv[index].startswith("-"):
        index += 2 if argv[index] == "-w" else 1
    return argv[:index], argv[index:]


def steps(commands: list[list[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """role ("draft", "serve", "torchrun") -> (srun options, command)."""
    found = {}
    for argv in commands:
        options, command = split_srun(argv)
        role = (
            "draft"
            if "specpipe.draft_worker" in command
            else "torchrun"
            if "specpipe.launch.torchrun" in command
            else "serve"
            if "serve" in command
            else None
        )
        assert role and role not in found, f"unexpected step {argv}"
        found[role] = (options, command)
    return found


def ready_address(result: subprocess.CompletedProcess) -> str:
    match = re.search(r"ready; gRPC at (\S+)", result.stdout)
    assert match, f"the script never said it was ready:\n{result.stdout}\n{result.stderr}"
    return match.group(1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_sbatch_is_valid_bash_and_asks_for_memory(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=5)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert re.search(r"^#SBATCH --mem=\d+G\b", text, re.M), "a model is held in host memory while it loads"
    assert re.search(r"^trap \S+ .*EXIT", text, re.M), "no clean-up trap on exit"
    assert "Llama-3.1-8B" in text, "the example target must fit one GPU"


@pytest.mark.parametrize("name", ["specpipe.sbatch", "specpipe-hetjob.sbatch"])
def test_zmq_scripts_wire_serve_and_the_draft(dry_run, name, strict_parsers):
    result, commands = dry_run(SLURM / name)
    assert result.returncode == 1 and "serve ended" in result.stderr, result.stderr  # the stub serve exits
    found = steps(commands)
    (draft_options, draft), (serve_options, serve) = found["draft"], found["serve"]
    if name == "specpipe-hetjob.sbatch":  # each step on its own component
        assert "--het-group=1" in draft_options and "--het-group=0" in serve_options
    else:
        assert draft_options[draft_options.index("-w") + 1] == "node2"
        assert serve_options[serve_options.index("-w") + 1] == "node1"
    assert draft[:3] == [f"{VENV_BIN}/python", "-m", "specpipe.draft_worker"]
    config = parse_draft_worker(draft[3:])
    assert serve[:2] == [f"{VENV_BIN}/specpipe", "serve"]
    args = parse_serve(serve[2:])
    # Ports from the job id; addresses from the nodes; the two commands meet.
    assert (args.port, args.health_port, args.metrics_port) == (PORT_BASE, PORT_BASE + 1, PORT_BASE + 4)
    assert config.bind == zmq_endpoint(NODES["node2"], PORT_BASE + 2) and args.draft_addr == config.bind
    assert args.worker_host == NODES["node1"] and args.target_data_port == PORT_BASE + 3
    assert config.target_data_addr == zmq_endpoint(NODES["node1"], args.target_data_port)
    assert config.device == args.target_device == "cuda"
    assert config.curve_keys == args.curve_keys and args.curve_keys.endswith("/keys") and not args.insecure_internal
    assert args.target_startup_timeout >= 1800, "a large model's load fits serve's own wait"
    assert ready_address(result) == f"{NODES['node1']}:{PORT_BASE}" == f"{args.host}:{args.port}"


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer"])
def test_container_variant_runs_the_same_commands_in_the_image(dry_run, runtime, strict_parsers):
    image = "registry.example.com#specpipe:0.1.0-cuda" if runtime == "pyxis" else "/shared/specpipe.sif"
    knob = "CONTAINER_IMAGE" if runtime == "pyxis" else "APPTAINER_IMAGE"
    result, commands = dry_run(SLURM / "specpipe.sbatch", **{knob: image, "CONTAINER_MOUNTS": "/shared:/shared"})
    ready_address(result)
    for role, (options, command) in steps(commands).items():
        keys = command[command.index("--curve-keys") + 1]
        mounts = f"/shared:/shared,{keys}:{keys}:ro"  # the key folder too, read-only
        if runtime == "pyxis":
            assert f"--container-image={image}" in options and f"--container-mounts={mounts}" in options
        else:
            assert command[:6] == ["apptainer", "exec", "--nv", "--bind", mounts, image]
            command = command[6:]
        if role == "draft":
            assert command[:3] == ["python", "-m", "specpipe.draft_worker"], "the image's python, not the venv's"
            parse_draft_worker(command[3:])
        else:
            assert command[:2] == ["specpipe", "serve"]
            parse_serve(command[2:])


@pytest.mark.parametrize("name", ["specpipe-torchrun.sbatch", "specpipe-1node.sbatch"])
def test_torchrun_scripts(dry_run, name, strict_parsers):
    from torch.distributed.run import get_args_parser

    result, commands = dry_run(SLURM / name)
    [(options, command)] = steps(commands).values()
    assert command[0] == f"{VENV_BIN}/torchrun"
    launcher = get_args_parser().parse_args(command[1:])
    assert launcher.module and launcher.training_script == "specpipe.launch.torchrun"
    args = parse_torchrun_entry(launcher.training_script_args)
    assert (args.port, args.health_port, args.metrics_port) == (PORT_BASE, PORT_BASE + 1, PORT_BASE + 4)
    assert args.transport == "torch" and args.dist_timeout >= 1800
    if name == "specpipe-torchrun.sbatch":  # across nodes: the ranks' control sockets under CURVE
        assert args.curve_keys.endswith("/keys")
    assert args.target_device is None and args.draft_device is None, "devices come from LOCAL_RANK"
    if name == "specpipe-1node.sbatch":  # two ranks, two GPUs, one node
        assert launcher.standalone and launcher.nproc_per_node == "2" and "--nodes=1" in options
        assert args.worker_host == "127.0.0.1" and args.host == "auto"
        assert re.search(r"^#SBATCH --gpus-per-node=2\b", (SLURM / name).read_text(), re.M)
    else:  # one rank per node, the same command on both
        assert (launcher.nnodes, launcher.nproc_per_node) == ("2", "1") and "--nodes=2" in options
        assert launcher.rdzv_backend == "c10d" and launcher.rdzv_endpoint == f"node1:{PORT_BASE + 5}"
        assert args.host == args.worker_host == "auto"
    assert ready_address(result) == f"{NODES['node1']}:{PORT_BASE}"


@pytest.mark.parametrize("name", ["specpipe.sbatch", "specpipe-hetjob.sbatch", "specpipe-torchrun.sbatch"])
def test_across_nodes_no_keys_is_one_line_and_insecure_internal_is_explicit(dry_run, tmp_path, name, strict_parsers):
    result, commands = dry_run(SLURM / name, CURVE_KEYS=str(tmp_path / "nowhere"))
    assert result.returncode == 1 and not commands and result.stderr.count("\n") == 1, result.stderr
    assert "specpipe curve-keygen" in result.stderr and "INSECURE_INTERNAL=1" in result.stderr
    if name != "specpipe.sbatch":  # the others pass the same SECURITY array: one dry run (2 s) each saved
        return
    result, commands = dry_run(SLURM / name, CURVE_KEYS=str(tmp_path / "nowhere"), INSECURE_INTERNAL="1")
    ready_address(result)
    for _, command in steps(commands).values():
        assert "--insecure-internal" in command and "--curve-keys" not in command


def test_derived_ports_keep_jobs_apart():
    """Neighbouring job ids get disjoint ports, all below Linux's ephemeral range, whatever the id."""
    text = (SLURM / "specpipe.sbatch").read_text()
    [expression] = re.findall(r'^PORT_BASE="\$\{PORT_BASE:-(.*)\}"$', text, re.M)
    for script in SCRIPTS:
        assert f'PORT_BASE="${{PORT_BASE:-{expression}}}"' in script.read_text(), f"{script.name} derives otherwise"

    def base(job_id: int) -> int:
        result = subprocess.run(
            ["bash", "-c", f"SLURM_JOB_ID={job_id}; echo {expression}"],
            capture_output=True,
            text=True,
            timeout=5,
            env={"PATH": os.environ["PATH"]},
        )
        return int(result.stdout)

    bases = [base(job_id) for job_id in (0, 1, 2, 1199, JOB_ID, 10**7 + 3)]
    assert bases[4] == PORT_BASE
    for first in bases:
        assert 1024 < first and first + 9 < 32768
    for first, second in itertools.combinations(bases[:4], 2):  # ids 0, 1, 2, 1199: ten ports apart at least
        assert abs(first - second) >= 10
