"""The draft-length policy: the model-free acceptance model recovers the acceptance rate from
truncated-geometric accepted lengths, fits the verify cost line, and picks the block length that
maximises expected throughput; each policy kind switches what it should."""

import random

import pytest

from specpipe.config import PolicyConfig
from specpipe.coordinator.acceptance_model import (
    BRANCH_CAPTURE,
    BRANCH_MIN_SEEN,
    BRANCH_PRIOR,
    BRANCH_WINDOW,
    FILL_EXPLORE,
    FILL_MAX_TOKENS,
    FORK_BOUND_Z,
    FORK_EXPLORE,
    FORK_MIN_HIT_RATE,
    FORK_MIN_SEEN,
    FORK_WINDOW,
    AcceptanceModel,
    wilson_upper,
)
from specpipe.coordinator.policy import MIN_VERDICTS_TO_STOP, DraftPolicy
from specpipe.modes import Mode


def simulate(model: AcceptanceModel, rate: float, length: int, blocks: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for _ in range(blocks):
        accepted = 0
        while accepted < length and rng.random() < rate:
            accepted += 1
        model.observe_block(length, accepted)


@pytest.mark.parametrize("rate", [0.3, 0.6, 0.9])
def test_acceptance_rate_estimate_recovers_the_truth(rate):
    model = AcceptanceModel()
    simulate(model, rate, length=4, blocks=3000)
    assert model.rate() == pytest.approx(rate, abs=0.05)


def test_verify_cost_line_is_fitted_exactly_on_linear_data():
    model = AcceptanceModel()
    for fed in [1, 2, 3, 5, 8, 2, 5]:
        model.observe_verify(fed, 0.004 + 0.001 * fed)
    assert model.verify_seconds(4) == pytest.approx(0.008)
    assert model.verify_seconds(10) == pytest.approx(0.014)


def costed_model(rate: float, t_draft: float, t_fixed: float, t_token: float) -> AcceptanceModel:
    model = AcceptanceModel()
    simulate(model, rate, length=4, blocks=3000)
    for fed in range(1, 12):
        model.observe_verify(fed, t_fixed + t_token * fed)
    model.observe_draft_step(t_draft)
    return model


def test_best_length_grows_with_acceptance_and_cheap_drafting():
    sure = costed_model(0.95, t_draft=0.001, t_fixed=0.008, t_token=0.0003)
    unsure = costed_model(0.3, t_draft=0.001, t_fixed=0.008, t_token=0.0003)
    assert sure.best_length(10, pipelined=False) > unsure.best_length(10, pipelined=False)
    assert sure.best_length(10, pipelined=True) >= unsure.best_length(10, pipelined=True)
    # Brute force agrees with the closed forms.
    a = sure.rate()
    serial = [(1 - a ** (k + 1)) / (1 - a) / (k * 0.001 + 0.008 + 0.0003 * (k + 1)) for k in range(1, 11)]
    assert sure.best_length(10, pipelined=False) == 1 + serial.index(max(serial))


def test_best_length_defaults_to_the_most_until_costs_are_known():
    assert AcceptanceModel().best_length(6, pipelined=True) == 6


def test_adaptive_length_only_in_pipelined_modes():
    model = costed_model(0.3, t_draft=0.001, t_fixed=0.008, t_token=0.0003)
    config = PolicyConfig(kind="adaptive", num_draft_tokens=8)
    assert DraftPolicy(config, "sequential", model).block_length() == 8
    assert DraftPolicy(config, "pipelined", model).block_length() == model.best_length(8, pipelined=True) < 8


def test_policy_kinds():
    fixed = DraftPolicy(PolicyConfig(kind="fixed", num_draft_tokens=5), "specbranch")
    assert fixed.min_confidence == 0.0 and fixed.block_length() == 5 and fixed.branch_width == 2
    pipelined = DraftPolicy(PolicyConfig(kind="confidence"), "pipelined")
    assert pipelined.min_confidence == 0.0 and pipelined.branch_width == 0
    specbranch = DraftPolicy(PolicyConfig(kind="confidence", min_confidence=0.4), "specbranch")
    assert specbranch.min_confidence == 0.0  # pipelined modes never end a block on confidence
    sequential = DraftPolicy(PolicyConfig(kind="confidence", min_confidence=0.4), "sequential")
    assert sequential.min_confidence == 0.4
    predictor = DraftPolicy(PolicyConfig(kind="predictor", num_draft_tokens=6), "specbranch")
    predictor.observe(4, 2, predicted_accept_length=2.4)
    assert predictor.block_length() == 3
    predictor.observe(4, 4, predicted_accept_length=9.0)
    assert predictor.block_length() == 6


def test_branch_candidates_filter_and_cap():
    policy = DraftPolicy(PolicyConfig(branch_width=2, min_branch_prob=0.1), "specbranch")
    assert policy.branch_candidates([5, 6, 7, 8], [0.3, 0.05, 0.2, 0.15]) == [5, 7]
    assert DraftPolicy(PolicyConfig(), "sequential").branch_candidates([5], [0.9]) == []


def test_the_candidate_bar_is_lower_while_a_request_has_the_workers_to_itself():
    """Forks cost only idle draft time while the target's batches hold one request: the bar is
    min_branch_prob_alone then, min_branch_prob once others share the batches (and before any
    forward is seen)."""
    policy = DraftPolicy(PolicyConfig(branch_width=2, min_branch_prob=0.1, min_branch_prob_alone=0.02), "specbranch")
    candidates = ([5, 6, 7], [0.3, 0.05, 0.01])
    assert policy.branch_candidates(*candidates) == [5]  # nothing measured yet
    for _ in range(30):
        policy.model.observe_forward(rows=1, tokens=7, seconds=0.017)
    assert policy.branch_candidates(*candidates) == [5, 6]
    for _ in range(30):
        policy.model.observe_forward(rows=8, tokens=40, seconds=0.05)
    assert policy.branch_candidates(*candidates) == [5]


def test_forks_are_capped_beside_an_urgent_main_line_only_while_a_request_is_alone():
    """urgent_fork_rows applies while the target's batches hold one request (its forks are then
    most of a draft step), in specbranch only; not before a forward is measured nor once others
    share the batches."""
    policy = DraftPolicy(PolicyConfig(urgent_fork_rows=2), "specbranch")
    assert policy.urgent_fork_rows() is None  # nothing measured yet
    for _ in range(30):
        policy.model.observe_forward(rows=1, tokens=7, seconds=0.017)
    assert policy.urgent_fork_rows() == 2
    assert DraftPolicy(PolicyConfig(urgent_fork_rows=None), "specbranch", policy.model).urgent_fork_rows() is None
    assert DraftPolicy(PolicyConfig(urgent_fork_rows=2), "pipelined", policy.model).urgent_fork_rows() is None
    for _ in range(30):
        policy.model.observe_forward(rows=8, tokens=40, seconds=0.05)
    assert policy.urgent_fork_rows() is None


def test_fork_candidates_only_at_unsure_tokens_in_specbranch():
    config = PolicyConfig(branch_width=2, min_branch_prob=0.1, branch_confidence=0.8, max_branches=4)
    policy = DraftPolicy(config, "specbranch")
    assert policy.fork_candidates(0.6, [5, 6, 7], [0.3, 0.05, 0.2]) == [5, 7]
    assert policy.fork_candidates(0.85, [5, 6, 7], [0.3, 0.05, 0.2]) == []  # sure enough
    assert DraftPolicy(config, "pipelined").fork_candidates(0.2, [5], [0.5]) == []
    assert DraftPolicy(PolicyConfig(max_branches=0), "specbranch").fork_candidates(0.2, [5], [0.5]) == []


def test_learnt_branch_threshold_flags_most_rejections():
    """--branch-confidence auto: the prior until enough rejections are seen, then the BRANCH_CAPTURE
    quantile of the rejected tokens' draft probabilities, over a sliding window."""
    model = AcceptanceModel()
    policy = DraftPolicy(PolicyConfig(branch_width=1, min_branch_prob=0.0), "specbranch", model)
    assert policy.branch_threshold() == BRANCH_PRIOR
    for prob in (0.1, 0.2, 0.3, 0.4)[: BRANCH_MIN_SEEN - 1]:
        model.observe_rejected_prob(prob)
    assert policy.branch_threshold() == BRANCH_PRIOR
    rng = random.Random(0)
    probs = [rng.random() * 0.5 for _ in range(BRANCH_WINDOW)]  # a draft that is unsure where it is wrong
    for prob in probs:
        model.observe_rejected_prob(prob)
    threshold = policy.branch_threshold()
    flagged = sum(prob < threshold for prob in probs) / len(probs)
    assert abs(flagged - BRANCH_CAPTURE) <= 1 / BRANCH_WINDOW
    assert policy.fork_candidates(threshold - 0.01, [7], [0.2]) == [7]
    assert policy.fork_candidates(threshold + 0.01, [7], [0.2]) == []
    for _ in range(BRANCH_WINDOW):  # the window forgets: now the draft is confidently wrong
        model.observe_rejected_prob(0.9)
    assert policy.branch_threshold() == 0.9
    fixed = DraftPolicy(PolicyConfig(branch_confidence=0.3), "specbranch", model)
    assert fixed.branch_threshold() == 0.3  # a number on the command line wins


def test_forks_that_do_not_pay_are_turned_down_per_kind_of_request():
    """Under FORK_MIN_HIT_RATE promoted forks (sampled requests, where the rejection sampler's
    correction is rarely the draft's next-best token), surely (the upper end of the rate's Wilson
    interval is under), specbranch forks at one branch point in FORK_EXPLORE only; greedy
    requests, judged apart, keep forking; hits turn it back on."""
    model = AcceptanceModel()
    config = PolicyConfig(branch_confidence=0.9, branch_width=1, min_branch_prob=0.0)
    sampled = DraftPolicy(config, "specbranch", model, greedy=False)
    greedy = DraftPolicy(config, "specbranch", model, greedy=True)
    assert sampled.fork_candidates(0.5, [7], [0.3]) == [7]  # nothing known yet: fork
    for _ in range(FORK_MIN_SEEN):
        sampled.observe_fork(hit=False)
    assert model.fork_hit_rate(False) == 0.0 and model.fork_hit_rate(True) is None
    # 0 of 40 is what a rate of 0.1 shows one time in 70: not sure enough to stop forking
    assert all(sampled.fork_candidates(0.5, [7], [0.3]) == [7] for _ in range(20))
    misses = FORK_MIN_SEEN
    while wilson_upper(0, misses, FORK_BOUND_Z) >= FORK_MIN_HIT_RATE:
        sampled.observe_fork(hit=False)
        misses += 1
    assert misses == 73  # 1.96 standard errors: 0 of 73 puts the rate under 0.05
    forked = sum(bool(sampled.fork_candidates(0.5, [7], [0.3])) for _ in range(10 * FORK_EXPLORE))
    assert forked == 10
    assert all(greedy.fork_candidates(0.5, [7], [0.3]) == [7] for _ in range(20))
    for index in range(FORK_WINDOW):  # a fifth of forks promoted now
        sampled.observe_fork(hit=index % 5 == 0)
    assert model.fork_hit_rate(False) == pytest.approx(0.2)
    assert all(sampled.fork_candidates(0.5, [7], [0.3]) == [7] for _ in range(20))


def test_branch_threshold_is_learnt_apart_for_greedy_and_sampled_requests():
    model = AcceptanceModel()
    greedy = DraftPolicy(PolicyConfig(), "specbranch", model, greedy=True)
    sampled = DraftPolicy(PolicyConfig(), "specbranch", model, greedy=False)
    for index in range(BRANCH_WINDOW):
        greedy.observe_rejected_prob(0.2 + 0.001 * index)
        sampled.observe_rejected_prob(0.9)
    assert greedy.branch_threshold() < 0.5 < sampled.branch_threshold() == 0.9


def test_forwards_feed_the_cost_line_the_batch_and_the_iteration_clock():
    model = AcceptanceModel()
    for rows, tokens in [(8, 40), (8, 48), (16, 96), (8, 40), (16, 80)] * 20:
        model.observe_forward(rows, tokens, 0.007 + 0.0005 * tokens, now=100.0)
    assert model.verify_seconds(60) == pytest.approx(0.007 + 0.0005 * 60, rel=1e-6)
    assert 8 < model.batch_rows < 16 and 40 < model.batch_tokens < 96
    # The forward in progress ends one forward of the running mean batch after the last one ended.
    assert model.iteration_end(100.001) == pytest.approx(100.0 + model.verify_seconds(round(model.batch_tokens)))
    assert model.mean_forward_seconds() == pytest.approx(model.iteration_end(100.0) - 100.0)
    # A block's forward: the block and the other rows' share of the mean batch.
    others = model.batch_tokens * (model.batch_rows - 1) / model.batch_rows
    assert model.forward_seconds(500) == pytest.approx(0.007 + 0.0005 * round(others + 500))


def test_a_request_alone_is_timed_by_its_own_block():
    """Alone (one row a forward), a short block's forward is the verify line at its own tokens,
    not at the mean batch: here blocks of 9 tokens on average, and a block of 2 costs 3.5 ms less."""
    model = AcceptanceModel()
    for tokens in [9, 9, 8, 10, 9] * 20:
        model.observe_forward(1, tokens, 0.007 + 0.0005 * tokens, now=100.0)
    assert model.forward_seconds(2) == pytest.approx(0.007 + 0.0005 * 2, rel=1e-6)
    assert model.forward_seconds(9) - model.forward_seconds(2) == pytest.approx(0.0035, rel=1e-6)


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("pipelined", [False, True])
def test_best_length_maximises_throughput_of_the_whole_batch(rows, pipelined):
    """With B requests sharing each forward, a round costs the forward over all their blocks; the
    chosen length is the one with the most tokens per second for the batch (computed apart here)."""
    model = AcceptanceModel()
    model.counts[True] = [90.0, 10.0]  # greedy acceptance rate 0.9
    for _ in range(200):
        model.observe_forward(rows, rows * 5, 0.007 + 0.0004 * rows * 5)
        model.observe_forward(rows, rows * 9, 0.007 + 0.0004 * rows * 9)
        model.observe_draft_step(0.002)
    a, t_draft = 0.9, model.t_draft

    def batch_rate(k):
        forward = 0.007 + 0.0004 * rows * (k + 1)
        if pipelined:
            reject = 1 - a**k
            return rows * (a * (1 - a**k) / (1 - a) + reject) / (max(forward, k * t_draft) + reject * t_draft)
        return rows * ((1 - a ** (k + 1)) / (1 - a)) / (k * t_draft + forward)

    rates = [batch_rate(k) for k in range(1, 11)]
    assert model.best_length(10, pipelined) == 1 + rates.index(max(rates))


def test_acceptance_is_learnt_apart_for_greedy_and_sampled_requests_and_per_request():
    model = AcceptanceModel()
    for _ in range(200):
        model.observe_block(4, 4, greedy=True)  # greedy: everything accepted
        model.observe_block(4, 0, greedy=False)  # sampled: nothing
    assert model.rate(True) > 0.9 and model.rate(False) < 0.1
    request = DraftPolicy(PolicyConfig(), Mode.SPECBRANCH, model, greedy=True)
    assert request.rate == pytest.approx(model.rate(True))  # the kind's rate as its prior
    for _ in range(40):
        request.observe(4, 0)  # this request's text does not suit the draft
    assert request.rate < 0.3


def costed_batch_model(rate_greedy: float, t_draft: float) -> AcceptanceModel:
    model = AcceptanceModel()
    model.counts[True] = [100 * rate_greedy, 100 * (1 - rate_greedy)]
    for tokens in (2, 5, 9):
        for _ in range(30):
            model.observe_forward(1, tokens, 0.007 + 0.0005 * tokens)
            model.observe_draft_step(t_draft)
    return model


@pytest.mark.parametrize("mode", [Mode.SEQUENTIAL, Mode.SPECBRANCH])
def test_speculation_stops_paying_when_the_target_alone_is_faster(mode):
    """With a costly draft and a request whose tokens it rarely guesses, the target alone wins:
    after enough verdicts the policy says so; while it guesses well, it does not."""
    model = costed_batch_model(0.9, t_draft=0.006)
    poor = DraftPolicy(PolicyConfig(), mode, model, greedy=True)
    good = DraftPolicy(PolicyConfig(), mode, model, greedy=True)
    for _ in range(MIN_VERDICTS_TO_STOP):
        poor.observe(4, 0)
        good.observe(4, 4)
    assert not poor.speculation_pays() and good.speculation_pays()
    fixed = DraftPolicy(PolicyConfig(kind="fixed"), mode, model, greedy=True)
    for _ in range(MIN_VERDICTS_TO_STOP):
        fixed.observe(4, 0)
    assert fixed.speculation_pays(), "only the adaptive policies decide by the measured costs"


def test_the_target_fills_a_wait_only_where_the_redraft_takes_longer_than_its_own_forward():
    """--idle-decode auto: nothing until a wait is measured; then as many tokens as one-token
    forwards fit in the measured redraft wait (running mean; at most FILL_MAX_TOKENS) when at least
    one does, except one wait in FILL_EXPLORE (measured afresh); never while the target's batches
    hold other requests; on fills at least one token, off none, and only the pipelined modes fill."""
    model = AcceptanceModel()
    assert PolicyConfig().idle_decode == "auto"
    auto = DraftPolicy(PolicyConfig(idle_decode="auto"), Mode.SPECBRANCH, model)
    assert auto.fill_tokens() == 0
    for _ in range(20):
        model.observe_verify(1, 0.010)
        model.observe_verify(5, 0.014)
    model.observe_redraft_wait(0.008)  # shorter than a one-token forward (10 ms)
    assert auto.fill_tokens() == 0
    for _ in range(60):
        model.observe_redraft_wait(0.025)
    decisions = [auto.fill_tokens() for _ in range(3 * FILL_EXPLORE)]
    assert decisions.count(0) == 3 and set(decisions) == {0, 2}, "two forwards fit in 25 ms"
    for _ in range(60):
        model.observe_redraft_wait(0.200)
    assert max(auto.fill_tokens() for _ in range(3)) == FILL_MAX_TOKENS
    model.batch_rows = 4.0  # the target's batches hold four requests
    assert auto.fill_tokens() == 0
    assert DraftPolicy(PolicyConfig(idle_decode="on"), Mode.PIPELINED, AcceptanceModel()).fill_tokens() == 1
    assert DraftPolicy(PolicyConfig(idle_decode="off"), Mode.SPECBRANCH, model).fill_tokens() == 0
    assert DraftPolicy(PolicyConfig(idle_decode="on"), Mode.SEQUENTIAL, model).fill_tokens() == 0
    with pytest.raises(AssertionError, match="idle_decode"):
        PolicyConfig(idle_decode="sometimes")


def test_the_prompts_forward_decodes_the_first_token_unless_idle_decode_is_off():
    """At a request's start the target would wait for the draft's first block (the prompt held for
    it): with --idle-decode auto or on the prompt's forward decodes the first token instead, in the
    pipelined modes; auto only while the target's batches hold few requests (there the prompt
    waits for a forward anyway, and the first block would often miss it), unless asked to fill
    whatever the load (a seeded request under the default rule: its seed, not the load, must fix
    its first token); the sequential mode's prompt goes alone anyway: it always decodes then; off:
    never."""
    crowded = AcceptanceModel()
    crowded.batch_rows = 4.0
    for setting, mode, model, fills in (
        ("auto", Mode.SPECBRANCH, AcceptanceModel(), True),
        ("auto", Mode.PIPELINED, AcceptanceModel(), True),
        ("auto", Mode.SPECBRANCH, crowded, False),
        ("on", Mode.SPECBRANCH, crowded, True),
        ("off", Mode.SPECBRANCH, AcceptanceModel(), False),
        ("auto", Mode.SEQUENTIAL, crowded, True),
        ("off", Mode.SEQUENTIAL, AcceptanceModel(), False),
        ("on", Mode.AUTOREGRESSIVE, AcceptanceModel(), False),
    ):
        assert DraftPolicy(PolicyConfig(idle_decode=setting), mode, model).fills_start() is fills, (setting, mode)
    for setting, mode, fills in (
        ("auto", Mode.SPECBRANCH, True),
        ("off", Mode.SPECBRANCH, False),
        ("auto", Mode.AUTOREGRESSIVE, False),
    ):
        policy = DraftPolicy(PolicyConfig(idle_decode=setting), mode, crowded)
        assert policy.fills_start(whatever_the_load=True) is fills, (setting, mode)
