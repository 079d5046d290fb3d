"""What the target holds per request, and what one request asks of one iteration.

A `TargetRequest` owns the request's committed tokens, its KV slot and how many of its committed
tokens are cached there (`cached`; the rest are pending: fed with the next forward), the logits at
the next position when a block was kept without a bonus (`next_logits`), its queued verifies (run
in order: a queued block's staleness depends on the one before) and the length up to which it
decodes by itself (autoregressive, or target-only after the draft went down: `decode_until`; or
its first token, or after a rejection, until the next block comes: `fill_until`, as `may_fill`
allows).

`next_work` turns the request's state into at most one piece of work for an iteration: answer a
stale block (no compute), a prefill chunk (the prompt, or committed tokens piled up, fed in chunks
so one long prompt never stalls the other requests), a verify row (pending + draft tokens: those
left to verify when the block starts behind tokens the target decoded meanwhile,
specpipe/blocks.py), or a decode row. The engine packs the rows of every request into one forward. A prompt that fits one
chunk may wait a little for the request's first block (`holding`): prompt and block then cost one
forward instead of two.

This module knows nothing about models, sockets or the store's layout.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from specpipe.blocks import left_to_verify
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import SamplingParams


@dataclass
class TargetRequest:
    tokens: list[int]  # committed, prompt included
    slot: int
    sampling: SamplingParams
    seed: int
    handle: int  # the request's number on the data plane
    noise_vocab: int = 0  # drafter-invariant: the width of the Gumbel noise
    cached: int = 0  # tokens[:cached] have their KV in the slot
    next_logits: torch.Tensor | None = None  # [vocab] after tokens[-1], when cached == len(tokens)
    next_hidden: torch.Tensor | None = None  # [hidden] the last hidden state of that row, when kept
    verifies: deque = field(default_factory=deque)  # (Verify, queued_at), oldest first
    last_block_id: int = 0  # the last block verified (not stale) for it
    decoded: int = 0  # committed tokens it decoded by itself since it last verified a block
    decode_until: int = 0  # decode by itself up to this many tokens (Decode)
    fill_until: int = 0  # decode by itself up to this length until a block comes (Decode.until_block)
    prompt_length: int = 0  # (its start: nothing decided past the prompt yet, `may_fill`)
    prompt_left: int = 0  # prompt tokens not fed yet (their compute is prefill)
    unreported_prefill_s: float = 0.0  # prefill compute not yet sent with a verdict
    ready_since: float | None = None  # when its head work became ready (queue time)
    hold_until: float = 0.0  # its prompt waits for its first block until then (Prefill.hold_seconds)

    def __repr__(self) -> str:
        return (
            f"TargetRequest(tokens={len(self.tokens)}, cached={self.cached}, slot={self.slot}, "
            f"verifies={len(self.verifies)}, decode_until={self.decode_until}, fill_until={self.fill_until})"
        )

    @property
    def pending(self) -> list[int]:
        return self.tokens[self.cached :]

    def decodes_to(self) -> int:
        """The length it decodes to by itself now (0: none): `decode_until`, or `fill_until` while
        no block is queued for it; under the default sampling rule `fill_until` even with a block
        queued (its first token, `may_fill`: whether a decode or a verify draws it must not hang on
        when the draft's block came)."""
        if self.decode_until:
            return self.decode_until
        return 0 if self.verifies and self.sampling.drafter_free else self.fill_until

    def may_fill(self, max_length: int) -> bool:
        """Whether it may decode by itself up to `max_length` until a block comes (Decode.until_block),
        and have the block verified past what it decoded: greedy and drafter-invariant requests, whose
        decoded token is the very token a verify would emit; a request under the default rule only
        its first token, in the prompt's forward. That token is drawn from the target's law (by
        its seed at that position), and a block starting with it verifies on exactly (its next
        tokens were drafted given that token, its other blocks are stale). A verify would draw
        another token there, so whether to decode must not depend on the request's draws: decided
        before any, at its start (later, it would lean on its earlier ones); and, for a seeded
        request, not on the load either (the coordinator's part: its seed fixes its tokens)."""
        if self.sampling.drafter_free:
            return True
        return len(self.tokens) == self.prompt_length and max_length <= self.prompt_length + 1


@dataclass
class Work:
    """One request's part of an iteration. kind: prefill | verify | decode; or stale: its head
    block is to be answered stale (the engine answers those before it plans the iteration)."""

    request_id: str
    request: TargetRequest
    kind: str
    fed: list[int] = field(default_factory=list)  # tokens this forward feeds for it
    verify: worker_pb2.Verify | None = None
    queued_at: float = 0.0
    fed_prompt: int = 0  # how many of `fed` are prompt tokens
    draft: list[int] = field(default_factory=list)  # the verify's draft tokens left to verify

    def keep_offsets(self) -> list[int]:
        """Offsets into `fed` whose logits the work needs: the row before each draft token (when
        the last pending token is fed) and each draft token's own row; for a decode, the last."""
        if self.kind == "decode":
            return [len(self.fed) - 1] if self.fed else []
        if self.kind != "verify":
            return []
        first = len(self.fed) - len(self.draft) - 1  # the last pending token, or -1: kept logits
        return list(range(max(first, 0), len(self.fed)))


def holding(request: TargetRequest, now: float) -> bool:
    """The request's prompt waits for its first block, to go in the block's forward: nothing of it
    is cached, no block is queued yet, and the hold has not run out."""
    return request.cached == 0 and not request.verifies and now < request.hold_until


def head_is_stale(request: TargetRequest) -> bool:
    """The request's next queued block is to be answered stale: its assumption failed, or the
    request decodes by itself now (its drafts may never come)."""
    return bool(request.verifies) and bool(
        request.decode_until
        or block_is_stale(request.verifies[0][0], request.tokens, request.last_block_id, request.decoded)
    )


def block_is_stale(msg: worker_pb2.Verify, tokens: list[int], last_block_id: int, decoded: int = 0) -> bool:
    """A queued block whose assumption failed, given the committed `tokens`, the last block
    verified and how many tokens the target decoded by itself since (`decoded`, the last ones of
    `tokens`): the block it follows was not the last verified, or did not end where and with the
    token this one assumes (its verdict's end, not a decoded token: the coordinator decides from
    that verdict which blocks hold); or it starts behind decoded tokens that are not its own first
    ones (or cover all of it). A block may start behind decoded tokens only, never behind verified
    ones."""
    start, verified = msg.start_length, len(tokens) - decoded
    if msg.HasField("expect_last_token") and (
        start != verified
        or tokens[start - 1] != msg.expect_last_token
        or (msg.HasField("after_block_id") and msg.after_block_id != last_block_id)
    ):
        return True
    return start >= verified and left_to_verify(start, msg.draft_token_ids, tokens) is None


def next_work(
    request_id: str, request: TargetRequest, probs_ready, prefill_chunk: int, token_budget: int, data_timeout_s: float
) -> Work | None:
    """The request's next piece of work within `token_budget` fed tokens, or None (nothing ready).
    `probs_ready(request, verify)`: whether the draft's q of a sampled block have arrived."""
    pending, decodes = request.pending, request.decodes_to() > len(request.tokens)
    if request.verifies and head_is_stale(request):
        msg, queued_at = request.verifies[0]
        return Work(request_id, request, "stale", verify=msg, queued_at=queued_at)
    if request.verifies and not decodes:
        msg, queued_at = request.verifies[0]
        if len(pending) <= prefill_chunk:
            draft = left_to_verify(msg.start_length, msg.draft_token_ids, request.tokens) or []
            fed = pending + draft
            waited_out = time.monotonic() - queued_at > data_timeout_s
            sampled_ok = (
                request.sampling.greedy
                or request.sampling.coupled
                or not msg.draft_token_ids
                or probs_ready(request, msg)
            )
            if (sampled_ok or waited_out) and (fed or request.next_logits is not None) and len(fed) <= token_budget:
                return Work(request_id, request, "verify", fed=fed, verify=msg, queued_at=queued_at, draft=draft)
    elif decodes and len(pending) <= prefill_chunk:
        if len(pending) <= token_budget and (pending or request.next_logits is not None):
            return Work(request_id, request, "decode", fed=pending)
    if len(pending) > 1:  # prompt or piled-up tokens: a chunk, keeping the last pending
        if len(pending) <= prefill_chunk and holding(request, time.monotonic()):
            return None  # its first block comes soon: prompt and block in one forward
        size = min(prefill_chunk, len(pending) - 1, token_budget)
        if size > 0:
            return Work(request_id, request, "prefill", fed=pending[:size])
    return None
