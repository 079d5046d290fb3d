"""specpipe.sampling: logits processing (hand-computed tables), seeding and the two-stage exponential race.

Method: every mask case is a row of a table with the logits, the params and the token ids that
must survive; the expected probabilities are recomputed in float64 from the definition. The
statistical checks use fixed seeds and a chi-square goodness-of-fit test at p > 1e-3.
"""

import math

import pytest
import scipy.stats
import torch
from goodness import P_VALUE_THRESHOLD, chi_square_pvalue

from specpipe.sampling import (
    RACE_BLOCK,
    STREAM_DRAFT,
    STREAM_VERIFY,
    SamplingParams,
    draw_exponentials,
    draw_uniforms,
    exponentials_of,
    first_argmax,
    logits_to_probs,
    make_generator,
    mix_seed,
    race,
    sample_from_probs,
)


def log_of(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


def softmax_over(logits: list[float], temperature: float, kept: set[int]) -> list[float]:
    """The definition, in float64: softmax of logits / temperature over the kept ids, 0 elsewhere."""
    weights = [math.exp(x / temperature) if i in kept else 0.0 for i, x in enumerate(logits)]
    total = sum(weights)
    return [w / total for w in weights]


# ---------------------------------------------------------------------------------------------
# SamplingParams


def test_greedy_is_temperature_zero():
    assert SamplingParams().greedy
    assert SamplingParams(temperature=0.0, top_k=5, top_p=0.5).greedy
    assert not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": -0.1},
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": -0.1},
        {"top_p": 1.5},
        {"top_p": math.nan},
    ],
)
def test_bad_params_raise_value_error_naming_the_field(fields):
    with pytest.raises(ValueError, match=next(iter(fields))):
        SamplingParams(**fields)


def test_logits_to_probs_refuses_greedy():
    with pytest.raises(AssertionError, match="greedy"):
        logits_to_probs(torch.zeros(1, 4), SamplingParams(temperature=0.0))


# ---------------------------------------------------------------------------------------------
# logits_to_probs: temperature, top-k, top-p


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 2.0, 10.0])
def test_temperature_scaling_matches_hand_computation(temperature):
    logits = [1.0, 2.0, 3.0, 0.5, -1.0]
    probs = logits_to_probs(torch.tensor([logits]), SamplingParams(temperature=temperature))
    expected = softmax_over(logits, temperature, kept=set(range(5)))
    assert probs.dtype == torch.float32
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(probs[0].double(), expected, atol=1e-6, rtol=0)


# (name, logits, params, ids that survive). Probabilities are chosen away from top_p boundaries
# unless they are exact in float32 (powers of two), so the table does not test rounding luck.
MASK_CASES = [
    ("top_k=2", [0.1, 2.0, -1.0, 1.5, 0.3], SamplingParams(1.0, top_k=2), {1, 3}),
    ("top_k=1", [0.1, 2.0, -1.0, 1.5, 0.3], SamplingParams(1.0, top_k=1), {1}),
    ("top_k >= vocab is off", [0.1, 2.0, -1.0], SamplingParams(1.0, top_k=3), {0, 1, 2}),
    ("top_k tie: lower ids first", [1.0, 3.0, 0.0, 3.0, 3.0], SamplingParams(1.0, top_k=2), {1, 3}),
    ("top_p=0.6", log_of([0.1, 0.5, 0.15, 0.25]), SamplingParams(1.0, top_p=0.6), {1, 3}),
    ("top_p=0.8", log_of([0.1, 0.5, 0.15, 0.25]), SamplingParams(1.0, top_p=0.8), {1, 3, 2}),
    ("top_p=0.95", log_of([0.1, 0.5, 0.15, 0.25]), SamplingParams(1.0, top_p=0.95), {0, 1, 2, 3}),
    # Uniform quarters are exact: two tokens reach 0.5 exactly, so the third is not needed; the
    # tie between the four goes to the lowest ids.
    ("top_p reached exactly, ties", [0.0, 0.0, 0.0, 0.0], SamplingParams(1.0, top_p=0.5), {0, 1}),
    ("top_p tie", log_of([0.2, 0.4, 0.2, 0.2]), SamplingParams(1.0, top_p=0.5), {0, 1}),
    ("top_p tiny: top token only", [0.1, 2.0, -1.0, 1.9], SamplingParams(1.0, top_p=1e-9), {1}),
    ("top_p=1 is off", [0.1, 2.0, -1.0], SamplingParams(1.0, top_p=1.0), {0, 1, 2}),
    ("top_p=0 is off", [0.1, 2.0, -1.0], SamplingParams(1.0, top_p=0.0), {0, 1, 2}),
    # Top-k first: renormalised top-3 is [.41, .35, .24], so top_p=0.7 keeps two tokens (top-p
    # first would have kept three: .35 + .30 < .7).
    (
        "top_k then top_p",
        log_of([0.1, 0.35, 0.05, 0.2, 0.3]),
        SamplingParams(1.0, top_k=3, top_p=0.7),
        {1, 4},
    ),
    ("temperature and top_k", [1.0, 0.0, 2.0, -1.0], SamplingParams(0.5, top_k=2), {0, 2}),
    # temperature 4 flattens [.59, .27, .12, .02]-ish logits enough that top_p=0.5 needs two tokens.
    ("temperature and top_p", [3.0, 2.0, 1.0, -1.0], SamplingParams(4.0, top_p=0.5), {0, 1}),
    ("-inf logit stays at 0", [0.0, -math.inf, 1.0], SamplingParams(1.0), {0, 2}),
]


@pytest.mark.parametrize("logits, params, kept", [c[1:] for c in MASK_CASES], ids=[c[0] for c in MASK_CASES])
def test_masks_match_hand_table(logits, params, kept):
    probs = logits_to_probs(torch.tensor([logits]), params)[0]
    assert probs.dtype == torch.float32
    assert {i for i in range(len(logits)) if probs[i] > 0} == kept
    assert all(probs[i].item() == 0.0 for i in range(len(logits)) if i not in kept)
    expected = softmax_over(logits, params.temperature, kept)
    torch.testing.assert_close(probs.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_masks_are_per_row_and_batched_over_leading_dims():
    params = SamplingParams(temperature=0.9, top_k=3, top_p=0.8)
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0)) * 3
    probs = logits_to_probs(logits, params)
    masks = set()
    for row in range(2):
        for position in range(3):
            alone = logits_to_probs(logits[row, position][None], params)[0]
            # The same mask; the same values up to rounding (a kernel may vectorise a batch
            # differently from one row, and CPUs differ in how).
            assert torch.equal(probs[row, position] > 0, alone > 0)
            torch.testing.assert_close(probs[row, position], alone, atol=1e-6, rtol=0)
            masks.add(tuple((alone > 0).tolist()))
    assert len(masks) > 1, "the fixture should give rows with different masks"


def test_draft_and_target_masks_differ_when_their_logits_do():
    params = SamplingParams(temperature=1.0, top_k=2)
    draft_probs = logits_to_probs(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), params)
    target_probs = logits_to_probs(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), params)
    assert (draft_probs > 0).tolist() == [[True, True, False, False]]
    assert (target_probs > 0).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(0.7),
        SamplingParams(1.3, top_k=7),
        SamplingParams(1.0, top_p=0.9),
        SamplingParams(0.5, top_k=20, top_p=0.3),
    ],
)
def test_rows_sum_to_one_in_float32_and_input_untouched(dtype, params):
    logits = (torch.randn(4, 5, 50, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    before = logits.clone()
    probs = logits_to_probs(logits, params)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 5), atol=1e-5, rtol=0)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("seed", range(20))
def test_kept_set_is_the_smallest_sorted_prefix_reaching_top_p(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(64, generator=generator) * 3
    top_k = int(torch.randint(0, 64, (1,), generator=generator))
    top_p = float(torch.rand(1, generator=generator))
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    probs = logits_to_probs(logits, params)
    order = torch.sort(logits, descending=True, stable=True).indices
    num_kept = int((probs > 0).sum())
    assert torch.equal(probs[order[:num_kept]] > 0, torch.ones(num_kept, dtype=torch.bool))
    assert top_k == 0 or num_kept <= top_k
    top_k_probs = torch.softmax(logits[order[: top_k or 64]].double(), dim=-1)
    if 0 < top_p < 1:  # the prefix reaches top_p, and one token fewer would not
        assert top_k_probs[:num_kept].sum() >= top_p - 1e-6
        assert top_k_probs[: num_kept - 1].sum() < top_p + 1e-6


# ---------------------------------------------------------------------------------------------
# Seeding


def test_mix_seed_is_splitmix64():
    # The first output of splitmix64 from state 0, as published with the reference C code.
    assert mix_seed(0) == 0xE220A8397B1DCDAF
    # Golden value: changing the hash silently changes every seeded request's output.
    assert mix_seed(1234, 5, 1) == 0xB382E3543B68F619
    assert mix_seed(2**64 - 1, -1) == mix_seed(2**64 - 1, 2**64 - 1)


def test_make_generator_is_reproducible():
    first = torch.rand(8, generator=make_generator(42, 17, STREAM_DRAFT))
    again = torch.rand(8, generator=make_generator(42, 17, STREAM_DRAFT))
    assert torch.equal(first, again)


def test_make_generator_differs_across_seeds_positions_streams_and_order():
    keys = [
        (42,),
        (43,),
        (42, 0),
        (42, 1),
        (42, 1, STREAM_DRAFT),
        (42, 1, STREAM_VERIFY),
        (42, 2, STREAM_DRAFT),
        (42, 5, 9),
        (42, 9, 5),
        (2**64 - 1, -1),
    ]
    draws = {tuple(torch.rand(4, generator=make_generator(*key)).tolist()) for key in keys}
    assert len(draws) == len(keys)


def test_streams_look_independent_across_positions():
    positions = range(4000)

    def first_uniforms(stream: int) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=make_generator(7, t, stream)) for t in positions])

    draft, verify = first_uniforms(STREAM_DRAFT), first_uniforms(STREAM_VERIFY)
    for uniforms in (draft, verify):
        assert scipy.stats.kstest(uniforms.numpy(), "uniform").pvalue > P_VALUE_THRESHOLD
    # 4000 pairs: the correlation's standard error is ~0.016, so 0.06 is ~4 sigma.
    assert abs(scipy.stats.pearsonr(draft, verify).statistic) < 0.06
    assert abs(scipy.stats.pearsonr(draft[:-1], draft[1:]).statistic) < 0.06


# ---------------------------------------------------------------------------------------------
# sample_from_probs, draw_exponentials and draw_uniforms


def counts_of(token_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(token_ids, minlength=vocab).double()


def test_one_hot_rows_give_their_token():
    probs = torch.eye(5)[[3, 0, 4, 4, 1]]
    token_ids = sample_from_probs(probs, make_generator(0))
    assert token_ids.dtype == torch.int64 and token_ids.tolist() == [3, 0, 4, 4, 1]


def test_zero_weight_tokens_are_never_drawn_and_unnormalised_rows_are_fine():
    weights = torch.tensor([0.0, 2.0, 0.0, 6.0, 0.0]).expand(20000, 5)
    counts = counts_of(sample_from_probs(weights, make_generator(1)), 5)
    assert counts[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    assert chi_square_pvalue(counts[[1, 3]], [0.25, 0.75]) > P_VALUE_THRESHOLD


def test_draws_follow_the_probabilities():
    probs = torch.softmax(torch.randn(10, generator=torch.Generator().manual_seed(3)), dim=-1)
    counts = counts_of(sample_from_probs(probs.expand(50000, 10), make_generator(2)), 10)
    assert chi_square_pvalue(counts, probs) > P_VALUE_THRESHOLD


def test_each_row_is_a_two_stage_exponential_race():
    """A row's token, by hand: its blocks of RACE_BLOCK tokens (the last padded with zeros) race
    with their summed weights against a block's worth of exponentials -log U (float32 U from the
    generator, every row's blocks first), then the winning block's tokens race against the next."""
    vocab = 300  # three blocks, the last one padded
    probs = torch.softmax(2 * torch.randn(6, vocab, generator=torch.Generator().manual_seed(4)), dim=-1)
    token_ids = sample_from_probs(probs, make_generator(5))
    replay = make_generator(5)
    stage_one = -torch.log(torch.rand(6, 3, generator=replay))
    stage_two = -torch.log(torch.rand(6, RACE_BLOCK, generator=replay))
    expected = []
    for row in range(6):
        padded = torch.cat([probs[row], torch.zeros(3 * RACE_BLOCK - vocab)]).view(3, RACE_BLOCK)
        block = int(torch.argmax(padded.sum(-1) / stage_one[row]))
        expected.append(block * RACE_BLOCK + int(torch.argmax(padded[block] / stage_two[row])))
    assert token_ids.tolist() == expected
    assert torch.equal(draw_exponentials(make_generator(5), 6, 3, "cpu"), stage_one)


def test_a_zero_uniform_still_lets_a_positive_weight_win():
    """U = 0 would make -log U infinite and every score of a one-hot row 0, and the first token,
    of weight 0, would win: it is taken as the least positive float instead."""
    exponentials = exponentials_of(torch.tensor([0.3, 0.0, 0.7]))
    assert torch.isfinite(exponentials).all()
    assert int(race(torch.tensor([0.0, 1.0, 0.0]), exponentials)) == 1


def test_draws_over_many_blocks_follow_the_probabilities():
    """The two stages together are exactly a draw from p: a vocabulary of eight blocks (the last
    padded), its mass spread over all of them."""
    vocab = 1000
    probs = torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(6)), dim=-1)
    counts = counts_of(sample_from_probs(probs.expand(200_000, vocab), make_generator(7)), vocab)
    assert chi_square_pvalue(counts, probs) > P_VALUE_THRESHOLD


def test_a_draw_survives_rounding_sized_changes_of_its_probabilities():
    """Why the race and not an inverse CDF: the same logits computed in another batch can differ in
    their last bits, and a seeded draw must not follow them. Nudging every probability of an
    8k vocabulary by a relative 2e-5 flips none of 20,000 races (a race flips only where its two
    best scores are that close), while the inverse CDF of the same law, from the same number of
    draws, flips wherever its uniform falls within the accumulated change of any edge: 30 or more."""
    generator = torch.Generator().manual_seed(11)
    probs = torch.softmax(torch.randn(8192, generator=generator) * 2.5, dim=-1)
    nudged = probs * (1 + 2e-5 * torch.randn(8192, generator=generator))
    nudged = nudged / nudged.sum()
    draws = 20_000
    before = sample_from_probs(probs.expand(draws, -1), make_generator(11))
    after = sample_from_probs(nudged.expand(draws, -1), make_generator(11))
    assert int((before != after).sum()) <= 2
    uniforms = torch.rand(draws, 1, generator=make_generator(12), dtype=torch.float64)

    def inverse_cdf(weights: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(weights.double().cumsum(-1).expand(draws, -1).contiguous(), uniforms, right=True)

    assert int((inverse_cdf(probs) != inverse_cdf(nudged)).sum()) >= 10


def test_seeded_rerun_is_identical_and_other_seeds_differ():
    probs = torch.full((200, 16), 1 / 16)
    first = sample_from_probs(probs, make_generator(9, 0))
    assert torch.equal(first, sample_from_probs(probs, make_generator(9, 0)))
    assert not torch.equal(first, sample_from_probs(probs, make_generator(9, 1)))


def test_per_row_generators_make_a_row_independent_of_its_neighbours():
    probs = torch.full((3, 1000), 1e-3)
    together = sample_from_probs(probs, [make_generator(1), make_generator(2), make_generator(3)])
    alone = sample_from_probs(probs[1:2], [make_generator(2)])
    assert together[1] == alone[0]
    uniforms = draw_uniforms([make_generator(1), make_generator(2)], 2, 3, "cpu")
    assert torch.equal(uniforms[1], torch.rand(3, generator=make_generator(2), dtype=torch.float64))
    assert draw_uniforms([], 0, 3, "cpu").shape == (0, 3)


# ---------------------------------------------------------------------------------------------
# first_argmax: torch.argmax's rule (the first maximum; the first NaN), faster on a CPU


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "row, expected",
    [
        ([1.0, 3.0, 3.0, 0.0], 1),  # a tie: the first
        ([2.0, 2.0, 2.0, 2.0], 0),
        ([NAN, 1.0, NAN, 5.0], 0),  # a NaN wins, the first of them
        ([2.0, NAN, 9.0, NAN], 1),
        ([-INF, -INF, -INF], 0),
        ([INF, 1.0, INF], 0),
        ([0.0, -0.0, 1e-45], 2),  # a denormal above zero
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_first_argmax_takes_the_first_maximum_as_torch_argmax(row, expected, dtype):
    values = torch.tensor([row], dtype=dtype)
    if dtype in (torch.bfloat16, torch.float16) and expected == 2 and row[2] == 1e-45:
        expected = 0  # (1e-45 underflows to 0 in a half type: three equal zeros)
    assert first_argmax(values).tolist() == values.argmax(dim=-1).tolist() == [expected]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_first_argmax_equals_torch_argmax_on_blocks_of_any_layout(dtype):
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randn(4, 9, 8192, generator=generator).to(dtype)
    blocks[:, :, 100] = blocks.amax(dim=-1)  # ties with a later maximum in every row
    with torch.inference_mode():  # (the target's forwards run so)
        for values in (blocks, blocks[:, ::2], blocks.transpose(0, 1), blocks[0, :, :0].T, blocks[1, 2]):
            result = first_argmax(values)
            assert result.dtype == torch.int64 and result.device == values.device
            assert torch.equal(result, values.argmax(dim=-1)), f"shape {tuple(values.shape)}"
