"""Logits processing and seeded draws, shared by the draft and the target worker.

Contract: `logits_to_probs` is the ONE place where temperature, top-k and top-p are applied, so
the draft's q and the target's p are always processed identically, in float32 (speculative
sampling is lossless only if p and q are the distributions the two sides really sample from).
Greedy decoding (temperature 0) is not handled here: it is its own branch, an argmax, never a tiny
temperature, and `logits_to_probs` refuses it.

Randomness enters only through an explicit `torch.Generator`. `make_generator` derives one from
(seed, *stream) with a fixed integer hash; `sample_from_probs`, `draw_exponentials` and
`draw_uniforms` take either one generator for the whole batch or one generator per row.

Every categorical draw is an exponential race (`sample_from_probs`): the token k with the least
E_k / p_k, E_k independent standard exponentials, is a draw from p normalised (the Gumbel-max
trick in another form). Run in two stages, exactly: the vocabulary's blocks of RACE_BLOCK tokens
race first, block b with rate P_b = sum of its p_k (the least of its tokens' E_k / p_k is an
exponential of rate P_b, and which token it is, is p_k / P_b, independent of it), then the winning
block's tokens race among themselves: a vocabulary of 8k takes 64 + 128 exponentials, not 8k. Not
inverse-CDF sampling: the same logits computed in another batch may differ in their last bits, and
a race then flips only where its two best are that close, while an inverse CDF flips wherever its
uniform falls within the accumulated difference of any of the vocabulary's CDF edges. On the demo
target's rows whose logits a batch composition changed, 42 of 186,000 inverse-CDF draws flipped
and none of the races (`python -m specpipe.launch.batch_rounding`): a seed fixes the output under
any load.

This module knows nothing of models, requests, blocks or sockets.
"""

from collections.abc import Sequence
from dataclasses import dataclass
import math

import torch

# splitmix64 (Steele, Lea and Flood 2014; the seeder recommended for xoshiro): a bijective,
# well-mixing 64-bit finaliser, so nearby inputs (position 7 and position 8) give unrelated seeds.
# These constants are part of the reproducibility contract: changing them changes every seeded output.
_MASK64 = (1 << 64) - 1
_SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
_SPLITMIX64_MUL1 = 0xBF58476D1CE4E5B9
_SPLITMIX64_MUL2 = 0x94D049BB133111EB

# Stream tags for make_generator(seed, position, STREAM_...): one per consumer, so that the draft's
# draw at a position and the target's draws for a block starting there never share a generator.
STREAM_DRAFT = 1
STREAM_VERIFY = 2
# Position-keyed draws of the verification (a seed fixes the output whatever the block cuts): the
# uniform that accepts or rejects the draft token at a position, the one that draws the target's own
# token there (correction or bonus), and the Gumbel noise of the drafter-invariant coupling.
STREAM_ACCEPT = 3
STREAM_FINAL = 4
STREAM_GUMBEL = 5

# Tokens per block of the two-stage race (sample_from_probs): about the square root of a large
# vocabulary, so each stage draws few exponentials.
RACE_BLOCK = 128

Generators = torch.Generator | Sequence[torch.Generator]


@dataclass(frozen=True)
class SamplingParams:
    """How a request turns logits into a token; validated here so no worker sees a bad value."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off; keep the top_k most likely tokens
    top_p: float = 1.0  # 0 or 1 = off; keep the smallest set with cumulative probability >= top_p
    drafter_invariant: bool = False  # sample by the shared-noise (Gumbel) coupling: see gumbel_noise

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:  # also rejects NaN
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def coupled(self) -> bool:
        """Sampled by the drafter-invariant coupling (greedy needs none: argmax is invariant)."""
        return self.drafter_invariant and not self.greedy

    @property
    def drafter_free(self) -> bool:
        """The target's token at a position is fixed by the prefix (and seed) alone, not by the
        draft or by where blocks were cut: greedy, or the drafter-invariant coupling."""
        return self.greedy or self.coupled


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., vocab] logits -> [..., vocab] float32 probabilities: temperature, then top-k, then top-p.

    - temperature: softmax(logits / temperature), in float32.
    - top-k (0 < top_k < vocab): keep the top_k highest logits.
    - top-p (0 < top_p < 1), on the top-k-renormalised distribution: keep the smallest prefix of
      the tokens sorted by probability whose cumulative probability is >= top_p; that is, keep a
      token iff the mass strictly before it is < top_p (compared in float32). The most likely
      token is always kept.
    - Ties are broken deterministically by token id: among equal logits the lower id ranks first
      (a stable descending sort), so top-k keeps exactly top_k tokens.
    - Masked tokens get probability exactly 0 (their logit becomes -inf before the softmax).
    Each row is processed on its own: two rows, or a draft and a target row, get their own masks.
    """
    assert not params.greedy, "greedy is its own branch (argmax), never logits_to_probs"
    scaled = logits.float() / params.temperature  # [..., vocab]
    vocab = scaled.shape[-1]
    top_k = params.top_k if 0 < params.top_k < vocab else vocab
    use_top_p = 0.0 < params.top_p < 1.0
    if top_k == vocab and not use_top_p:
        return torch.softmax(scaled, dim=-1)

    sorted_logits, sorted_ids = torch.sort(scaled, dim=-1, descending=True, stable=True)
    keep_sorted = torch.arange(vocab, device=scaled.device) < top_k  # [vocab], by rank
    keep_sorted = keep_sorted.expand_as(sorted_logits)
    if use_top_p:
        sorted_probs = torch.softmax(sorted_logits.masked_fill(~keep_sorted, -math.inf), dim=-1)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Mass strictly before each rank, shifted rather than subtracted so it is exact at rank 0.
        mass_before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], -1)
        keep_sorted = keep_sorted & (mass_before < params.top_p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, sorted_ids, keep_sorted)  # [..., vocab]
    return torch.softmax(scaled.masked_fill(~keep, -math.inf), dim=-1)


def mix_seed(seed: int, *stream: int) -> int:
    """A 64-bit seed from (seed, *stream): splitmix64 chained over the tuple (ints taken mod 2**64)."""
    state = _splitmix64(seed & _MASK64)
    for part in stream:
        state = _splitmix64(state ^ (part & _MASK64))
    return state


def make_generator(seed: int, *stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator seeded with mix_seed(seed, *stream), e.g. (seed, position, STREAM_DRAFT).

    Why key randomness by sequence position rather than keep one generator per request: a draw
    then depends on where it lands in the sequence, not on when it happens. The draft's token at
    position t is the same whichever block it falls in, however often a cancelled branch was
    redrafted, and whatever other requests share the batch; nothing depends on timing. The
    verification of a block still depends on where the block starts and how long it is (a
    position verified as a draft token and one drawn as a bonus use different draws: that is
    inherent to Leviathan sampling), so a seeded request is reproducible when the scheduler cuts
    its blocks deterministically.

    CPU and CUDA generators produce different streams from the same seed; keep the generator on
    the CPU for results that must not depend on the device (the draw helpers move the uniforms).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, *stream))
    return generator


def draw_uniforms(generator: Generators, batch: int, count: int, device) -> torch.Tensor:
    """[batch, count] float64 uniforms in [0, 1), drawn on the generator's device, moved to `device`.

    One generator: torch.rand(batch, count) from it (row-major). A sequence of `batch` generators:
    row i is torch.rand(count) from generator i, so a row's draws do not depend on its neighbours.
    """
    if isinstance(generator, torch.Generator):
        uniforms = torch.rand(batch, count, generator=generator, device=generator.device, dtype=torch.float64)
        return uniforms.to(device)
    assert len(generator) == batch, f"{len(generator)} generators for {batch} rows"
    rows = [torch.rand(count, generator=g, device=g.device, dtype=torch.float64).to(device) for g in generator]
    return torch.stack(rows) if rows else torch.empty(0, count, dtype=torch.float64, device=device)


def draw_exponentials(generator: Generators, batch: int, count: int, device) -> torch.Tensor:
    """[batch, count] float32 standard exponentials -log U, U ~ U[0, 1) from the generator(s) as
    in `draw_uniforms` (`exponentials_of` them), moved to `device`."""
    if isinstance(generator, torch.Generator):
        uniforms = torch.rand(batch, count, generator=generator, device=generator.device)
    else:
        assert len(generator) == batch, f"{len(generator)} generators for {batch} rows"
        rows = [torch.rand(count, generator=g, device=g.device) for g in generator]
        uniforms = torch.stack(rows) if rows else torch.empty(0, count)
    return exponentials_of(uniforms).to(device)


def exponentials_of(uniforms: torch.Tensor) -> torch.Tensor:
    """-log U of uniforms in [0, 1) (in place), U = 0 (a 2**-24 chance in float32) taken as the
    least positive float: -log U stays finite, so a positive rate always beats a rate of 0, even
    when it is the only one (a one-hot row never draws a token of weight 0)."""
    return uniforms.clamp_(min=torch.finfo(uniforms.dtype).tiny).log_().neg_()


def race(rates: torch.Tensor, exponentials: torch.Tensor) -> torch.Tensor:
    """[..., n] non-negative rates and exponentials of the same shape -> [...] int64: the entrant
    whose exponential / rate is least (the first of equals), i.e. the largest rate / exponential: a
    draw from the rates normalised. An entrant of rate 0 never wins (a row needs a positive sum).
    For a stage of the two-stage race: a few hundred entrants, where torch's argmax is quick."""
    return (rates / exponentials.to(rates.device)).argmax(dim=-1)


def sample_from_probs(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """[batch, vocab] non-negative weights -> [batch] int64 token ids, one draw per row: the
    two-stage race (module doc), its exponentials drawn from the generator(s) as in
    `draw_exponentials`: first the blocks', then the winning block's tokens'. Rows need not be
    normalised (a residual max(0, p - q) is passed as is) but must have a positive sum; a token of
    weight exactly 0 is never drawn."""
    assert probs.dim() == 2, f"probs must be [batch, vocab], got {tuple(probs.shape)}"
    batch, vocab = probs.shape
    blocks = -(-vocab // RACE_BLOCK)
    if blocks * RACE_BLOCK != vocab:  # (padding tokens of weight 0: they never win)
        probs = torch.nn.functional.pad(probs, (0, blocks * RACE_BLOCK - vocab))
    padded = probs.reshape(batch, blocks, RACE_BLOCK)
    block = race(padded.sum(-1), draw_exponentials(generator, batch, blocks, probs.device))  # [batch]
    members = padded[torch.arange(batch, device=probs.device), block]  # [batch, RACE_BLOCK]
    return block * RACE_BLOCK + race(members, draw_exponentials(generator, batch, RACE_BLOCK, probs.device))


def position_uniforms(seed: int, positions: Sequence[int], stream: int) -> torch.Tensor:
    """[len(positions)] float64 uniforms in [0, 1), the one at sequence position t drawn from the
    generator keyed by (seed, t, stream): a function of the position alone, not of how the
    positions are grouped into blocks."""
    return torch.tensor(
        [torch.rand(1, generator=make_generator(seed, t, stream), dtype=torch.float64).item() for t in positions],
        dtype=torch.float64,
    )


def gumbel_noise(seed: int, position: int, vocab: int) -> torch.Tensor:
    """[vocab] float64 standard Gumbel noise keyed by (seed, position): argmax(log p + noise) is a
    draw from p (the Gumbel-max trick), and the draft and the target, given the same seed and
    position, use the same noise: the drafter-invariant coupling (Daliri, Musco and Suresh 2024)."""
    uniforms = torch.rand(vocab, generator=make_generator(seed, position, STREAM_GUMBEL), dtype=torch.float64)
    return -torch.log(-torch.log(uniforms.clamp_(min=torch.finfo(torch.float64).tiny)))


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """[..., vocab] processed probabilities and noise of the same width -> [...] int64
    argmax(log p + noise): tokens of probability 0 (masked by top-k / top-p) never win."""
    return first_argmax(torch.log(probs.double()) + noise.to(probs.device))


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """[..., vocab] -> [...] int64 on the same device: the index of each row's maximum, the first
    one on ties (and the first NaN where there is one), as torch.argmax(dim=-1). On a CPU, float32
    and float64 rows go through NumPy's argmax, which has the same rule and is vectorised: torch's
    CPU kernel is scalar, 105 against 5 us for a 9-row block over a vocabulary of 8k (2.13, AVX-512),
    and the target pays it for every verify and decoded token, request by request."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and values.shape[-1]:
        indices = values.detach().numpy().argmax(axis=-1)  # (a NumPy scalar for one row: as_tensor)
        return torch.as_tensor(indices, dtype=torch.int64)
    return values.argmax(dim=-1)


def _splitmix64(state: int) -> int:
    state = (state + _SPLITMIX64_GAMMA) & _MASK64
    state = ((state ^ (state >> 30)) * _SPLITMIX64_MUL1) & _MASK64
    state = ((state ^ (state >> 27)) * _SPLITMIX64_MUL2) & _MASK64
    return state ^ (state >> 31)
