"""Bearer-token authentication for the public gRPC API (DESIGN §3, §7).

With a token configured, every RPC must carry the metadata `authorization: Bearer <token>`, or
it ends with UNAUTHENTICATED before the servicer sees it. Health checks and server reflection stay
open, so load-balancer probes and `grpcurl list` work without the secret. The token is compared in
constant time (`hmac.compare_digest`), so the time a refusal takes says nothing about the token.

This module knows nothing of the SpecPipe service itself: it is a grpc.aio server interceptor.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

# Method-name prefixes that never need the token: probes and service discovery.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
METADATA_KEY = "authorization"
SCHEME = "bearer"


class AuthConfigError(ValueError):
    """The token file is missing, unreadable or empty."""


def read_token(path: str | Path) -> str:
    """The token in a file: its content without surrounding whitespace (a trailing newline is
    usual in secret files mounted by Kubernetes or written by `echo`)."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise AuthConfigError(f"cannot read the auth token file {path}: {err}") from err
    if not token:
        raise AuthConfigError(f"the auth token file {path} is empty")
    if any(ch.isspace() for ch in token):
        raise AuthConfigError(f"the auth token in {path} contains whitespace")
    return token


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry in invocation metadata, if any."""
    for key, value in metadata or ():
        if key.lower() != METADATA_KEY:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == SCHEME:
            return token.strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        assert token, "an empty token would let everyone in"
        self._expected = token.encode("utf-8")

    def authorized(self, metadata) -> bool:
        token = bearer_token(metadata)
        # compare_digest on equal-type bytes is constant-time in the token's content.
        return token is not None and hmac.compare_digest(token.encode("utf-8"), self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES) or self.authorized(handler_call_details.invocation_metadata):
            return handler
        logger.warning("refused %s: missing or wrong bearer token", method)
        return _refusal(handler)  # also for unknown methods: no probing what exists without the token


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` (unary if None) that ends the call with
    UNAUTHENTICATED."""
    message = "missing or invalid bearer token (metadata 'authorization: Bearer <token>')"

    async def abort_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (makes this an async generator, as a streaming handler must be)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(abort_unary)
    codecs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **codecs)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **codecs)
