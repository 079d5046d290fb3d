"""The single-threaded event loop shared by both workers (DESIGN §2).

A worker binds a ZeroMQ ROUTER socket; the coordinator connects to it. Between iterations the loop
drains every waiting command (a `Commands` batch applies its commands in order), so drafting is
interruptible between forward steps and pings are answered within one step. The engine (draft or
target) is an executor with the methods of `Engine`: commands apply at once (`handle`), what
arrives without a command is taken in its own step (`poll`: the data plane), and `step` runs one
iteration — one batched forward over the ready work of every request — returning one item per
request it advanced. The loop sends each coordinator connection one message per iteration with
that connection's items (`pack`), so the coordinator's message rate does not grow with requests
or branches.

A command that fails is answered with an Error reply and the loop carries on; undecodable input
(a wrong peer, garbage, an oversized frame) is logged and dropped (STYLE §5).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Protocol

import zmq

from specpipe import curve, wire
from specpipe.curve import CurveKeys
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.trace import trace

logger = logging.getLogger(__name__)

# How long the loop sleeps on its socket when it has no work: bounds the latency of a shutdown.
IDLE_POLL_MS = 100
# How often the loop looks again while work waits for data that arrives without a socket to
# wake it (the torch.distributed data plane's receiver thread).
WAITING_POLL_MS = 1
PR_SET_PDEATHSIG = 1

# (request_id, the request's part of an iteration's message: a DraftToken or a Verdict, its frames)
Item = tuple[str, object, list[bytes]]


class Engine(Protocol):
    """What the loop needs of a worker's executor."""

    def handle(self, command: worker_pb2.Command, frames: list[bytes]) -> None:
        """Apply a command now (it may raise: the loop answers the error and carries on)."""

    def poll(self) -> None:
        """Take in what arrived without a command (the draft's q on the data plane)."""

    def ready(self) -> bool:
        """One `step` would do work now."""

    def waiting(self) -> bool:
        """Work is queued but waits for data that no polled socket will announce."""

    def step(self) -> tuple[list[Item], dict]:
        """One iteration: the items for the requests it advanced, and the iteration's figures
        (`pack` puts them in the message header)."""

    def pack(self, items: list[Item], figures: dict) -> tuple[worker_pb2.Reply, list[bytes]]:
        """One message holding `items` (of one connection) and the iteration's figures."""

    def fill_pong(self, pong: worker_pb2.Pong) -> None:
        """Live counts, KV store and last-batch figures, and its start-up setup, for a heartbeat."""

    def sockets(self) -> list:
        """Sockets besides the control socket whose input `poll` takes (the loop waits on them)."""


def exit_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphaned workers)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        logger.warning("prctl(PR_SET_PDEATHSIG) unavailable: worker will outlive its parent")


class WorkerLoop:
    def __init__(
        self,
        engine: Engine,
        role: str,
        bind: str,
        context: zmq.Context | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        curve_keys: CurveKeys | None = None,
    ):
        """`should_stop`: asked at each idle poll; True ends the loop (a launcher's own stop signal,
        e.g. the torchrun entry's store key). `curve_keys`: bind as a CURVE server (the context's
        authenticator must be running: specpipe/curve.py)."""
        self.engine, self.role, self.should_stop = engine, role, should_stop
        self.context = context or zmq.Context.instance()
        self.socket, self.endpoint = curve.bind_server_socket(
            self.context, zmq.ROUTER, bind, wire.MAX_MESSAGE_BYTES, curve_keys
        )
        self.owners: dict[str, bytes] = {}  # request_id -> the peer identity that started it
        self.started = time.monotonic()
        self.busy_seconds = 0.0
        self.running = True

    def stop(self, *_args) -> None:
        self.running = False

    def run(self) -> None:
        logger.info("%s worker listening on %s", self.role, self.endpoint)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        for socket in self.engine.sockets():
            poller.register(socket, zmq.POLLIN)
        engine = self.engine
        waiting = False
        while self.running:
            engine.poll()
            timeout = 0 if engine.ready() else WAITING_POLL_MS if engine.waiting() else IDLE_POLL_MS
            if timeout == IDLE_POLL_MS and self.should_stop():
                break
            if timeout and not waiting:
                if trace.on and poller.poll(0):  # a command is there already: no wait (the trace's gaps)
                    timeout = 0
                else:
                    waiting = True
                    trace("wait")  # nothing to compute: waiting for a command (once per wait)
            if self.socket in dict(poller.poll(timeout)):
                self._drain()
            engine.poll()
            if engine.ready():
                begin = time.perf_counter()
                waiting = False
                trace("stepb")
                items, figures = engine.step()
                trace("stepe", len(items), figures.get("batch_tokens", 0))
                self.busy_seconds += time.perf_counter() - begin
                self._send_items(items, figures)
        self.socket.close(0)

    def _drain(self) -> None:
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, parts = parts[0], parts[1:]
            try:
                command, frames = wire.decode(worker_pb2.Command, parts)
            except wire.WireError as err:
                logger.warning("%s worker dropped a malformed message from peer %r: %s", self.role, identity, err)
                continue
            batch = command.batch.commands if command.WhichOneof("kind") == "batch" else (command,)
            for one in batch:  # in order; one that fails is answered and the rest still apply
                if trace.on:
                    trace("cmd", one.WhichOneof("kind"))
                reply = self._handle(identity, one, frames)
                if reply is not None:
                    self._send(identity, reply, [])

    def _handle(self, identity: bytes, command, frames) -> worker_pb2.Reply | None:
        kind = command.WhichOneof("kind")
        if kind is None or kind == "batch":
            what = "an empty command" if kind is None else "a batch inside a batch"
            logger.warning("%s worker dropped %s from peer %r", self.role, what, identity)
            return None
        if kind == "ping":
            pong = worker_pb2.Pong(
                nonce=command.ping.nonce,
                role=self.role,
                busy_seconds=self.busy_seconds,
                uptime_seconds=time.monotonic() - self.started,
                pid=os.getpid(),
            )
            self.engine.fill_pong(pong)
            return worker_pb2.Reply(pong=pong)
        request_id = getattr(command, kind).request_id
        if kind == "prefill":
            self.owners[request_id] = identity
        try:
            self.engine.handle(command, frames)
        except Exception as err:  # reply with the error, then carry on (STYLE §5)
            logger.exception("[%s] %s worker failed on %s", request_id, self.role, kind)
            return worker_pb2.Reply(
                error=worker_pb2.Error(request_id=request_id, command=kind, message=f"{type(err).__name__}: {err}")
            )
        finally:
            if kind == "release":
                self.owners.pop(request_id, None)
        return None

    def _send_items(self, items: list[Item], figures: dict) -> None:
        """One message per connection, holding that connection's items of the iteration; an
        error item (a Reply) goes on its own."""
        by_owner: dict[bytes, list[Item]] = {}
        for item in items:
            owner = self.owners.get(item[0])
            if owner is None:
                continue  # released meanwhile: nobody to tell
            if isinstance(item[1], worker_pb2.Reply):
                self._send(owner, item[1], item[2])
            else:
                by_owner.setdefault(owner, []).append(item)
        for owner, owned in by_owner.items():
            reply, frames = self.engine.pack(owned, figures)
            self._send(owner, reply, frames)

    def _send(self, identity: bytes, reply, frames) -> None:
        self.socket.send_multipart([identity, *wire.encode(reply, frames)])


def run(loop: WorkerLoop, extra_ready: str = "") -> None:
    """Run a bound loop until SIGTERM/SIGINT, after printing `READY <endpoint><extra_ready>`."""
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    print(f"READY {loop.endpoint}{extra_ready}", flush=True)
    loop.run()
