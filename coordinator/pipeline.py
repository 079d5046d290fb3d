"""The pipelined schedules: PEARL-style pipelining and SpecBranch branches (DESIGN §1).

While the target verifies a block, the draft keeps drafting past the end of everything in flight,
assuming it will be accepted. The schedule mirrors every live draft branch (its tokens, and the
alternatives worth forking at each of its unsure positions) from the draft's steps, so it can cut
the next block the moment the target needs one, with no round trip to the draft.

Blocks are cut just in time: the next block goes to the target behind the one it verifies when it
is full, or when the draft's next token would arrive after the target is expected to be free (the
expected finish comes from the fitted verify-cost line); an idle target gets a block as soon as a
few tokens are drafted. When the target is shared by many requests (its batches full), drafting
ahead only wastes the draft's time: the policy's lookahead (`DraftPolicy.lookahead_blocks`) then
keeps at most one block in flight, as the sequential schedule does.

SpecBranch: at the main line's unsure positions the schedule forks alternative branches, and a
verdict that rejects the main line where a branch foresaw it promotes that branch; a fork's drafted
tokens may wait on the target as a block prepared for that outcome (the branch tree, pruning and
prepared blocks: coordinator/branches.py). Rollback-aware, when asked (`--main-lookahead N`): past
its first unverified unsure position the main branch drafts only N more tokens.

Two blocks may be in flight: the next block is queued on the target behind the one it is
verifying, marked with the block whose verdict it assumes and the token it assumes at its start,
so the target goes from one to the next without waiting for the coordinator. If the first is not
fully accepted, the queued one is answered `stale` (nothing computed) and dropped here.

Forks cost the main line: every row of a draft step slows the step. So while the request has the
workers to itself and the main line's next block is short of full with room on the target (it is
what the target verifies next), only the nearest `urgent_fork_rows` forks draft beside it; the
others pause (a Draft of 0 tokens) and draft on once that block is queued (`held_forks`).

Prepared blocks: the target checks every queued block against its own verdict; the one made for
the outcome it reached runs in its next iteration, the others are answered stale in the same
iteration. Here the verdict arms that block (it joins the main line; `arm_prepared`) and the
branch is promoted as before.

Sampling stays exact: a promoted branch starts with exactly the token the rejection sampler
emitted (it agrees with the committed tokens), and the q sent for its tokens are those the draft
computed when it drafted them, keyed by its branch and epoch.
"""

from __future__ import annotations

import logging
import time

from specpipe.blocks import left_to_verify
from specpipe.modes import Mode
from specpipe.coordinator.branches import BranchTree, BranchView, arm_prepared
from specpipe.coordinator.schedules import Block, Schedule, block_holding
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.trace import trace

logger = logging.getLogger(__name__)

# One coordinator-to-worker message, in seconds (loopback ZeroMQ): the slack of just-in-time cuts.
HOP_S = 0.0005
# Until costs are measured: a verify and a draft step, in seconds.
DEFAULT_VERIFY_S, DEFAULT_DRAFT_STEP_S = 0.010, 0.001


class Pipelined(Schedule):
    def __init__(self, plan, channel, policy, stats):
        super().__init__(plan, channel, policy, stats)
        self.branching = plan.mode == Mode.SPECBRANCH
        self.tree = BranchTree(self.tokens)
        # Since when the target waits for a block after a rejection nothing foresaw (not filled).
        self.waiting_since: float | None = None
        # When the prompt's forward is expected to end, where it decodes the first token (`start`).
        self.start_done_at = 0.0

    async def run(self):
        await self.start()
        self.epoch = 1
        await self.keep_drafting()
        while True:
            await self.maybe_send_block()
            event = await self.channel.next_event("draft_tokens", "verdict")
            if event.kind == "draft_tokens":
                for token in self.observe_draft(event):
                    if token.epoch == self.epoch and token.branch_id in self.tree.branches:
                        await self.on_draft_token(token)
                    elif token.branch_id in self.tree.main_ids and token.token_id >= 0:
                        # Drafted on the main line before a resync or promotion reached the draft.
                        self.stats.main_rolled_back_tokens += 1
            else:
                new_tokens = await self.on_verdict(event.payload)
                if new_tokens:
                    await self.maybe_send_block()  # (before the client's stream is written: RequestRun)
                    yield new_tokens
                self.stop_if_unpaid()

    async def start(self) -> None:
        """Start the request on both workers. Where the policy fills waits (`fills_start`), the
        prompt's forward decodes the first token (Decode.until_block, in the prefill's message: one
        forward): the draft's first block, drafted meanwhile, is verified past it (`on_decoded`).
        Otherwise the first block goes as soon as a few tokens are drafted (the target looks idle), and the
        target holds the prompt for it, to feed both in one forward, for at most what a forward of
        its own would cost."""
        if self.fills_start():
            await self.prefill()
            await self.fill(1)
            forward_s = self.policy.model.verify_seconds(len(self.tokens)) or DEFAULT_VERIFY_S
            self.start_done_at = time.monotonic() + HOP_S + forward_s
        else:
            await self.prefill(hold_s=self.policy.model.verify_seconds(1) or DEFAULT_VERIFY_S)

    def live(self) -> list[Block]:
        """The main line's blocks in flight (not doomed, not waiting on an outcome)."""
        return [block for block in self.in_flight if not block.doomed and not block.conditional]

    # -- drafting ---------------------------------------------------------------------------------
    def anchor(self) -> int:
        """The end of everything in flight (assuming it is accepted): the draft keeps one block
        past it."""
        return max([len(self.tokens)] + [block.start + len(block.token_ids) for block in self.live()])

    async def keep_drafting(self) -> None:
        """Make every live branch draft up to its horizon: the main branch a block past the
        anchor, an alternative branch its lookahead past its fork point. A branch whose job ends
        short of its horizon gets a longer one before it stops (a new job replaces the old), so
        the draft never idles waiting for the coordinator."""
        wanting = self.wanting()
        held = self.held_forks(wanting)
        paused = []
        for branch_id in wanting:
            view = self.tree.branches[branch_id]
            if branch_id in held:
                if view.drafting and not view.paused:
                    paused.append(branch_id)
                view.job_end, view.paused = len(view.tokens), True
            else:
                view.paused = False
        if paused:  # (a job of no tokens: the draft stops drafting them for now)
            await self.channel.draft_tokens(
                paused, self.epoch, max_tokens=0, min_confidence=0.0, num_candidates=0, send_probs=False
            )
        now, live = time.monotonic(), self.live()
        jobs: dict[tuple[int, int, float], list[int]] = {}  # (tokens to go, end, report_by) -> branches
        for branch_id, horizon in wanting.items():
            view = self.tree.branches[branch_id]
            if branch_id in held:
                continue
            report_by = self.report_by(view, live, now)
            if view.job_end < horizon:
                jobs.setdefault((horizon - len(view.tokens), horizon, report_by), []).append(branch_id)
            elif view.drafting and view.report_moved(report_by, now, HOP_S):
                jobs.setdefault((0, 0, report_by), []).append(branch_id)  # (its reports only)
        holding = self.policy.hold_draft_reports
        for (need, end, report_by), branch_ids in jobs.items():
            for branch_id in branch_ids:
                view = self.tree.branches[branch_id]
                view.job_end, view.report_by = max(view.job_end, end), report_by
            await self.channel.draft_tokens(
                branch_ids,
                self.epoch,
                need,
                self.policy.min_confidence,
                self.policy.branch_width,
                self.sends_probs,
                report_in_s=max(0.0, report_by - now) if report_by else 0.0,
                end_position=end if holding else 0,
                reports_only=not need,
            )

    def wanting(self) -> dict[int, int]:
        """{branch: its horizon} of every branch with tokens still to draft (not stalled)."""
        anchor = self.anchor()
        main_horizon = min(self.end, anchor + self.policy.block_length())
        if self.branching and self.policy.main_lookahead is not None:  # rollback-aware: hedge past a likely break
            unsure = [p for p in self.tree.main_view.alternatives if p >= len(self.tokens)]
            if unsure:
                main_horizon = min(main_horizon, max(anchor, min(unsure) + 1 + self.policy.main_lookahead))
        wanting = {}
        for branch_id, view in self.tree.branches.items():
            horizon = (
                main_horizon if view.fork_at is None else min(self.end, view.fork_at + 1 + self.policy.branch_lookahead)
            )
            if len(view.tokens) < horizon and view.stalled_at != len(view.tokens):
                wanting[branch_id] = horizon
        return wanting

    def report_by(self, view: BranchView, live: list[Block], now: float) -> float:
        """Until when the draft may hold a branch's tokens (time.monotonic; 0: report each at once):
        a step before the verdict they wait for (the main line: of the last block in flight, when
        its next block is cut just in time; a fork: of the block holding its fork point, when it is
        prepared just in time); from then on every token comes at once, as without holding. Never
        while the target waits for this request's next block. The main line's branch points wait
        too: forked a few steps later, served A/B 1.03x against reporting them at once (1.01x)."""
        if not (self.policy.hold_draft_reports and live):
            return 0.0
        holder = block_holding(view.fork_at, live) if view.fork_at is not None else None
        t_draft = self.policy.model.t_draft or DEFAULT_DRAFT_STEP_S
        by = (holder or live[-1]).done_at - t_draft - HOP_S
        return by if by > now else 0.0

    def held_forks(self, wanting: dict[int, int]) -> set[int]:
        """Of the branches `wanting` tokens, the forks that pause now: while the main line's next
        block is short of full and there is room for it on the target (the target verifies it
        next), only the nearest `urgent_fork_rows` fork points draft (`BranchTree.forks_to_pause`).
        The others draft on once the block is sent (a paused fork is still prepared just in time
        for its holder's verdict)."""
        cap = self.policy.urgent_fork_rows()
        if cap is None or len(self.live()) >= self.policy.lookahead_blocks():
            return set()
        return self.tree.forks_to_pause(wanting, cap)

    async def on_draft_token(self, token: worker_pb2.DraftToken) -> None:
        view = self.tree.branches[token.branch_id]
        if token.token_id < 0:  # its job ended with no token (the drafter had none)
            view.job_end = view.stalled_at = len(view.tokens)
            return
        assert token.position == len(view.tokens), (
            f"branch {token.branch_id}: token at {token.position}, mirror has {len(view.tokens)}"
        )
        view.tokens.append(token.token_id)
        view.probs[token.position] = token.prob
        view.epoch = token.epoch
        if token.branch_id == self.tree.main and token.position < len(self.tokens):  # catching up with decoded tokens
            if token.token_id != self.tokens[token.position]:
                self.stats.main_rolled_back_tokens += 1
                await self.prune(token.position)  # (it disagrees: resynced)
                await self.keep_drafting()
                return
            self.stats.kept_tokens += 1  # (it agrees: kept, in no block)
        alternatives = self.policy.fork_candidates(token.prob, token.candidate_ids, token.candidate_probs)
        if alternatives:
            view.alternatives[token.position] = alternatives
        if token.last:
            view.job_end = len(view.tokens)
        if token.branch_id == self.tree.main and alternatives:
            await self.fork_where_unsure()
        elif view.fork_at is not None or any(v.paused for v in self.tree.branches.values()):
            await self.send_prepared()  # (a paused fork is prepared just in time, as the main line drafts)

    async def fork_where_unsure(self) -> None:
        """Fork the main branch's alternatives at its unverified unsure positions, nearest first,
        while the branch budget lasts (SpecBranch)."""
        forks = self.tree.forks_to_make(len(self.tokens), self.policy.max_branches)
        for position, rank, token_id in forks:
            branch_id = self.tree.add_fork(position, rank, token_id)
            await self.channel.fork(self.tree.main, branch_id, position, [token_id])
            self.stats.branches_forked += 1
            self.stats.drafted_tokens += 1  # its first token: proposed, kept only on a hit
        if forks:
            await self.keep_drafting()

    # -- verification -----------------------------------------------------------------------------
    async def maybe_send_block(self) -> None:
        """Send the main branch's next block: to an idle target once a few tokens are drafted (or
        the main branch stopped); behind a block in flight once full, or just in time."""
        live = self.live()
        if len(live) >= self.policy.lookahead_blocks() or (live and not live[-1].token_ids):
            return
        view = self.tree.main_view
        start = self.anchor()
        stop = min(start + self.policy.block_length(), self.end)
        if stop <= start:
            return  # everything up to the end is in flight
        block_ids = view.tokens[start:stop]
        if not block_ids:
            if not live and view.stalled_at == len(view.tokens) == start:  # the drafter has nothing here:
                self.waiting_since = None
                await self.send_verify(Block(start=start, epoch=view.epoch), emit_bonus=True)  # the target goes on
            return  # (else more tokens are on their way)
        now = time.monotonic()
        if len(block_ids) < stop - start and view.drafting:
            deadline = self.send_deadline(live, now)
            if deadline is None:  # an idle target: a few tokens are worth a forward
                if len(block_ids) < self.policy.send_length():
                    return
            elif now + (self.policy.model.t_draft or DEFAULT_DRAFT_STEP_S) + HOP_S < deadline:
                return  # the next token still comes in time
        forward_s = self.policy.model.forward_seconds(len(block_ids) + 1) or DEFAULT_VERIFY_S
        begins = max(now + HOP_S, live[-1].done_at if live else 0.0, self.target_free_at(now) or 0.0)
        block = Block(
            start=start, token_ids=block_ids, branch_id=self.tree.main, epoch=view.epoch, done_at=begins + forward_s
        )
        if self.waiting_since is not None:  # the first block after a rejection nothing foresaw
            self.policy.model.observe_redraft_wait(now - self.waiting_since)
            self.waiting_since = None
        await self.send_verify(
            block,
            emit_bonus=False,
            expect_last_token=view.tokens[start - 1] if live else None,
            after=live[-1] if live else None,
        )
        trace("due", self.plan.request_id, block.block_id, f"{block.done_at:.6f}")  # (the cut's clock)
        await self.send_prepared()
        await self.keep_drafting()

    async def send_prepared(self) -> None:
        """Outcome-keyed blocks: queue on the target the drafted tokens of every fork whose position
        is in a main-line block in flight, conditional on the fork's token: the target verifies it
        right after that block's verdict if the verdict emits that token there (start and last token
        match), with no round trip through the coordinator, and otherwise answers it stale. Sent
        once the fork's drafting job has ended, or just in time: when its next token would come
        after that block's verdict (the rest of the fork follows as the next block on a hit)."""
        if not self.policy.prepare_branch_blocks:
            return
        next_token_at = time.monotonic() + (self.policy.model.t_draft or DEFAULT_DRAFT_STEP_S) + HOP_S
        for branch_id, view, holder in self.tree.ready_to_prepare(self.live(), next_token_at):
            at = view.fork_at
            block = Block(
                start=at + 1,
                token_ids=view.tokens[at + 1 :],
                branch_id=branch_id,
                epoch=view.epoch,
                conditional=True,
                expect=view.tokens[at],
            )
            await self.send_verify(block, emit_bonus=False, expect_last_token=block.expect, after=holder)

    def send_deadline(self, live: list[Block], now: float) -> float | None:
        """The latest moment to cut the next block and still have it in the target's next forward:
        the end of this request's block in flight; with none, the end of the forward in progress
        when the target is busy with other requests (its next forward starts then, taking what is
        queued); None when the target is idle."""
        if live:
            return live[-1].done_at
        return self.target_free_at(now)

    def target_free_at(self, now: float) -> float | None:
        """When the target's forward in progress should end (its next starts then, taking what
        is queued), or None when it is idle: by the iteration clock, and not before the end of the
        prompt's forward that decodes the first token (its start goes by no other clock)."""
        if not self.channel.target_busy():
            return None
        return max(self.policy.model.iteration_end(now), self.start_done_at)

    async def on_verdict(self, verdict: worker_pb2.Verdict) -> list[int]:
        if verdict.decoded:
            return await self.on_decoded(verdict)
        head = self.in_flight[0]
        start = len(self.tokens)
        new_tokens = self.commit(verdict)
        if verdict.stale:
            return []
        forked_ranks = None
        if verdict.num_accepted < len(head.token_ids):
            at = head.start + verdict.num_accepted
            main = self.tree.main_view
            rejected = main.probs.get(at)
            if rejected is not None:  # (a promoted branch's first token has none)
                self.policy.observe_rejected_prob(rejected)
            for block in self.in_flight:
                if not block.conditional:
                    block.doomed = True  # the target will answer them stale
            # The main line's tokens past the verified block go too (commit counted the block's).
            self.stats.main_rolled_back_tokens += max(0, len(main.tokens) - (head.start + len(head.token_ids)))
            forked_ranks = self.tree.fork_ranks_at(at)
        armed = arm_prepared(self.in_flight, head, self.tokens, rejected=verdict.num_accepted < len(head.token_ids))
        if armed is not None:
            trace("arm", self.plan.request_id, armed.block_id)
        live = self.live()
        if live:  # the target is on the next block now
            forward_s = self.policy.model.forward_seconds(len(live[0].token_ids) + 1) or DEFAULT_VERIFY_S
            live[0].done_at = time.monotonic() + forward_s
            trace("due", self.plan.request_id, live[0].block_id, f"{live[0].done_at:.6f}")
        epoch_before = self.epoch
        hit_rank = await self.prune(start)
        if verdict.next_token_id >= 0:
            self.count_kept(len(self.tokens) - 1, epoch_before)
        assert armed is None or armed.branch_id == self.tree.main, "the prepared block's branch is the main line"
        self.stats.prepared_hits += armed is not None
        if forked_ranks:
            self.stats.on_forked_rejection(forked_ranks, hit_rank)
        if forked_ranks is not None and not live and self.epoch != epoch_before:
            await self.fill_or_wait()  # nothing foresaw this rejection: the draft redrafts from scratch
        await self.keep_drafting()
        return new_tokens

    async def fill_or_wait(self) -> None:
        """After a rejection no branch foresaw (the main line resynced, nothing queued holds), the
        target waits for the redrafted block: the sync's hop, the draft's first steps, the block's
        hop. Where that wait is longer than a forward of its own (the policy's call, from the waits
        measured), it decodes as many tokens as fit by itself meanwhile (Decode.until_block), if
        the request's decoded token is the one a verify would emit (greedy and drafter-invariant):
        the block, when it comes, is verified past the tokens decoded so. Otherwise the wait is
        measured."""
        count = self.policy.fill_tokens() if self.plan.sampling.drafter_free else 0
        trace("unforeseen", self.plan.request_id, count)
        if count:
            await self.fill(count)
        else:
            self.waiting_since = time.monotonic()

    async def on_decoded(self, verdict: worker_pb2.Verdict) -> list[int]:
        """A token the target decoded by itself while it waited for a block (Decode.until_block):
        commit it, as a verdict of an empty block. If the main line drafted
        that position, it goes on when it has that token (a fork that has it is promoted), else it
        is resynced; if it has not drafted it yet, it drafts on, its token checked when it comes
        (`on_draft_token`), so a draft catching up is never restarted. A block in flight whose
        first tokens are not the decoded ones, and every block behind it, will be answered stale."""
        start = len(self.tokens)
        new_tokens = self.commit(verdict)
        main = self.tree.main_view
        drafted, epoch_before = len(main.tokens) > start, self.epoch
        if drafted:
            forked_ranks = []
            if main.tokens[start] != new_tokens[0]:
                self.stats.main_rolled_back_tokens += len(main.tokens) - start
                forked_ranks = self.tree.fork_ranks_at(start)
            hit_rank = await self.prune(start)
            if forked_ranks:  # (not a rejection: no verify; the forks' ranks count all the same)
                self.stats.on_fork_point_decided(forked_ranks, hit_rank)
        doomed = set()  # (a block queued behind a doomed one assumes its verdict: doomed too)
        for block in self.in_flight:
            if not block.doomed and not block.conditional:
                stale = left_to_verify(block.start, block.token_ids, self.tokens) is None
                block.doomed = stale or block.after in doomed
            if block.doomed:
                doomed.add(block.block_id)
        if drafted:
            self.count_kept(start, epoch_before)
        await self.keep_drafting()
        return new_tokens

    def count_kept(self, position: int, epoch_before: int) -> None:
        """The target emitted (or decoded) the token at `position`, and the main line had drafted
        it there. If the line was kept (or a branch promoted by it: the epoch is still
        `epoch_before`, no resync), that drafted token is kept, not rolled back, unless a block in
        flight holds it (its verdict counts it as accepted)."""
        if self.epoch == epoch_before and block_holding(position, self.live()) is None:
            self.stats.kept_tokens += 1

    async def prune(self, start: int) -> int | None:
        """Keep the branches that agree with the committed tokens; promote or resync main
        (`BranchTree.prune`); cancel the rest on the draft. Returns the promoted fork's rank (None:
        the main line went on, or was resynced)."""
        pruned = self.tree.prune(self.tokens, start)
        hit_rank = self.tree.main_view.rank if pruned.promoted else None
        for _ in range(pruned.forks_lost):  # forks cancelled: they did not pay
            self.policy.observe_fork(hit=False)
        if pruned.promoted:
            self.stats.branches_hit += 1
            self.policy.observe_fork(hit=True)
        if pruned.losers:
            await self.channel.cancel(pruned.losers)
        if pruned.sync_keep is not None:  # nothing agrees: main rolled back to the committed tokens
            self.epoch += 1
            keep = pruned.sync_keep
            await self.channel.sync(self.tree.main, keep_length=keep, append=self.tokens[keep:])
            trace("sync", self.plan.request_id, self.epoch)
        if self.branching:
            await self.fork_where_unsure()
        return hit_rank
