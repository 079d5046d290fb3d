"""The draft engine, driven in-process with real protobuf commands over a tiny model: after any
mix of draft / fork / sync / cancel, every cache equals a fresh forward over its surviving tokens,
and released requests leave nothing behind."""

import random

import torch

from specpipe.draft_worker.engine import DraftEngine
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from tiny import cached_logits, fresh_logits, load

ATOL = 1e-4


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
