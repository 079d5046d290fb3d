"""Driving a TargetEngine in-process with real protobuf commands: the commands and one iteration,
shared by the target engine's tests."""

import torch

from specpipe.kv_store import KVStore
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.target_worker.engine import BatchLimits, TargetEngine
from tiny import fresh_logits


def make_engine(model, limits=BatchLimits(), slots: int = 8) -> TargetEngine:
    return TargetEngine(model, KVStore(slots, 256), limits=limits)


def prefill(engine, request_id, tokens):
    engine.handle(pb.Command(prefill=pb.Prefill(request_id=request_id, token_ids=tokens)), [])


def verify(engine, request_id, start_length, draft, emit_bonus, block_id=1, **fields):
    engine.handle(
        pb.Command(
            verify=pb.Verify(
                request_id=request_id,
                block_id=block_id,
                start_length=start_length,
                draft_token_ids=draft,
                emit_bonus=emit_bonus,
                **fields,
            )
        ),
        [],
    )


def step(engine):
    """One iteration: {request_id: verdict} and the iteration's figures."""
    assert engine.ready()
    items, figures = engine.step()
    verdicts = {}
    for request_id, item, _ in items:
        assert isinstance(item, pb.Verdict), item
        verdicts[request_id] = item
    return verdicts, figures


def answers(engine):
    """One iteration: {block_id: verdict} of every verdict it sent, and its figures."""
    assert engine.ready()
    items, figures = engine.step()
    return {item.block_id: item for _, item, _ in items}, figures


def greedy(reference, tokens, count):
    out = list(tokens)
    for _ in range(count):
        out.append(int(torch.argmax(fresh_logits(reference, out))))
    return out[len(tokens) :]


def one_request(models, count):
    """(engine model, a fresh engine holding request "r" with its prompt prefilled, the prompt, the
    target's `count` greedy tokens after it)."""
    model, reference = models
    engine = make_engine(model)
    prompt = [4, 8, 15, 16]
    prefill(engine, "r", prompt)
    return model, engine, prompt, greedy(reference, prompt, count)


def fill(engine, request_id, max_length):
    engine.handle(pb.Command(decode=pb.Decode(request_id=request_id, max_length=max_length, until_block=True)), [])
