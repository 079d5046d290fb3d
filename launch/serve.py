"""`specpipe serve`'s process: run the coordinator until SIGINT/SIGTERM with the workers it spawns
(launch/local.py) supervised: a crashed worker is restarted on the same ports, with back-off.

The gRPC port is bound before any worker is spawned (health NOT_SERVING while they load); what it
serves is printed, then `specpipe serving on HOST:PORT`, once the target answers and the workers it
spawned are up; a remote draft (--draft-addr) is not waited for.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time

from specpipe.config import CoordinatorConfig, pin_cpus
from specpipe.launch.errors import StartupError, UsageError
from specpipe.launch.local import WorkerProcess, WorkerStartTimeout, describe_exit, start_command, stop_process

logger = logging.getLogger(__name__)

# Restart back-off of a crashed worker: first delay, and the most it doubles to.
RESTART_BACKOFF_S = (0.5, 30.0)


class Supervisor:
    """Restarts a crashed worker process on the same ports, with exponential back-off, and logs
    why it died. The coordinator's sockets reconnect by themselves; its heartbeats re-admit the
    worker. (Under --transport torch a lone rank cannot rejoin its group: no restart there.)"""

    def __init__(self, workers: list[WorkerProcess], on_death=None):
        """`on_death(role, why)`: told the moment a worker process is seen dead (before the
        heartbeats would notice)."""
        self.workers = {worker.role: worker for worker in workers}
        self.on_death = on_death
        self.backoff = {worker.role: RESTART_BACKOFF_S[0] for worker in workers}

    async def watch(self) -> None:
        while True:
            for role, worker in list(self.workers.items()):
                code = worker.process.poll()
                if code is not None:
                    await self._restart(role, worker, code)
            await asyncio.sleep(0.2)

    async def _restart(self, role: str, worker: WorkerProcess, code: int) -> None:
        logger.error("%s worker (pid %d) died: %s", role, worker.process.pid, describe_exit(code))
        if self.on_death is not None:
            self.on_death(role, f"process {worker.process.pid} died ({describe_exit(code)})")
        if "torch" in worker.argv:
            logger.error("%s worker runs under --transport torch: not restarted", role)
            del self.workers[role]
            return
        delay = self.backoff[role]
        logger.warning("restarting the %s worker in %.1fs", role, delay)
        await asyncio.sleep(delay)
        started = time.monotonic()
        try:
            fresh = await asyncio.to_thread(
                start_command(role, worker.restart_argv(), worker.env, worker.ready_timeout_s)
            )
        except Exception as err:
            logger.error("restart of the %s worker failed: %s", role, err)
            self.backoff[role] = min(delay * 2, RESTART_BACKOFF_S[1])
            return  # the old process still reads as dead: tried again, later
        self.workers[role] = fresh
        logger.warning("%s worker restarted (pid %d) at %s", role, fresh.process.pid, fresh.endpoint)
        # A worker that crashes right after its start backs off more; one that ran a while resets.
        uptime = time.monotonic() - started
        self.backoff[role] = RESTART_BACKOFF_S[0] if uptime > 30 else min(delay * 2, RESTART_BACKOFF_S[1])

    def stop(self) -> None:
        for worker in self.workers.values():
            stop_process(worker.process)


def ready_line(host: str, port: int, http_url: str | None) -> str:
    """`specpipe serving on HOST:PORT[, OpenAI-compatible HTTP on URL]` (READY_SERVER reads it)."""
    http = f", OpenAI-compatible HTTP on {http_url}" if http_url else ""
    return f"specpipe serving on {host}:{port}{http}"


async def serve(config: CoordinatorConfig, spawn=None, coordinator_cpus: str = "", describe=None) -> None:
    """Run the coordinator until SIGINT/SIGTERM, restarting crashed workers; then stop all.
    The gRPC port is bound first (health NOT_SERVING); then `spawn(timeouts=..., attach=...)`
    (spawn_workers with its models and options bound; None: both workers are remote) starts the
    local workers, this process is pinned to `coordinator_cpus`, and once the target answers
    `describe(coordinator, workers) -> lines` (workers: role -> WorkerProcess, the spawned ones)
    is printed, then the `specpipe serving on HOST:PORT` line. A start-up failure raises
    UsageError or StartupError, which `specpipe serve` reports as one line (launch/report.py)."""
    from specpipe.coordinator.server import Coordinator
    from specpipe.coordinator.workers import WorkerDown

    coordinator = Coordinator(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor, watcher = Supervisor([], on_death=coordinator.worker_died), None
    try:
        try:
            port = await coordinator.start()
        except OSError as err:  # a port taken since the checks ran (launch/preflight.py)
            if err.errno != errno.EADDRINUSE:
                raise
            raise UsageError(f"{err.strerror}: pick a free port") from None
        starting = asyncio.create_task(_start_up(coordinator, spawn, coordinator_cpus))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # stopped while the models loaded
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        stopping.cancel()
        try:
            workers = starting.result()
        except WorkerStartTimeout as err:
            flag = f"--{err.role}-startup-timeout" if err.role else "--target-startup-timeout, --draft-startup-timeout"
            raise StartupError(f"{err} ({flag})") from None
        except WorkerDown as err:  # the target did not answer within --target-startup-timeout
            raise StartupError(str(err)) from None
        supervisor = Supervisor(list(workers.values()), on_death=coordinator.worker_died)
        watcher = asyncio.create_task(supervisor.watch())
        for line in describe(coordinator, workers) if describe else ():
            print(line, flush=True)
        print(ready_line(config.host, port, coordinator.http_url), flush=True)
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        await coordinator.stop()
        supervisor.stop()


async def _start_up(coordinator, spawn, coordinator_cpus: str) -> dict[str, WorkerProcess]:
    """Spawn the local workers (attached to the coordinator as each comes up), then pin this
    process (after the spawns: they must not inherit it), then wait for the target. Failed or
    cancelled past the spawns, it stops the workers it started."""
    workers: dict[str, WorkerProcess] = {}
    if spawn is not None:
        left = coordinator.target_time_left()
        draft_limit = coordinator.config.draft_startup_timeout_s
        workers = await spawn(
            timeouts={
                "target": left if left is None else max(left, 0.01),
                "draft": draft_limit if draft_limit > 0 else None,
            },
            attach=lambda role, endpoint: getattr(coordinator, role).connect(endpoint),
        )
    try:
        try:
            pin_cpus(coordinator_cpus)
        except ValueError as err:
            raise UsageError(f"--coordinator-cpus: {err}") from None
        await coordinator.wait_ready()
    except BaseException:
        for worker in workers.values():
            stop_process(worker.process)
        raise
    return workers
