"""The per-request schedules: which worker does what, in which order (DESIGN §2).

A `RequestRun` drives one request over the draft and target workers and yields the tokens it
commits, block by block; the servicer turns them into text, applies stop strings, EOS and the
length limit, and closes the run when done (closing releases the request on both workers).

Modes:
- autoregressive: the target alone, one token per verification (a verify with no draft).
- sequential: draft a block on branch 0, verify it, sync the draft to the verdict, repeat.
- pipelined / specbranch: see coordinator/pipeline.py.

All decisions are made here; workers execute. Replies for an old epoch are dropped here.

If the draft worker goes down mid-request, the request carries on target-only from what is
committed (the verdict of a block already in flight is still awaited and applied): lossless,
since every committed token was the target's. If the target goes down, the request fails.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from specpipe.coordinator.policy import AcceptanceModel, DraftPolicy, PolicyConfig
from specpipe.coordinator.workers import Event, WorkerClient, WorkerDown, WorkerFailed


class DraftDown(WorkerDown):
    """The draft worker stopped answering: the request falls back to target-only decoding."""
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import SamplingParams

logger = logging.getLogger(__name__)

ROOT_BRANCH = 0
# Request numbers for the data plane, unique within this coordinator's life.
HANDLES = itertools.count(1)


@dataclass(frozen=True)
class RequestPlan:
    """A validated request, as the schedulers see it."""
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    mode: str                        # autoregressive | sequential | pipelined | specbranch
    policy: PolicyConfig = PolicyConfig()


@dataclass
class RunStats:
    draft_tokens: int = 0            # drafted tokens that reached a verification
    accepted_tokens: int = 0
    drafted_total: int = 0           # every token the draft produced for the request
    rolled_back_tokens: int = 0      # drafted, then thrown away: drafted_total - accepted_tokens
    verifications: int = 0
    branches_forked: int = 0
    branches_hit: int = 0
    target_seconds: float = 0.0      # target compute spent on this request
    committed_per_verification: list[int] = field(default_factory=list)


@dataclass
class Block:
    """Draft tokens on their way to a verification. Their q (sampling) travel on the data plane,
    drafted on `branch_id` under `epoch`."""
    token_ids: list[int] = field(default_factory=list)
    branch_id: int = ROOT_BRANCH
    epoch: int = 0
    done: bool = False

    def add(self, token: worker_pb2.DraftToken) -> None:
        self.token_ids.append(token.token_id)
        self.branch_id, self.epoch, self.done = token.branch_id, token.epoch, token.last


class RequestRun:
    def __init__(self, plan: RequestPlan, draft: WorkerClient, target: WorkerClient,
                 acceptance: AcceptanceModel | None = None):
        """`acceptance`: the server's shared running model of acceptance and step costs."""
        self.plan, self.draft, self.target = plan, draft, target
        self.inbox: asyncio.Queue[Event] = asyncio.Queue()
        self.stats = RunStats()
        self.policy = DraftPolicy(plan.policy, plan.mode, acceptance, greedy=plan.sampling.greedy)
        self.handle = next(HANDLES)
        self.epoch = 0
        self.block_id = 0
        self.in_flight: list[Block] = []         # blocks sent to the target, oldest first
        self.committed = len(plan.prompt_ids)
        self.uses_draft = plan.mode != "autoregressive" and draft.healthy
        self.fell_back = plan.mode != "autoregressive" and not draft.healthy   # degraded from the start
        self.started = time.monotonic()
        self.target.attach(plan.request_id, self.inbox)
        if self.uses_draft:
            self.draft.attach(plan.request_id, self.inbox)

    # -- the schedules ------------------------------------------------------------------------
    async def tokens(self):
        """Async iterator over lists of newly committed tokens."""
        if self.plan.mode == "autoregressive" or self.fell_back:
            schedule = self._autoregressive()
        elif self.plan.mode == "sequential":
            schedule = self._sequential()
        else:
            from specpipe.coordinator.pipeline import pipelined
            schedule = pipelined(self)
        try:
            async for new_tokens in schedule:
                yield new_tokens
        except DraftDown:
            logger.warning("[%s] draft worker down: going on target-only from %d committed tokens",
                           self.plan.request_id, self.committed)
            self.fell_back = True
            self.uses_draft = False
            self.draft.detach(self.plan.request_id)
            async for new_tokens in self._target_only():
                yield new_tokens

    async def _autoregressive(self):
        await self.prefill()
        async for new_tokens in self._target_only():
            yield new_tokens

    async def _target_only(self):
        while self.in_flight:                     # blocks sent before the draft went down
            verdict = (await self.next_event("verdict")).reply.verdict
            if verdict.stale:
                self.in_flight.pop(0)
            else:
                yield self.commit(verdict, self.in_flight[0].token_ids)
        while True:
            verdict = await self.verify(Block(), emit_bonus=True)
            yield self.commit(verdict, [])

    async def _sequential(self):
        await self.prefill()
        while True:
            block = Block()
            num_draft = self.draft_budget()
            if num_draft:
                self.epoch += 1
                await self.start_draft([ROOT_BRANCH], num_draft)
                while not block.done:
                    event = await self.next_event("draft_token")
                    block.add(event.reply.draft_token)
            verdict = await self.verify(block, emit_bonus=True)
            new_tokens = self.commit(verdict, block.token_ids)
            await self.sync_draft(ROOT_BRANCH, keep=self.committed - 1, append=new_tokens[-1:])
            yield new_tokens

    # -- steps the schedules share ------------------------------------------------------------
    def draft_budget(self) -> int:
        """Draft tokens for the next block: the policy's length, never past max_new_tokens
        (the last token of a block always comes from the target)."""
        produced = self.committed - len(self.plan.prompt_ids)
        return max(0, min(self.policy.block_length(), self.plan.max_new_tokens - produced - 1))

    async def prefill(self) -> None:
        sampling = worker_pb2.Sampling(temperature=self.plan.sampling.temperature, top_k=self.plan.sampling.top_k,
                                       top_p=self.plan.sampling.top_p, seed=self.plan.seed)
        prefill = worker_pb2.Prefill(request_id=self.plan.request_id, token_ids=self.plan.prompt_ids,
                                     sampling=sampling, handle=self.handle)
        await self.target.command(prefill=prefill)
        if self.uses_draft:
            await self.draft.command(prefill=prefill)

    async def start_draft(self, branch_ids: list[int], max_tokens: int, num_candidates: int = 0) -> None:
        await self.draft.command(draft=worker_pb2.Draft(
            request_id=self.plan.request_id, branch_ids=branch_ids, epoch=self.epoch, max_tokens=max_tokens,
            min_confidence=self.policy.min_confidence, num_candidates=num_candidates,
            send_probs=not self.plan.sampling.greedy))

    async def sync_draft(self, branch_id: int, keep: int, append: list[int]) -> None:
        await self.draft.command(sync=worker_pb2.Sync(request_id=self.plan.request_id, branch_id=branch_id,
                                                      keep_length=keep, append_token_ids=append))

    async def send_verify(self, block: Block, emit_bonus: bool, start: int | None = None,
                          expect_last_token: int | None = None) -> None:
        """Queue a block on the target. `start` (default: the committed length) and
        `expect_last_token` let a block go behind one still in flight: if that one is not fully
        accepted, the target answers this one `stale`."""
        self.block_id += 1
        verify = worker_pb2.Verify(request_id=self.plan.request_id, block_id=self.block_id,
                                   start_length=self.committed if start is None else start,
                                   draft_token_ids=block.token_ids, branch_id=block.branch_id, epoch=block.epoch,
                                   emit_bonus=emit_bonus, expect_last_token=expect_last_token,
                                   want_prediction=self.policy.wants_prediction)
        await self.target.command(verify=verify)
        self.in_flight.append(block)

    def drop_stale(self) -> None:
        """The oldest block in flight came back stale: nothing was committed."""
        self.in_flight.pop(0)

    async def verify(self, block: Block, emit_bonus: bool) -> worker_pb2.Verdict:
        await self.send_verify(block, emit_bonus)
        return (await self.next_event("verdict")).reply.verdict

    def commit(self, verdict: worker_pb2.Verdict, draft_token_ids: list[int]) -> list[int]:
        """Account for the verdict of the oldest block in flight and return the tokens it commits."""
        self.in_flight.pop(0)
        accepted = draft_token_ids[:verdict.num_accepted]
        new_tokens = accepted + ([verdict.next_token_id] if verdict.next_token_id >= 0 else [])
        self.stats.verifications += 1
        self.stats.draft_tokens += len(draft_token_ids)
        self.stats.accepted_tokens += len(accepted)
        self.stats.rolled_back_tokens = self.stats.drafted_total - self.stats.accepted_tokens
        self.policy.observe(len(draft_token_ids), len(accepted), verdict.verify_seconds,
                            verdict.predicted_accept_length)
        self.stats.target_seconds += verdict.verify_seconds
        self.stats.committed_per_verification.append(len(new_tokens))
        self.committed += len(new_tokens)
        assert self.committed == verdict.committed_length, \
            f"coordinator has {self.committed} committed tokens, target {verdict.committed_length}"
        return new_tokens

    async def next_event(self, *kinds: str) -> Event:
        """The next reply of one of `kinds`; stale draft tokens are dropped (and counted as
        rolled back); a worker error or a dead worker raises."""
        while True:
            event = await self.inbox.get()
            if event.kind == "down" and event.role == "draft":
                if not self.uses_draft:
                    continue
                raise DraftDown("the draft worker stopped answering")
            if event.kind == "down":
                raise WorkerDown(f"the {event.role} worker stopped answering")
            if event.kind == "error" and event.role == "draft":
                # e.g. a draft restarted faster than the heartbeat noticed: it lost our state
                raise DraftDown(f"draft worker: {event.reply.error.message}")
            if event.kind == "error":
                raise WorkerFailed(f"{event.role} worker: {event.reply.error.message}")
            if event.kind == "verdict":
                self.stats.target_seconds += event.reply.verdict.prefill_seconds
            if event.kind == "draft_token":
                self.stats.drafted_total += 1
                self.policy.observe_draft_step(event.reply.draft_token.step_seconds)
                if event.reply.draft_token.epoch != self.epoch:
                    continue
            if event.kind in kinds:
                return event
            logger.debug("[%s] unexpected %s while waiting for %s", self.plan.request_id, event.kind, kinds)

    async def release(self) -> None:
        """Free the request on both workers (also after a failure or a cancel)."""
        release = worker_pb2.Release(request_id=self.plan.request_id)
        for worker in (self.target, self.draft) if self.plan.mode != "autoregressive" else (self.target,):
            worker.detach(self.plan.request_id)
            try:
                await worker.command(release=release)
            except Exception:   # the socket may be gone at shutdown; the worker drops it on restart
                logger.warning("[%s] could not send release to the %s worker", self.plan.request_id, worker.role)
