"""specpipe.proposal: the draft's proposal temperature table (interpolation, the law it gives a
request, validation), the --temperature-scale value, the table file beside the draft's weights and
the acceptance measure it is fitted by.

Method: interpolated scales and acceptances are recomputed in float64 from their definitions
(log-linear in temperature; sum_x min(p(x), q_s(x)) over softmaxes) and compared with tolerances;
exact comparisons only where no arithmetic happens (a table entry, a flat end, a copied field)."""

import json
import logging
import math
import re

import pytest
import torch

from specpipe import proposal
from specpipe.config import parse_scale
from specpipe.predictor import weights_sha256
from specpipe.proposal import MIN_DRAFT_TEMPERATURE, ProposalTemperatures, acceptance_by_scale, load_table
from specpipe.sampling import SamplingParams


def softmax(logits: list[float], temperature: float) -> list[float]:
    """The definition, in float64."""
    weights = [math.exp(x / temperature) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


# ---------------------------------------------------------------------------------------------
# scale_for


def test_scale_for_is_exact_at_the_table_temperatures():
    table = ProposalTemperatures((0.5, 0.7, 1.0, 2.0), (1.6, 1.4, 1.2, 1.05))
    for temperature, scale in zip(table.temperatures, table.scales):
        assert table.scale_for(temperature) == scale


def test_scale_for_is_flat_below_the_first_and_above_the_last_temperature():
    table = ProposalTemperatures((0.5, 2.0), (1.6, 1.1))
    for temperature in (1e-5, 0.1, 0.4999):
        assert table.scale_for(temperature) == 1.6
    for temperature in (2.0001, 3.0, 100.0):
        assert table.scale_for(temperature) == 1.1


def test_scale_for_is_linear_in_log_temperature_between_entries():
    """Halfway in log temperature from 0.5 to 2.0 is 1.0 (not the arithmetic midpoint 1.25)."""
    table = ProposalTemperatures((0.5, 2.0), (1.0, 2.0))
    assert table.scale_for(1.0) == pytest.approx(1.5, abs=1e-12)
    for temperature in (0.6, 0.8, 1.25, 1.9):
        weight = math.log(temperature / 0.5) / math.log(2.0 / 0.5)
        assert table.scale_for(temperature) == pytest.approx(1.0 + weight, abs=1e-12)


def test_scale_for_interpolates_within_the_segment_holding_the_temperature():
    table = ProposalTemperatures((0.5, 1.0, 2.0), (2.0, 1.5, 1.0))
    assert table.scale_for(0.75) == pytest.approx(2.0 - 0.5 * math.log(1.5) / math.log(2.0), abs=1e-12)
    assert table.scale_for(1.5) == pytest.approx(1.5 - 0.5 * math.log(1.5) / math.log(2.0), abs=1e-12)
    assert table.scale_for(math.sqrt(2.0)) == pytest.approx(1.25, abs=1e-12)


def test_a_one_entry_table_is_flat_everywhere():
    table = ProposalTemperatures((0.7,), (1.3,))
    for temperature in (1e-5, 0.5, 0.7, 1.0, 50.0):
        assert table.scale_for(temperature) == 1.3


def test_the_default_table_is_the_identity_and_uniform_is_one_factor_everywhere():
    assert ProposalTemperatures().is_identity
    assert ProposalTemperatures.uniform(1.0).is_identity
    uniform = ProposalTemperatures.uniform(1.4)
    assert not uniform.is_identity
    assert all(uniform.scale_for(t) == 1.4 for t in (0.01, 1.0, 9.0))


# ---------------------------------------------------------------------------------------------
# proposal(sampling)

SCALING = ProposalTemperatures((0.5, 2.0), (1.0, 2.0))


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(),
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5),
        SamplingParams(temperature=0.0, drafter_invariant=True),
        SamplingParams(temperature=1.0, drafter_invariant=True),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.9, drafter_invariant=True),
    ],
)
def test_greedy_and_drafter_invariant_sampling_are_proposed_unchanged(sampling):
    """Greedy needs no proposal; the coupling's argmax(log q + g) must use the request's own law."""
    assert SCALING.proposal(sampling) is sampling


def test_an_identity_table_proposes_the_request_law_itself():
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.95)
    assert ProposalTemperatures().proposal(sampling) is sampling
    assert ProposalTemperatures((0.5, 2.0), (1.0, 1.0)).proposal(sampling) is sampling


def test_a_sampled_request_is_proposed_at_the_scaled_temperature_with_its_top_k_and_top_p():
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    proposed = SCALING.proposal(sampling)
    assert proposed.temperature == pytest.approx(1.0 * 1.5, abs=1e-12)
    assert (proposed.top_k, proposed.top_p, proposed.drafter_invariant) == (20, 0.9, False)
    assert not proposed.greedy
    low = SCALING.proposal(SamplingParams(temperature=0.25, top_k=3))  # flat below 0.5: factor 1.0
    assert (low.temperature, low.top_k, low.top_p) == (0.25, 3, 1.0)
    high = SCALING.proposal(SamplingParams(temperature=4.0, top_p=0.5))  # flat above 2.0: factor 2.0
    assert (high.temperature, high.top_k, high.top_p) == (8.0, 0, 0.5)


def test_the_proposed_temperature_never_falls_below_the_minimum():
    proposed = ProposalTemperatures.uniform(1e-3).proposal(SamplingParams(temperature=1e-4))
    assert proposed.temperature == MIN_DRAFT_TEMPERATURE and not proposed.greedy


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "temperatures, scales",
    [
        ((1.0, 2.0), (1.0,)),
        ((1.0,), (1.0, 1.2)),
        ((), ()),
        ((2.0, 1.0), (1.0, 1.0)),
        ((0.5, 1.0, 0.7), (1.0, 1.0, 1.0)),
        ((1.0, 1.0), (1.0, 1.2)),
        ((0.0, 1.0), (1.0, 1.0)),
        ((-1.0,), (1.0,)),
        ((math.nan,), (1.0,)),
        ((1.0, math.inf), (1.0, 1.0)),
        ((1.0,), (0.0,)),
        ((1.0,), (-1.2,)),
        ((1.0,), (math.nan,)),
        ((1.0,), (math.inf,)),
    ],
)
def test_a_malformed_table_raises_value_error(temperatures, scales):
    with pytest.raises(ValueError):
        ProposalTemperatures(temperatures, scales)


# ---------------------------------------------------------------------------------------------
# parse_scale (the --temperature-scale / --draft-temperature-scale value)


def test_parse_scale_reads_auto_and_a_factor():
    assert parse_scale("auto") is None
    assert parse_scale("1.5") == 1.5
    assert parse_scale("0.8") == 0.8


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "abc", ""])
def test_parse_scale_refuses_a_non_positive_or_non_finite_or_non_number_naming_it(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_scale(text)


# ---------------------------------------------------------------------------------------------
# load_table

WEIGHTS = b"not really safetensors, but weights_sha256 only hashes the bytes"
TABLE = ProposalTemperatures((0.5, 0.7, 1.0), (1.6, 1.4, 1.2))


def draft_folder(tmp_path, table=TABLE, sha=None, weights=WEIGHTS):
    """A draft folder with model.safetensors and the table saved beside it, recording `sha` (the
    weights' own when None)."""
    (tmp_path / "model.safetensors").write_bytes(weights)
    info = {**table.to_json(), "draft_weights_sha256": sha or weights_sha256(tmp_path)}
    (tmp_path / proposal.FILE_NAME).write_text(json.dumps(info))
    return tmp_path


def test_load_table_is_none_without_a_file(tmp_path):
    assert load_table(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(WEIGHTS)
    assert load_table(tmp_path) is None
    assert load_table("some-org/some-hub-model") is None


def test_load_table_round_trips_a_table_fitted_for_these_weights(tmp_path):
    folder = draft_folder(tmp_path)
    assert load_table(folder) == TABLE
    assert load_table(folder, path=folder / proposal.FILE_NAME) == TABLE


def test_load_table_keeps_a_table_that_records_no_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(WEIGHTS)
    (tmp_path / proposal.FILE_NAME).write_text(json.dumps(TABLE.to_json()))
    assert load_table(tmp_path) == TABLE


def test_load_table_ignores_a_table_fitted_for_other_weights_with_a_warning(tmp_path, caplog):
    folder = draft_folder(tmp_path, sha="0" * 64)
    with caplog.at_level(logging.WARNING, logger="specpipe.proposal"):
        assert load_table(folder) is None
    assert any(
        record.levelno == logging.WARNING and str(folder / proposal.FILE_NAME) in record.getMessage()
        for record in caplog.records
    ), caplog.text


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "not json",
        json.dumps({"temperatures": [1.0]}),
        json.dumps({"scales": [1.0]}),
        json.dumps({"temperatures": [1.0], "scales": [0.0]}),
        json.dumps({"temperatures": [0.5, 1.0], "scales": [1.2, -1.0]}),
        json.dumps({"temperatures": [1.0, 0.5], "scales": [1.0, 1.0]}),
        json.dumps({"temperatures": [1.0], "scales": ["x"]}),
        json.dumps({"temperatures": 1.0, "scales": 1.0}),
        json.dumps([1.0, 1.2]),
    ],
)
def test_load_table_refuses_a_malformed_file_naming_it(tmp_path, text):
    path = tmp_path / proposal.FILE_NAME
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_table(tmp_path)


# ---------------------------------------------------------------------------------------------
# acceptance_by_scale


def random_logits(seed: int, rows: int = 6, vocab: int = 11) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_a_draft_twice_as_sharp_is_accepted_always_at_scale_two_and_best_there():
    """q_s = softmax(2 L / s) is the target's softmax(L) at s = 2: acceptance 1, the most of any s."""
    target = random_logits(0)
    scales = [1.0, 1.5, 2.0, 3.0]
    rates = acceptance_by_scale(target, 2.0 * target, SamplingParams(temperature=1.0), scales)
    assert rates.shape == (len(scales),)
    assert float(rates[2]) == pytest.approx(1.0, abs=1e-6)
    assert int(rates.argmax()) == 2
    assert all(float(rate) < 1.0 - 1e-3 for i, rate in enumerate(rates) if i != 2)


def test_identical_logits_are_accepted_always_at_scale_one():
    logits = random_logits(1)
    rates = acceptance_by_scale(logits, logits.clone(), SamplingParams(temperature=0.7, top_p=0.9), [1.0, 1.3])
    assert float(rates[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(rates[1]) < 1.0 - 1e-3


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5, 4.0])
def test_acceptance_matches_a_hand_computation_on_three_tokens(scale):
    """sum_x min(p(x), q_s(x)) with p = softmax(target / T), q_s = softmax(draft / (T s))."""
    target, draft, temperature = [1.0, 2.0, 0.5], [0.0, 3.0, 1.0], 0.8
    p, q = softmax(target, temperature), softmax(draft, temperature * scale)
    expected = sum(min(a, b) for a, b in zip(p, q))
    (rate,) = acceptance_by_scale(
        torch.tensor([target]), torch.tensor([draft]), SamplingParams(temperature=temperature), [scale]
    )
    assert float(rate) == pytest.approx(expected, abs=1e-6)


def test_acceptance_is_the_mean_over_positions():
    target, draft, temperature = [1.0, 2.0, 0.5], [0.0, 3.0, 1.0], 0.8
    p, q = softmax(target, temperature), softmax(draft, temperature * 1.5)
    one = sum(min(a, b) for a, b in zip(p, q))
    rows = torch.tensor([target, [0.3, -1.0, 2.0]])
    drafts = torch.tensor([draft, [0.3, -1.0, 2.0]])
    (rate,) = acceptance_by_scale(rows, drafts, SamplingParams(temperature=temperature), [1.5])
    # The second row's laws differ only by the draft's temperature (1.2 against 0.8).
    p2, q2 = softmax([0.3, -1.0, 2.0], temperature), softmax([0.3, -1.0, 2.0], temperature * 1.5)
    two = sum(min(a, b) for a, b in zip(p2, q2))
    assert float(rate) == pytest.approx((one + two) / 2, abs=1e-6)


def test_top_k_one_is_accepted_exactly_when_the_argmaxes_agree():
    """top_k = 1 leaves one token in each law, whatever the temperature: acceptance 1 or 0."""
    target = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 1.0]])
    agree = torch.tensor([[0.0, 1.0, -1.0], [5.0, 1.0, 4.0]])
    differ = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sampling, scales = SamplingParams(temperature=1.0, top_k=1), [0.5, 1.0, 2.0]
    assert acceptance_by_scale(target, agree, sampling, scales).tolist() == [1.0, 1.0, 1.0]
    assert acceptance_by_scale(target, differ, sampling, scales).tolist() == [0.0, 0.0, 0.0]
    mixed = torch.stack([agree[0], differ[1]])
    assert acceptance_by_scale(target, mixed, sampling, scales).tolist() == [0.5, 0.5, 0.5]
