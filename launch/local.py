"""Local launch: spawn the two worker processes and run the coordinator (`specpipe serve`), and
start a whole server as a child process (for `specpipe demo`, the benchmark and the tests).

Each worker is its own OS process (`python -m specpipe.draft_worker ...`), visible in `ps`.
A worker prints `READY <endpoint>` once bound; the launcher waits for that line with a timeout
and, if the worker dies first, reports its exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from specpipe.config import CoordinatorConfig

logger = logging.getLogger(__name__)

# A worker loads its model before it binds; a big model on a slow disk takes a while.
WORKER_READY_TIMEOUT_S = 120.0
SERVER_READY_TIMEOUT_S = 180.0
READY_SERVER = re.compile(r"specpipe serving on (\S+):(\d+)")


def _lines(stream, sink: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        sink.put(line)
    sink.put(None)


def _wait_line(process: subprocess.Popen, lines: queue.Queue, pattern: re.Pattern, timeout: float,
               what: str, echo: bool = False) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            raise TimeoutError(f"{what} was not ready within {timeout:.0f}s") from None
        if line is None:
            raise RuntimeError(f"{what} exited with code {process.wait()} before it was ready")
        if echo:
            sys.stdout.write(line)
        match = pattern.search(line)
        if match:
            return match


@dataclass
class WorkerProcess:
    role: str
    process: subprocess.Popen
    endpoint: str


def spawn_worker(role: str, model: str, host: str = "127.0.0.1", port: int = 0, device: str = "cpu",
                 dtype: str = "float32", threads: int = 1) -> WorkerProcess:
    command = [sys.executable, "-m", f"specpipe.{role}_worker", "--model", str(model), "--host", host,
               "--port", str(port), "--device", device, "--dtype", dtype, "--threads", str(threads),
               "--exit-with-parent"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    match = _wait_line(process, lines, re.compile(r"READY (\S+)"), WORKER_READY_TIMEOUT_S,
                       f"the {role} worker ({model})")
    logger.info("%s worker pid %d at %s", role, process.pid, match.group(1))
    return WorkerProcess(role, process, match.group(1))


def stop_process(process: subprocess.Popen, timeout: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def serve(config: CoordinatorConfig, workers: list[WorkerProcess]) -> None:
    """Run the coordinator until SIGINT/SIGTERM, then stop it and the workers."""
    from specpipe.coordinator.server import Coordinator

    coordinator = Coordinator(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await coordinator.start()
        print(f"specpipe serving on {config.host}:{port}", flush=True)
        await stop.wait()
    finally:
        await coordinator.stop()
        for worker in workers:
            stop_process(worker.process)


class ServerProcess:
    """`specpipe serve ...` as a child process; `addr` once ready. A context manager."""

    def __init__(self, args: list[str], echo: bool = False, env: dict | None = None, log_level: str = "WARNING"):
        command = [sys.executable, "-m", "specpipe.launch.cli", "--log-level", log_level, "serve", "--port", "0",
                   *args]
        env = {**os.environ, "SPECPIPE_LOG_LEVEL": log_level, **(env or {})}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env,
                                        start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(self.process.stdout, lines), daemon=True).start()
        try:
            match = _wait_line(self.process, lines, READY_SERVER, SERVER_READY_TIMEOUT_S, "specpipe serve", echo)
        except Exception:
            self.stop()
            raise
        self.addr = f"{match.group(1)}:{match.group(2)}"

    def stop(self) -> None:
        """SIGTERM the server's process group (coordinator and workers), then make sure."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


