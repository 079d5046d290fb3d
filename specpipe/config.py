"""Per-process configuration: one frozen dataclass each, built once from flags and environment in
the entry module and passed down (STYLE §4). Also the address rules shared by all processes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from specpipe.coordinator.policy import PolicyConfig

# Loopback unless told otherwise (DESIGN §3): a worker port is not an API for the network.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 50051
DEFAULT_DRAFT_PORT = 50061
DEFAULT_TARGET_PORT = 50062
# Environment variables that name the workers' addresses (flags override them).
ENV_DRAFT_ADDR = "SPECPIPE_DRAFT_ADDR"
ENV_TARGET_ADDR = "SPECPIPE_TARGET_ADDR"


def zmq_endpoint(host: str, port: int) -> str:
    return f"tcp://{host}:{port}" if port else f"tcp://{host}:*"


def env_or(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class WorkerConfig:
    """A draft or target worker process."""
    role: str                 # "draft" or "target"
    model: str                # folder or hub id
    bind: str                 # ZeroMQ endpoint to bind, e.g. tcp://127.0.0.1:50061 (port * = any)
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int = 1      # torch threads: one core per worker so both run in parallel
    exit_with_parent: bool = False


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator (gRPC server)."""
    target_model: str         # for the tokenizer and the context length
    draft_addr: str           # ZeroMQ endpoint of the draft worker
    target_addr: str          # ZeroMQ endpoint of the target worker
    host: str = DEFAULT_HOST
    port: int = DEFAULT_GRPC_PORT
    default_mode: str = "sequential"
    # Longest generation a request may ask for; documented in the README.
    max_new_tokens_cap: int = 4096
    # Draft-length and branch policy (coordinator/policy.py).
    policy: PolicyConfig = PolicyConfig()
    # Heartbeat: ping each worker this often; declare it dead after this long without an answer.
    heartbeat_interval_s: float = 0.25
    heartbeat_timeout_s: float = 1.5
    extra: dict = field(default_factory=dict)
