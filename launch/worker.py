"""Shared entry of the two worker processes: `python -m specpipe.draft_worker ...` and
`python -m specpipe.target_worker ...` both land here with their role."""

from __future__ import annotations

import argparse
import logging
import os

import torch

from specpipe.config import DEFAULT_DRAFT_PORT, DEFAULT_HOST, DEFAULT_TARGET_PORT, WorkerConfig, zmq_endpoint


def parse_config(role: str, argv=None) -> WorkerConfig:
    default_port = DEFAULT_DRAFT_PORT if role == "draft" else DEFAULT_TARGET_PORT
    parser = argparse.ArgumentParser(prog=f"python -m specpipe.{role}_worker",
                                     description=f"The specpipe {role} worker (one process, one model).")
    parser.add_argument("--model", required=True, help="model folder or hub id")
    parser.add_argument("--host", default=os.environ.get("SPECPIPE_BIND_HOST", DEFAULT_HOST),
                        help="interface to bind (default 127.0.0.1; env SPECPIPE_BIND_HOST)")
    parser.add_argument("--port", type=int, default=default_port, help="port to bind, 0 = any free port")
    parser.add_argument("--device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
    parser.add_argument("--log-level", default=os.environ.get("SPECPIPE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s {role}-worker %(name)s: %(message)s")
    return WorkerConfig(role=role, model=args.model, bind=zmq_endpoint(args.host, args.port),
                        device=args.device, dtype=args.dtype, num_threads=args.threads,
                        exit_with_parent=args.exit_with_parent)


def main(role: str, argv=None) -> None:
    from specpipe.models import load_model, resolve_device
    from specpipe.worker_loop import exit_with_parent, serve

    config = parse_config(role, argv)
    if config.exit_with_parent:
        exit_with_parent()
    torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    model = load_model(config.model, device=str(device), dtype=config.dtype)
    if role == "draft":
        from specpipe.draft_worker.engine import DraftEngine
        engine = DraftEngine(model, device)
    else:
        from specpipe.target_worker.engine import TargetEngine
        engine = TargetEngine(model, device)
    serve(engine, role, config.bind)
