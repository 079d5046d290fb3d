"""A request held running for as long as a test needs, whatever the machine's speed
(importable: `from held import HeldRequest`).

Its client opens a channel with a tiny HTTP/2 receive window and stops reading after the first
chunk: the server's next `write` waits on flow control, so the request stays admitted (and holds
its slot and tokens) until the test reads on or cancels it. Its run goes on meanwhile (a schedule
never waits on a client's stream: coordinator/servicer.py, Chunks) and frees its state on both
workers when it ends: a test that needs it still generating, or still on the workers, acts within
what generating `max_new_tokens` takes.
"""

from __future__ import annotations

import grpc

from specpipe.modes import Mode
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc

# A receive window this small (with BDP probing off) lets the server send only a few chunks
# before its writes wait for the client to read.
STALLING_CHANNEL = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


class HeldRequest:
    """A Generate call whose client reads one chunk and then stops reading (see the module doc).
    `server`: one with `addr`; over TLS with the token when it has `ca` (the CA's PEM) and `token`.
    `params`: prompt_ids, max_new_tokens, mode, and optionally request_id, temperature, seed and
    timeout."""

    def __init__(self, server, **params):
        ca = getattr(server, "ca", None)
        self.channel = (
            grpc.secure_channel(server.addr, grpc.ssl_channel_credentials(ca), options=STALLING_CHANNEL)
            if ca
            else grpc.insecure_channel(server.addr, options=STALLING_CHANNEL)
        )
        token = getattr(server, "token", None)
        stub = specpipe_pb2_grpc.SpecPipeStub(self.channel)
        request = specpipe_pb2.GenerateRequest(
            prompt_ids=params["prompt_ids"],
            max_new_tokens=params["max_new_tokens"],
            mode=Mode(params["mode"]).proto,
            request_id=params.get("request_id", ""),
            temperature=params.get("temperature", 0.0),
        )
        if "seed" in params:
            request.seed = params["seed"]
        self.stream = stub.Generate(
            request, timeout=params.get("timeout"), metadata=(("authorization", f"Bearer {token}"),) if token else ()
        )
        self.token_ids: list[int] = []
        self.last: specpipe_pb2.GenerateResponse | None = None

    def first(self) -> "HeldRequest":
        self.last = next(self.stream)
        self.token_ids += self.last.token_ids
        return self

    def rest(self) -> list[int]:
        for self.last in self.stream:
            self.token_ids += self.last.token_ids
        return self.token_ids

    def cancel(self) -> None:
        self.stream.cancel()
        self.channel.close()
