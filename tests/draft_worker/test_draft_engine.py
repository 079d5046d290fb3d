"""The draft and target engines, driven in-process with real protobuf commands over a tiny model:
after any mix of draft / fork / sync / cancel (draft) and verify (target), every cache equals a
fresh forward over its surviving tokens, and released requests leave nothing behind."""

import random

import torch
from transformers import AutoModelForCausalLM

from specpipe.draft_worker.engine import DraftEngine
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.target_worker.engine import TargetEngine

ATOL = 1e-4


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def fresh_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1]


def cached_logits(model, branch):
    """Next-token logits from the branch's cache plus its pending tokens, without changing it."""
    probe = branch.cache.fork()
    with torch.no_grad():
        return probe.forward(model, torch.tensor([branch.tokens[probe.length:]])).logits[0, -1]


def run_jobs(engine):
    replies = []
    while engine.has_work():
        replies += engine.work()
    return replies


def test_draft_engine_random_fork_sync_cancel(tiny_models):
    model = load(tiny_models["draft"])
    engine = DraftEngine(model)
    rng = random.Random(7)
    engine.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=[3, 9, 27])), [])
    next_id, epoch = 1, 1
    for _ in range(30):
        request = engine.requests["r"]
        branch_id = rng.choice(list(request.branches))
        branch = request.branches[branch_id]
        op = rng.choice(["draft", "draft", "fork", "sync", "cancel"])
        if op == "draft":
            ids = rng.sample(list(request.branches), k=min(2, len(request.branches)))
            engine.handle(pb.Command(draft=pb.Draft(request_id="r", branch_ids=ids, epoch=epoch,
                                                    max_tokens=rng.randint(1, 4), num_candidates=2)), [])
            replies = run_jobs(engine)
            assert all(r.draft_token.epoch == epoch for _, r, _ in replies)
        elif op == "fork" and len(branch.tokens) > 1:
            position = rng.randint(1, len(branch.tokens) - 1)
            engine.handle(pb.Command(fork=pb.Fork(request_id="r", parent_branch_id=branch_id, branch_id=next_id,
                                                  position=position, token_ids=[rng.randrange(200)])), [])
            next_id += 1
        elif op == "sync":
            keep = rng.randint(1, len(branch.tokens))
            engine.handle(pb.Command(sync=pb.Sync(request_id="r", branch_id=branch_id, keep_length=keep,
                                                  append_token_ids=[rng.randrange(200)])), [])
            epoch += 1
        elif op == "cancel" and branch_id != 0:
            engine.handle(pb.Command(cancel=pb.Cancel(request_id="r", branch_ids=[branch_id])), [])
    for branch in engine.requests["r"].branches.values():
        torch.testing.assert_close(cached_logits(model, branch), fresh_logits(model, branch.tokens),
                                   atol=ATOL, rtol=0)
    engine.handle(pb.Command(release=pb.Release(request_id="r")), [])
    assert engine.live_counts() == (0, 0)


def test_draft_tokens_follow_greedy_and_report_candidates(tiny_models):
    model = load(tiny_models["draft"])
    engine = DraftEngine(model)
    engine.handle(pb.Command(prefill=pb.Prefill(request_id="r", token_ids=[5, 6])), [])
    engine.handle(pb.Command(draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=3,
                                            num_candidates=2)), [])
    tokens = [reply.draft_token for _, reply, _ in run_jobs(engine)]
    assert [t.position for t in tokens] == [2, 3, 4] and tokens[-1].last
    sequence = [5, 6]
    for token in tokens:
        logits = fresh_logits(model, sequence)
        assert token.token_id == int(torch.argmax(logits))
        assert list(token.candidate_ids) == torch.topk(logits, 3).indices[1:].tolist()
        sequence.append(token.token_id)


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
