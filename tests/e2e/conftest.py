"""Fixtures for the cross-process tests: a real `specpipe serve` (coordinator process plus two
worker processes) over tiny models, and Hugging Face's own greedy output as the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe.launch.local import ServerProcess

from checks import without_defaults


@pytest.fixture(scope="session")
def serve(tiny_models):
    """serve(draft="draft" | "draft_same", *extra flags) -> a running ServerProcess (cached, one
    per draft and flags, defaults left out)."""
    servers: dict[tuple, ServerProcess] = {}

    def start(draft: str = "draft", *extra: str) -> ServerProcess:
        extra = without_defaults(extra)
        key = (draft, *extra)
        if key not in servers:
            servers[key] = ServerProcess(
                ["--target", str(tiny_models["target"]), "--draft", str(tiny_models[draft]), *extra]
            )
        return servers[key]

    yield start
    for server in servers.values():  # all at once: each takes seconds to exit
        server.terminate()
    for server in servers.values():
        server.stop()


# The least gap between the target's best and second-best logit at every step of a greedy
# reference. Speculative decoding computes the same positions in forwards of other shapes (a block
# of k tokens, a padded batch), whose float32 rounding differs from one CPU to another (Intel or
# AMD, with or without AVX-512) by ~1e-5 on these logits; a greedy-equality test is only a test of
# the system, not of rounding luck, where every step's argmax wins by far more than that.
GREEDY_MARGIN = 1e-3


@pytest.fixture(scope="session")
def hf_greedy(tiny_models):
    """hf_greedy(prompt_ids, max_new_tokens) -> the target's own greedy tokens (through EOS).
    Fails, naming the step, if any step's top-2 logit gap is under GREEDY_MARGIN: such a prompt
    would make the comparison depend on the CPU's rounding (pick another prompt)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval()
    eos = model.config.eos_token_id

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                pad_token_id=eos,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, len(prompt_ids) :].tolist()
        tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        for step, logits in enumerate(out.logits[: len(tokens)]):
            best, second = torch.topk(logits[0].double(), 2).values.tolist()
            assert best - second >= GREEDY_MARGIN, (
                f"prompt {prompt_ids}: greedy step {step} wins by {best - second:.2e} < {GREEDY_MARGIN:g}; "
                f"its argmax depends on float rounding: choose another prompt"
            )
        return tokens

    return generate
