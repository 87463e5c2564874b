"""The exact binomial machinery of the budget policy's certificate (:mod:`targets.control.certified_path`).

For a {0, 1} loss (1: the full model answers a row rightly and the early-exit policy wrongly),
the number of losses on n rows is binomial, so H0 "the risk exceeds the budget B" has the exact
p-value P(Binomial(n, B) ≤ losses), far tighter than Hoeffding–Bentkus for losses this rare.

The smallest budget n rows can certify: even a policy with no loss passes only when
(1 − B)^n ≤ δ, i.e. B ≥ 1 − δ^(1/n) ≈ ln(1/δ)/n (n = 180, δ = 0.1: 1.27 %).
"""
from __future__ import annotations

import math

import numpy as np


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) ≤ k), summed exactly in log space (n up to millions)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lgn = math.lgamma(n + 1)
    terms = [lgn - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def binomial_p_value(losses: int, n: int, budget: float) -> float:
    """Valid p-value for H0: risk > budget, from `losses` ones among n {0,1} losses."""
    return binomial_cdf(losses, n, budget)


def smallest_certifiable_budget(n: int, delta: float) -> float:
    """The smallest budget n calibration rows can certify at risk δ (with zero observed losses)."""
    if n <= 0:
        return 1.0
    return 1.0 - delta ** (1.0 / n)


def rows_needed(budget: float, delta: float) -> int:
    """The fewest calibration rows that can certify ``budget`` at risk δ (with zero observed
    losses: the least a split needs; rows the ladder harms raise it)."""
    return max(1, math.ceil(math.log(delta) / math.log1p(-budget)))


THRESHOLD_GRID = np.linspace(0.0, 1.0, 201)
"""The thresholds an exit can take, strictest first (λ = 0: nothing leaves early), fixed before
any data is seen, as Learn-then-Test requires: the shared path runs over them, and the per-exit
path's steps move one exit along them."""
