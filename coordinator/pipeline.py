"""The pipelined schedules: PEARL-style pipelining and SpecBranch branches (DESIGN §1).

While the target verifies a block, the draft keeps drafting from the block's end, assuming it
will be accepted. The coordinator mirrors every live draft branch (its tokens, and q per position
when sampling) from the DraftToken stream, so it can cut the next block the moment the target is
free, with no round trip to the draft.

SpecBranch: when the main branch's draft token at position j is unsure (q under the policy's
confidence threshold), the draft stops the block there and the coordinator forks alternative
branches at j, one per next-best candidate, which the draft continues in the same batched forward
as the main branch. Only one fork is outstanding at a time.

After every verdict the branch tree is pruned to the branches that agree with the committed
tokens: if the main branch agrees it goes on; else a branch that starts with the target's
correction is promoted (its tokens are already drafted: no bubble); every other branch is
cancelled on the draft worker, which releases its KV entries. If none agrees, the main branch is
synced back to the committed tokens under a new epoch (its stale tokens still in flight are
dropped) and drafting restarts.

Two blocks may be in flight: the next block is queued on the target behind the one it is
verifying, marked with the token it assumes at its start, so the target goes from one to the next
without waiting for the coordinator. If the first is not fully accepted, the queued one is
answered `stale` (nothing computed) and dropped here.

Sampling stays exact: a promoted branch starts with exactly the token the rejection sampler
emitted (it agrees with the committed tokens), and the q sent for its tokens are those the draft
computed when it drafted them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from specpipe.coordinator.scheduler import ROOT_BRANCH, Block, RequestRun
from specpipe.proto.specpipe.worker.v1 import worker_pb2

logger = logging.getLogger(__name__)


# Blocks queued on the target at once: the one it verifies and the next.
MAX_IN_FLIGHT = 2


@dataclass
class InFlight:
    start: int                 # committed length the block extends
    token_ids: list[int]
    doomed: bool = False       # a block before it was not fully accepted: the target drops it


@dataclass
class BranchView:
    """The coordinator's mirror of one draft branch."""
    tokens: list[int]                                      # full sequence, prompt included
    epoch: int = 0                                         # epoch its unverified tokens were drafted in
    drafting: bool = False
    stopped_unsure: bool = False                           # its job ended on a low-confidence token
    candidates: list[int] = field(default_factory=list)    # next-best tokens at its last position
    candidate_probs: list[float] = field(default_factory=list)


class Pipeline:
    def __init__(self, run: RequestRun):
        self.run, self.plan, self.policy = run, run.plan, run.policy
        self.branching = self.plan.mode == "specbranch"
        self.tokens = list(self.plan.prompt_ids)            # committed
        self.end = len(self.tokens) + self.plan.max_new_tokens
        self.branches = {ROOT_BRANCH: BranchView(list(self.tokens))}
        self.main = ROOT_BRANCH
        self.next_branch_id = ROOT_BRANCH + 1
        self.fork_position: int | None = None               # the outstanding fork, if any
        self.queue: list[InFlight] = []                     # blocks sent to the target, oldest first

    async def tokens_stream(self):
        await self.run.prefill()
        self.run.epoch = 1
        await self.keep_drafting()
        while True:
            await self.maybe_send_block()
            event = await self.run.next_event("draft_token", "verdict")
            if event.kind == "draft_token":
                await self.on_draft_token(event.reply.draft_token)
            else:
                new_tokens = await self.on_verdict(event.reply.verdict)
                if new_tokens:
                    yield new_tokens

    def live(self) -> list[InFlight]:
        return [block for block in self.queue if not block.doomed]

    # -- drafting ---------------------------------------------------------------------------------
    def anchor(self) -> int:
        """Where the block after the one being verified starts (assuming that one is accepted),
        or just past the outstanding fork: the draft keeps one block ahead of the target."""
        live = self.live()
        start = len(self.tokens) + (len(live[0].token_ids) if live else 0)
        return max(start, self.fork_position + 1) if self.fork_position is not None else start

    async def keep_drafting(self) -> None:
        """Give every live branch that is idle and short of the lookahead a job, in one command."""
        horizon = min(self.end, self.anchor() + self.policy.block_length())
        idle = [b for b, view in self.branches.items()
                if not view.drafting and not view.stopped_unsure and len(view.tokens) < horizon]
        by_need: dict[int, list[int]] = {}
        for branch_id in idle:
            by_need.setdefault(horizon - len(self.branches[branch_id].tokens), []).append(branch_id)
        for need, branch_ids in by_need.items():
            for branch_id in branch_ids:
                self.branches[branch_id].drafting = True
            await self.run.start_draft(branch_ids, need, num_candidates=self.policy.branch_width)

    async def on_draft_token(self, token: worker_pb2.DraftToken) -> None:
        view = self.branches.get(token.branch_id)
        if view is None:
            return                                  # a cancelled branch's late token: dropped
        assert token.position == len(view.tokens), \
            f"branch {token.branch_id}: token at {token.position}, mirror has {len(view.tokens)}"
        view.tokens.append(token.token_id)
        view.epoch = token.epoch
        view.candidates, view.candidate_probs = list(token.candidate_ids), list(token.candidate_probs)
        if token.last:
            view.drafting = False
            view.stopped_unsure = token.prob < self.policy.min_confidence
        if token.branch_id == self.main and view.stopped_unsure:
            await self.maybe_fork()

    async def maybe_fork(self) -> None:
        """The main branch stopped on an unsure token at position j: fork alternatives at j
        (SpecBranch) and let the main branch go on too."""
        view = self.branches[self.main]
        if self.fork_position is not None:
            return                                  # one outstanding fork at a time: wait
        position = len(view.tokens) - 1
        view.stopped_unsure = False
        if self.branching and position >= len(self.tokens):   # (a committed token needs no alternatives)
            candidates = self.policy.branch_candidates(view.candidates, view.candidate_probs)
            for token_id in candidates:
                branch_id, self.next_branch_id = self.next_branch_id, self.next_branch_id + 1
                await self.run.draft.command(fork=worker_pb2.Fork(
                    request_id=self.plan.request_id, parent_branch_id=self.main, branch_id=branch_id,
                    position=position, token_ids=[token_id]))
                self.branches[branch_id] = BranchView(view.tokens[:position] + [token_id])
            self.run.stats.branches_forked += len(candidates)
            if candidates:
                self.fork_position = position
        await self.keep_drafting()

    # -- verification -----------------------------------------------------------------------------
    async def maybe_send_block(self) -> None:
        """Send the main branch's next block: to an idle target once enough is drafted (or the
        main branch stopped: an unsure token, or the end); behind a block in flight once full."""
        live = self.live()
        if len(live) >= MAX_IN_FLIGHT or (live and not live[-1].token_ids):
            return
        view = self.branches[self.main]
        start = len(self.tokens) + sum(len(block.token_ids) for block in live)
        stop = min(start + self.policy.block_length(), self.end)
        if self.fork_position is not None and self.fork_position >= start:
            stop = min(stop, self.fork_position + 1)
        if stop <= start:
            return                                  # everything up to the end is in flight
        block_ids = view.tokens[start:stop]
        enough = len(block_ids) >= (stop - start if live else min(stop - start, self.policy.send_length()))
        if (not enough and (view.drafting or not block_ids)) or (live and not block_ids):
            return                                  # more tokens are on their way
        self.queue.append(InFlight(start, block_ids))
        block = Block(token_ids=block_ids, branch_id=self.main, epoch=view.epoch)
        await self.run.send_verify(block, emit_bonus=not block_ids, start=start,
                                   expect_last_token=view.tokens[start - 1] if live else None)
        await self.keep_drafting()

    async def on_verdict(self, verdict: worker_pb2.Verdict) -> list[int]:
        head = self.queue.pop(0)
        if verdict.stale:
            assert head.doomed, f"block at {head.start} answered stale but was expected to hold"
            self.run.drop_stale()
            return []
        start = len(self.tokens)
        assert head.start == start, f"verdict for a block at {head.start}, committed length {start}"
        new_tokens = self.run.commit(verdict, head.token_ids)
        self.tokens += new_tokens
        if verdict.num_accepted < len(head.token_ids):
            for block in self.queue:
                block.doomed = True                 # the target will answer them stale
        await self.prune(start)
        await self.keep_drafting()
        return new_tokens

    async def prune(self, start: int) -> None:
        """Keep the branches that agree with the committed tokens; promote or resync main."""
        committed = self.tokens[start:]
        agree = [b for b, view in self.branches.items() if view.tokens[start:len(self.tokens)] == committed]
        if self.main in agree:
            survivor = self.main
        elif agree:
            survivor = max(agree, key=lambda b: len(self.branches[b].tokens))
            self.run.stats.branches_hit += 1
        else:
            survivor = self.main
        if self.fork_position is not None and (self.fork_position < len(self.tokens) or survivor not in agree):
            agree = [survivor] if survivor in agree else []
            self.fork_position = None
        losers = [b for b in self.branches if b != survivor and b not in agree]
        if losers:
            await self.run.draft.command(cancel=worker_pb2.Cancel(request_id=self.plan.request_id, branch_ids=losers))
            for branch_id in losers:
                del self.branches[branch_id]
        self.main = survivor
        if survivor not in agree:                    # nothing agrees: roll main back to the committed tokens
            self.run.epoch += 1
            view = self.branches[survivor]
            view.tokens, view.drafting, view.stopped_unsure = list(self.tokens), False, False
            await self.run.sync_draft(survivor, keep=len(self.tokens) - 1, append=self.tokens[-1:])
        elif self.branches[survivor].stopped_unsure:
            await self.maybe_fork()


async def pipelined(run: RequestRun):
    async for new_tokens in Pipeline(run).tokens_stream():
        yield new_tokens
