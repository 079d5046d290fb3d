"""The target decoding by itself while it waits for a block (Decode.until_block), driven
in-process with real protobuf commands over the tiny target: the prompt's forward decodes the
first token; after a rejection the target decodes until a block comes; a block that starts behind
decoded tokens is verified past them or answered stale; the default sampling rule fills only a
request's first token, always before any block, and the tokens keep the target's law.
"""

import pytest
import torch

from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.sampling import SamplingParams, logits_to_probs
from engine_commands import fill, greedy, make_engine, one_request, prefill, step, verify
from goodness import P_VALUE_THRESHOLD, chi_square_power, chi_square_pvalue
from tiny import fresh_logits, store_logits

ATOL = 1e-4


@pytest.mark.parametrize("first_block", ["after the forward", "before the forward"])
def test_a_prompt_filled_at_the_start_decodes_the_first_token_in_its_own_forward(models, first_block):
    """Prefill with Decode.until_block to one token past the prompt (a pipelined request's start,
    `--idle-decode` auto): the prompt's forward decodes the target's first token (one forward, the
    whole prompt, no hold), and the draft's first block, cut at the prompt's end, is verified past
    it. A block already queued when the forward is planned goes with the prompt instead (the fill
    is until a block comes): the same tokens either way."""
    model, reference = models
    engine = make_engine(model)
    prompt = [5, 9, 14, 3, 8, 2]
    expected = greedy(reference, prompt, 5)
    prefill(engine, "r", prompt)
    fill(engine, "r", len(prompt) + 1)
    if first_block == "before the forward":
        verify(engine, "r", len(prompt), expected[:4], emit_bonus=False)
        verdicts, figures = step(engine)
        assert not verdicts["r"].decoded and verdicts["r"].num_accepted == 4
        assert figures["batch_tokens"] == len(prompt) + 4, "prompt and block in one forward"
        assert engine.requests["r"].tokens == prompt + expected[:4]
        return
    verdicts, figures = step(engine)
    assert verdicts["r"].decoded and verdicts["r"].next_token_id == expected[0]
    assert figures["batch_tokens"] == len(prompt), "the whole prompt in one forward, its first token decoded"
    assert not engine.ready(), "one token: then it waits for the block"
    verify(engine, "r", len(prompt), expected[:4], emit_bonus=False)  # drafted from the prompt meanwhile
    verdicts, figures = step(engine)
    assert verdicts["r"].num_accepted == 4 and figures["batch_tokens"] == 1 + 3, "verified past the decoded token"
    assert engine.requests["r"].tokens == prompt + expected[:4]


@pytest.mark.parametrize("sampling", ["greedy", "drafter-invariant"])
def test_after_a_rejection_the_target_decodes_by_itself_until_a_block_comes(models, sampling):
    """Decode.until_block after a rejected block: the target decodes the request by itself, one
    `decoded` verdict per iteration, the token a verify would emit there (greedy: its argmax;
    drafter-invariant: the same coupled draw), up to the length asked; a block that comes ends it."""
    model, _ = models
    engine = make_engine(model)
    prompt = [4, 8, 15, 16]
    fields = {
        "greedy": {},
        "drafter-invariant": {"temperature": 1.0, "drafter_invariant": True, "seed": 5, "noise_vocab": 256},
    }[sampling]
    engine.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=prompt, sampling=pb.Sampling(**fields))), [])
    # The reference: the same request decoded by the target alone (Decode), in a second engine.
    alone = make_engine(model)
    alone.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=prompt, sampling=pb.Sampling(**fields))), [])
    alone.handle(pb.Command(decode=pb.Decode(request_id="r", max_length=len(prompt) + 6)), [])
    expected = []
    while alone.ready():
        expected.append(step(alone)[0]["r"].next_token_id)
    assert len(expected) == 6
    wrong = (expected[0] + 1) % 250
    verify(engine, "r", len(prompt), [wrong, 7], emit_bonus=False)
    rejected = step(engine)[0]["r"]
    assert (rejected.num_accepted, rejected.next_token_id, rejected.decoded) == (0, expected[0], False)
    assert not engine.ready(), "without being asked, the target waits for the next block"
    fill(engine, "r", len(prompt) + 3)
    decoded = []
    while engine.ready():
        verdict = step(engine)[0]["r"]
        assert verdict.decoded and verdict.block_id == 0 and verdict.num_accepted == 0
        decoded.append(verdict.next_token_id)
    assert decoded == expected[1:3], "it decodes up to max_length, the tokens a verify would emit"
    fill(engine, "r", len(prompt) + 6)
    verify(engine, "r", len(prompt) + 3, expected[3:5], emit_bonus=False, block_id=2)
    assert step(engine)[0]["r"].block_id == 2 and not engine.ready(), "a block that comes ends it"
    assert engine.requests["r"].tokens == prompt + expected[:5]


def test_under_the_default_rule_only_the_first_token_may_be_filled(models):
    """Under the default rule a decoded token is another draw than a verify's, so whether to decode
    it must be settled before any of the request's draws: only its first token, in the prompt's
    forward, seeded or not; two tokens, or a token later, are refused, naming why."""
    model, _ = models
    engine = make_engine(model)
    sampling = pb.Sampling(temperature=1.0, seed=5)
    engine.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=[4, 8, 15], sampling=sampling)), [])
    with pytest.raises(ValueError, match="greedy or drafter-invariant request, or a request's first token"):
        fill(engine, "r", 5)  # two tokens
    fill(engine, "r", 4)
    assert step(engine)[0]["r"].decoded
    with pytest.raises(ValueError, match="greedy or drafter-invariant"):
        fill(engine, "r", 5)  # no longer its first token


@pytest.mark.parametrize("case", ["agrees", "disagrees", "covered"])
def test_a_block_that_starts_behind_decoded_tokens_is_verified_past_them_or_stale(models, case):
    """The target decoded by itself while the block was on its way, so the block starts behind
    the committed end. If its first tokens are the decoded ones, only the rest is verified (in the
    same forward's budget: the skipped tokens are not fed) and num_accepted counts from the
    block's start; if they differ, or nothing of it is left, it is answered stale. The result is
    greedy decoding either way, and the cache matches a fresh forward."""
    model, engine, prompt, expected = one_request(models, 8)
    reference = models[1]
    start = len(prompt)
    verify(engine, "r", start, [(expected[0] + 1) % 250], emit_bonus=False)
    assert step(engine)[0]["r"].next_token_id == expected[0]
    fill(engine, "r", start + 3)
    assert step(engine)[0]["r"].decoded  # expected[1], decoded by itself
    # The block cut when the committed end was start + 1 (after the correction).
    block = {
        "agrees": expected[1:5],
        "disagrees": [(expected[1] + 1) % 250] + expected[2:5],
        "covered": expected[1:2],
    }[case]
    verify(engine, "r", start + 1, block, emit_bonus=False, block_id=2, expect_last_token=expected[0], after_block_id=1)
    items, figures = engine.step()
    verdict = items[0][1]
    state = engine.requests["r"]
    if case == "agrees":
        assert len(items) == 1 and not verdict.stale and verdict.block_id == 2 and verdict.num_accepted == 4
        assert figures["batch_tokens"] == 1 + 3, "the decoded token and the three left, not the skipped one"
        assert state.tokens == prompt + expected[:5]
    else:  # answered stale, and in the same iteration it goes on by itself (up to max_length)
        assert verdict.stale and verdict.block_id == 2 and items[1][1].decoded and len(items) == 2
        assert state.tokens == prompt + expected[:3] and not engine.ready()
    torch.testing.assert_close(
        store_logits(model, engine.store, state.slot, min(state.cached, len(state.tokens) - 1), state.tokens),
        fresh_logits(reference, state.tokens),
        atol=ATOL,
        rtol=0,
    )


def test_a_sampled_request_decodes_its_first_token_before_a_queued_block(models):
    """Under the default rule the first token is decoded in the prompt's forward even when the
    draft's first block is already queued (for greedy it would go with the prompt instead): which
    of the two decides the token must not hang on the block's timing. The block is verified past
    the decoded token when it starts with it, and answered stale (in the same iteration) otherwise:
    over a few seeds, both happen."""
    model, reference = models
    engine = make_engine(model)
    prompt = [5, 9, 14, 3, 8, 2]
    top = torch.topk(fresh_logits(reference, prompt), 3).indices.tolist()
    seen = set()
    for seed in range(12):
        request_id = f"r{seed}"
        sampling = pb.Sampling(temperature=1.0, top_k=3, seed=seed)
        command = pb.Prefill(request_id=request_id, token_ids=prompt, handle=seed + 1, sampling=sampling)
        engine.handle(pb.Command(prefill=command), [])
        fill(engine, request_id, len(prompt) + 1)
        verify(engine, request_id, len(prompt), top[:2], emit_bonus=True, branch_id=0, epoch=1)
        for i in range(2):  # (q: any law the block's tokens could come from)
            q = torch.nn.functional.one_hot(torch.tensor(top[i]), 300).float()
            engine.table.add([((seed + 1, 0, 1, len(prompt) + i), q)])
        items, figures = engine.step()
        decoded = engine.requests[request_id].tokens[len(prompt)]
        assert items[0][1].decoded and figures["batch_tokens"] == len(prompt), "the prompt's forward decodes it"
        if decoded != top[0]:
            assert len(items) == 2 and items[1][1].stale and items[1][1].block_id == 1
        else:
            assert len(items) == 1
            items, figures = engine.step()
            assert items[0][1].block_id == 1 and figures["batch_tokens"] == 2, "verified past the decoded token"
            assert items[0][1].num_accepted >= 1  # (counted from the block's start)
        assert not engine.requests[request_id].verifies
        seen.add(decoded == top[0])
        engine.handle(pb.Command(release=pb.Release(request_id=request_id)), [])
    assert seen == {True, False}


# Trials per case of the law test, and the power it must have against the law of broken plumbing.
NUM_TRIALS = 1200
MIN_POWER = 0.99
# The draft's law in the law test, over the target's three likeliest tokens: far from the target's.
DRAFT_LAW = (0.7, 0.2, 0.1)


@pytest.mark.parametrize("first_block", ["queued before the forward", "after the decoded token"])
def test_the_first_two_tokens_of_filled_sampled_requests_follow_the_target_law(models, first_block):
    """Seeded statistics: NUM_TRIALS requests (temperature 1, top-k 3; seeds 0...) decode their first token in the prompt's forward while the draft's first block
    [d1, d2] (d1 from DRAFT_LAW over the target's top 3, d2 the same given d1, their q on the table)
    comes before or after that forward. When d1 is the decoded token, the block is verified past
    it; otherwise it is stale, and a block redrafted from the decoded token is verified. The joint
    law of the two tokens is the target's, and the samples reject the law of an unverified second
    token (power checked)."""
    model, reference = models
    engine = make_engine(model)
    prompt, n = [5, 9, 14, 3, 8, 2], 6
    params = SamplingParams(temperature=1.0, top_k=3)
    cache = {}

    def laws(prefix):
        """(the target's law after prompt + prefix, the draft's q there) as float64 [300]."""
        if prefix not in cache:
            p = logits_to_probs(fresh_logits(reference, prompt + list(prefix)), params).double()
            q = torch.zeros(300, dtype=torch.float64)
            q[torch.topk(p, 3).indices] = torch.tensor(DRAFT_LAW, dtype=torch.float64)
            cache[prefix] = p, q
        return cache[prefix]

    generator = torch.Generator().manual_seed(1234)

    def draw(q):
        return int(torch.multinomial(q, 1, generator=generator))

    def send_block(request_id, handle, start, tokens, block_id, epoch):
        verify(engine, request_id, start, tokens, emit_bonus=False, block_id=block_id, branch_id=0, epoch=epoch)
        rows = [((handle, 0, epoch, start + i), laws(tuple(committed[: start - n + i]))[1].float()) for i in range(2)]
        engine.table.add(rows[: len(tokens)])

    counts = {}
    for trial in range(NUM_TRIALS):
        request_id, handle = f"r{trial}", trial + 1
        sampling = pb.Sampling(temperature=1.0, top_k=3, seed=trial)
        engine.handle(
            pb.Command(prefill=pb.Prefill(request_id=request_id, token_ids=prompt, handle=handle, sampling=sampling)),
            [],
        )
        fill(engine, request_id, n + 1)
        d1 = draw(laws(())[1])
        d2 = draw(laws((d1,))[1])
        committed = [d1]  # (the prefix each q of the block is the draft's at)
        if first_block == "queued before the forward":
            send_block(request_id, handle, n, [d1, d2], 1, 1)
        state = engine.requests[request_id]
        for _ in range(4):  # (decode, block, redrafted block: a run that needs more hangs somewhere)
            if len(state.tokens) >= n + 2:
                break
            items, _ = engine.step()
            stale = any(verdict.stale for _, verdict, _ in items)
            if len(state.tokens) == n + 1 and (
                stale or first_block == "after the decoded token" and not state.verifies
            ):
                if stale or state.tokens[n] != d1:  # redrafted from the decoded token
                    committed = [state.tokens[n]]
                    send_block(request_id, handle, n + 1, [draw(laws(tuple(committed))[1])], 2, 2)
                else:
                    send_block(request_id, handle, n, [d1, d2], 1, 1)
        assert len(state.tokens) >= n + 2, f"trial {trial}: stuck at {len(state.tokens) - n} tokens"
        outcome = tuple(state.tokens[n : n + 2])
        counts[outcome] = counts.get(outcome, 0) + 1
        engine.handle(pb.Command(release=pb.Release(request_id=request_id)), [])

    joint, unverified = {}, {}
    p0, _ = laws(())
    for first in torch.nonzero(p0).flatten().tolist():
        p1, q1 = laws((first,))
        for second in torch.nonzero(p1).flatten().tolist():
            joint[first, second] = float(p0[first] * p1[second])
            unverified[first, second] = float(p0[first] * q1[second])
    outcomes = list(joint)
    assert set(counts) <= set(joint), "a token the target's top-3 forbids"
    observed = [counts.get(o, 0) for o in outcomes]
    assert chi_square_pvalue(observed, [joint[o] for o in outcomes]) > P_VALUE_THRESHOLD
    broken = [unverified[o] for o in outcomes]
    assert chi_square_power([joint[o] for o in outcomes], broken, NUM_TRIALS) > MIN_POWER
    assert chi_square_pvalue(observed, broken) < P_VALUE_THRESHOLD
