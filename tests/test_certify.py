"""The certified accuracy budget (Learn-then-Test, fixed sequence, binomial p-values): exact
tails, the smallest certifiable budget, and the guarantee itself over 200 seeded calibration draws
of a synthetic two-exit ladder whose true risk at every threshold is known."""
from __future__ import annotations

import numpy as np
import pytest

from targets.control.certified_path import calibrate_path, ladder_depths, row_outcomes
from targets.control.certify import THRESHOLD_GRID, binomial_cdf, smallest_certifiable_budget
from targets.errors import ConfigError


@pytest.mark.parametrize("k, n, p", [(0, 10, 0.1), (3, 50, 0.05), (12, 1275, 0.005), (40, 2000, 0.02), (99, 100, 0.5)])
def test_binomial_tail_is_exact(k, n, p):
    stats = pytest.importorskip("scipy.stats")
    assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)


def _no_loss_rows(n: int):
    """n rows every exit answers as the full model does, all at u = 0.5."""
    return np.full((n, 1), 0.5), np.zeros((n, 1), dtype=int), np.zeros(n, dtype=int), np.zeros(n, dtype=int)


def test_smallest_certifiable_budget_and_refusal():
    assert smallest_certifiable_budget(180, 0.1) == pytest.approx(0.01271, abs=1e-5)
    rows = _no_loss_rows(180)
    assert not calibrate_path(*rows, 0.0127, 0.1, kind="shared").certified  # just below: even a perfect policy fails
    assert calibrate_path(*rows, 0.0128, 0.1, kind="shared").ceiling == len(THRESHOLD_GRID) - 1
    assert not calibrate_path(*rows, 0.005, 0.1, kind="shared").certified   # 0.5 pp needs about 460 rows


def test_fixed_sequence_stops_at_the_first_failure():
    """Rows at u = 0.3 are wrong at the exit (3 %: fails a 1 % budget), rows at u = 0.6 right:
    the path stops before 0.3 and never reaches the loss-free thresholds past it."""
    u = np.where(np.arange(1000) < 30, 0.3, 0.1)[:, None]
    exits = np.where(np.arange(1000) < 30, 1, 0)[:, None]
    cal = calibrate_path(u, exits, np.zeros(1000, dtype=int), np.zeros(1000, dtype=int), 0.01, 0.1, kind="shared")
    assert cal.points[cal.ceiling][0] <= 0.3 < cal.points[cal.ceiling + 1][0]
    assert len(cal.p_values) == cal.ceiling + 2  # nothing tested after the first failure


@pytest.mark.parametrize("budget, delta", [(0.0, 0.1), (0.005, 1.0), (1.5, 0.1)])
def test_bad_budget_or_risk_is_a_config_error(budget, delta):
    with pytest.raises(ConfigError):
        calibrate_path(*_no_loss_rows(10), budget, delta)


def test_depth_is_the_first_exit_below_the_threshold():
    u = np.array([[0.5, 0.1], [0.05, 0.9], [0.8, 0.7]])
    depths = [ladder_depths(u, [t, t]).tolist() for t in (0.0, 0.2, 0.6, 1.0)]
    assert depths == [[2, 2, 2], [1, 0, 2], [0, 0, 2], [0, 0, 0]]


def synthetic_population(rng: np.random.Generator, n: int):
    """A two-exit ladder: the deeper exit is more confident; an exit errs more the less sure it is."""
    u1 = rng.uniform(0, 1, n)
    u2 = np.clip(0.6 * u1 + rng.uniform(0, 0.4, n), 0, 1)
    labels = rng.integers(0, 2, n)
    full = np.where(rng.uniform(size=n) < 0.9, labels, 1 - labels)
    wrong1 = rng.uniform(size=n) < 0.35 * u1 ** 2
    wrong2 = rng.uniform(size=n) < 0.25 * u2 ** 2
    exits = np.stack([np.where(wrong1, 1 - full, full), np.where(wrong2, 1 - full, full)], axis=1)
    return np.stack([u1, u2], axis=1), exits, full, labels


def test_the_budget_holds_in_at_least_1_minus_delta_of_200_calibration_draws():
    """The shared path's certificate against a naive rule (the loosest threshold whose *empirical*
    risk is within budget), on a synthetic ladder whose true risk is known from 200,000 rows."""
    budget, delta, n_cal = 0.01, 0.1, 1500
    rng = np.random.default_rng(0)
    u, exits, full, labels = synthetic_population(rng, 200_000)
    exit_right, full_right = exits == labels[:, None], full == labels
    true_risk = np.array([row_outcomes(u, exit_right, full_right, [t, t])[1].mean() for t in THRESHOLD_GRID])
    exceed_ltt = exceed_naive = certified = 0
    exit_rates = []
    for draw in range(200):
        idx = np.random.default_rng(1000 + draw).choice(len(u), n_cal, replace=False)
        calibration = calibrate_path(u[idx], exits[idx], full[idx], labels[idx], budget, delta, kind="shared")
        if calibration.certified:
            certified += 1
            exit_rates.append(calibration.exit_rate)
            exceed_ltt += true_risk[calibration.ceiling] > budget
        empirical = np.array([row_outcomes(u[idx], exit_right[idx], full_right[idx], [t, t])[1].mean()
                              for t in THRESHOLD_GRID])
        naive = np.flatnonzero(empirical <= budget).max()
        exceed_naive += true_risk[naive] > budget
    print(f"exceed ltt {exceed_ltt}, naive {exceed_naive}, certified {certified}, exit rate {np.mean(exit_rates):.3f}")
    assert exceed_ltt <= delta * 200, exceed_ltt
    assert certified >= 190 and np.mean(exit_rates) > 0.2  # not vacuous: most rows leave early
    assert exceed_naive > 2 * delta * 200  # without the certificate the budget is broken often
