"""The data plane: both transports (ZeroMQ and torch.distributed over gloo) give identical
outputs for the same requests, and a torch.distributed peer that never comes up fails with a
clear error within the configured timeout instead of hanging."""

from __future__ import annotations

import subprocess
import sys
import time

from specpipe import Client
from specpipe.launch.local import free_port

from tiny import PROMPTS

# Greedy in every mode; seeded sampling where the schedule cuts blocks deterministically (in the
# pipelined modes block boundaries depend on timing, so two runs are two exact samples, not one).
REQUESTS = [
    dict(prompt_ids=p, max_new_tokens=24, mode=m, seed=11)
    for p in PROMPTS[:2]
    for m in ("sequential", "pipelined", "specbranch")
] + [dict(prompt_ids=p, max_new_tokens=24, mode="sequential", temperature=1.0, seed=11) for p in PROMPTS[:2]]


def test_zmq_and_torch_transports_give_identical_outputs(serve):
    outputs = {}
    for transport in ("zmq", "torch"):
        client = Client(serve("draft_close", "--transport", transport).addr)
        outputs[transport] = [client.complete(**request)[0] for request in REQUESTS]
    assert outputs["zmq"] == outputs["torch"]


def test_torch_peer_that_never_comes_up_fails_clearly(tiny_models):
    port = free_port()
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "2",
        "PATH": "/usr/bin:/bin",
    }
    began = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "specpipe.target_worker",
            "--model",
            str(tiny_models["target"]),
            "--port",
            "0",
            "--transport",
            "torch",
            "--dist-timeout",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - began
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr and "within 3s" in result.stderr, result.stderr[-2000:]
    assert elapsed < 30
