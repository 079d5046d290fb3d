"""The `specpipe` command line (DESIGN §7): serve, generate, demo, build-demo, train-predictor,
calibrate-draft, bench, curve-keygen. The offline tools (build-demo, train-predictor,
calibrate-draft) are imported only when they run.

A user's mistake ends a command with one line on stderr naming the cause and the fix, and a
non-zero exit code (2 for a flag's value); tracebacks only with --log-level debug (launch/report.py).
`serve` checks its flags, files, ports, devices, models and tokenizers before it starts a process
(launch/preflight.py), binds its gRPC port before the workers load (health NOT_SERVING until the
target answers), pins its processes as `--pin auto` lays them out unless told otherwise, and
prints what it serves before `specpipe serving on HOST:PORT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys

from specpipe.config import DEFAULT_GRPC_PORT, DEFAULT_HOST, CoordinatorConfig, PolicyConfig
from specpipe.launch.errors import OneLineParser
from specpipe.launch.report import is_debug, reporting
from specpipe.launch.serve_flags import DEMO_MODEL_NAME, add_serve_args, demo_models, log_level, worker_flags
from specpipe.modes import MODE_NAMES, Mode


def cmd_serve(args) -> None:
    from specpipe.launch.preflight import check_serve
    from specpipe.launch.runtime_dir import RuntimeDir

    plan = check_serve(args, demo_models)  # before anything starts: a typo costs a second
    # The spawned workers' sockets live in a private folder, removed however serve ends (but SIGKILL:
    # the next serve removes that one); a SIGTERM before serve's loop takes the signal unwinds too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with RuntimeDir() if not (args.target_addr and args.draft_addr) else contextlib.nullcontext() as runtime:
        run_serve(args, plan, runtime)


def run_serve(args, plan, runtime) -> None:
    """Run `specpipe serve` as checked (`plan`), its workers' sockets in `runtime` (a RuntimeDir;
    None when both run elsewhere), until SIGINT/SIGTERM."""
    from specpipe.launch import endpoints
    from specpipe.launch.local import WorkerOptions, spawn_workers, start_together, stop_process
    from specpipe.launch.serve import serve
    from specpipe.launch.placement import worker_nice
    from specpipe.launch.preflight import check_tokenizers
    from specpipe.launch.report import summary_lines

    os.environ["SPECPIPE_LOG_LEVEL"] = args.log_level  # the spawned workers log (and report) alike
    target, draft, pins = plan.target, plan.draft, plan.pins
    role_flags = endpoints.serve_worker_flags(args, runtime, worker_flags(args))
    nice = worker_nice(pins)
    for role, value in nice.items():
        role_flags[role] = [*role_flags.get(role, []), "--nice", str(value)]
    curve_keys = os.path.abspath(args.curve_keys) if args.curve_keys else ""
    options = WorkerOptions(
        host=args.worker_host,
        transport=args.transport,
        target_data_port=args.target_data_port,
        target_device=args.target_device,
        draft_device=args.draft_device,
        dtype=args.dtype,
        threads=args.threads,
        target_data_addr=args.target_data_addr,
        target_data_bind=endpoints.spawned_data_bind(args, runtime),
        curve_keys=curve_keys,
        target_cpus=pins.get("target", ""),
        draft_cpus=pins.get("draft", ""),
        role_flags=role_flags,
    )
    config = CoordinatorConfig(
        target_model=target,
        draft_addr=args.draft_addr or "",
        target_addr=args.target_addr or "",
        host=args.host,
        port=args.port,
        default_mode=Mode(args.mode),
        max_new_tokens_cap=args.max_new_tokens_cap,
        policy=PolicyConfig(
            kind=args.policy,
            num_draft_tokens=args.num_draft_tokens,
            min_confidence=args.min_confidence,
            branch_width=args.branch_width,
            min_branch_prob=args.min_branch_prob,
            min_branch_prob_alone=args.min_branch_prob_alone,
            branch_confidence=args.branch_confidence,
            branch_lookahead=args.branch_lookahead,
            max_branches=args.max_branches,
            main_lookahead=args.main_lookahead,
            prepare_branch_blocks=args.prepare_branch_blocks,
            hold_draft_reports=args.hold_draft_reports,
            urgent_fork_rows=args.urgent_fork_rows,
            idle_decode=args.idle_decode,
        ),
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_requests=args.max_queued_requests,
        max_tokens_in_flight=args.max_tokens_in_flight,
        auth_token_file=args.auth_token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        log_format=args.log_format,
        curve_keys=curve_keys,
        health_port=args.health_port,
        target_startup_timeout_s=args.target_startup_timeout,
        draft_startup_timeout_s=args.draft_startup_timeout,
        http_port=args.http_port,
        chat_template=plan.chat_template,
        served_model_name=args.served_model_name or args.target or DEMO_MODEL_NAME,
    )
    models = {"target": args.target_addr or target, "draft": args.draft_addr or draft}

    def describe(coordinator, workers: dict) -> list[str]:
        extra = {}
        if coordinator.health_port is not None:
            extra["plain-text health"] = f"{config.host}:{coordinator.health_port}"
        if coordinator.http_url:
            extra["OpenAI-compatible HTTP"] = f"{coordinator.http_url} (model {config.served_model_name!r})"
        return summary_lines(
            models=models,
            workers=workers,
            pins=pins,
            nice=nice,
            pin_why=plan.pin_why,
            config=config,
            port=coordinator.port,
            metrics_port=coordinator.metrics_port,
            extra_ports=extra,
        ) + [endpoints.describe(runtime, workers, bool(config.curve_keys))]

    spawned = (None if args.target_addr else target, None if args.draft_addr else draft)
    # Workers that need not wait for each other start now, each pinned as the plan says: they load
    # torch and their models while this process checks the tokenizers and builds the coordinator
    # (seconds of imports); the rest are spawned from serve's event loop once the gRPC port is bound
    # (health NOT_SERVING meanwhile). The coordinator is pinned after them. Both from this thread,
    # which runs the loop: the workers' exit-with-parent signal follows the thread that started them.
    timeouts = {"target": args.target_startup_timeout or None, "draft": args.draft_startup_timeout or None}
    early = start_together(*spawned, options, timeouts)
    try:
        if plan.tokenizer_pair:
            check_tokenizers(*plan.tokenizer_pair)
        spawn = functools.partial(spawn_workers, *spawned, options, started=early)
        asyncio.run(serve(config, spawn if any(spawned) else None, pins.get("coordinator", ""), describe))
    finally:  # serve stops what it took over; early workers it never did (a check or serve failed first) too
        for ready in (early or {}).values():
            stop_process(ready.process)


def cmd_generate(args) -> None:
    from specpipe.launch.report import client_options, rpc_error_line

    token, root_certificates = client_options(args.addr, args.token_file, args.tls_ca)
    if not is_debug(args.log_level):
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # grpc's own log lines: the one line says it
    import grpc
    from specpipe.client import Client

    client = Client(args.addr, token=token, root_certificates=root_certificates, timeout=args.timeout)
    last, wrote = None, False
    try:
        for last in client.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            mode=args.mode,
        ):
            sys.stdout.write(last.text)
            sys.stdout.flush()
            wrote = wrote or bool(last.text)
    except grpc.RpcError as err:
        print("\n" if wrote else "", end="", flush=True)
        print(
            f"specpipe generate: error: {rpc_error_line(err, args.addr, root_certificates is not None, bool(token))}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    stats = last.stats
    print(
        f"\n[finish: {last.finish_reason}; {stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
        f"acceptance {stats.acceptance_rate:.2f}, {stats.mean_accepted_length:.2f} tokens/verification, "
        f"TTFT {stats.time_to_first_token_s * 1000:.0f} ms]",
        file=sys.stderr,
    )


def cmd_curve_keygen(args) -> None:
    from specpipe.curve import CurveError, generate_keys

    try:
        created = generate_keys(args.dir)
    except CurveError as err:
        raise SystemExit(str(err)) from None
    for path in created:
        print(path)
    print(f"every process: --curve-keys {args.dir} (see the README: which host needs which file)", file=sys.stderr)


def cmd_demo(args) -> None:
    from specpipe.launch.demo import run_demo

    run_demo(num_prompts=args.prompts, max_new_tokens=args.max_new_tokens)


def cmd_build_demo(args) -> None:
    from pathlib import Path

    from specpipe.tools.build_demo import build_demo_pair, summary_lines

    info = build_demo_pair(Path(args.out), seed=args.seed, preset=args.preset)
    print("\n".join(summary_lines(info, Path(args.out))))


def cmd_train_predictor(args) -> None:
    from specpipe.tools.train_predictor import summary_lines, train_predictor

    info = train_predictor(args.target, args.draft, args.out, seed=args.seed, max_positions=args.max_positions)
    print("\n".join(summary_lines(info)))


def cmd_calibrate_draft(args) -> None:
    from specpipe.tools.calibrate_draft import calibrate_draft, summary_lines

    info = calibrate_draft(args.target, args.draft, args.out, seed=args.seed, corpus_files=args.corpus or None)
    print("\n".join(summary_lines(info)))


def add_tool_commands(sub) -> None:
    """The offline tools' subcommands (specpipe/tools/, imported only when one runs)."""
    build = sub.add_parser(
        "build-demo",
        help="(re)build the demo model pair from the standard library",
        description="Train the demo target/draft pair (and its acceptance-length predictor) into "
        "OUT. A full build into the shipped folder (specpipe/assets/demo) also "
        "refreshes the shipped held-out prompts.",
    )
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--preset",
        default="full",
        choices=["full", "mini"],
        help="full: the shipped recipe (~14 min on 2 cores); mini: a miniature pair in seconds",
    )
    build.set_defaults(func=cmd_build_demo)

    train = sub.add_parser("train-predictor", help="train the acceptance-length predictor for a target/draft pair")
    train.add_argument("--target", required=True, help="target model folder")
    train.add_argument("--draft", required=True, help="draft model folder")
    train.add_argument(
        "--out",
        default=None,
        help="output .safetensors (default: TARGET/accept_predictor.safetensors, its .json beside)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-positions", type=int, default=16384, help="labelled training rows (about)")
    train.set_defaults(func=cmd_train_predictor)

    calibrate = sub.add_parser(
        "calibrate-draft",
        help="fit the temperatures the draft samples at for a target/draft pair",
        description="Measure, at a few request temperatures, which multiple of the temperature the "
        "draft should draw its tokens at for the target to accept the most of them, and save the "
        "table beside the draft's weights (serve's --draft-temperature-scale auto reads it). The "
        "output law stays the target's whatever the table.",
    )
    calibrate.add_argument("--target", required=True, help="target model folder (with its tokenizer)")
    calibrate.add_argument("--draft", required=True, help="draft model folder")
    calibrate.add_argument("--out", default=None, help="output JSON (default: DRAFT/draft_temperature.json)")
    calibrate.add_argument(
        "--corpus",
        nargs="+",
        default=[],
        metavar="FILE",
        help="text files to take the calibration prompts from (default: the standard library's source)",
    )
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.set_defaults(func=cmd_calibrate_draft)


def main(argv=None) -> None:
    parser = OneLineParser(prog="specpipe", description="Distributed, pipelined speculative decoding.")
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=os.environ.get("SPECPIPE_LOG_LEVEL", "INFO"),
        help="debug | info | warning | error (env SPECPIPE_LOG_LEVEL; debug also shows tracebacks)",
    )
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
    generate.add_argument(
        "--token-file",
        default="",
        metavar="FILE",
        help="file holding the bearer token, for a server started with --auth-token-file",
    )
    generate.add_argument(
        "--tls-ca",
        default="",
        metavar="PEM",
        help="CA certificate(s) that signed the server's: speak TLS (a server with --tls-cert)",
    )
    generate.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline of the request in seconds")
    generate.set_defaults(func=cmd_generate)

    keygen = sub.add_parser(
        "curve-keygen", help="create the CURVE keys that secure the internal sockets (--curve-keys)"
    )
    keygen.add_argument("dir", help="folder to create: server.key(_secret), client.key(_secret), clients/client.key")
    keygen.set_defaults(func=cmd_curve_keygen)

    demo = sub.add_parser("demo", help="build the demo pair if needed, serve it, stream completions")
    demo.add_argument("--prompts", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.set_defaults(func=cmd_demo)

    add_tool_commands(sub)

    from specpipe.launch.bench import add_bench_args, main as bench_main  # light: torch loads only when it runs

    bench = sub.add_parser("bench", help="benchmark HF baselines and every specpipe mode side by side (DESIGN §5)")
    add_bench_args(bench)
    bench.set_defaults(func=lambda args: sys.exit(bench_main(args)))

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s coordinator %(name)s: %(message)s")
    with reporting(f"specpipe {args.command}", is_debug(args.log_level)):
        args.func(args)


if __name__ == "__main__":
    main()
