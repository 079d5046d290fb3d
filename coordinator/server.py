"""Builds and runs the coordinator: the gRPC server clients see (SpecPipe, grpc.health.v1 and
server reflection on one port) over connections to the two workers.

`Coordinator(config).start()` returns the bound port, so tests bind port 0 (STYLE §6). Health is
SERVING while the target worker answers heartbeats. The production options of the config are
wired here: admission limits (coordinator/admission.py), the bearer-token interceptor
(coordinator/auth.py), TLS, the Prometheus endpoint (coordinator/metrics.py), the log format and
CURVE on the worker sockets (specpipe/curve.py).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import grpc
import zmq.asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoConfig

from specpipe.config import CoordinatorConfig
from specpipe.coordinator.admission import Admission, AdmissionLimits
from specpipe.coordinator.auth import BearerTokenInterceptor, read_token
from specpipe.coordinator.metrics import ServerMetrics
from specpipe.coordinator.servicer import ServingLimits, SpecPipeServicer
from specpipe.coordinator.workers import WorkerClient
from specpipe.curve import load_keys
from specpipe.models import load_tokenizer
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = specpipe_pb2.DESCRIPTOR.services_by_name["SpecPipe"].full_name
# How long start-up waits for both workers' first heartbeat before it gives up with an error
# naming the worker and its address.
WORKER_STARTUP_TIMEOUT_S = 60.0
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
        entry = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "process": self.process, "logger": record.name}
        if request_id is not None:
            entry["request_id"] = request_id
        entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str) -> None:
    """"text" keeps the handlers as the entry module set them; "json" gives each root handler
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


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self.metrics: ServerMetrics | None = None
        self.metrics_port: int | None = None

    async def start(self) -> int:
        config = self.config
        configure_logging(config.log_format)
        # Read the secrets first: a wrong path fails at once, before any worker is waited for.
        interceptors = [BearerTokenInterceptor(read_token(config.auth_token_file))] if config.auth_token_file else []
        credentials = server_credentials(config.tls_cert, config.tls_key) if config.tls_cert or config.tls_key else None
        curve_keys = load_keys(config.curve_keys, client=True) if config.curve_keys else None
        tokenizer = load_tokenizer(config.target_model)
        model_config = AutoConfig.from_pretrained(config.target_model).get_text_config(decoder=True)
        limits = ServingLimits(
            vocab_size=model_config.vocab_size,
            context_length=getattr(model_config, "max_position_embeddings", None) or model_config.n_positions,
            max_new_tokens_cap=config.max_new_tokens_cap, default_mode=config.default_mode,
            policy=config.policy)
        self.zmq_context = zmq.asyncio.Context()
        self.draft = WorkerClient("draft", config.draft_addr, self.zmq_context,
                                  config.heartbeat_interval_s, config.heartbeat_timeout_s, curve_keys)
        self.target = WorkerClient("target", config.target_addr, self.zmq_context,
                                   config.heartbeat_interval_s, config.heartbeat_timeout_s, curve_keys)
        for worker in (self.draft, self.target):
            worker.start()
        await asyncio.gather(self.draft.wait_healthy(WORKER_STARTUP_TIMEOUT_S),
                             self.target.wait_healthy(WORKER_STARTUP_TIMEOUT_S))
        admission = Admission(AdmissionLimits(config.max_concurrent_requests, config.max_queued_requests,
                                              config.max_tokens_in_flight))
        self.metrics = ServerMetrics(admission, (self.draft, self.target))
        self.servicer = SpecPipeServicer(tokenizer, limits, self.draft, self.target, admission, self.metrics)
        self.health = health.aio.HealthServicer()
        # No SO_REUSEPORT: a second server on a taken port must fail, not share it with the first.
        self.server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        specpipe_pb2_grpc.add_SpecPipeServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self._bind(f"{config.host}:{config.port}", credentials)
        await self.server.start()
        if config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
            except OSError as err:
                raise OSError(err.errno, f"cannot bind the metrics port {config.host}:{config.metrics_port} "
                                         f"({err.strerror})") from err
        self._tasks.append(asyncio.create_task(self._watch_health()))
        logger.info("specpipe serving on %s:%d (default mode %s%s%s; at most %d running, %d queued)",
                    config.host, self.port, config.default_mode, ", TLS" if credentials else "",
                    ", token required" if interceptors else "", config.max_concurrent_requests,
                    config.max_queued_requests)
        return self.port

    def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """The bound port; a port in use (or a host that is not an address here) raises OSError
        EADDRINUSE naming the address, which `specpipe serve` reports as one line."""
        try:
            if credentials is not None:
                port = self.server.add_secure_port(address, credentials)
            else:
                port = self.server.add_insecure_port(address)
        except RuntimeError:   # grpc's "Failed to bind to address"
            port = 0
        if port == 0:
            raise OSError(errno.EADDRINUSE, f"cannot bind the gRPC port {address} (in use, or not an address here)")
        return port

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
        if self.server is not None:
            await self.server.stop(grace)
        if self.metrics is not None:
            self.metrics.close()
        for worker in (self.draft, self.target):
            await worker.close()
        self.zmq_context.term()
