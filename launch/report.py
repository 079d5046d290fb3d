"""What a user of the command line reads when things go wrong, and what `specpipe serve` says it
serves.

`reporting(prog, debug)` wraps a command: a mistake the user can fix (UsageError, StartupError,
a model, token or key file that cannot be used) ends it with ONE line on stderr, `PROG: error:
MESSAGE`, and the error's exit code (2 for usage errors, as argparse); anything else with one line
naming the exception and how to see its traceback (`--log-level debug`), exit code 1. With debug
on, the traceback comes too (STYLE §5: tracebacks are for --log-level debug).

`summary_lines(...)` is the few lines `specpipe serve` prints before `specpipe serving on
HOST:PORT`: models and their sizes, devices, CPU pinning, default mode and policy, ports, limits.

`client_options` and `rpc_error_line` do the same for `specpipe generate`: its flags checked, and a
failed call as one line with the status, the server's message and what to do.

This module knows no flags beyond the names it prints.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from specpipe.launch.errors import StartupError, UsageError
from specpipe.launch.preflight import one_line

# Exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130


def known_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix, with their message as the whole story. Only
    those of modules already imported: an error of a module never imported cannot have been
    raised, and importing specpipe.models (torch, transformers) would cost seconds."""
    types = [UsageError, StartupError]
    for module, name in (
        ("specpipe.models", "ModelLoadError"),
        ("specpipe.curve", "CurveError"),
        ("specpipe.coordinator.auth", "AuthConfigError"),
    ):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def exit_code(err: BaseException) -> int:
    """The error's own (UsageError 2, StartupError 1); a bad model, key or token file: 2."""
    return getattr(err, "exit_code", 2)


@contextlib.contextmanager
def reporting(prog: str, debug: bool, say: Callable[[str, int], None] | None = None):
    """Run the body; on an error, say one line and exit with its code (see above). `say(message,
    code)`: how the line goes out (default: `PROG: error: MESSAGE` on stderr)."""
    say = say or (lambda message, code: print(f"{prog}: error: {message}", file=sys.stderr, flush=True))
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except SystemExit:
        raise
    except Exception as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, known_errors()):
            message, code = one_line(str(err)), exit_code(err)
        else:
            hint = "" if debug else " (unexpected: rerun with --log-level debug for the traceback)"
            message, code = f"{type(err).__name__}: {one_line(str(err))}{hint}", 1
        say(message, code)
        raise SystemExit(code) from None


def is_debug(level: str) -> bool:
    return logging.getLevelName(level.upper()) == logging.DEBUG


def _size(parameters: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{unit}"
    return str(parameters)


def worker_line(role: str, model: str, worker, pins: str, nice: int = 0) -> str:
    """`target  MODEL  12.0M parameters, float32, on cpu, CPUs 0 (pid 123)` (`CPUs 1 at nice 10`
    for a worker that yields to the coordinator); a remote worker: its address."""
    if worker is None:
        return f"{role:<7} remote at {model}"
    info = worker.info
    size = f"{_size(int(info['params']))} parameters, " if "params" in info else ""
    where = f"{size}{info.get('dtype', '?')}, on {info.get('device', '?')}"
    placed = (f"CPUs {pins}" if pins else "not pinned") + (f" at nice {nice}" if nice else "")
    return f"{role:<7} {model}  {where}, {placed} (pid {worker.process.pid})"


def summary_lines(
    *,
    models: dict[str, str],
    workers: dict,
    pins: dict[str, str],
    pin_why: str,
    nice: dict[str, int] | None = None,
    config,
    port: int,
    metrics_port: int | None,
    extra_ports: dict[str, str] | None = None,
) -> list[str]:
    """The start-up summary. `models`: role -> model name (or the remote address); `workers`: role ->
    WorkerProcess (absent: remote); `pins`: role -> CPU list ("" = not pinned); `nice`: role -> the
    niceness a worker was started at (absent: 0); `config`: the
    CoordinatorConfig; `extra_ports`: further listeners, name -> HOST:PORT."""
    nice = nice or {}
    lines = [
        worker_line(role, models[role], workers.get(role), pins.get(role, ""), nice.get(role, 0))
        for role in ("target", "draft")
    ]
    coordinator = f"CPUs {pins['coordinator']}" if pins.get("coordinator") else "not pinned"
    lines.append(f"coordinator {coordinator}; pinning: {pin_why}")
    policy = config.policy
    lines.append(
        f"default mode {config.default_mode}, policy {policy.kind}, up to {policy.num_draft_tokens} "
        f"draft tokens per block"
    )
    tokens = config.max_tokens_in_flight or "no limit on"
    lines.append(
        f"limits: {config.max_concurrent_requests} requests running, {config.max_queued_requests} queued, "
        f"{tokens} tokens in flight, max_new_tokens <= {config.max_new_tokens_cap}"
    )
    security = ", ".join(
        part
        for part in (
            "TLS" if config.tls_cert else "plain text",
            "bearer token required" if config.auth_token_file else "no token",
            "CURVE on the worker sockets" if config.curve_keys else "",
        )
        if part
    )
    listeners = [
        f"gRPC {config.host}:{port} ({security})",
        f"metrics http://{config.host}:{metrics_port}/metrics" if metrics_port is not None else "metrics off",
    ]
    listeners += [f"{name} {address}" for name, address in (extra_ports or {}).items()]
    lines.append("; ".join(listeners))
    return lines


# -- `specpipe generate` ----------------------------------------------------------------------------
def client_options(addr: str, token_file: str, tls_ca: str) -> tuple[str | None, bytes | None]:
    """Check --addr and read --token-file / --tls-ca: (token or None, CA PEM or None)."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--addr {addr}: want HOST:PORT, e.g. 127.0.0.1:50051")
    token = None
    if token_file:
        from specpipe.coordinator.auth import AuthConfigError, read_token

        try:
            token = read_token(token_file)
        except AuthConfigError as err:
            raise UsageError(f"--token-file: {err}") from None
    root_certificates = None
    if tls_ca:
        try:
            root_certificates = Path(tls_ca).read_bytes()
        except OSError as err:
            raise UsageError(f"--tls-ca {tls_ca}: cannot read it ({err.strerror})") from None
    return token, root_certificates


def rpc_error_line(err, addr: str, tls: bool, token: bool) -> str:
    """A failed call as `STATUS from ADDR: the server's (or grpc's) message (what to do)`."""
    code, details = err.code(), one_line(err.details() or "")
    hint = _rpc_hint(code.name, details, addr, tls, token)
    return f"{code.name} from {addr}: {details}" + (f" ({hint})" if hint else "")


def _rpc_hint(code: str, details: str, addr: str, tls: bool, token: bool) -> str:
    if code == "UNAVAILABLE":
        if "resolving" in details:
            return f"cannot resolve the host of --addr {addr}"
        if "Connection refused" in details:
            return f"nothing listens at {addr}: start `specpipe serve`, or give --addr HOST:PORT of a running one"
        if "CERTIFICATE_VERIFY_FAILED" in details:
            return "the server's certificate is not signed by --tls-ca: give the CA that signed it"
        if "WRONG_VERSION_NUMBER" in details or (tls and "handshake" in details.lower()):
            return "the server speaks plain text: drop --tls-ca"
        if "HTTP/2" in details:
            return f"{addr} is not a gRPC server: give --addr the gRPC port of `specpipe serve`"
        if not tls and "Socket closed" in details:
            return "the server may serve TLS: give --tls-ca with the CA that signed its certificate"
        return "is the server up, and is it a specpipe server?"
    if code == "UNAUTHENTICATED":
        return (
            "the token in --token-file is not the server's"
            if token
            else "the server requires a bearer token: give --token-file FILE holding it"
        )
    if code == "UNIMPLEMENTED":
        return f"{addr} does not serve specpipe.v1.SpecPipe: is it a specpipe server?"
    if code == "DEADLINE_EXCEEDED":
        return "the request took longer than --timeout"
    if code == "RESOURCE_EXHAUSTED":
        return "the server is at its limits: retry later"
    return ""
