"""The schedules against fake workers (tests/coordinator/fake_workers.py): no processes, in
milliseconds, every seed another interleaving of draft steps and verdicts.

For every mode: the committed tokens equal the fake target's greedy continuation, whatever the
ordering; the counters hold their invariants (accepted <= verified <= drafted). Pipelined modes see
stale blocks (a block queued behind one that was not fully accepted is answered stale and
dropped); specbranch promotes branches; a draft that goes down mid-request hands the schedule's
committed tokens and blocks in flight to target-only decoding, which finishes exactly.
"""

from __future__ import annotations

import dataclasses

import asyncio
import time

import pytest

from specpipe.coordinator.channel import RequestChannel
from specpipe.coordinator.acceptance_model import AcceptanceModel
from specpipe.coordinator.policy import DraftPolicy, PolicyConfig
from specpipe.coordinator.scheduler import RequestPlan, RequestRun
from specpipe.coordinator.schedules import Block, RunStats, Schedule
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import SamplingParams

from fake_workers import FakeInbox, FakeWorkers, greedy

MODES = ["autoregressive", "sequential", "pipelined", "specbranch"]
PROMPT = [3, 1, 4, 1, 5]
MAX_NEW = 60
SEEDS = range(12)


def run(
    mode: str,
    seed: int,
    draft_down_after: int | None = None,
    policy: PolicyConfig | None = None,
    stalls: bool = False,
    model: AcceptanceModel | None = None,
    misleading: bool = False,
    slow_target: bool = False,
    prompt: list[int] = PROMPT,
    crossing: bool = False,
    sampling: SamplingParams = SamplingParams(),
    seeded: bool = False,
):
    """Run one request to the end: (its committed tokens, the RequestRun, the fake workers). The
    fake workers decide greedily whatever `sampling` says (it changes only what the schedule asks)."""
    workers = FakeWorkers(seed, draft_down_after, stalls, misleading, slow_target, crossing)
    plan = RequestPlan(
        request_id="r",
        prompt_ids=prompt,
        max_new_tokens=MAX_NEW,
        sampling=sampling,
        seed=seed,
        mode=mode,
        policy=policy or PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5),
        seeded=seeded,
    )
    channel = RequestChannel("r", workers.draft, workers.target, use_draft=mode != "autoregressive")
    channel.inbox = FakeInbox(workers)
    request = RequestRun(plan, channel, model or AcceptanceModel())

    async def collect():
        tokens = []
        async for new_tokens in request.tokens():
            tokens += new_tokens
            if len(tokens) >= MAX_NEW:
                break
        await request.release()
        return tokens[:MAX_NEW]

    return asyncio.run(collect()), request, workers


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", SEEDS)
def test_every_ordering_commits_the_target_greedy_tokens(mode, seed):
    tokens, request, _ = run(mode, seed)
    assert tokens == greedy(PROMPT, MAX_NEW)
    stats = request.stats
    assert stats.accepted_tokens <= stats.draft_tokens <= stats.drafted_tokens
    assert stats.rolled_back_tokens == stats.drafted_tokens - stats.accepted_tokens - stats.kept_tokens >= 0
    assert stats.branches_hit <= stats.branches_forked
    # A promoted branch's first token is the target's own: kept, not rolled back.
    assert stats.branches_hit <= stats.kept_tokens
    if mode == "autoregressive":
        assert stats.drafted_tokens == 0 and stats.verifications == MAX_NEW
    else:
        assert stats.accepted_tokens > 0


def test_pipelined_schedules_see_stale_blocks_and_specbranch_promotes_branches():
    stale = {mode: sum(run(mode, seed)[2].stale_answers for seed in SEEDS) for mode in ("pipelined", "specbranch")}
    assert stale["pipelined"] > 0 and stale["specbranch"] > 0
    hits = sum(run("specbranch", seed)[1].stats.branches_hit for seed in SEEDS)
    assert hits > 0
    assert sum(run("pipelined", seed)[1].stats.branches_forked for seed in SEEDS) == 0


@pytest.mark.parametrize("mode", ["sequential", "pipelined", "specbranch"])
@pytest.mark.parametrize("down_after", [1, 4, 9])
def test_draft_down_mid_request_finishes_target_only_and_exactly(mode, down_after):
    for seed in SEEDS[:4]:
        tokens, request, workers = run(mode, seed, draft_down_after=down_after)
        assert tokens == greedy(PROMPT, MAX_NEW), (seed, workers.commands[-8:])
        assert request.fell_back and workers.draft_down
        assert "target:decode" in workers.commands  # the target went on by itself


@pytest.mark.parametrize("mode", ["sequential", "pipelined", "specbranch"])
def test_rejections_and_what_they_cost_the_main_line_are_counted(mode):
    """Every rejection the target made is counted once; the main line's tokens it threw away are
    part of the rolled back tokens, and all of them without branches (sequential and pipelined:
    every drafted token is on the main line, also those that reach the coordinator after the
    resync); specbranch's per-rank counts add up to its hits."""
    for seed in SEEDS:
        _, request, workers = run(mode, seed)
        stats = request.stats
        assert stats.rejections == workers.rejections > 0
        assert stats.rejections <= stats.verifications
        assert stats.rejections <= stats.main_rolled_back_tokens <= stats.rolled_back_tokens
        if mode != "specbranch":
            assert stats.main_rolled_back_tokens == stats.rolled_back_tokens
        if mode == "specbranch":
            assert stats.rejections_at_fork <= stats.rejections
            assert sum(stats.rank_hits) == stats.branches_hit
            assert all(hits <= tried for hits, tried in zip(stats.rank_hits, stats.rank_tried))
            assert len(stats.rank_hits) <= len(stats.rank_tried)
            assert sum(stats.rank_tried) >= stats.rejections_at_fork
        else:
            assert stats.rejections_at_fork == stats.branches_hit == 0 and not stats.rank_tried
    tried = [sum(run("specbranch", seed)[1].stats.rank_tried[:1]) for seed in SEEDS]
    assert sum(tried) > 0, "no rejection ever met a forked branch"


@pytest.mark.parametrize("misleading", [False, True])
def test_with_budget_to_spare_every_rejection_meets_a_prepared_branch(misleading):
    """The fake draft is unsure exactly where it is wrong: with branches enough, every rejection
    finds a fork at its position, also at positions redrafted after a resync (they fork afresh).
    Where its best alternative is the target's token the fork holds it; `misleading`: at half of
    them it does not, the main line is resynced there. The target is slow: the draft runs ahead
    (forks past the rejection are cancelled with the main line's tokens). Without prepared blocks:
    a block verified at once after its fork point's verdict has had no forks of its own."""
    # Forks of a block's length (4): longer ones, in the misleading case, end unhit often enough
    # that the policy turns forking down as not paying (FORK_MIN_HIT_RATE), not what this is about.
    # No fills: a token the target decodes by itself decides a fork point too, with no rejection.
    policy = PolicyConfig(
        kind="fixed",
        num_draft_tokens=4,
        branch_confidence=0.5,
        max_branches=32,
        prepare_branch_blocks=False,
        branch_lookahead=4,
        idle_decode="off",
    )
    for seed in SEEDS:
        tokens, request, _ = run("specbranch", seed, policy=policy, misleading=misleading, slow_target=True)
        assert tokens == greedy(PROMPT, MAX_NEW)
        stats = request.stats
        assert stats.rejections > 0
        assert stats.rejections_at_fork == stats.rejections == stats.rank_tried[0], seed
        if misleading:
            assert 0 < stats.rank_hits[0] < stats.rank_tried[0], seed
        else:
            assert stats.rank_hits[0] == stats.rank_tried[0], seed


@pytest.mark.parametrize("misleading", [False, True])
def test_prepared_blocks_take_the_target_on_from_the_verdicts_it_was_made_for(misleading):
    """Each fork's drafted tokens are queued on the target conditional on its token: where the
    verdict emits it, the target verifies them next, with no round trip (a prepared hit), and
    answers the others stale; the output is the greedy output whatever the ordering of events.
    `misleading`: half of the forks hold a wrong token; their blocks are all answered stale."""
    # Forks of a block's length (4): a longer fork ends its drafting later, and at some orderings
    # every holder block is verified before it: nothing prepared, nothing answered stale.
    policy = PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5, max_branches=32, branch_lookahead=4)
    prepared = 0
    for seed in SEEDS:
        tokens, request, workers = run("specbranch", seed, policy=policy, misleading=misleading, slow_target=True)
        assert tokens == greedy(PROMPT, MAX_NEW), seed
        stats = request.stats
        assert stats.prepared_hits <= stats.branches_hit, seed
        assert workers.stale_answers > 0, seed
        prepared += stats.prepared_hits
    assert prepared > 0, "no verdict went on to a prepared block"
    off = dataclasses.replace(policy, prepare_branch_blocks=False)
    assert all(run("specbranch", seed, policy=off)[1].stats.prepared_hits == 0 for seed in SEEDS)


@pytest.mark.parametrize("paused", [False, True])
@pytest.mark.parametrize("verdict_in_s, sent", [(0.0, True), (10.0, False)])
def test_a_fork_still_drafting_is_prepared_just_in_time_for_its_holders_verdict(verdict_in_s, sent, paused):
    """A fork's block goes to the target once its drafting job ends, or earlier, with the tokens it
    has, when its next token would come after the verdict of the block holding its fork point: a
    shorter prepared block beats a round trip through the coordinator (the rest of the fork follows
    as the next block on a hit). Its holder's verdict far off, it drafts on. A paused fork
    (urgent_fork_rows: no job now) is one still drafting: it drafts on later."""
    from specpipe.coordinator.branches import BranchView
    from specpipe.coordinator.pipeline import Pipelined

    workers = FakeWorkers(0)
    plan = RequestPlan(
        request_id="r",
        prompt_ids=PROMPT,
        max_new_tokens=MAX_NEW,
        sampling=SamplingParams(),
        seed=0,
        mode="specbranch",
        policy=PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5),
    )
    channel = RequestChannel("r", workers.draft, workers.target, use_draft=True)
    schedule = Pipelined(plan, channel, DraftPolicy(plan.policy, "specbranch"), RunStats())
    holder = Block(start=5, token_ids=[7, 8, 9], done_at=time.monotonic() + verdict_in_s)
    schedule.in_flight.append(holder)
    fork = BranchView(PROMPT + [7, 40, 41, 42], fork_at=6, job_end=6 + 8)  # 3 of its 8 tokens drafted
    if paused:
        fork.job_end, fork.paused = len(fork.tokens), True
    schedule.tree.branches[2] = fork

    asyncio.run(schedule.send_prepared())
    assert fork.prepared == sent
    if sent:
        block = schedule.in_flight[-1]
        assert (block.start, block.token_ids, block.expect, block.conditional) == (7, [41, 42], 40, True)
        assert block.after == holder.block_id
    else:
        assert list(schedule.in_flight) == [holder]


def alone_model() -> AcceptanceModel:
    """A server-wide model that has seen the target's batches hold one request (urgent_fork_rows
    applies)."""
    model = AcceptanceModel()
    for _ in range(30):
        model.observe_forward(1, 5, 0.01)
    return model


def test_forks_pause_while_the_main_lines_next_block_is_urgent_and_draft_on_once_it_is_sent():
    """While the main line's next block is short of full and has room on the target, only the
    nearest `urgent_fork_rows` forks draft beside it (each fork's row slows the main line's draft
    step): the others get no job, those drafting are paused (a Draft of 0 tokens); once the block
    is queued the target's room is taken and they draft on, each to its horizon."""
    from specpipe.coordinator.branches import BranchView
    from specpipe.coordinator.pipeline import Pipelined

    workers = FakeWorkers(0)
    policy = PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5, branch_lookahead=4)
    plan = RequestPlan("r", PROMPT, MAX_NEW, SamplingParams(), seed=0, mode="specbranch", policy=policy)
    channel = RequestChannel("r", workers.draft, workers.target, use_draft=True)
    schedule = Pipelined(plan, channel, DraftPolicy(policy, "specbranch", alone_model()), RunStats())
    head = Block(start=5, token_ids=[7, 8, 9], done_at=time.monotonic() + 10)
    schedule.in_flight.append(head)
    schedule.tree.branches[0].tokens += [7, 8, 9, 10]  # one token of the next block drafted
    forks = {2: (7, 1), 3: (9, 0), 4: (6, 1), 5: (6, 0)}  # branch -> (fork point, rank); 2 and 3 drafting
    for branch_id, (at, rank) in forks.items():
        schedule.tree.branches[branch_id] = BranchView(
            schedule.tree.branches[0].tokens[:at] + [50 + branch_id], fork_at=at, rank=rank
        )
    workers.jobs = {2: [0, 3, 0.0, 2], 3: [0, 3, 0.0, 2]}
    schedule.tree.branches[2].job_end = schedule.tree.branches[3].job_end = 12

    asyncio.run(schedule.keep_drafting())
    assert sorted(workers.jobs) == [0, 4, 5]  # main, and the two nearest fork points (6: both ranks)
    assert schedule.tree.branches[2].paused and schedule.tree.branches[3].paused
    assert "draft:draft" in workers.commands

    schedule.in_flight.append(Block(start=8, token_ids=[10], done_at=time.monotonic() + 20))  # the block went
    asyncio.run(schedule.keep_drafting())
    assert sorted(workers.jobs) == [0, 2, 3, 4, 5]
    assert not any(view.paused for view in schedule.tree.branches.values())
    assert workers.jobs[2][1] == 7 + 1 + 4 - len(schedule.tree.branches[2].tokens)  # to its horizon


def test_behind_a_block_in_flight_the_draft_holds_its_reports_until_a_step_before_its_verdict():
    """Pipelined, --hold-draft-reports: behind a block in flight the main line's job tells the draft
    to hold its tokens until one draft step (and a hop) before that block's expected verdict, when
    the next block is cut just in time, and where the job ends (end_position: the schedule does not
    see the held tokens yet); with nothing in flight (the target waits for this block) every token
    comes at once. A verdict expected sooner moves only the moment (reports_only), a later one
    nothing; off, no job holds."""
    from specpipe.coordinator.pipeline import HOP_S, Pipelined

    def schedule_with(policy):
        workers = FakeWorkers(0)
        plan = RequestPlan("r", PROMPT, MAX_NEW, SamplingParams(), seed=0, mode="pipelined", policy=policy)
        channel = RequestChannel("r", workers.draft, workers.target, use_draft=True)
        schedule = Pipelined(plan, channel, DraftPolicy(policy, "pipelined", AcceptanceModel()), RunStats())
        schedule.policy.model.t_draft = 0.001
        return schedule, workers

    policy = PolicyConfig(kind="fixed", num_draft_tokens=4)
    schedule, workers = schedule_with(policy)
    asyncio.run(schedule.keep_drafting())  # nothing in flight
    first = workers.drafts[-1]
    assert first.report_in_s == 0 and first.end_position == len(PROMPT) + 4
    done_at = time.monotonic() + 0.050
    schedule.tree.branches[0].tokens += [7, 8, 9, 10]  # the block drafted, and sent
    schedule.in_flight.append(Block(start=len(PROMPT), token_ids=[7, 8, 9, 10], done_at=done_at))
    before = time.monotonic()
    asyncio.run(schedule.keep_drafting())
    job = workers.drafts[-1]
    assert job.end_position == len(PROMPT) + 8 and not job.reports_only
    assert done_at - 0.001 - HOP_S - time.monotonic() <= job.report_in_s <= done_at - 0.001 - HOP_S - before
    count = len(workers.drafts)
    schedule.in_flight[0].done_at = done_at + 0.010  # expected later: nothing goes
    asyncio.run(schedule.keep_drafting())
    assert len(workers.drafts) == count
    schedule.in_flight[0].done_at = done_at - 0.020  # sooner: the moment moves, the job stays
    asyncio.run(schedule.keep_drafting())
    moved = workers.drafts[-1]
    assert moved.reports_only and 0 < moved.report_in_s < job.report_in_s - 0.015
    assert workers.jobs[0][1] == 4  # (the job as it was)

    off, workers = schedule_with(dataclasses.replace(policy, hold_draft_reports=False))
    off.tree.branches[0].tokens += [7, 8, 9, 10]
    off.in_flight.append(Block(start=len(PROMPT), token_ids=[7, 8, 9, 10], done_at=done_at))
    asyncio.run(off.keep_drafting())
    assert all(d.report_in_s == 0 and d.end_position == 0 for d in workers.drafts)


def test_capped_forks_keep_every_ordering_exact():
    """urgent_fork_rows pausing and resuming forks (the request alone): the committed tokens are the
    target's greedy ones whatever the ordering, the counters keep their invariants, and paused forks
    are still hit."""
    policy = PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5, urgent_fork_rows=1)
    pauses = hits = 0
    for seed in SEEDS:
        tokens, request, workers = run(
            "specbranch", seed, policy=policy, model=alone_model(), slow_target=seed % 2 == 1, misleading=seed % 3 > 0
        )
        assert tokens == greedy(PROMPT, MAX_NEW), seed
        stats = request.stats
        assert stats.rolled_back_tokens == stats.drafted_tokens - stats.accepted_tokens - stats.kept_tokens >= 0
        assert stats.branches_hit <= stats.branches_forked
        pauses, hits = pauses + workers.pauses, hits + stats.branches_hit
    assert pauses > 0 and hits > 0


def test_a_prepared_block_verified_before_a_hand_over_is_committed_by_the_schedule_taking_over():
    """The draft went down (or speculation stopped) with a prepared block queued: the target may
    have verified it before the Decode reached it, and the target-only schedule, which marks every
    block in flight doomed and never arms one, must commit that verdict as the target did."""
    plan = RequestPlan(
        request_id="r",
        prompt_ids=[1, 2, 3],
        max_new_tokens=8,
        sampling=SamplingParams(),
        seed=0,
        mode="specbranch",
        policy=PolicyConfig(),
    )
    schedule = Schedule(plan, None, DraftPolicy(PolicyConfig(), "specbranch"), RunStats())
    head = Block(start=3, token_ids=[7, 8], block_id=1)
    prepared = Block(start=4, token_ids=[5, 6], conditional=True, expect=9, block_id=2, after=1)
    schedule.in_flight.extend([head, prepared])
    for block in schedule.in_flight:
        block.doomed = True  # (TargetOnly: a stale answer is expected now)
    assert schedule.commit(worker_pb2.Verdict(num_accepted=0, next_token_id=9, committed_length=4)) == [9]
    assert schedule.commit(worker_pb2.Verdict(num_accepted=2, next_token_id=-1, committed_length=6)) == [5, 6]
    assert schedule.tokens == [1, 2, 3, 9, 5, 6]


def test_the_draft_is_released_and_the_target_too():
    _, _, workers = run("specbranch", 0)
    assert workers.commands[-2:] == ["target:release", "draft:release"]


@pytest.mark.parametrize("mode", ["sequential", "pipelined", "specbranch"])
def test_a_drafter_with_nothing_to_propose_lets_the_target_go_on(mode):
    """Prompt lookup has no proposal where the text does not repeat: the schedule must not wait
    for one (the target decodes that position itself) nor ask the draft again and again."""
    for seed in SEEDS[:6]:
        tokens, request, workers = run(mode, seed, stalls=True)
        assert tokens == greedy(PROMPT, MAX_NEW)
        # Once told, the schedule does not ask there again (one more ask may cross the answer).
        repeats = max(workers.stalled.count(key) for key in workers.stalled)
        assert repeats <= 2, "the draft was asked again and again where it had said it had nothing"


@pytest.mark.parametrize("mode", ["sequential", "pipelined", "specbranch"])
def test_when_speculation_stops_paying_the_target_finishes_alone_and_the_draft_is_freed(mode):
    """A draft so slow (measured costs) that the target alone is faster: after the policy's
    minimum of verdicts the request hands over to target-only decoding, exactly."""
    model = AcceptanceModel()
    for tokens in (2, 5, 9):
        for _ in range(30):
            model.observe_forward(1, tokens, 0.007 + 0.0005 * tokens)
            model.observe_draft_step(0.05)  # 50 ms a draft step: never worth it
    tokens, request, workers = run(mode, 0, policy=PolicyConfig(kind="adaptive", num_draft_tokens=4), model=model)
    assert tokens == greedy(PROMPT, MAX_NEW)
    assert "target:decode" in workers.commands and not request.fell_back
    released = workers.commands.index("draft:release")
    assert released < len(workers.commands) - 2, "the draft was freed when speculation stopped, not at the end"


def test_totals_add_every_counter_and_ranks_rank_by_rank():
    totals = RunStats()
    first = RunStats(draft_tokens=4, accepted_tokens=3, rejections=1, rank_tried=[1], queue_seconds=0.5)
    second = RunStats(
        draft_tokens=6, rejections=2, rank_tried=[2, 1], rank_hits=[0, 1], committed_per_verification=[2, 3]
    )
    totals.add(first)
    totals.add(second)
    assert (totals.draft_tokens, totals.accepted_tokens, totals.rejections) == (10, 3, 3)
    assert (totals.rank_tried, totals.rank_hits, totals.queue_seconds) == ([3, 1], [0, 1], 0.5)
    assert totals.committed_per_verification == [0, 5]  # one entry per request: its sum


@pytest.mark.parametrize("mode", ["pipelined", "specbranch"])
@pytest.mark.parametrize("seed", SEEDS)
def test_the_target_filling_the_wait_after_a_rejection_keeps_every_ordering_exact(mode, seed):
    """With --idle-decode on, the target decodes by itself after a rejection nothing foresaw (the
    main line resynced, nothing queued holds), until a block comes; blocks then start behind those tokens (verified past them, or stale when
    the draft guessed otherwise) and a decoded token may promote a branch or resync the main line:
    whatever the ordering, the committed tokens are the target's greedy ones, and the counters
    keep their invariants."""
    policy = PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5, idle_decode="on")
    tokens, request, workers = run(mode, seed, policy=policy, slow_target=seed % 2 == 1, misleading=seed % 3 > 0)
    assert tokens == greedy(PROMPT, MAX_NEW)
    stats = request.stats
    assert stats.accepted_tokens <= stats.draft_tokens <= stats.drafted_tokens
    assert stats.rejections == workers.rejections
    assert stats.rejections <= stats.main_rolled_back_tokens <= stats.rolled_back_tokens
    # Drafted tokens equal to those the target decoded by itself are kept, not rolled back: without
    # branches, every token thrown away is the main line's.
    assert stats.branches_hit <= stats.kept_tokens
    if mode == "pipelined":
        assert stats.main_rolled_back_tokens == stats.rolled_back_tokens


@pytest.mark.parametrize("prompt", [PROMPT, PROMPT + [9]], ids=["draft wrong first", "draft right first"])
def test_the_sequential_prompt_decodes_the_first_token_and_a_block_that_misses_it_is_redrafted(prompt):
    """Sequential, --idle-decode auto (on alike): the prompt's forward decodes the first token while
    the draft drafts the first block; a block that starts with it is verified past it, one that
    does not (the fake draft is wrong at the end of the first prompt, right at the second's) is
    dropped and the draft resynced before any verify, its tokens rolled back. Off: nothing decoded.
    Exact either way, whatever the ordering."""
    for setting in ("auto", "on", "off"):
        policy = PolicyConfig(kind="fixed", num_draft_tokens=4, idle_decode=setting)
        for seed in SEEDS:
            tokens, request, workers = run("sequential", seed, policy=policy, prompt=prompt)
            assert tokens == greedy(prompt, MAX_NEW), (setting, seed)
            assert workers.fills == request.stats.filled_tokens == (setting != "off"), (setting, seed)
            assert workers.hold_seconds == 0.0
            first_verify = workers.commands.index("target:verify")
            dropped = workers.commands[:first_verify].count("draft:sync")
            assert dropped == (setting != "off" and prompt == PROMPT), (setting, seed)
            stats = request.stats
            assert stats.main_rolled_back_tokens == stats.rolled_back_tokens, "every drafted token is main line's"


@pytest.mark.parametrize("mode", MODES)
def test_answers_that_cross_the_schedules_commands_keep_every_mode_exact(mode):
    """The target's answer may be on its way while the schedule sends its next command (the fake's
    `crossing`): every mode still commits the target's greedy tokens. Sequential, with the first
    token decoded in the prompt's forward: a block sent before that token is read is verified past
    it, or answered stale when it does not start with it (the draft wrong at the first prompt's end),
    and the draft resynced."""
    stale = 0
    for prompt in (PROMPT, PROMPT + [9]):
        for seed in range(60 if mode == "sequential" else 12):
            tokens, _, workers = run(mode, seed, prompt=prompt, crossing=True, slow_target=True)
            assert tokens == greedy(prompt, MAX_NEW), (prompt, seed)
            stale += workers.stale_answers if prompt == PROMPT else 0
    assert mode != "sequential" or stale > 0, "no block crossed the decoded first token"


@pytest.mark.parametrize("mode", ["pipelined", "specbranch"])
def test_the_target_fills_waits_only_when_asked(mode):
    """On: over the seeds, the target decodes by itself in some waits after rejections (the test
    above covers the path) and at the start; auto, before any wait after a rejection is measured:
    only at the start, where the prompt goes alone, and its forward decodes the first token unless
    the first block is queued by then (no hold: the decode is until a block comes); off: never, the
    prompt waits for the first block."""
    fills, holds = {}, {}
    for setting in ("on", "off", "auto"):
        policy = PolicyConfig(kind="fixed", num_draft_tokens=4, branch_confidence=0.5, idle_decode=setting)
        runs = [run(mode, seed, policy=policy, misleading=True) for seed in SEEDS]
        fills[setting] = [workers.fills for _, _, workers in runs]
        holds[setting] = {workers.hold_seconds for _, _, workers in runs}
        for tokens, request, workers in runs:
            assert tokens == greedy(PROMPT, MAX_NEW) and request.stats.filled_tokens == workers.fills
            if setting != "off":  # the fill goes with the prefill (one loop turn: one message)
                to_target = [command for command in workers.commands if command.startswith("target:")]
                assert to_target[:2] == ["target:prefill", "target:decode"], workers.commands[:4]
    assert sum(fills["on"]) > sum(fills["auto"]) > 0 and sum(fills["off"]) == 0
    assert max(fills["auto"]) == 1, "auto: only the first token, before any wait is measured"
    assert holds["auto"] == holds["on"] == {0.0} and min(holds["off"]) > 0


@pytest.mark.parametrize("mode", ["pipelined", "specbranch"])
def test_under_load_a_seeded_sampled_request_still_decodes_its_first_token(mode):
    """Full batches (auto): a pipelined prompt waits for its first block instead of decoding its
    first token, unless the request is seeded and sampled by the default rule: there the decoded
    token is the target's own draw, not a verify's, and its seed, not the load, must fix it."""
    crowded = AcceptanceModel()
    crowded.batch_rows = 64.0
    for sampling, seeded, decodes in (
        (SamplingParams(), True, False),  # greedy: the same token either way
        (SamplingParams(temperature=1.0), False, False),
        (SamplingParams(temperature=1.0), True, True),
        (SamplingParams(temperature=1.0, drafter_invariant=True), True, False),
    ):
        tokens, _, workers = run(mode, 0, model=crowded, sampling=sampling, seeded=seeded)
        to_target = [command for command in workers.commands if command.startswith("target:")]
        assert (to_target[1] == "target:decode") is decodes, (sampling, seeded, workers.commands[:4])
        assert (workers.hold_seconds == 0) is decodes
        assert tokens == greedy(PROMPT, MAX_NEW)
