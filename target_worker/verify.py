"""Verification of a draft block: greedy (argmax equality) and Leviathan rejection sampling.

Pure math: tensors in, tensors out. No sockets, logging, model calls or cache bookkeeping; the
caller brings the target's logits or processed probabilities for the block (one row per draft
token plus one more) and gets back how many draft tokens survive and the one token that follows.

Glossary (Leviathan, Kalman and Matias 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1; the same words as vLLM's RejectionSampler):

- accepted: a draft token the target keeps. `num_accepted` counts the accepted prefix of the
  block; verification stops at the first rejection, so later draft tokens are discarded even if
  they would have passed.
- corrected: the token emitted at the first rejected position in place of the draft token. Greedy:
  the target's argmax there. Sampling: a draw from norm(max(0, p - q)) at that position.
- bonus: when every draft token is accepted, the target's last row (num_draft_tokens) is a free
  next-token distribution; the bonus token is its argmax (greedy) or a draw from it (sampling).

Each round therefore emits num_accepted + 1 tokens: the accepted draft tokens, then
`next_token_ids` (the correction or the bonus).

Randomness: `rejection_sample` draws from generators (per block); `rejection_sample_at` takes it
explicitly, by position (`accept_uniforms`: the accept test at each draft position; `final_at`: the
generator of the draw of the correction or bonus, at whichever position it falls), so the caller
can key them by sequence position and a seed fixes the output however blocks are cut.

- coupled (drafter-invariant; Daliri, Musco and Suresh 2024, "Coupling without communication and
  drafter-invariant speculative decoding"): with Gumbel noise g shared by both sides at each
  position, the draft proposes argmax(log q + g) and the target's token is argmax(log p + g):
  accept while they agree, emit the target's at the first disagreement (or as the bonus). Every
  emitted token is argmax(log p + g), a draw from p, whatever the draft proposed: the output equals
  target-only sampling with the same noise. p is the target's processed distribution and q the
draft's, both from specpipe.sampling.logits_to_probs with the same SamplingParams, and q must be the
law the draft token was actually drawn from: then every emitted token is distributed exactly as
the target would sample it alone.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specpipe.sampling import Generators, draw_uniforms, first_argmax, sample_from_probs

# num_accepted [batch] -> one generator per row: the one of each row's final draw, at the
# position it falls at (start + num_accepted).
FinalGenerators = Callable[[torch.Tensor], Generators]


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: torch.Tensor  # [batch] int64, 0..num_draft_tokens
    next_token_ids: torch.Tensor  # [batch] int64: the correction, or the bonus when all accepted

    def __repr__(self) -> str:
        return f"VerifyResult(batch={self.num_accepted.shape[0]})"


def verify_greedy(
    draft_token_ids: torch.Tensor,  # [batch, num_draft_tokens] int64
    target_logits: torch.Tensor,  # [batch, num_draft_tokens + 1, vocab]
) -> VerifyResult:
    """Accept while the draft token equals the target's argmax; the next token is the argmax at
    the first mismatch (correction) or at the last row (bonus). Ties go to the lowest token id
    (the first maximum, as torch.argmax), as on the draft side."""
    _check_block(draft_token_ids, target_logits)
    num_draft_tokens = draft_token_ids.shape[1]
    target_token_ids = first_argmax(target_logits)  # [batch, num_draft_tokens + 1]
    matches = draft_token_ids == target_token_ids[:, :num_draft_tokens]
    num_accepted = _accepted_prefix_length(matches)
    # Row num_accepted is the first mismatch, or the bonus row when everything matched.
    next_token_ids = target_token_ids.gather(1, num_accepted[:, None]).squeeze(1)
    return VerifyResult(num_accepted=num_accepted, next_token_ids=next_token_ids)


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [batch, num_draft_tokens] int64
    draft_probs: torch.Tensor,  # [batch, num_draft_tokens, vocab] q, processed
    target_probs: torch.Tensor,  # [batch, num_draft_tokens + 1, vocab] p, processed
    generator: Generators,  # one for the batch, or one per row
) -> VerifyResult:
    """Leviathan et al. 2023, Algorithm 1, vectorised over batch and positions.

    Draft token x at position i is accepted iff u_i * q_i(x) < p_i(x), u_i ~ U[0, 1): the paper's
    test u_i < p_i(x) / q_i(x), i.e. acceptance with probability min(1, p/q), without the division.
    At the first rejected position j the correction is drawn from norm(max(0, p_j - q_j)); when all
    are accepted the bonus is drawn from p at row num_draft_tokens. num_draft_tokens may be 0.

    Order of draws, so that a seed reproduces a result: per generator, first the accept uniforms,
    then the final (correction or bonus) draw's race (sample_from_probs). With one generator that
    is torch.rand(batch, num_draft_tokens, float64), then the race's exponentials for the batch;
    with one generator per row, row i draws num_draft_tokens uniforms then its race from its own
    generator. The number of draws never depends on the outcome.

    Edge cases:
    - q_i(x) = 0 for a proposed token: the test accepts iff p_i(x) > 0 (the limit of min(1, p/q) as
      q -> 0+), and rejects a token the target forbids. If x was really drawn from q this has
      probability 0, so the output law is exactly p either way; the limit is the right reading of
      an underflowed q (true mass tiny but positive) and never emits a token with p(x) = 0.
    - residual all zeros at a rejected position (p <= q everywhere: possible only through
      rounding, since rejection has probability 0 when p == q): the correction falls back to p
      instead of dividing 0 by 0.
    Computation is in float64 internally; inputs are float32 as logits_to_probs returns them.
    """
    batch, num_draft_tokens = draft_token_ids.shape
    device = target_probs.device
    accept_uniforms = draw_uniforms(generator, batch, num_draft_tokens, device)  # [batch, k]
    return _rejection(draft_token_ids, draft_probs, target_probs, accept_uniforms, lambda num_accepted: generator)


def rejection_sample_at(
    draft_token_ids: torch.Tensor,  # [batch, num_draft_tokens] int64
    draft_probs: torch.Tensor,  # [batch, num_draft_tokens, vocab] q, processed
    target_probs: torch.Tensor,  # [batch, num_draft_tokens + 1, vocab] p, processed
    accept_uniforms: torch.Tensor,  # [batch, num_draft_tokens] float64: position i's accept test
    final_at: FinalGenerators,  # the final draw's generator per row, where it falls
) -> VerifyResult:
    """Algorithm 1 as `rejection_sample`, with the randomness given per position."""
    return _rejection(draft_token_ids, draft_probs, target_probs, accept_uniforms, final_at)


def verify_coupled(
    draft_token_ids: torch.Tensor,  # [batch, num_draft_tokens] int64, each argmax(log q + g)
    target_probs: torch.Tensor,  # [batch, num_draft_tokens + 1, vocab] p, processed
    noise: torch.Tensor,  # [batch, num_draft_tokens + 1, vocab] the Gumbel noise g at each position
) -> VerifyResult:
    """The drafter-invariant rule: greedy verification of the target's argmax(log p + g)."""
    assert noise.shape == target_probs.shape, f"noise {tuple(noise.shape)} for p {tuple(target_probs.shape)}"
    return verify_greedy(draft_token_ids, torch.log(target_probs.double()) + noise)


def _rejection(draft_token_ids, draft_probs, target_probs, accept_uniforms, final_at) -> VerifyResult:
    _check_block(draft_token_ids, target_probs)
    batch, num_draft_tokens = draft_token_ids.shape
    assert draft_probs.shape == (batch, num_draft_tokens, target_probs.shape[-1]), (
        f"draft_probs {tuple(draft_probs.shape)} does not match draft_token_ids "
        f"{tuple(draft_token_ids.shape)} and vocab {target_probs.shape[-1]}"
    )
    device = target_probs.device
    token_index = draft_token_ids[:, :, None]  # [batch, num_draft_tokens, 1]
    draft_token_probs = draft_probs.gather(2, token_index).squeeze(2).double()
    target_token_probs = target_probs[:, :num_draft_tokens].gather(2, token_index).squeeze(2).double()
    accepted = accept_uniforms.to(device) * draft_token_probs < target_token_probs  # [batch, k]
    num_accepted = _accepted_prefix_length(accepted)

    rows = torch.arange(batch, device=device)
    final_target_probs = target_probs[rows, num_accepted].double()  # [batch, vocab]
    if num_draft_tokens == 0:
        final_draft_probs = torch.zeros_like(final_target_probs)
    else:
        # A bonus row has no draft distribution: q = 0 there makes the residual p itself.
        final_draft_probs = draft_probs[rows, num_accepted.clamp(max=num_draft_tokens - 1)].double()
        is_bonus = (num_accepted == num_draft_tokens)[:, None]
        final_draft_probs = final_draft_probs.masked_fill(is_bonus, 0.0)
    residual = (final_target_probs - final_draft_probs).clamp_(min=0.0)  # [batch, vocab]
    residual_is_empty = residual.sum(dim=-1, keepdim=True) == 0
    residual = torch.where(residual_is_empty, final_target_probs, residual)
    next_token_ids = sample_from_probs(residual, final_at(num_accepted))  # (unnormalised rows are fine)
    return VerifyResult(num_accepted=num_accepted, next_token_ids=next_token_ids)


def _accepted_prefix_length(accepted: torch.Tensor) -> torch.Tensor:
    """[batch, num_draft_tokens] bool -> [batch] int64: the number of leading True values."""
    return torch.cumprod(accepted.long(), dim=1).sum(dim=1)


def _check_block(draft_token_ids: torch.Tensor, target_rows: torch.Tensor) -> None:
    assert draft_token_ids.dtype == torch.int64, f"draft_token_ids is {draft_token_ids.dtype}"
    assert draft_token_ids.dim() == 2 and target_rows.dim() == 3, (
        f"want [batch, k] ids and [batch, k + 1, vocab] target rows, got "
        f"{tuple(draft_token_ids.shape)} and {tuple(target_rows.shape)}"
    )
    batch, num_draft_tokens = draft_token_ids.shape
    assert target_rows.shape[:2] == (batch, num_draft_tokens + 1), (
        f"target rows {tuple(target_rows.shape)} for draft ids {tuple(draft_token_ids.shape)}"
    )
