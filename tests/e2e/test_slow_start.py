"""Slow start on real processes: `specpipe serve` over two remote workers (--target-addr,
--draft-addr) that are not running yet, as when two pods or two Slurm steps start independently.

The gRPC port and the plain-text health port answer at once, NOT_SERVING ("liveness" SERVING:
the coordinator's loop turns); requests end UNAVAILABLE. The target worker comes up: health turns
SERVING and serve prints its address; requests run target-only. The draft comes up only after
--draft-startup-timeout (scaled down to 1 s here; the default is 30 minutes) has passed and been
warned about: it is admitted without serve exiting, and requests are speculative from then on,
their output equal to Hugging Face's greedy. The draft's exec probe (`python -m
specpipe.launch.probe`) fails before the draft is up and passes after. A target that never comes up
ends serve past --target-startup-timeout with one line naming the flag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specpipe import Client
from specpipe.launch.local import free_ports, stop_process

from tiny import PROMPTS

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
# Generous: on a loaded 2-core box a process that imports torch and transformers takes a while.
START_S = 120
MAX_NEW = 20


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def health(port: int, service: str = "") -> int | None:
    """The health status on 127.0.0.1:port, None while nothing answers there."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
    except grpc.RpcError:
        return None


def probe(endpoint: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specpipe.launch.probe", endpoint, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=60,
    )


class Processes:
    """Started processes, stopped at the end whatever happens."""

    def __init__(self, log_dir: Path):
        self.log_dir, self.started = log_dir, []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.out", "w")
        err = open(self.log_dir / f"{name}.log", "w")
        process = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=err, start_new_session=True)
        self.started.append(process)
        return process

    def text(self, name: str, kind: str = "log") -> str:
        return (self.log_dir / f"{name}.{kind}").read_text()

    def stop(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            stop_process(process)


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    yield started
    started.stop()


def test_late_target_then_late_draft_are_admitted_without_serve_exiting(tiny_models, hf_greedy, processes):
    names = ("grpc", "health", "target", "data", "draft")
    ports = dict(zip(names, free_ports(len(names))))
    target, draft = str(tiny_models["target"]), str(tiny_models["draft_same"])
    draft_endpoint = f"tcp://127.0.0.1:{ports['draft']}"
    serve = processes.start(
        "serve",
        [
            "-m",
            "specpipe.launch.cli",
            "--log-level",
            "INFO",
            "serve",
            "--target",
            target,
            "--draft",
            draft,
            "--port",
            str(ports["grpc"]),
            "--health-port",
            str(ports["health"]),
            "--target-addr",
            f"tcp://127.0.0.1:{ports['target']}",
            "--draft-addr",
            draft_endpoint,
            "--draft-startup-timeout",
            "1",
        ],
    )
    # No worker runs yet: both ports answer, NOT_SERVING; the liveness service is SERVING.
    assert wait_for(lambda: health(ports["health"]), START_S, "the health port") == NOT_SERVING
    assert health(ports["grpc"]) == NOT_SERVING and health(ports["grpc"], "specpipe.v1.SpecPipe") == NOT_SERVING
    assert health(ports["health"], "liveness") == SERVING
    client = Client(f"127.0.0.1:{ports['grpc']}", timeout=60)
    with pytest.raises(grpc.RpcError) as refused:
        client.complete(prompt_ids=PROMPTS[0], max_new_tokens=MAX_NEW)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "specpipe serving on" not in processes.text("serve", "out")

    processes.start(
        "target",
        [
            "-m",
            "specpipe.target_worker",
            "--model",
            target,
            "--port",
            str(ports["target"]),
            "--data-port",
            str(ports["data"]),
        ],
    )
    wait_for(lambda: health(ports["health"]) == SERVING, START_S, "health SERVING once the target is up")
    assert health(ports["grpc"]) == SERVING
    wait_for(lambda: "specpipe serving on" in processes.text("serve", "out"), 30, "serve's ready line")
    reference = hf_greedy(PROMPTS[0], MAX_NEW)
    token_ids, _, last = client.complete(prompt_ids=PROMPTS[0], max_new_tokens=MAX_NEW, mode="specbranch")
    assert token_ids == reference and last.stats.draft_tokens == 0, "target-only while the draft is missing"
    assert client.stats().status == "degraded: draft unavailable"

    # Past --draft-startup-timeout: a warning, and serve goes on.
    wait_for(lambda: "--draft-startup-timeout" in processes.text("serve"), 30, "the draft warning")
    assert probe(draft_endpoint, 0.5).returncode == 1
    processes.start(
        "draft",
        [
            "-m",
            "specpipe.draft_worker",
            "--model",
            draft,
            "--port",
            str(ports["draft"]),
            "--target-data-addr",
            f"tcp://127.0.0.1:{ports['data']}",
        ],
    )
    wait_for(lambda: client.stats().status == "ok", START_S, "the late draft to be admitted")
    assert serve.poll() is None
    token_ids, _, last = client.complete(prompt_ids=PROMPTS[0], max_new_tokens=MAX_NEW, mode="specbranch")
    assert token_ids == reference
    assert last.stats.draft_tokens > 0 and last.stats.accepted_tokens == last.stats.draft_tokens
    # (the watcher logs it within its 0.1 s poll of the draft's health; on a loaded box, later)
    wait_for(lambda: "draft worker at " + draft_endpoint + " admitted" in processes.text("serve"), 10, "the log line")
    alive = probe(draft_endpoint, 10)
    assert alive.returncode == 0, alive.stderr
    assert alive.stdout.startswith("draft worker pid ")


def test_target_that_never_answers_ends_serve_naming_the_flag(tiny_models, processes):
    target_port, draft_port = free_ports(2)
    serve = processes.start(
        "serve",
        [
            "-m",
            "specpipe.launch.cli",
            "serve",
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(tiny_models["draft"]),
            "--port",
            "0",
            "--target-addr",
            f"tcp://127.0.0.1:{target_port}",
            "--draft-addr",
            f"tcp://127.0.0.1:{draft_port}",
            "--target-startup-timeout",
            "2",
        ],
    )
    assert serve.wait(START_S) != 0
    last_line = processes.text("serve").strip().splitlines()[-1]
    assert "--target-startup-timeout" in last_line and "did not answer within 2s" in last_line, last_line
