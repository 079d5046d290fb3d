"""The pipelined schedules across real processes: stale replies are dropped, sampling through
promoted branches keeps the target's distribution, and no branch outlives its request."""

from __future__ import annotations

import concurrent.futures
import itertools
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe import Client
from specpipe.coordinator.acceptance_model import BRANCH_MIN_SEEN, BRANCH_PRIOR
from specpipe.sampling import SamplingParams, logits_to_probs

from goodness import P_VALUE_THRESHOLD, chi_square_power, chi_square_pvalue
from tiny import PROMPTS


# Seeds per sampling test, and the power it must have at that count against each law of broken
# plumbing (computed from the same models).
NUM_SEEDS = 500
MIN_POWER = 0.99
# Of the specbranch requests, at least this share must go on through a promoted branch (about a
# third do with the flattened draft; forks are promoted at every rejection where one was made).
MIN_PROMOTED_SHARE = 0.15
CALL_TIMEOUT_S = 120.0  # a generous cap per request: a hang fails


def joint_law(
    target_dir,
    draft_dir,
    prompt_ids,
    sampling: SamplingParams,
    length: int,
    rule=lambda target_probs, draft_probs: target_probs,
    draft_sampling: SamplingParams | None = None,
) -> dict[tuple, float]:
    """The law of the first `length` sampled tokens, by enumeration, when each token follows
    `rule(target_probs, draft_probs)` given the ones before: by default the target's own law.
    `draft_sampling`: the law the draft draws from (default `sampling`)."""
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    joint = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, mass in joint.items():
            with torch.no_grad():
                ids = torch.tensor([prompt_ids + list(prefix)])
                probs = rule(
                    logits_to_probs(target(ids).logits[0, -1], sampling).double(),
                    logits_to_probs(draft(ids).logits[0, -1], draft_sampling or sampling).double(),
                )
            for token in torch.nonzero(probs).flatten().tolist():
                grown[prefix + (token,)] = mass * float(probs[token])  # float64 from here on
        joint = grown
    return joint


# Each token's law under broken plumbing (the unit tests' biased samplers, end to end).
BROKEN_RULES = {
    "draft tokens passed unverified": lambda target_probs, draft_probs: draft_probs,
    "ratio inverted (q over p)": lambda target_probs, draft_probs: torch.minimum(target_probs, draft_probs)
    + torch.clamp(draft_probs - target_probs, min=0.0),
}


# The coupling first: the fork policy is the server's, shared by all sampled requests, and its forks
# pay; after the Leviathan prompt's (which rarely hit) it would turn forking down.
# The last case draws the draft at 1.7 times the request's temperature (--draft-temperature-scale):
# the target must still judge each token by the q it was drawn from.
@pytest.mark.parametrize(
    "mode, drafter_invariant, scale",
    [
        ("pipelined", True, 1.0),
        ("pipelined", False, 1.0),
        ("specbranch", True, 1.0),
        ("specbranch", False, 1.0),
        ("specbranch", False, 1.7),
    ],
    ids=["pipelined-coupled", "pipelined-leviathan", "specbranch-coupled", "specbranch-leviathan", "specbranch-x1.7"],
)
def test_sampling_with_branches_follows_target_distribution(serve, tiny_models, mode, drafter_invariant, scale):
    """The joint law of the first 3 tokens (temperature 1, top-k 2: 8 outcomes) over NUM_SEEDS
    seeds, by each sampling rule: the default (Leviathan) and the drafter-invariant coupling.
    The pair makes promotions happen: the draft ranks every token as the target does, flatter
    (tiny.flatten), so where it is rejected the target's correction is its other top-2 token, which
    specbranch forked there (branch-confidence 0.9: every position is a branch point; branch-width
    1: that token): at least MIN_PROMOTED_SHARE of the specbranch requests go on through a promoted
    branch. The same samples reject the laws of broken plumbing, and the test has the power to.
    (A drafter that proposed its argmax on forked branches instead of sampling q, so that only
    promoted tokens are off, fails the Leviathan case: p ~ 1e-8.)"""
    flags = ("--draft-temperature-scale", str(scale)) if scale != 1.0 else ()
    server = serve("draft_flat", "--branch-confidence", "0.9", "--branch-width", "1", "--num-draft-tokens", "3", *flags)
    client = Client(server.addr, timeout=CALL_TIMEOUT_S)
    # Leviathan: a prompt after which the target is unsure, so the tokens that follow a promotion
    # carry the most of any bias of the promoted path; the coupling: one whose forks pay more (the
    # fork policy turns forking down for all sampled requests when they rarely hit).
    prompt_ids, sampling = PROMPTS[1 if drafter_invariant else 3], SamplingParams(temperature=1.0, top_k=2)
    models = tiny_models["target"], tiny_models["draft_flat"]
    drawn = SamplingParams(temperature=scale, top_k=2)  # the draft's law
    joint = joint_law(*models, prompt_ids, sampling, 3)
    outcomes = list(joint)
    counts = dict.fromkeys(outcomes, 0)
    promoted = forked = 0

    def run(seed):
        token_ids, _, last = client.complete(
            prompt_ids=prompt_ids,
            max_new_tokens=3,
            temperature=1.0,
            top_k=2,
            seed=seed,
            mode=mode,
            drafter_invariant=drafter_invariant,
        )
        return tuple(token_ids), last.stats

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for tokens, stats in pool.map(run, range(NUM_SEEDS)):
            counts[tokens] += 1  # KeyError: a sequence the target forbids
            promoted += stats.branches_hit > 0
            forked += stats.branches_forked
    print(
        f"\n[branches] {mode}, {'coupled' if drafter_invariant else 'leviathan'}: {promoted} of {NUM_SEEDS} "
        f"requests went on through a promoted branch ({forked} forked)"
    )
    if mode == "specbranch":
        assert promoted >= MIN_PROMOTED_SHARE * NUM_SEEDS and forked > promoted
    else:
        assert forked == 0
    observed = [counts[o] for o in outcomes]
    exact = [joint[o] for o in outcomes]
    assert chi_square_pvalue(observed, exact) > P_VALUE_THRESHOLD
    for name, rule in BROKEN_RULES.items():
        broken = joint_law(*models, prompt_ids, sampling, 3, rule, drawn)
        assert set(broken) <= set(joint), name
        broken = [broken.get(o, 0.0) for o in outcomes]
        assert chi_square_power(exact, broken, NUM_SEEDS) > MIN_POWER, name
        assert chi_square_pvalue(observed, broken) < P_VALUE_THRESHOLD, f"these samples fit: {name}"


# draft_same with test_serving's flags for it: the same server (one start fewer)
@pytest.mark.parametrize(
    "draft", [("draft",), ("draft_close",), ("draft_same", "--policy", "fixed", "--num-draft-tokens", "4")]
)
def test_no_branch_outlives_its_request(serve, draft):
    client = Client(serve(*draft).addr)
    for mode, prompt_ids in itertools.product(["pipelined", "specbranch"], PROMPTS[:2]):
        client.complete(prompt_ids=prompt_ids, max_new_tokens=30, mode=mode)
        deadline = time.monotonic() + 1.0
        while True:
            stats = client.stats()
            live = [(w.live_requests, w.live_branches) for w in stats.workers]
            if stats.live_requests == 0 and live == [(0, 0), (0, 0)] or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert stats.live_requests == 0 and live == [(0, 0), (0, 0)], (mode, live)


# Branches forked at many unsure positions, a fixed threshold: a server that promotes often.
PROMOTING = (
    "draft_close",
    *("--branch-confidence", "0.95", "--branch-width", "2", "--max-branches", "6"),
    *("--min-branch-prob", "0", "--num-draft-tokens", "8"),
)


@pytest.mark.parametrize("rollback_aware", [[], ["--main-lookahead", "1"]], ids=["main-runs-on", "main-lookahead-1"])
def test_greedy_promotes_branches_and_stays_exact(serve, hf_greedy, rollback_aware):
    """Greedy with a noisy draft: branches forked at many unsure positions (threshold 0.95,
    several per block, each its own cache length, batched in one forward) are promoted when the
    target's token is their first, and the output is still exactly Hugging Face greedy; also with
    the main branch held to one token past its first unsure position (rollback-aware)."""
    server = serve(*PROMOTING, *rollback_aware)
    client = Client(server.addr)
    forked = hits = 0
    for prompt_ids in PROMPTS:
        token_ids, _, last = client.complete(prompt_ids=prompt_ids, max_new_tokens=40, mode="specbranch")
        assert token_ids == hf_greedy(prompt_ids, 40), f"prompt {prompt_ids}"
        forked += last.stats.branches_forked
        hits += last.stats.branches_hit
    assert hits > 0 and forked > hits, (forked, hits)


def test_branch_threshold_is_learnt_from_rejections_and_reported(serve):
    """--branch-confidence auto (the default): the server learns the threshold from the draft's
    probabilities of the tokens the target rejected, and GetStats reports what it learnt; a fixed
    --branch-confidence is reported as such."""
    client = Client(serve("draft").addr)
    for prompt_ids in PROMPTS:
        client.complete(prompt_ids=prompt_ids, max_new_tokens=40, mode="specbranch")
    policy = client.stats().policy
    assert policy.branch_threshold_learnt
    assert policy.rejections_seen >= BRANCH_MIN_SEEN
    assert 0.0 < policy.branch_threshold <= 1.0 and policy.branch_threshold != BRANCH_PRIOR
    assert 0.0 < policy.acceptance_rate < 1.0 and policy.draft_step_s > 0 and policy.verify_s > 0
    for rate in (policy.fork_hit_rate, policy.sampled_fork_hit_rate):
        assert rate == -1.0 or 0.0 <= rate <= 1.0
    fixed = Client(serve(*PROMOTING).addr)  # (test_greedy_promotes_branches_and_stays_exact's server)
    fixed.complete(prompt_ids=PROMPTS[0], max_new_tokens=8, mode="specbranch")
    policy = fixed.stats().policy
    assert not policy.branch_threshold_learnt and policy.branch_threshold == pytest.approx(0.95)


def test_by_default_the_prompts_forward_decodes_the_first_token_and_stays_exact(serve, hf_greedy):
    """--idle-decode auto (the default): a speculative request's prompt goes to the target at once and
    its forward decodes the first token while the draft drafts the first block, which is verified
    past it (or answered stale, or dropped before it is sent, and the draft resynced): greedy output is still Hugging Face greedy,
    drafter-invariant sampling still the autoregressive tokens of the seed, and the requests report
    the tokens decoded so (also those of waits after rejections: that the start is asked to decode
    is tests/coordinator/test_schedules.py's). Under the default sampling rule a request, seeded or
    not, has its first token decoded so and no other (it fills no wait after a rejection: the law
    is tests/target_worker/test_fills.py's), and a seed still fixes its tokens. Off: the prompt
    waits for the first block, nothing is decoded."""
    coupled = {"temperature": 1.0, "drafter_invariant": True, "seed": 3, "max_new_tokens": 16}
    alone = {}  # prompt -> the target's own tokens of that seed
    filled = {}
    for setting in ("auto", "off"):
        client = Client(serve("draft", "--idle-decode", setting).addr)
        filled[setting] = 0
        for prompt_ids, mode in itertools.product(PROMPTS, ("sequential", "specbranch")):
            token_ids, _, last = client.complete(prompt_ids=prompt_ids, max_new_tokens=16, mode=mode)
            assert token_ids == hf_greedy(prompt_ids, 16), f"prompt {prompt_ids}, {mode}, {setting}"
            filled[setting] += last.stats.filled_tokens
            key = tuple(prompt_ids)
            if key not in alone:
                alone[key] = client.complete(prompt_ids=prompt_ids, mode="autoregressive", **coupled)[0]
            token_ids, _, last = client.complete(prompt_ids=prompt_ids, mode=mode, **coupled)
            assert token_ids == alone[key], f"prompt {prompt_ids}, {mode}, {setting}"
            filled[setting] += last.stats.filled_tokens
            seeded = []
            for seed in (None, 3, 3):
                sampled = {"temperature": 1.0, "max_new_tokens": 8} | ({"seed": seed} if seed is not None else {})
                token_ids, _, last = client.complete(prompt_ids=prompt_ids, mode=mode, **sampled)
                assert 1 <= len(token_ids) <= 8  # (an end-of-sequence token may end it)
                assert last.stats.filled_tokens == (setting == "auto"), f"prompt {prompt_ids}, {mode}, {setting}"
                seeded += [token_ids] if seed is not None else []
            assert seeded[0] == seeded[1], f"prompt {prompt_ids}, {mode}, {setting}: the seed fixes the tokens"
    assert filled["auto"] > 0 and filled["off"] == 0, filled


@pytest.mark.parametrize("mode", ["pipelined", "specbranch"])
def test_the_target_fills_the_wait_after_a_rejection_and_stays_exact(serve, hf_greedy, mode):
    """--idle-decode on: after each rejection nothing foresaw, the target decodes by itself while
    the draft redrafts, and the block that comes is verified past those tokens (or answered stale).
    Greedy output is still exactly Hugging Face greedy; drafter-invariant sampling still gives the
    autoregressive tokens of the same seed (the decoded token is the coupled draw a verify makes);
    and the requests report the tokens decoded so."""
    server = serve("draft", "--idle-decode", "on")
    client = Client(server.addr)
    filled = 0
    for prompt_ids in PROMPTS:
        token_ids, _, last = client.complete(prompt_ids=prompt_ids, max_new_tokens=40, mode=mode)
        assert token_ids == hf_greedy(prompt_ids, 40), f"prompt {prompt_ids}"
        filled += last.stats.filled_tokens
        coupled = {"temperature": 1.0, "drafter_invariant": True, "seed": 7, "max_new_tokens": 40}
        alone = client.complete(prompt_ids=prompt_ids, mode="autoregressive", **coupled)[0]
        token_ids, _, last = client.complete(prompt_ids=prompt_ids, mode=mode, **coupled)
        assert token_ids == alone, f"prompt {prompt_ids}"
        filled += last.stats.filled_tokens
    assert filled > 0, "the target never filled a wait"
