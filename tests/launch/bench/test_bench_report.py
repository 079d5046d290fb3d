"""The benchmark's bounds (launch/bench/report.py) and table rows (tables.py) on numbers worked by
hand, and the acceptance rate implied by a measured number of tokens per verification (the inverse
of E(a, k), whose own values are checked in tests/specpipe/test_acceptance.py)."""

import pytest

from specpipe.acceptance import expected_tokens
from specpipe.launch.bench import report, tables


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


def test_rejections_and_hits_per_rank_are_summarised_per_trial_and_shown():
    """Two trials of a specbranch method: per-trial means, hits over rejections, per rank hits
    over the rejections that rank was there for; Hugging Face's counters have none of them."""
    counters = [
        dict(draft_tokens=40, accepted_tokens=30, rolled_back_tokens=20, verifications=10, branches_forked=8,
             branches_hit=3, committed_tokens=40, rejections=6, main_rolled_back_tokens=12, rejections_at_fork=4,
             rank0_tried=4, rank0_hits=2, rank1_tried=2, rank1_hits=1),
        dict(draft_tokens=40, accepted_tokens=30, rolled_back_tokens=10, verifications=10, branches_forked=4,
             branches_hit=1, committed_tokens=40, rejections=4, main_rolled_back_tokens=8, rejections_at_fork=2,
             rank0_tried=2, rank0_hits=1),
    ]  # fmt: skip
    records = [
        dict(trial=t, error=None, tokens_per_second=100.0, counters=c, ttft_s=[0.05], target_busy_s=0.9, seconds=1.0,
             tokens=40, matches_autoregressive=[True])
        for t, c in enumerate(counters)
    ]  # fmt: skip
    summary = report.method_summary(records, {0: 50.0, 1: 50.0}, None, greedy=True)
    assert summary["rejections"] == 5 and summary["main_rolled_back_tokens"] == 10
    assert summary["rejection_hit_rate"] == 4 / 10
    assert summary["rank_hit_rates"] == [
        {"tried": 3.0, "hits": 1.5, "rate": 0.5},
        {"tried": 1.0, "hits": 0.5, "rate": 0.5},
    ]
    summary["bound"] = None
    row = tables.method_row("specpipe_specbranch", summary)
    assert "15 (main 10)" in row and "33% of forks, 40% of rejections; by rank 50% / 50%" in row
    hf = [dict(r, counters={k: v for k, v in r["counters"].items() if "rank" not in k and "reject" not in k})
          for r in records]  # fmt: skip
    for name, value in report.rejection_summary(report.Counter(hf[0]["counters"]), 1).items():
        assert value is None, name


def test_side_by_side_ratios_are_taken_within_each_trial():
    """Per-trial ratios, not a ratio of medians: trial 1 ran on a box twice as slow, and both
    methods slowed alike; a trial where either method failed is left out; a pair with a method
    that never ran is absent."""
    rates = {
        "specpipe_specbranch": [120.0, 60.0, 130.0],
        "specpipe_sequential": [100.0, 50.0, 0.0],
        "hf_autoregressive": [50.0, 40.0, 52.0],
    }
    records = [
        dict(method=name, trial=t, tokens_per_second=tps, error="boom" if tps == 0 else None)
        for name, values in rates.items()
        for t, tps in enumerate(values)
    ]
    pairs = report.pair_ratios(records)
    assert set(pairs) == {"specpipe_specbranch/specpipe_sequential", "specpipe_specbranch/hf_autoregressive"}
    assert pairs["specpipe_specbranch/specpipe_sequential"]["n"] == 2
    assert pairs["specpipe_specbranch/specpipe_sequential"]["median"] == pytest.approx(1.2)
    assert pairs["specpipe_specbranch/specpipe_sequential"]["min"] == pytest.approx(1.2)
    assert pairs["specpipe_specbranch/hf_autoregressive"]["median"] == pytest.approx(2.4)
    assert pairs["specpipe_specbranch/hf_autoregressive"]["min"] == pytest.approx(1.5)
    lines = tables.pair_lines({"0": pairs, "1": {}})
    assert "| specpipe specbranch over specpipe sequential | 1.20 [1.20–1.20]× | – |" in lines
