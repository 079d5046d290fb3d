"""Fixtures for the cross-process tests: a real `specpipe serve` (coordinator process plus two
worker processes) over tiny models, and Hugging Face's own greedy output as the reference."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from specpipe.launch.local import ServerProcess

from checks import greedy_reference, without_defaults


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


@pytest.fixture(scope="session")
def hf_greedy(tiny_models):
    """hf_greedy(prompt_ids, max_new_tokens) -> the target's own greedy tokens (through EOS), each
    step's argmax clear by GREEDY_MARGIN (checks.greedy_reference)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval()
    return lambda prompt_ids, max_new_tokens: greedy_reference(model, prompt_ids, max_new_tokens)
