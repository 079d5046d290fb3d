"""specpipe.Client's retry policy, against a real gRPC server on loopback whose SpecPipe servicer
plays a scripted part (the client is what is under test, not the server): a call that fails
UNAVAILABLE before any response is retried with back-off; one that failed after a token is not
(a token is never delivered twice); retries=0 turns it off; other codes are never retried."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from specpipe import Client
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc


class Scripted(specpipe_pb2_grpc.SpecPipeServicer):
    """Generate fails the first `failures` calls with `code`, after `tokens_first` tokens; then
    streams one token and finishes."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE, tokens_first: int = 0):
        self.failures, self.code, self.tokens_first = failures, code, tokens_first
        self.calls = 0

    def Generate(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            for token in range(self.tokens_first):
                yield specpipe_pb2.GenerateResponse(token_ids=[token])
            context.abort(self.code, "scripted failure")
        yield specpipe_pb2.GenerateResponse(token_ids=[7], finish_reason="length")


@pytest.fixture
def scripted_server():
    servers = []

    def start(servicer: Scripted) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        specpipe_pb2_grpc.add_SpecPipeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_unavailable_before_the_first_token_is_retried(scripted_server):
    servicer = Scripted(failures=3)
    token_ids, _, last = Client(scripted_server(servicer), timeout=30).complete(prompt_ids=[1], max_new_tokens=1)
    assert (token_ids, last.finish_reason, servicer.calls) == ([7], "length", 4)


def test_retries_are_bounded(scripted_server):
    servicer = Scripted(failures=10)
    with pytest.raises(grpc.RpcError) as err:
        Client(scripted_server(servicer), timeout=30, retries=2).complete(prompt_ids=[1], max_new_tokens=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == 3


def test_a_stream_that_delivered_a_token_is_not_retried(scripted_server):
    servicer = Scripted(failures=1, tokens_first=1)
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for chunk in Client(scripted_server(servicer), timeout=30).generate(prompt_ids=[1], max_new_tokens=2):
            received += chunk.token_ids
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (received, servicer.calls) == ([0], 1)


@pytest.mark.parametrize(
    "retries, code",
    [(0, grpc.StatusCode.UNAVAILABLE), (4, grpc.StatusCode.INTERNAL), (4, grpc.StatusCode.INVALID_ARGUMENT)],
)
def test_no_retry_when_off_or_for_other_codes(scripted_server, retries, code):
    servicer = Scripted(failures=1, code=code)
    with pytest.raises(grpc.RpcError) as err:
        Client(scripted_server(servicer), timeout=30, retries=retries).complete(prompt_ids=[1], max_new_tokens=1)
    assert err.value.code() == code and servicer.calls == 1
