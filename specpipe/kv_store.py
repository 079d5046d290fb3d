"""A KV store built for batching: one slot per sequence, packed forwards over any set of slots.

The store holds, per layer, keys and values as [num_slots, kv_heads, slot_len, head_dim]
tensors, allocated once (lazily, at the first forward, from the shapes the model produces). A
sequence owns a slot; how many of its positions are valid is the caller's business (a length per
sequence): rolling back is forgetting a length, forking is copying a prefix into another slot.

A forward (`forward_packed`) runs the model once over the new tokens of many sequences at once,
packed into one row (batch 1, no padding: a prefill chunk of 64 tokens beside verify blocks of 5
costs 74 tokens of compute, not 6 x 64). Each layer writes its new keys and values into the
sequences' slots at their positions, then attends with a registered transformers attention
function ("specpipe_slots") that reads the slots in place: the queries are scattered into a small
[rows, heads, q_max, head_dim] block and one scaled_dot_product_attention call runs over a view
of the store's contiguous slot range (no copy of any cache; a slot in the range with nothing to do
this step is computed against its first key and discarded). Only when the slots of a forward are
scattered thinly over the store (more than SPARSE_RANGE_FACTOR times as many slots in the range as
rows) are their keys and values gathered instead.

Any causal LM whose attention goes through transformers' AttentionInterface and updates its cache
with `cache.update(keys, values, layer_idx)` runs on it (Llama, Mistral, Qwen2/3, Phi-3, GPT-2,
GPT-NeoX, OPT, ...): `model_check.prepare_model` runs a packed forward against the model's own
plain forward at start-up and refuses a model that does not match, naming its type and why (a
layer kind that is not attention, such as recurrent or linear-attention layers, cannot be rolled
back to an arbitrary length by forgetting positions). Sliding-window layers are served by masking (the store keeps
every position, so any rollback stays possible).

This module knows nothing about requests, sampling or sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

ATTENTION_NAME = "specpipe_slots"
# Gather the slots' keys instead of reading a view of their range when the range holds more than
# this many slots per row of the forward (the idle slots' attention would cost more than the copy).
SPARSE_RANGE_FACTOR = 2
# The model attribute holding (base model, output embedding) when packed forwards call them directly.
SPLIT_FORWARD = "_specpipe_split_forward"
# The model attribute holding its written-out packed forward (specpipe/lean_forward.py), if any.
LEAN_FORWARD = "_specpipe_lean_forward"
# On a GPU, the share of the free memory the KV store may take (the rest: activations of a batch).
KV_MEMORY_SHARE = 0.8


class UnsupportedModel(ValueError):
    """The model cannot run over the slot store; the message names its type and why."""


class KVStore:
    """Per-layer keys and values of `num_slots` sequences of up to `slot_len` positions."""

    def __init__(self, num_slots: int, slot_len: int, device: torch.device | str = "cpu"):
        assert num_slots >= 1 and slot_len >= 1, "a store needs a slot and a position"
        self.num_slots, self.slot_len, self.device = num_slots, slot_len, torch.device(device)
        self.keys: list[torch.Tensor] = []  # per layer: [num_slots, kv_heads, slot_len, head_dim]
        self.values: list[torch.Tensor] = []
        self.free_slots = list(range(num_slots - 1, -1, -1))  # popped from the end: lowest first
        # Per slot, positions ever zeroed or written: an attention may read a slot's positions up to
        # the longest row of its forward (masked out), and memory never written may hold NaNs, which
        # a mask does not cancel (0 x NaN is NaN). So a slot is zeroed up to what a forward reads,
        # just in time: the OS backs only the pages a forward ever reached.
        self.initialized = [0] * num_slots

    def __repr__(self) -> str:
        shape = tuple(self.keys[0].shape) if self.keys else "unallocated"
        return f"KVStore(slots={self.num_slots}, slot_len={self.slot_len}, layers={len(self.keys)}, {shape})"

    @property
    def slots_in_use(self) -> int:
        return self.num_slots - len(self.free_slots)

    def allocate(self) -> int:
        if not self.free_slots:
            raise MemoryError(f"all {self.num_slots} KV slots are in use")
        return self.free_slots.pop()

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self.free_slots, f"slot {slot} is not in use"
        self.free_slots.append(slot)
        self.free_slots.sort(reverse=True)  # reuse low slots first: keeps live slots dense

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Slot `target` gets the first `length` positions of slot `source` (a fork)."""
        assert 0 <= length <= self.slot_len, f"copy of {length} positions outside the slot"
        with torch.inference_mode():  # (the tensors are inference tensors: made inside a forward)
            self._copy(source, target, length)
        self.initialized[target] = max(self.initialized[target], min(length, self.initialized[source]))

    def _copy(self, source: int, target: int, length: int) -> None:
        for keys, values in zip(self.keys, self.values):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def reserve(self, model) -> None:
        """Allocate every layer now (one forward of one token in slot 0, then forgotten)."""
        slot = self.allocate()
        try:
            with torch.inference_mode():
                forward_packed(
                    model, self, [Row(slot, 0, 1)], torch.zeros(1, dtype=torch.long, device=self.device), keep=[0]
                )
        finally:
            self.free(slot)

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's tensors, allocated at first use from a [1, kv_heads, T, head_dim] sample.
        Allocated with torch.empty: on the CPU the OS backs only the pages a sequence writes."""
        while len(self.keys) <= layer_idx:
            shape = (self.num_slots, like.shape[1], self.slot_len, like.shape[3])
            self.keys.append(torch.empty(shape, dtype=like.dtype, device=self.device))
            self.values.append(torch.empty(shape, dtype=like.dtype, device=self.device))
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass(frozen=True)
class Row:
    """One sequence's part of a packed forward: `num_tokens` new tokens written at positions
    `start` .. start + num_tokens - 1 of `slot`, attending to everything before them there."""

    slot: int
    start: int
    num_tokens: int


class PackedLayout:
    """Index tensors of one packed forward, built once and shared by every layer."""

    def __init__(self, store: KVStore, rows: list[Row], device: torch.device):
        assert rows and all(r.num_tokens >= 1 for r in rows), "every row feeds at least one token"
        assert len({r.slot for r in rows}) == len(rows), "a slot appears once per forward"
        assert all(r.start + r.num_tokens <= store.slot_len for r in rows), "a row runs past its slot"
        self.store = store
        self.kv_len = max(r.start + r.num_tokens for r in rows)
        self._masks: dict[int | None, torch.Tensor | None] = {}
        # One row (a lone request's step): the slot is read in place, no block to scatter into.
        self.single = rows[0] if len(rows) == 1 else None
        if self.single is not None:
            row = self.single
            self.num_tokens = self.q_max = row.num_tokens
            self.positions = torch.arange(row.start, row.start + row.num_tokens, device=device)  # [T]
            self.query_pos = self.positions[None]  # [1, T]
            self.zero_ranges = []  # it reads only positions it or earlier forwards wrote
            store.initialized[row.slot] = max(store.initialized[row.slot], self.kv_len)
            return
        counts = [r.num_tokens for r in rows]
        self.num_tokens, self.q_max = sum(counts), max(counts)
        slots = [r.slot for r in rows]
        low, high = min(slots), max(slots) + 1
        self.dense = high - low <= SPARSE_RANGE_FACTOR * len(rows)
        # Rows of the attention block: the slot range (dense), or the rows themselves (gathered).
        block_rows = [s - low for s in slots] if self.dense else list(range(len(rows)))
        num_block_rows = high - low if self.dense else len(rows)
        self.slot_range = (low, high)
        self.slot_index = torch.tensor(slots, device=device)  # [rows]
        # Per token, row after row: its slot, position, row of the attention block and offset in
        # it, built as one list and made one tensor (a step's layout costs a few tensor creations,
        # not a few per row).
        per_token = [
            (row.slot, row.start + offset, block_row, offset)
            for block_row, row in zip(block_rows, rows)
            for offset in range(row.num_tokens)
        ]
        self.token_slot, self.positions, self.token_block_row, self.token_offset = (
            torch.tensor(per_token, device=device).t().contiguous()
        )  # [T] each
        # One token per row, the block's rows in the rows' order: the queries are the block as they
        # are (no scatter into it, no gather out of it).
        self.in_order = self.q_max == 1 and block_rows == list(range(num_block_rows))
        # Query i of block row b sits at position row_start[b] + i; it sees keys at <= that.
        row_start = [0] * num_block_rows
        for block_row, row in zip(block_rows, rows):
            row_start[block_row] = row.start
        query_pos = torch.tensor(row_start)[:, None] + torch.arange(self.q_max)  # [B, q_max]
        self.query_pos = query_pos.to(device)
        key_pos = torch.arange(self.kv_len)
        self.causal = (key_pos[None, None, :] <= query_pos[:, :, None]).to(device)  # [B, q_max, kv_len]
        self.num_block_rows = num_block_rows
        # Slots this forward reads up to kv_len: those of the range (dense) or the rows (gathered).
        read = range(low, high) if self.dense else slots
        self.zero_ranges = [
            (slot, store.initialized[slot], self.kv_len) for slot in read if store.initialized[slot] < self.kv_len
        ]
        for slot, _, end in self.zero_ranges:
            store.initialized[slot] = end

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """[B, 1, q_max, kv_len] bool: causal, and within the window when there is one (None: a
        lone row's single query sees every position, no mask needed)."""
        if sliding_window not in self._masks:
            if self.single is not None:
                self._masks[sliding_window] = self._single_mask(sliding_window)
                return self._masks[sliding_window]
            allowed = self.causal
            if sliding_window:
                key_pos = torch.arange(self.kv_len, device=allowed.device)
                allowed = allowed & (key_pos[None, None, :] > self.query_pos[:, :, None] - sliding_window)
            self._masks[sliding_window] = allowed[:, None]
        return self._masks[sliding_window]

    def _single_mask(self, sliding_window: int | None) -> torch.Tensor | None:
        key_pos = torch.arange(self.kv_len, device=self.positions.device)
        if self.num_tokens == 1 and not (sliding_window and self.kv_len > sliding_window):
            return None
        allowed = key_pos[None, :] <= self.positions[:, None]  # [T, kv_len]
        if sliding_window:
            allowed = allowed & (key_pos[None, :] > self.positions[:, None] - sliding_window)
        return allowed[None, None]


class PackedCache:
    """What the model sees as its cache during one packed forward: `update` writes the new keys
    and values into the store and hands the layer's tensors on to the attention function."""

    def __init__(self, layout: PackedLayout):
        self.layout = layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layout = self.layout
        keys, values = layout.store.layer(layer_idx, key_states)
        if layout.single is not None:
            row = layout.single
            keys[row.slot, :, row.start : row.start + row.num_tokens] = key_states[0].to(keys.dtype)
            values[row.slot, :, row.start : row.start + row.num_tokens] = value_states[0].to(values.dtype)
            return keys, values
        for slot, begin, end in layout.zero_ranges:  # never-written memory it may read: zeroed
            keys[slot, :, begin:end] = 0
            values[slot, :, begin:end] = 0
        # [1, kv_heads, T, head_dim] -> [T, kv_heads, head_dim] at (slot, :, position) of each token
        keys[layout.token_slot, :, layout.positions] = key_states[0].transpose(0, 1).to(keys.dtype)
        values[layout.token_slot, :, layout.positions] = value_states[0].transpose(0, 1).to(values.dtype)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked by models that build positions themselves
        return 0


def slot_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    specpipe_layout: PackedLayout | None = None,
    sliding_window: int | None = None,
    **kwargs,
):
    """The registered attention function: query [1, heads, T, head_dim] of the packed tokens,
    key / value the layer's whole store [num_slots, kv_heads, slot_len, head_dim]. Returns
    ([1, T, heads, head_dim], None) as transformers' attention functions do."""
    layout = specpipe_layout
    assert layout is not None, "slot attention runs only inside forward_packed"
    if kwargs.get("softcap") is not None:
        raise UnsupportedModel("attention logit soft-capping is not supported by the slot store")
    heads, head_dim = query.shape[1], query.shape[3]
    if layout.single is not None:  # one row: its slot in place, its queries as they are
        slot = layout.single.slot
        out = _sdpa(
            query,
            key[slot : slot + 1, :, : layout.kv_len],
            value[slot : slot + 1, :, : layout.kv_len],
            layout.mask(sliding_window),
            scaling,
        )
        return out.transpose(1, 2), None  # [1, T, heads, head_dim]
    if layout.in_order:
        block = query[0].transpose(0, 1)[:, :, None]  # [B, heads, 1, head_dim]
    else:
        block = query.new_zeros(layout.num_block_rows, heads, layout.q_max, head_dim)
        block[layout.token_block_row, :, layout.token_offset] = query[0].transpose(0, 1)
    if layout.dense:
        low, high = layout.slot_range
        block_keys, block_values = key[low:high, :, : layout.kv_len], value[low:high, :, : layout.kv_len]
    else:
        block_keys = key[layout.slot_index, :, : layout.kv_len]
        block_values = value[layout.slot_index, :, : layout.kv_len]
    out = _sdpa(block, block_keys, block_values, layout.mask(sliding_window), scaling)  # [B, heads, q_max, head_dim]
    if layout.in_order:
        return out[:, :, 0][None], None  # [1, T, heads, head_dim]
    return out[layout.token_block_row, :, layout.token_offset][None], None  # [1, T, heads, head_dim]


def _sdpa(query, keys, values, mask, scaling):
    """scaled_dot_product_attention, with grouped-query heads expanded where the kernel needs it."""
    extra = {}
    heads = query.shape[1]
    if keys.shape[1] != heads:  # grouped-query attention
        if query.device.type == "cpu":
            extra["enable_gqa"] = True
        else:  # GPU kernels with a mask want equal heads
            repeat = heads // keys.shape[1]
            keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask, scale=scaling, **extra
    )


AttentionInterface.register(ATTENTION_NAME, slot_attention)


@dataclass
class PackedOutput:
    logits: torch.Tensor  # [num_kept, vocab] float32, in the order asked for
    hidden: torch.Tensor | None = None  # [num_kept, hidden] last layer, when asked for


def split_forward(model) -> tuple | None:
    """(base model, output embedding) when packed forwards call them directly, else None."""
    return model.__dict__.get(SPLIT_FORWARD)


def written_out_forward(model):
    """The model's written-out packed forward (specpipe/lean_forward.py) when packed forwards run
    it, else None."""
    return model.__dict__.get(LEAN_FORWARD)


def bytes_per_position(model) -> int:
    """KV bytes one position takes over all layers (keys and values), from the model's config."""
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype_bytes = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * dtype_bytes


def forward_packed(
    model, store: KVStore, rows: list[Row], input_ids: torch.Tensor, keep: list[int], want_hidden: bool = False
) -> PackedOutput:
    """One forward over the rows' new tokens, packed: input_ids [T] (row after row). `keep`:
    indices into the T tokens whose logits (and hidden states) are wanted."""
    device = input_ids.device
    layout = PackedLayout(store, rows, device)
    assert input_ids.shape == (layout.num_tokens,), f"{tuple(input_ids.shape)} ids for {layout.num_tokens} tokens"
    keep_index = torch.tensor(keep, dtype=torch.long, device=device)
    lean = written_out_forward(model)
    if lean is not None and not want_hidden:
        return PackedOutput(logits=lean(layout, input_ids, keep_index, PackedCache(layout), slot_attention).float())
    inputs = dict(
        input_ids=input_ids[None],
        position_ids=layout.positions[None],
        cache=PackedCache(layout),
        use_cache=True,
        specpipe_layout=layout,
    )
    split = split_forward(model)
    if split is not None and not want_hidden:
        base, head = split
        hidden = base(**inputs).last_hidden_state
        return PackedOutput(logits=head(hidden[0, keep_index]).float())
    out = model(**inputs, logits_to_keep=keep_index, output_hidden_states=want_hidden)
    hidden = out.hidden_states[-1][0, keep_index] if want_hidden else None
    return PackedOutput(logits=out.logits[0].float(), hidden=hidden)
