"""The `specpipe` command line (DESIGN §7): serve, generate, demo, build-demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from specpipe.config import DEFAULT_GRPC_PORT, DEFAULT_HOST, CoordinatorConfig
from specpipe.coordinator.policy import POLICIES, PolicyConfig

MODE_NAMES = ["specbranch", "pipelined", "sequential", "autoregressive"]
DEFAULT_MODE = "sequential"


def _demo_models() -> tuple[str, str]:
    from specpipe.demo_pair import demo_pair_dir
    root = demo_pair_dir()
    return str(root / "target"), str(root / "draft")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="target model: folder or hub id (default: the demo pair)")
    parser.add_argument("--draft", help="draft model: folder or hub id (default: the demo pair)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="gRPC interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port, 0 = any free port")
    parser.add_argument("--mode", default=DEFAULT_MODE, choices=MODE_NAMES, help="default schedule")
    parser.add_argument("--target-device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument("--draft-device", default="cpu", help="cpu, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--policy", default="confidence", choices=POLICIES,
                        help="draft-length policy: fixed | confidence | adaptive (coordinator/policy.py)")
    parser.add_argument("--num-draft-tokens", type=int, default=4, help="draft tokens per block (the most)")
    parser.add_argument("--min-confidence", type=float, default=0.4,
                        help="end a block after a draft token less likely than this (branch point)")
    parser.add_argument("--branch-width", type=int, default=3, help="most branches forked at a branch point")
    parser.add_argument("--min-branch-prob", type=float, default=0.05,
                        help="fork only candidates at least this likely under the draft")
    parser.add_argument("--max-new-tokens-cap", type=int, default=4096, help="largest max_new_tokens accepted")
    parser.add_argument("--draft-addr", default=os.environ.get("SPECPIPE_DRAFT_ADDR"),
                        help="use a draft worker already running at this ZeroMQ endpoint (tcp://host:port) "
                             "instead of spawning one (env SPECPIPE_DRAFT_ADDR)")
    parser.add_argument("--target-addr", default=os.environ.get("SPECPIPE_TARGET_ADDR"),
                        help="use a target worker already running at this endpoint (env SPECPIPE_TARGET_ADDR)")
    parser.add_argument("--worker-host", default="127.0.0.1", help="interface the spawned workers bind")


def cmd_serve(args) -> None:
    from specpipe.launch.local import serve, spawn_worker

    target, draft = args.target, args.draft
    if not target or not draft:
        demo_target, demo_draft = _demo_models()
        target, draft = target or demo_target, draft or demo_draft
    workers = []
    try:
        if not args.target_addr:
            workers.append(spawn_worker("target", target, args.worker_host, 0, args.target_device, args.dtype,
                                        args.threads))
        if not args.draft_addr:
            workers.append(spawn_worker("draft", draft, args.worker_host, 0, args.draft_device, args.dtype,
                                        args.threads))
    except Exception:
        from specpipe.launch.local import stop_process
        for worker in workers:
            stop_process(worker.process)
        raise
    endpoints = {w.role: w.endpoint for w in workers}
    config = CoordinatorConfig(
        target_model=target, draft_addr=args.draft_addr or endpoints["draft"],
        target_addr=args.target_addr or endpoints["target"], host=args.host, port=args.port,
        default_mode=args.mode, max_new_tokens_cap=args.max_new_tokens_cap,
        policy=PolicyConfig(kind=args.policy, num_draft_tokens=args.num_draft_tokens,
                            min_confidence=args.min_confidence, branch_width=args.branch_width,
                            min_branch_prob=args.min_branch_prob))
    asyncio.run(serve(config, workers))


def cmd_generate(args) -> None:
    from specpipe.client import Client

    client = Client(args.addr)
    last = None
    for last in client.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                mode=args.mode):
        sys.stdout.write(last.text)
        sys.stdout.flush()
    stats = last.stats
    print(f"\n[finish: {last.finish_reason}; {stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
          f"acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens/verification, "
          f"TTFT {stats.time_to_first_token_s * 1000:.0f} ms]", file=sys.stderr)


def cmd_demo(args) -> None:
    from specpipe.launch.demo import run_demo
    run_demo(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens)


def cmd_build_demo(args) -> None:
    from pathlib import Path

    from specpipe.demo_pair import build_demo_pair
    info = build_demo_pair(Path(args.out), seed=args.seed, preset=args.preset)
    print({key: info[key] for key in info if key != "sample"})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="specpipe", description="Distributed, pipelined speculative decoding.")
    parser.add_argument("--log-level", default=os.environ.get("SPECPIPE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the coordinator and both workers")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    generate = sub.add_parser("generate", help="stream a completion from a running server")
    generate.add_argument("prompt")
    generate.add_argument("--addr", default=f"{DEFAULT_HOST}:{DEFAULT_GRPC_PORT}")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", default=[])
    generate.add_argument("--mode", choices=MODE_NAMES)
    generate.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="build the demo pair if needed, serve it, stream completions")
    demo.add_argument("--prompts", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.set_defaults(func=cmd_demo)

    build = sub.add_parser("build-demo", help="(re)build the demo model pair from the standard library")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--preset", default="full", choices=["full", "mini"])
    build.set_defaults(func=cmd_build_demo)

    args = parser.parse_args(argv)
    level = args.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s coordinator %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
