"""The target worker's executor: prefill, verify, release, over the target model.

For sampling, the draft's q of a block arrive over the data plane (specpipe.dataplane), not with
the Verify command: a queued verify runs once all of its q are in the table (the first ready one
in the queue goes first; one that waits past DATA_TIMEOUT_S fails with an error reply).

Per request the target holds the committed tokens, a KV cache over a prefix of them, and — after
a block whose tokens were all accepted with no bonus asked for — the logits at the next position.
Verify feeds the not-yet-cached committed tokens plus the block in one forward, hands the rows to
the pure math in `verify.py`, commits the accepted tokens (plus the correction or bonus) and crops
its cache to the accepted prefix. Verifies queue FIFO; `work()` runs one.

With an acceptance-length predictor (specpipe/predictor.py) loaded, a verify asked for a
prediction keeps the last hidden states of its forward and its verdict carries the predictor's
expected accepted length for the next block, read from the hidden state of the row that predicted
the last committed token (the same row `features` sends). A request that wants predictions asks
on every verify: after a block kept without bonus, the next verify may need that block's last row.

Randomness: a verification starting at committed length L draws from a generator keyed by
(seed, L, STREAM_VERIFY), so a seeded request does not depend on what else runs (and is reproducible wherever
the schedule cuts its blocks deterministically).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from specpipe import wire
from specpipe.dataplane import ProbsTable
from specpipe.kv_cache import KVCache
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import STREAM_VERIFY, SamplingParams, logits_to_probs, make_generator
from specpipe.target_worker.verify import rejection_sample, verify_greedy

logger = logging.getLogger(__name__)

# How long a verify may wait for its q on the data plane before it fails (the draft died, or the
# data plane is misconfigured).
DATA_TIMEOUT_S = 10.0


@dataclass
class TargetRequest:
    tokens: list[int]
    cache: KVCache
    sampling: SamplingParams
    seed: int
    handle: int
    next_logits: torch.Tensor | None = None   # [vocab] logits after tokens[-1], when cached in full
    next_hidden: torch.Tensor | None = None   # [hidden] the last hidden state of that row, when kept
    unreported_prefill_s: float = 0.0         # prefill time not yet sent with a verdict

class TargetEngine:
    def __init__(self, model, device: torch.device | str = "cpu", probs_receiver=None, predictor=None):
        """`probs_receiver`: the data plane from the draft (specpipe.dataplane), for sampling;
        `predictor`: a specpipe.predictor.AcceptPredictor for this model, or None."""
        self.model, self.device = model, torch.device(device)
        self.predictor = predictor.to(self.device) if predictor is not None else None
        self.requests: dict[str, TargetRequest] = {}
        self.queue: list = []      # [(Verify, queued_at)] FIFO, the first ready one runs
        self.receiver = probs_receiver
        self.table = ProbsTable(getattr(probs_receiver, "recycle", None))

    def handle(self, command, frames):
        kind = command.WhichOneof("kind")
        msg = getattr(command, kind)
        if kind == "prefill":
            self._prefill(msg)
        elif kind == "verify":
            if msg.request_id not in self.requests:
                raise KeyError(f"unknown request {msg.request_id!r}")
            self.queue.append((msg, time.monotonic()))
        elif kind == "release":
            state = self.requests.pop(msg.request_id, None)
            if state is not None:
                self.table.release(state.handle)
            self.queue = [item for item in self.queue if item[0].request_id != msg.request_id]
        else:
            raise ValueError(f"the target worker does not take {kind!r}")
        return []

    def _prefill(self, msg) -> None:
        assert len(msg.token_ids) >= 1, "prefill needs at least one token"
        tokens = list(msg.token_ids)
        cache = KVCache()
        begin = time.perf_counter()
        if len(tokens) > 1:
            with torch.inference_mode():
                cache.forward(self.model, torch.tensor([tokens[:-1]], device=self.device))
        sampling = SamplingParams(msg.sampling.temperature, msg.sampling.top_k, msg.sampling.top_p)
        self.requests[msg.request_id] = TargetRequest(tokens, cache, sampling, msg.sampling.seed, msg.handle,
                                                      unreported_prefill_s=time.perf_counter() - begin)

    def live_counts(self) -> tuple[int, int]:
        return len(self.requests), len(self.requests)

    def poll_sockets(self) -> list:
        socket = getattr(self.receiver, "socket", None)
        return [socket] if socket is not None else []

    def waiting(self) -> bool:
        """Verifies are queued but none is ready: the loop should look again soon."""
        return bool(self.queue) and not self.has_work()

    def has_work(self) -> bool:
        if self.receiver is not None:
            self.table.add(self.receiver.drain())
        return self._next_ready() is not None

    def _next_ready(self) -> int | None:
        """Index of the first verify that can run: the oldest of its request (a request's blocks
        run in order: a queued block's staleness depends on the one before) and ready."""
        seen = set()
        for index, (msg, queued_at) in enumerate(self.queue):
            if msg.request_id in seen:
                continue
            seen.add(msg.request_id)
            if self._ready(msg, queued_at):
                return index
        return None

    def _ready(self, msg, queued_at: float) -> bool:
        state = self.requests[msg.request_id]
        if state.sampling.greedy or not msg.draft_token_ids or time.monotonic() - queued_at > DATA_TIMEOUT_S:
            return True
        if self._stale(state, msg):
            return True
        positions = range(msg.start_length, msg.start_length + len(msg.draft_token_ids))
        return self.table.take(state.handle, msg.branch_id, msg.epoch, positions) is not None

    def work(self):
        msg, _ = self.queue.pop(self._next_ready())
        try:
            reply, reply_frames = self._verify(msg)
        except Exception as err:
            logger.exception("[%s] verify failed", msg.request_id)
            error = worker_pb2.Error(request_id=msg.request_id, message=f"{type(err).__name__}: {err}",
                                     command="verify")
            return [(msg.request_id, worker_pb2.Reply(error=error), [])]
        state = self.requests[msg.request_id]      # the prefill time travels once, with the first verdict
        reply.verdict.prefill_seconds, state.unreported_prefill_s = state.unreported_prefill_s, 0.0
        return [(msg.request_id, reply, reply_frames)]

    @staticmethod
    def _stale(state: TargetRequest, msg) -> bool:
        """A queued block whose predecessor was not fully accepted."""
        return msg.HasField("expect_last_token") and (msg.start_length != len(state.tokens)
                                                      or state.tokens[-1] != msg.expect_last_token)

    def _verify(self, msg):
        begin = time.perf_counter()
        state = self.requests[msg.request_id]
        if self._stale(state, msg):
            verdict = worker_pb2.Verdict(request_id=msg.request_id, block_id=msg.block_id, stale=True,
                                         next_token_id=-1, committed_length=len(state.tokens))
            return worker_pb2.Reply(verdict=verdict), []
        if msg.start_length != len(state.tokens):
            raise ValueError(f"block {msg.block_id} starts at {msg.start_length}, "
                             f"committed length is {len(state.tokens)}")
        draft = list(msg.draft_token_ids)
        pending = state.tokens[state.cache.length:]
        assert pending or state.next_logits is not None, "nothing to predict the first draft token from"
        want_hidden = msg.want_features or (msg.want_prediction and self.predictor is not None)
        rows, hidden_rows = self._rows(state, pending, draft, want_hidden)
        num_accepted, next_token = self._decide(state, msg, draft, rows)
        all_accepted = num_accepted == len(draft)
        if all_accepted and not msg.emit_bonus:
            state.tokens += draft
            state.next_logits = rows[-1]
            state.next_hidden = hidden_rows[-1] if hidden_rows is not None else None
            next_token = -1
            last_row = num_accepted - 1    # the row that predicted the last accepted draft token
        else:
            state.tokens += draft[:num_accepted] + [next_token]
            state.cache.rollback(msg.start_length + num_accepted)
            state.next_logits = state.next_hidden = None
            last_row = num_accepted        # the row that predicted the correction or bonus
        self.table.drop_below(state.handle, len(state.tokens))
        verdict = worker_pb2.Verdict(request_id=msg.request_id, block_id=msg.block_id,
                                     num_accepted=num_accepted, next_token_id=next_token,
                                     committed_length=len(state.tokens))
        reply_frames: list[bytes] = []
        # The hidden state of the row that predicted the last committed token (absent only for an
        # empty block without a bonus, or after a verify that kept no hidden states).
        last_hidden = hidden_rows[last_row] if hidden_rows is not None and last_row >= 0 else None
        if msg.want_features and last_hidden is not None:
            wire.put_tensor(verdict.features, last_hidden.float(), reply_frames)
        verdict.predicted_accept_length = -1.0
        if msg.want_prediction and self.predictor is not None and last_hidden is not None:
            verdict.predicted_accept_length = self.predictor.predict(last_hidden)
        verdict.verify_seconds = time.perf_counter() - begin
        return worker_pb2.Reply(verdict=verdict), reply_frames

    def _rows(self, state: TargetRequest, pending: list[int], draft: list[int], want_hidden: bool):
        """The target's rows predicting each draft position and the one after: ([k + 1, vocab]
        logits, [k + 1, hidden] or None), feeding the pending committed tokens and the draft."""
        if not pending and not draft:
            # Nothing to feed (target-only after a block kept without bonus): the kept logits
            # already predict the next token; never run the model on an empty input.
            hidden_rows = state.next_hidden[None] if want_hidden and state.next_hidden is not None else None
            return state.next_logits[None], hidden_rows
        with torch.inference_mode():
            input_ids = torch.tensor([pending + draft], dtype=torch.long, device=self.device)
            out = state.cache.forward(self.model, input_ids, want_hidden=want_hidden)
        logits = out.logits[0]                                    # [len(pending) + k, vocab]
        hidden = out.hidden[0] if want_hidden else None           # [len(pending) + k, hidden]
        if pending:
            return logits[len(pending) - 1:], hidden[len(pending) - 1:] if want_hidden else None
        hidden_rows = (torch.cat([state.next_hidden[None], hidden])
                       if want_hidden and state.next_hidden is not None else None)
        return torch.cat([state.next_logits[None], logits]), hidden_rows

    def _decide(self, state: TargetRequest, msg, draft: list[int], rows: torch.Tensor) -> tuple[int, int]:
        """Accept/reject the block: (num_accepted, next token) from the target's rows [k + 1, vocab]."""
        draft_ids = torch.tensor([draft], dtype=torch.long)
        if state.sampling.greedy:
            result = verify_greedy(draft_ids, rows[None])
        else:
            target_probs = logits_to_probs(rows, state.sampling)[None]
            draft_probs = self._draft_probs(state, msg, rows.shape[-1])
            generator = make_generator(state.seed, msg.start_length, STREAM_VERIFY)
            result = rejection_sample(draft_ids, draft_probs, target_probs, generator)
        return int(result.num_accepted[0]), int(result.next_token_ids[0])

    def _draft_probs(self, state: TargetRequest, msg, vocab: int) -> torch.Tensor:
        """[1, num_draft_tokens, vocab] q from the data plane, zero-padded to the target's
        width when the draft's head is narrower (padding rows have no mass)."""
        num_draft = len(msg.draft_token_ids)
        if not num_draft:
            return torch.zeros(1, 0, vocab)
        positions = range(msg.start_length, msg.start_length + num_draft)
        draft_probs = self.table.take(state.handle, msg.branch_id, msg.epoch, positions)
        if draft_probs is None:
            raise TimeoutError(f"the draft's q for block {msg.block_id} did not arrive on the data plane "
                               f"within {DATA_TIMEOUT_S:.0f}s")
        draft_probs = draft_probs.to(self.device).float()
        if draft_probs.shape[-1] < vocab:
            draft_probs = torch.nn.functional.pad(draft_probs, (0, vocab - draft_probs.shape[-1]))
        assert draft_probs.shape == (num_draft, vocab), f"q of shape {tuple(draft_probs.shape)} for a block of {num_draft}"
        return draft_probs[None]
