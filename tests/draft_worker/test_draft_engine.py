"""The draft engine, driven in-process with real protobuf commands over tiny models, with both
drafters: after any mix of draft / fork / sync / cancel, every branch's cache equals a fresh
forward over its tokens; one step advances every drafting branch of every request at once and
reports them in one message; a long prompt is fed in chunks; released requests and cancelled
branches free their slots; the n-gram drafter proposes by prompt lookup, with certainty, and
ends a job where it has nothing to propose."""

import random

import pytest
import torch

from specpipe.draft_worker.drafter import ModelDrafter, NgramDrafter, lookup
from specpipe.draft_worker.engine import DraftEngine
from specpipe.kv_store import LEAN_FORWARD, KVStore
from specpipe.model_check import prepare_model
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from tiny import fresh_logits, in_slot_order, load, record_packed_rows, store_logits, twin

ATOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_models):
    reference = load(tiny_models["draft"])
    model = twin(reference)
    prepare_model(model, lean=True)  # as the workers do: the layers written out (lean_forward.py)
    assert LEAN_FORWARD in model.__dict__
    return model, reference


def make_engine(model, chunk: int = 128) -> DraftEngine:
    return DraftEngine(ModelDrafter(model, KVStore(16, 256), torch.device("cpu"), chunk))


def command(engine, **kind):
    engine.handle(pb.Command(**kind), [])


def run_jobs(engine):
    """Step until no branch drafts: every DraftToken, and the figures of each step."""
    tokens, steps = [], []
    while engine.ready():
        items, figures = engine.step()
        reply, _ = engine.pack(items, figures)
        tokens += list(reply.draft_step.tokens)
        steps.append(figures)
    return tokens, steps


def branch_logits(engine, model, request_id, branch_id):
    drafter, branch = engine.drafter, engine.requests[request_id].branches[branch_id]
    key = (request_id, branch_id)
    holder_cached = min(drafter.cached[key], len(branch.tokens) - 1)
    return store_logits(model, drafter.store, drafter.slots[key], holder_cached, branch.tokens)


def test_random_fork_sync_cancel_keep_every_cache_exact(models):
    model, reference = models
    engine = make_engine(model)
    rng = random.Random(7)
    command(engine, prefill=pb.Prefill(request_id="r", token_ids=[3, 9, 27]))
    next_id, epoch = 1, 1
    for _ in range(30):
        request = engine.requests["r"]
        branch_id = rng.choice(list(request.branches))
        branch = request.branches[branch_id]
        op = rng.choice(["draft", "draft", "fork", "sync", "cancel"])
        if op == "draft":
            ids = rng.sample(list(request.branches), k=min(2, len(request.branches)))
            command(
                engine,
                draft=pb.Draft(
                    request_id="r", branch_ids=ids, epoch=epoch, max_tokens=rng.randint(1, 4), num_candidates=2
                ),
            )
            tokens, _ = run_jobs(engine)
            assert all(t.epoch == epoch for t in tokens)
        elif op == "fork" and len(branch.tokens) > 1:
            position = rng.randint(1, len(branch.tokens) - 1)
            command(
                engine,
                fork=pb.Fork(
                    request_id="r",
                    parent_branch_id=branch_id,
                    branch_id=next_id,
                    position=position,
                    token_ids=[rng.randrange(200)],
                ),
            )
            next_id += 1
        elif op == "sync":
            keep = rng.randint(1, len(branch.tokens))
            command(
                engine,
                sync=pb.Sync(
                    request_id="r", branch_id=branch_id, keep_length=keep, append_token_ids=[rng.randrange(200)]
                ),
            )
            epoch += 1
        elif op == "cancel" and branch_id != 0:
            command(engine, cancel=pb.Cancel(request_id="r", branch_ids=[branch_id]))
    for branch_id, branch in engine.requests["r"].branches.items():
        torch.testing.assert_close(
            branch_logits(engine, model, "r", branch_id), fresh_logits(reference, branch.tokens), atol=ATOL, rtol=0
        )
    command(engine, release=pb.Release(request_id="r"))
    assert engine.drafter.store.slots_in_use == 0 and not engine.requests


def test_draft_tokens_follow_greedy_and_report_candidates(models):
    model, reference = models
    engine = make_engine(model)
    command(engine, prefill=pb.Prefill(request_id="r", token_ids=[5, 6]))
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=3, num_candidates=2))
    tokens, _ = run_jobs(engine)
    assert [t.position for t in tokens] == [2, 3, 4] and tokens[-1].last
    sequence = [5, 6]
    for token in tokens:
        logits = fresh_logits(reference, sequence)
        assert token.token_id == int(torch.argmax(logits))
        assert list(token.candidate_ids) == torch.topk(logits, 3).indices[1:].tolist()
        sequence.append(token.token_id)


def test_rows_chosen_together_get_each_its_own_token_probability_and_candidates(models):
    """Rows of one step and sampling kind are chosen together (one softmax, argmax, gather and
    top-k): each still gets its own argmax, its token's probability under its own q, and as many
    next-best candidates as its own job asked for (none, one, two), best first."""
    model, reference = models
    engine = make_engine(model)
    prompts = {"a": [5, 6], "b": [7, 8, 9], "c": [1, 2, 3, 4]}
    for (request_id, prompt), width in zip(prompts.items(), (0, 1, 2)):
        command(engine, prefill=pb.Prefill(request_id=request_id, token_ids=prompt))
        command(
            engine, draft=pb.Draft(request_id=request_id, branch_ids=[0], epoch=1, max_tokens=1, num_candidates=width)
        )
    items, _ = engine.step()
    assert len(items) == 3
    for (request_id, token, _), width in zip(sorted(items, key=lambda item: item[0]), (0, 1, 2)):
        probs = torch.softmax(fresh_logits(reference, prompts[request_id]), -1)
        assert token.token_id == int(torch.argmax(probs))
        assert token.prob == pytest.approx(float(probs.max()), abs=1e-5)
        assert list(token.candidate_ids) == torch.topk(probs, 3).indices[1 : 1 + width].tolist()
        assert list(token.candidate_probs) == pytest.approx(
            torch.topk(probs, 3).values[1 : 1 + width].tolist(), abs=1e-5
        )


def test_one_step_advances_every_branch_of_every_request(models):
    model, _ = models
    engine = make_engine(model)
    for request_id in ("a", "b", "c"):
        command(engine, prefill=pb.Prefill(request_id=request_id, token_ids=[1, 2, 3, 4]))
        command(engine, fork=pb.Fork(request_id=request_id, parent_branch_id=0, branch_id=1, position=3, token_ids=[9]))
        command(engine, draft=pb.Draft(request_id=request_id, branch_ids=[0, 1], epoch=1, max_tokens=2))
    items, figures = engine.step()
    assert figures["batch_branches"] == 6 and len(items) == 6
    reply, _ = engine.pack(items, figures)
    assert len(reply.draft_step.tokens) == 6  # one message for the whole step
    assert {(t.request_id, t.branch_id) for t in reply.draft_step.tokens} == {(r, b) for r in "abc" for b in (0, 1)}
    # Each request: its prompt on branch 0, and the fork's 4 tokens (forked before the parent was
    # cached, so it has no prefix to copy yet).
    assert figures["batch_tokens"] == 3 * (4 + 4)


def test_a_job_reported_when_done_sends_its_tokens_once_at_its_end(models):
    """Draft.report_when_done: no item while the job goes on, then all of its tokens, in order, in
    the step of its last one (its max_tokens; or one under min_confidence; or the drafter's end);
    a job beside it that reports every step still does."""
    model, _ = models
    engine, plain = make_engine(model), make_engine(model)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    for each, when_done in ((engine, True), (plain, False)):
        for request_id in ("r", "s"):
            command(each, prefill=pb.Prefill(request_id=request_id, token_ids=prompt))
        command(each, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=4, report_when_done=when_done))
        command(each, draft=pb.Draft(request_id="s", branch_ids=[0], epoch=1, max_tokens=4))
    reported, every_step = [], []
    while engine.ready():
        items, _ = engine.step()
        reported.append([(t.position, t.token_id, t.last) for rid, t, _ in items if rid == "r"])
        assert [t.position for rid, t, _ in items if rid == "s"] == [len(prompt) + len(reported) - 1]
    while plain.ready():
        every_step += [(t.position, t.token_id, t.last) for rid, t, _ in plain.step()[0] if rid == "r"]
    assert reported[:-1] == [[], [], []] and reported[-1] == every_step
    assert [position for position, *_ in every_step] == [8, 9, 10, 11] and every_step[-1][2]
    # A job that ends early reports at once: a token under min_confidence, or nothing to propose.
    command(
        engine,
        draft=pb.Draft(
            request_id="r", branch_ids=[0], epoch=2, max_tokens=4, min_confidence=1.0, report_when_done=True
        ),
    )
    items, _ = engine.step()
    assert [(t.position, t.last) for _, t, _ in items] == [(12, True)]
    ngram = DraftEngine(NgramDrafter(64, 256))
    command(ngram, prefill=pb.Prefill(request_id="n", token_ids=[1, 2, 3]))  # (no n-gram repeats: nothing)
    command(ngram, draft=pb.Draft(request_id="n", branch_ids=[0], epoch=1, max_tokens=4, report_when_done=True))
    items, _ = ngram.step()
    assert [(t.token_id, t.last) for _, t, _ in items] == [(-1, True)] and not ngram.ready()


def test_a_holding_job_reports_its_tokens_together_and_loses_none(models):
    """Draft.report_in_s: a job's tokens wait until the step after which the next one would end past
    the moment (or its last token), then come together, in order, and every later one at once; a
    `reports_only` Draft moves that moment (and gives a branch with no job none); a job replacing a
    holding one takes over its held tokens and ends at `end_position`, however far the draft is; a
    job paused or synced reports them with the next step, with nothing else drafting. Every token is
    the one a job reporting each step drafts, each reported once."""
    model, _ = models
    engine, plain = make_engine(model), make_engine(model)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    for each in (engine, plain):
        command(each, prefill=pb.Prefill(request_id="r", token_ids=prompt))
    command(plain, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=8))
    expected = [(t.position, t.token_id) for t in run_jobs(plain)[0]]
    end = len(prompt) + 6

    def step() -> list[tuple[int, int]]:
        return [(t.position, t.token_id) for _, t, _ in engine.step()[0]]

    command(
        engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=6, report_in_s=60, end_position=end)
    )
    assert step() == [] and step() == []
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, report_in_s=1e-9, reports_only=True))
    assert step() == expected[:3]  # (the moment came: the held ones and this step's)
    assert step() == expected[3:4]  # (then each at once)
    # A holding job replaced by another: it takes over the held token, and ends at end_position
    # (not 9 tokens on), all of them coming with its last.
    hold_to_end = pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=9, report_in_s=60, end_position=end)
    command(engine, draft=hold_to_end)
    assert step() == []
    command(engine, draft=hold_to_end)
    assert step() == expected[4:6] and not engine.ready()
    # Paused while holding: the held token comes with the next step, though nothing drafts.
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=4, report_in_s=60))
    assert step() == []
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=0))
    assert engine.ready() and step() == expected[6:7] and not engine.ready()
    # Synced while holding: likewise (of the old epoch: the schedule drops them).
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=4, report_in_s=60))
    assert step() == []
    command(engine, sync=pb.Sync(request_id="r", branch_id=0, keep_length=end + 1))
    assert step() == expected[7:8] and not engine.ready()
    # A reports_only Draft gives a branch with no job none.
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, report_in_s=60, reports_only=True))
    assert not engine.ready()


def test_a_step_feeds_its_branches_in_slot_order_whatever_the_turn(models, monkeypatch):
    """Branches take turns from a rotating start, but each step's forward packs them in slot order
    (one token per branch over contiguous slots then needs no scatter)."""
    import specpipe.draft_worker.drafter as drafter_module

    model, _ = models
    engine = make_engine(model)
    packed = record_packed_rows(monkeypatch, drafter_module)
    for request_id in ("a", "b", "c"):
        command(engine, prefill=pb.Prefill(request_id=request_id, token_ids=[1, 2, 3, 4]))
        command(engine, draft=pb.Draft(request_id=request_id, branch_ids=[0], epoch=1, max_tokens=3))
    run_jobs(engine)
    assert len(packed) == 3 and all(in_slot_order(rows) for rows in packed)


def test_a_long_prompt_is_fed_in_chunks_before_it_proposes(models):
    model, reference = models
    engine = make_engine(model, chunk=8)
    prompt = [(i * 5) % 200 + 1 for i in range(20)]
    command(engine, prefill=pb.Prefill(request_id="r", token_ids=prompt))
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=1))
    proposed = [engine.step()[0] for _ in range(3)]
    assert [len(items) for items in proposed] == [0, 0, 1]  # 8 + 8 fed, then the last 4 and a token
    assert proposed[2][0][1].token_id == int(torch.argmax(fresh_logits(reference, prompt)))


def test_cancel_and_release_free_the_slots(models):
    model, _ = models
    engine = make_engine(model)
    command(engine, prefill=pb.Prefill(request_id="r", token_ids=[1, 2]))
    for branch_id in (1, 2):
        command(
            engine,
            fork=pb.Fork(request_id="r", parent_branch_id=0, branch_id=branch_id, position=1, token_ids=[branch_id]),
        )
    assert engine.drafter.store.slots_in_use == 3
    command(engine, cancel=pb.Cancel(request_id="r", branch_ids=[1]))
    assert engine.drafter.store.slots_in_use == 2
    command(engine, release=pb.Release(request_id="r"))
    assert engine.drafter.store.slots_in_use == 0


@pytest.mark.parametrize(
    "tokens, expected",
    [
        ([1, 2, 3, 9, 1, 2], 3),  # the longest suffix seen before: [1, 2] -> 3
        ([5, 6, 5, 7, 5], 7),  # the most recent earlier occurrence wins
        ([1, 2, 3, 4], None),  # nothing repeats
        ([4], None),
    ],
)
def test_prompt_lookup(tokens, expected):
    assert lookup(tokens) == expected


def test_ngram_drafter_proposes_with_certainty_and_stops_when_it_has_nothing():
    engine = DraftEngine(NgramDrafter(vocab_size=50, max_len=64))
    command(engine, prefill=pb.Prefill(request_id="r", token_ids=[1, 2, 3, 4, 1, 2]))
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0], epoch=1, max_tokens=6))
    tokens, _ = run_jobs(engine)
    # Lookup follows the earlier run 1 2 3 4 1 2 ... and repeats it.
    assert [t.token_id for t in tokens] == [3, 4, 1, 2, 3, 4] and all(t.prob == 1.0 for t in tokens)
    command(engine, prefill=pb.Prefill(request_id="s", token_ids=[7, 8, 9]))
    command(engine, draft=pb.Draft(request_id="s", branch_ids=[0], epoch=1, max_tokens=4))
    tokens, _ = run_jobs(engine)
    assert [(t.token_id, t.last) for t in tokens] == [(-1, True)]  # nothing to propose: the job ends


def test_a_fork_without_a_free_slot_is_skipped_and_drafting_goes_on(models):
    model, _ = models
    engine = DraftEngine(ModelDrafter(model, KVStore(2, 64), torch.device("cpu"), 128))
    command(engine, prefill=pb.Prefill(request_id="r", token_ids=[1, 2, 3]))
    command(engine, fork=pb.Fork(request_id="r", parent_branch_id=0, branch_id=1, position=2, token_ids=[7]))
    command(engine, fork=pb.Fork(request_id="r", parent_branch_id=0, branch_id=2, position=2, token_ids=[8]))
    assert sorted(engine.requests["r"].branches) == [0, 1]  # the store had room for one fork
    command(engine, draft=pb.Draft(request_id="r", branch_ids=[0, 1, 2], epoch=1, max_tokens=2))
    tokens, _ = run_jobs(engine)
    assert sorted({t.branch_id for t in tokens}) == [0, 1] and len(tokens) == 4


def test_a_sampled_request_is_drafted_at_the_proposal_temperature_and_its_q_sent_with_it(models):
    """With a proposal table (x1.5 here), a default-rule request at temperature 0.8 draws its draft
    tokens from q at 1.2, and that q is what reaches the target over the data plane (a real ZeroMQ
    PUSH/PULL pair on loopback): the target's rule stays exact only if it judges each token by the
    law it was drawn from. Greedy and drafter-invariant requests keep their own laws."""
    import time

    from specpipe.dataplane import ZmqReceiver, ZmqSender
    from specpipe.proposal import ProposalTemperatures
    from specpipe.sampling import SamplingParams, logits_to_probs

    model, reference = models
    receiver = ZmqReceiver("tcp://127.0.0.1:*")
    engine = DraftEngine(
        ModelDrafter(model, KVStore(16, 256), torch.device("cpu"), 128),
        probs_sender=ZmqSender(receiver.endpoint),
        proposal=ProposalTemperatures.uniform(1.5),
    )
    laws = {
        "sampled": pb.Sampling(temperature=0.8, top_k=20, seed=3),
        "greedy": pb.Sampling(),
        "coupled": pb.Sampling(temperature=0.8, drafter_invariant=True, noise_vocab=300),
    }
    for handle, (request_id, sampling) in enumerate(laws.items()):
        command(
            engine, prefill=pb.Prefill(request_id=request_id, token_ids=[5, 6, 7], sampling=sampling, handle=handle)
        )
    drawn = {request_id: engine.requests[request_id].sampling for request_id in laws}
    assert drawn["sampled"].temperature == pytest.approx(1.2) and drawn["sampled"].top_k == 20
    assert drawn["greedy"].greedy
    assert drawn["coupled"].temperature == pytest.approx(0.8) and drawn["coupled"].coupled

    command(engine, draft=pb.Draft(request_id="sampled", branch_ids=[0], epoch=1, max_tokens=3, send_probs=True))
    tokens, _ = run_jobs(engine)
    arrived, deadline = [], time.monotonic() + 10
    while len(arrived) < len(tokens) and time.monotonic() < deadline:
        arrived += receiver.drain()
        time.sleep(0.01)
    assert [key[3] for key, _ in arrived] == [t.position for t in tokens] == [3, 4, 5]
    sequence = [5, 6, 7]
    for token, (_, sent) in zip(tokens, arrived):
        logits = fresh_logits(reference, sequence)
        expected = logits_to_probs(logits, SamplingParams(temperature=1.2, top_k=20))
        torch.testing.assert_close(sent, expected, atol=1e-5, rtol=0)
        assert (sent - logits_to_probs(logits, SamplingParams(temperature=0.8, top_k=20))).abs().max() > 1e-3
        assert sent[token.token_id] > 0 and token.prob == pytest.approx(float(sent[token.token_id]), abs=1e-5)
        sequence.append(token.token_id)


def test_sampled_rows_drafted_together_draw_what_each_draws_alone(models):
    """One step draws every sampled row of one law in one race, each row from its own generator
    keyed by (seed, position): four seeded requests drafted side by side (and a drafter-invariant
    one beside them) get, token for token, what each gets drafted alone."""
    model, _ = models
    laws = {f"s{seed}": pb.Sampling(temperature=1.0, top_k=50, seed=seed) for seed in (1, 2, 3, 2**40 + 5)}
    laws["coupled"] = pb.Sampling(temperature=1.0, drafter_invariant=True, noise_vocab=300, seed=9)
    prompts = {request_id: [5 + index, 6, 7 + 2 * index] for index, request_id in enumerate(laws)}

    def draft(request_ids):
        engine = make_engine(model)
        for request_id in request_ids:
            prefill = pb.Prefill(request_id=request_id, token_ids=prompts[request_id], sampling=laws[request_id])
            command(engine, prefill=prefill)
            command(engine, draft=pb.Draft(request_id=request_id, branch_ids=[0], epoch=1, max_tokens=6))
        tokens, steps = run_jobs(engine)
        return {
            request_id: [t.token_id for t in tokens if t.request_id == request_id] for request_id in request_ids
        }, steps

    together, steps = draft(list(laws))
    assert max(step.get("batch_branches", 0) for step in steps) == len(laws)  # one step held them all
    alone = {request_id: draft([request_id])[0][request_id] for request_id in laws}
    assert together == alone
    assert all(len(ids) == 6 for ids in alone.values())
    assert len({tuple(ids) for ids in alone.values()}) == len(laws)  # (the seeds drew apart)
