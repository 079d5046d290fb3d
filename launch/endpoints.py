"""Where the internal ZeroMQ sockets (the workers' control sockets, the target's data plane) listen,
and when they must be secured. The rules (README, Security):

- One host: `specpipe serve` binds every worker socket it spawns as an `ipc://` path in its private
  runtime directory (launch/runtime_dir.py, mode 0700), so only the user who started it reaches
  them: the control sockets always (only its own coordinator talks to them), the target's data
  plane unless a draft elsewhere must reach it (`--draft-addr`, a fixed `--target-data-port`, or a
  non-loopback `--worker-host`): then TCP on `--worker-host`. A worker started alone binds where
  `--bind` / `--data-bind` (or `--host`, `--port`) say; an ipc path must be in a private folder.
- Across hosts: a TCP endpoint that is not loopback, bound or connected to, carries commands and
  tokens over a network. Without CURVE keys (`--curve-keys`) that is refused, unless
  `--insecure-internal` says the network is private; then it is logged as a warning at every start.

An address counts as loopback when it is a literal loopback IP (127.0.0.0/8, ::1) or `localhost`;
any other name, an interface name and the wildcards (0.0.0.0, ::, *) count as the network: names
are not resolved (no DNS at start-up, and a name may resolve otherwise later).

This module knows nothing of what travels on the sockets.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from specpipe.launch.errors import UsageError
from specpipe.launch.runtime_dir import why_not_private

logger = logging.getLogger(__name__)

# The sockets `specpipe serve` puts in its runtime folder.
CONTROL_SOCKET = "{role}.sock"
DATA_SOCKET = "target-data.sock"
FIX = (
    "give --curve-keys DIR (make one with `specpipe curve-keygen DIR`) to encrypt them and let in only its "
    "client key, or --insecure-internal if only trusted hosts share that network"
)


def is_loopback(host: str) -> bool:
    """A literal loopback address or `localhost` (see the module docstring)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def network_host(address: str) -> str | None:
    """The host of a `tcp://HOST:PORT` endpoint (after a `SOURCE;` part), or a bare host as given;
    None for ipc:// and the other transports, which stay on this host."""
    if "://" not in address:
        return address
    if not address.startswith("tcp://"):
        return None
    return address.removeprefix("tcp://").rsplit(";", 1)[-1].rsplit(":", 1)[0]


def crosses_hosts(address: str) -> bool:
    """Whether an endpoint, or a host to bind, reaches beyond this host."""
    host = network_host(address)
    return host is not None and not is_loopback(host)


def require_secure(named: list[tuple[str, str]], curve_keys: str, insecure: bool) -> None:
    """[(what, endpoint or host)]: those that cross hosts need CURVE keys, else UsageError naming
    --curve-keys and --insecure-internal; with --insecure-internal, a warning instead."""
    crossing = [(what, endpoint) for what, endpoint in named if endpoint and crosses_hosts(endpoint)]
    if not crossing or curve_keys:
        return
    what, endpoint = crossing[0]
    if not insecure:
        raise UsageError(
            f"{what} {endpoint} is not on a loopback address: the internal sockets would carry commands "
            f"and tokens over the network in plain text, to anyone who reaches it; {FIX}"
        )
    for what, endpoint in crossing:
        logger.warning(
            "--insecure-internal: %s %s crosses the network in plain text, without authentication: "
            "anyone who reaches it can drive the workers and read the tokens",
            what,
            endpoint,
        )


def require_private_ipc(named: list[tuple[str, str]], insecure: bool) -> None:
    """[(what, endpoint)]: an ipc:// path to bind must be in a folder only this user may enter
    (else UsageError; with --insecure-internal, a warning)."""
    for what, endpoint in named:
        if not endpoint.startswith("ipc://"):
            continue
        problem = why_not_private(Path(endpoint.removeprefix("ipc://")).parent)
        if problem and not insecure:
            raise UsageError(
                f"{what} {endpoint}: {problem}: put the socket in a folder of mode 0700 (mkdir -m 700 "
                f"DIR), or give --insecure-internal to share it on purpose"
            )
        if problem:
            logger.warning("--insecure-internal: %s %s: %s", what, endpoint, problem)


def check_worker(config) -> None:
    """A worker's own endpoints (WorkerConfig), before it loads anything: its binds and, for the
    draft, its data-plane connection to the target."""
    binds = [("the control socket (--host, --port, --bind)", config.bind)]
    if config.transport == "zmq" and config.role == "target":
        binds.append(("the data-plane socket (--host, --data-port, --data-bind)", config.data_bind))
    connects = [("--target-data-addr", config.target_data_addr)] if config.role == "draft" else []
    require_private_ipc(binds, config.insecure_internal)
    require_secure(binds + connects, config.curve_keys, config.insecure_internal)


# -- specpipe serve ---------------------------------------------------------------------------------
def serve_endpoints(args) -> list[tuple[str, str]]:
    """What `specpipe serve` binds or reaches beyond this host, as (flag, endpoint) pairs."""
    spawns = not (args.target_addr and args.draft_addr)
    named = [("--worker-host", args.worker_host)] if spawns else []
    return named + [
        (flag, value or "")
        for flag, value in (
            ("--draft-addr", args.draft_addr),
            ("--target-addr", args.target_addr),
            ("--target-data-addr", args.target_data_addr),
        )
    ]


def check_serve(args) -> None:
    """`specpipe serve`'s part of the preflight (launch/preflight.py): no plain text across hosts."""
    require_secure(serve_endpoints(args), args.curve_keys, args.insecure_internal)


def data_plane_over_tcp(args) -> bool:
    """Whether serve's spawned target binds its data plane on TCP (--worker-host): a draft on
    another host has to reach it."""
    return bool(args.draft_addr) or bool(args.target_data_port) or not is_loopback(args.worker_host)


def spawned_data_bind(args, runtime) -> str:
    """Where serve's spawned target binds its data plane when that is known before it starts: an
    ipc path in `runtime` (then the draft starts beside the target instead of after it); "" when
    the target picks a TCP port, the transport is torch, or no target is spawned."""
    if runtime is None or args.target_addr or args.transport != "zmq" or data_plane_over_tcp(args):
        return ""
    return runtime.endpoint(DATA_SOCKET)


def serve_worker_flags(args, runtime, flags: dict[str, list[str]]) -> dict[str, list[str]]:
    """The spawned workers' flags ({role: flags}) plus those that bind their sockets in `runtime`
    (a RuntimeDir; None: nothing is spawned) and pass --insecure-internal on."""
    if runtime is None:
        return flags
    insecure = ["--insecure-internal"] if args.insecure_internal else []
    flags = {
        role: [*flags.get(role, []), "--bind", runtime.endpoint(CONTROL_SOCKET.format(role=role)), *insecure]
        for role in ("target", "draft")
    }
    if not data_plane_over_tcp(args):
        flags["target"] += ["--data-bind", runtime.endpoint(DATA_SOCKET)]
    return flags


def describe(runtime, workers: dict, curve: bool) -> str:
    """The start-up summary's line on the internal sockets."""
    secured = "CURVE" if curve else "no CURVE"
    tcp = [
        f"{role} {endpoint}"
        for role, worker in sorted(workers.items())
        for endpoint in (worker.endpoint, worker.data_endpoint)
        if endpoint.startswith("tcp://")
    ]
    where = f"ipc in {runtime.path} (mode 0700: this user only)" if runtime is not None else "none spawned"
    return f"internal sockets: {where}" + (f"; TCP: {', '.join(tcp)}" if tcp else "") + f"; {secured}"
