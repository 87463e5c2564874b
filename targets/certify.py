"""A certified accuracy budget for early exits: Learn-then-Test with fixed-sequence testing.

Method: Angelopoulos, Bates, Candès, Jordan, Lei, "Learn then Test: Calibrating predictive
algorithms to achieve risk control" (2021), as CALM (Schuster et al., NeurIPS 2022) uses it for
early-exit language models. A family of exit thresholds λ_1 (strictest) … λ_m (loosest) is
tested in that fixed order on the calibration (validation) split. For each λ the null hypothesis
"the risk R(λ) exceeds the budget B" gets a valid p-value; testing stops at the first λ whose null
is not rejected at level δ, and the loosest λ rejected before it is returned. Fixed-sequence
testing controls the family-wise error at δ, so with probability at least 1 − δ over the draw of
the calibration rows, R(λ̂) ≤ B.

The risk. Per row, the loss is 1 when the full model answers it correctly and the early-exit
policy answers it wrongly, else 0. Its mean is at least the accuracy loss against the full model
(accuracy(full) − accuracy(policy) = P(full right, policy wrong) − P(full wrong, policy right)),
so certifying it certifies the accuracy loss, conservatively, and a {0, 1} loss admits the exact
binomial p-value, far tighter than Hoeffding–Bentkus for losses this rare.

The smallest budget a split can certify: even a policy with no loss on n rows passes only when
(1 − B)^n ≤ δ, i.e. B ≥ 1 − δ^(1/n) ≈ ln(1/δ)/n (n = 180, δ = 0.1: 1.27 %).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from targets.errors import ConfigError

CERTIFICATE_NAME = "ltt-fixed-sequence-binomial"
CERTIFICATE_VERSION = "1"
"""The budget policy's certificate as validate.json records it: :func:`calibrate_budget` over
:data:`THRESHOLD_GRID`, one threshold at every exit. Any change to what it returns takes a new
version."""


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


@dataclass(frozen=True)
class Certificate:
    """The outcome of calibrating one family of thresholds.

    ``index`` is the position of the loosest certified threshold in the family (``None`` when
    not even the strictest passed); ``p_values`` holds one value per threshold tested, in order,
    up to and including the first failure.
    """

    budget: float
    delta: float
    n: int
    index: int | None
    p_values: tuple[float, ...]
    empirical_risks: tuple[float, ...]
    smallest_certifiable: float

    @property
    def certified(self) -> bool:
        return self.index is not None

    def as_dict(self) -> dict:
        return {"budget_pp": 100 * self.budget, "risk_delta": self.delta, "n_calibration": self.n,
                "certified": self.certified, "index": self.index,
                "smallest_certifiable_budget_pp": 100 * self.smallest_certifiable,
                "empirical_risk_pp": [100 * r for r in self.empirical_risks],
                "p_values": list(self.p_values)}


def certify(losses: np.ndarray, budget: float, delta: float) -> Certificate:
    """Fixed-sequence Learn-then-Test over a family ordered from strictest to loosest.

    ``losses`` is a boolean or {0,1} array ``[m, n]``: row i holds the loss of threshold i on each
    of the n calibration rows. ``budget`` is a fraction (0.005 for 0.5 pp), ``delta`` the risk.
    """
    losses = np.asarray(losses)
    if losses.ndim != 2 or losses.shape[1] == 0:
        raise ConfigError(f"certify needs losses of shape [thresholds, rows], got {list(losses.shape)}")
    if not 0.0 < budget < 1.0:
        raise ConfigError(f"accuracy budget must be in (0, 100) pp, got {100 * budget:g} pp")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"risk δ must be in (0, 1), got {delta:g}")
    n = losses.shape[1]
    counts = losses.astype(bool).sum(axis=1)
    p_values: list[float] = []
    index = None
    for i, count in enumerate(counts):
        p = binomial_p_value(int(count), n, budget)
        p_values.append(p)
        if p > delta:
            break
        index = i
    return Certificate(budget=budget, delta=delta, n=n, index=index, p_values=tuple(p_values),
                       empirical_risks=tuple(float(c) / n for c in counts[: len(p_values)]),
                       smallest_certifiable=smallest_certifiable_budget(n, delta))


THRESHOLD_GRID = np.linspace(0.0, 1.0, 201)
"""The family tested, strictest first: a row leaves at the first exit whose uncertainty u < λ.
Fixed before any data is seen, as Learn-then-Test requires (λ = 0: nothing leaves early)."""


def exit_depths(uncertainties: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Where each row leaves under each threshold: ``[m, n]`` exit index, E meaning the final layer.

    ``uncertainties`` is ``[n, E]``: row i's uncertainty at each of the E early exits, in order.
    """
    u = np.asarray(uncertainties, dtype=np.float64)
    if u.ndim == 1:
        u = u[:, None]
    prefix_min = np.minimum.accumulate(u, axis=1)  # leaves by exit k iff min_{j<=k} u_j < λ
    leaves_by = prefix_min[None, :, :] < np.asarray(thresholds, dtype=np.float64)[:, None, None]
    depth = np.where(leaves_by.any(axis=2), leaves_by.argmax(axis=2), u.shape[1])
    return depth


def exit_policy_losses(uncertainties: np.ndarray, exit_predictions: np.ndarray, full_predictions: np.ndarray,
                       labels: np.ndarray, thresholds: np.ndarray = THRESHOLD_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold and row: the certified loss (full right, policy wrong) and the exit depth.

    ``exit_predictions`` is ``[n, E]`` (each exit's class), ``full_predictions`` and ``labels``
    ``[n]``. A row leaving at depth E gets the full model's answer.
    """
    exit_predictions = np.asarray(exit_predictions)
    if exit_predictions.ndim == 1:
        exit_predictions = exit_predictions[:, None]
    full_predictions, labels = np.asarray(full_predictions), np.asarray(labels)
    depth = exit_depths(uncertainties, thresholds)
    answers = np.concatenate([exit_predictions, full_predictions[:, None]], axis=1)
    chosen = np.take_along_axis(answers[None, :, :].repeat(len(depth), axis=0), depth[:, :, None], axis=2)[:, :, 0]
    losses = (full_predictions == labels)[None, :] & (chosen != labels[None, :])
    return losses, depth


@dataclass(frozen=True)
class BudgetCalibration:
    """The loosest certified exit threshold and what it does on the calibration split."""

    threshold: float | None
    certificate: Certificate
    exit_rate: float | None
    depth_histogram: tuple[int, ...] | None

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "exit_rate": self.exit_rate,
                "depth_histogram": list(self.depth_histogram) if self.depth_histogram else None,
                **self.certificate.as_dict()}


def calibrate_budget(uncertainties: np.ndarray, exit_predictions: np.ndarray, full_predictions: np.ndarray,
                     labels: np.ndarray, budget: float, delta: float,
                     thresholds: np.ndarray = THRESHOLD_GRID) -> BudgetCalibration:
    """Learn-then-Test on the validation split: the loosest λ with accuracy loss ≤ budget w.p. ≥ 1 − δ."""
    losses, depth = exit_policy_losses(uncertainties, exit_predictions, full_predictions, labels, thresholds)
    certificate = certify(losses, budget, delta)
    if certificate.index is None:
        return BudgetCalibration(None, certificate, None, None)
    chosen = depth[certificate.index]
    n_exits = np.asarray(uncertainties).reshape(len(chosen), -1).shape[1]
    histogram = tuple(int(c) for c in np.bincount(chosen, minlength=n_exits + 1))
    return BudgetCalibration(float(thresholds[certificate.index]), certificate,
                             float(np.mean(chosen < n_exits)), histogram)
