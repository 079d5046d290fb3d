"""A per-request (per-branch) KV cache over transformers' DynamicCache: append, roll back, fork.

The cache holds the keys and values of `length` tokens. `forward` appends tokens by running the
model over them; `rollback(length)` drops everything after `length` tokens; `fork(length)` gives
a new, independent cache of the first `length` tokens for a branch.

Forking is copy-on-write in effect: transformers' DynamicLayer never writes into its tensors in
place (`update` concatenates into new tensors, `crop` slices), so a fork can start from views of
its parent's tensors and neither side can see the other's later appends or rollbacks.

Only full-attention caches are supported (every layer a plain DynamicLayer); that is what rollback
to an arbitrary length needs. This module knows nothing about requests, sockets or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class StepOutput:
    logits: torch.Tensor               # [batch, num_tokens, vocab] float32
    hidden: torch.Tensor | None = None  # [batch, num_tokens, hidden] last layer, when asked for


def _layer_from(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


class KVCache:
    """The KV entries of one sequence (batch row 0 of a DynamicCache)."""

    def __init__(self, cache: DynamicCache | None = None):
        self.cache = cache if cache is not None else DynamicCache()

    def __repr__(self) -> str:
        return f"KVCache(length={self.length}, layers={len(self.cache.layers)})"

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def rollback(self, length: int) -> None:
        """Keep the first `length` tokens. transformers 5.x crop takes a negative count."""
        assert 0 <= length <= self.length, f"rollback to {length} outside [0, {self.length}]"
        if length < self.length:
            self.cache.crop(length - self.length)

    def fork(self, length: int | None = None) -> "KVCache":
        """An independent cache of the first `length` tokens (all when None)."""
        length = self.length if length is None else length
        assert 0 <= length <= self.length, f"fork at {length} outside [0, {self.length}]"
        if length == 0:
            return KVCache()
        layers = [_layer_from(layer.keys[..., :length, :], layer.values[..., :length, :])
                  for layer in self.cache.layers]
        return KVCache(_cache_of(layers))

    def forward(self, model, input_ids: torch.Tensor, want_hidden: bool = False) -> StepOutput:
        """Run `model` over input_ids [1, num_tokens], appending their KV entries."""
        return forward_batch(model, [self], input_ids, want_hidden)


def _cache_of(layers: list[DynamicLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache


def forward_batch(model, caches: list[KVCache], input_ids: torch.Tensor,
                  want_hidden: bool = False) -> StepOutput:
    """One forward over several sequences, batched; their caches may differ in length.

    input_ids: [len(caches), num_tokens]. Caches of unequal length are left-padded to the longest
    for this forward (keys already carry their rotary positions, so padding after the fact is
    harmless), the padding masked out by a 2D attention mask and each row given its own positions.
    Each cache gets its own rows' KV entries appended; the batched tensors are split back into
    per-sequence views with the padding dropped (no copy).
    """
    assert input_ids.dim() == 2 and input_ids.shape[0] == len(caches), "one row of input_ids per cache"
    lengths = [c.length for c in caches]
    longest, num_tokens, device = max(lengths), input_ids.shape[1], input_ids.device
    pads = [longest - length for length in lengths]
    if len(caches) == 1:
        cache = caches[0].cache
    elif longest == 0:
        cache = DynamicCache()
    else:
        cache = _cache_of([
            _layer_from(_stack_padded([c.cache.layers[i].keys for c in caches], pads),
                        _stack_padded([c.cache.layers[i].values for c in caches], pads))
            for i in range(len(caches[0].cache.layers))])
    position_ids = torch.stack([torch.arange(length, length + num_tokens, device=device) for length in lengths])
    attention_mask = None
    if any(pads):
        attention_mask = torch.ones(len(caches), longest + num_tokens, dtype=torch.long, device=device)
        for row, pad in enumerate(pads):
            attention_mask[row, :pad] = 0
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                use_cache=True, output_hidden_states=want_hidden)
    if len(caches) > 1:
        for row, (target, pad) in enumerate(zip(caches, pads)):
            target.cache = _cache_of([_layer_from(layer.keys[row:row + 1, :, pad:], layer.values[row:row + 1, :, pad:])
                                      for layer in cache.layers])
    hidden = out.hidden_states[-1] if want_hidden else None
    return StepOutput(logits=out.logits.float(), hidden=hidden)


def _stack_padded(tensors: list[torch.Tensor], pads: list[int]) -> torch.Tensor:
    """Concatenate [1, heads, length_i, dim] tensors along the batch, left-padding each by pads[i]."""
    if not any(pads):
        return torch.cat(tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, 0, pad, 0)) if pad else t for t, pad in zip(tensors, pads)])
