"""The single-threaded event loop shared by both workers (DESIGN §2).

A worker binds a ZeroMQ ROUTER socket; the coordinator connects to it. Between units of work the
loop drains every waiting command, so drafting is interruptible between forward steps and pings
are answered within one step. The engine (draft or target) is an executor with three methods:

    handle(command, frames) -> list[(Reply, frames)]   # apply a command at once
    has_work() -> bool
    work() -> list[(request_id, Reply, frames)]          # one unit: a forward step or a verify

A command that fails is answered with an Error reply and the loop carries on; undecodable input
(a wrong peer, garbage, an oversized frame) is logged and dropped (STYLE §5).
"""

from __future__ import annotations

from collections.abc import Callable
import ctypes
import logging
import os
import signal
import time

import zmq

from specpipe import curve, wire
from specpipe.curve import CurveKeys
from specpipe.proto.specpipe.worker.v1 import worker_pb2

logger = logging.getLogger(__name__)

# How long the loop sleeps on its socket when it has no work: bounds the latency of a shutdown.
IDLE_POLL_MS = 100
# How often the loop looks again while work waits for data that arrives without a socket to
# wake it (the torch.distributed data plane's receiver thread).
WAITING_POLL_MS = 1
PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no orphaned workers)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        logger.warning("prctl(PR_SET_PDEATHSIG) unavailable: worker will outlive its parent")


class WorkerLoop:
    def __init__(self, engine, role: str, bind: str, context: zmq.Context | None = None,
                 should_stop: Callable[[], bool] = lambda: False, curve_keys: CurveKeys | None = None):
        """`should_stop`: asked at each idle poll; True ends the loop (a launcher's own stop signal,
        e.g. the torchrun entry's store key). `curve_keys`: bind as a CURVE server (the context's
        authenticator must be running: specpipe/curve.py)."""
        self.engine, self.role, self.should_stop = engine, role, should_stop
        self.context = context or zmq.Context.instance()
        self.socket, self.endpoint = curve.bind_server_socket(self.context, zmq.ROUTER, bind, wire.MAX_MESSAGE_BYTES,
                                                              curve_keys)
        self.owners: dict[str, bytes] = {}   # request_id -> the peer identity that started it
        self.started = time.monotonic()
        self.busy_seconds = 0.0
        self.running = True

    def stop(self, *_args) -> None:
        self.running = False

    def run(self) -> None:
        logger.info("%s worker listening on %s", self.role, self.endpoint)
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        for socket in getattr(self.engine, "poll_sockets", list)():
            poller.register(socket, zmq.POLLIN)
        waiting = getattr(self.engine, "waiting", lambda: False)
        while self.running:
            timeout = 0 if self.engine.has_work() else WAITING_POLL_MS if waiting() else IDLE_POLL_MS
            if timeout == IDLE_POLL_MS and self.should_stop():
                break
            if self.socket in dict(poller.poll(timeout)):
                self._drain()
            if self.engine.has_work():
                begin = time.perf_counter()
                replies = self.engine.work()
                self.busy_seconds += time.perf_counter() - begin
                for request_id, reply, frames in replies:
                    self._send(self.owners.get(request_id), reply, frames)
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
            for reply, reply_frames in self._handle(identity, command, frames):
                self._send(identity, reply, reply_frames)

    def _handle(self, identity: bytes, command, frames):
        kind = command.WhichOneof("kind")
        if kind == "ping":
            live_requests, live_branches = self.engine.live_counts()
            pong = worker_pb2.Pong(nonce=command.ping.nonce, role=self.role, live_requests=live_requests,
                                   live_branches=live_branches, busy_seconds=self.busy_seconds,
                                   uptime_seconds=time.monotonic() - self.started, pid=os.getpid())
            return [(worker_pb2.Reply(pong=pong), [])]
        request_id = getattr(command, kind).request_id
        if kind == "prefill":
            self.owners[request_id] = identity
        try:
            return self.engine.handle(command, frames)
        except Exception as err:  # reply with the error, then carry on (STYLE §5)
            logger.exception("[%s] %s worker failed on %s", request_id, self.role, kind)
            error = worker_pb2.Error(request_id=request_id, message=f"{type(err).__name__}: {err}", command=kind)
            return [(worker_pb2.Reply(error=error), [])]
        finally:
            if kind == "release":
                self.owners.pop(request_id, None)

    def _send(self, identity: bytes | None, reply, frames) -> None:
        if identity is None:
            return  # the request was released meanwhile: nobody to tell
        self.socket.send_multipart([identity, *wire.encode(reply, frames)])


def run(loop: WorkerLoop, extra_ready: str = "") -> None:
    """Run a bound loop until SIGTERM/SIGINT, after printing `READY <endpoint><extra_ready>`."""
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    print(f"READY {loop.endpoint}{extra_ready}", flush=True)
    loop.run()
