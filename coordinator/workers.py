"""The coordinator's connection to one worker: send commands, route replies, watch heartbeats.

One DEALER socket per worker (the worker binds a ROUTER), a plain (not zmq.asyncio) socket that
the event loop watches with `add_reader`: on this 2-core VM, a message through zmq.asyncio's
futures cost 445-490 us of CPU against 266-289 us read this way (a message every 3 ms, both
sides' wake-ups included), and the coordinator shares its core with the draft. The commands of one
turn of the event loop go out as one message (a `Commands` batch when there are several). The
reader decodes every message and fans it out: a worker sends one message per iteration (the draft a DraftStep
with the tokens of every branch it advanced, the target a Verdicts with every verdict of its
batched forward), and each request's inbox gets one Event with its part. Pongs update the
worker's health and counters; the iteration figures (rows and tokens per forward) go to
`on_batch` (the metrics).
A ping goes out every `heartbeat_interval_s`; a worker silent for `heartbeat_timeout_s` is
declared down and every request waiting on it is told at once (its scheduler then fails the
request instead of hanging).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import zmq

from specpipe import curve, wire
from specpipe.curve import CurveKeys
from specpipe.proto.specpipe.worker.v1 import worker_pb2

logger = logging.getLogger(__name__)

# A heartbeat tick that comes later than this past its interval means the coordinator's own loop
# was busy: only this much of the gap counts as time the worker was heard to be silent.
MAX_COUNTED_LAG_S = 0.1
# Commands that cannot go yet (the worker is not connected yet, or its queue is full) are tried
# again this often, in order.
SEND_RETRY_S = 0.005


class WorkerDown(Exception):
    """The worker stopped answering heartbeats (or was never reached)."""


class WorkerFailed(Exception):
    """The worker answered a command with an Error."""


@dataclass
class Event:
    """One request's part of a worker message, as its schedule sees it. kind: draft_tokens
    (payload: list of DraftToken), verdict (a Verdict), error (an Error), down (the worker went
    down; payload None)."""

    role: str
    kind: str
    payload: object = None
    frames: list[bytes] = field(default_factory=list)
    step_seconds: float = 0.0  # draft_tokens: the forward step's time


class WorkerClient:
    def __init__(
        self,
        role: str,
        address: str,
        context: zmq.Context,
        heartbeat_interval_s: float,
        heartbeat_timeout_s: float,
        curve_keys: CurveKeys | None = None,
    ):
        """`curve_keys`: connect as a CURVE client of the worker (specpipe/curve.py). `address` ""
        leaves the socket unconnected until `connect`. `context`: any zmq context (a plain socket
        is made from it either way)."""
        self.role, self.address = role, address
        self.socket = zmq.Socket(context, zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        if curve_keys is not None:
            curve.configure_client(self.socket, curve_keys)
        self.curve_folder = curve_keys.folder if curve_keys is not None else ""
        if address:
            self.socket.connect(address)
        self.interval, self.timeout = heartbeat_interval_s, heartbeat_timeout_s
        self.inboxes: dict[str, asyncio.Queue] = {}
        self.last_pong: worker_pb2.Pong | None = None
        self.last_seen = 0.0
        self.healthy = False
        self._nonces = itertools.count(1)
        self._pong_waiters: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self.on_batch = None  # on_batch(role, rows, tokens, seconds): told of every batched forward
        self.forwards = self.forward_rows = self.forward_tokens = 0  # batched forwards seen, and their sizes
        self.outstanding: dict[str, int] = {}  # request_id -> its verifies not answered yet
        self.decoding: set[str] = set()  # requests the target decodes by itself to their end
        self.filling: dict[str, int] = {}  # request_id -> the length it decodes to until a block comes
        self._pending = worker_pb2.Command()  # commands queued this loop turn (in its batch)
        self._flush_scheduled = False
        self._outbox: collections.deque[bytes] = collections.deque()  # messages not sent yet, in order
        self._retry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def connect(self, address: str) -> None:
        """Connect a client made without an address (a worker that `specpipe serve` spawns after its
        gRPC server is up): commands and pings sent meanwhile wait in the socket until then."""
        assert not self.address, f"the {self.role} worker client is connected to {self.address} already"
        self.address = address
        self.socket.connect(address)
        self._send_outbox()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.socket.FD, self._read)
        self._loop.call_soon(self._read)  # (replies that came before the reader watched)
        self._tasks = [asyncio.create_task(self._heartbeat())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loop is not None:
            self._loop.remove_reader(self.socket.FD)
        self.flush()  # (what cannot go now is dropped with the socket)
        if self._retry is not None:
            self._retry.cancel()
        self.socket.close(0)

    # -- requests -----------------------------------------------------------------------------
    def attach(self, request_id: str, inbox: asyncio.Queue) -> None:
        self.inboxes[request_id] = inbox

    def detach(self, request_id: str) -> None:
        self.inboxes.pop(request_id, None)

    async def command(self, **kind) -> None:
        """Send Command(<kind>=<message>), e.g. command(release=Release(request_id=...)). The
        commands issued in one turn of the event loop (every request's, for every event that
        turn handled) go to the worker as ONE message, in order, at the turn's end (`flush`)."""
        self._count_work(kind)
        self._pending.batch.commands.add(**kind)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send the queued commands: one alone as itself, several as one `Commands` batch."""
        self._flush_scheduled = False
        commands = self._pending.batch.commands
        if not commands:
            return
        self._outbox.append((commands[0] if len(commands) == 1 else self._pending).SerializeToString())
        self._pending = worker_pb2.Command()
        self._send_outbox()

    def _send_outbox(self) -> None:
        """Send what waits, in order. What cannot go yet (not connected, the worker's queue full)
        is tried again in SEND_RETRY_S; a closed socket (shutdown) drops it, with a warning."""
        self._retry = None
        if self.socket.closed:  # (shut down: nobody to send to)
            self._outbox.clear()
            return
        while self._outbox:
            try:
                self.socket.send(self._outbox[0], zmq.NOBLOCK)
            except zmq.Again:
                if self._loop is not None:
                    self._retry = self._loop.call_later(SEND_RETRY_S, self._send_outbox)
                break
            except zmq.ZMQError as err:
                logger.warning("could not send %d message(s) to the %s worker: %s", len(self._outbox), self.role, err)
                self._outbox.clear()
                return
            self._outbox.popleft()
        # The socket's FD signals edges, and a send can take the edge of a reply that came
        # meanwhile: look again, or that reply would wait for the next one.
        if self._loop is not None and self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self._read)

    def _count_work(self, kind: dict) -> None:
        """What the target has to do: verifies sent and not answered, requests decoding alone (to
        their end, or filling a wait: until a block comes or their decode's length is reached)."""
        if "verify" in kind:
            request_id = kind["verify"].request_id
            self.outstanding[request_id] = self.outstanding.get(request_id, 0) + 1
            self.filling.pop(request_id, None)  # (the target verifies it instead)
        elif "decode" in kind:
            decode = kind["decode"]
            if decode.until_block:
                self.filling[decode.request_id] = decode.max_length
            else:
                self.decoding.add(decode.request_id)
        elif "release" in kind:
            self.outstanding.pop(kind["release"].request_id, None)
            self.decoding.discard(kind["release"].request_id)
            self.filling.pop(kind["release"].request_id, None)

    def busy(self, besides: str | None = None) -> bool:
        """The worker has work of ours to do (target: a verify not yet answered, or a request
        decoding by itself): its next forward starts as soon as this one ends. `besides`: leave
        that request's verifies out (its schedule knows which of them cost a forward: after a
        rejection, those queued behind it are answered stale with none)."""
        return bool(self.decoding or self.filling) or len(self.outstanding) > (besides in self.outstanding)

    # -- replies and heartbeats ---------------------------------------------------------------
    def _read(self) -> None:
        """Take every reply waiting (the loop calls this when the socket's FD signals)."""
        while not self.socket.closed and self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._dispatch(parts)
            except Exception:  # a bug: say so, and keep reading (the next replies must not wait)
                logger.exception("failed on a reply from the %s worker", self.role)

    def _dispatch(self, parts: list[bytes]) -> None:
        try:
            reply, frames = wire.decode(worker_pb2.Reply, parts)
        except wire.WireError as err:
            logger.warning("dropped a malformed reply from the %s worker: %s", self.role, err)
            return
        kind = reply.WhichOneof("kind")
        if kind == "pong":
            self._on_pong(reply.pong)
        elif kind == "draft_step":
            self._on_draft_step(reply.draft_step)
        elif kind == "verdicts":
            self._on_verdicts(reply.verdicts, frames)
        elif kind == "error":
            self._deliver(reply.error.request_id, Event(self.role, "error", reply.error))

    def _deliver(self, request_id: str, event: Event) -> None:
        inbox = self.inboxes.get(request_id)
        if inbox is not None:  # else: the request finished meanwhile; a late reply is dropped
            inbox.put_nowait(event)

    def _count_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.forwards += 1
        self.forward_rows += rows
        self.forward_tokens += tokens
        if self.on_batch is not None:
            self.on_batch(self.role, rows, tokens, seconds)

    def _on_draft_step(self, step: worker_pb2.DraftStep) -> None:
        by_request: dict[str, list] = {}
        for token in step.tokens:
            by_request.setdefault(token.request_id, []).append(token)
        for request_id, tokens in by_request.items():
            self._deliver(request_id, Event(self.role, "draft_tokens", tokens, step_seconds=step.step_seconds))
        if step.batch_branches:  # (none: held tokens of stopped jobs, no forward)
            self._count_batch(step.batch_branches, step.batch_tokens, step.step_seconds)

    def _on_verdicts(self, batch: worker_pb2.Verdicts, frames: list[bytes]) -> None:
        for verdict in batch.verdicts:
            if verdict.decoded:  # (no verify's answer: a token decoded by itself)
                if verdict.committed_length + 1 >= self.filling.get(verdict.request_id, math.inf):
                    del self.filling[verdict.request_id]  # (its wait's fill is done)
            else:
                left = self.outstanding.get(verdict.request_id, 0) - 1
                if left > 0:
                    self.outstanding[verdict.request_id] = left
                else:
                    self.outstanding.pop(verdict.request_id, None)
            self._deliver(verdict.request_id, Event(self.role, "verdict", verdict, frames))
        if batch.batch_requests:
            self._count_batch(batch.batch_requests, batch.batch_tokens, batch.forward_seconds)

    def _on_pong(self, pong: worker_pb2.Pong) -> None:
        self.last_pong, self.last_seen = pong, time.monotonic()
        if not self.healthy:
            logger.info("%s worker at %s is up", self.role, self.address)
        self.healthy = True
        waiter = self._pong_waiters.pop(pong.nonce, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(pong)

    async def ping(self, timeout: float) -> worker_pb2.Pong | None:
        """A fresh Pong, or None if none came within `timeout` seconds."""
        nonce = next(self._nonces)
        waiter = asyncio.get_running_loop().create_future()
        self._pong_waiters[nonce] = waiter
        await self.command(ping=worker_pb2.Ping(nonce=nonce))
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            self._pong_waiters.pop(nonce, None)

    async def _heartbeat(self) -> None:
        """Ping every `interval`; declare the worker down once it has been silent for `timeout`
        seconds *of listening*. Time this coordinator's own loop was stalled (a long tokenisation,
        a GC pause) does not count against the worker: its pongs wait in the socket meanwhile."""
        silent = 0.0
        last_tick = time.monotonic()
        while True:
            await self.command(ping=worker_pb2.Ping(nonce=next(self._nonces)))
            await asyncio.sleep(self.interval)
            await asyncio.sleep(0)  # let the reader take pongs queued during a stall first
            now = time.monotonic()
            listened = min(now - last_tick, self.interval + MAX_COUNTED_LAG_S)
            last_tick = now
            silent = 0.0 if self.last_seen >= now - listened else silent + listened
            if self.healthy and silent > self.timeout:
                self.mark_down(f"missed heartbeats for {self.timeout:.1f}s")

    def live_counts(self) -> tuple[int, int]:
        """(requests, branches) the worker holds, from its last Pong; (0, 0) while it is down: a
        dead worker holds nothing, and a hung one's old count would read as live work."""
        if not self.healthy or self.last_pong is None:
            return 0, 0
        return self.last_pong.live_requests, self.last_pong.live_branches

    def mark_down(self, why: str) -> None:
        """Declare the worker down and tell every request waiting on it at once. A pong from a
        restarted worker marks it up again."""
        if not self.healthy:
            return
        self.healthy = False
        self.last_seen = 0.0
        self.outstanding.clear()
        self.decoding.clear()
        self.filling.clear()
        logger.error("%s worker at %s %s: marked down", self.role, self.address, why)
        for inbox in list(self.inboxes.values()):
            inbox.put_nowait(Event(self.role, "down"))

    async def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy:
            if time.monotonic() > deadline:
                hint = (
                    f" (CURVE: does it run with --curve-keys, with the key in {self.curve_folder}/client.key "
                    f"among its clients/ and the same server key?)"
                    if self.curve_folder
                    else ""
                )
                raise WorkerDown(f"{self.role} worker at {self.address} did not answer within {timeout:.0f}s{hint}")
            await asyncio.sleep(0.05)
