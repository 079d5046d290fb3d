"""Local launch: spawn the two worker processes (`specpipe serve` runs the coordinator beside them:
launch/serve.py), and start a whole server as a child process (for `specpipe demo`, the benchmark
and the tests).

Each worker is its own OS process (`python -m specpipe.draft_worker ...`), visible in `ps`, bound
where its flags say (serve's: launch/endpoints.py). It prints `READY <endpoint> ...` once bound;
the launcher waits for that line with a timeout, saying now and then how long is left. A worker
that cannot start says why in one `FAILED CODE MESSAGE` line instead (SPECPIPE_STARTUP_REPORT),
raised as a UsageError (code 2) or StartupError, which `specpipe serve` reports as one line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from specpipe.launch.errors import StartupError, UsageError
from specpipe.launch.placement import auto_pins

logger = logging.getLogger(__name__)

# A worker loads its model before it binds: how long the helpers wait for that (the tests' tiny
# models, the benchmark's); `specpipe serve` takes its own from --target/--draft-startup-timeout.
WORKER_READY_TIMEOUT_S = 120.0
SERVER_READY_TIMEOUT_S = 180.0
# While waiting for a READY line, say so this often (what, for how long, how long is left).
READY_LOG_INTERVAL_S = 30.0
# `specpipe serve`'s ready line (ready_line), as ServerProcess reads it.
READY_SERVER = re.compile(r"specpipe serving on (\S+):(\d+)(?:, OpenAI-compatible HTTP on (\S+))?")
READY_WORKER = re.compile(r"READY (\S+)(.*)")
FAILED_LINE = re.compile(r"FAILED (\d+) (.*)")
# The environment variable (and value) that makes a worker report a start-up failure on stdout.
STARTUP_REPORT = ("SPECPIPE_STARTUP_REPORT", "stdout")


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


class WorkerStartError(StartupError):
    """A process exited, or stayed silent past its timeout, before it printed its ready line (a
    StartupError: `specpipe serve` reports it as one line, exit code 1)."""

    role = ""  # the worker's role, once known ("target" / "draft")


class WorkerStartTimeout(WorkerStartError):
    """... silent past its timeout."""


def _wait_line(
    process: subprocess.Popen,
    lines: queue.Queue,
    pattern: re.Pattern,
    timeout: float | None,
    what: str,
    echo: bool = False,
    seen: list | None = None,
) -> re.Match:
    """The first line of `process` matching `pattern` (the lines before it go to `seen`); `timeout`
    None or <= 0: no limit. A `FAILED CODE MESSAGE` line raises UsageError (CODE 2) or StartupError."""
    started = time.monotonic()
    deadline = started + timeout if timeout and timeout > 0 else None
    while True:
        wait = READY_LOG_INTERVAL_S if deadline is None else min(READY_LOG_INTERVAL_S, deadline - time.monotonic())
        try:
            line = lines.get(timeout=max(0.01, wait))
        except queue.Empty:
            waited = time.monotonic() - started
            if deadline is not None and time.monotonic() >= deadline:
                process.kill()
                raise WorkerStartTimeout(f"{what} was not ready within {timeout:.0f}s") from None
            left = "no limit" if deadline is None else f"{deadline - time.monotonic():.0f}s left"
            logger.info("waiting for %s (pid %d) to load and bind: %.0fs so far, %s", what, process.pid, waited, left)
            continue
        if line is None:
            raise WorkerStartError(f"{what} exited ({describe_exit(process.wait())}) before it was ready")
        failed = FAILED_LINE.match(line)
        if failed:
            process.wait()
            raise (UsageError if failed.group(1) == "2" else StartupError)(f"{what} could not start: {failed.group(2)}")
        if echo:
            sys.stdout.write(line)
        if seen is not None:
            seen.append(line)
        match = pattern.search(line)
        if match:
            return match


@dataclass
class WorkerProcess:
    role: str
    process: subprocess.Popen
    endpoint: str
    data_endpoint: str = ""  # target, zmq transport
    argv: list[str] = field(default_factory=list)  # how it was started (for a restart)
    env: dict = field(default_factory=dict)
    ready_timeout_s: float | None = WORKER_READY_TIMEOUT_S  # for its READY line (a restart too)
    info: dict = field(default_factory=dict)  # from its READY line: params, device, dtype

    def restart_argv(self) -> list[str]:
        """The same command, pinned to the ports it got (ipc paths are fixed), so peers reconnect to it."""
        argv = list(self.argv)
        for flag, endpoint in (("--port", self.endpoint), ("--data-port", self.data_endpoint)):
            if endpoint.startswith("tcp://") and flag in argv:
                argv[argv.index(flag) + 1] = endpoint.rsplit(":", 1)[1]
        return argv


def start_worker(
    role: str,
    model: str,
    host: str = "127.0.0.1",
    port: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int = 1,
    extra: list[str] | None = None,
    env: dict | None = None,
    ready_timeout_s: float | None = WORKER_READY_TIMEOUT_S,
    prefix: tuple[str, ...] = (),
):
    """Start a worker process; returns a function that waits for its READY line (in a thread, from
    async code; the process is its `.process`). `ready_timeout_s` None or 0: no limit. `prefix`: a
    command the worker runs under (e.g. `ip netns exec NS`, the benchmark's latency link)."""
    command = [
        sys.executable,
        "-m",
        f"specpipe.{role}_worker",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        dtype,
        "--threads",
        str(threads),
        "--exit-with-parent",
        *(extra or []),
    ]
    return start_command(role, command, env or {}, ready_timeout_s, prefix)


def start_command(
    role: str,
    command: list[str],
    env: dict,
    ready_timeout_s: float | None = WORKER_READY_TIMEOUT_S,
    prefix: tuple[str, ...] = (),
):
    """Start a worker's command line now (after `prefix`, e.g. taskset); return the function that
    waits for its READY line (its `.process`: the process), giving the WorkerProcess."""
    process = subprocess.Popen(
        [*prefix, *command],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env, STARTUP_REPORT[0]: STARTUP_REPORT[1]},
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()

    def ready() -> WorkerProcess:
        try:
            match = _wait_line(process, lines, READY_WORKER, ready_timeout_s, f"the {role} worker")
        except Exception as err:
            stop_process(process)
            if isinstance(err, WorkerStartError):
                err.role = role
            raise
        logger.info("%s worker pid %d at %s", role, process.pid, match.group(1))
        info = dict(word.split("=", 1) for word in match.group(2).split() if "=" in word)
        return WorkerProcess(role, process, match.group(1), info.pop("data", ""), command, env, ready_timeout_s, info)

    ready.process = process
    return ready


def spawn_worker(role: str, model: str, **options) -> WorkerProcess:
    """Start a worker process and wait until it is ready."""
    return start_worker(role, model, **options)()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free now: each probe stays bound until all are (ports taken one at a
    time can repeat, as the system may hand out a port again once its probe is closed)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind((host, 0))
        return [probe.getsockname()[1] for probe in probes]


@dataclass
class WorkerOptions:
    """How `specpipe serve` starts its local workers (see spawn_workers). `curve_keys`: passed on as
    --curve-keys; `target_cpus` / `draft_cpus`: as --cpus; `role_flags`: {role: more flags} (the KV
    store and batching)."""

    host: str
    transport: str
    target_data_port: int = 0
    target_device: str = "cpu"
    draft_device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    target_data_addr: str = ""
    target_data_bind: str = ""
    curve_keys: str = ""
    target_cpus: str = ""
    draft_cpus: str = ""
    role_flags: dict[str, list[str]] = field(default_factory=dict)

    def start(self, role: str, model: str, ready_timeout_s: float | None, data_addr: str = "", env=None):
        """Start one worker: start_worker's function that waits for its READY line."""
        secure = ["--curve-keys", self.curve_keys] if self.curve_keys else []
        cpus = self.target_cpus if role == "target" else self.draft_cpus
        own = (["--cpus", cpus] if cpus else []) + self.role_flags.get(role, [])
        if self.transport == "torch":
            plane = ["--transport", "torch"]
        elif role == "target":
            plane = ["--data-port", str(self.target_data_port)]
        else:
            plane = ["--target-data-addr", data_addr]
        return start_worker(
            role,
            model,
            host=self.host,
            device=self.target_device if role == "target" else self.draft_device,
            dtype=self.dtype,
            threads=self.threads,
            extra=[*plane, *secure, *own],
            env=env,
            ready_timeout_s=ready_timeout_s,
        )


def start_together(target: str | None, draft: str | None, options: WorkerOptions, timeouts: dict | None = None):
    """Start both workers now when neither has to wait for the other: torch (they form a two-rank
    group on a free local port, target rank 0, draft rank 1), or zmq with the target's data socket
    known before it starts (`target_data_bind`, an ipc path: ZeroMQ connects the draft once the
    target binds). Returns {role: the function that waits for its READY line}, or None (one of
    them runs elsewhere, or the draft needs the endpoint the target will bind: spawn_workers starts
    them in turn). `timeouts`: {role: seconds for its READY line, None = no limit}."""
    timeouts = timeouts or {}
    if not (target and draft):
        return None
    if options.transport == "torch":
        rendezvous = {"MASTER_ADDR": options.host, "MASTER_PORT": str(free_port(options.host)), "WORLD_SIZE": "2"}
        env = {
            role: {**rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            for role, rank in (("target", 0), ("draft", 1))
        }
    elif options.target_data_bind:
        env = {"target": None, "draft": None}
    else:
        return None
    starts = {"target": options.start("target", target, timeouts.get("target"), env=env["target"])}
    try:
        starts["draft"] = options.start("draft", draft, timeouts.get("draft"), options.target_data_bind, env["draft"])
    except BaseException:
        stop_process(starts["target"].process)
        raise
    return starts


async def spawn_workers(
    target: str | None,
    draft: str | None,
    options: WorkerOptions,
    *,
    timeouts: dict | None = None,
    attach=None,
    started: dict | None = None,
) -> dict[str, WorkerProcess]:
    """Spawn the workers that are named (None: that worker runs elsewhere) and wait until they are
    ready. Both start at once where they can (start_together; `started`: what an earlier
    start_together returned, already running); else, zmq: the target comes up first, and the draft
    is pointed at its data-plane endpoint. `timeouts`: {role: seconds for its READY line, None = no
    limit}; `attach(role, endpoint)`: told as each one is up. Processes start from the thread
    that runs this loop: their exit-with-parent signal follows the thread that started them.
    Cancelled or failed, it stops what it started (and what `started` holds)."""
    timeouts = timeouts or {}
    waiting, workers = {}, {}

    async def up(role: str, ready) -> WorkerProcess:
        waiting[role] = ready
        workers[role] = await asyncio.to_thread(ready)
        if attach is not None:
            attach(role, workers[role].endpoint)
        return workers[role]

    try:
        starts = started or start_together(target, draft, options, timeouts)
        if starts:
            waiting.update(starts)
            await asyncio.gather(*(up(role, ready) for role, ready in starts.items()))
            if options.transport == "zmq":
                assert workers["target"].data_endpoint == options.target_data_bind, workers["target"].data_endpoint
            return workers
        target_data_addr = options.target_data_addr
        if target:
            await up("target", options.start("target", target, timeouts.get("target")))
            target_data_addr = workers["target"].data_endpoint
        if draft:
            await up("draft", options.start("draft", draft, timeouts.get("draft"), target_data_addr))
        return workers
    except BaseException:
        for ready in waiting.values():
            stop_process(ready.process)
        raise


def pin_flags() -> list[str]:
    """The flags of the layout `specpipe serve --pin auto` (its default) picks for CPU workers of
    one thread: the target on a core of its own, the draft on another, the coordinator on a third
    if there is one, else beside the draft, when this process may use two or more; else none
    (launch/placement.py: auto_pins)."""
    pins, _ = auto_pins(threads=1, devices=["cpu"])
    return [word for role in ("target", "draft", "coordinator") if pins for word in (f"--{role}-cpus", pins[role])]


def describe_exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def stop_process(process: subprocess.Popen, timeout: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ServerProcess:
    """`specpipe serve ...` as a child process; `addr` once ready (and `http_url`, the HTTP API's
    base URL, with --http-port; else None; `summary`: the lines it printed before). A context manager."""

    def __init__(
        self, args: list[str], echo: bool = False, env: dict | None = None, log_level: str = "WARNING", stderr=None
    ):
        """`stderr`: where the server's logs go (a file object; default: this process's stderr)."""
        command = [sys.executable, "-m", "specpipe.launch.cli", "--log-level", log_level, "serve", "--port", "0", *args]
        env = {**os.environ, "SPECPIPE_LOG_LEVEL": log_level, **(env or {})}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, start_new_session=True
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(self.process.stdout, lines), daemon=True).start()
        self.summary: list[str] = []
        try:
            match = _wait_line(
                self.process, lines, READY_SERVER, SERVER_READY_TIMEOUT_S, "specpipe serve", echo, self.summary
            )
        except Exception:
            self.stop()
            raise
        self.addr = f"{match.group(1)}:{match.group(2)}"
        self.http_url = match.group(3)

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server's process group (coordinator and workers; SIGINT: what Ctrl-C in its
        terminal sends); stop() waits for it. Many servers stop in the time of one when all are
        signalled first."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """terminate(sig), then make sure."""
        if self.process.poll() is None:
            self.terminate(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
