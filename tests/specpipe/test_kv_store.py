"""specpipe.kv_store: packed forwards over slots equal the model's own plain forward.

Method: for each model family people serve (tiny random configs: Llama, Qwen2, Qwen3, Mistral with
a sliding window shorter than the sequences, Phi-3, GPT-2, GPT-NeoX, OPT), a twin of the model is
routed through the store and compared, to float tolerance, with the plain model's logits over
the same tokens: rows of unequal starts and lengths packed together, slots dense and scattered
(the gather path), rollback by forgetting positions then feeding others, a fork by copying a
prefix. Llama runs these once more through the written-out forward both workers use (lean_forward.py),
which is kept only for the models it reproduces. Models whose layers are not attention (recurrent, linear attention) or whose attention
the store cannot express are refused, naming their type.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from specpipe.kv_store import (
    LEAN_FORWARD,
    SPARSE_RANGE_FACTOR,
    KVStore,
    PackedLayout,
    Row,
    UnsupportedModel,
    forward_packed,
    split_forward,
)
from specpipe.model_check import prepare_model

from tiny import ARCHITECTURES, fresh_logits, store_logits, tiny_architecture, twin

ATOL = 1e-4


@pytest.fixture(scope="module", params=[*ARCHITECTURES, "llama-lean", "qwen2-lean"])
def pair(request):
    """(model routed through the store, the plain reference with the same weights); *-lean: the
    family through the written-out forward."""
    name, lean = request.param.removesuffix("-lean"), request.param.endswith("-lean")
    reference = tiny_architecture(name)
    model = twin(reference)
    prepare_model(model, lean=lean)
    assert (LEAN_FORWARD in model.__dict__) == lean
    return model, reference


def test_packed_rows_of_unequal_lengths_equal_plain_forwards(pair):
    model, reference = pair
    rng = random.Random(0)
    store = KVStore(num_slots=8, slot_len=64)
    sequences = [[rng.randrange(300) for _ in range(n)] for n in (9, 3, 14, 1)]
    slots = [store.allocate() for _ in sequences]
    cached = [0] * len(sequences)
    for chunk in (4, 3, 5, 7):  # feed each sequence in chunks, all rows packed together
        rows, ids, keep, owners = [], [], [], []
        for index, (slot, tokens) in enumerate(zip(slots, sequences)):
            fed = tokens[cached[index] : cached[index] + chunk]
            if fed:
                rows.append(Row(slot, cached[index], len(fed)))
                keep += [len(ids) + offset for offset in range(len(fed))]
                owners += [(index, cached[index] + offset) for offset in range(len(fed))]
                ids += fed
                cached[index] += len(fed)
        if not rows:
            break
        with torch.inference_mode():
            logits = forward_packed(model, store, rows, torch.tensor(ids), keep).logits
        for row_logits, (index, position) in zip(logits, owners):
            expected = fresh_logits(reference, sequences[index][: position + 1])
            torch.testing.assert_close(row_logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "slots, in_order",
    [([0, 1, 2], True), ([2, 0, 1], False), ([0, 1, 3], False)],
    ids=["slot-order", "rotated", "gap"],
)
def test_one_token_rows_equal_plain_forwards_in_any_slot_arrangement(pair, slots, in_order):
    """Decode steps (every row one token, as the draft's branches and many clients' autoregressive
    rows): in slot order over contiguous slots the queries are the attention block as they come
    (no scatter, no gather); rotated or with a gap between slots they are scattered. Each agrees."""
    model, reference = pair
    rng = random.Random(1)
    store = KVStore(num_slots=8, slot_len=32)
    for slot in range(4):
        assert store.allocate() == slot
    sequences = {slot: [rng.randrange(300) for _ in range(3 + slot)] for slot in slots}
    with torch.inference_mode():
        for slot, tokens in sequences.items():  # the prompts, each alone, all but the last token
            forward_packed(model, store, [Row(slot, 0, len(tokens) - 1)], torch.tensor(tokens[:-1]), keep=[0])
        rows = [Row(slot, len(sequences[slot]) - 1, 1) for slot in slots]
        ids = torch.tensor([sequences[slot][-1] for slot in slots])
        logits = forward_packed(model, store, rows, ids, keep=list(range(len(rows)))).logits
    # (after the forward: a layout marks the memory its forward will zero as zeroed)
    assert PackedLayout(store, rows, torch.device("cpu")).in_order == in_order
    for row_logits, slot in zip(logits, slots):
        torch.testing.assert_close(row_logits, fresh_logits(reference, sequences[slot]), atol=ATOL, rtol=0)


def test_rollback_is_forgetting_positions_and_fork_copies_a_prefix(pair):
    model, reference = pair
    store = KVStore(num_slots=4, slot_len=64)
    slot = store.allocate()
    tokens = [5, 6, 7, 8, 9, 10, 11]
    with torch.inference_mode():
        forward_packed(model, store, [Row(slot, 0, len(tokens))], torch.tensor(tokens), keep=[6])
    # Roll back to 4 positions and go on with other tokens: positions 4.. are overwritten.
    rolled = tokens[:4] + [40, 41]
    torch.testing.assert_close(
        store_logits(model, store, slot, 4, rolled), fresh_logits(reference, rolled), atol=ATOL, rtol=0
    )
    child = store.allocate()
    store.copy_prefix(slot, child, 3)
    forked = tokens[:3] + [50, 51, 52]
    torch.testing.assert_close(
        store_logits(model, store, child, 3, forked), fresh_logits(reference, forked), atol=ATOL, rtol=0
    )
    # The parent is untouched by the child.
    torch.testing.assert_close(
        store_logits(model, store, slot, 7, tokens + [60]), fresh_logits(reference, tokens + [60]), atol=ATOL, rtol=0
    )


def test_packed_forwards_skip_the_causal_lm_forward_only_where_its_logits_stay_the_same():
    """prepare_model lets packed forwards run the base model and the output embedding directly
    (every architecture above does, so every test here goes that way), except for a model whose
    head does more than its output embedding: there the full forward keeps its logits right."""
    reference = tiny_architecture("llama")

    class ScaledHead(type(reference)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    plain, scaled = twin(reference), twin(reference)
    scaled.__class__ = ScaledHead
    prepare_model(plain, lean=False)
    prepare_model(scaled, lean=False)
    assert split_forward(plain) is not None and split_forward(scaled) is None
    tokens = [3, 4, 5]
    for model, factor in ((plain, 1), (scaled, 2)):
        store = KVStore(num_slots=2, slot_len=16)
        with torch.inference_mode():
            got = forward_packed(model, store, [Row(store.allocate(), 0, 3)], torch.tensor(tokens), keep=[2]).logits
        torch.testing.assert_close(got[0], factor * fresh_logits(reference, tokens), atol=ATOL, rtol=0)


def test_scattered_slots_take_the_gather_path_and_agree():
    reference = tiny_architecture("llama")
    model = twin(reference)
    prepare_model(model)
    store = KVStore(num_slots=32, slot_len=32)
    far = [0, 31]  # a range far wider than the rows: gathered
    assert 32 > SPARSE_RANGE_FACTOR * len(far)
    sequences = [[3, 4, 5], [7, 8]]
    with torch.inference_mode():
        out = forward_packed(
            model, store, [Row(far[0], 0, 3), Row(far[1], 0, 2)], torch.tensor([3, 4, 5, 7, 8]), keep=[2, 4]
        ).logits
    for logits, tokens in zip(out, sequences):
        torch.testing.assert_close(logits, fresh_logits(reference, tokens), atol=ATOL, rtol=0)


def test_store_slots_are_reused_lowest_first_and_bounded():
    store = KVStore(num_slots=3, slot_len=8)
    assert [store.allocate() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(MemoryError, match="all 3 KV slots are in use"):
        store.allocate()
    store.free(1)
    store.free(0)
    assert store.allocate() == 0 and store.slots_in_use == 2


def test_non_attention_layers_are_refused_naming_the_model_type():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=100)
    )
    with pytest.raises(UnsupportedModel, match="model type 'mamba'.*cannot be rolled back"):
        prepare_model(model)


def test_attention_the_store_cannot_express_is_refused():
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.Gemma2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=100,
        )
    )
    with pytest.raises(UnsupportedModel, match="model type 'gemma2'.*soft-capping"):
        prepare_model(model)
    # A refused model is left as it was: its own forward still works.
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))


def test_memory_never_written_is_never_read_into_a_result():
    """The store is allocated uninitialised (the OS backs only what is touched); a forward reads
    positions past a shorter row's end (masked) and the idle slots of its range. Memory that
    holds NaN there must not leak into any row (a mask does not cancel it: 0 x NaN is NaN)."""
    reference = tiny_architecture("llama")
    model = twin(reference)
    prepare_model(model)
    store = KVStore(num_slots=4, slot_len=32)
    with torch.inference_mode():
        forward_packed(model, store, [Row(store.allocate(), 0, 2)], torch.tensor([1, 2]), keep=[1])
    with torch.inference_mode():
        for tensor in store.keys + store.values:  # as if the allocator handed over garbage
            tensor.fill_(float("nan"))
    store.initialized = [0] * store.num_slots
    store.free(0)
    slots = [store.allocate() for _ in range(3)]
    sequences = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    rows = [Row(slots[0], 0, 5), Row(slots[2], 0, 3)]  # slot 1 idle inside the range
    with torch.inference_mode():
        out = forward_packed(model, store, rows, torch.tensor(sequences[0] + sequences[2]), keep=[4, 7]).logits
    torch.testing.assert_close(out[0], fresh_logits(reference, sequences[0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], fresh_logits(reference, sequences[2]), atol=ATOL, rtol=0)


def test_reserve_allocates_every_layer_and_leaves_the_store_empty():
    model = tiny_architecture("qwen3")
    prepare_model(model)
    store = KVStore(num_slots=3, slot_len=16)
    store.reserve(model)
    assert len(store.keys) == model.config.num_hidden_layers and store.slots_in_use == 0
    assert tuple(store.keys[0].shape) == (3, model.config.num_key_value_heads, 16, model.config.head_dim)
    from specpipe.kv_store import bytes_per_position

    assert bytes_per_position(model) == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, 16 dims, fp32


def test_the_written_out_forward_is_kept_only_for_the_models_it_reproduces(monkeypatch):
    """Llama and Qwen2 with static rotary embeddings get it; another family, a rotary kind that
    changes per forward or rescales, another activation, a layer with a sliding window do not; and
    one that would give other logits than the model's own is dropped by the start-up check."""
    from specpipe import lean_forward as lean_module

    assert lean_module.lean_forward(tiny_architecture("llama")) is not None
    assert lean_module.lean_forward(tiny_architecture("qwen2")) is not None
    for other in ("qwen3", "mistral", "phi3", "gpt2"):
        assert lean_module.lean_forward(tiny_architecture(other)) is None, other
    for change in (
        lambda m: setattr(m.model.rotary_emb, "rope_type", "dynamic"),
        lambda m: setattr(m.model.rotary_emb, "attention_scaling", 1.5),
        lambda m: setattr(m.config, "hidden_act", "gelu"),
        lambda m: setattr(m.model.layers[0].self_attn, "sliding_window", 4),
    ):
        model = tiny_architecture("llama")
        change(model)
        assert lean_module.lean_forward(model) is None
    off_by_one = lean_module.lean_forward  # a forward whose logits are not the model's own

    def wrong(model):
        forward = off_by_one(model)
        return lambda *args: forward(*args) + 0.01

    monkeypatch.setattr(lean_module, "lean_forward", wrong)
    model = twin(tiny_architecture("llama"))
    prepare_model(model, lean=True)
    assert LEAN_FORWARD not in model.__dict__


def test_the_written_out_forward_multiplies_through_each_linear_s_own_layout():
    """A Linear that picks between weight layouts by token count (use_weight_layout "both") still
    picks in the written-out forward: a forward of 1 token multiplies the row-major weights (the
    model's own logits), one of more than ROW_MAJOR_MAX_TOKENS the column-major copies (told apart
    by zeroing the copies: the layers' projections then give 0, as in a model whose layers' weights
    are 0; the output layer, over the one position kept, still multiplies row-major)."""
    from specpipe.models import ROW_MAJOR_MAX_TOKENS, TwoLayoutLinear, use_weight_layout

    reference = tiny_architecture("llama")
    model = twin(reference)
    use_weight_layout(model, "both")
    prepare_model(model, lean=True)
    assert LEAN_FORWARD in model.__dict__
    for module in model.modules():
        if isinstance(module, TwoLayoutLinear):
            module.column_weight = torch.zeros_like(module.column_weight)
    store = KVStore(num_slots=4, slot_len=32)
    tokens = [5, 9, 2, 7, 11]
    one = store_logits(model, store, store.allocate(), 0, tokens[:1])
    torch.testing.assert_close(one, fresh_logits(reference, tokens[:1]), atol=ATOL, rtol=0)
    many = tokens[: ROW_MAJOR_MAX_TOKENS + 1]
    layers_off = twin(reference)
    for name, module in layers_off.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
            module.weight.data.zero_()
    zeroed = store_logits(model, store, store.allocate(), 0, many)
    torch.testing.assert_close(zeroed, fresh_logits(layers_off, many), atol=ATOL, rtol=0)
