"""Drafters: what proposes the next token of many branches at once (the seam of transformers'
CandidateGenerator: propose, then be told what was kept).

The draft engine (draft_worker/engine.py) owns the protocol: requests, branches and their tokens,
drafting jobs, epochs, sampling and the messages. A drafter owns only what makes proposing cheap
for its kind, keyed by (request_id, branch_id), and is told of every change to a branch's tokens:
`open` (a prompt), `fork` (a branch from a prefix of another), `truncate` (a rollback), `close`.
`propose` gets the branches to advance with their tokens and returns next-token logits for those
it can advance this step.

- `ModelDrafter`: a causal LM over the batched KV store (specpipe/kv_store.py): every branch of
  every request in one packed forward; a fork copies its prefix into a slot of its own.
- `NgramDrafter`: prompt lookup (no model): the token that followed the most recent earlier
  occurrence of the branch's last n tokens, proposed with certainty; no match, no proposal.

A drafter knows nothing of sockets, epochs or sampling parameters.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from specpipe.kv_store import KVStore, Row, forward_packed

BranchKey = tuple[str, int]  # (request_id, branch_id)
# Prompt lookup: the longest and shortest suffix (in tokens) looked up in the branch's history.
NGRAM_MAX, NGRAM_MIN = 3, 1


class Drafter(Protocol):
    vocab_size: int

    def open(self, key: BranchKey, tokens: list[int]) -> None: ...
    def fork(self, parent: BranchKey, key: BranchKey, position: int) -> None: ...
    def truncate(self, key: BranchKey, length: int) -> None: ...
    def close(self, key: BranchKey) -> None: ...

    def propose(self, branches: list[tuple[BranchKey, list[int]]]) -> dict[BranchKey, torch.Tensor | None]:
        """{key: [vocab] logits of the token after `tokens`} for the branches it advances now; None
        for a branch it cannot advance at all (its job ends); no entry for one it is still feeding."""

    def capacity(self) -> tuple[int, int, int]:
        """(sequences it can hold, sequences held, positions per sequence)."""

    def fed_tokens(self) -> int:
        """Tokens the last `propose` fed to a model (0 for a drafter without one)."""


class ModelDrafter:
    """A draft model over a KVStore: a slot per branch; per branch, how many of its tokens are
    cached (the rest are fed with the next step, at most `chunk` of them per step, so a long
    prompt is prefilled in chunks beside the other branches' steps)."""

    def __init__(self, model, store: KVStore, device: torch.device, chunk: int):
        self.model, self.store, self.device, self.chunk = model, store, device, chunk
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.slots: dict[BranchKey, int] = {}
        self.cached: dict[BranchKey, int] = {}
        self._fed = 0

    def open(self, key: BranchKey, tokens: list[int]) -> None:
        assert key not in self.slots, f"branch {key} exists already"
        if len(tokens) > self.store.slot_len:
            raise ValueError(f"a prompt of {len(tokens)} tokens does not fit a KV slot of {self.store.slot_len}")
        self.slots[key], self.cached[key] = self.store.allocate(), 0

    def fork(self, parent: BranchKey, key: BranchKey, position: int) -> None:
        self.open(key, [])
        length = min(self.cached[parent], position)
        self.store.copy_prefix(self.slots[parent], self.slots[key], length)
        self.cached[key] = length

    def truncate(self, key: BranchKey, length: int) -> None:
        self.cached[key] = min(self.cached[key], length)

    def close(self, key: BranchKey) -> None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            del self.cached[key]
            self.store.free(slot)

    def propose(self, branches: list[tuple[BranchKey, list[int]]]) -> dict[BranchKey, torch.Tensor]:
        rows, ids, keep, proposing = [], [], [], []
        # In slot order: where the slots are contiguous, the step's queries are the attention block
        # as they come (kv_store.PackedLayout.in_order).
        for key, tokens in sorted(branches, key=lambda branch: self.slots[branch[0]]):
            assert len(tokens) < self.store.slot_len, f"branch {key} would run past its KV slot"
            self.cached[key] = min(self.cached[key], len(tokens) - 1)  # the last token is always fed
            fed = tokens[self.cached[key] : self.cached[key] + self.chunk]
            rows.append(Row(self.slots[key], self.cached[key], len(fed)))
            ids += fed
            if self.cached[key] + len(fed) == len(tokens):  # all in: it can propose
                keep.append(len(ids) - 1)
                proposing.append(key)
            self.cached[key] += len(fed)
        self._fed = len(ids)
        if not rows:
            return {}
        with torch.inference_mode():
            out = forward_packed(
                self.model, self.store, rows, torch.tensor(ids, dtype=torch.long, device=self.device), keep
            )
        return dict(zip(proposing, out.logits))

    def capacity(self) -> tuple[int, int, int]:
        return self.store.num_slots, self.store.slots_in_use, self.store.slot_len

    def fed_tokens(self) -> int:
        return self._fed


class NgramDrafter:
    """Prompt lookup decoding: no model, no state beyond the branches' own tokens."""

    def __init__(self, vocab_size: int, max_len: int):
        self.vocab_size, self.max_len = vocab_size, max_len
        self.open_keys: set[BranchKey] = set()

    def open(self, key: BranchKey, tokens: list[int]) -> None:
        self.open_keys.add(key)

    def fork(self, parent: BranchKey, key: BranchKey, position: int) -> None:
        self.open_keys.add(key)

    def truncate(self, key: BranchKey, length: int) -> None:
        pass

    def close(self, key: BranchKey) -> None:
        self.open_keys.discard(key)

    def propose(self, branches: list[tuple[BranchKey, list[int]]]) -> dict[BranchKey, torch.Tensor | None]:
        proposals: dict[BranchKey, torch.Tensor | None] = {}
        for key, tokens in branches:
            token = lookup(tokens)
            proposals[key] = None
            if token is not None:
                logits = torch.full((self.vocab_size,), -math.inf)
                logits[token] = 0.0  # a certain proposal: q is one-hot
                proposals[key] = logits
        return proposals

    def capacity(self) -> tuple[int, int, int]:
        return len(self.open_keys), len(self.open_keys), self.max_len

    def fed_tokens(self) -> int:
        return 0


def lookup(tokens: list[int]) -> int | None:
    """The token after the most recent earlier occurrence of the longest suffix of `tokens` (of
    NGRAM_MAX down to NGRAM_MIN tokens) that occurred before; None when none did."""
    for size in range(min(NGRAM_MAX, len(tokens) - 1), NGRAM_MIN - 1, -1):
        suffix = tokens[-size:]
        for start in range(len(tokens) - size - 1, -1, -1):
            if tokens[start : start + size] == suffix:
                return tokens[start + size]
    return None
