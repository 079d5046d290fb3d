"""The pipelined schedule's mirror of one request's draft branches (DESIGN §1), and the decisions
that need nothing but the mirror: where to fork, which forks pause, which branch a verdict keeps,
how much of its tokens the draft keeps on a resync, which forks are ready to go to the target as
prepared blocks, and which prepared block a verdict arms.

SpecBranch: at each of the main branch's unverified positions where the draft is unsure (its
token's probability under the policy's branch threshold), the schedule forks alternative
branches, one per next-best candidate, up to a budget of live branches. Each branch drafts a few
tokens past its fork point, in the same batched forward as every other branch. When a verdict
rejects the main branch at such a position, the branch starting with the target's correction is
promoted: its tokens are already drafted and go to the target at once, instead of the target
idling while the draft redrafts.

After every verdict the tree is pruned to the branches that agree with the committed tokens: if
the main branch agrees it goes on; else the longest branch that agrees is promoted; every other
branch is cancelled on the draft worker, which frees its KV slot. If none agrees, the main branch
is synced back to the committed tokens under a new epoch and drafting restarts.

Outcome-keyed (prepared) blocks: once a fork's drafting job ends and its fork point is in a block
in flight, its drafted tokens are queued on the target too, conditional on that block's verdict
emitting the fork's token there; the target runs the one made for the outcome it reached in its
next iteration, with no round trip through the coordinator.

This module sends nothing and counts nothing: the schedule (coordinator/pipeline.py) owns the
request's committed tokens, epoch and blocks in flight, turns what is decided here into commands
(fork, cancel, sync, verify) and counts the stats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specpipe.coordinator.schedules import ROOT_BRANCH, Block, block_holding


@dataclass
class BranchView:
    """The schedule's mirror of one draft branch."""

    tokens: list[int]  # full sequence, prompt included
    fork_at: int | None = None  # position of its first own token; None: main line
    epoch: int = 0  # epoch its unverified tokens were drafted in
    job_end: int = 0  # length its current drafting job runs to
    alternatives: dict[int, list[int]] = field(default_factory=dict)  # unsure position -> tokens to fork
    probs: dict[int, float] = field(default_factory=dict)  # unverified position -> the draft's probability
    forked: set[int] = field(default_factory=set)  # positions already forked (main line)
    stalled_at: int = -1  # length at which the drafter had nothing to propose
    rank: int = -1  # a fork: its token's rank among the alternatives at fork_at (0: the best)
    prepared: bool = False  # a fork: its block is queued on the target (conditional on its token)
    paused: bool = False  # a fork held back while the main line's next block is urgent (it drafts on later)
    report_by: float = 0.0  # until when the draft holds its tokens (time.monotonic; 0: every token at once)

    @property
    def drafting(self) -> bool:
        """Whether more of its tokens are to come (a paused fork's too: it drafts on later)."""
        return self.paused or self.job_end > len(self.tokens)

    def report_moved(self, report_by: float, now: float, slack: float) -> bool:
        """Whether its drafting job goes again because its held tokens must come sooner than it was
        told (`report_by`: the verdict is expected earlier by more than `slack`, or the target now
        waits for them: 0); not when they may wait longer (they come a little early then)."""
        return self.report_by > now and (not report_by or report_by < self.report_by - slack)


@dataclass
class Pruned:
    """What a verdict did to the tree: the branches to cancel on the draft (`forks_lost` of them
    forks), whether a fork was promoted to main line, and where a resynced main line keeps the
    draft's tokens up to (None: no resync)."""

    losers: list[int]
    forks_lost: int
    promoted: bool
    sync_keep: int | None


class BranchTree:
    """Every live branch of one request by id, and which is the main line."""

    def __init__(self, tokens: list[int]):
        self.branches = {ROOT_BRANCH: BranchView(list(tokens), job_end=len(tokens))}
        self.main = ROOT_BRANCH
        self.main_ids = {ROOT_BRANCH}  # every branch that was the main line (for its late tokens)
        self.next_branch_id = ROOT_BRANCH + 1

    @property
    def main_view(self) -> BranchView:
        return self.branches[self.main]

    def forks_to_make(self, committed: int, max_branches: int) -> list[tuple[int, int, int]]:
        """(position, rank, token) of each alternative of the main line to fork now: at its
        unverified unsure positions not forked yet, nearest first, while the budget of live branches
        lasts. The positions are marked forked."""
        view = self.main_view
        budget = max_branches - (len(self.branches) - 1)
        forks = []
        for position in sorted(view.alternatives):
            if budget <= 0:
                break
            if position < committed or position in view.forked:
                continue
            view.forked.add(position)
            for rank, token_id in enumerate(view.alternatives[position][:budget]):
                forks.append((position, rank, token_id))
                budget -= 1
        return forks

    def fork_ranks_at(self, position: int) -> list[int]:
        """The ranks of the forks at `position` (0: the draft's second choice there)."""
        return [view.rank for view in self.branches.values() if view.fork_at == position]

    def forks_to_pause(self, wanting: dict[int, int], cap: int) -> set[int]:
        """Of the branches `wanting` tokens (the main line among them), the forks past the nearest
        `cap` fork points (then the best ranks): they pause while the main line's next block is
        urgent (each fork's row slows its draft step)."""
        forks = [b for b in wanting if self.branches[b].fork_at is not None]
        if len(forks) <= cap or self.main not in wanting:
            return set()
        forks.sort(key=lambda b: (self.branches[b].fork_at, self.branches[b].rank))
        return set(forks[cap:])

    def add_fork(self, position: int, rank: int, token_id: int) -> int:
        """A new branch off the main line: its tokens up to `position`, then `token_id`."""
        view = self.main_view
        branch_id, self.next_branch_id = self.next_branch_id, self.next_branch_id + 1
        self.branches[branch_id] = BranchView(
            view.tokens[:position] + [token_id], fork_at=position, epoch=view.epoch, job_end=position + 1, rank=rank
        )
        return branch_id

    def prune(self, tokens: list[int], start: int) -> Pruned:
        """Keep the branches that agree with the committed `tokens` from `start` on; the main line
        goes on if it agrees, else the longest that agrees is promoted, else the main line is
        rolled back to `tokens` (the draft keeps its tokens up to the first that differs: the
        correction's position, earlier when it had not drafted as far as tokens the target decoded
        by itself)."""
        committed, length = tokens[start:], len(tokens)
        agree = {b for b, view in self.branches.items() if view.tokens[start:length] == committed}
        if self.main in agree or not agree:
            survivor = self.main
        else:
            survivor = max(agree, key=lambda b: len(self.branches[b].tokens))
        losers = [b for b in self.branches if b != survivor and b not in agree]
        forks_lost = sum(self.branches[b].fork_at is not None for b in losers)
        for branch_id in losers:
            del self.branches[branch_id]
        promoted, self.main = survivor != self.main, survivor
        self.main_ids.add(survivor)
        view = self.branches[survivor]
        view.fork_at, view.paused = None, False  # (promoted: it is the main line now)
        sync_keep = None
        if survivor not in agree:
            keep = min(len(view.tokens), length - 1)
            sync_keep = next((i for i in range(start, keep) if view.tokens[i] != tokens[i]), keep)
            view.tokens, view.job_end = list(tokens), length
            # (its forks were cancelled: the redrafted positions fork afresh)
            view.alternatives, view.probs, view.forked = {}, {}, set()
        else:  # the verified positions are no branch points any more
            view.alternatives = {p: a for p, a in view.alternatives.items() if p >= length}
            view.probs = {p: prob for p, prob in view.probs.items() if p >= length}
            view.forked = {p for p in view.forked if p >= length}
        return Pruned(losers, forks_lost, promoted, sync_keep)

    def ready_to_prepare(self, live: list[Block], next_token_at: float) -> list[tuple[int, BranchView, Block]]:
        """(branch, view, holder) of every fork whose position is in a main-line block in flight
        (`holder`) and whose block is due: its drafting job has ended, or its next token would come
        (at `next_token_at`) after the holder's verdict. Each is marked prepared."""
        ready = []
        for branch_id, view in self.branches.items():
            at = view.fork_at
            if at is None or view.prepared or len(view.tokens) <= at + 1:
                continue
            holder = block_holding(at, live)
            if holder is None or (view.drafting and next_token_at < holder.done_at):
                continue
            view.prepared = True
            ready.append((branch_id, view, holder))
        return ready


def arm_prepared(in_flight: list[Block], head: Block, tokens: list[int], rejected: bool) -> Block | None:
    """After `head`'s verdict (committed `tokens`; `rejected`: it rejected a draft token), as the
    target sees it: the block prepared for this outcome (queued after `head`, its start and token
    match the committed tokens) is on the main line now (the target verifies it next: returned);
    the others whose fork point is decided, or all of them past a rejection, are doomed (the target
    answers them stale)."""
    armed = None
    for block in in_flight:
        if not block.conditional or block.doomed:
            continue
        if block.after == head.block_id and block.start == len(tokens) and block.expect == tokens[-1]:
            block.conditional, armed = False, block
        elif rejected or block.start <= len(tokens):
            block.doomed = True
    return armed
