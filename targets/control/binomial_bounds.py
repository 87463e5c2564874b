"""Exact (Clopper–Pearson) bounds of a binomial proportion, in the Beta form, so counts may be
fractional (shares of repeated rows). One implementation for the verdicts (:mod:`reports.bounds`)
and the out-of-fold rule comparison (:mod:`targets.control.crossval`)."""
from __future__ import annotations

# scipy is imported where it is used: the controller's modules import this one, and a server that
# only runs a certified controller (Triton's Python backend) need not have scipy at all.


def clopper_pearson_upper(events: float, n: float, alpha: float) -> float:
    """One-sided upper bound at risk ``alpha`` of ``events`` in ``n`` trials (1 with no trial or all events)."""
    if n <= 0 or events >= n:
        return 1.0
    from scipy import stats as scipy_stats

    return float(scipy_stats.beta.ppf(1.0 - alpha, events + 1.0, n - events))


def clopper_pearson_lower(events: float, n: float, alpha: float) -> float:
    """One-sided lower bound at risk ``alpha`` (0 when no event was seen)."""
    if n <= 0 or events <= 0:
        return 0.0
    from scipy import stats as scipy_stats

    return float(scipy_stats.beta.ppf(alpha, events, n - events + 1.0))


def clopper_pearson(events: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Two-sided exact interval at ``level`` (each side at risk (1 − level) / 2)."""
    tail = (1.0 - level) / 2.0
    return clopper_pearson_lower(events, n, tail), clopper_pearson_upper(events, n, tail)
