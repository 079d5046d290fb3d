"""The draft worker's executor: per request, a small tree of branches over the draft model.

Each branch is a token sequence and a KV cache covering all but its pending tokens (those not yet
fed to the model; at least the last one). A Draft command gives branches a job; `work()` runs one
forward step for the active branches of one request — batched into one forward, caches of
unequal length padded and masked — and streams one DraftToken per branch. Commands arriving
between steps (Sync, Cancel, Fork, Release) take effect before the next step: drafting is
interruptible.

Randomness: the token at sequence position i is drawn from a generator keyed by (seed, i,
STREAM_DRAFT), so what the draft proposes at a position does not depend on timing, batch
neighbours or redrafted branches.
All decisions (what to draft, where to fork) are the coordinator's; this module only executes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from specpipe.kv_cache import KVCache, forward_batch
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import STREAM_DRAFT, SamplingParams, logits_to_probs, make_generator, sample_from_probs

logger = logging.getLogger(__name__)

# Stream key of the draft's randomness (the target uses its own), see specpipe.sampling.make_generator.

@dataclass
class DraftJob:
    epoch: int
    remaining: int
    min_confidence: float
    num_candidates: int
    send_probs: bool

@dataclass
class Branch:
    tokens: list[int]
    cache: KVCache
    job: DraftJob | None = None

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.cache.length

@dataclass
class DraftRequest:
    sampling: SamplingParams
    seed: int
    handle: int                      # the request's number on the data plane
    branches: dict[int, Branch] = field(default_factory=dict)

class DraftEngine:
    def __init__(self, model, device: torch.device | str = "cpu", probs_sender=None):
        """`probs_sender`: the data plane to the target (specpipe.dataplane), needed for sampling."""
        self.model, self.device = model, torch.device(device)
        self.probs_sender = probs_sender
        self.requests: dict[str, DraftRequest] = {}
        self._turn = 0  # round-robin position over requests with work

    # -- commands -----------------------------------------------------------------------------
    def handle(self, command, frames):
        kind = command.WhichOneof("kind")
        getattr(self, f"_on_{kind}")(getattr(command, kind))
        return []

    def _on_prefill(self, msg) -> None:
        assert len(msg.token_ids) >= 1, "prefill needs at least one token"
        sampling = SamplingParams(msg.sampling.temperature, msg.sampling.top_k, msg.sampling.top_p)
        request = DraftRequest(sampling=sampling, seed=msg.sampling.seed, handle=msg.handle)
        tokens = list(msg.token_ids)
        cache = KVCache()
        if len(tokens) > 1:
            with torch.inference_mode():
                cache.forward(self.model, self._ids([tokens[:-1]]))
        request.branches[0] = Branch(tokens=tokens, cache=cache)
        self.requests[msg.request_id] = request

    def _on_draft(self, msg) -> None:
        request = self._request(msg.request_id)
        if msg.send_probs and self.probs_sender is None:
            raise ValueError("sampling needs the data plane to the target: start the draft worker with "
                             "--target-data-addr (zmq) or under torch.distributed (--transport torch)")
        for branch_id in msg.branch_ids:
            branch = self._branch(request, msg.request_id, branch_id)
            branch.job = DraftJob(msg.epoch, msg.max_tokens, msg.min_confidence, msg.num_candidates,
                                  msg.send_probs) if msg.max_tokens > 0 else None

    def _on_fork(self, msg) -> None:
        request = self._request(msg.request_id)
        parent = self._branch(request, msg.request_id, msg.parent_branch_id)
        assert msg.branch_id not in request.branches, f"branch {msg.branch_id} exists already"
        assert 0 < msg.position <= len(parent.tokens), f"fork at {msg.position} outside the parent"
        assert msg.token_ids, "a fork needs at least one token"
        tokens = parent.tokens[:msg.position] + list(msg.token_ids)
        cache = parent.cache.fork(min(parent.cache.length, msg.position))
        request.branches[msg.branch_id] = Branch(tokens=tokens, cache=cache)

    def _on_sync(self, msg) -> None:
        branch = self._branch(self._request(msg.request_id), msg.request_id, msg.branch_id)
        assert msg.keep_length <= len(branch.tokens), f"keep {msg.keep_length} > {len(branch.tokens)} tokens"
        branch.tokens = branch.tokens[:msg.keep_length] + list(msg.append_token_ids)
        assert branch.tokens, "a branch cannot be emptied"
        branch.cache.rollback(min(branch.cache.length, len(branch.tokens) - 1))
        branch.job = None

    def _on_cancel(self, msg) -> None:
        request = self.requests.get(msg.request_id)
        for branch_id in msg.branch_ids if request else ():
            request.branches.pop(branch_id, None)

    def _on_release(self, msg) -> None:
        self.requests.pop(msg.request_id, None)

    def _on_verify(self, msg) -> None:
        raise ValueError("the draft worker does not verify")

    def _request(self, request_id: str) -> DraftRequest:
        if request_id not in self.requests:
            raise KeyError(f"unknown request {request_id!r}")
        return self.requests[request_id]

    @staticmethod
    def _branch(request: DraftRequest, request_id: str, branch_id: int) -> Branch:
        if branch_id not in request.branches:
            raise KeyError(f"request {request_id!r} has no branch {branch_id}")
        return request.branches[branch_id]

    def live_counts(self) -> tuple[int, int]:
        return len(self.requests), sum(len(r.branches) for r in self.requests.values())

    # -- work ---------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return any(b.job for r in self.requests.values() for b in r.branches.values())

    def work(self):
        """One forward step for the drafting branches of the next request in turn."""
        busy = [rid for rid, r in self.requests.items() if any(b.job for b in r.branches.values())]
        request_id = busy[self._turn % len(busy)]
        self._turn += 1
        request = self.requests[request_id]
        groups: dict[int, list[int]] = {}   # by pending tokens: caches of any length batch together
        for branch_id, branch in request.branches.items():
            if branch.job:
                groups.setdefault(branch.num_pending, []).append(branch_id)
        replies = []
        for branch_ids in groups.values():
            try:
                replies += self._step(request_id, request, branch_ids)
            except Exception as err:
                logger.exception("[%s] draft step failed", request_id)
                for branch_id in branch_ids:
                    request.branches[branch_id].job = None
                error = worker_pb2.Error(request_id=request_id, message=f"{type(err).__name__}: {err}",
                                         command="draft")
                replies.append((request_id, worker_pb2.Reply(error=error), []))
        return replies

    def _step(self, request_id: str, request: DraftRequest, branch_ids: list[int]):
        branches = [request.branches[i] for i in branch_ids]
        begin = time.perf_counter()
        with torch.inference_mode():
            input_ids = self._ids([b.tokens[b.cache.length:] for b in branches])
            logits = forward_batch(self.model, [b.cache for b in branches], input_ids).logits[:, -1]
        replies = [self._emit(request_id, request, branch_id, branch, row_logits)
                   for branch_id, branch, row_logits in zip(branch_ids, branches, logits)]
        elapsed = time.perf_counter() - begin
        for _, reply, _ in replies:
            reply.draft_token.step_seconds = elapsed
        return replies

    def _emit(self, request_id, request, branch_id, branch, logits):
        """Choose the next token of one branch from its logits [vocab] and describe it."""
        sampling, job = request.sampling, branch.job
        position = len(branch.tokens)
        if sampling.greedy:
            probs = torch.softmax(logits, dim=-1)  # confidence only: greedy takes the argmax
            token_id = int(torch.argmax(logits))
        else:
            probs = logits_to_probs(logits, sampling)
            generator = make_generator(request.seed, position, STREAM_DRAFT)
            token_id = int(sample_from_probs(probs[None], generator)[0])
        branch.tokens.append(token_id)
        job.remaining -= 1
        prob = float(probs[token_id])
        last = job.remaining <= 0 or prob < job.min_confidence
        msg = worker_pb2.DraftToken(request_id=request_id, branch_id=branch_id, epoch=job.epoch,
                                    position=position, token_id=token_id, prob=prob, last=last)
        if job.num_candidates:
            top = torch.topk(probs, min(job.num_candidates + 1, probs.numel()))
            pairs = [(int(t), float(p)) for t, p in zip(top.indices, top.values) if int(t) != token_id]
            msg.candidate_ids[:] = [t for t, _ in pairs[:job.num_candidates]]
            msg.candidate_probs[:] = [p for _, p in pairs[:job.num_candidates]]
        if job.send_probs:
            self.probs_sender.send((request.handle, branch_id, job.epoch, position), probs)
        if last:
            branch.job = None
        return request_id, worker_pb2.Reply(draft_token=msg), []

    def _ids(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)
