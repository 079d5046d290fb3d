"""A request's verdict from the rows of the target's forward (target_worker/engine.py runs the
forward): the verify of a block, accepted or rejected by the rule its sampling picks
(target_worker/verify.py has the math), the request's tokens extended and its cache rolled back to
the accepted prefix; or a token the target decoded by itself, a verification of an empty block.

Randomness is keyed by the sequence position a draw decides (specpipe.sampling): the uniform that
accepts or rejects the draft token at position t by (seed, t, STREAM_ACCEPT), the race that draws
the target's own token at t by (seed, t, STREAM_FINAL), the drafter-invariant noise at t by
(seed, t); so a seeded request's tokens do not depend on where its blocks were cut or what ran
beside it. A decoded token at position t is a verification of an empty block there: for greedy
and drafter-invariant requests the very token a verify would emit, which is why only they may fill
the wait for a block by decoding (Decode.until_block) and have the block verified past those
tokens.

For sampling, the draft's q of a block come from the data plane's table (specpipe.dataplane); the
engine runs a block once they are all in, or once DATA_TIMEOUT_S has passed, and then it fails here.
"""

from __future__ import annotations

import torch

from specpipe import wire
from specpipe.dataplane import ProbsTable
from specpipe.proto.specpipe.worker.v1 import worker_pb2
from specpipe.sampling import (
    STREAM_ACCEPT,
    STREAM_FINAL,
    gumbel_noise,
    logits_to_probs,
    make_generator,
    position_uniforms,
)
from specpipe.target_worker.requests import TargetRequest, Work
from specpipe.target_worker.verify import rejection_sample_at, verify_coupled, verify_greedy

# How long a verify may wait for its q on the data plane before it fails (the draft died, or the
# data plane is misconfigured).
DATA_TIMEOUT_S = 10.0


def request_rows(request: TargetRequest, output, want_hidden: bool):
    """([k + 1, vocab], [k + 1, hidden] or None): the forward's rows, with the kept logits in
    front when no pending token was fed (they predict the first draft token)."""
    logits, hidden = output if output is not None else (None, None)
    hidden = hidden if want_hidden else None
    if request.next_logits is None:
        assert logits is not None and logits.shape[0], "nothing predicts the first draft token"
        return logits, hidden
    kept_hidden = request.next_hidden[None] if want_hidden and request.next_hidden is not None else None
    if logits is None:
        return request.next_logits[None], kept_hidden
    hidden_rows = torch.cat([kept_hidden, hidden]) if kept_hidden is not None and hidden is not None else None
    return torch.cat([request.next_logits[None], logits]), hidden_rows


def verify_block(work: Work, output, table: ProbsTable, predictor=None, want_hidden: bool = False):
    """Decide the block's draft tokens left to verify (`work.draft`: all of them, unless the
    block starts behind tokens the target decoded by itself, which were its first ones)."""
    request, msg = work.request, work.verify
    if not len(request.tokens) - request.decoded <= msg.start_length <= len(request.tokens):
        raise ValueError(
            f"block {msg.block_id} starts at {msg.start_length}, committed length is {len(request.tokens)}"
            + (f" ({request.decoded} decoded by the target)" if request.decoded else "")
        )
    draft, skipped = work.draft, len(request.tokens) - msg.start_length
    rows, hidden_rows = request_rows(request, output, want_hidden)
    num_accepted, next_token = decide(request, len(request.tokens), draft, rows, table, msg)
    request.last_block_id, request.decoded, request.fill_until = msg.block_id, 0, 0
    if num_accepted == len(draft) and not msg.emit_bonus:
        request.tokens += draft
        request.next_logits = rows[-1]
        request.next_hidden = hidden_rows[-1] if hidden_rows is not None else None
        next_token, last_row = -1, num_accepted - 1  # the row that predicted the last accepted token
    else:
        start = len(request.tokens)
        request.tokens += draft[:num_accepted] + [next_token]
        request.cached = start + num_accepted  # roll back: forget the rejected positions
        request.next_logits = request.next_hidden = None
        last_row = num_accepted  # the row that predicted the correction or bonus
    table.drop_below(request.handle, len(request.tokens))
    verdict = worker_pb2.Verdict(
        request_id=work.request_id,
        block_id=msg.block_id,
        num_accepted=skipped + num_accepted,  # (counted from the block's start)
        next_token_id=next_token,
        committed_length=len(request.tokens),
        predicted_accept_length=-1.0,
    )
    frames: list[bytes] = []
    last_hidden = hidden_rows[last_row] if hidden_rows is not None and last_row >= 0 else None
    if msg.want_features and last_hidden is not None:
        wire.put_tensor(verdict.features, last_hidden.float(), frames)
    if msg.want_prediction and predictor is not None and last_hidden is not None:
        verdict.predicted_accept_length = predictor.predict(last_hidden)
    return verdict, frames


def decode_token(work: Work, output, table: ProbsTable) -> worker_pb2.Verdict:
    """One token decoded by the target alone: a verification of an empty block."""
    request = work.request
    rows, _ = request_rows(request, output, want_hidden=False)
    _, token = decide(request, len(request.tokens), [], rows[-1:], table)
    request.tokens.append(token)
    request.decoded += 1
    request.next_logits = request.next_hidden = None
    return worker_pb2.Verdict(
        request_id=work.request_id,
        decoded=True,
        num_accepted=0,
        next_token_id=token,
        committed_length=len(request.tokens),
        predicted_accept_length=-1.0,
    )


def decide(
    request: TargetRequest, start: int, draft: list[int], rows: torch.Tensor, table: ProbsTable, msg=None
) -> tuple[int, int]:
    """Accept/reject `draft` (at positions start...; `msg`: its Verify, None for a decoded
    token): (num_accepted, next token) from the target's rows [k + 1, vocab]. Sampled draws are
    keyed by the sequence position they decide, never by the block; they are drawn on the CPU
    (the same on every device) and moved to the rows' device."""
    device = rows.device
    draft_ids = torch.tensor([draft], dtype=torch.long, device=device)
    sampling = request.sampling
    if sampling.greedy:
        result = verify_greedy(draft_ids, rows[None])
    elif sampling.coupled:
        target_probs = padded(logits_to_probs(rows, sampling), request.noise_vocab)
        noise = torch.stack(
            [gumbel_noise(request.seed, start + i, target_probs.shape[-1]) for i in range(len(draft) + 1)]
        ).to(device)
        result = verify_coupled(draft_ids, target_probs[None], noise[None])
    else:
        target_probs = logits_to_probs(rows, sampling)[None]
        draft_probs = draft_probs_of(table, request, msg, range(start, start + len(draft)), rows)
        accept = position_uniforms(request.seed, range(start, start + len(draft)), STREAM_ACCEPT).to(device)

        def final_at(num_accepted: torch.Tensor) -> list[torch.Generator]:  # (where the draw falls)
            return [make_generator(request.seed, start + int(num_accepted[0]), STREAM_FINAL)]

        result = rejection_sample_at(draft_ids, draft_probs, target_probs, accept[None], final_at)
    return int(result.num_accepted[0]), int(result.next_token_ids[0])


def padded(probs: torch.Tensor, width: int) -> torch.Tensor:
    """[..., vocab] probs to the noise's width (zeros past the head: tokens that never win)."""
    if not width or width == probs.shape[-1]:
        return probs
    if width > probs.shape[-1]:
        return torch.nn.functional.pad(probs, (0, width - probs.shape[-1]))
    return probs[..., :width]


def draft_probs_of(
    table: ProbsTable, request: TargetRequest, msg, positions: range, rows: torch.Tensor
) -> torch.Tensor:
    """[1, num_draft, vocab] q of the draft tokens at `positions` from the data plane, on the
    device of the target's `rows` [k + 1, vocab], zero-padded to their width when the draft's head
    is narrower (padding rows have no mass)."""
    vocab, device = rows.shape[-1], rows.device
    if not positions:
        return torch.zeros(1, 0, vocab, device=device)
    if not table.ready(request.handle, msg.branch_id, msg.epoch, positions):
        raise TimeoutError(
            f"the draft's q for block {msg.block_id} did not arrive on the data plane within {DATA_TIMEOUT_S:.0f}s"
        )
    draft_probs = table.pop(request.handle, msg.branch_id, msg.epoch, positions).to(device).float()
    if draft_probs.shape[-1] < vocab:
        draft_probs = torch.nn.functional.pad(draft_probs, (0, vocab - draft_probs.shape[-1]))
    assert draft_probs.shape == (len(positions), vocab), f"q of shape {tuple(draft_probs.shape)} for {len(positions)}"
    return draft_probs[None]
