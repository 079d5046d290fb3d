"""The OpenAI-compatible HTTP API (DESIGN §7, HTTP): `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, served by the coordinator process.

A Starlette app under uvicorn, run as one more task on the coordinator's own event loop (no
thread, no second scheduler): every generation goes through `SpecPipeServicer.execute`, the same
coroutine the gRPC `Generate` calls, so both transports share one admission queue, one set of
limits and one set of counters and metrics. The OpenAI shapes are coordinator/openai_api.py's;
this module owns the HTTP side: reading bodies, authentication, status codes, Server-Sent Events.

- A generation runs as a task beside a watcher of the client's connection: a client that
  disconnects (mid-stream, or while a non-streamed request runs or queues) cancels it, and the
  servicer frees it on both workers as for a gRPC cancel.
- Streamed responses start (200, `text/event-stream`) with the first generated text, so a refusal
  before it (400, 429, 503) is a real HTTP status; one after it is a last `data: {"error": ...}`
  event. Every stream ends with `data: [DONE]`.
- With a token (`--auth-token-file`), every route but `/health` needs `Authorization: Bearer
  <token>`, checked as the gRPC interceptor checks it (coordinator/auth.py); else 401.
- TLS: the same certificate and key as the gRPC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from specpipe.coordinator import openai_api
from specpipe.coordinator.auth import BearerTokenInterceptor
from specpipe.coordinator.openai_api import ApiError, Call
from specpipe.coordinator.servicer import Refused, SpecPipeServicer, server_status
from specpipe.coordinator.text import PromptTooLong

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)  # load-balancer probes need no token (as gRPC's Health service)
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]  # tells a reverse proxy (nginx) not to buffer the stream
# How long start() waits for uvicorn to listen before it gives up, naming the port.
STARTUP_TIMEOUT_S = 10.0
# Retry-After on 429 and 503, which the openai client honours: a slot or a restarted target is
# usually back within a second or two (the supervisor's first restart delay is 0.5 s).
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class HttpSettings:
    model_name: str  # what /v1/models lists and `model` must name
    max_body_bytes: int  # larger request bodies: 413, before they are read whole
    chat_template: str = ""  # --chat-template's text; "" = the tokenizer's own
    token: str = ""  # bearer token; "" = none required


def build_app(servicer: SpecPipeServicer, settings: HttpSettings) -> Starlette:
    api = OpenAiRoutes(servicer, settings)
    app = Starlette(
        routes=[
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/chat/completions", api.chat, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_exception, Exception: _unexpected},
    )
    if settings.token:
        app.add_middleware(BearerAuth, check=BearerTokenInterceptor(settings.token).authorized)
    return app


def error_response(err: ApiError) -> JSONResponse:
    retry = {"retry-after": str(RETRY_AFTER_S)} if err.status in (429, 503) else {}
    auth = {"www-authenticate": "Bearer"} if err.status == 401 else {}
    return JSONResponse(err.body(), status_code=err.status, headers=retry | auth)


async def _http_exception(request: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own refusals (unknown path, wrong method) as OpenAI error objects."""
    return error_response(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}"))


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    logger.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=err)
    return error_response(ApiError(500, f"internal error ({type(err).__name__})"))


class BearerAuth:
    """ASGI middleware: 401 without the right bearer token, except on OPEN_PATHS."""

    def __init__(self, app, check):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = [(key.decode("latin-1"), value.decode("latin-1")) for key, value in scope["headers"]]
            if not self.check(headers):
                logger.warning("refused %s: missing or wrong bearer token", scope["path"])
                refusal = ApiError(
                    401,
                    "missing or invalid bearer token (header 'Authorization: Bearer <token>')",
                    code="invalid_api_key",
                )
                return await error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)


class OpenAiRoutes:
    def __init__(self, servicer: SpecPipeServicer, settings: HttpSettings):
        self.servicer, self.settings = servicer, settings
        self.created = int(time.time())

    async def completions(self, request: Request) -> Response | Generation:
        try:
            call = openai_api.parse_completion(await self._body(request), self.settings.model_name)
        except ApiError as err:
            return self._refuse(err)
        return Generation(self.servicer, call)

    async def chat(self, request: Request) -> Response | Generation:
        try:
            call = openai_api.parse_chat(await self._body(request), self.settings.model_name)
            await self._chat_prompt(call)
        except ApiError as err:
            return self._refuse(err)
        return Generation(self.servicer, call)

    def _refuse(self, err: ApiError) -> Response:
        """A request refused before the servicer saw it, counted as the servicer counts its own."""
        self.servicer.count_failure(openai_api.STATUS_NAMES.get(err.status, "INVALID_ARGUMENT"))
        return error_response(err)

    async def _chat_prompt(self, call: Call) -> None:
        """Render the messages, tokenise them off the event loop (bounded first), and default
        max_tokens to as many as fit."""
        servicer = self.servicer
        try:
            servicer.encoder.check_length("".join(m["content"] for m in call.messages), "messages")
            text = openai_api.render_chat(call, servicer.tokenizer, self.settings.chat_template)
            prompt_ids = await servicer.encoder.encode(text, "messages", special_tokens=False)
        except PromptTooLong as err:
            raise openai_api.bad(str(err), "messages") from None
        if not prompt_ids:
            raise openai_api.bad("messages render to no tokens", "messages")
        call.request.prompt_ids.extend(prompt_ids)
        if not call.max_tokens_given:
            limits = servicer.limits
            call.request.max_new_tokens = openai_api.max_tokens_for(
                len(prompt_ids), limits.context_length, limits.max_new_tokens_cap
            )

    async def _body(self, request: Request) -> dict:
        """The JSON object of a request body, refused (413) past max_body_bytes before it is read whole."""
        limit = self.settings.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit} bytes")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_big
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_big
        try:
            parsed = json.loads(body)
        except ValueError as err:
            raise openai_api.bad(f"the request body is not valid JSON: {err}", None) from None
        if not isinstance(parsed, dict):
            raise openai_api.bad("the request body must be a JSON object", None)
        return parsed

    async def models(self, request: Request) -> Response:
        limits = self.servicer.limits
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.settings.model_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "specpipe",
                        "max_model_len": limits.context_length,
                    }
                ],
            }
        )

    async def health(self, request: Request) -> Response:
        servicer = self.servicer
        status = server_status(servicer.draft.healthy, servicer.target.healthy)
        return JSONResponse({"status": status}, status_code=200 if servicer.target.healthy else 503)


class Generation:
    """The ASGI response of one generation: the servicer's `execute` as a task, beside a watcher
    that cancels it when the client disconnects (the servicer then frees the request)."""

    def __init__(self, servicer: SpecPipeServicer, call: Call):
        self.servicer, self.call = servicer, call

    async def __call__(self, scope, receive, send) -> None:
        produce = asyncio.ensure_future(self._stream(send) if self.call.stream else self._whole(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({produce, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            produce.cancel()  # a no-op once done; else the client left (or the server stops)
            await asyncio.wait({produce})
        if not produce.cancelled():
            produce.result()  # a bug in here: let Starlette log it

    async def _whole(self, send) -> None:
        responses = []

        async def collect(response) -> None:
            responses.append(response)

        try:
            plan = await self.servicer.execute(self.call.request, collect)
        except Refused as err:
            return await _send_json(send, error_response(openai_api.api_error(err, self.call)))
        body = openai_api.response_object(self.call, responses, len(plan.prompt_ids))
        await _send_json(send, JSONResponse(body))

    async def _stream(self, send) -> None:
        sent: list = []  # the GenerateResponses streamed so far

        async def emit(response) -> None:
            if not sent:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            for chunk in openai_api.chunk_objects(self.call, response, first=not sent):
                await _send_event(send, chunk)
            sent.append(response)

        try:
            plan = await self.servicer.execute(self.call.request, emit)
        except Refused as err:
            error = openai_api.api_error(err, self.call)
            if not sent:
                return await _send_json(send, error_response(error))
            await _send_event(send, error.body())
        else:
            if self.call.include_usage:
                await _send_event(send, openai_api.usage_chunk(self.call, len(plan.prompt_ids), sent[-1]))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def _disconnected(receive) -> None:
    """Returns when the client has gone (the body was read already: nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_event(send, data: dict) -> None:
    line = b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": line, "more_body": True})


async def _send_json(send, response: JSONResponse) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the process's own (launch/serve.py) stop everything."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving `app` as a task on the running event loop. `start` returns the bound port
    (0 = any free one), so tests bind port 0 (STYLE §6)."""

    def __init__(self, app, tls_cert: str = "", tls_key: str = "", grace_s: float = 1.0):
        self.app, self.tls = app, (tls_cert or None, tls_key or None)
        self.grace_s = grace_s
        self.server: _Uvicorn | None = None
        self.task: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        try:
            sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)  # create_server appends the address
            raise OSError(err.errno, f"cannot bind the HTTP port {host}:{port} ({reason})") from None
        bound = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            host=host,
            port=bound,
            ssl_certfile=self.tls[0],
            ssl_keyfile=self.tls[1],
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=self.grace_s,
        )
        self.server = _Uvicorn(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise OSError(f"the HTTP server on {host}:{bound} stopped while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the HTTP server on {host}:{bound} did not start in {STARTUP_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.01)
        return bound

    async def stop(self) -> None:
        """Stop accepting; give running requests `grace_s`, then cancel them (freed as any cancel)."""
        if self.server is None:
            return
        self.server.should_exit = True
        await self.task
