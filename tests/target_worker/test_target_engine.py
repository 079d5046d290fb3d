"""The target engine, driven in-process with real protobuf commands over a tiny model: after any
run of verifies its cache and committed tokens equal a fresh forward and its commits follow the
target's argmax; edge cases of the verify contract (nothing to feed) run without a model error."""

import random

import torch

from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.target_worker.engine import TargetEngine
from tiny import cached_logits, fresh_logits, load

ATOL = 1e-4


def verify(engine, request_id, block_id, start_length, draft, emit_bonus):
    engine.handle(pb.Command(verify=pb.Verify(request_id=request_id, block_id=block_id, start_length=start_length,
                                              draft_token_ids=draft, emit_bonus=emit_bonus)), [])
    assert engine.has_work()
    (_, reply, _), = engine.work()
    assert reply.WhichOneof("kind") == "verdict", reply
    return reply.verdict


def test_target_engine_cache_after_verifies(tiny_models):
    """Random blocks through verify (with and without bonus): the target's cache and committed
    tokens equal a fresh forward, and its commits follow the target's argmax; the prefill time is
    reported once."""
    model = load(tiny_models["target"])
    engine = TargetEngine(model)
    rng = random.Random(3)
    engine.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=[1, 2, 3])), [])
    for block_id in range(12):
        state = engine.requests["r"]
        before = list(state.tokens)
        draft = [rng.randrange(200) for _ in range(rng.randint(0, 4))]
        emit_bonus = rng.random() < 0.5 or not draft
        engine.handle(pb.Command(verify=pb.Verify(request_id="r", block_id=block_id, start_length=len(before),
                                                  draft_token_ids=draft, emit_bonus=emit_bonus)), [])
        (_, reply, _), = engine.work()
        verdict = reply.verdict
        # the prompt's prefill time travels once, with the first verdict (target-busy accounting)
        assert (verdict.prefill_seconds > 0) == (block_id == 0), (block_id, verdict.prefill_seconds)
        committed = state.tokens[len(before):]
        assert len(committed) == verdict.num_accepted + (verdict.next_token_id >= 0)
        for i, token in enumerate(committed):
            assert token == int(torch.argmax(fresh_logits(model, before + committed[:i])))
        if state.next_logits is not None:
            torch.testing.assert_close(state.next_logits, fresh_logits(model, state.tokens), atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(cached_logits(model, state), fresh_logits(model, state.tokens),
                                       atol=ATOL, rtol=0)
    engine.handle(pb.Command(release=pb.Release(request_id="r")), [])
    assert engine.live_counts() == (0, 0)


def test_verify_with_nothing_to_feed_uses_the_kept_logits(tiny_models):
    """Target-only after a block fully accepted without bonus (the draft went down then): the next
    verify has no pending token and no draft token. It must emit the target's argmax from the kept
    logits, without running the model on an empty input (once a float tensor: issue 22)."""
    model = load(tiny_models["target"])
    engine = TargetEngine(model)
    prompt = [4, 8, 15]
    engine.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=prompt)), [])
    greedy = []
    for _ in range(3):
        greedy.append(int(torch.argmax(fresh_logits(model, prompt + greedy))))
    kept = verify(engine, "r", 1, len(prompt), greedy[:2], emit_bonus=False)
    assert (kept.num_accepted, kept.next_token_id) == (2, -1)
    assert engine.requests["r"].next_logits is not None
    alone = verify(engine, "r", 2, len(prompt) + 2, [], emit_bonus=True)
    assert (alone.num_accepted, alone.next_token_id) == (0, greedy[2])
    assert engine.requests["r"].tokens == prompt + greedy
    torch.testing.assert_close(cached_logits(model, engine.requests["r"]),
                               fresh_logits(model, prompt + greedy), atol=ATOL, rtol=0)
