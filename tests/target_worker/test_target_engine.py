"""The target engine, driven in-process with real protobuf commands over tiny models.

Method: the engine's model is routed through the KV store; a twin with the same weights is the
plain reference. Checks: after any run of verifies (random blocks, with and without bonus) the
request's cache and committed tokens equal a fresh forward and its commits follow the target's
argmax; many requests are verified in ONE forward per iteration and each gets its own verdict;
budgets bound every forward; a long prompt is prefilled in chunks while other requests go on;
a prompt held for its first block goes in that block's forward; Decode runs the target alone and
answers queued verifies stale; the edge case of a verify with
nothing to feed uses the kept logits; a release frees the slot.
"""

import random
import time

import pytest
import torch

from specpipe.kv_store import KVStore
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.target_worker.engine import BatchLimits, TargetEngine
from engine_commands import answers, greedy, make_engine, one_request, prefill, step, verify
from tiny import fresh_logits, in_slot_order, record_packed_rows, store_logits

ATOL = 1e-4


def test_cache_and_commits_after_random_verifies(models):
    """Random blocks through verify (with and without bonus): the cache and committed tokens
    equal a fresh forward, and commits follow the target's argmax; the prefill time is reported once."""
    model, reference = models
    engine = make_engine(model)
    rng = random.Random(3)
    prefill(engine, "r", [1, 2, 3])
    for block_id in range(12):
        state = engine.requests["r"]
        before = list(state.tokens)
        draft = [rng.randrange(200) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.5:  # sometimes the target's own tokens: all accepted
            draft = greedy(reference, before, len(draft))
        verify(engine, "r", len(before), draft, emit_bonus=rng.random() < 0.5 or not draft, block_id=block_id)
        verdict = step(engine)[0]["r"]
        assert (verdict.prefill_seconds > 0) == (block_id == 0), (block_id, verdict.prefill_seconds)
        committed = state.tokens[len(before) :]
        assert len(committed) == verdict.num_accepted + (verdict.next_token_id >= 0)
        assert committed == greedy(reference, before, len(committed))
        if state.next_logits is not None:
            torch.testing.assert_close(state.next_logits, fresh_logits(reference, state.tokens), atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(
                store_logits(model, engine.store, state.slot, state.cached, state.tokens),
                fresh_logits(reference, state.tokens),
                atol=ATOL,
                rtol=0,
            )
    engine.handle(pb.Command(release=pb.Release(request_id="r")), [])
    assert not engine.requests and engine.store.slots_in_use == 0


def test_many_requests_are_verified_in_one_forward(models):
    model, reference = models
    engine = make_engine(model)
    prompts = {f"r{i}": [i + 1, 2 * i + 5, 7] * (i + 1) for i in range(6)}  # prompts of unequal lengths
    for request_id, prompt in prompts.items():
        prefill(engine, request_id, prompt)
        draft = greedy(reference, prompt, 3)
        draft[2] = (draft[2] + 1) % 300  # the third draft token is wrong
        verify(engine, request_id, len(prompt), draft, emit_bonus=True)
    verdicts, figures = step(engine)
    assert figures["batch_requests"] == 6 and set(verdicts) == set(prompts)
    assert figures["batch_tokens"] == sum(len(p) + 3 for p in prompts.values())
    for request_id, prompt in prompts.items():
        verdict = verdicts[request_id]
        assert verdict.num_accepted == 2
        assert verdict.next_token_id == greedy(reference, prompt, 3)[2]
        assert verdict.verify_seconds > 0 and verdict.committed_length == len(prompt) + 3
    assert not engine.ready()


def test_a_forward_packs_its_rows_in_slot_order_whatever_the_turn(models, monkeypatch):
    """Requests take turns from a rotating start, but each forward packs their rows in slot order
    (one-token rows over contiguous slots then need no scatter), and each gets its own verdict."""
    import specpipe.target_worker.engine as target_engine

    model, reference = models
    engine = make_engine(model)
    packed = record_packed_rows(monkeypatch, target_engine)
    prompts = {f"r{i}": [i + 2, 9, 4 + i] for i in range(4)}
    for request_id, prompt in prompts.items():
        prefill(engine, request_id, prompt)
    for turn in range(3):
        for request_id, prompt in prompts.items():
            state = engine.requests[request_id]
            verify(engine, request_id, len(state.tokens), [], emit_bonus=True, block_id=turn + 1)
        verdicts, _ = step(engine)
        for request_id, prompt in prompts.items():
            assert engine.requests[request_id].tokens == prompt + greedy(reference, prompt, turn + 1)
    assert len(packed) == 3 and all(in_slot_order(rows) for rows in packed)


def test_budgets_bound_each_forward_and_every_request_gets_its_turn(models):
    model, _ = models
    limits = BatchLimits(max_batch_tokens=12, max_batch_requests=2, prefill_chunk=8)
    engine = make_engine(model, limits)
    for i in range(5):
        prefill(engine, f"r{i}", [3, 4, i + 5])
        verify(engine, f"r{i}", 3, [1, 2], emit_bonus=True)
    served = []
    while engine.ready():
        verdicts, figures = step(engine)
        assert figures["batch_requests"] <= 2 and figures["batch_tokens"] <= 12
        served.append(sorted(verdicts))
    assert sorted(sum(served, [])) == [f"r{i}" for i in range(5)]  # each once, none starved
    assert len(served) == 3


def test_a_long_prompt_is_prefilled_in_chunks_beside_other_requests(models):
    model, reference = models
    engine = make_engine(model, BatchLimits(max_batch_tokens=64, max_batch_requests=8, prefill_chunk=16))
    prefill(engine, "short", [9, 8, 7])
    verify(engine, "short", 3, greedy(reference, [9, 8, 7], 2), emit_bonus=True)
    long_prompt = [(i * 7) % 250 + 1 for i in range(60)]
    prefill(engine, "long", long_prompt)
    verify(engine, "long", 60, [], emit_bonus=True)
    verdicts, figures = step(engine)
    assert set(verdicts) == {"short"}  # the long prompt took a chunk, the short one its verdict
    assert figures["batch_tokens"] == 5 + 16 and engine.requests["long"].cached == 16
    iterations = 1
    while "long" not in verdicts:
        verdicts, _ = step(engine)
        iterations += 1
    assert iterations == 4  # 16 + 16 + 16 + the last 12 with the verify
    assert verdicts["long"].next_token_id == greedy(reference, long_prompt, 1)[0]
    assert verdicts["long"].prefill_seconds > 0


def test_a_held_prompt_goes_in_its_first_block_s_forward_and_a_hold_that_runs_out_feeds_it_alone(models):
    """Prefill.hold_seconds: the prompt waits for the request's first block, so both cost one
    forward; once the hold runs out the prompt is fed alone. A request not held (another's work
    meanwhile) is not delayed by it."""
    model, reference = models
    engine = make_engine(model)
    prompt = [5, 9, 14, 3, 8, 2]
    engine.handle(pb.Command(prefill=pb.Prefill(request_id="held", token_ids=prompt, hold_seconds=30)), [])
    assert not engine.ready() and engine.waiting()  # nothing to run: the loop looks again soon
    prefill(engine, "other", [7, 7, 1])
    verdicts, figures = step(engine)  # the other prompt is fed; the held one waits
    assert not verdicts and figures["batch_tokens"] == 2 and engine.requests["held"].cached == 0
    draft = greedy(reference, prompt, 3)
    verify(engine, "held", len(prompt), draft, emit_bonus=True)
    verdicts, figures = step(engine)
    assert (figures["batch_requests"], figures["batch_tokens"]) == (1, len(prompt) + 3)  # one forward
    assert verdicts["held"].num_accepted == 3 and verdicts["held"].committed_length == len(prompt) + 4

    engine.handle(pb.Command(prefill=pb.Prefill(request_id="late", token_ids=prompt, hold_seconds=0.05)), [])
    assert not engine.ready()
    time.sleep(0.06)
    assert engine.ready()
    verdicts, figures = step(engine)
    assert not verdicts and figures["batch_tokens"] == len(prompt) - 1  # fed alone, keeping the last


def test_decode_runs_alone_and_answers_queued_verifies_stale(models):
    model, reference = models
    engine = make_engine(model)
    prompt = [4, 8, 15, 16]
    prefill(engine, "r", prompt)
    verify(engine, "r", len(prompt), [1, 2, 3], emit_bonus=False)
    engine.handle(pb.Command(decode=pb.Decode(request_id="r", max_length=len(prompt) + 5)), [])
    items, figures = engine.step()  # the queued block answered stale, then the first decoded token
    first, second = [item for _, item, _ in items]
    assert first.stale and not second.stale and figures["batch_requests"] == 1
    tokens = [second.next_token_id]
    while engine.ready():
        verdict = step(engine)[0]["r"]
        assert verdict.num_accepted == 0 and not verdict.stale
        tokens.append(verdict.next_token_id)
    assert tokens == greedy(reference, prompt, 5)


def test_verify_with_nothing_to_feed_uses_the_kept_logits(models):
    """Target-only after a block fully accepted without bonus (the draft went down then): the next
    verify has no pending token and no draft token. It must emit the target's argmax from the kept
    logits, without running the model on an empty input (once a float tensor: issue 22)."""
    model, reference = models
    engine = make_engine(model)
    prompt = [4, 8, 15]
    prefill(engine, "r", prompt)
    expected = greedy(reference, prompt, 3)
    verify(engine, "r", len(prompt), expected[:2], emit_bonus=False)
    kept = step(engine)[0]["r"]
    assert (kept.num_accepted, kept.next_token_id) == (2, -1)
    assert engine.requests["r"].next_logits is not None
    verify(engine, "r", len(prompt) + 2, [], emit_bonus=True, block_id=2)
    alone, figures = step(engine)
    assert (alone["r"].num_accepted, alone["r"].next_token_id) == (0, expected[2]) and figures["batch_tokens"] == 0
    state = engine.requests["r"]
    assert state.tokens == prompt + expected
    torch.testing.assert_close(
        store_logits(model, engine.store, state.slot, state.cached, state.tokens),
        fresh_logits(reference, prompt + expected),
        atol=ATOL,
        rtol=0,
    )


def test_a_block_made_stale_by_a_verdict_is_answered_with_it_without_compute(models):
    """The block queued behind a rejected one is answered stale in the rejection's own iteration,
    after its verdict (one message: the coordinator learns the whole outcome at once); no
    iteration is left to run for it."""
    model, reference = models
    engine = make_engine(model)
    prefill(engine, "r", [5, 6])
    verify(engine, "r", 2, [299, 298], emit_bonus=False)  # rejected at once
    verify(engine, "r", 4, [1], emit_bonus=False, block_id=2, expect_last_token=298)
    items, figures = engine.step()
    first, second = (item for _, item, _ in items)
    assert (first.block_id, first.num_accepted, first.stale) == (1, 0, False)
    assert (second.block_id, second.stale) == (2, True) and figures["batch_requests"] == 1
    assert not engine.ready()


@pytest.mark.parametrize("outcome", ["rejected at the fork", "fully accepted"])
def test_the_block_prepared_for_the_verdicts_outcome_runs_next_and_the_others_are_stale(models, outcome):
    """Queued behind block 1: a block prepared for each outcome at its first position (the
    target's token there, or another), and block 1's successor. Whatever the verdict, exactly the
    block made for it is verified in the next iteration; the blocks it excludes are answered stale
    without compute with the verdict that decides them; the result equals greedy decoding."""
    model, reference = models
    engine = make_engine(model)
    prompt = [4, 8, 15, 16]
    prefill(engine, "r", prompt)
    expected = greedy(reference, prompt, 8)
    wrong = (expected[0] + 1) % 250
    first = [wrong, 7] if outcome == "rejected at the fork" else expected[:2]
    start = len(prompt)
    verify(engine, "r", start, first, emit_bonus=False, block_id=1)
    for block_id, token in ((2, wrong), (3, expected[0])):  # prepared: one per outcome at `start`
        tail = expected[1:4] if token == expected[0] else [9, 9]
        verify(engine, "r", start + 1, tail, False, block_id=block_id, expect_last_token=token, after_block_id=1)
    successor = expected[2:5] if outcome == "fully accepted" else [3, 3]
    verify(engine, "r", start + 2, successor, False, block_id=4, expect_last_token=first[-1], after_block_id=1)
    first, _ = answers(engine)
    second, figures = answers(engine)
    assert figures["batch_requests"] == 1 and not engine.ready()
    if outcome == "rejected at the fork":  # the correction is expected[0]: block 3 holds it
        assert first[1].num_accepted == 0 and first[2].stale and set(first) == {1, 2}
        assert second[3].num_accepted == 3 and not second[3].stale
        assert second[4].stale, "the successor assumed block 1's verdict: answered with block 3's"
        assert engine.requests["r"].tokens == prompt + expected[:4]  # correction + block 3's three
    else:  # both prepared blocks are stale (the fork point was accepted); the successor runs
        assert first[1].num_accepted == 2 and first[2].stale and first[3].stale and set(first) == {1, 2, 3}
        assert set(second) == {4} and second[4].num_accepted == 3
        assert engine.requests["r"].tokens == prompt + expected[:5]


def test_a_block_is_stale_when_its_length_and_token_are_reached_by_another_path(models):
    """A block assumes the verdict of the block it follows: matching the committed length and
    last token is not enough when another block was verified last (a prepared block took the
    request to the same place by another path)."""
    model, engine, prompt, expected = one_request(models, 6)
    start = len(prompt)
    verify(engine, "r", start, [(expected[0] + 1) % 250] + expected[1:3], emit_bonus=False, block_id=1)
    verify(engine, "r", start + 1, expected[1:3], False, block_id=2, expect_last_token=expected[0], after_block_id=1)
    # Cut behind block 1, assuming it all accepted: the same length and last token as block 2 gives.
    verify(engine, "r", start + 3, expected[3:5], False, block_id=3, expect_last_token=expected[2], after_block_id=1)
    assert answers(engine)[0][1].num_accepted == 0
    second, _ = answers(engine)
    assert second[2].num_accepted == 2  # block 2: the request is at start + 3, ending expected[2]
    assert second[3].stale  # block 3 assumed block 1's verdict


def test_a_prompt_longer_than_a_slot_is_refused_and_slots_are_bounded(models):
    model, _ = models
    engine = TargetEngine(model, KVStore(1, 8))
    with pytest.raises(ValueError, match="does not fit a KV slot of 8"):
        prefill(engine, "big", list(range(1, 10)))
    prefill(engine, "a", [1, 2])
    with pytest.raises(MemoryError, match="all 1 KV slots are in use"):
        prefill(engine, "b", [1, 2])


def test_a_block_may_not_start_behind_verified_tokens(models):
    model, _ = models
    engine = make_engine(model)
    prefill(engine, "r", [5, 6, 7])
    verify(engine, "r", 3, [], emit_bonus=True)
    step(engine)
    verify(engine, "r", 3, [2], emit_bonus=True, block_id=2)  # behind the token the target verified
    items, _ = engine.step()
    ((_, reply, _),) = items
    assert "starts at 3, committed length is 4" in reply.error.message
