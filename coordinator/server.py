"""Builds and runs the coordinator: the gRPC server clients see (SpecPipe, grpc.health.v1 and
server reflection on one port) over connections to the two workers, and, with `http_port`, the
OpenAI-compatible HTTP API on the same event loop and servicer (coordinator/http.py).

`Coordinator(config).start()` binds and returns the port at once, before any worker answers, so
tests bind port 0 (STYLE §6) and a cluster's probes get an answer from the first second. Health:
"" and specpipe.v1.SpecPipe are SERVING while the target worker answers heartbeats (readiness:
can a request be served now), NOT_SERVING before and while it is down; "liveness" is SERVING as
long as the coordinator's event loop answers at all. `--health-port` serves the same health service
alone, in plain text, for probes that cannot speak the API port's TLS. `wait_ready` waits for the
target (and fails past --target-startup-timeout); the draft needs no wait: it is admitted whenever
it first answers, and requests run target-only until then (degraded, as after a draft crash).
The production options of the config are wired here: admission limits (coordinator/admission.py),
the bearer-token interceptor (coordinator/auth.py), TLS, the Prometheus endpoint
(coordinator/metrics.py), the log format and CURVE on the worker sockets (specpipe/curve.py).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc
import zmq
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoConfig

from specpipe.config import CoordinatorConfig
from specpipe.coordinator.admission import Admission, AdmissionLimits
from specpipe.coordinator.auth import BearerTokenInterceptor, read_token
from specpipe.coordinator.http import HttpServer, HttpSettings, build_app
from specpipe.coordinator.metrics import ServerMetrics
from specpipe.coordinator.servicer import SpecPipeServicer
from specpipe.coordinator.validation import ServingLimits
from specpipe.coordinator.workers import WorkerClient, WorkerDown
from specpipe.curve import load_keys
from specpipe.models import load_tokenizer
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc
from specpipe.trace import trace

logger = logging.getLogger(__name__)

SERVICE_NAME = specpipe_pb2.DESCRIPTOR.services_by_name["SpecPipe"].full_name
# The largest request message the gRPC server reads (gRPC's own default, made deliberate): room for
# a prompt that fills a long context; a larger one ends RESOURCE_EXHAUSTED inside gRPC, before any
# of our code runs. Field checks (servicer.plan) bound what is then worth tokenising. The HTTP API
# reads bodies up to the same size (413 beyond).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# The health service that says only "this process's event loop turns" (the kubelet's liveness
# probe): SERVING from the start, whatever the workers do, so a worker reloading for minutes never
# gets the pod killed. "" and SERVICE_NAME are the readiness ones (the target answers).
LIVENESS_SERVICE = "liveness"
# While a worker has not answered yet, say so this often: what is awaited, for how long, what is left.
WAIT_LOG_INTERVAL_S = 30.0
# Past --draft-startup-timeout, remind this often that requests still run target-only.
DRAFT_MISSING_LOG_INTERVAL_S = 600.0
# Once the target answers, how long serve still gives a draft that is already running (a few
# heartbeats) before it calls itself ready, so the first requests do not run target-only for nothing.
DRAFT_GRACE_S = 2.0
# Log lines about a request start with "[request_id] " (servicer.RequestLog, and the scheduler's
# own lines); the JSON formatter lifts the id into its own field.
REQUEST_PREFIX = re.compile(r"^\[([^\]\s]+)\] (.*)$", re.DOTALL)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, process, logger, request_id (lines
    about a request), message, exception (with its traceback, when there is one)."""

    def __init__(self, process: str = "coordinator"):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        request_id = getattr(record, "request_id", None)
        match = REQUEST_PREFIX.match(message)
        if match and (request_id is None or match.group(1) == request_id):
            request_id, message = match.group(1), match.group(2)
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
        }
        if request_id is not None:
            entry["request_id"] = request_id
        entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str) -> None:
    """ "text" keeps the handlers as the entry module set them; "json" gives each root handler
    (a stderr one if there is none) the JSON formatter."""
    assert log_format in ("text", "json"), f"unknown log format {log_format!r}"
    if log_format == "json":
        root = logging.getLogger()
        if not root.handlers:
            root.addHandler(logging.StreamHandler())
        for handler in root.handlers:
            handler.setFormatter(JsonLogFormatter())


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials:
    """TLS credentials from a PEM certificate chain and its private key."""
    if not (cert_file and key_file):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())])


def serving_limits(config: CoordinatorConfig) -> tuple:
    """(tokenizer, ServingLimits) from the target model's folder: no weights are read."""
    tokenizer = load_tokenizer(config.target_model)
    model_config = AutoConfig.from_pretrained(config.target_model).get_text_config(decoder=True)
    limits = ServingLimits(
        vocab_size=model_config.vocab_size,
        context_length=getattr(model_config, "max_position_embeddings", None) or model_config.n_positions,
        max_new_tokens_cap=config.max_new_tokens_cap,
        default_mode=config.default_mode,
        policy=config.policy,
    )
    return tokenizer, limits


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self.metrics: ServerMetrics | None = None
        self.metrics_port: int | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.created = time.monotonic()  # the start-up timeouts count from here
        self.zmq_context: zmq.Context | None = None
        self.draft: WorkerClient | None = None
        self.target: WorkerClient | None = None
        self.http: HttpServer | None = None
        self.http_port: int | None = None

    async def start(self) -> int:
        """Bind the gRPC server (and the health and metrics ports) and return its port, without
        waiting for any worker: health is NOT_SERVING until the target answers (`wait_ready`)."""
        config = self.config
        configure_logging(config.log_format)
        trace.open("coordinator")
        # Read the secrets first: a wrong path fails at once, before any worker is waited for.
        token = read_token(config.auth_token_file) if config.auth_token_file else ""
        interceptors = [BearerTokenInterceptor(token)] if token else []
        credentials = server_credentials(config.tls_cert, config.tls_key) if config.tls_cert or config.tls_key else None
        curve_keys = load_keys(config.curve_keys, client=True) if config.curve_keys else None
        tokenizer, limits = serving_limits(config)
        self.zmq_context = zmq.Context()
        self.draft = WorkerClient(
            "draft",
            config.draft_addr,
            self.zmq_context,
            config.heartbeat_interval_s,
            config.heartbeat_timeout_s,
            curve_keys,
        )
        self.target = WorkerClient(
            "target",
            config.target_addr,
            self.zmq_context,
            config.heartbeat_interval_s,
            config.heartbeat_timeout_s,
            curve_keys,
        )
        for worker in (self.draft, self.target):
            worker.start()
        admission = Admission(
            AdmissionLimits(config.max_concurrent_requests, config.max_queued_requests, config.max_tokens_in_flight)
        )
        self.metrics = ServerMetrics(admission, (self.draft, self.target))
        self.servicer = SpecPipeServicer(tokenizer, limits, self.draft, self.target, admission, self.metrics)
        acceptance, metrics = self.servicer.acceptance, self.metrics

        def on_batch(role: str, rows: int, tokens: int, seconds: float) -> None:
            metrics.observe_batch(role, rows, tokens)
            if role == "target":  # the policy's cost of a forward, and the target's clock
                acceptance.observe_forward(rows, tokens, seconds)

        for worker in (self.draft, self.target):
            worker.on_batch = on_batch
        self.health = health.aio.HealthServicer()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)],
        )  # a taken port fails, never shared
        specpipe_pb2_grpc.add_SpecPipeServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self._bind(self.server, config.port, credentials, "gRPC port")
        await self.server.start()
        if config.health_port is not None:
            await self._serve_health_port(config.health_port)
        if config.metrics_port is not None:
            self._serve_metrics(config.metrics_port)
        if config.http_port is not None:
            await self._start_http(token)
        self._tasks += [asyncio.create_task(self._watch_health()), asyncio.create_task(self._watch_draft())]
        self.tls, self.token_required = credentials is not None, bool(interceptors)
        logger.info(
            "gRPC bound on %s:%d%s; health NOT_SERVING until the target worker answers",
            config.host,
            self.port,
            f" (plain-text health on port {self.health_port})" if self.health_port else "",
        )
        return self.port

    def _bind(self, server: grpc.aio.Server, port: int, credentials, what: str) -> int:
        """The bound port; a port in use (or a host that is not an address here) raises OSError
        EADDRINUSE naming `what` and the address, which `specpipe serve` reports as one line."""
        address = f"{self.config.host}:{port}"
        try:
            bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind to address"
            bound = 0
        if bound == 0:
            raise OSError(errno.EADDRINUSE, f"cannot bind the {what} {address} (in use, or not an address here)")
        return bound

    async def _start_http(self, token: str) -> None:
        """The OpenAI-compatible HTTP API, on this loop and servicer, with the gRPC port's token and
        TLS; bound at once like the gRPC port (/health says 503 until the target answers)."""
        config = self.config
        settings = HttpSettings(
            model_name=config.served_model_name or config.target_model,
            max_body_bytes=MAX_REQUEST_BYTES,
            chat_template=config.chat_template,
            token=token,
        )
        self.http = HttpServer(build_app(self.servicer, settings), config.tls_cert, config.tls_key)
        self.http_port = await self.http.start(config.host, config.http_port)
        logger.info("OpenAI-compatible HTTP API on %s (model %r)", self.http_url, settings.model_name)

    @property
    def http_url(self) -> str | None:
        """The HTTP API's base URL (clients add /v1/...), once started; None when it is off."""
        if self.http_port is None:
            return None
        scheme = "https" if self.config.tls_cert else "http"
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{scheme}://{host}:{self.http_port}"

    def _serve_metrics(self, port: int) -> None:
        """Prometheus metrics on `port`; a port in use raises OSError naming it (as `_bind`)."""
        try:
            self.metrics_port = self.metrics.serve(self.config.host, port)
        except OSError as err:
            raise OSError(
                err.errno, f"cannot bind the metrics port {self.config.host}:{port} ({err.strerror})"
            ) from err

    async def _serve_health_port(self, port: int) -> None:
        """grpc.health.v1 alone on a plain-text port: the kubelet's gRPC probes speak no TLS, and
        the API port may. The same HealthServicer, so both ports always say the same."""
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # as the API port: never shared
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = self._bind(self.health_server, port, None, "health port")
        await self.health_server.start()

    def target_time_left(self) -> float | None:
        """Seconds left of --target-startup-timeout (counted from this object's creation); None: no limit."""
        limit = self.config.target_startup_timeout_s
        return None if limit <= 0 else max(0.0, self.created + limit - time.monotonic())

    async def wait_ready(self) -> None:
        """Wait until the target answers (health turns SERVING), saying every WAIT_LOG_INTERVAL_S
        what is awaited; WorkerDown past --target-startup-timeout. The draft is not waited for."""
        next_log = time.monotonic() + WAIT_LOG_INTERVAL_S
        while not self.target.healthy:
            left = self.target_time_left()
            if left == 0.0:
                raise WorkerDown(
                    f"the target worker at {self.target.address or '(not started)'} did not answer "
                    f"within {self.config.target_startup_timeout_s:.0f}s (--target-startup-timeout)"
                )
            if time.monotonic() >= next_log:
                logger.info(
                    "waiting for the target worker at %s: %.0fs so far, %s; health NOT_SERVING meanwhile",
                    self.target.address or "(loading)",
                    time.monotonic() - self.created,
                    "no limit" if left is None else f"{left:.0f}s left",
                )
                next_log += WAIT_LOG_INTERVAL_S
            await asyncio.sleep(0.05)
        grace_end = time.monotonic() + DRAFT_GRACE_S
        while not self.draft.healthy and time.monotonic() < grace_end:
            await asyncio.sleep(0.05)
        config = self.config
        logger.info(
            "specpipe serving on %s:%d (default mode %s%s%s; at most %d running, %d queued)",
            config.host,
            self.port,
            config.default_mode,
            ", TLS" if self.tls else "",
            ", token required" if self.token_required else "",
            config.max_concurrent_requests,
            config.max_queued_requests,
        )

    async def _watch_draft(self) -> None:
        """A draft that answers late is admitted whenever it does (its first pong marks it up); until
        then requests run target-only. Say what is awaited, and warn past --draft-startup-timeout."""
        limit = self.config.draft_startup_timeout_s
        next_log, warned = time.monotonic() + WAIT_LOG_INTERVAL_S, False
        while not self.draft.healthy:
            now = time.monotonic()
            waited, address = now - self.created, self.draft.address or "(loading)"
            if limit > 0 and waited >= limit and not warned:
                logger.warning(
                    "the draft worker at %s has not answered in %.0fs (--draft-startup-timeout): "
                    "serving target-only (degraded) until it does",
                    address,
                    waited,
                )
                warned, next_log = True, now + DRAFT_MISSING_LOG_INTERVAL_S
            elif now >= next_log:
                left = f"{limit - waited:.0f}s left" if limit > 0 else "no limit"
                logger.log(
                    logging.WARNING if warned else logging.INFO,
                    "waiting for the draft worker at %s: %.0fs so far%s; requests run target-only meanwhile",
                    address,
                    waited,
                    "" if warned else f", {left}",
                )
                next_log = now + (DRAFT_MISSING_LOG_INTERVAL_S if warned else WAIT_LOG_INTERVAL_S)
            await asyncio.sleep(0.1)
        logger.info("draft worker at %s admitted after %.1fs", self.draft.address, time.monotonic() - self.created)

    def worker_died(self, role: str, why: str) -> None:
        """The launcher saw a local worker process exit: act now, not at the next heartbeat."""
        {"draft": self.draft, "target": self.target}[role].mark_down(why)

    async def _watch_health(self) -> None:
        serving = None
        while True:
            now = self.target.healthy
            if now != serving:
                status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, status)
                serving = now
            await asyncio.sleep(0.1)

    async def stop(self, grace: float = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        if self.http is not None:
            await self.http.stop()
        for server in (self.server, self.health_server):
            if server is not None:
                await server.stop(grace)
        if self.metrics is not None:
            self.metrics.close()
        for worker in (self.draft, self.target):
            if worker is not None:  # None: start() failed before the workers were set up
                await worker.close()
        if self.zmq_context is not None:
            self.zmq_context.term()
