"""The arithmetic of speculative decoding's acceptance, shared by the coordinator's draft-length
policy (coordinator/policy.py) and the benchmark's bounds (launch/bench/report.py).

Under the standard i.i.d. model (Leviathan et al. 2023, §3.5) each draft token is accepted with
probability a, independently, until the first rejection; a round of k draft tokens then yields
E(a, k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens (the accepted ones plus the target's
correction or bonus), k + 1 at a = 1. Pure: no clock, no model, no state.
"""

from __future__ import annotations


def expected_tokens(a: float, k: int) -> float:
    """E(a, k) = (1 - a^(k+1)) / (1 - a): expected tokens per round of k draft tokens, k + 1 at
    a >= 1 (where the closed form divides by zero)."""
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
