"""The link of the benchmark's latency axis: a draft worker reached over a path with a given
one-way latency (the package docstring explains the axis).

NetnsLink, the real one: a network namespace of its own (named after this process), a veth pair
with addresses in NETNS_SUBNET, tc netem delay on both ends, and the draft worker started inside
with `ip netns exec`. Its traffic crosses a real interface, so it runs under CURVE like any
deployment across hosts (issue 23: every local user could reach the veth address): a throwaway key
folder in a private runtime folder, given to the draft and to serve. Everything it creates it
deletes in `close()`; it touches no other namespace. ProxyLink, the fallback where netem is
missing: the draft worker on loopback behind a TCP relay in this process, labelled simulated. Both
expose `endpoint` and `serve_flags` (`serve_args(link)`: `specpipe serve --draft-addr ENDPOINT *serve_flags`),
`set_delay(ms)` (between requests) and `close()`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading

logger = logging.getLogger(__name__)

NETNS_SUBNET = "10.213"  # private range for the namespace's veth pair: 10.213.<n>.1 and .2
NETNS_DRAFT_PORT = 50061
# The worker prints model-loading progress bars; the benchmark has its own bar.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "SPECPIPE_LOG_LEVEL": "WARNING"}


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True, timeout=30)


def netns_problem() -> str | None:
    """Why a network namespace with netem delay cannot be used here; None when it can."""
    if os.geteuid() != 0:
        return "not running as root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "ip/tc not installed (apt-get install -y iproute2)"
    probe = f"spbench-probe-{os.getpid()}"
    added = _run("ip", "netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    try:
        _run("ip", "-n", probe, "link", "set", "lo", "up", check=False)
        netem = _run(
            "ip",
            "netns",
            "exec",
            probe,
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "netem",
            "delay",
            "1ms",
            check=False,
        )
        return None if netem.returncode == 0 else f"netem is not available in this kernel ({netem.stderr.strip()})"
    finally:
        _run("ip", "netns", "del", probe, check=False)


def _start_draft_worker(
    prefix: tuple[str, ...], model: str, host: str, port: int, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, str]:
    """`python -m specpipe.draft_worker` (after `prefix`, e.g. `ip netns exec NS`; `extra` flags):
    (process, endpoint)."""
    from specpipe.launch.local import start_worker

    worker = start_worker("draft", model, host=host, port=port, env=QUIET_ENV, prefix=prefix, extra=list(extra))()
    return worker.process, worker.endpoint


class NetnsLink:
    """The draft worker in a network namespace of its own, reached over a veth pair with netem
    delay on both ends, so each direction pays the one-way latency in the kernel."""

    simulated = False
    kind = "network namespace, veth pair, tc netem on both ends, CURVE on the sockets"

    def __init__(self, draft_model: str, device: str = "cpu", index: int = 0):
        """`index`: this process's link number (each gets its own namespace, devices and subnet)."""
        from specpipe import curve
        from specpipe.launch.local import stop_process
        from specpipe.launch.runtime_dir import RuntimeDir

        tag = (os.getpid() + index) % 100_000
        self.namespace, self.host_dev, self.ns_dev = f"spbench-{tag}", f"spbh{tag}", f"spbn{tag}"
        subnet = f"{NETNS_SUBNET}.{tag % 250 + 1}"
        self.in_ns = ("ip", "netns", "exec", self.namespace)
        self.delay_ms, self.worker, self._stop = 0.0, None, stop_process
        self.created: list[tuple[str, ...]] = []  # the delete command of each thing made, so close() removes only ours
        self.keys = RuntimeDir()
        curve.generate_keys(self.keys.path / "curve")
        self.serve_flags = ["--curve-keys", str(self.keys.path / "curve")]
        try:
            _run("ip", "netns", "add", self.namespace)
            self.created.append(("ip", "netns", "del", self.namespace))
            _run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
            self.created.append(("ip", "link", "del", self.host_dev))
            _run("ip", "link", "set", self.ns_dev, "netns", self.namespace)
            _run("ip", "addr", "add", f"{subnet}.1/30", "dev", self.host_dev)
            _run("ip", "link", "set", self.host_dev, "up")
            _run(*self.in_ns, "ip", "addr", "add", f"{subnet}.2/30", "dev", self.ns_dev)
            _run(*self.in_ns, "ip", "link", "set", self.ns_dev, "up")
            _run(*self.in_ns, "ip", "link", "set", "lo", "up")
            self.worker, self.endpoint = _start_draft_worker(
                self.in_ns, draft_model, f"{subnet}.2", NETNS_DRAFT_PORT, (*self.serve_flags, "--device", device)
            )
        except BaseException:
            self.close()
            raise

    def set_delay(self, ms: float) -> None:
        if ms == self.delay_ms:
            return
        for prefix, dev in (((), self.host_dev), (self.in_ns, self.ns_dev)):
            if ms > 0:
                _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{ms:g}ms")
            else:
                _run(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        self.delay_ms = ms

    def close(self) -> None:
        """Stop the worker, then delete what __init__ made (the namespace takes its veth end, and
        so the pair, with it; the explicit link delete is for a half-built set-up)."""
        if self.worker is not None:
            self._stop(self.worker)
        for command in self.created:
            _run(*command, check=False)
        self.created = []
        self.keys.close()


class ProxyLink:
    """Fallback: the draft worker on loopback behind a TCP relay in this process that holds every
    chunk for the delay in each direction. Simulated: no kernel queueing or packetisation, and
    the event loop's timer granularity (about 1 ms) adds to small delays."""

    simulated = True
    kind = "userspace TCP delay relay on loopback"
    serve_flags: list[str] = []  # loopback only: nothing crosses hosts

    def __init__(self, draft_model: str, device: str = "cpu", index: int = 0):
        self.worker, endpoint = _start_draft_worker((), draft_model, "127.0.0.1", 0, ("--device", device))
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.upstream, self.delay_ms, self.server = (host, int(port)), 0.0, None
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        try:
            listening = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._relay, "127.0.0.1", 0), self.loop)
            self.server = listening.result(10)
        except BaseException:
            self.close()
            raise
        self.endpoint = f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def set_delay(self, ms: float) -> None:
        self.delay_ms = ms

    async def _relay(self, reader, writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader, writer) -> None:
        """Copy reader to writer, each chunk sent `delay` after it arrived, in order."""
        chunks: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await chunks.get()) is not None:
                await asyncio.sleep(max(0.0, item[0] - self.loop.time()))
                writer.write(item[1])
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(1 << 16):
                chunks.put_nowait((self.loop.time() + self.delay_ms / 1e3, data))
        finally:
            chunks.put_nowait(None)
            await sender
            writer.close()

    def close(self) -> None:
        from specpipe.launch.local import stop_process

        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        stop_process(self.worker)


def serve_args(link) -> list[str]:
    """`specpipe serve`'s flags for a server whose draft is `link`'s worker: its endpoint, and what
    its sockets need (the namespace's CURVE keys)."""
    return ["--draft-addr", link.endpoint, *link.serve_flags]


def choose_link(choice: str, latencies_ms: tuple[float, ...]) -> tuple[type, str | None]:
    """(link class, why netns is not usable or None). auto: a namespace where netem works, else the
    relay; netns without netem is allowed only when every latency is 0 (the namespace plumbing alone)."""
    if not latencies_ms:
        return ProxyLink, "no latency axis"
    problem = netns_problem() if choice in ("auto", "netns") else "--link proxy"
    if problem is None or (choice == "netns" and problem.startswith("netem") and not any(latencies_ms)):
        return NetnsLink, problem
    if choice == "netns":
        raise SystemExit(f"--link netns: {problem}")
    if choice == "auto":
        logger.warning(
            "latency axis: network namespaces with netem are not usable (%s); using the simulated relay", problem
        )
    return ProxyLink, problem
