"""The one goodness-of-fit helper every statistical test in the suite uses (STYLE §8).

Why one helper: a chi-square test is only as good as its expected counts. Here they are always
computed the same way, so the result holds on any CPU:
- reference probabilities are taken in float64 and renormalised over their support, so float32
  rounding of the reference (whose 27 outcomes may sum to 1 - 4e-8 on one CPU and 1 + 1e-8 on
  another) never reaches scipy's exact-sum check;
- expected counts are scaled to the observed total;
- a cell whose expected count is under `min_expected` is pooled with the others like it (one
  "rest" cell), the usual validity rule for the chi-square approximation;
- a draw of an outcome of probability 0 is impossible under the hypothesis: p-value 0.

`chi_square_power` says how likely the same test is to reject a given wrong law with the same
number of samples (the non-central chi-square), so a test can assert that it has teeth without
having to run a buggy sampler end to end.

Importable from any test: `from goodness import chi_square_pvalue, chi_square_power`.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

# A correct sampler fails a fixed-seed test with about this probability.
P_VALUE_THRESHOLD = 1e-3
# Expected counts under this are pooled into one cell.
MIN_EXPECTED = 5.0


def _as_float64(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).ravel()


def _cells(probs: np.ndarray, min_expected_share: float) -> list[np.ndarray]:
    """Index groups of the chi-square: each supported outcome with enough mass alone, the rest
    pooled (a pooled cell too small is merged into the smallest big one)."""
    support = np.flatnonzero(probs > 0)
    big = support[probs[support] >= min_expected_share]
    small = support[probs[support] < min_expected_share]
    cells = [np.array([i]) for i in big]
    if len(small):
        if probs[small].sum() >= min_expected_share or not cells:
            cells.append(small)
        else:
            smallest = int(np.argmin([probs[c].sum() for c in cells]))
            cells[smallest] = np.concatenate([cells[smallest], small])
    return cells


def chi_square_pvalue(counts, probs, min_expected: float = MIN_EXPECTED) -> float:
    """Goodness of fit of observed `counts` (one per outcome) to reference `probs` (same length,
    any float dtype, need not sum to exactly 1)."""
    counts, probs = _as_float64(counts), _as_float64(probs)
    assert counts.shape == probs.shape, f"{counts.shape[0]} counts for {probs.shape[0]} outcomes"
    assert (probs >= 0).all() and probs.sum() > 0, "reference probabilities must be >= 0, not all 0"
    total = counts.sum()
    assert total > 0, "no observations"
    if counts[probs == 0].sum() > 0:
        return 0.0
    probs = probs / probs.sum()
    cells = _cells(probs, min_expected / total)
    if len(cells) < 2:
        return 1.0  # one outcome possible and only it was seen
    observed = np.array([counts[c].sum() for c in cells])
    expected = np.array([probs[c].sum() for c in cells]) * total
    expected *= observed.sum() / expected.sum()  # exact in float64 up to one ulp
    return float(scipy.stats.chisquare(observed, expected).pvalue)


def chi_square_counts(token_ids, num_outcomes: int) -> np.ndarray:
    """Counts per outcome of a sequence of outcome indices (token ids, flattened cells)."""
    return np.bincount(_as_float64(token_ids).astype(np.int64), minlength=num_outcomes).astype(np.float64)


def chi_square_power(
    probs, alternative, num_samples: int, alpha: float = P_VALUE_THRESHOLD, min_expected: float = MIN_EXPECTED
) -> float:
    """The probability that `chi_square_pvalue` with `num_samples` draws from `alternative`
    falls under `alpha` when the reference is `probs` (non-central chi-square approximation;
    an alternative with mass where `probs` has none is caught whenever such a draw happens)."""
    probs, alternative = _as_float64(probs), _as_float64(alternative)
    probs, alternative = probs / probs.sum(), alternative / alternative.sum()
    outside = alternative[probs == 0].sum()
    cells = _cells(probs, min_expected / num_samples)
    expected = np.array([probs[c].sum() for c in cells])
    actual = np.array([alternative[c].sum() for c in cells])
    actual = actual / max(actual.sum(), 1e-300)
    degrees = len(cells) - 1
    if degrees < 1:
        return 1.0 - (1.0 - outside) ** num_samples
    noncentrality = num_samples * float(((actual - expected) ** 2 / expected).sum())
    critical = scipy.stats.chi2.ppf(1 - alpha, degrees)
    caught = float(scipy.stats.ncx2.sf(critical, degrees, noncentrality))
    return 1.0 - (1.0 - caught) * (1.0 - outside) ** num_samples
