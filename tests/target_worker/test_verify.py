"""target_worker.verify: greedy verification and Leviathan rejection sampling.

Method (after vLLM's tests/v1/sample/test_rejection_sampler.py):
- greedy: a parametrised table of hand-built logits whose argmax is the intended token;
- sampling, exact cases: distributions built so the outcome is certain, checked on a large batch;
- sampling, arithmetic: the vectorised code equals a plain loop over Algorithm 1 fed the same
  uniforms, which also pins the documented order of draws;
- sampling, law: with fixed seeds and tens of thousands of rows, a chi-square goodness-of-fit test
  (p > 1e-3) that the emitted tokens are distributed as the target's processed p, for near and
  far drafts, differing masks, the bonus, and the first two tokens jointly;
- power: two realistic buggy samplers must fail the same chi-square test (p < 1e-6).
"""

import pytest
import torch
from goodness import P_VALUE_THRESHOLD, chi_square_counts, chi_square_pvalue

from specpipe.sampling import (
    STREAM_DRAFT,
    STREAM_VERIFY,
    SamplingParams,
    gumbel_argmax,
    logits_to_probs,
    make_generator,
    sample_from_probs,
)
from specpipe.target_worker.verify import (
    VerifyResult,
    rejection_sample,
    rejection_sample_at,
    verify_coupled,
    verify_greedy,
)

POWER_THRESHOLD = 1e-6  # a biased sampler must be rejected far more decisively than that
NUM_TRIALS = 40_000  # rows per statistical test: tight enough to catch the biased samplers


def logits_with_argmax(token_ids: list[list[int]], vocab: int) -> torch.Tensor:
    """[batch, positions] intended argmaxes -> [batch, positions, vocab] logits: small noise, +5 on
    the intended token, so the runner-up is never far below."""
    noise = torch.rand(len(token_ids), len(token_ids[0]), vocab, generator=torch.Generator().manual_seed(0))
    return noise.scatter_add(2, torch.tensor(token_ids)[:, :, None], torch.full_like(noise, 5.0))


def ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)


# ---------------------------------------------------------------------------------------------
# Greedy

# (name, draft token ids, target argmax per row incl. the bonus row, num_accepted, next token)
GREEDY_CASES = [
    ("all accepted + bonus", [1, 2, 3], [1, 2, 3, 4], 3, 4),
    ("first rejected", [1, 2, 3], [5, 2, 3, 4], 0, 5),
    ("middle rejected", [1, 2, 3], [1, 6, 3, 4], 1, 6),
    ("last rejected", [1, 2, 3], [1, 2, 7, 4], 2, 7),
    ("match after a mismatch does not count", [1, 2, 3], [1, 0, 3, 4], 1, 0),
    ("single token accepted", [7], [7, 2], 1, 2),
    ("single token rejected", [7], [6, 2], 0, 6),
    ("empty draft: bonus only", [], [4], 0, 4),
]


@pytest.mark.parametrize(
    "draft, target_argmax, num_accepted, next_token",
    [c[1:] for c in GREEDY_CASES],
    ids=[c[0] for c in GREEDY_CASES],
)
def test_greedy_table(draft, target_argmax, num_accepted, next_token):
    result = verify_greedy(ids([draft]), logits_with_argmax([target_argmax], vocab=8))
    assert result.num_accepted.dtype == torch.int64 and result.next_token_ids.dtype == torch.int64
    assert result.num_accepted.tolist() == [num_accepted]
    assert result.next_token_ids.tolist() == [next_token]


def test_greedy_mixed_batch():
    cases = [c for c in GREEDY_CASES if len(c[1]) == 3]
    result = verify_greedy(ids([c[1] for c in cases]), logits_with_argmax([c[2] for c in cases], vocab=8))
    assert result.num_accepted.tolist() == [c[3] for c in cases]
    assert result.next_token_ids.tolist() == [c[4] for c in cases]


def test_greedy_ties_go_to_the_lowest_id():
    target_logits = torch.tensor([[[0.0, 2.0, 2.0, 1.0], [3.0, 0.0, 3.0, 0.0]]])
    assert verify_greedy(ids([[2]]), target_logits).num_accepted.tolist() == [0]
    result = verify_greedy(ids([[1]]), target_logits)
    assert (result.num_accepted.tolist(), result.next_token_ids.tolist()) == ([1], [0])


def test_result_repr_shows_shapes_not_contents():
    result = verify_greedy(ids([[1], [2]]), logits_with_argmax([[1, 0], [1, 0]], vocab=4))
    assert repr(result) == "VerifyResult(batch=2)"


# ---------------------------------------------------------------------------------------------
# Rejection sampling: exact cases

VOCAB = 5
UNIFORM = [0.2] * VOCAB
SPREAD = [0.1, 0.3, 0.2, 0.25, 0.15]


def one_hot(token: int) -> list[float]:
    return [1.0 if i == token else 0.0 for i in range(VOCAB)]


# (name, draft ids, draft_probs rows, target_probs rows, num_accepted, next token). Each outcome is
# certain, so it must hold on every one of a large batch of independent draws.
EXACT_CASES = [
    ("p == q: accepted, bonus from p", [1, 3], [SPREAD, UNIFORM], [SPREAD, UNIFORM, one_hot(4)], 2, 4),
    ("one-hot p = draft token", [1, 3], [UNIFORM, SPREAD], [one_hot(1), one_hot(3), one_hot(0)], 2, 0),
    ("one-hot p elsewhere at 0", [1, 3], [UNIFORM, SPREAD], [one_hot(2), one_hot(3), one_hot(0)], 0, 2),
    ("one-hot p elsewhere at 1", [1, 3], [UNIFORM, SPREAD], [one_hot(1), one_hot(0), one_hot(0)], 1, 0),
    ("q(x) = 0, p(x) > 0: accepted", [1], [[0.5, 0.0, 0.5, 0.0, 0.0]], [SPREAD, one_hot(2)], 1, 2),
    ("q(x) = 0, p(x) = 0: rejected", [1], [[0.5, 0.0, 0.5, 0.0, 0.0]], [one_hot(4), one_hot(2)], 0, 4),
    ("disjoint supports: correction from p", [3], [[0, 0, 0, 0.6, 0.4]], [one_hot(0), one_hot(2)], 0, 0),
    ("empty draft: bonus from p", [], [], [one_hot(3)], 0, 3),
]


def repeat_case(draft, draft_rows, target_rows, batch):
    num_draft_tokens = len(draft)
    draft_token_ids = torch.tensor(draft, dtype=torch.int64).reshape(1, -1).expand(batch, -1)
    draft_probs = torch.tensor(draft_rows, dtype=torch.float32).reshape(1, num_draft_tokens, VOCAB)
    target_probs = torch.tensor(target_rows, dtype=torch.float32).reshape(1, num_draft_tokens + 1, VOCAB)
    return draft_token_ids, draft_probs.expand(batch, -1, -1), target_probs.expand(batch, -1, -1)


@pytest.mark.parametrize(
    "draft, draft_rows, target_rows, num_accepted, next_token",
    [c[1:] for c in EXACT_CASES],
    ids=[c[0] for c in EXACT_CASES],
)
def test_rejection_exact_table(draft, draft_rows, target_rows, num_accepted, next_token):
    result = rejection_sample(*repeat_case(draft, draft_rows, target_rows, batch=2000), make_generator(0))
    assert result.num_accepted.dtype == torch.int64 and result.next_token_ids.dtype == torch.int64
    assert set(result.num_accepted.tolist()) == {num_accepted}
    assert set(result.next_token_ids.tolist()) == {next_token}


def test_p_equal_q_is_always_accepted_on_random_distributions():
    generator = torch.Generator().manual_seed(11)
    probs = logits_to_probs(torch.randn(4000, 4, 50, generator=generator) * 3, SamplingParams(1.0, top_p=0.9))
    draft_token_ids = sample_from_probs(probs[:, :3].reshape(-1, 50), generator).reshape(4000, 3)
    result = rejection_sample(draft_token_ids, probs[:, :3], probs, make_generator(1))
    assert (result.num_accepted == 3).all()


def test_empty_residual_falls_back_to_p():
    # p(x) = q(x) / 2 at the draft token and p == q elsewhere: p <= q everywhere, so a rejection
    # (half the time) meets an all-zero residual. Not a valid p (it sums to 0.9), but the same
    # situation as float rounding when p and q are equal up to an ulp.
    draft_probs = torch.tensor([[[0.2, 0.2, 0.2, 0.2, 0.2]]]).expand(4000, 1, VOCAB)
    target_probs = torch.tensor([[[0.2, 0.1, 0.2, 0.2, 0.2], one_hot(4)]]).expand(4000, 2, VOCAB)
    result = rejection_sample(ids([[1]] * 4000), draft_probs, target_probs, make_generator(2))
    corrections = result.next_token_ids[result.num_accepted == 0]
    assert 1500 < len(corrections) < 2500
    assert set(corrections.tolist()) == {0, 1, 2, 3, 4}  # drawn from p, nothing NaN or out of range


# ---------------------------------------------------------------------------------------------
# Rejection sampling: the vectorised arithmetic equals Algorithm 1 written as a loop


def final_at(seed: int, batch: int, start: int = 0):
    """`final_at` for rejection_sample_at: row r's final draw at block position j from the generator
    keyed by (seed, r, start + j), as the target keys it by sequence position."""
    return lambda num_accepted: [make_generator(seed, row, start + int(j)) for row, j in enumerate(num_accepted)]


def reference_rejection_sample(draft_token_ids, draft_probs, target_probs, accept_uniforms, final_generators):
    """Algorithm 1, one row and one position at a time, in float64, fed explicit uniforms and the
    final draws (corrections and bonuses) made at once by `sample_from_probs` from
    `final_generators(num_accepted)` (its race is test_sampling's to check)."""
    batch, num_draft_tokens = draft_token_ids.shape
    num_accepted, final_weights = [], []
    for row in range(batch):
        weights = target_probs[row, num_draft_tokens].double()  # bonus, unless a rejection
        accepted = num_draft_tokens
        for position in range(num_draft_tokens):
            token = draft_token_ids[row, position]
            target_prob = target_probs[row, position, token].item()
            draft_prob = draft_probs[row, position, token].item()
            ratio = target_prob / draft_prob if draft_prob > 0 else (1.0 if target_prob > 0 else 0.0)
            if not accept_uniforms[row, position].item() < ratio:
                target_row = target_probs[row, position].double()
                residual = (target_row - draft_probs[row, position].double()).clamp(min=0)
                weights = residual if residual.sum() > 0 else target_row
                accepted = position
                break
        num_accepted.append(accepted)
        final_weights.append(weights)
    next_token_ids = sample_from_probs(torch.stack(final_weights), final_generators(torch.tensor(num_accepted)))
    return num_accepted, next_token_ids.tolist()


def random_block(batch, num_draft_tokens, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0, top_k=vocab - 2, top_p=0.95)
    target_logits = torch.randn(batch, num_draft_tokens + 1, vocab, generator=generator) * 2
    draft_logits = torch.randn(batch, num_draft_tokens, vocab, generator=generator) * 2
    target_probs, draft_probs = logits_to_probs(target_logits, params), logits_to_probs(draft_logits, params)
    # Mostly draws from q, plus some arbitrary ids so that q(x) = 0 shows up too.
    draft_token_ids = sample_from_probs(draft_probs.reshape(-1, vocab), generator).reshape(batch, -1)
    arbitrary = torch.randint(0, vocab, draft_token_ids.shape, generator=generator)
    replace = torch.rand(draft_token_ids.shape, generator=generator) < 0.2
    draft_token_ids = torch.where(replace, arbitrary, draft_token_ids)
    return draft_token_ids, draft_probs, target_probs


@pytest.mark.parametrize("num_draft_tokens", [0, 1, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_loop_with_one_generator(num_draft_tokens, seed):
    batch = 64
    block = random_block(batch, num_draft_tokens, vocab=12, seed=seed)
    result = rejection_sample(*block, make_generator(seed, STREAM_VERIFY))
    replay = make_generator(seed, STREAM_VERIFY)  # the documented order: accept uniforms, then each row's race
    accept_uniforms = torch.rand(batch, num_draft_tokens, generator=replay, dtype=torch.float64)
    num_accepted, next_token_ids = reference_rejection_sample(*block, accept_uniforms, lambda _: replay)
    assert result.num_accepted.tolist() == num_accepted
    assert result.next_token_ids.tolist() == next_token_ids


def test_matches_reference_loop_with_one_generator_per_row():
    batch, num_draft_tokens = 16, 3
    block = random_block(batch, num_draft_tokens, vocab=12, seed=5)
    result = rejection_sample(*block, [make_generator(5, row) for row in range(batch)])
    replays = [make_generator(5, row) for row in range(batch)]
    accept_uniforms = torch.stack([torch.rand(num_draft_tokens, generator=g, dtype=torch.float64) for g in replays])
    num_accepted, next_token_ids = reference_rejection_sample(*block, accept_uniforms, lambda _: replays)
    assert result.num_accepted.tolist() == num_accepted
    assert result.next_token_ids.tolist() == next_token_ids


def test_seeded_rerun_is_identical_and_other_seeds_differ():
    block = random_block(256, 4, vocab=12, seed=7)

    def run(seed: int) -> VerifyResult:
        return rejection_sample(*block, make_generator(seed, 100, STREAM_VERIFY))

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first.num_accepted, again.num_accepted)
    assert torch.equal(first.next_token_ids, again.next_token_ids)
    assert not torch.equal(first.next_token_ids, other.next_token_ids)


def test_per_row_generators_make_a_row_independent_of_its_batch():
    draft_token_ids, draft_probs, target_probs = random_block(8, 3, vocab=12, seed=8)
    generators = [make_generator(row) for row in range(8)]
    together = rejection_sample(draft_token_ids, draft_probs, target_probs, generators)
    for row in range(8):
        alone = rejection_sample(
            draft_token_ids[row : row + 1],
            draft_probs[row : row + 1],
            target_probs[row : row + 1],
            [make_generator(row)],
        )
        assert alone.num_accepted[0] == together.num_accepted[row]
        assert alone.next_token_ids[0] == together.next_token_ids[row]


# ---------------------------------------------------------------------------------------------
# Rejection sampling: the law of the output


def token_pvalue(token_ids: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Goodness of fit of [n] token ids (or flattened cells) to [vocab] probabilities (the suite's
    one chi-square helper, tests/goodness.py)."""
    expected_probs = expected_probs.flatten()
    return chi_square_pvalue(chi_square_counts(token_ids, len(expected_probs)), expected_probs)


def draft_block(draft_probs_row: torch.Tensor, num_draft_tokens: int, batch: int, seed: int):
    """Draws [batch, k] draft tokens, each position from [vocab] q, as the draft worker would."""
    vocab = draft_probs_row.shape[-1]
    draft_probs = draft_probs_row.expand(batch * num_draft_tokens, vocab)
    draft_token_ids = sample_from_probs(draft_probs, make_generator(seed, STREAM_DRAFT))
    return draft_token_ids.reshape(batch, -1), draft_probs.reshape(batch, num_draft_tokens, vocab)


def first_tokens(sampler, draft_row, target_row, seed: int, num_draft_tokens: int = 3) -> torch.Tensor:
    """[NUM_TRIALS] first emitted token of a round: the first draft token if accepted, else the
    correction. Every position uses the same [vocab] q and p rows."""
    draft_token_ids, draft_probs = draft_block(draft_row, num_draft_tokens, NUM_TRIALS, seed)
    target_probs = target_row.expand(NUM_TRIALS, num_draft_tokens + 1, -1)
    result = sampler(draft_token_ids, draft_probs, target_probs, make_generator(seed, STREAM_VERIFY))
    return torch.where(result.num_accepted > 0, draft_token_ids[:, 0], result.next_token_ids)


def processed(logits: list[float], params=SamplingParams(temperature=1.0)) -> torch.Tensor:
    return logits_to_probs(torch.tensor(logits), params)


DIFFERENT_MASKS = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
# name -> (draft q, target p), both [vocab=8] processed rows.
LAWS = {
    "near draft": (
        processed([1.0, 0.2, -0.5, 0.8, 0.0, -1.0, 0.3, 0.5]),
        processed([0.8, 0.4, -0.3, 1.0, -0.2, -0.9, 0.1, 0.6]),
    ),
    "far draft, nearly disjoint": (
        processed([-4.0, -4.0, -4.0, -4.0, 1.0, 2.0, 1.5, 0.5]),
        processed([1.5, 2.0, 0.5, 1.0, -3.0, -3.0, -3.0, -3.0]),
    ),
    "different top-k/top-p masks": (
        processed([2.0, 1.8, 0.1, 1.5, 1.0, -0.5, 0.9, -1.0], DIFFERENT_MASKS),
        processed([0.2, 1.9, 1.0, 1.4, -1.0, 1.2, 0.8, 1.1], DIFFERENT_MASKS),
    ),
}


@pytest.mark.parametrize("law", LAWS)
def test_first_token_is_distributed_as_p(law):
    draft_row, target_row = LAWS[law]
    if law == "different top-k/top-p masks":
        assert not torch.equal(draft_row > 0, target_row > 0), "fixture: masks should differ"
    tokens = first_tokens(rejection_sample, draft_row, target_row, seed=1)
    assert token_pvalue(tokens, target_row) > P_VALUE_THRESHOLD


def test_bonus_is_distributed_as_p_of_the_last_row():
    block_rows = processed([0.5, -0.2, 1.0, 0.0, 0.3, -1.0])
    bonus_row = processed([1.0, 0.1, -0.5, 0.7, 0.0, 0.4])
    draft_token_ids, draft_probs = draft_block(block_rows, 2, NUM_TRIALS, seed=3)
    target_probs = torch.stack([block_rows, block_rows, bonus_row]).expand(NUM_TRIALS, 3, 6)
    result = rejection_sample(draft_token_ids, draft_probs, target_probs, make_generator(3, STREAM_VERIFY))
    assert (result.num_accepted == 2).all()  # p == q on the block
    assert token_pvalue(result.next_token_ids, bonus_row) > P_VALUE_THRESHOLD


def context_tables(vocab: int, seed: int):
    """A two-step toy 'model' pair: first-token rows [vocab] and next-token tables [vocab, vocab]
    (row a = the law after token a), for the target p and a draft q that differs from it."""
    generator = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=1.0, top_k=vocab - 1)
    target_logits = torch.randn(vocab + 1, vocab, generator=generator)
    draft_logits = target_logits + torch.randn(vocab + 1, vocab, generator=generator) * 1.5
    target, draft = logits_to_probs(target_logits, params), logits_to_probs(draft_logits, params)
    return draft[0], draft[1:], target[0], target[1:]


JOINT_VOCAB = 6
JOINT_TABLES = context_tables(JOINT_VOCAB, seed=4)  # draft_first, draft_next, target_first, target_next


def first_two_tokens(sampler, seed: int):
    """[NUM_TRIALS] first and second emitted tokens for the two-step toy model, from a two-token
    draft; and [NUM_TRIALS] bool, whether the first draft token was rejected."""
    vocab, batch = JOINT_VOCAB, NUM_TRIALS
    draft_first, draft_next, target_first, target_next = JOINT_TABLES
    first_draft = sample_from_probs(draft_first.expand(batch, vocab), make_generator(seed, 0, STREAM_DRAFT))
    second_draft = sample_from_probs(draft_next[first_draft], make_generator(seed, 1, STREAM_DRAFT))
    draft_token_ids = torch.stack([first_draft, second_draft], dim=1)
    draft_probs = torch.stack([draft_first.expand(batch, vocab), draft_next[first_draft]], dim=1)
    # The bonus row (after two tokens) is any law; reuse the next-token table after the second.
    target_probs = torch.stack(
        [target_first.expand(batch, vocab), target_next[first_draft], target_next[second_draft]], dim=1
    )
    result = sampler(draft_token_ids, draft_probs, target_probs, make_generator(seed, 0, STREAM_VERIFY))

    first = torch.where(result.num_accepted >= 1, first_draft, result.next_token_ids)
    second = torch.where(result.num_accepted >= 2, second_draft, result.next_token_ids)
    # Rows rejected at position 0 emitted one token; their second comes from the next round: a
    # fresh one-token draft after `first`, verified against the target's law after `first`.
    redo = result.num_accepted == 0
    redo_draft = sample_from_probs(draft_next[first[redo]], make_generator(seed, 2, STREAM_DRAFT))
    redo_result = sampler(
        redo_draft[:, None],
        draft_next[first[redo]][:, None],
        torch.stack([target_next[first[redo]], target_next[redo_draft]], dim=1),
        make_generator(seed, 2, STREAM_VERIFY),
    )
    second[redo] = torch.where(redo_result.num_accepted == 1, redo_draft, redo_result.next_token_ids)
    return first, second, redo


def test_first_two_tokens_are_jointly_distributed_as_p():
    draft_first, _, target_first, target_next = JOINT_TABLES
    first, second, redo = first_two_tokens(rejection_sample, seed=4)
    joint = target_first[:, None] * target_next  # [vocab, vocab]: p(a) p(b | a)
    assert token_pvalue(first * JOINT_VOCAB + second, joint) > P_VALUE_THRESHOLD
    # Given the first draft token was accepted, the first token has law norm(min(p, q)) and the
    # second still follows p(. | first): acceptance at position 0 does not bias position 1.
    kept = ~redo
    accepted_law = torch.minimum(target_first, draft_first)[:, None] * target_next
    assert token_pvalue(first[kept] * JOINT_VOCAB + second[kept], accepted_law) > P_VALUE_THRESHOLD


# ---------------------------------------------------------------------------------------------
# Power: the same test must reject realistic bugs


def sampler_resampling_from_p(draft_token_ids, draft_probs, target_probs, generator) -> VerifyResult:
    """Bug: the correction is drawn from p instead of norm(max(0, p - q)). The output law becomes
    min(p, q) + P(reject) * p: tokens the draft over-proposes get more than p, the others less."""
    batch, num_draft_tokens = draft_token_ids.shape
    accept_uniforms = torch.rand(batch, num_draft_tokens, generator=generator, dtype=torch.float64)
    token_index = draft_token_ids[:, :, None]
    draft_token_probs = draft_probs.gather(2, token_index).squeeze(2).double()
    target_token_probs = target_probs[:, :num_draft_tokens].gather(2, token_index).squeeze(2).double()
    accepted = accept_uniforms * draft_token_probs < target_token_probs
    num_accepted = torch.cumprod(accepted.long(), dim=1).sum(dim=1)
    next_token_ids = sample_from_probs(target_probs[torch.arange(batch), num_accepted], generator)
    return VerifyResult(num_accepted=num_accepted, next_token_ids=next_token_ids)


def sampler_swapping_p_and_q(draft_token_ids, draft_probs, target_probs, generator) -> VerifyResult:
    """Bug: draft and target distributions passed the wrong way round (the letter mix-up that
    STYLE §3 warns about): accepts with min(1, q/p) and corrects from max(0, q - p)."""
    num_draft_tokens = draft_token_ids.shape[1]
    swapped_target = torch.cat([draft_probs, target_probs[:, num_draft_tokens:]], dim=1)
    return rejection_sample(draft_token_ids, target_probs[:, :num_draft_tokens], swapped_target, generator)


def sampler_counting_all_accepts(draft_token_ids, draft_probs, target_probs, generator) -> VerifyResult:
    """Bug: num_accepted counts every accepted position instead of the accepted prefix, so a
    rejection followed by an acceptance still lets the rejected draft token through."""
    batch, num_draft_tokens = draft_token_ids.shape
    accept_uniforms = torch.rand(batch, num_draft_tokens, generator=generator, dtype=torch.float64)
    token_index = draft_token_ids[:, :, None]
    draft_token_probs = draft_probs.gather(2, token_index).squeeze(2).double()
    target_token_probs = target_probs[:, :num_draft_tokens].gather(2, token_index).squeeze(2).double()
    num_accepted = (accept_uniforms * draft_token_probs < target_token_probs).long().sum(dim=1)
    rows = torch.arange(batch)
    final_target_probs = target_probs[rows, num_accepted].double()
    padded_draft_probs = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (final_target_probs - padded_draft_probs[rows, num_accepted].double()).clamp(min=0)
    next_token_ids = sample_from_probs(residual, generator)
    return VerifyResult(num_accepted=num_accepted, next_token_ids=next_token_ids)


BIASED_SAMPLERS = [sampler_resampling_from_p, sampler_swapping_p_and_q, sampler_counting_all_accepts]


@pytest.mark.parametrize(
    "draft, draft_rows, target_rows, num_accepted, next_token",
    [c[1:] for c in EXACT_CASES],
    ids=[c[0] for c in EXACT_CASES],
)
def test_exact_table_alone_misses_resampling_from_p(draft, draft_rows, target_rows, num_accepted, next_token):
    """Why the statistical tests exist: this bug passes every certain-outcome case."""
    block = repeat_case(draft, draft_rows, target_rows, batch=500)
    result = sampler_resampling_from_p(*block, make_generator(0))
    assert set(result.num_accepted.tolist()) == {num_accepted}
    assert set(result.next_token_ids.tolist()) == {next_token}


@pytest.mark.parametrize("sampler", BIASED_SAMPLERS)
@pytest.mark.parametrize("law", LAWS)
def test_chi_square_rejects_biased_samplers(sampler, law):
    draft_row, target_row = LAWS[law]
    tokens = first_tokens(sampler, draft_row, target_row, seed=1)
    assert token_pvalue(tokens, target_row) < POWER_THRESHOLD


@pytest.mark.parametrize("sampler", BIASED_SAMPLERS)
def test_joint_chi_square_rejects_biased_samplers(sampler):
    _, _, target_first, target_next = JOINT_TABLES
    first, second, _ = first_two_tokens(sampler, seed=4)
    joint = target_first[:, None] * target_next
    assert token_pvalue(first * JOINT_VOCAB + second, joint) < POWER_THRESHOLD


# ---------------------------------------------------------------------------------------------
# Randomness per position: a seed fixes the output however the positions are cut into blocks


@pytest.mark.parametrize("num_draft_tokens", [0, 1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_positional_draws_match_the_reference_loop(num_draft_tokens, seed):
    block = random_block(64, num_draft_tokens, vocab=9, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    accept = torch.rand(64, num_draft_tokens, generator=generator, dtype=torch.float64)
    result = rejection_sample_at(*block, accept, final_at(seed, 64))
    num_accepted, next_token_ids = reference_rejection_sample(*block, accept, final_at(seed, 64))
    assert result.num_accepted.tolist() == num_accepted and result.next_token_ids.tolist() == next_token_ids


def test_block_cuts_do_not_change_the_outcome_of_a_position():
    """Six positions verified as one block, or as 3 + 3 (the second only when the first is fully
    accepted, kept without a bonus), with the same uniforms per position: the same tokens."""
    vocab = 7
    for seed in range(200):
        draft_ids, draft_probs, target_probs = random_block(1, 6, vocab, seed)
        generator = torch.Generator().manual_seed(seed)
        accept = torch.rand(1, 6, generator=generator, dtype=torch.float64)
        whole = rejection_sample_at(draft_ids, draft_probs, target_probs, accept, final_at(seed, 1))
        first = rejection_sample_at(
            draft_ids[:, :3], draft_probs[:, :3], target_probs[:, :4], accept[:, :3], final_at(seed, 1)
        )
        if first.num_accepted[0] < 3:
            assert (first.num_accepted, first.next_token_ids) == (whole.num_accepted, whole.next_token_ids)
            continue
        second = rejection_sample_at(
            draft_ids[:, 3:], draft_probs[:, 3:], target_probs[:, 3:], accept[:, 3:], final_at(seed, 1, start=3)
        )
        assert 3 + int(second.num_accepted[0]) == int(whole.num_accepted[0])
        assert second.next_token_ids.tolist() == whole.next_token_ids.tolist()


@pytest.mark.parametrize("law", LAWS)
def test_positional_first_token_is_distributed_as_p(law):
    draft_row, target_row = LAWS[law]
    draft_token_ids, draft_probs = draft_block(draft_row, 3, NUM_TRIALS, seed=5)
    generator = torch.Generator().manual_seed(6)
    accept = torch.rand(NUM_TRIALS, 3, generator=generator, dtype=torch.float64)
    final = final_at(6, NUM_TRIALS)
    result = rejection_sample_at(draft_token_ids, draft_probs, target_row.expand(NUM_TRIALS, 4, -1), accept, final)
    tokens = torch.where(result.num_accepted > 0, draft_token_ids[:, 0], result.next_token_ids)
    assert token_pvalue(tokens, target_row) > P_VALUE_THRESHOLD


# ---------------------------------------------------------------------------------------------
# The drafter-invariant coupling


def gumbel(shape, seed: int) -> torch.Tensor:
    uniforms = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return -torch.log(-torch.log(uniforms.clamp(min=1e-300)))


@pytest.mark.parametrize("law", LAWS)
def test_coupled_output_is_argmax_of_the_noisy_target_whatever_the_draft(law):
    """Every emitted token is argmax(log p + g): a draw from p (chi-square), and the same for a
    draft near p, a draft far from it, and no draft at all."""
    draft_row, target_row = LAWS[law]
    noise = gumbel((NUM_TRIALS, 2, target_row.shape[0]), seed=7)
    target_probs = target_row.expand(NUM_TRIALS, 2, -1)
    own = gumbel_argmax(target_probs[:, 0], noise[:, 0])  # target-only sampling
    assert token_pvalue(own, target_row) > P_VALUE_THRESHOLD
    for drafts in (
        gumbel_argmax(draft_row.expand(NUM_TRIALS, -1), noise[:, 0]),  # coupled draft
        torch.zeros(NUM_TRIALS, dtype=torch.long),
    ):  # a useless one
        result = verify_coupled(drafts[:, None], target_probs, noise)
        first = torch.where(result.num_accepted > 0, drafts, result.next_token_ids)
        assert torch.equal(first, own)


def test_coupling_with_the_same_noise_accepts_more_than_with_other_noise():
    """Power: a draft that draws its own noise is still exact (the target's tokens do not depend on
    it) but agrees with the target less often; the shared noise is what makes the coupling pay."""
    draft_row, target_row = LAWS["near draft"]
    noise = gumbel((NUM_TRIALS, 2, target_row.shape[0]), seed=8)
    other = gumbel((NUM_TRIALS, target_row.shape[0]), seed=9)
    target_probs = target_row.expand(NUM_TRIALS, 2, -1)
    shared = verify_coupled(gumbel_argmax(draft_row.expand(NUM_TRIALS, -1), noise[:, 0])[:, None], target_probs, noise)
    apart = verify_coupled(gumbel_argmax(draft_row.expand(NUM_TRIALS, -1), other)[:, None], target_probs, noise)
    overlap = float(torch.minimum(draft_row, target_row).sum())  # the Leviathan rule's rate
    shared_rate, apart_rate = shared.num_accepted.double().mean(), apart.num_accepted.double().mean()
    assert apart_rate < shared_rate - 0.1, (shared_rate, apart_rate)
    assert shared_rate <= overlap + 0.01  # it accepts no more than Leviathan
