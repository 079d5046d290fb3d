"""The batched target serves the model families people bring (issue 13): for tiny random Llama,
Qwen2, Qwen3, Mistral (a sliding window shorter than the sequences), Phi-3, GPT-2, GPT-NeoX and
OPT (and Llama and Qwen2 once more through the written-out packed forward both workers use,
lean_forward.py), 8 requests of different prompt lengths run together in one engine, each step one forward
over all of them, and each request's greedy output equals Hugging Face `generate` on it alone:
decoded by the target alone, and verified in blocks of draft tokens (right and wrong ones mixed).
"""

from __future__ import annotations

import random

import pytest
import torch

from specpipe.kv_store import LEAN_FORWARD, KVStore
from specpipe.model_check import prepare_model
from specpipe.proto.specpipe.worker.v1 import worker_pb2 as pb
from specpipe.target_worker.engine import BatchLimits, TargetEngine

from tiny import ARCHITECTURES, tiny_architecture, twin

NEW_TOKENS = 20
# The least top-2 logit gap of the references (see tests/e2e/checks.py GREEDY_MARGIN).
GREEDY_MARGIN = 1e-3
LENGTHS = [1, 3, 5, 7, 9, 11, 13, 15]
# Each family on the CPU, and on a GPU where one is (marked `gpu`: `pytest -m gpu` runs those).
LEAN_FAMILIES = ("llama", "qwen2")  # the families run written out (lean_forward.py)
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CASES = (
    [pytest.param((name, "cpu", False), id=name) for name in ARCHITECTURES]
    + [pytest.param((name, "cpu", True), id=f"{name}-lean") for name in LEAN_FAMILIES]
    + [pytest.param((name, "cuda", False), id=f"{name}-cuda", marks=GPU) for name in ARCHITECTURES]
    + [pytest.param((name, "cuda", True), id=f"{name}-lean-cuda", marks=GPU) for name in LEAN_FAMILIES]
)


def greedy_with_margin(reference, prompt: list[int]) -> list[int] | None:
    """Hugging Face's greedy continuation, or None if some step's top-2 logit gap is under
    GREEDY_MARGIN (its argmax would depend on the CPU's rounding: not a fair reference)."""
    with torch.no_grad():
        device = reference.device
        out = reference.generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for logits in out.logits:
        best, second = torch.topk(logits[0].double(), 2).values.tolist()
        if best - second < GREEDY_MARGIN:
            return None
    return out.sequences[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=CASES)
def served(request):
    """(the model routed through the store, 8 prompts of lengths 1 to 15 with clear greedy
    references, their references), on the case's device."""
    name, device, lean = request.param
    reference = tiny_architecture(name).to(device)
    model = twin(reference)
    prepare_model(model, device, lean=lean)
    assert (LEAN_FORWARD in model.__dict__) == lean, "the lean case must run the written-out forward"
    rng = random.Random(0)
    prompts, expected = [], []
    for length in LENGTHS:
        for _ in range(50):
            prompt = [rng.randrange(3, 250) for _ in range(length)]
            continuation = greedy_with_margin(reference, prompt)
            if continuation is not None:
                prompts.append(prompt)
                expected.append(continuation)
                break
        else:
            pytest.fail(f"{name}: no prompt of {length} tokens with a clear greedy path")
    return model, prompts, expected


def engine_for(model, prompts) -> TargetEngine:
    device = model.device
    engine = TargetEngine(
        model, KVStore(8, 64, device), device=device, limits=BatchLimits(max_batch_tokens=256, prefill_chunk=8)
    )
    for index, prompt in enumerate(prompts):
        engine.handle(pb.Command(prefill=pb.Prefill(request_id=f"r{index}", token_ids=prompt)), [])
    return engine


def test_decoding_eight_requests_together_equals_generate_on_each(served):
    model, prompts, expected = served
    engine = engine_for(model, prompts)
    for index, prompt in enumerate(prompts):
        engine.handle(pb.Command(decode=pb.Decode(request_id=f"r{index}", max_length=len(prompt) + NEW_TOKENS)), [])
    rows = []
    while engine.ready():
        _, figures = engine.step()
        rows.append(figures["batch_requests"])
    assert max(rows) == 8, "the requests shared forwards"
    for index, prompt in enumerate(prompts):
        assert engine.requests[f"r{index}"].tokens[len(prompt) :] == expected[index], f"request {index}"


def test_verifying_blocks_of_eight_requests_together_equals_generate_on_each(served):
    model, prompts, expected = served
    engine = engine_for(model, prompts)
    rng = random.Random(0)
    done = {f"r{index}": False for index in range(len(prompts))}
    block_id = 0
    while not all(done.values()):
        for index, prompt in enumerate(prompts):
            request_id = f"r{index}"
            state = engine.requests[request_id]
            produced = len(state.tokens) - len(prompt)
            if done[request_id] or state.verifies:
                continue
            truth = expected[index][produced : produced + rng.randint(1, 5)]
            draft = [t if rng.random() < 0.8 else (t + 1) % 250 for t in truth[:-1]]  # some wrong tokens
            block_id += 1
            engine.handle(
                pb.Command(
                    verify=pb.Verify(
                        request_id=request_id,
                        block_id=block_id,
                        start_length=len(state.tokens),
                        draft_token_ids=draft,
                        emit_bonus=True,
                    )
                ),
                [],
            )
        items, _ = engine.step()
        for request_id, _, _ in items:
            index = int(request_id[1:])
            produced = engine.requests[request_id].tokens[len(prompts[index]) :]
            assert produced == expected[index][: len(produced)], f"request {index}"
            done[request_id] = len(produced) >= NEW_TOKENS - 1
