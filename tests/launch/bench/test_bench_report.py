"""The benchmark's bounds (launch/bench/report.py) on numbers worked by hand, and the acceptance
rate implied by a measured number of tokens per verification (the inverse of E(a, k), whose own
values are checked in tests/specpipe/test_acceptance.py)."""

import pytest

from specpipe.acceptance import expected_tokens
from specpipe.launch.bench import report


@pytest.mark.parametrize("a, k", [(0.5, 4), (0.8, 1), (0.93, 6), (0.05, 3)])
def test_implied_acceptance_inverts_expected_tokens(a, k):
    assert report.implied_acceptance(expected_tokens(a, k), k) == pytest.approx(a, abs=1e-9)


def test_bounds_on_hand_worked_numbers():
    # a = 0.5, k = 4: E = 1.9375. t_ar = 10, t_draft = 1, t_verify = 12 (ms).
    costs = {"t_ar_s": 0.010, "t_draft_s": 0.001, "t_verify_s": {"4": 0.012}}
    summary = {
        "speedup": {"median": 1.0},
        "acceptance_rate": 0.5,
        "draft_tokens_per_verification": 4.0,
        "tokens_per_verification": 1.9375,
    }
    serial = report.bound(summary, "serial", costs)
    assert serial["expected_tokens_per_round"] == pytest.approx(1.9375)
    assert serial["serial"] == pytest.approx(1.9375 * 10 / (4 * 1 + 12))
    assert serial["overlapped"] == pytest.approx(1.9375 * 10 / 12)
    assert serial["bound"] == serial["serial"]
    assert serial["fraction_of_bound"] == pytest.approx(1.0 / serial["serial"])
    assert serial["a_implied"] == pytest.approx(0.5, abs=1e-9)
    assert report.bound(summary, "overlapped", costs)["bound"] == pytest.approx(1.9375 * 10 / 12)
    assert report.bound(summary, None, costs) is None
