"""The data plane: the draft's q tensors go straight to the target, never through the coordinator
(DESIGN §2: as few hops as the design allows). Two transports, chosen by `--transport`:

- `zmq`: the target binds a PULL socket, the draft PUSHes one DraftProbs message (protobuf header
  plus one raw [n, vocab] frame) per draft step, holding the q of every token of that step.
- `torch`: point-to-point `send`/`recv` over the torch.distributed group (NCCL on CUDA, gloo on
  CPU): a fixed int64 header [handle, branch_id, epoch, position, vocab], then the float32
  payload. The receiver posts into pre-allocated buffers from a thread and copies into a
  recycled pool, so the steady state allocates nothing; nothing is pickled (no send_object_list).

The target keeps what arrives in a `ProbsTable` keyed by (handle, branch_id, epoch, position)
until the verify that needs it (`ready` asks, `pop` takes); entries below the committed length and
those of released requests are dropped. Greedy requests never use the data plane.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict

import torch
import zmq

from specpipe import curve, wire
from specpipe.curve import CurveKeys
from specpipe.proto.specpipe.worker.v1 import worker_pb2

logger = logging.getLogger(__name__)

HEADER_FIELDS = 5  # handle, branch_id, epoch, position, vocab
# Drafted tokens that may wait in the pipe: far more than any lookahead, so a send never blocks
# on a live target.
SEND_HIGH_WATER_MARK = 100_000
# torch transport: sends in flight at once (pre-allocated slots); more than a few blocks' worth.
SEND_RING = 64

Key = tuple[int, int, int, int]  # (handle, branch_id, epoch, position)


class ZmqSender:
    def __init__(self, address: str, context: zmq.Context | None = None, curve_keys: CurveKeys | None = None):
        """`curve_keys`: connect as a CURVE client of the target (specpipe/curve.py)."""
        self.socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        if curve_keys is not None:
            curve.configure_client(self.socket, curve_keys)
        self.socket.connect(address)

    def send(self, keys: list[Key], probs: torch.Tensor) -> None:
        """The q of one draft step: probs [len(keys), vocab], row i for keys[i]."""
        assert probs.shape[0] == len(keys), f"{probs.shape[0]} rows of q for {len(keys)} keys"
        handles, branch_ids, epochs, positions = zip(*keys)
        message = worker_pb2.DraftProbs(handles=handles, branch_ids=branch_ids, epochs=epochs, positions=positions)
        frames: list[bytes] = []
        wire.put_tensor(message.probs, probs, frames)
        self.socket.send_multipart(wire.encode(message, frames), copy=False)


class ZmqReceiver:
    """Target side; `socket` joins the worker loop's poller, `drain()` returns what arrived."""

    def __init__(self, bind: str, context: zmq.Context | None = None, curve_keys: CurveKeys | None = None):
        """`curve_keys`: bind as a CURVE server (the context's authenticator must be running)."""
        self.socket, self.endpoint = curve.bind_server_socket(
            context or zmq.Context.instance(), zmq.PULL, bind, wire.MAX_MESSAGE_BYTES, curve_keys
        )

    def drain(self) -> list[tuple[Key, torch.Tensor]]:
        arrived = []
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return arrived
            try:
                message = worker_pb2.DraftProbs.FromString(parts[0])
                probs = wire.get_tensor(message.probs, parts[1:])
                keys = list(zip(message.handles, message.branch_ids, message.epochs, message.positions))
                if probs.dim() != 2 or probs.shape[0] != len(keys):
                    raise ValueError(f"q of shape {tuple(probs.shape)} for {len(keys)} keys")
            except Exception as err:  # a wrong peer or garbage: log, drop, carry on
                logger.warning("data plane dropped a malformed message: %s", err)
                continue
            arrived += zip(keys, probs)


class TorchSender:
    """Draft side: non-blocking sends (`isend`) from a ring of pre-allocated header and payload
    buffers, so a draft step never waits for the target to post its receive; a slot is reused
    only once its sends have completed."""

    def __init__(self, dst_rank: int, device: torch.device, group=None):
        self.dst, self.device, self.group = dst_rank, device, group
        self.headers = torch.zeros(SEND_RING, HEADER_FIELDS, dtype=torch.int64, device=device)
        self.payloads: torch.Tensor | None = None  # [SEND_RING, vocab], made at the first send
        self.works: list[list] = [[] for _ in range(SEND_RING)]
        self.slot = 0

    def send(self, keys: list[Key], probs: torch.Tensor) -> None:
        """The q of one draft step: probs [len(keys), vocab]; one header and payload per row."""
        for key, row in zip(keys, probs):
            self._send_row(key, row)

    def _send_row(self, key: Key, probs: torch.Tensor) -> None:
        import torch.distributed as dist

        if self.payloads is None:
            self.payloads = torch.zeros(SEND_RING, probs.numel(), dtype=torch.float32, device=self.device)
        slot, self.slot = self.slot, (self.slot + 1) % SEND_RING
        for work in self.works[slot]:
            work.wait()
        header, payload = self.headers[slot], self.payloads[slot]
        header.copy_(torch.tensor([*key, probs.numel()], dtype=torch.int64))
        payload.copy_(probs)
        self.works[slot] = [
            dist.isend(header, self.dst, group=self.group),
            dist.isend(payload, self.dst, group=self.group),
        ]


class TorchReceiver:
    """Target side: a thread blocks in recv; the worker loop calls `drain()` between steps."""

    def __init__(self, src_rank: int, vocab: int, device: torch.device, group=None):
        """`group`: one without a timeout that an idle server would hit (distributed.init_from_env)."""
        self.src, self.vocab, self.device, self.group = src_rank, vocab, device, group
        self.header = torch.zeros(HEADER_FIELDS, dtype=torch.int64, device=device)
        self.payload = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.pool: queue.SimpleQueue = queue.SimpleQueue()  # recycled [vocab] tensors
        self.arrived: queue.SimpleQueue = queue.SimpleQueue()
        self.socket = None  # nothing to poll: see drain()
        threading.Thread(target=self._receive, name="dataplane-recv", daemon=True).start()

    def _buffer(self) -> torch.Tensor:
        try:
            return self.pool.get_nowait()
        except queue.Empty:
            return torch.empty(self.vocab, dtype=torch.float32, device=self.device)

    def recycle(self, tensor: torch.Tensor) -> None:
        if tensor.numel() == self.vocab and tensor.device == self.device:
            self.pool.put(tensor)

    def _receive(self) -> None:
        import torch.distributed as dist

        while True:
            try:
                dist.recv(self.header, self.src, group=self.group)
                handle, branch_id, epoch, position, vocab = self.header.tolist()
                payload = self.payload[:vocab]
                dist.recv(payload, self.src, group=self.group)
            except Exception as err:  # the group is gone (peer exited): stop quietly
                logger.info("data plane receiver stopped: %s", err)
                return
            buffer = self._buffer()[:vocab]
            buffer.copy_(payload)
            self.arrived.put(((handle, branch_id, epoch, position), buffer))

    def drain(self) -> list[tuple[Key, torch.Tensor]]:
        arrived = []
        while True:
            try:
                arrived.append(self.arrived.get_nowait())
            except queue.Empty:
                return arrived


class ProbsTable:
    """What the target holds of the draft's q until a verify takes it."""

    def __init__(self, recycle=None):
        self.by_handle: dict[int, dict[tuple[int, int, int], torch.Tensor]] = defaultdict(dict)
        self.recycle = recycle

    def add(self, arrived: list[tuple[Key, torch.Tensor]]) -> None:
        for (handle, branch_id, epoch, position), probs in arrived:
            self.by_handle[handle][(branch_id, epoch, position)] = probs

    def ready(self, handle: int, branch_id: int, epoch: int, positions: range) -> bool:
        """Whether the q of every position has arrived."""
        entries = self.by_handle.get(handle, {})
        return all((branch_id, epoch, p) in entries for p in positions)

    def pop(self, handle: int, branch_id: int, epoch: int, positions: range) -> torch.Tensor:
        """[len(positions), vocab] q, taken out of the table (they must all be there: `ready`)."""
        entries = self.by_handle[handle]
        rows = [entries.pop((branch_id, epoch, p)) for p in positions]
        stacked = torch.stack(rows)
        for row in rows:
            self._free(row)
        return stacked

    def drop_below(self, handle: int, length: int) -> None:
        entries = self.by_handle.get(handle)
        for key in [k for k in entries or () if k[2] < length]:
            self._free(entries.pop(key))

    def release(self, handle: int) -> None:
        for tensor in self.by_handle.pop(handle, {}).values():
            self._free(tensor)

    def _free(self, tensor: torch.Tensor) -> None:
        if self.recycle is not None:
            self.recycle(tensor)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.by_handle.values())
