"""The Python client: `from specpipe import Client`.

    client = Client("127.0.0.1:50051")
    for chunk in client.generate("def fib(", max_new_tokens=64):
        print(chunk.text, end="", flush=True)
    print(chunk.finish_reason, chunk.stats.tokens_per_second)
    client.stats()

`generate` yields the server's GenerateResponse messages (token_ids, text; the last one has
finish_reason and stats). gRPC errors surface as `grpc.RpcError` with the server's status and
message (e.g. INVALID_ARGUMENT naming the field).

Retries: a call that fails UNAVAILABLE before the server sent anything (no server listening yet,
the target restarting) is retried by gRPC itself with exponential back-off, up to `retries` more
times (gRPC's retry policy; 0 turns it off). A stream that has already delivered a token is never
retried: gRPC commits a call once a response arrives, so no token is ever delivered twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc

from specpipe.modes import Mode
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc


# gRPC allows at most 5 attempts per call; the back-off doubles from 0.25 s (with jitter), so four
# retries span about 4 s: a worker's restart on a small host.
DEFAULT_RETRIES = 4
MAX_ATTEMPTS = 5


def retry_options(retries: int) -> list[tuple[str, object]]:
    """Channel options for gRPC's own retry of UNAVAILABLE calls that received nothing yet."""
    assert 0 <= retries < MAX_ATTEMPTS, f"retries must be in [0, {MAX_ATTEMPTS - 1}]"
    if retries == 0:
        return [("grpc.enable_retries", 0)]
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.25s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config = {"methodConfig": [{"name": [{"service": "specpipe.v1.SpecPipe"}], "retryPolicy": policy}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


class Client:
    def __init__(
        self,
        addr: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
    ):
        """`token`: bearer token when the server requires one; `root_certificates`: PEM of the CA
        for a TLS server (plain text otherwise); `timeout`: default per-call deadline in seconds;
        `retries`: how often a call that failed UNAVAILABLE before its first response is tried
        again (0 to 4)."""
        options = retry_options(retries)
        if root_certificates is not None:
            self.channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(addr, options)
        self.stub = specpipe_pb2_grpc.SpecPipeStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: list[int] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        mode: Mode | str | None = None,
        drafter_invariant: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[specpipe_pb2.GenerateResponse]:
        """`mode`: a Mode or its name ("specbranch", ...); None: the server's default."""
        request = specpipe_pb2.GenerateRequest(
            request_id=request_id,
            prompt=prompt or "",
            prompt_ids=prompt_ids or [],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=stop or [],
            mode=specpipe_pb2.MODE_UNSPECIFIED if mode is None else Mode(mode).proto,
            drafter_invariant=drafter_invariant,
        )
        if seed is not None:
            request.seed = seed
        return self.stub.Generate(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def complete(self, prompt: str | None = None, **params) -> tuple[list[int], str, specpipe_pb2.GenerateResponse]:
        """Run a whole request: (token_ids, text, last response with finish_reason and stats)."""
        token_ids, text, last = [], [], None
        for last in self.generate(prompt, **params):
            token_ids += last.token_ids
            text.append(last.text)
        return token_ids, "".join(text), last

    def stats(self, timeout: float | None = 10.0) -> specpipe_pb2.StatsResponse:
        return self.stub.GetStats(specpipe_pb2.StatsRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
