"""Worker failures on a real server: SIGKILL the draft mid-stream and the stream still ends with
Hugging Face's greedy output (target-only from there), the server says it is degraded, and the
restarted draft is re-admitted; SIGKILL the target and the stream ends UNAVAILABLE within 2
seconds, Health says NOT_SERVING, and the server recovers when the restarted target is back."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specpipe import Client
from specpipe.launch.local import ServerProcess

from checks import wait_for
from tiny import PROMPTS

LONG = 300
# A restarted worker imports torch and loads its model again: seconds when the machine is idle,
# much longer on a loaded 2-core box.
RESTART_S = 90


@pytest.fixture
def server(tiny_models):
    # A server of its own: these tests kill its workers.
    with ServerProcess(["--target", str(tiny_models["target"]), "--draft", str(tiny_models["draft_close"])]) as server:
        yield server


def worker_pid(client: Client, role: str) -> int:
    return next(w.pid for w in client.stats().workers if w.role == role)


def health(addr: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


@pytest.mark.parametrize("mode", ["sequential", "specbranch"])
def test_draft_killed_mid_stream_finishes_losslessly_and_recovers(server, hf_greedy, mode):
    client = Client(server.addr)
    prompt_ids = PROMPTS[0]
    reference = hf_greedy(prompt_ids, LONG)
    stream = client.generate(prompt_ids=prompt_ids, max_new_tokens=LONG, mode=mode)
    tokens = list(next(stream).token_ids)
    os.kill(worker_pid(client, "draft"), signal.SIGKILL)
    for chunk in stream:
        tokens += chunk.token_ids
    assert tokens == reference
    assert chunk.finish_reason in ("length", "eos")
    # Meanwhile the server is degraded, not down: new requests are served target-only.
    wait_for(lambda: client.stats().status == "degraded: draft unavailable" or
             client.stats().workers[0].pid not in (0,), 5, "the draft to be marked down or restarted")
    assert health(server.addr) == health_pb2.HealthCheckResponse.SERVING
    assert client.complete(prompt_ids=prompt_ids, max_new_tokens=40, mode=mode)[0] == reference[:40]
    # The restarted draft is re-admitted: speculative decoding again, no server restart.
    wait_for(lambda: client.stats().status == "ok", RESTART_S, "the restarted draft")
    token_ids, _, last = client.complete(prompt_ids=prompt_ids, max_new_tokens=40, mode=mode)
    assert token_ids == reference[:40] and last.stats.draft_tokens > 0


def test_target_killed_ends_unavailable_fast_and_recovers(server, hf_greedy):
    client = Client(server.addr)
    stream = client.generate(prompt_ids=PROMPTS[0], max_new_tokens=LONG, mode="sequential")
    next(stream)
    os.kill(worker_pid(client, "target"), signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed < 2.0
    wait_for(lambda: health(server.addr) == health_pb2.HealthCheckResponse.NOT_SERVING, 2, "NOT_SERVING")
    wait_for(lambda: health(server.addr) == health_pb2.HealthCheckResponse.SERVING, RESTART_S,
             "the restarted target")
    assert client.complete(prompt_ids=PROMPTS[1], max_new_tokens=30)[0] == hf_greedy(PROMPTS[1], 30)
