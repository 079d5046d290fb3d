"""Production serving, end to end on a real `specpipe serve` over tiny models: admission limits,
deadlines, bearer-token auth, TLS, Prometheus metrics and JSON logs. One server has all of them
on (a server start costs ~20 s on two cores): every client here speaks TLS with the token, but
for the plain-text health port (--health-port), which serves health alone.

Method: a request is held running for as long as a test needs, whatever the machine's speed, by
a client that stops reading after the first chunk (tests/e2e/held.py: HeldRequest). The
queue's state is read from the metrics endpoint (`specpipe:num_requests_waiting`), the workers'
from GetStats. Deadlines: where a request expires is read from the server's own log (`... while
queued` / `while running`), never inferred from the client's clock; a deadline only has to be
long enough for the request to get there on a loaded box (QUEUED_DEADLINE_S), or is retried
longer when the first token did not arrive in time (MID_GENERATION_DEADLINES_S).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from specpipe import Client
from specpipe.launch.local import ServerProcess, free_ports
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc

from certificates import make_certificates
from checks import FREED_S, is_idle, paused, worker
from held import HeldRequest
from tiny import PROMPTS

TOKEN = "s3cret-token-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LONG = dict(prompt_ids=PROMPTS[0], max_new_tokens=480, mode="autoregressive")  # 4 + 480 = 484 tokens
# A request that must wait in the queue until its deadline: long enough to reach the queue on a
# loaded 2-core box (the log line proves it did).
QUEUED_DEADLINE_S = 2.0
# A deadline that must pass mid-generation: the first that lets a token through before it passes
# (LONG takes seconds to generate, far longer than the last).
MID_GENERATION_DEADLINES_S = (0.3, 0.6, 1.2, 2.4)
# A stream whose deadline passed ends this soon after, as the client sees it (only a hang is caught).
CLIENT_BOUND_S = 15.0


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the metrics endpoint."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def metric(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"timed out waiting for {what}"
            return value
        time.sleep(0.05)


def idle(client: Client) -> bool:
    return is_idle(client.stats())


def log_entries(server, request_id: str) -> list[dict]:
    """The server's JSON log entries about `request_id`. A line the server is still writing (no
    newline yet) is left for the next read."""
    with open(server.log_path) as log:
        lines = log.readlines()
    entries = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("\n")]
    return [entry for entry in entries if entry.get("request_id") == request_id]


def expired_where(server, request_id: str) -> str:
    """Where the server saw `request_id`'s deadline pass ("queued" / "running"), from its log."""
    (entry,) = wait_for(
        lambda: [e for e in log_entries(server, request_id) if e["message"].startswith("deadline_exceeded while ")],
        5.0,
        f"the log line of {request_id}'s deadline",
    )
    return entry["message"].removeprefix("deadline_exceeded while ")


# -- a server with small limits, metrics and JSON logs --------------------------------------------
class LoggedServer(ServerProcess):
    """`specpipe serve` with its stderr (coordinator and workers) kept in a file."""

    def __init__(self, args: list[str], log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        super().__init__(args, log_level="INFO", stderr=self.log)

    def stop(self) -> None:
        super().stop()
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """Token and TLS required; metrics and JSON logs on; 3 running, 2 queued, 1000 tokens in
    flight: two LONG requests (968 tokens) leave room for a third only if it is small."""
    folder = make_certificates(tmp_path_factory.mktemp("tls"))
    (folder / "token").write_text(TOKEN + "\n")
    port, health_port = free_ports(2)
    server = LoggedServer(
        [
            "--target",
            str(tiny_models["target"]),
            "--draft",
            str(tiny_models["draft"]),
            "--auth-token-file",
            str(folder / "token"),
            "--tls-cert",
            str(folder / "server.pem"),
            "--tls-key",
            str(folder / "server.key"),
            "--metrics-port",
            str(port),
            "--health-port",
            str(health_port),
            "--max-concurrent-requests",
            "3",
            "--max-queued-requests",
            "2",
            "--max-tokens-in-flight",
            "1000",
            "--log-format",
            "json",
        ],
        folder / "serve.log",
    )
    server.metrics_port, server.ca, server.folder = port, (folder / "ca.pem").read_bytes(), folder
    server.health_port = health_port
    server.token = TOKEN
    yield server
    server.stop()


def connect(server, token: str | None = TOKEN, **kwargs) -> Client:
    return Client(server.addr, token=token, root_certificates=server.ca, **kwargs)


def test_queue_is_fifo_bounded_and_refuses_with_the_limit_named(server, hf_greedy):
    client = connect(server)
    waiting = lambda: metric(scrape(server.metrics_port), "specpipe:num_requests_waiting")  # noqa: E731
    running = lambda: metric(scrape(server.metrics_port), "specpipe:num_requests_running")  # noqa: E731
    holders = [HeldRequest(server, **LONG).first() for _ in range(2)]
    small, tiny, late = [], [], []
    try:
        assert running() == 2
        # 968 + 4 + 60 > 1000 tokens: waits though a slot is free.
        small_thread = threading.Thread(
            target=lambda: small.append(client.complete(prompt_ids=PROMPTS[1], max_new_tokens=60, mode="sequential"))
        )
        small_thread.start()
        wait_for(lambda: waiting() == 1, what="the first request to queue")
        # Would fit (968 + 2 + 20), but may not overtake the head of the queue.
        tiny_stream = client.generate(prompt_ids=PROMPTS[1], max_new_tokens=20)
        tiny_thread = threading.Thread(target=lambda: tiny.append(_outcome(tiny_stream)))
        tiny_thread.start()
        wait_for(lambda: waiting() == 2, what="the second request to queue")
        assert running() == 2
        # The queue is full: refused at once, naming the limit.
        with pytest.raises(grpc.RpcError) as err:
            client.complete(prompt_ids=PROMPTS[1], max_new_tokens=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_requests 2" in err.value.details()
        # A queued request whose client cancels leaves the queue.
        tiny_stream.cancel()
        tiny_thread.join(5)
        assert tiny == [grpc.StatusCode.CANCELLED]
        wait_for(lambda: waiting() == 1, what="the cancelled request to leave the queue")
        # A queued request whose deadline passes leaves it too.
        late_thread = threading.Thread(
            target=lambda: late.append(
                _outcome(
                    client.generate(
                        prompt_ids=PROMPTS[1], max_new_tokens=5, timeout=QUEUED_DEADLINE_S, request_id="late-in-queue"
                    )
                )
            )
        )
        late_thread.start()
        late_thread.join(QUEUED_DEADLINE_S + CLIENT_BOUND_S)
        assert late == [grpc.StatusCode.DEADLINE_EXCEEDED]
        assert expired_where(server, "late-in-queue") == "queued"
        wait_for(lambda: waiting() == 1, what="the expired request to leave the queue")
        assert small == [] and running() == 2
    finally:
        for holder in holders:
            holder.cancel()
    small_thread.join(30)
    token_ids, _, last = small[0]
    assert token_ids == hf_greedy(PROMPTS[1], 60) and last.finish_reason in ("length", "eos")
    wait_for(lambda: idle(client), FREED_S, "both workers to be idle")
    samples = scrape(server.metrics_port)
    for code in ("RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED"):
        assert metric(samples, "specpipe:request_failure_total", code=code) >= 1, code
    assert metric(samples, "specpipe:num_requests_running") == 0
    assert metric(samples, "specpipe:num_tokens_in_flight") == 0


def _outcome(stream):
    try:
        for _ in stream:
            pass
        return "ok"
    except grpc.RpcError as err:
        return err.code()


def test_token_budget_makes_a_second_big_request_wait(server):
    """One request of 504 tokens runs alone; a second would pass the 1000-token budget, so it waits
    in the queue (with a slot free) until its deadline passes."""
    client = connect(server)
    big = dict(prompt_ids=PROMPTS[0], max_new_tokens=500, mode="autoregressive")
    holder = HeldRequest(server, **big).first()
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.complete(**big, timeout=QUEUED_DEADLINE_S, request_id="over-budget")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert expired_where(server, "over-budget") == "queued"
        assert client.stats().live_requests == 1
    finally:
        holder.cancel()
    wait_for(lambda: idle(client), FREED_S, "both workers to be idle")


@pytest.mark.parametrize("held", [False, True], ids=["reading", "stalled-on-write"])
def test_deadline_mid_generation_frees_both_workers(server, held):
    """The deadline passes while the request decodes (reading: the handler waits on the target,
    paused after the first token until past the deadline, so that a fast box cannot finish LONG
    first) or while the server waits to write to a client that stopped reading (stalled): the
    server says it expired while running, after tokens were streamed. A deadline that passed before
    the first token (a loaded box) is retried longer."""
    client = connect(server)
    for attempt, deadline in enumerate(MID_GENERATION_DEADLINES_S):
        request_id, received = f"deadline-{'held' if held else 'reading'}-{attempt}", 0
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            if held:
                request = HeldRequest(server, **LONG, timeout=deadline, request_id=request_id).first()
                received = len(request.token_ids)
                time.sleep(max(0.0, deadline - (time.monotonic() - start)) + 0.2)  # past it, still not reading
                request.rest()
            else:
                for response in client.generate(
                    **{**LONG, "mode": "sequential"}, timeout=deadline, request_id=request_id
                ):
                    if not received:  # the target paused until past the deadline: LONG cannot end first
                        with paused(worker(client.stats(), "target").pid):
                            time.sleep(max(0.0, deadline - (time.monotonic() - start)) + 0.2)
                    received += len(response.token_ids)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        overrun = time.monotonic() - start - deadline
        if received:
            break
        wait_for(lambda: idle(client), FREED_S, "0 live requests and branches")
    print(
        f"\n[production] deadline {deadline} s passed after {received} tokens; the client saw it {overrun:.2f} s late"
    )
    assert received > 0, f"no token within {deadline} s: the deadline never passed mid-generation"
    assert overrun < CLIENT_BOUND_S
    assert expired_where(server, request_id) == "running"
    wait_for(lambda: idle(client), FREED_S, "0 live requests and branches")


def test_json_logs_carry_the_request_id(server):
    """A request's lines carry its id as a field; a request refused as invalid is never logged
    (one line per bad request would let any client fill the log)."""
    client = connect(server)
    client.complete(prompt_ids=[1, 2], max_new_tokens=3, request_id="json-log-probe")
    with pytest.raises(grpc.RpcError) as err:
        client.complete(prompt_ids=[1], max_new_tokens=0, request_id="never-logged")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in err.value.details()
    client.complete(prompt_ids=[1, 2], max_new_tokens=3, request_id="json-log-after")

    def probe_lines():
        return log_entries(server, "json-log-probe")

    # The request after it is logged, so anything about the refused one would be there by now.
    wait_for(
        lambda: any(e["message"] == "finished: length" for e in log_entries(server, "json-log-after")),
        what="the next request's log lines",
    )
    assert "never-logged" not in open(server.log_path).read()
    lines = wait_for(lambda: len(probe_lines()) >= 2 and probe_lines(), what="the request's log lines")
    messages = [line["message"] for line in lines]
    assert any(m.startswith("started:") for m in messages) and "finished: length" in messages
    assert all(line["process"] == "coordinator" and line["level"] and line["ts"] for line in lines)
    assert not any("json-log-probe" in m for m in messages)  # the id is a field, not in the text


# -- auth, TLS and metrics ----------------------------------------------------------------------
def test_tls_with_the_token_is_served(server, hf_greedy):
    with connect(server, timeout=30) as client:
        token_ids, _, last = client.complete(prompt_ids=PROMPTS[2], max_new_tokens=16)
        assert token_ids == hf_greedy(PROMPTS[2], 16) and last.finish_reason in ("length", "eos")
        assert client.stats().live_requests == 0


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated(server, token):
    with connect(server, token, timeout=10) as client:
        for call in (lambda: client.complete(prompt_ids=[1], max_new_tokens=2), client.stats):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
            assert "bearer token" in err.value.details()


def test_bad_authorization_header_shapes(server):
    channel = grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(server.ca))
    stub = specpipe_pb2_grpc.SpecPipeStub(channel)
    for metadata in (
        (("authorization", TOKEN),),
        (("authorization", f"Basic {TOKEN}"),),
        (("x-token", TOKEN),),
        (("authorization", f"Bearer  {TOKEN}  "),),
    ):
        try:
            stub.GetStats(specpipe_pb2.StatsRequest(), metadata=metadata, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
        # Extra spaces around a right token are tolerated; a wrong scheme or key is not.
        expected = grpc.StatusCode.OK if "Bearer" in metadata[0][1] else grpc.StatusCode.UNAUTHENTICATED
        assert code == expected, metadata
    # "bearer" in any case is the same scheme (RFC 7235).
    stub.GetStats(specpipe_pb2.StatsRequest(), metadata=(("authorization", f"bearer {TOKEN}"),), timeout=10)
    channel.close()


def test_health_and_reflection_need_no_token(server):
    channel = grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(server.ca))
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "specpipe.v1.SpecPipe"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert "specpipe.v1.SpecPipe" in names
    channel.close()


def test_plaintext_health_port_serves_health_alone(server):
    """What the kubelet's gRPC probes (no TLS) need beside a TLS API: the same health service, in
    plain text, with nothing else on that port."""
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "specpipe.v1.SpecPipe", "liveness"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            specpipe_pb2_grpc.SpecPipeStub(channel).GetStats(
                specpipe_pb2.StatsRequest(), metadata=(("authorization", f"bearer {TOKEN}"),), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, "the API must not be reachable in plain text"


def test_plaintext_or_untrusted_clients_fail(server):
    for client in (
        Client(server.addr, token=TOKEN, timeout=5),
        Client(server.addr, token=TOKEN, root_certificates=(server.folder / "other-ca.pem").read_bytes(), timeout=5),
    ):
        with client, pytest.raises(grpc.RpcError) as err:
            client.stats()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_count_requests_and_speculation(server, hf_greedy):
    """Greedy output is deterministic, so every counter moves by an exact amount: the tokens by
    Hugging Face's output lengths; the speculation counters by the sums of the requests' own stats
    (each sequential block commits its accepted tokens plus one of the target's)."""
    port = server.metrics_port
    requests = [
        dict(prompt_ids=PROMPTS[0], max_new_tokens=24, mode="sequential"),
        dict(prompt_ids=PROMPTS[0], max_new_tokens=24, mode="specbranch"),
        dict(prompt_ids=PROMPTS[1], max_new_tokens=8, stop=["\x00never"], mode="autoregressive"),
    ]
    before = scrape(port)
    with connect(server, timeout=30) as client:
        totals_before = client.stats().totals
        results = [client.complete(**request) for request in requests]
        with pytest.raises(grpc.RpcError):
            client.complete(prompt_ids=[1], max_new_tokens=5, temperature=-1.0)
        totals_after = client.stats().totals
    after = scrape(port)
    moved = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    expected_tokens = [hf_greedy(r["prompt_ids"], r["max_new_tokens"]) for r in requests]
    assert [token_ids for token_ids, _, _ in results] == expected_tokens
    stats = [last.stats for _, _, last in results]
    sequential = stats[0]
    if results[0][2].finish_reason == "length":
        assert sequential.accepted_tokens + sequential.verifications == len(expected_tokens[0])
    assert sequential.draft_tokens > 0 and stats[2].draft_tokens == 0
    reasons = [last.finish_reason for _, _, last in results]
    for reason in ("length", "eos", "stop"):
        assert moved("specpipe:request_success_total", finished_reason=reason) == reasons.count(reason), reason
    assert moved("specpipe:request_failure_total", code="INVALID_ARGUMENT") == 1
    assert moved("specpipe:prompt_tokens_total") == 2 * len(PROMPTS[0]) + len(PROMPTS[1])
    generated = sum(len(tokens) for tokens in expected_tokens)
    assert moved("specpipe:generation_tokens_total") == generated
    for name, field in (
        ("num_draft_tokens", "draft_tokens"),
        ("num_drafts", "verifications"),
        ("num_accepted_tokens", "accepted_tokens"),
        ("num_rolled_back_tokens", "rolled_back_tokens"),
        ("branches_forked", "branches_forked"),
        ("branches_hit", "branches_hit"),
        ("num_rejections", "rejections"),
        ("num_main_rolled_back_tokens", "main_rolled_back_tokens"),
        ("num_rejections_at_fork", "rejections_at_fork"),
        ("num_prepared_hits", "prepared_hits"),
        ("num_filled_tokens", "filled_tokens"),
        ("num_kept_tokens", "kept_tokens"),
    ):
        assert moved(f"specpipe:spec_decode_{name}_total") == sum(getattr(s, field) for s in stats), name
    for name, field in (("branch_rank_tried", "branch_rank_tried"), ("branch_rank_hits", "branch_rank_hits")):
        for rank in range(max(len(getattr(s, field)) for s in stats)):
            by_request = sum(getattr(s, field)[rank] for s in stats if rank < len(getattr(s, field)))
            assert moved(f"specpipe:spec_decode_{name}_total", rank=str(rank)) == by_request, (name, rank)
    assert sum(s.rejections for s in stats) > 0, "the requests met no rejection"
    # GetStats' totals: the sums of the requests' own stats (per rank too).
    for field in (
        "draft_tokens",
        "accepted_tokens",
        "branches_hit",
        "rejections",
        "main_rolled_back_tokens",
        "prepared_hits",
        "filled_tokens",
        "kept_tokens",
    ):
        assert getattr(totals_after, field) - getattr(totals_before, field) == sum(getattr(s, field) for s in stats)
    for field in ("branch_rank_tried", "branch_rank_hits"):
        grown = [
            a - (getattr(totals_before, field)[i] if i < len(getattr(totals_before, field)) else 0)
            for i, a in enumerate(getattr(totals_after, field))
        ]
        by_request = [sum(getattr(s, field)[i] for s in stats if i < len(getattr(s, field))) for i in range(len(grown))]
        assert grown == by_request, field
    assert moved("specpipe:time_to_first_token_seconds_count") == 3
    assert moved("specpipe:inter_token_latency_seconds_count") == generated - 3  # every token but the first
    assert moved("specpipe:e2e_request_latency_seconds_count") == 3
    assert metric(after, "specpipe:mean_acceptance_length") >= 1.0
    for role in ("draft", "target"):
        assert metric(after, "specpipe:worker_healthy", role=role) == 1.0
        assert 0.0 < metric(after, "specpipe:worker_busy_fraction", role=role) <= 1.0
        # From the last heartbeat (every 0.25 s): the release may not be in it yet.
        wait_for(lambda: metric(scrape(port), "specpipe:live_branches", role=role) == 0.0, FREED_S, "0 live branches")
    assert metric(after, "specpipe:num_requests_running") == 0
    assert metric(after, "specpipe:num_requests_waiting") == 0


def test_unknown_methods_are_unauthenticated_without_the_token(server):
    channel = grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(server.ca))
    probe = channel.unary_unary(
        "/specpipe.v1.SpecPipe/NoSuchMethod", request_serializer=lambda x: x, response_deserializer=lambda x: x
    )
    for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (AUTH, grpc.StatusCode.UNIMPLEMENTED)):
        with pytest.raises(grpc.RpcError) as err:
            probe(b"", metadata=metadata, timeout=10)
        assert err.value.code() == code
    channel.close()


def run_generate(server, *flags: str) -> subprocess.CompletedProcess:
    """`specpipe generate` (the real command line) against this module's TLS + token server."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "specpipe.launch.cli",
            "generate",
            "--addr",
            server.addr,
            "def f(",
            "--max-new-tokens",
            "4",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "flags, needles",
    [
        ([], ["UNAVAILABLE", "may serve TLS", "--tls-ca"]),  # plain text to TLS
        (["--tls-ca", "other-ca.pem"], ["UNAVAILABLE", "not signed by --tls-ca"]),  # a CA that did not sign it
        (["--tls-ca", "ca.pem"], ["UNAUTHENTICATED", "bearer token", "--token-file"]),  # no token
        (["--tls-ca", "ca.pem", "--token-file", "wrong-token"], ["UNAUTHENTICATED", "not the server's"]),
    ],
    ids=["plaintext", "untrusted", "no-token", "wrong-token"],
)
def test_generate_tls_and_token_mismatches_are_one_line(server, flags, needles):
    (server.folder / "wrong-token").write_text("not-the-token\n")
    out = run_generate(
        server, *[str(server.folder / flag) if flag.endswith((".pem", "-token")) else flag for flag in flags]
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"specpipe generate: error: {needles[0]} from {server.addr}: ")
    for needle in needles[1:]:
        assert needle in lines[0], (needle, lines[0])


def test_generate_with_the_ca_and_the_token_is_served(server):
    out = run_generate(server, "--tls-ca", str(server.folder / "ca.pem"), "--token-file", str(server.folder / "token"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().startswith("[finish: ") and "Traceback" not in out.stderr
