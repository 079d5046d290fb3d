"""Fixtures for the cross-process tests: a real `specpipe serve` (coordinator process plus two
worker processes) over tiny models, and Hugging Face's own greedy output as the reference."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from specpipe.launch.local import ServerProcess

from checks import greedy_reference, without_defaults


# The servers of `serve` kept running from one module to the next (the last asked for).
KEPT_SERVERS = 4


@pytest.fixture(scope="session")
def _servers():
    """The running servers of `serve`, by draft and flags."""
    servers: dict[tuple, ServerProcess] = {}
    yield servers
    stop_all(servers)


@pytest.fixture(scope="session")
def serve(tiny_models, _servers):
    """serve(draft="draft" | "draft_same", *extra flags) -> a running ServerProcess (cached, one
    per draft and flags, defaults left out; see _stop_idle_servers)."""

    def start(draft: str = "draft", *extra: str) -> ServerProcess:
        extra = without_defaults(extra)
        key = (draft, *extra)
        if key not in _servers:
            _servers[key] = ServerProcess(
                ["--target", str(tiny_models["target"]), "--draft", str(tiny_models[draft]), *extra]
            )
        _servers[key] = _servers.pop(key)  # (the most recently asked for last)
        return _servers[key]

    return start


@pytest.fixture(scope="module", autouse=True)
def _stop_idle_servers(_servers):
    """When a module ends, all but the KEPT_SERVERS servers asked for last stop (a later module
    that asks for one starts it again): kept for the session, they piled up, ~0.9 GB each, 14.5 GB
    after three modules of this folder, on a 24 GB machine. Never within a module: a module's
    fixture may hold one."""
    yield
    stop_all({key: _servers.pop(key) for key in list(_servers)[:-KEPT_SERVERS]})


def stop_all(servers: dict[tuple, ServerProcess]) -> None:
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
