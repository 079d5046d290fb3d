"""The flags of the two worker processes (`python -m specpipe.draft_worker ...` /
`python -m specpipe.target_worker ...`) and the WorkerConfig they make (`parse_config`);
launch/worker.py starts the worker from it. `specpipe serve` passes its spawned workers their
flags (launch/serve_flags.py `worker_flags`).
"""

from __future__ import annotations

import logging
import os

from specpipe.config import (
    DEFAULT_DATA_PORT,
    DEFAULT_DRAFT_PORT,
    DEFAULT_DRAFT_SLOTS,
    DEFAULT_HOST,
    DEFAULT_STARTUP_TIMEOUT_S,
    DEFAULT_TARGET_PORT,
    DEFAULT_TARGET_SLOTS,
    ENV_CURVE_KEYS,
    WEIGHT_LAYOUTS,
    WorkerConfig,
    parse_scale,
    zmq_endpoint,
)
from specpipe.launch.errors import OneLineParser
from specpipe.proposal import FILE_NAME as PROPOSAL_FILE


def parse_config(role: str, argv=None) -> WorkerConfig:
    default_port = DEFAULT_DRAFT_PORT if role == "draft" else DEFAULT_TARGET_PORT
    parser = OneLineParser(
        prog=f"python -m specpipe.{role}_worker", description=f"The specpipe {role} worker (one process, one model)."
    )
    parser.add_argument("--model", required=True, help="model folder or hub id")
    parser.add_argument(
        "--host",
        default=os.environ.get("SPECPIPE_BIND_HOST", DEFAULT_HOST),
        help="interface to bind (default 127.0.0.1; env SPECPIPE_BIND_HOST)",
    )
    parser.add_argument("--port", type=int, default=default_port, help="port to bind, 0 = any free port")
    parser.add_argument(
        "--bind",
        default="",
        metavar="ENDPOINT",
        help="the control socket's ZeroMQ endpoint, instead of --host/--port: ipc:///DIR/NAME (DIR "
        "of mode 0700: only this user reaches it) or tcp://HOST:PORT",
    )
    parser.add_argument(
        "--data-bind",
        default="",
        metavar="ENDPOINT",
        help="target, zmq transport: the data-plane socket's endpoint, instead of --host/--data-port",
    )
    parser.add_argument(
        "--insecure-internal",
        action="store_true",
        help="allow a non-loopback endpoint without --curve-keys (commands and tokens in plain text, "
        "no authentication: only on a network nobody else shares); warns at every start",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one core)")
    parser.add_argument(
        "--weight-layout",
        choices=WEIGHT_LAYOUTS,
        default="auto",
        help="memory order of the model's Linear weights: column (the faster on the CPU where measured), "
        "row, both (a column-major copy beside the row-major weights: twice their memory; forwards of "
        "1-2 tokens take the row-major, for a CPU whose kernels multiply one token faster that way); "
        "auto (default): column on the CPU, with copies prepacked for oneDNN (the output embedding; a "
        "target's every Linear) kept where timed faster at start-up, row on GPUs; a layout named here "
        "is used as it is, with no copies",
    )
    parser.add_argument(
        "--cpus", default="", metavar="LIST", help="pin the process to these CPUs, e.g. 0 or 2-3 (default: not pinned)"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="add N (0-19) to the process's niceness: a worker that shares its CPUs with the "
        "coordinator then yields them to it when it wakes (default 0)",
    )
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
    parser.add_argument(
        "--transport",
        default=os.environ.get("SPECPIPE_TRANSPORT", "zmq"),
        choices=["zmq", "torch"],
        help="data plane for the draft's q: zmq, or torch (torch.distributed group from "
        "MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, as torchrun sets)",
    )
    parser.add_argument(
        "--data-port",
        type=int,
        default=DEFAULT_DATA_PORT,
        help="target, zmq transport: data-plane port to bind (0 = any)",
    )
    parser.add_argument(
        "--target-data-addr",
        default=os.environ.get("SPECPIPE_TARGET_DATA_ADDR", ""),
        help="draft, zmq transport: the target's data-plane endpoint, tcp://HOST:PORT "
        "(env SPECPIPE_TARGET_DATA_ADDR); needed for sampling",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_STARTUP_TIMEOUT_S,
        help="seconds to wait for the torch.distributed peer (its model loading included) before "
        f"failing (default {DEFAULT_STARTUP_TIMEOUT_S:.0f})",
    )
    parser.add_argument(
        "--no-predictor",
        action="store_true",
        help="target: do not load the acceptance-length predictor saved beside the model",
    )
    parser.add_argument(
        "--curve-keys",
        default=os.environ.get(ENV_CURVE_KEYS, ""),
        metavar="DIR",
        help="CURVE key folder (specpipe curve-keygen DIR): the control socket (and the target's "
        "data-plane socket) become CURVE servers that let in only the keys in DIR/clients; the "
        f"draft's data-plane socket a CURVE client (env {ENV_CURVE_KEYS}; default: plain)",
    )
    store = parser.add_argument_group("KV store and batching")
    store.add_argument(
        "--kv-slots",
        type=int,
        default=0,
        help=f"sequences the KV store holds (target: requests, draft: branches; default "
        f"{DEFAULT_TARGET_SLOTS} / {DEFAULT_DRAFT_SLOTS})",
    )
    store.add_argument(
        "--max-seq-len", type=int, default=0, help="positions per sequence (default: the model's context length)"
    )
    store.add_argument("--max-batch-tokens", type=int, default=512, help="target: tokens fed per forward")
    store.add_argument("--max-batch-requests", type=int, default=64, help="target: requests per forward")
    store.add_argument(
        "--prefill-chunk",
        type=int,
        default=128,
        help="prompt tokens fed per forward for one request (target and draft)",
    )
    parser.add_argument(
        "--drafter",
        default="model",
        choices=["model", "ngram"],
        help="draft: a causal LM (--model), or prompt lookup with no model (ngram; --model names "
        "the target, for its vocabulary)",
    )
    parser.add_argument(
        "--temperature-scale",
        default="auto",
        metavar="auto|S",
        help="draft: sample a request's draft tokens at S times its temperature (default rule only; the "
        "output law is the target's whatever S); auto: the table beside the draft's weights "
        f"({PROPOSAL_FILE}, made by `specpipe calibrate-draft`), else 1",
    )
    parser.add_argument("--log-level", default=os.environ.get("SPECPIPE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    try:
        temperature_scale = parse_scale(args.temperature_scale)
    except ValueError as err:
        parser.error(f"--temperature-scale: {err}")
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {role}-worker %(name)s: %(message)s"
    )
    return WorkerConfig(
        role=role,
        model=args.model,
        bind=args.bind or zmq_endpoint(args.host, args.port),
        device=args.device,
        dtype=args.dtype,
        num_threads=args.threads,
        weight_layout=args.weight_layout,
        exit_with_parent=args.exit_with_parent,
        transport=args.transport,
        data_bind=args.data_bind or zmq_endpoint(args.host, args.data_port),
        target_data_addr=args.target_data_addr,
        insecure_internal=args.insecure_internal,
        dist_timeout_s=args.dist_timeout,
        use_predictor=not args.no_predictor,
        curve_keys=args.curve_keys,
        cpus=args.cpus,
        nice=args.nice,
        kv_slots=args.kv_slots,
        max_seq_len=args.max_seq_len,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_requests=args.max_batch_requests,
        prefill_chunk=args.prefill_chunk,
        drafter=args.drafter,
        temperature_scale=temperature_scale,
    )
