"""The torchrun entry (DESIGN §7): `torchrun --nproc-per-node 2 -m specpipe.launch.torchrun [serve flags]`,
or one rank per node (`torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d ...`).

Rank 0 runs the target worker in this process (it is the torch.distributed member) and the
coordinator as a child process (`python -m specpipe.launch.cli serve --target-addr ... --draft-addr
...`, its own process as everywhere else); rank 1 runs the draft worker. The draft's q travel over
the process group (gloo on CPU, NCCL on CUDA: the backend follows the device, which follows
LOCAL_RANK unless --target-device / --draft-device name one).

The control endpoints: on one node (--worker-host loopback, the default) each rank binds its
worker's ZeroMQ socket as an ipc:// path in a private folder of its own (launch/runtime_dir.py:
mode 0700, removed at exit), so no other user of the node reaches it; across nodes, on
--worker-host (port chosen by the OS), CURVE keys required unless --insecure-internal
(launch/endpoints.py). Rank 1 publishes its endpoint in the process group's store and rank 0 reads
it there, so nothing but torchrun's rendezvous has to be known in advance. With several nodes,
`--host auto --worker-host auto` lets one command line serve every node: each binds its own
address, and the coordinator (on whichever node the rendezvous made rank 0) prints where it serves.

Shutdown: SIGTERM/SIGINT (torchrun forwards Ctrl-C and its own SIGTERM to each rank's process
group, the coordinator included) or the coordinator exiting stops rank 0's loop; rank 0 then sets
a stop key that rank 1 looks for while idle, waits for rank 1 to say it has stopped, and both
exit 0, each logging "rank N (role) exits with code C". (torchrun itself exits 1 after a signal,
whatever its ranks did: it re-raises the signal.)

This module knows nothing of scheduling or models beyond loading one: it wires processes.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from specpipe.config import DEFAULT_STARTUP_TIMEOUT_S, WorkerConfig, parse_scale, zmq_endpoint
from specpipe.launch.errors import OneLineParser
from specpipe.launch.serve_flags import add_serve_args
from specpipe.launch.report import exit_code, known_errors, one_line

logger = logging.getLogger(__name__)

# How often rank 1 asks the store for rank 0's stop key while idle (one round trip to the store).
STOP_POLL_S = 0.5
# How long rank 0 waits for rank 1 to confirm that it stopped, and for the coordinator to exit
# after SIGTERM, before it goes anyway.
PEER_STOP_TIMEOUT_S = 5.0
COORDINATOR_STOP_TIMEOUT_S = 15.0
# After a signal to rank 0: how long the coordinator (likely signalled too: torchrun signals the
# rank's process group) may take to stop by itself. It leaves its event loop at once but then
# needs a second or two to exit, during which a second SIGTERM would kill it.
SIGNAL_GRACE_S = 5.0
# Model loading happens before the group forms, so the slower rank's load counts against this: the
# start-up wait that fits a large model (specpipe.config).
DEFAULT_DIST_TIMEOUT_S = DEFAULT_STARTUP_TIMEOUT_S
# --host / --worker-host value meaning "this node's address" (node_address): one command line for
# every node, whichever of them torchrun's rendezvous makes rank 0.
AUTO_HOST = "auto"
# Flags that configure the ranks, or that rank 0 resolves: kept out of the coordinator's command
# line as the user wrote them.
RANK_FLAGS = (
    "--host",
    "--target",
    "--draft",
    "--target-addr",
    "--draft-addr",
    "--transport",
    "--worker-host",
    "--target-device",
    "--draft-device",
    "--dtype",
    "--threads",
    "--target-data-port",
    "--target-data-addr",
    "--dist-timeout",
    "--log-level",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="torchrun --nproc-per-node 2 -m specpipe.launch.torchrun",
        allow_abbrev=False,
        description="specpipe under torchrun: rank 0 runs the target worker and the coordinator (gRPC), "
        "rank 1 the draft worker; the draft's q travel over the torch.distributed group "
        "(NCCL on GPUs, gloo on CPU). Takes the flags of `specpipe serve`.",
    )
    add_serve_args(parser)
    # Devices follow LOCAL_RANK unless named; the data plane is the process group.
    parser.set_defaults(target_device=None, draft_device=None, transport="torch", target_addr=None, draft_addr=None)
    options = parser._option_string_actions  # reword the serve help where torchrun differs
    options["--target-device"].help = "target device (default: from LOCAL_RANK: cuda:LOCAL_RANK, else cpu)"
    options["--draft-device"].help = "draft device (default: from LOCAL_RANK: cuda:LOCAL_RANK, else cpu)"
    options["--host"].help = (
        "gRPC interface of the coordinator, on rank 0's node (default 127.0.0.1); "
        "'auto' = that node's address (see --worker-host)"
    )
    options["--worker-host"].help = (
        "interface each rank's worker binds (default 127.0.0.1: one node, where the "
        "workers bind ipc:// sockets in a private folder instead). Several "
        "nodes: 'auto' = each node's own address (the local end of the route to "
        "MASTER_ADDR, or on MASTER_ADDR's node the address its host name resolves "
        "to); never 0.0.0.0 unless you pass it"
    )
    options["--transport"].help = "torch only: under torchrun the data plane is the process group"
    for flag in ("--draft-addr", "--target-addr", "--target-data-port", "--target-data-addr"):
        options[flag].help = argparse.SUPPRESS  # serve's remote-worker wiring: the ranks are the workers
    group = parser.add_argument_group("torchrun")
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_DIST_TIMEOUT_S,
        help=f"seconds to wait for the other rank (model loading included) before failing "
        f"(default {DEFAULT_DIST_TIMEOUT_S:.0f})",
    )
    group.add_argument("--log-level", default=os.environ.get("SPECPIPE_LOG_LEVEL", "INFO"))
    return parser


def coordinator_argv(
    argv: list[str], host: str, target: str, draft: str, target_addr: str, draft_addr: str, log_level: str
) -> list[str]:
    """`python -m specpipe.launch.cli serve` over the two running workers, with the user's
    coordinator flags (every serve flag but the rank ones, which the ranks have used)."""
    kept, skip_value = [], False
    for word in argv:
        if skip_value:
            skip_value = False
        elif word.split("=", 1)[0] in RANK_FLAGS:
            skip_value = "=" not in word
        else:
            kept.append(word)
    return [
        sys.executable,
        "-m",
        "specpipe.launch.cli",
        "--log-level",
        log_level,
        "serve",
        *kept,
        "--host",
        host,
        "--target",
        target,
        "--draft",
        draft,
        "--target-addr",
        target_addr,
        "--draft-addr",
        draft_addr,
    ]


def node_address() -> str:
    """This node's address on the network that joins the ranks: the local end of the route to
    MASTER_ADDR (a UDP connect sends nothing); on MASTER_ADDR's own node, where that route is
    loopback, the first non-loopback IPv4 address the host name resolves to; else 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        routed = probe.getsockname()[0]
    if not routed.startswith("127."):
        return routed
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(socket.getfqdn(), None, socket.AF_INET)}
    except OSError:
        resolved = set()
    return min((addr for addr in resolved if not addr.startswith("127.")), default="127.0.0.1")


def resolve_host(host: str) -> str:
    return node_address() if host == AUTO_HOST else host


def models(args) -> tuple[str, str]:
    if args.target and args.draft:
        return args.target, args.draft
    from specpipe.demo_pair import demo_pair_dir

    try:
        # Not built here: two ranks (or nodes) building it at once would race.
        root = demo_pair_dir(build_if_missing=False)
    except FileNotFoundError as err:
        raise SystemExit(f"{err}\nname --target and --draft, or build the demo pair first (specpipe demo)") from None
    return args.target or str(root / "target"), args.draft or str(root / "draft")


class StoreKeys:
    """Keys in the process group's store, per torchrun restart (the agent's store outlives one)."""

    def __init__(self):
        prefix = f"specpipe/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.draft_endpoint, self.stop, self.draft_stopped = (
            f"{prefix}/{name}" for name in ("draft_endpoint", "stop", "draft_stopped")
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.transport != "torch":
        parser.error("--transport: under torchrun the data plane is the process group (torch)")
    if args.target_addr or args.draft_addr:
        parser.error("--target-addr/--draft-addr: under torchrun the ranks are the workers")
    missing = [
        name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        parser.error(
            f"{', '.join(missing)} not set: start this under torchrun (torchrun --nproc-per-node 2 "
            f"-m specpipe.launch.torchrun ...)"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size != 2:
        parser.error(f"WORLD_SIZE is {world_size}: specpipe runs on exactly 2 ranks (target and draft)")
    role = "target" if rank == int(os.environ.get("SPECPIPE_TARGET_RANK", 0)) else "draft"
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {role}-worker rank {rank} %(name)s: %(message)s",
    )
    try:
        code = run_rank(role, args, argv, *models(args))
    except SystemExit as err:  # a message for the user (SystemExit("...")) or a plain exit code
        if not isinstance(err.code, int):
            print(err.code, file=sys.stderr)
        code = err.code if isinstance(err.code, int) else 1
    except known_errors() as err:  # the user's to fix (a model, a key folder): one line
        print(f"specpipe torchrun rank {rank} ({role}): error: {one_line(str(err))}", file=sys.stderr)
        code = exit_code(err)
    except BaseException:
        logger.exception("rank %d (%s) failed", rank, role)
        code = 1
    # The target's data-plane receiver thread is blocked in recv: tearing the group down under it
    # would abort the process, and rank 1 has confirmed it stopped. Leave at once (as launch/worker.py).
    logger.info("rank %d (%s) exits with code %d", rank, role, code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_rank(role: str, args, argv: list[str], target: str, draft: str) -> int:
    """Serve this rank's role, its control socket an ipc path in a private folder of its own (removed
    at the end) when the ranks share a node (a loopback --worker-host), else TCP on --worker-host."""
    from specpipe.launch.endpoints import is_loopback, require_secure
    from specpipe.launch.errors import UsageError
    from specpipe.launch.runtime_dir import RuntimeDir

    host = resolve_host(args.worker_host)
    if not is_loopback(host):
        require_secure([("--worker-host", host)], args.curve_keys, args.insecure_internal)
        return serve_rank(role, args, argv, target, draft, zmq_endpoint(host, 0))
    if int(os.environ.get("LOCAL_WORLD_SIZE", 2)) < int(os.environ["WORLD_SIZE"]):
        raise UsageError(
            f"--worker-host {args.worker_host}: the ranks run on different nodes, so their workers "
            f"must bind an address the other node reaches: give --worker-host auto (and --curve-keys DIR)"
        )
    with RuntimeDir() as runtime:
        return serve_rank(role, args, argv, target, draft, runtime.endpoint(f"{role}.sock"))


def serve_rank(role: str, args, argv: list[str], target: str, draft: str, bind: str) -> int:
    import torch
    import torch.distributed as dist

    from specpipe.distributed import device_for_local_rank
    from specpipe.launch.worker import build_engine, secure
    from specpipe.models import load_model, resolve_device
    from specpipe.worker_loop import WorkerLoop

    named = args.target_device if role == "target" else args.draft_device
    device = resolve_device(named) if named else device_for_local_rank()
    config = WorkerConfig(
        role=role,
        model=target if role == "target" else draft,
        bind=bind,
        device=str(device),
        dtype=args.dtype,
        num_threads=args.threads,
        transport="torch",
        dist_timeout_s=args.dist_timeout,
        curve_keys=args.curve_keys,
        temperature_scale=parse_scale(args.draft_temperature_scale),
    )
    curve_keys, authenticator = secure(config)  # the control socket only: the data plane is the group
    torch.set_num_threads(config.num_threads)
    model = load_model(config.model, device=config.device, dtype=config.dtype)
    engine, _ = build_engine(config, model, device)
    store, keys = dist.distributed_c10d._get_default_store(), StoreKeys()
    loop = WorkerLoop(engine, role, config.bind, curve_keys=curve_keys)
    logger.info("%s worker on %s, control %s", role, device, loop.endpoint)
    if role == "draft":
        return run_draft(loop, store, keys)
    return run_target(loop, store, keys, args, argv, target, draft)


def run_draft(loop, store, keys: StoreKeys) -> int:
    store.set(keys.draft_endpoint, loop.endpoint.encode())
    last_look = [0.0]

    def stop_requested() -> bool:
        if time.monotonic() - last_look[0] < STOP_POLL_S:
            return False
        last_look[0] = time.monotonic()
        try:
            return store.check([keys.stop])
        except Exception as err:  # the store went away with rank 0 or torchrun: nothing left to serve
            logger.warning("store unreachable (%s): stopping", err)
            return True

    loop.should_stop = stop_requested
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, loop.stop)
    loop.run()
    logger.info("draft worker stopped")
    try:
        store.set(keys.draft_stopped, b"1")
    except Exception:
        pass  # rank 0 is gone already: it waits for this key only for a while
    return 0


def run_target(loop, store, keys: StoreKeys, args, argv: list[str], target: str, draft: str) -> int:
    try:
        store.wait([keys.draft_endpoint], datetime.timedelta(seconds=args.dist_timeout))
    except Exception as err:
        raise SystemExit(f"rank 1 never published its draft endpoint within {args.dist_timeout:.0f}s: {err}")
    draft_endpoint = store.get(keys.draft_endpoint).decode()
    command = coordinator_argv(
        argv, resolve_host(args.host), target, draft, loop.endpoint, draft_endpoint, args.log_level
    )
    logger.info("target %s, draft %s: starting the coordinator", loop.endpoint, draft_endpoint)
    coordinator = subprocess.Popen(command)
    loop.should_stop = lambda: coordinator.poll() is not None
    signalled = []

    def on_signal(*_args) -> None:
        signalled.append(True)
        loop.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        loop.run()
    finally:
        coordinator_code = stop_coordinator(coordinator, grace_s=SIGNAL_GRACE_S if signalled else 0.0)
        stop_draft(store, keys)
    logger.info("target worker stopped (coordinator exit code %s)", coordinator_code)
    # A coordinator that stopped on our signal (or torchrun's) is a clean stop; one that failed is not.
    return 0 if coordinator_code in (0, -signal.SIGTERM, -signal.SIGINT) else 1


def stop_draft(store, keys: StoreKeys) -> None:
    """Set the stop key and wait (a while) until rank 1 says it stopped, so that it is not cut off
    in the middle of a data-plane send."""
    try:
        store.set(keys.stop, b"1")
        store.wait([keys.draft_stopped], datetime.timedelta(seconds=PEER_STOP_TIMEOUT_S))
    except Exception as err:  # rank 1 or the store is gone already
        logger.warning("rank 1 did not confirm its stop within %.0fs: %s", PEER_STOP_TIMEOUT_S, err)


def stop_coordinator(coordinator: subprocess.Popen, grace_s: float) -> int:
    try:
        return coordinator.wait(grace_s)
    except subprocess.TimeoutExpired:
        coordinator.terminate()
    try:
        return coordinator.wait(COORDINATOR_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        coordinator.kill()
        return coordinator.wait()


if __name__ == "__main__":
    main()
