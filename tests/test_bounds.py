"""Three-way verdicts on one-sided 95 % bounds, validated on planted truths: a planted accuracy
loss of 0.4 pp and of 0.6 pp come out held, not held or inconclusive as the bounds say; zero
events never give a zero-width interval; the bounds cover the truth at least 95 % of the time; a
planted run-to-run drift between replicates widens the latency bound."""
from __future__ import annotations

import numpy as np
import pytest

from green_mlops.validate import replicate_plan
from reports.bounds import (ALPHA, INCONCLUSIVE, accuracy_loss_bounds, decide_at_least, decide_at_most,
                            exact_loss_bounds, ratio_reduction_bounds, replicate_bounds, rows_to_decide_loss)
from targets.control.binomial_bounds import clopper_pearson_upper
from reports.verdict import build_summary, replicate_pairs
from tests.test_verdict_load import RULES, records, run


def planted_rows(n_rows: int, harm: float, fix: float, rng: np.random.Generator, repeats: int = 1):
    """Paired correctness on ``n_rows`` rows, each sent ``repeats`` times: the full model is right
    on 90 % of the rows; bio is wrong where the full model is right on a ``harm`` share of all
    rows and right where it is wrong on a ``fix`` share (so the true loss is harm − fix)."""
    kind = rng.random(n_rows)
    full = np.ones(n_rows, bool)
    full[kind < 0.1] = False
    bio = full.copy()
    bio[(kind >= 0.1) & (kind < 0.1 + harm)] = False  # harmed
    bio[kind < fix] = True  # fixed (fix < 0.1)
    rows = np.repeat(np.arange(n_rows), repeats)
    return full[rows].astype(float), bio[rows].astype(float), rows


@pytest.mark.parametrize("true_loss_pp, n_rows, expected", [
    (0.4, 200_000, "held"),  # enough rows: the whole upper bound is below 0.5 pp
    (0.6, 200_000, "not_held"),  # the whole lower bound is above 0.5 pp
    (0.4, 2_000, "inconclusive"),  # too few rows to tell 0.4 from 0.5
    (0.6, 2_000, "inconclusive"),
])
def test_a_planted_loss_comes_out_as_its_bounds_say(true_loss_pp, n_rows, expected):
    rng = np.random.default_rng(7)
    full, bio, rows = planted_rows(n_rows, harm=true_loss_pp / 100 + 0.001, fix=0.001, rng=rng)
    loss = accuracy_loss_bounds(full, bio, rows)
    lo, hi = loss["accuracy_loss_bounds_pp"]
    assert lo <= loss["accuracy_loss_pp"] <= hi
    assert lo <= true_loss_pp <= hi
    assert decide_at_most((lo, hi), 0.5) == expected
    if expected == INCONCLUSIVE:
        needed = rows_to_decide_loss(loss, 0.5)
        assert needed is not None and needed > n_rows
        # The number it names decides the claim when the rows keep their shares (the same rows,
        # tiled as new rows), and a tenth fewer does not.
        def tiled(total: int) -> str:
            copies = -(-total // n_rows)
            ids = np.concatenate([rows + k * n_rows for k in range(copies)])
            bounds = accuracy_loss_bounds(np.tile(full, copies), np.tile(bio, copies), ids)["accuracy_loss_bounds_pp"]
            return decide_at_most(bounds, 0.5)

        assert tiled(int(needed * 1.1)) != INCONCLUSIVE
        assert tiled(int(needed * 0.7)) == INCONCLUSIVE


def test_zero_events_never_give_a_zero_width_interval():
    full = np.ones(540)
    loss = accuracy_loss_bounds(full, full, np.arange(540))
    lo, hi = loss["accuracy_loss_bounds_pp"]
    assert loss["accuracy_loss_pp"] == 0.0 and lo < 0.0 < hi
    # No harm in 540 rows: the exact bound is 1 − 0.025^(1/540) (the 5 % risk split between harms and fixes).
    assert hi == pytest.approx(100 * (1 - 0.025 ** (1 / 540)), rel=1e-6)
    assert clopper_pearson_upper(0, 540, ALPHA) == pytest.approx(1 - 0.05 ** (1 / 540), rel=1e-9)
    assert decide_at_most((lo, hi), 0.5) == INCONCLUSIVE  # 540 rows cannot show ≤ 0.5 pp, even with no harm
    assert rows_to_decide_loss(loss, 0.5) == pytest.approx(np.log(0.025) / np.log(1 - 0.005), rel=0.02)


def test_repeats_of_a_row_do_not_narrow_the_bounds():
    rng = np.random.default_rng(3)
    once = accuracy_loss_bounds(*planted_rows(500, 0.02, 0.01, rng))
    rng = np.random.default_rng(3)
    five = accuracy_loss_bounds(*planted_rows(500, 0.02, 0.01, rng, repeats=5))
    assert five["n_rows"] == once["n_rows"] == 500
    assert five["accuracy_loss_exact_bounds_pp"] == pytest.approx(once["accuracy_loss_exact_bounds_pp"])


def test_the_one_sided_bounds_cover_the_truth_at_least_95_percent_of_the_time():
    """300 seeded draws of 800 rows, each repeated 1–4 times: the upper bound is below the true
    loss in at most 5 % of them (and so is the lower bound above it)."""
    rng = np.random.default_rng(2026)
    truth, misses_hi, misses_lo = 0.02 - 0.01, 0, 0
    for _ in range(300):
        full, bio, rows = planted_rows(800, harm=0.02, fix=0.01, rng=rng, repeats=int(rng.integers(1, 5)))
        lo, hi = accuracy_loss_bounds(full, bio, rows)["accuracy_loss_bounds_pp"]
        misses_hi += hi < 100 * truth
        misses_lo += lo > 100 * truth
    assert misses_hi / 300 <= 0.05 and misses_lo / 300 <= 0.05, (misses_lo, misses_hi)


def test_exact_bounds_are_monotone_in_harms_and_fixes():
    lo0, hi0 = exact_loss_bounds(0, 0, 1000)
    lo1, hi1 = exact_loss_bounds(1, 0, 1000)
    assert hi1 > hi0 and lo1 > lo0
    lo2, hi2 = exact_loss_bounds(1, 1, 1000)
    assert hi2 < hi1 and lo2 < lo1


def test_latency_decisions_and_block_bounds():
    assert decide_at_least((42.0, 60.0), 42.0) == "held"
    assert decide_at_least((30.0, 41.0), 42.0) == "not_held"
    assert decide_at_least((40.0, 50.0), 42.0) == INCONCLUSIVE
    rng = np.random.default_rng(0)
    base = rng.gamma(4.0, 0.5, size=2000)
    blocks = np.arange(2000) // 64
    lo, hi = ratio_reduction_bounds(base, 0.5 * base, blocks)
    assert lo == pytest.approx(50.0) and hi == pytest.approx(50.0)  # exactly half: no doubt left
    noisy = 0.5 * base * rng.lognormal(0, 0.3, size=2000)
    lo, hi = ratio_reduction_bounds(base, noisy, blocks)
    point = 100 * (1 - noisy.mean() / base.mean())
    assert lo < point < hi


def test_one_replicate_gives_no_run_to_run_bound():
    assert replicate_bounds([50.0]) is None
    lo, hi = replicate_bounds([50.0, 52.0, 48.0])
    assert lo < 50.0 < hi


def test_replicates_run_counterbalanced():
    assert replicate_plan(3) == [(1, "standard", "standard"), (1, "bio", "bio"), (2, "bio-r2", "bio"),
                                 (2, "standard-r2", "standard"), (3, "standard-r3", "standard"), (3, "bio-r3", "bio")]


def replicate_runs(bio_latency_ms: list[float], jitter: float = 0.1) -> list:
    """One standard and one bio run per replicate, each pair on its own schedule; standard's
    latency is 2 ms, bio's the replicate's (so its true reduction is known), with per-request noise."""
    runs = []
    for k, bio_ms in enumerate(bio_latency_ms, start=1):
        rng = np.random.default_rng(k)
        noise = rng.normal(1.0, jitter, size=2000)
        schedule = {"digest": f"d{k}", "n_scheduled": 2000, "duration_s": 20.0, "requested_rps": 100.0, "seed": k}
        suffix = "" if k == 1 else f"-r{k}"
        runs.append(run("standard" + suffix, records(latency=lambda i: 2.0 * noise[i]), schedule=schedule))
        runs.append(run("bio" + suffix, records(latency=lambda i: bio_ms * noise[-i - 1]), schedule=schedule))
    return runs


def test_a_planted_run_to_run_drift_widens_the_latency_bound():
    steady = build_summary(replicate_runs([1.0, 1.0, 1.0]), rules=RULES)["comparison"]
    drift = build_summary(replicate_runs([0.8, 1.0, 1.2]), rules=RULES)["comparison"]  # 60, 50, 40 %
    assert steady["n_replicates"] == drift["n_replicates"] == 3 and drift["run_to_run_included"]
    assert drift["latency_reduction_pct"] == pytest.approx(50.0, abs=1.0)
    s_lo, s_hi = steady["latency_reduction_bounds95_pct"]
    d_lo, d_hi = drift["latency_reduction_bounds95_pct"]
    assert s_lo < 50.0 < s_hi and d_lo < 50.0 < d_hi
    assert (d_hi - d_lo) > 5 * (s_hi - s_lo)  # the spread between replicates is in the bound
    # The replicates' own, within-run bounds are each narrow: one run alone would claim certainty.
    for replicate in drift["replicates"]:
        lo, hi = replicate["latency_reduction_bounds95_pct"]
        assert hi - lo < (d_hi - d_lo) / 3
    assert d_lo < 42.0  # so the 42 % claim cannot be held on these three runs
    summary = build_summary(replicate_runs([0.8, 1.0, 1.2]), rules=RULES)
    latency = next(c for c in summary["claims"] if c["name"] == "latency_reduction")
    assert latency["status"] == INCONCLUSIVE and "replicates (--repeats) would decide it" in latency["reason"]
    assert "load stage 3 replicates" in summary["verdict"]


def test_replicates_pair_by_schedule_and_leave_policy_runs_out():
    runs = replicate_runs([1.0, 1.0])
    runs.append(run("bio-paper", records(latency=lambda i: 0.5), schedule={"digest": "d1", "n_scheduled": 2000,
                                                                             "duration_s": 20.0, "requested_rps": 100.0,
                                                                             "seed": 1}))
    pairs = replicate_pairs(runs)
    assert [(s.name, b.name) for s, b in pairs] == [("standard", "bio"), ("standard-r2", "bio-r2")]
