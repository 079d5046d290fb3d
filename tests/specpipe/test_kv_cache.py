"""KVCache: after any sequence of append / rollback / fork, the next-token logits equal those of a
fresh forward over the same tokens (to float tolerance), for Llama and GPT-2 tiny models."""

import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from specpipe.kv_cache import KVCache, forward_batch

VOCAB = 97
ATOL = 1e-4


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(params=["llama", "gpt2"])
def model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


def fresh_next_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def step(model, cache, new_tokens):
    with torch.no_grad():
        return cache.forward(model, torch.tensor([new_tokens])).logits[0, -1]


def test_append_matches_fresh_forward(model):
    tokens = list(range(1, 12))
    cache = KVCache()
    step(model, cache, tokens[:5])
    for i in range(5, len(tokens)):
        logits = step(model, cache, [tokens[i]])
        torch.testing.assert_close(logits, fresh_next_logits(model, tokens[:i + 1]), atol=ATOL, rtol=0)
    assert cache.length == len(tokens)


def test_rollback_then_append(model):
    cache = KVCache()
    step(model, cache, [5, 6, 7, 8, 9, 10])
    cache.rollback(3)
    assert cache.length == 3
    logits = step(model, cache, [40, 41])
    torch.testing.assert_close(logits, fresh_next_logits(model, [5, 6, 7, 40, 41]), atol=ATOL, rtol=0)


def test_fork_is_independent_of_parent(model):
    parent = KVCache()
    step(model, parent, [3, 4, 5, 6])
    child = parent.fork(2)
    child_logits = step(model, child, [50, 51, 52])
    parent.rollback(3)
    parent_logits = step(model, parent, [60])
    torch.testing.assert_close(child_logits, fresh_next_logits(model, [3, 4, 50, 51, 52]), atol=ATOL, rtol=0)
    torch.testing.assert_close(parent_logits, fresh_next_logits(model, [3, 4, 5, 60]), atol=ATOL, rtol=0)
    # The child still sees its own tokens after the parent changed.
    torch.testing.assert_close(step(model, child, [53]), fresh_next_logits(model, [3, 4, 50, 51, 52, 53]),
                               atol=ATOL, rtol=0)


def test_batched_forward_over_forks(model):
    root = KVCache()
    step(model, root, [7, 8, 9])
    branches = [root.fork(3) for _ in range(3)]
    with torch.no_grad():
        out = forward_batch(model, branches, torch.tensor([[10], [11], [12]]))
    for row, first in enumerate([10, 11, 12]):
        torch.testing.assert_close(out.logits[row, -1], fresh_next_logits(model, [7, 8, 9, first]), atol=ATOL, rtol=0)
    # Each branch goes on alone afterwards.
    torch.testing.assert_close(step(model, branches[1], [20]), fresh_next_logits(model, [7, 8, 9, 11, 20]),
                               atol=ATOL, rtol=0)
    assert root.length == 3


def test_batched_forward_over_unequal_lengths(model):
    """Caches of different lengths go through one forward (left-padded, masked): each row's logits,
    over one and over several new tokens, equal a fresh forward, and each cache goes on alone."""
    prefixes = [[7, 8, 9, 10, 11], [7, 8], [30, 31, 32, 33, 34, 35, 36, 37], [5]]
    caches = []
    for prefix in prefixes:
        caches.append(KVCache())
        step(model, caches[-1], prefix)
    for new_tokens in ([[40], [41], [42], [43]], [[50, 51], [52, 53], [54, 55], [56, 57]]):
        with torch.no_grad():
            out = forward_batch(model, caches, torch.tensor(new_tokens))
        for row, (prefix, new) in enumerate(zip(prefixes, new_tokens)):
            prefix += new
            torch.testing.assert_close(out.logits[row, -1], fresh_next_logits(model, prefix), atol=ATOL, rtol=0)
            assert caches[row].length == len(prefix)
    for cache, prefix in zip(caches, prefixes):
        torch.testing.assert_close(step(model, cache, [60]), fresh_next_logits(model, prefix + [60]),
                                   atol=ATOL, rtol=0)


def test_random_operation_sequences(model):
    """Random append / rollback / fork programs; every live cache checked against a fresh forward."""
    rng = random.Random(1234)
    live = [(KVCache(), [])]
    step(model, live[0][0], [1, 2])
    live[0][1].extend([1, 2])
    for _ in range(40):
        index = rng.randrange(len(live))
        cache, tokens = live[index]
        op = rng.choice(["append", "append", "rollback", "fork"])
        if op == "append":
            new = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 3))]
            logits = step(model, cache, new)
            tokens.extend(new)
            torch.testing.assert_close(logits, fresh_next_logits(model, tokens), atol=ATOL, rtol=0)
        elif op == "rollback" and len(tokens) > 1:
            keep = rng.randint(1, len(tokens) - 1)
            cache.rollback(keep)
            del tokens[keep:]
        elif op == "fork" and len(live) < 6:
            at = rng.randint(1, len(tokens))
            live.append((cache.fork(at), tokens[:at]))
        assert cache.length == len(tokens)
    for cache, tokens in live:
        new = rng.randrange(VOCAB)
        torch.testing.assert_close(step(model, cache, [new]), fresh_next_logits(model, tokens + [new]),
                                   atol=ATOL, rtol=0)
