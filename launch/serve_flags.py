"""The flags of `specpipe serve` (the torchrun launch and the deployment files take the same ones)
and what they turn into: the flag types, `add_serve_args`, and the spawned workers' own flags
(`worker_flags`). launch/cli.py runs the commands; launch/preflight.py checks the values.
"""

from __future__ import annotations

import argparse
import logging
import os

from specpipe.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_STARTUP_TIMEOUT_S,
    ENV_CURVE_KEYS,
    NGRAM_DRAFTER,
    IDLE_DECODE,
    POLICIES,
    CoordinatorConfig,
    PolicyConfig,
)
from specpipe.modes import MODE_NAMES

DEMO_MODEL_NAME = "specpipe-demo"  # what HTTP clients call the demo pair's target (its path is no name)


def demo_models() -> tuple[str, str]:
    from specpipe.demo_pair import demo_pair_dir

    root = demo_pair_dir()
    return str(root / "target"), str(root / "draft")


def probability_or_auto(text: str) -> float | None:
    """`auto` -> None (learnt), else a probability in [0, 1]."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want auto or a probability, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def count_or_off(text: str) -> int | None:
    """`off` -> None, else a count >= 0."""
    if text == "off":
        return None
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"want off or a count >= 0, got {text!r}")
    return count


def seconds(text: str) -> float:
    """A duration flag: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def log_level(text: str) -> str:
    """A logging level name, upper-cased (logging's own error for a bad one is a traceback)."""
    if not isinstance(logging.getLevelName(text.upper()), int):
        raise argparse.ArgumentTypeError(f"want debug, info, warning or error, got {text!r}")
    return text.upper()


def temperature_scale_arg(text: str) -> str:
    """--draft-temperature-scale: 'auto' or a factor > 0, checked here (the draft worker takes it as is)."""
    from specpipe.config import parse_scale

    try:
        parse_scale(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target model: folder or hub id (default: the demo pair)")
    parser.add_argument(
        "--draft",
        help=f"draft model: folder or hub id (default: the demo pair), or "
        f"'{NGRAM_DRAFTER}' for prompt lookup (no draft model)",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="gRPC interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port, 0 = any free port")
    parser.add_argument(
        "--mode", default=CoordinatorConfig.default_mode.value, choices=MODE_NAMES, help="default schedule"
    )
    parser.add_argument("--target-device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument("--draft-device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument(
        "--draft-temperature-scale",
        default="auto",
        type=temperature_scale_arg,
        metavar="auto|S",
        help="a sampled request's draft tokens are drawn at S times its temperature (the default rule "
        "stays exact: the target judges each by the law it was drawn from; S only moves how many are "
        "accepted); auto (default): the table `specpipe calibrate-draft` saved beside the draft's "
        "weights, else 1",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument(
        "--pin",
        default="auto",
        choices=["auto", "none"],
        help="auto (default): when this server starts both workers on CPU and may use 2 x --threads "
        "cores, the target gets cores of its own, the draft the next ones, and the coordinator a "
        "spare core of its own if there is one, else the draft's, the draft then yielding to it "
        "(the benchmark's fastest layout); none: leave placement to the OS. Any --*-cpus flag "
        "replaces the automatic layout",
    )
    parser.add_argument(
        "--target-cpus",
        default="",
        metavar="LIST",
        help="pin the target worker to these CPUs, e.g. 0 or 0-3 (default: --pin)",
    )
    parser.add_argument("--draft-cpus", default="", metavar="LIST", help="pin the draft worker to these CPUs")
    parser.add_argument(
        "--coordinator-cpus", default="", metavar="LIST", help="pin the coordinator (this process) to these CPUs"
    )
    parser.add_argument(
        "--policy",
        default=PolicyConfig.kind,
        choices=POLICIES,
        help="draft-length policy: fixed | confidence | adaptive (coordinator/policy.py)",
    )
    parser.add_argument(
        "--num-draft-tokens", type=int, default=PolicyConfig.num_draft_tokens, help="draft tokens per block (the most)"
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=PolicyConfig.min_confidence,
        help="sequential mode: end a block after a draft token less likely than this",
    )
    parser.add_argument(
        "--branch-confidence",
        type=probability_or_auto,
        default=None,
        metavar="auto|P",
        help="specbranch mode: fork alternatives at a draft token less likely than P; auto "
        "(default): learnt, so that about 80%% of the target's rejections fall on a branch "
        "point",
    )
    parser.add_argument(
        "--branch-width", type=int, default=PolicyConfig.branch_width, help="most branches forked at a branch point"
    )
    parser.add_argument(
        "--min-branch-prob",
        type=float,
        default=PolicyConfig.min_branch_prob,
        help="fork only candidates at least this likely under the draft (while the target's batches hold "
        "other requests)",
    )
    parser.add_argument(
        "--min-branch-prob-alone",
        type=float,
        default=PolicyConfig.min_branch_prob_alone,
        help="the same bar while a request has the workers to itself (the target's batches hold under "
        "1.5 requests on average): its forks cost only idle draft time",
    )
    parser.add_argument(
        "--branch-lookahead",
        type=int,
        default=PolicyConfig.branch_lookahead,
        help="tokens an alternative branch drafts past its fork point",
    )
    parser.add_argument(
        "--max-branches", type=int, default=PolicyConfig.max_branches, help="live alternative branches per request"
    )
    parser.add_argument(
        "--main-lookahead",
        type=int,
        default=None,
        metavar="N",
        help="specbranch mode, rollback-aware: the main branch drafts only N tokens past its "
        "first unsure token (default: no cap; fewer rolled-back tokens, but slower here)",
    )
    parser.add_argument(
        "--hold-draft-reports",
        action=argparse.BooleanOptionalAction,
        default=PolicyConfig.hold_draft_reports,
        help="pipelined modes: behind a block in flight, the draft reports its tokens when the coordinator "
        "acts on them (the job's end, a step before the next block is cut), several in one message, not "
        "one message per draft step (default: on)",
    )
    parser.add_argument(
        "--prepare-branch-blocks",
        action=argparse.BooleanOptionalAction,
        default=PolicyConfig.prepare_branch_blocks,
        help="specbranch mode: queue each drafted branch on the target behind the block holding its fork "
        "point, so that a verdict emitting the branch's token goes on to verify it without waiting for "
        "the coordinator (default: on)",
    )
    parser.add_argument(
        "--urgent-fork-rows",
        type=count_or_off,
        default=PolicyConfig.urgent_fork_rows,
        metavar="N|off",
        help="specbranch mode, while a request has the workers to itself: when the main line's next "
        "block is short of full and has room on the target, at most N forks draft beside it, the "
        "nearest fork points first; the others pause (default: %(default)s; off: no cap)",
    )
    parser.add_argument(
        "--idle-decode",
        choices=IDLE_DECODE,
        default=PolicyConfig.idle_decode,
        help="speculative modes: the target decodes by itself where it would wait for a block: the first "
        "token, in the prompt's forward (auto, pipelined modes: while its batches hold few requests, or "
        "always for seeded requests under the default sampling rule), and in the pipelined modes, for greedy and "
        "drafter-invariant requests, after a rejection no prepared block foresaw, until the redrafted block "
        "comes (auto: when the measured redraft takes longer than a one-token forward, e.g. a draft across "
        "hosts); off: neither (default: %(default)s)",
    )
    parser.add_argument("--max-new-tokens-cap", type=int, default=4096, help="largest max_new_tokens accepted")
    parser.add_argument(
        "--draft-addr",
        default=os.environ.get("SPECPIPE_DRAFT_ADDR"),
        help="use a draft worker already running at this ZeroMQ endpoint (tcp://host:port) "
        "instead of spawning one (env SPECPIPE_DRAFT_ADDR)",
    )
    parser.add_argument(
        "--target-addr",
        default=os.environ.get("SPECPIPE_TARGET_ADDR"),
        help="use a target worker already running at this endpoint (env SPECPIPE_TARGET_ADDR)",
    )
    parser.add_argument("--worker-host", default="127.0.0.1", help="interface the spawned workers bind")
    parser.add_argument(
        "--transport",
        default="zmq",
        choices=["zmq", "torch"],
        help="data plane for the draft's q: zmq, or torch (torch.distributed: NCCL on GPUs, gloo on CPU)",
    )
    parser.add_argument(
        "--target-data-port",
        type=int,
        default=0,
        help="data-plane port of the spawned target (zmq; 0 = any). Give a fixed one (e.g. 50063) "
        "when the draft runs elsewhere (--draft-addr): that draft needs --target-data-addr",
    )
    parser.add_argument(
        "--target-data-addr",
        default=os.environ.get("SPECPIPE_TARGET_DATA_ADDR", ""),
        help="with --target-addr: the remote target's data-plane endpoint, for the spawned draft",
    )

    def at_least(low: int):
        def parse(text: str) -> int:
            value = int(text)
            if value < low:
                raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
            return value

        return parse

    limits = parser.add_argument_group("admission (beyond the limits: RESOURCE_EXHAUSTED)")
    limits.add_argument(
        "--max-concurrent-requests",
        type=at_least(1),
        default=32,
        help="requests generating at once; more wait in the queue (default 32)",
    )
    limits.add_argument(
        "--max-queued-requests",
        type=at_least(0),
        default=256,
        help="requests waiting (FIFO) for a slot; beyond that, refused (default 256)",
    )
    limits.add_argument(
        "--max-kv-tokens",
        "--max-tokens-in-flight",
        dest="max_tokens_in_flight",
        type=at_least(0),
        default=0,
        help="KV budget: the sum of prompt + max_new_tokens over running requests; a request "
        "that would pass it waits, one that could never fit is refused (default 0: bounded "
        "by the KV slots alone, --max-concurrent-requests of --max-seq-len positions)",
    )
    batching = parser.add_argument_group("batching (each worker forward serves every ready request)")
    batching.add_argument(
        "--max-batch-tokens",
        type=at_least(1),
        default=512,
        help="target: tokens fed per forward, all requests together (default 512)",
    )
    batching.add_argument(
        "--max-batch-requests", type=at_least(1), default=64, help="target: requests per forward (default 64)"
    )
    batching.add_argument(
        "--prefill-chunk",
        type=at_least(1),
        default=128,
        help="prompt tokens fed per forward for one request, so a long prompt never stalls "
        "the others' streams (default 128)",
    )
    batching.add_argument(
        "--max-seq-len",
        type=at_least(0),
        default=0,
        help="positions a request may hold (prompt + generated; default 0: the model's context)",
    )
    security = parser.add_argument_group("security and observability")
    security.add_argument(
        "--auth-token-file",
        default=os.environ.get("SPECPIPE_AUTH_TOKEN_FILE", ""),
        help="file holding the bearer token every RPC except health and reflection must carry "
        "(metadata 'authorization: Bearer <token>'); default: no token "
        "(env SPECPIPE_AUTH_TOKEN_FILE)",
    )
    security.add_argument("--tls-cert", default="", help="PEM certificate chain: serve TLS (with --tls-key)")
    security.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    security.add_argument(
        "--curve-keys",
        default=os.environ.get(ENV_CURVE_KEYS, ""),
        metavar="DIR",
        help="secure the internal ZeroMQ sockets with CURVE, keys from DIR (specpipe curve-keygen "
        "DIR): the coordinator connects to the workers as a CURVE client and the spawned "
        f"workers get the same flag (env {ENV_CURVE_KEYS}); needed when a worker socket is on "
        "another host. On one host they are ipc:// sockets only this user reaches",
    )
    security.add_argument(
        "--insecure-internal",
        action="store_true",
        help="let the internal sockets cross the network in plain text (a non-loopback "
        "--worker-host, or a tcp:// worker address on another host) without --curve-keys: only "
        "on a network no one else shares; warns at every start (default: refused)",
    )
    security.add_argument(
        "--metrics-port",
        type=at_least(0),
        default=None,
        help="serve Prometheus metrics over HTTP at --host:PORT/metrics (0 = any free port; default: off)",
    )
    security.add_argument(
        "--health-port",
        type=at_least(0),
        default=None,
        help="also serve grpc.health.v1 alone, in plain text, at --host:PORT, for probes that "
        "cannot speak TLS (Kubernetes' gRPC probes); services '' and specpipe.v1.SpecPipe: "
        "SERVING while the target answers; 'liveness': while this process's loop turns "
        "(0 = any free port; default: off)",
    )
    security.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="coordinator log lines: text, or one JSON object per line (default text)",
    )
    startup = parser.add_argument_group("start-up (the gRPC port answers at once: NOT_SERVING until the target is up)")
    startup.add_argument(
        "--target-startup-timeout",
        type=seconds,
        default=DEFAULT_STARTUP_TIMEOUT_S,
        metavar="S",
        help="seconds the target worker may take to load and answer (spawned or --target-addr); "
        f"past it serve exits with an error; 0 = no limit (default {DEFAULT_STARTUP_TIMEOUT_S:.0f})",
    )
    startup.add_argument(
        "--draft-startup-timeout",
        type=seconds,
        default=DEFAULT_STARTUP_TIMEOUT_S,
        metavar="S",
        help="a spawned draft must be up within S seconds; a remote one (--draft-addr) is admitted "
        "whenever it first answers, requests running target-only until then, and past S serve "
        f"warns that it still is not there; 0 = no limit (default {DEFAULT_STARTUP_TIMEOUT_S:.0f})",
    )
    http = parser.add_argument_group("OpenAI-compatible HTTP API (same admission, limits, token and TLS as gRPC)")
    http.add_argument(
        "--http-port",
        type=at_least(0),
        default=None,
        help="serve /v1/completions, /v1/chat/completions, /v1/models and /health at --host:PORT "
        "(0 = any free port; default: off, so that no second port opens unasked)",
    )
    http.add_argument(
        "--served-model-name",
        default="",
        metavar="NAME",
        help="the model name HTTP clients see and send (default: --target as given; "
        f"{DEMO_MODEL_NAME} for the demo pair)",
    )
    http.add_argument(
        "--chat-template",
        default="",
        metavar="FILE",
        help="Jinja chat template for /v1/chat/completions (default: the tokenizer's own; "
        "without either, chat requests get a 400 that says so)",
    )


def worker_flags(args) -> dict[str, list[str]]:
    """The spawned workers' KV store and batching flags: a target slot per request admitted at
    once, a draft slot per branch (a request's main line and its alternatives); `--draft ngram`
    runs the prompt-lookup drafter over the target's vocabulary."""
    store = ["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else []
    target = [
        "--kv-slots",
        str(args.max_concurrent_requests),
        "--max-batch-tokens",
        str(args.max_batch_tokens),
        "--max-batch-requests",
        str(args.max_batch_requests),
        "--prefill-chunk",
        str(args.prefill_chunk),
    ]
    draft = [
        "--kv-slots",
        str(args.max_concurrent_requests * (1 + args.max_branches)),
        "--prefill-chunk",
        str(args.prefill_chunk),
    ]
    if args.draft == NGRAM_DRAFTER:
        draft += ["--drafter", "ngram"]
    elif args.draft_temperature_scale != "auto":
        draft += ["--temperature-scale", args.draft_temperature_scale]
    return {"target": target + store, "draft": draft + store}
