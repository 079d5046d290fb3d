"""E(a, k), the expected tokens per round (specpipe/acceptance.py), on values worked by hand, and
equal to the sum it closes (1 + a + ... + a^k) wherever the closed form applies."""

import pytest

from specpipe.acceptance import expected_tokens


@pytest.mark.parametrize(
    "a, k, expected", [(0.0, 4, 1.0), (0.5, 4, 1.9375), (1.0, 4, 5.0), (0.8, 1, 1.8), (1.0, 0, 1.0), (0.3, 0, 1.0)]
)
def test_expected_tokens_per_round(a, k, expected):
    assert expected_tokens(a, k) == pytest.approx(expected)


@pytest.mark.parametrize("a", [0.1, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_expected_tokens_is_the_geometric_sum(a, k):
    assert expected_tokens(a, k) == pytest.approx(sum(a**i for i in range(k + 1)), rel=1e-12)
