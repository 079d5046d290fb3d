"""Whether a model can run over the batched KV store, checked at start-up (specpipe/kv_store.py).

`prepare_model` routes the model's attention through the slot store after checking that it can
be: its layer kinds (attention only: a recurrent or linear-attention layer cannot be rolled back
to an arbitrary length by forgetting positions), its use of transformers' AttentionInterface, and
a packed forward over two random sequences, in two steps of unequal rows, that reproduces its own
plain forward; else UnsupportedModel names the model type and why. Then it keeps the faster
packed forwards (the base model and output embedding called directly; the layers written out,
specpipe/lean_forward.py) only where they give the model's own logits too.
"""

from __future__ import annotations

import math

import torch

from specpipe.kv_store import (
    ATTENTION_NAME,
    LEAN_FORWARD,
    SPLIT_FORWARD,
    KVStore,
    Row,
    UnsupportedModel,
    forward_packed,
)

# Layer kinds the store can serve: plain causal attention, and sliding-window attention (masked).
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}
# A packed forward must match the model's plain forward this closely at start-up (float32 logits
# of a random prompt; rounding of a different kernel order is ~1e-5).
CHECK_ATOL = 1e-3


def prepare_model(model, device: torch.device | str = "cpu", lean: bool = True) -> None:
    """Route the model's attention through the slot store, after checking that it can be: its
    layer kinds, its use of the AttentionInterface, and a packed forward that reproduces its own
    plain forward (else UnsupportedModel naming the model type and why). Then, where it gives the
    same logits, let packed forwards call the base model and the output embedding directly
    (`split_forward`), and with `lean` (both workers' default) run the layers written out
    (lean_forward.py)."""
    check_layer_types(model)
    model_type = model.config.get_text_config(decoder=True).model_type
    if not model._can_set_attn_implementation():
        raise UnsupportedModel(
            f"model type {model_type!r} does not route its attention through transformers' "
            f"AttentionInterface, so it cannot read the batched KV store"
        )
    sequences, expected = _reference_logits(model, device)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        _check_packed(model, model_type, sequences, expected, device)
    except Exception:
        model.set_attn_implementation(before)
        raise
    _try_split_forward(model, model_type, sequences, expected, device)
    if lean:
        _try_lean_forward(model, model_type, sequences, expected, device)


def _try_split_forward(model, model_type: str, sequences, expected, device) -> None:
    """A packed forward may skip the causal LM's own forward (its wrappers cost a small model a
    tenth of its step: demo draft, one token, 0.87x the time) and run the base model, then the
    output embedding over the kept positions, when the two checks of `_check_packed` give the
    model's own logits that way too. A head that does more than the output embedding (a logit
    scale, soft-capping) fails the check and keeps the full forward."""
    base, head = getattr(model, "base_model", model), model.get_output_embeddings()
    if base is model or head is None:
        return
    _keep_if_exact(model, SPLIT_FORWARD, (base, head), model_type, sequences, expected, device)


def _try_lean_forward(model, model_type: str, sequences, expected, device) -> None:
    """Packed forwards run the model's layers written out (specpipe/lean_forward.py) when it has
    them and they give the model's own logits in the two checks of `_check_packed`."""
    from specpipe.lean_forward import lean_forward

    forward = lean_forward(model)
    if forward is not None:
        _keep_if_exact(model, LEAN_FORWARD, forward, model_type, sequences, expected, device)


def _keep_if_exact(model, name: str, value, model_type: str, sequences, expected, device) -> None:
    """Set the model attribute `name` (a plain attribute, not a registered submodule), and keep it
    only if packed forwards still give the model's own logits (`_check_packed`) with it."""
    model.__dict__[name] = value
    try:
        _check_packed(model, model_type, sequences, expected, device)
    except UnsupportedModel:
        del model.__dict__[name]


def check_layer_types(model) -> None:
    config = model.config.get_text_config(decoder=True)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= SUPPORTED_LAYER_TYPES:
        raise UnsupportedModel(
            f"model type {config.model_type!r} has {sorted(kinds - SUPPORTED_LAYER_TYPES)} layers: their state "
            f"cannot be rolled back to an arbitrary length, which speculative decoding needs"
        )


def _reference_logits(model, device) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Two random sequences and the model's own logits over them (plain forward, no cache)."""
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, vocab, (length,), generator=generator).tolist() for length in (7, 4)]
    with torch.inference_mode():
        expected = [model(torch.tensor([s], device=device), use_cache=False).logits[0].float() for s in sequences]
    return sequences, expected


def _check_packed(model, model_type: str, sequences: list[list[int]], expected: list[torch.Tensor], device) -> None:
    """The two sequences through a small store, packed, in two steps of unequal rows: the logits
    must equal the plain forward's."""
    store = KVStore(num_slots=4, slot_len=16, device=device)
    slots = [store.allocate() for _ in sequences]
    try:
        with torch.inference_mode():
            first = [Row(slots[0], 0, 5), Row(slots[1], 0, 2)]
            ids = torch.tensor(sequences[0][:5] + sequences[1][:2], device=device)
            got_first = forward_packed(model, store, first, ids, keep=[4, 6]).logits
            second = [Row(slots[0], 5, 2), Row(slots[1], 2, 2)]
            ids = torch.tensor(sequences[0][5:] + sequences[1][2:], device=device)
            got_second = forward_packed(model, store, second, ids, keep=[0, 1, 2, 3]).logits
    except UnsupportedModel as err:
        raise UnsupportedModel(f"model type {model_type!r}: {err}") from None
    except Exception as err:
        raise UnsupportedModel(
            f"model type {model_type!r} cannot run over the batched KV store: {type(err).__name__}: {err}"
        ) from err
    pairs = [
        (got_first[0], expected[0][4]),
        (got_first[1], expected[1][1]),
        (got_second[0], expected[0][5]),
        (got_second[1], expected[0][6]),
        (got_second[2], expected[1][2]),
        (got_second[3], expected[1][3]),
    ]
    worst = max(float((got - want).abs().max()) for got, want in pairs)
    if not math.isfinite(worst) or worst > CHECK_ATOL:
        raise UnsupportedModel(
            f"model type {model_type!r}: a packed forward over the batched KV store differs "
            f"from its own forward by {worst:.3g} (its attention does not go through the cache "
            f"and attention interface as expected)"
        )
