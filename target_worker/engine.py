"""The target worker's executor: prefill, verify, decode and release, batched over every request.

Each iteration (`step`) takes the next piece of work of every request (target_worker/requests.py: a
verify row of pending committed tokens plus draft tokens, a prefill chunk or a decode row; the
stale blocks at the head of a request's queue are answered without compute, before the forward
and after it, with the verdicts that made them stale), within the
budgets (`BatchLimits`: tokens fed and rows per forward), and runs them as ONE packed forward over
the KV store (specpipe/kv_store.py: a slot per request, no copy of any cache). Each verify then
gets its own accept/reject decision (verdict.py, the pure math in `verify.py`), its randomness keyed
by (seed, position), so a request's output does not depend on its batch neighbours; the request's
cache is rolled back to the accepted prefix by forgetting positions. Requests are taken
in turn from a rotating start, so when the budget cuts a batch short no request waits more than a
few iterations (fairness).

For sampling, the draft's q of a block arrive over the data plane (specpipe.dataplane), not with
the Verify command: a block runs once all of its q are in the table (one that waits past
DATA_TIMEOUT_S fails with an error reply).

With an acceptance-length predictor (specpipe/predictor.py) loaded, a verify asked for a
prediction carries the predictor's expected accepted length for the next block, read from the
hidden state of the row that predicted the last committed token.

The verdicts themselves, from each work's rows of the forward (accept/reject by the rule the
request's sampling picks, randomness keyed by sequence position, the rollback): verdict.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from specpipe.dataplane import ProbsTable
from specpipe.kv_store import KVStore, Row, forward_packed
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import SamplingParams
from specpipe.target_worker.requests import TargetRequest, Work, head_is_stale, holding, next_work
from specpipe.target_worker.verdict import DATA_TIMEOUT_S, decode_token, verify_block

logger = logging.getLogger(__name__)

# The longest a prompt waits for its request's first block (a wrong or hostile hold_seconds).
MAX_HOLD_S = 0.5


@dataclass(frozen=True)
class BatchLimits:
    """Per forward: tokens fed (all rows together) and rows (requests); prefill chunk size."""

    max_batch_tokens: int = 512
    max_batch_requests: int = 64
    prefill_chunk: int = 128

    def __post_init__(self):
        assert self.max_batch_requests >= 1 and self.prefill_chunk >= 1, "batch limits must be >= 1"
        assert self.max_batch_tokens >= self.prefill_chunk, "a prefill chunk must fit a batch"


class TargetEngine:
    def __init__(
        self,
        model,
        store: KVStore,
        device: torch.device | str = "cpu",
        limits: BatchLimits = BatchLimits(),
        probs_receiver=None,
        predictor=None,
    ):
        """`store`: the KV store (slots for requests); `probs_receiver`: the data plane from the
        draft (specpipe.dataplane), for sampling; `predictor`: an AcceptPredictor or None."""
        self.model, self.store, self.device, self.limits = model, store, torch.device(device), limits
        self.predictor = predictor.to(self.device) if predictor is not None else None
        self.requests: dict[str, TargetRequest] = {}
        self.receiver = probs_receiver
        self.table = ProbsTable(getattr(probs_receiver, "recycle", None))
        self._turn = 0
        self.last_batch = (0, 0)  # rows, tokens of the last forward
        self.setup: list[str] = []  # its start-up choices, one line each (launch/worker.py): in its Pongs

    # -- commands -----------------------------------------------------------------------------
    def handle(self, command, frames) -> None:
        kind = command.WhichOneof("kind")
        msg = getattr(command, kind)
        if kind == "prefill":
            self._prefill(msg)
        elif kind in ("verify", "decode"):
            request = self._request(msg.request_id)
            if kind == "verify":
                request.decode_until = 0
                request.verifies.append((msg, time.monotonic()))
            elif msg.until_block:
                if not request.may_fill(msg.max_length):
                    raise ValueError(
                        "Decode.until_block needs a greedy or drafter-invariant request, or a request's first token"
                    )
                request.fill_until = min(msg.max_length, self.store.slot_len)
            else:
                request.decode_until = msg.max_length
        elif kind == "release":
            request = self.requests.pop(msg.request_id, None)
            if request is not None:
                self.table.release(request.handle)
                self.store.free(request.slot)
        else:
            raise ValueError(f"the target worker does not take {kind!r}")

    def _prefill(self, msg) -> None:
        assert len(msg.token_ids) >= 1, "prefill needs at least one token"
        if msg.request_id in self.requests:
            raise ValueError(f"request {msg.request_id!r} exists already")
        if len(msg.token_ids) > self.store.slot_len:
            raise ValueError(
                f"a prompt of {len(msg.token_ids)} tokens does not fit a KV slot of {self.store.slot_len} positions"
            )
        wire_sampling = msg.sampling
        sampling = SamplingParams(
            wire_sampling.temperature, wire_sampling.top_k, wire_sampling.top_p, wire_sampling.drafter_invariant
        )
        self.requests[msg.request_id] = TargetRequest(
            list(msg.token_ids),
            self.store.allocate(),
            sampling,
            wire_sampling.seed,
            msg.handle,
            noise_vocab=wire_sampling.noise_vocab,
            prompt_length=len(msg.token_ids),
            prompt_left=len(msg.token_ids) - 1,
            hold_until=time.monotonic() + max(0.0, min(msg.hold_seconds, MAX_HOLD_S)),
        )

    def _request(self, request_id: str) -> TargetRequest:
        if request_id not in self.requests:
            raise KeyError(f"unknown request {request_id!r}")
        return self.requests[request_id]

    # -- the loop's questions -----------------------------------------------------------------
    def sockets(self) -> list:
        socket = getattr(self.receiver, "socket", None)
        return [socket] if socket is not None else []

    def poll(self) -> None:
        if self.receiver is not None:
            self.table.add(self.receiver.drain())

    def ready(self) -> bool:
        return bool(self._plan(first_only=True))

    def waiting(self) -> bool:
        now = time.monotonic()
        return any(r.verifies or holding(r, now) for r in self.requests.values()) and not self.ready()

    def fill_pong(self, pong: worker_pb2.Pong) -> None:
        pong.live_requests = pong.live_branches = len(self.requests)
        pong.kv_slots, pong.kv_slots_used, pong.kv_slot_len = (
            self.store.num_slots,
            self.store.slots_in_use,
            self.store.slot_len,
        )
        pong.last_batch_rows, pong.last_batch_tokens = self.last_batch
        pong.setup.extend(self.setup)

    def _probs_ready(self, request: TargetRequest, msg) -> bool:
        positions = range(msg.start_length, msg.start_length + len(msg.draft_token_ids))
        return self.table.ready(request.handle, msg.branch_id, msg.epoch, positions)

    # -- one iteration ------------------------------------------------------------------------
    def _plan(self, first_only: bool = False) -> list[Work]:
        """The work of this iteration, taking requests in turn from a rotating start."""
        limits, works = self.limits, []
        tokens_left, rows_left = limits.max_batch_tokens, limits.max_batch_requests
        order = list(self.requests.items())
        start = self._turn % len(order) if order else 0
        for request_id, request in order[start:] + order[:start]:
            work = next_work(request_id, request, self._probs_ready, limits.prefill_chunk, tokens_left, DATA_TIMEOUT_S)
            if work is None:
                continue
            if work.fed:
                if rows_left == 0:
                    continue
                rows_left -= 1
                tokens_left -= len(work.fed)
            works.append(work)
            if first_only:
                break
        return works

    def step(self) -> tuple[list, dict]:
        stale = self._answer_stale()
        works = self._plan()
        self._turn += 1
        now = time.monotonic()
        for work in works:
            work.request.ready_since = work.request.ready_since or now
        fed = [w for w in works if w.fed]
        begin = time.perf_counter()
        outputs = self._forward(fed) if fed else {}
        forward_s = time.perf_counter() - begin
        total = sum(len(w.fed) for w in fed)
        self.last_batch = (len(fed), total)
        items = stale
        for work in works:
            share = forward_s * len(work.fed) / total if total else 0.0
            try:
                item = self._finish(work, outputs.get(id(work)), share)
            except Exception as err:
                logger.exception("[%s] %s failed", work.request_id, work.kind)
                item = (
                    work.request_id,
                    worker_pb2.Reply(
                        error=worker_pb2.Error(
                            request_id=work.request_id, message=f"{type(err).__name__}: {err}", command=work.kind
                        )
                    ),
                    [],
                )
            if item is not None:
                items.append(item)
        # The blocks queued behind one this forward rejected go stale now, in the same message as
        # its verdict: the coordinator learns the whole outcome at once (one message, one wake-up).
        items += self._answer_stale()
        return items, {"batch_requests": len(fed), "batch_tokens": total, "forward_seconds": forward_s}

    def _answer_stale(self) -> list:
        """Answer every request's stale blocks at the head of its queue (no compute), in order, so
        that the block behind them is this iteration's work: a request may queue several blocks
        for outcomes that exclude each other (prepared branch blocks), and all but one are stale."""
        items = []
        for request_id, request in self.requests.items():
            while head_is_stale(request):
                msg, _ = request.verifies.popleft()
                verdict = worker_pb2.Verdict(
                    request_id=request_id,
                    block_id=msg.block_id,
                    stale=True,
                    next_token_id=-1,
                    committed_length=len(request.tokens),
                )
                items.append((request_id, verdict, []))
        return items

    def _forward(self, works: list[Work]) -> dict:
        """One packed forward over the works' fed tokens: {id(work): (logits [n, vocab], hidden or None)}."""
        rows, ids, keep, spans = [], [], [], []
        # In slot order: many one-token rows (decoding) over contiguous slots are then the attention
        # block as they come (kv_store.PackedLayout.in_order); results are mapped back per work.
        works = sorted(works, key=lambda work: work.request.slot)
        for work in works:
            request = work.request
            offsets = work.keep_offsets()
            spans.append((len(keep), len(keep) + len(offsets)))
            keep += [len(ids) + offset for offset in offsets]
            rows.append(Row(request.slot, request.cached, len(work.fed)))
            ids += work.fed
        want_hidden = any(self._wants_hidden(w) for w in works)
        with torch.inference_mode():
            out = forward_packed(
                self.model,
                self.store,
                rows,
                torch.tensor(ids, dtype=torch.long, device=self.device),
                keep,
                want_hidden=want_hidden,
            )
        for work in works:
            work.request.cached += len(work.fed)
            work.fed_prompt = min(work.request.prompt_left, len(work.fed))
            work.request.prompt_left -= work.fed_prompt
        return {
            id(work): (out.logits[a:b], out.hidden[a:b] if out.hidden is not None else None)
            for work, (a, b) in zip(works, spans)
        }

    def _wants_hidden(self, work: Work) -> bool:
        """Hidden states are computed for the whole forward when any verify in it needs them."""
        msg = work.verify
        return msg is not None and (msg.want_features or (msg.want_prediction and self.predictor is not None))

    def _finish(self, work: Work, output, share_s: float):
        """Apply the forward's rows to the request: the verdict item for a verify or a decoded
        token; None for a prefill chunk (its time is reported with the first verdict)."""
        request = work.request
        prefill_s = share_s * work.fed_prompt / len(work.fed) if work.fed else 0.0
        request.unreported_prefill_s += prefill_s  # the prompt's part: reported as prefill
        share_s -= prefill_s
        if work.kind == "prefill":
            return None
        queue_s = time.monotonic() - request.ready_since if request.ready_since else 0.0
        request.ready_since = None
        if work.kind == "verify":
            request.verifies.popleft()
            verdict, frames = verify_block(work, output, self.table, self.predictor, self._wants_hidden(work))
        else:
            verdict, frames = decode_token(work, output, self.table), []
        verdict.verify_seconds, verdict.queue_seconds = share_s, queue_s
        verdict.prefill_seconds, request.unreported_prefill_s = request.unreported_prefill_s, 0.0
        return work.request_id, verdict, frames

    # -- the loop's message -------------------------------------------------------------------
    @staticmethod
    def pack(items, figures: dict) -> tuple[worker_pb2.Reply, list[bytes]]:
        """One Verdicts message: the items' verdicts, their tensor frames renumbered in order."""
        batch = worker_pb2.Verdicts(**figures)
        frames: list[bytes] = []
        for _, verdict, verdict_frames in items:
            if verdict.HasField("features"):
                verdict.features.frame += len(frames)
            frames += verdict_frames
            batch.verdicts.append(verdict)
        return worker_pb2.Reply(verdicts=batch), frames
