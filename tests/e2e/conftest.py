"""Fixtures for the cross-process tests: a real `specpipe serve` (coordinator process plus two
worker processes) over tiny models, and Hugging Face's own greedy output as the reference."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from specpipe.launch.local import ServerProcess



@pytest.fixture(scope="session")
def serve(tiny_models):
    """serve(draft="draft" | "draft_same", *extra flags) -> a running ServerProcess (cached)."""
    servers: dict[tuple, ServerProcess] = {}

    def start(draft: str = "draft", *extra: str) -> ServerProcess:
        key = (draft, *extra)
        if key not in servers:
            servers[key] = ServerProcess(["--target", str(tiny_models["target"]), "--draft",
                                          str(tiny_models[draft]), *extra])
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def hf_greedy(tiny_models):
    """hf_greedy(prompt_ids, max_new_tokens) -> the target's own greedy tokens (through EOS)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval()
    eos = model.config.eos_token_id

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 pad_token_id=eos)
        tokens = out[0, len(prompt_ids):].tolist()
        return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens

    return generate
