"""The certified path (targets.control.certified_path) on ladders whose true risk is known exactly.

A synthetic ladder here is a finite table of cells (the uncertainty at each exit on a coarse grid,
whether each exit and the full model answer rightly) with known probabilities, so the true risk of
any threshold vector is a sum over cells, and a calibration split is a multinomial draw from it.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from targets.control.certified_path import (PathCalibration, calibrate_path, greedy_path, resolve_kind,
                                    row_outcomes, trinomial_p_value)
from targets.errors import ConfigError

LEVELS = np.linspace(0.0125, 0.9875, 40)  # the uncertainties a synthetic exit can show


class Ladder:
    """A two-exit synthetic ladder: cells (u1, u2, exit1 right, exit2 right, full right) with
    probabilities ``p``; labels are 0 and an answer is 0 when right, 1 when wrong."""

    def __init__(self, cells: list[tuple], p: np.ndarray):
        self.cells = np.array(cells, dtype=np.float64)
        self.p = np.asarray(p, dtype=np.float64) / np.sum(p)

    def true_risk(self, thresholds, loss: str = "harm") -> float:
        u = self.cells[:, :2]
        depth, harmed, fixed = row_outcomes(u, self.cells[:, 2:4].astype(bool), self.cells[:, 4].astype(bool),
                                            thresholds)
        return float(self.p @ (harmed.astype(float) - (fixed.astype(float) if loss == "net" else 0.0)))

    def draw(self, n: int, rng: np.random.Generator):
        """``(u [n, 2], exit answers [n, 2], full answers [n], labels [n])``."""
        rows = self.cells[rng.choice(len(self.p), size=n, p=self.p)]
        return rows[:, :2], (~rows[:, 2:4].astype(bool)).astype(int), (~rows[:, 4].astype(bool)).astype(int), \
            np.zeros(n, dtype=int)


def realistic_ladder() -> Ladder:
    """Exits right more often the lower their uncertainty; the full model right 90 % of the time."""
    cells, p = [], []
    for i1, i2, r1, r2, rf in itertools.product(range(len(LEVELS)), range(len(LEVELS)), (0, 1), (0, 1), (0, 1)):
        u1, u2 = LEVELS[i1], LEVELS[i2]
        q1, q2 = 1 - 0.45 * u1 ** 1.5, 1 - 0.4 * u2 ** 1.5  # P(right) at each exit
        weight = (q1 if r1 else 1 - q1) * (q2 if r2 else 1 - q2) * (0.9 if rf else 0.1)
        weight *= math.exp(-2 * u1) * math.exp(-3 * u2)  # confident rows are common
        cells.append((u1, u2, r1, r2, rf))
        p.append(weight)
    return Ladder(cells, np.array(p))


def counter_example() -> Ladder:
    """The counter-example to certifying one shared threshold and running another vector: every
    shared λ ≤ 0.5 has no risk at all, yet the vector (0, 0.5) has 4 %.

    Rows confident at both exits are right at exit 1 and wrong at exit 2 (4 % of rows): a shared λ
    sends them out at exit 1; the vector (0, λ) lets them run on and leave wrong at exit 2."""
    cells = [(0.02, 0.02, 1, 0, 1),  # 4 %: exit 1 right, exit 2 wrong, both confident
             (0.9, 0.02, 0, 1, 1),   # exit 1 unsure and wrong, exit 2 right
             (0.9, 0.9, 0, 0, 1),    # both unsure: the full model answers
             (0.02, 0.9, 1, 1, 1)]
    return Ladder(cells, np.array([0.04, 0.46, 0.3, 0.2]))


def test_the_counter_example_is_one():
    ladder = counter_example()
    assert max(ladder.true_risk((lam, lam)) for lam in np.linspace(0, 0.5, 101)) == 0.0
    assert ladder.true_risk((0.0, 0.5)) == pytest.approx(0.04)


@pytest.mark.parametrize("kind,loss", [("per-exit", "harm"), ("shared", "harm"), ("per-exit", "net"), ("shared", "net")])
def test_every_certified_point_is_within_budget_at_least_1_minus_delta_of_the_time(kind, loss):
    """Over 120 calibration draws of 3,000 rows, the simultaneous guarantee: the share of draws in
    which *any* certified point's true risk exceeds the budget stays within δ = 0.1 (plus the
    Monte-Carlo allowance of 120 draws), and the path certifies something in most draws."""
    ladder, budget, delta = realistic_ladder(), 0.01, 0.1
    rng = np.random.default_rng(11)
    failures = certified = 0
    for _ in range(120):
        u, exits, full, labels = ladder.draw(3000, rng)
        cal = calibrate_path(u, exits, full, labels, budget, delta, loss=loss, kind=kind)
        if cal.certified:
            certified += 1
            worst = max(ladder.true_risk(cal.points[i], loss) for i in range(cal.ceiling + 1))
            failures += worst > budget
    assert certified >= 100
    assert failures / 120 <= delta + 0.06  # P(Binomial(120, 0.1) > 19) < 0.05


def test_the_path_never_certifies_the_counter_examples_bad_vector():
    """The per-exit path on the counter-example: whatever it certifies has a true risk within
    budget in at least 1 − δ of the draws, so (0, λ) with its 4 % is (nearly) never run."""
    ladder, budget, delta = counter_example(), 0.005, 0.1
    rng = np.random.default_rng(3)
    bad = 0
    for _ in range(60):
        u, exits, full, labels = ladder.draw(3000, rng)
        cal = calibrate_path(u, exits, full, labels, budget, delta, kind="per-exit")
        assert cal.certified
        bad += any(ladder.true_risk(cal.points[i]) > budget for i in range(cal.ceiling + 1))
    assert bad <= 6 + 6


def test_the_per_exit_path_saves_more_than_the_shared_one_where_exits_differ():
    """Exit 2 of the counter-example is good where exit 1 is unsure: a per-exit ceiling lets rows
    leave there that a shared threshold (held back by exit 1) cannot."""
    ladder = counter_example()
    u, exits, full, labels = ladder.draw(6000, np.random.default_rng(5))
    shared = calibrate_path(u, exits, full, labels, 0.005, 0.1, kind="shared")
    per_exit = calibrate_path(u, exits, full, labels, 0.005, 0.1, kind="per-exit")
    depth = lambda cal: row_outcomes(u, exits == labels[:, None], full == labels, cal.ceiling_thresholds)[0].mean()  # noqa: E731
    assert depth(per_exit) <= depth(shared)


@pytest.mark.parametrize("harm,fix", [(0.005, 0.0), (0.025, 0.02), (0.06, 0.055)])
def test_the_net_p_value_is_valid_on_the_null_boundary(harm, fix):
    """A gap of exactly the 0.5 pp budget, at low, middling and high discordance: rejected at δ = 0.1
    in at most δ of 400 draws of 2,000 rows (plus the Monte-Carlo allowance)."""
    rng = np.random.default_rng(0)
    counts = rng.multinomial(2000, [harm, fix, 1 - harm - fix], size=400)
    rejected = np.mean([trinomial_p_value(int(h), int(f), 2000, 0.005) <= 0.1 for h, f, _ in counts])
    assert rejected <= 0.1 + 0.035


def test_the_net_p_value_nets_fixes_against_harms():
    """2 % harmed and 2.2 % fixed on 3,000 rows: the harm risk cannot certify 0.5 pp, the net one can."""
    from targets.control.certify import binomial_p_value

    assert binomial_p_value(60, 3000, 0.005) > 0.1
    assert trinomial_p_value(60, 66, 3000, 0.005) <= 0.1
    assert trinomial_p_value(0, 0, 3000, 0.005) <= 0.01 and trinomial_p_value(90, 30, 3000, 0.005) > 0.5


def test_auto_chooses_by_row_count_alone():
    assert resolve_kind("auto", 503, 0.005, 0.1) == "shared"
    assert resolve_kind("auto", 3060, 0.005, 0.1) == "shared"  # a 2,040-row test part allows 5 harms
    assert resolve_kind("auto", 6000, 0.005, 0.1) == "per-exit"
    assert resolve_kind("auto", 3060, 0.02, 0.1) == "per-exit"
    with pytest.raises(ConfigError, match="budget path must be one of"):
        resolve_kind("diagonal", 100, 0.005, 0.1)


def test_greedy_path_runs_from_strict_to_loose_monotonically():
    u, exits, full, labels = realistic_ladder().draw(1000, np.random.default_rng(1))
    points = greedy_path(u, exits == labels[:, None], full == labels, np.ones(3), "harm")
    assert points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0) or max(points[-1]) <= 1.0
    assert all(all(b >= a for a, b in zip(p, q)) for p, q in zip(points, points[1:]))  # one exit loosens per step
    assert all(sum(b > a for a, b in zip(p, q)) == 1 for p, q in zip(points, points[1:]))


def test_levels_map_onto_the_certified_part_only():
    cal = calibrate_path(*realistic_ladder().draw(3000, np.random.default_rng(2)), 0.01, 0.1, kind="per-exit")
    assert isinstance(cal, PathCalibration) and cal.certified and cal.ceiling < len(cal.points) - 1
    assert cal.thresholds_at(0.0) == (0, cal.points[0])
    assert cal.thresholds_at(1.0) == (cal.ceiling, cal.points[cal.ceiling])
    assert cal.thresholds_at(7.0)[0] == cal.ceiling and cal.thresholds_at(float("inf"))[0] == cal.ceiling
    assert cal.thresholds_at(0.5)[0] == math.floor(0.5 * cal.ceiling)


def test_bad_settings_are_one_clear_error():
    u, exits, full, labels = realistic_ladder().draw(100, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="budget loss must be one of"):
        calibrate_path(u, exits, full, labels, 0.01, 0.1, loss="gap")
    with pytest.raises(ConfigError, match="accuracy budget must be in"):
        calibrate_path(u, exits, full, labels, 1.5, 0.1)
    with pytest.raises(ConfigError, match="3 positive values"):
        calibrate_path(u, exits, full, labels, 0.01, 0.1, stage_cost=[1, 1])
