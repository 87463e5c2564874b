"""The certified accuracy budget (Learn-then-Test, fixed sequence, binomial p-values): exact
tails, the smallest certifiable budget, and the guarantee itself over 200 seeded calibration draws
of a synthetic two-exit ladder whose true risk at every threshold is known."""
from __future__ import annotations

import numpy as np
import pytest

from targets.certify import (THRESHOLD_GRID, binomial_cdf, calibrate_budget, certify, exit_depths,
                             exit_policy_losses, smallest_certifiable_budget)
from targets.errors import ConfigError


@pytest.mark.parametrize("k, n, p", [(0, 10, 0.1), (3, 50, 0.05), (12, 1275, 0.005), (40, 2000, 0.02), (99, 100, 0.5)])
def test_binomial_tail_is_exact(k, n, p):
    stats = pytest.importorskip("scipy.stats")
    assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)


def test_smallest_certifiable_budget_and_refusal():
    assert smallest_certifiable_budget(180, 0.1) == pytest.approx(0.01271, abs=1e-5)
    no_losses = np.zeros((3, 180), dtype=bool)
    assert certify(no_losses, 0.0127, 0.1).index is None          # just below: even a perfect policy fails
    assert certify(no_losses, 0.0128, 0.1).index == 2
    assert not certify(no_losses, 0.005, 0.1).certified            # 0.5 pp needs about 460 rows


def test_fixed_sequence_stops_at_the_first_failure():
    losses = np.zeros((4, 1000), dtype=bool)
    losses[1, :30] = True          # 3 %: fails a 1 % budget
    cert = certify(losses, 0.01, 0.1)
    assert cert.index == 0 and len(cert.p_values) == 2  # threshold 2 (no loss) is never reached


@pytest.mark.parametrize("budget, delta", [(0.0, 0.1), (0.005, 1.0), (1.5, 0.1)])
def test_bad_budget_or_risk_is_a_config_error(budget, delta):
    with pytest.raises(ConfigError):
        certify(np.zeros((1, 10)), budget, delta)


def test_depth_is_the_first_exit_below_the_threshold():
    u = np.array([[0.5, 0.1], [0.05, 0.9], [0.8, 0.7]])
    depth = exit_depths(u, np.array([0.0, 0.2, 0.6, 1.0]))
    assert depth.tolist() == [[2, 2, 2], [1, 0, 2], [0, 0, 2], [0, 0, 0]]


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
    budget, delta, n_cal = 0.01, 0.1, 1500
    rng = np.random.default_rng(0)
    population = synthetic_population(rng, 200_000)
    true_losses, _ = exit_policy_losses(*population, THRESHOLD_GRID)
    true_risk = true_losses.mean(axis=1)
    exceed_ltt = exceed_naive = certified = 0
    exit_rates = []
    for draw in range(200):
        idx = np.random.default_rng(1000 + draw).choice(len(population[0]), n_cal, replace=False)
        sample = tuple(a[idx] for a in population)
        calibration = calibrate_budget(*sample, budget=budget, delta=delta)
        if calibration.threshold is not None:
            certified += 1
            exit_rates.append(calibration.exit_rate)
            exceed_ltt += true_risk[calibration.certificate.index] > budget
        losses, _ = exit_policy_losses(*sample, THRESHOLD_GRID)
        naive = np.flatnonzero(losses.mean(axis=1) <= budget).max()  # "empirical loss within budget"
        exceed_naive += true_risk[naive] > budget
    print(f"exceed ltt {exceed_ltt}, naive {exceed_naive}, certified {certified}, exit rate {np.mean(exit_rates):.3f}")
    assert exceed_ltt <= delta * 200, exceed_ltt
    assert certified >= 190 and np.mean(exit_rates) > 0.2  # not vacuous: most rows leave early
    assert exceed_naive > 2 * delta * 200  # without the certificate the budget is broken often
