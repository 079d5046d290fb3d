"""The per-request schedules: which worker does what, in which order (DESIGN §2).

A schedule owns its request's state — the committed tokens, the drafting epoch and the blocks in
flight on the target — and yields the tokens it commits, verdict by verdict. It sends commands and
reads events only through the request's channel (coordinator/channel.py), so a test can drive it
against a fake one. Every count in the request's stats is updated here, in one place per event
(`RunStats`).

- `Autoregressive`: the target alone; one Decode command, then one committed token per verdict
  (the target decodes by itself, batched with everything else: no round trip per token).
- `Sequential`: draft a block on branch 0 (its tokens come in one message, at its end:
  Draft.report_when_done), verify it, sync the draft to the verdict, repeat.
- `TargetOnly`: what any schedule becomes when the draft goes down, or when speculation stops
  paying for the request (its measured acceptance makes the target alone faster: `DraftPolicy.
  speculation_pays`): the verdicts of blocks already in flight are still awaited and applied, then
  the target decodes the rest by itself. Lossless: every committed token was the target's.
- pipelined / specbranch: coordinator/pipeline.py.

All decisions are made here; workers execute. Replies for an old epoch are dropped here.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, fields

from specpipe.blocks import left_to_verify
from specpipe.coordinator.channel import RequestChannel
from specpipe.coordinator.policy import DraftPolicy
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.trace import trace

logger = logging.getLogger(__name__)

ROOT_BRANCH = 0


@dataclass
class RunStats:
    """A request's counters. drafted_tokens: every token the draft produced for it (main line and
    branches); draft_tokens: those sent to the target for verification (part of drafted);
    accepted_tokens: those the target accepted (part of draft_tokens); kept_tokens: drafted ones
    committed without a verify accepting them (the token a promoted branch forked with, which the
    target emitted as its correction or decoded by itself; a main-line token equal to a token the
    target emitted or decoded past a block); rolled_back_tokens: drafted and thrown away
    (drafted_tokens - accepted_tokens - kept_tokens: rejected, on a cancelled branch, or drafted
    past the end). rejections: verdicts that rejected a draft token; main_rolled_back_tokens: the
    main line's tokens they threw away (the rejected one and every one drafted past it, not the
    cancelled branches'). Specbranch: rejections_at_fork, those at a position with alternative
    branches forked; rank_tried[r] / rank_hits[r], positions where the target's token differed from
    the main line's (rejections, and tokens it decoded by itself) and a branch of rank r (0: the
    draft's second choice there) existed / held the target's token; prepared_hits, verifications
    of a block prepared for the outcome of the verdict before it (no round trip through us);
    filled_tokens, tokens the target decoded by itself while it would have waited for a block (the
    first token, in the prompt's forward; after a rejection, while the draft redrafts)."""

    drafted_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    kept_tokens: int = 0
    verifications: int = 0
    branches_forked: int = 0
    branches_hit: int = 0
    rejections: int = 0
    rejections_at_fork: int = 0
    main_rolled_back_tokens: int = 0
    rank_tried: list[int] = field(default_factory=list)
    rank_hits: list[int] = field(default_factory=list)
    prepared_hits: int = 0
    filled_tokens: int = 0  # tokens the target decoded by itself where it would wait for a block
    target_seconds: float = 0.0  # target compute spent on this request (its share of batches)
    queue_seconds: float = 0.0  # time its blocks waited, ready, for a place in a batch
    committed_per_verification: list[int] = field(default_factory=list)

    @property
    def rolled_back_tokens(self) -> int:
        return self.drafted_tokens - self.accepted_tokens - self.kept_tokens

    def on_verdict(self, verdict: worker_pb2.Verdict, num_draft: int, committed: int) -> None:
        self.target_seconds += verdict.verify_seconds + verdict.prefill_seconds
        self.queue_seconds += verdict.queue_seconds
        if verdict.stale:
            return
        self.verifications += 1
        self.draft_tokens += num_draft
        self.accepted_tokens += verdict.num_accepted
        self.committed_per_verification.append(committed)
        if verdict.num_accepted < num_draft:
            self.rejections += 1
            self.main_rolled_back_tokens += num_draft - verdict.num_accepted

    def add(self, other: "RunStats") -> None:
        """Add another request's counters to these (the server's totals): numbers summed, the
        per-rank counts rank by rank, and its tokens per verification as one entry (their sum)."""
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if item.name == "committed_per_verification":
                mine.append(sum(theirs))
            elif isinstance(mine, list):
                for index, count in enumerate(theirs):
                    grow(mine, index)[index] += count
            else:
                setattr(self, item.name, mine + theirs)

    def on_forked_rejection(self, ranks: list[int], hit_rank: int | None) -> None:
        """A rejection at a position where branches of `ranks` were forked; `hit_rank`: the rank of
        the one promoted (it held the target's token), None if none did."""
        self.rejections_at_fork += 1
        self.on_fork_point_decided(ranks, hit_rank)

    def on_fork_point_decided(self, ranks: list[int], hit_rank: int | None) -> None:
        """The target's token at a position where branches of `ranks` were forked differed from the
        main line's (rejected in a verify, or decoded by itself); `hit_rank` as above."""
        for rank in ranks:
            grow(self.rank_tried, rank)[rank] += 1
        if hit_rank is not None:
            grow(self.rank_hits, hit_rank)[hit_rank] += 1


def grow(counts: list[int], index: int) -> list[int]:
    """`counts`, zero-extended to hold `index`."""
    counts.extend([0] * (index + 1 - len(counts)))
    return counts


class SpeculationStopped(Exception):
    """Drafting no longer pays for this request: the target decodes the rest alone."""


@dataclass
class Block:
    """Draft tokens on their way to (or at) the target: extending the committed length `start`,
    drafted on `branch_id` under `epoch` (their q, when sampling, travel on the data plane)."""

    start: int
    token_ids: list[int] = field(default_factory=list)
    branch_id: int = ROOT_BRANCH
    epoch: int = 0
    done: bool = False  # its drafting job ended
    done_at: float = 0.0  # pipelined: when the target should be done with it
    doomed: bool = False  # pipelined: a block before it was not fully accepted: answered stale
    # specbranch: a block prepared for one outcome of a block in flight (the target's token at
    # start - 1 being `expect`): the target verifies it only on that outcome, else answers stale.
    conditional: bool = False
    expect: int = -1
    block_id: int = 0  # set when sent
    after: int = 0  # the block_id of the block whose verdict it assumes (0: none)

    def add(self, token: worker_pb2.DraftToken) -> None:
        if token.token_id >= 0:
            self.token_ids.append(token.token_id)
        self.branch_id, self.epoch, self.done = token.branch_id, token.epoch, token.last


def block_holding(position: int, blocks: list[Block]) -> Block | None:
    """The block of `blocks` whose tokens cover `position`, if any."""
    return next((b for b in blocks if b.start <= position < b.start + len(b.token_ids)), None)


class Schedule:
    """The state and the steps every schedule shares; `run` is the schedule itself."""

    def __init__(self, plan, channel: RequestChannel, policy: DraftPolicy, stats: RunStats):
        self.plan, self.channel, self.policy, self.stats = plan, channel, policy, stats
        self.tokens = list(plan.prompt_ids)  # committed, prompt included
        self.end = len(self.tokens) + plan.max_new_tokens
        self.epoch = 0
        self.in_flight: deque[Block] = deque()  # sent to the target, oldest first
        self.block_id = 0

    async def run(self):
        """Async iterator over lists of newly committed tokens."""
        raise NotImplementedError
        yield

    async def prefill(self, hold_s: float = 0.0) -> None:
        """`hold_s`: the target may keep the prompt waiting that long for the first block (both
        then go in one forward)."""
        await self.channel.prefill(
            self.plan.prompt_ids, self.plan.sampling, self.plan.seed, self.plan.noise_vocab, hold_s=hold_s
        )

    def fills_start(self) -> bool:
        """The prompt's forward decodes the first token (`fill`), where the policy says so. Under
        the default sampling rule the decoded token is a draw from the target's law, decoded before
        any block (target_worker/requests.py, `may_fill`), not the draw a verify makes there; so
        for a seeded request, whose seed must fix its tokens alone or among others, the choice is
        the setting's alone, never the load's. (Greedy and drafter-invariant: the decoded token is
        the one a verify would emit.)"""
        plan = self.plan
        return self.policy.fills_start(whatever_the_load=plan.seeded and not plan.sampling.drafter_free)

    async def fill(self, count: int) -> None:
        """The target decodes up to `count` tokens by itself until a block of ours comes
        (Decode.until_block); one it verifies then starts behind them."""
        await self.channel.decode(min(self.end, len(self.tokens) + count), until_block=True)

    @property
    def sends_probs(self) -> bool:
        """The draft's q go to the target (the default sampling rule needs them; greedy and the
        drafter-invariant coupling compare tokens only)."""
        return not self.plan.sampling.greedy and not self.plan.sampling.coupled

    def draft_budget(self) -> int:
        """Draft tokens for the next block: the policy's length, never past max_new_tokens
        (the last token of a block always comes from the target)."""
        return max(0, min(self.policy.block_length(), self.end - len(self.tokens) - 1))

    async def send_verify(
        self, block: Block, emit_bonus: bool, expect_last_token: int | None = None, after: Block | None = None
    ) -> None:
        """Queue a block on the target. `after`: the block in flight whose verdict this one assumes,
        ending with `expect_last_token` at start - 1; otherwise the target answers this one `stale`."""
        self.block_id += 1
        block.block_id, block.after = self.block_id, after.block_id if after is not None else 0
        await self.channel.verify(
            worker_pb2.Verify(
                block_id=self.block_id,
                start_length=block.start,
                draft_token_ids=block.token_ids,
                branch_id=block.branch_id,
                epoch=block.epoch,
                emit_bonus=emit_bonus,
                expect_last_token=expect_last_token,
                after_block_id=after.block_id if after is not None else None,
                want_prediction=self.policy.wants_prediction,
            )
        )
        self.in_flight.append(block)
        trace("send", self.plan.request_id, block.block_id, block.start, len(block.token_ids), int(block.conditional))

    def stop_if_unpaid(self) -> None:
        """Raise SpeculationStopped when drafting stopped paying for this request. Never for a seeded
        request sampled by the default rule: where its positions switch to the target's own draw
        would depend on timing, and a seed must fix the output."""
        switchable = self.plan.sampling.drafter_free or not self.plan.seeded
        if switchable and not self.policy.speculation_pays():
            raise SpeculationStopped(f"acceptance {self.policy.rate:.2f}: the target alone is faster")

    def observe_draft(self, event) -> list[worker_pb2.DraftToken]:
        """Count a draft step's tokens for the request and note the step's time; return them."""
        tokens = event.payload
        if trace.on:
            trace("dtoks", self.plan.request_id, ",".join(f"{t.branch_id}:{t.epoch}:{t.position}" for t in tokens))
        self.stats.drafted_tokens += sum(t.token_id >= 0 for t in tokens)
        if event.step_seconds > 0:  # (0: held tokens of a stopped job, reported with no step)
            self.policy.observe_draft_step(event.step_seconds)
        return tokens

    def commit(self, verdict: worker_pb2.Verdict) -> list[int]:
        """Apply a verdict: the tokens it commits ([] if stale). A `decoded` verdict is a token the
        target decoded by itself (Decode); any other is the oldest block's in flight, which may
        start behind tokens decoded so (its verdict counts them, as accepted)."""
        if verdict.decoded:
            self.stats.on_verdict(verdict, 0, 1)
            self.stats.filled_tokens += 1
            self.tokens.append(verdict.next_token_id)
            assert len(self.tokens) == verdict.committed_length, "decoded token out of step"
            return [verdict.next_token_id]
        block = self.in_flight.popleft()
        trace("verdict", self.plan.request_id, block.block_id, int(verdict.stale), verdict.num_accepted)
        if verdict.stale:
            assert block.doomed or block.conditional, f"block at {block.start} answered stale but was expected to hold"
            self.stats.on_verdict(verdict, 0, 0)
            return []
        # A prepared block verified: the target reached the outcome it was made for (a schedule that
        # took over from the pipelined one gets that verdict without having armed the block).
        assert not block.conditional or self.tokens[-1] == block.expect, (
            f"a prepared block at {block.start} verified after another token"
        )
        behind = len(self.tokens) - block.start  # tokens the target decoded by itself past its start
        accepted = block.token_ids[: verdict.num_accepted]
        decided = accepted + ([verdict.next_token_id] if verdict.next_token_id >= 0 else [])
        assert behind >= 0 and decided[:behind] == self.tokens[block.start :], (
            f"verdict for a block at {block.start} that does not extend the {len(self.tokens)} committed tokens"
        )
        new_tokens = decided[behind:]
        self.stats.on_verdict(verdict, len(block.token_ids), len(new_tokens))
        self.policy.observe(len(block.token_ids), len(accepted), verdict.predicted_accept_length)
        self.tokens += new_tokens
        assert len(self.tokens) == verdict.committed_length, (
            f"coordinator has {len(self.tokens)} committed tokens, target {verdict.committed_length}"
        )
        return new_tokens


class Autoregressive(Schedule):
    async def run(self):
        await self.prefill()
        await self.channel.decode(self.end)
        async for new_tokens in decode_rest(self):
            yield new_tokens


async def decode_rest(schedule: Schedule):
    """The target decodes the rest of the request by itself: one token per verdict."""
    while len(schedule.tokens) < schedule.end:
        verdict = (await schedule.channel.next_event("verdict")).payload
        schedule.stats.on_verdict(verdict, 0, 1)
        schedule.tokens.append(verdict.next_token_id)
        assert len(schedule.tokens) == verdict.committed_length, "decoded token out of step"
        yield [verdict.next_token_id]


class Sequential(Schedule):
    """Draft a block, verify it (with the bonus), sync the draft to the verdict, again. The prompt
    goes to the target at once (no hold: the target would wait for the whole block); where the
    policy fills waits (`fills_start`), the prompt's forward also decodes the first token
    (`Decode.until_block`): it streams while the draft drafts, and the first block is verified past
    it, or dropped and redrafted if it does not start with it."""

    async def run(self):
        await self.prefill()
        if self.fills_start():
            await self.fill(1)
        block, drafting = await self.start_block()
        while True:
            if drafting:
                while not block.done:
                    event = await self.channel.next_event("draft_tokens", "verdict")
                    if event.kind == "verdict":  # the first token, decoded in the prompt's forward
                        yield self.commit(event.payload)
                        continue
                    for token in self.observe_draft(event):
                        if token.epoch == self.epoch:
                            block.add(token)
                if left_to_verify(block.start, block.token_ids, self.tokens) is None:
                    # It does not start with the decoded token (or that is all of it): redraft.
                    self.stats.main_rolled_back_tokens += len(block.token_ids)
                    await self.resync()
                    block, drafting = await self.start_block()
                    continue
            await self.send_verify(block, emit_bonus=True)
            while (verdict := (await self.channel.next_event("verdict")).payload).decoded:
                # Decoded before the block reached the target: the block is verified past it, or stale.
                yield self.commit(verdict)
                block.doomed = left_to_verify(block.start, block.token_ids, self.tokens) is None
            new_tokens = self.commit(verdict)
            if verdict.stale:
                self.stats.main_rolled_back_tokens += len(block.token_ids)
            await self.resync()
            block, drafting = await self.start_block()  # (with the sync, before the client's stream is written)
            if new_tokens:
                yield new_tokens
            self.stop_if_unpaid()

    async def start_block(self) -> tuple[Block, bool]:
        """The next block, from the committed tokens, and whether the draft drafts it (its job
        starts now; the block waits for its last token: reported then, at once)."""
        block, num_draft = Block(start=len(self.tokens)), self.draft_budget()
        if num_draft:
            self.epoch += 1
            await self.channel.draft_tokens(
                [ROOT_BRANCH],
                self.epoch,
                num_draft,
                self.policy.min_confidence,
                0,
                self.sends_probs,
                report_when_done=True,
            )
        return block, bool(num_draft)

    async def resync(self) -> None:
        """The draft keeps what it drafted up to the last committed token, which it takes from us."""
        await self.channel.sync(ROOT_BRANCH, keep_length=len(self.tokens) - 1, append=self.tokens[-1:])


class TargetOnly(Schedule):
    """Takes over a schedule from its committed tokens and blocks in flight: its draft went down
    (`draft_down`), or speculation stopped paying (the draft is released at once)."""

    def __init__(self, previous: Schedule, draft_down: bool = True):
        super().__init__(previous.plan, previous.channel, previous.policy, previous.stats)
        self.tokens, self.in_flight, self.block_id = previous.tokens, previous.in_flight, previous.block_id
        self.draft_down = draft_down

    async def run(self):
        if self.draft_down:
            logger.warning(
                "[%s] draft worker down: going on target-only from %d committed tokens",
                self.plan.request_id,
                len(self.tokens),
            )
            self.channel.drop_draft()
        else:
            logger.info(
                "[%s] speculation stopped paying (acceptance %.2f): the target decodes the rest from %d "
                "committed tokens",
                self.plan.request_id,
                self.policy.rate,
                len(self.tokens),
            )
            await self.channel.release_draft()
        # The target answers what it has not verified yet `stale` and decodes the rest: the blocks
        # in flight get their verdict (or stale) first, in order, then the decoded tokens.
        await self.channel.decode(self.end)
        for block in self.in_flight:
            block.doomed = True  # (a stale answer is expected now)
        while self.in_flight:
            new_tokens = self.commit((await self.channel.next_event("verdict")).payload)
            if new_tokens:
                yield new_tokens
        async for new_tokens in decode_rest(self):
            yield new_tokens
