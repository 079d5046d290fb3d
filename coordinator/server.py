"""Builds and runs the coordinator: the gRPC server clients see (SpecPipe, grpc.health.v1 and
server reflection on one port) over connections to the two workers.

`build_server(config)` returns `(server, port)` already started, so tests bind port 0
(STYLE §6). Health is SERVING while the target worker answers heartbeats.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import zmq.asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoConfig

from specpipe.config import CoordinatorConfig
from specpipe.coordinator.servicer import ServingLimits, SpecPipeServicer
from specpipe.coordinator.workers import WorkerClient
from specpipe.models import load_tokenizer
from specpipe.proto.specpipe.v1 import specpipe_pb2, specpipe_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = specpipe_pb2.DESCRIPTOR.services_by_name["SpecPipe"].full_name
# How long start-up waits for both workers' first heartbeat before it gives up with an error
# naming the worker and its address.
WORKER_STARTUP_TIMEOUT_S = 60.0


class Coordinator:
    def __init__(self, config: CoordinatorConfig):
        self.config = config
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> int:
        config = self.config
        tokenizer = load_tokenizer(config.target_model)
        model_config = AutoConfig.from_pretrained(config.target_model).get_text_config(decoder=True)
        limits = ServingLimits(
            vocab_size=model_config.vocab_size,
            context_length=getattr(model_config, "max_position_embeddings", None) or model_config.n_positions,
            max_new_tokens_cap=config.max_new_tokens_cap, default_mode=config.default_mode,
            policy=config.policy)
        self.zmq_context = zmq.asyncio.Context()
        self.draft = WorkerClient("draft", config.draft_addr, self.zmq_context,
                                  config.heartbeat_interval_s, config.heartbeat_timeout_s)
        self.target = WorkerClient("target", config.target_addr, self.zmq_context,
                                   config.heartbeat_interval_s, config.heartbeat_timeout_s)
        for worker in (self.draft, self.target):
            worker.start()
        await asyncio.gather(self.draft.wait_healthy(WORKER_STARTUP_TIMEOUT_S),
                             self.target.wait_healthy(WORKER_STARTUP_TIMEOUT_S))
        self.servicer = SpecPipeServicer(tokenizer, limits, self.draft, self.target)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        specpipe_pb2_grpc.add_SpecPipeServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {config.host}:{config.port}")
        await self.server.start()
        self._tasks.append(asyncio.create_task(self._watch_health()))
        logger.info("specpipe serving on %s:%d (default mode %s)", config.host, self.port, config.default_mode)
        return self.port

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
        for worker in (self.draft, self.target):
            await worker.close()
        self.zmq_context.term()
