"""One-sided 95 % bounds and three-way claim decisions: a claim is decided on its bounds, never on
its point estimate.

* **held**: the whole one-sided bound is on the right side of the target (accuracy loss: the upper
  bound ≤ target; latency reduction: the lower bound ≥ target);
* **not held**: the bound on the other side is wholly on the wrong side (loss: lower bound >
  target; reduction: upper bound < target);
* **inconclusive**: otherwise, with about how many rows (or replicates) would decide it if the
  point estimate stayed where it is.

Accuracy loss against the full model, paired by evaluation row: the wider of

1. an **exact** bound: Clopper–Pearson on the rows the ladder harmed (full right, bio wrong) and
   on the rows it fixed (full wrong, bio right), the 5 % risk split between the two (Bonferroni),
   so the bound on ``P(harm) − P(fix)`` holds whatever the rows' dependence; a row sent several
   times counts by the share of its requests that were harmed (fixed). Zero events never give a
   zero-width interval: no harm in n rows still leaves ``1 − 0.025^(1/n)``;
2. a **cluster bootstrap** over evaluation rows (repeats of one row do not narrow it).

Latency reduction: a cluster bootstrap of the ratio of mean latencies over time blocks (in-process:
the ablation's interleaved blocks; under load: blocks of the schedule, paired by request), and,
with several replicates of the load stage, a Student-t bound over the replicates' reductions (the
run-to-run variation), whichever is wider.

Pure functions of arrays: no I/O. ``ALPHA`` is the one-sided risk of every bound.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

from targets.control.binomial_bounds import clopper_pearson_lower, clopper_pearson_upper

ALPHA = 0.05  # one-sided: each bound holds with probability >= 95 %
BOOTSTRAP_RESAMPLES = 2000
HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURABLE = "held", "not_held", "inconclusive", "not_measurable"
STATUS_WORDS = {HELD: "held", NOT_HELD: "not held", INCONCLUSIVE: "inconclusive", NOT_MEASURABLE: "not measurable"}
MAX_SCALE = 1e4  # n to decide: beyond this many times the data, "no feasible n"


# --- exact binomial bounds ---------------------------------------------------------------------

def paired_loss_counts(full_correct: np.ndarray, bio_correct: np.ndarray, rows: np.ndarray) -> tuple[float, float, int]:
    """Rows harmed and rows fixed (each row weighted by the share of its requests that were), and
    the number of distinct rows."""
    full_correct, bio_correct = np.asarray(full_correct, float), np.asarray(bio_correct, float)
    _, inverse = np.unique(np.asarray(rows), return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    harmed = np.bincount(inverse, weights=full_correct * (1 - bio_correct)) / counts
    fixed = np.bincount(inverse, weights=(1 - full_correct) * bio_correct) / counts
    return float(harmed.sum()), float(fixed.sum()), int(len(counts))


def exact_loss_bounds(harmed: float, fixed: float, n_rows: int, alpha: float = ALPHA) -> tuple[float, float]:
    """One-sided (lower, upper) bounds of ``P(harm) − P(fix)`` (a fraction, not pp), each at risk
    ``alpha``, split between the two proportions."""
    half = alpha / 2
    upper = clopper_pearson_upper(harmed, n_rows, half) - clopper_pearson_lower(fixed, n_rows, half)
    lower = clopper_pearson_lower(harmed, n_rows, half) - clopper_pearson_upper(fixed, n_rows, half)
    return lower, upper


# --- bootstrap bounds --------------------------------------------------------------------------

CHUNK_CELLS = 1 << 22  # resamples × clusters drawn at a time (bounded memory for many clusters)


def _resampled_sums(clusters: np.ndarray, per_sample: list[np.ndarray], rng: np.random.Generator,
                    resamples: int) -> list[np.ndarray]:
    """For each array of ``per_sample`` values, its sum over each bootstrap resample of whole
    clusters (clusters drawn with replacement), computed in chunks of bounded memory."""
    unique, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    n = len(unique)
    cluster_sums = [np.bincount(inverse, weights=np.asarray(v, float), minlength=n) for v in per_sample]
    out = [np.empty(resamples) for _ in per_sample]
    step = max(1, CHUNK_CELLS // n)
    for start in range(0, resamples, step):
        draws = rng.integers(0, n, size=(min(step, resamples - start), n))
        for sums, result in zip(cluster_sums, out):
            result[start : start + len(draws)] = sums[draws].sum(axis=1)
    return out


def cluster_mean_bounds(values: np.ndarray, clusters: np.ndarray, alpha: float = ALPHA,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """One-sided (lower, upper) bootstrap bounds of the mean of ``values``, whole clusters drawn."""
    values = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    sums, counts = _resampled_sums(clusters, [values, np.ones_like(values)], rng, resamples)
    means = sums / counts
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def ratio_reduction_bounds(baseline_ms: np.ndarray, treated_ms: np.ndarray, clusters: np.ndarray,
                           alpha: float = ALPHA, resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = 0) -> tuple[float, float]:
    """One-sided (lower, upper) bounds of ``100·(1 − mean(treated)/mean(baseline))`` over paired
    samples, whole clusters (time blocks) drawn together."""
    baseline_ms, treated_ms = np.asarray(baseline_ms, float), np.asarray(treated_ms, float)
    rng = np.random.default_rng(seed)
    base, treat = _resampled_sums(clusters, [baseline_ms, treated_ms], rng, resamples)
    reductions = 100.0 * (1.0 - treat / base)
    lo, hi = np.quantile(reductions, [alpha, 1 - alpha])
    return float(lo), float(hi)


def replicate_bounds(values: list[float], alpha: float = ALPHA) -> tuple[float, float] | None:
    """One-sided Student-t (lower, upper) bounds of the mean of per-replicate figures (None for
    fewer than two replicates: one run says nothing about run-to-run variation)."""
    values = np.asarray(values, float)
    if values.size < 2:
        return None
    half = float(scipy_stats.t.ppf(1 - alpha, values.size - 1)) * float(values.std(ddof=1)) / math.sqrt(values.size)
    return float(values.mean() - half), float(values.mean() + half)


def wider(*intervals: tuple[float, float] | None) -> tuple[float, float]:
    """The union of intervals: the lowest lower bound and the highest upper bound."""
    present = [i for i in intervals if i is not None]
    return min(i[0] for i in present), max(i[1] for i in present)


# --- accuracy loss -----------------------------------------------------------------------------

def accuracy_loss_bounds(full_correct: np.ndarray, bio_correct: np.ndarray, rows: np.ndarray,
                         alpha: float = ALPHA) -> dict:
    """The paired accuracy loss in pp and its one-sided bounds (the wider of exact and cluster
    bootstrap), with the counts they rest on."""
    full_correct, bio_correct = np.asarray(full_correct, float), np.asarray(bio_correct, float)
    harmed, fixed, n_rows = paired_loss_counts(full_correct, bio_correct, rows)
    exact = exact_loss_bounds(harmed, fixed, n_rows, alpha)
    boot = cluster_mean_bounds(full_correct - bio_correct, rows, alpha)
    lo, hi = wider(exact, boot)
    return {"accuracy_loss_pp": 100 * float(np.mean(full_correct - bio_correct)),
            "accuracy_loss_bounds_pp": [100 * lo, 100 * hi],
            "accuracy_loss_exact_bounds_pp": [100 * exact[0], 100 * exact[1]],
            "accuracy_loss_bootstrap_bounds_pp": [100 * boot[0], 100 * boot[1]],
            "bound_method": "exact" if (exact[1] >= boot[1]) else "cluster bootstrap",
            "rows_harmed": harmed, "rows_fixed": fixed, "n_rows": n_rows}


# --- decisions ---------------------------------------------------------------------------------

def decide_at_most(bounds: tuple[float, float] | list[float] | None, target: float, tolerance: float = 1e-9) -> str:
    """A claim "figure ≤ target" on its one-sided bounds (lower, upper)."""
    if bounds is None:
        return NOT_MEASURABLE
    lo, hi = bounds
    if hi <= target + tolerance:
        return HELD
    if lo > target + tolerance:
        return NOT_HELD
    return INCONCLUSIVE


def decide_at_least(bounds: tuple[float, float] | list[float] | None, target: float, tolerance: float = 1e-9) -> str:
    """A claim "figure ≥ target" on its one-sided bounds (lower, upper)."""
    if bounds is None:
        return NOT_MEASURABLE
    lo, hi = bounds
    if lo >= target - tolerance:
        return HELD
    if hi < target - tolerance:
        return NOT_HELD
    return INCONCLUSIVE


def _smallest_scale(decides) -> float | None:
    """The smallest factor c ≥ 1 (more data, the same proportions) for which ``decides(c)``; None
    beyond ``MAX_SCALE``. ``decides`` must be monotone in c."""
    if not decides(MAX_SCALE):
        return None
    lo, hi = 1.0, MAX_SCALE
    while hi / lo > 1.01:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if decides(mid) else (mid, hi)
    return hi


def rows_to_decide_loss(loss: dict, target_pp: float, alpha: float = ALPHA) -> int | None:
    """About how many evaluation rows would decide an inconclusive accuracy claim, if the rows
    harmed and fixed kept their shares: exact counts scaled, the bootstrap's width by 1/√scale.
    None when no feasible number would (the point estimate sits on the target)."""
    n = loss["n_rows"]
    point = loss["accuracy_loss_pp"]
    boot_lo, boot_hi = loss["accuracy_loss_bootstrap_bounds_pp"]

    def decides(scale: float) -> bool:
        exact = exact_loss_bounds(loss["rows_harmed"] * scale, loss["rows_fixed"] * scale, round(n * scale), alpha)
        shrink = 1 / math.sqrt(scale)
        boot = (point - (point - boot_lo) * shrink, point + (boot_hi - point) * shrink)
        lo, hi = wider((100 * exact[0], 100 * exact[1]), boot)
        return decide_at_most((lo, hi), target_pp) != INCONCLUSIVE

    scale = _smallest_scale(decides)
    return None if scale is None else int(math.ceil(n * scale))


def n_to_decide_at_least(point: float, bounds: tuple[float, float], target: float, n: int) -> int | None:
    """About how many units (replicates, blocks) would decide an inconclusive "≥ target" claim if
    the bounds' half-widths shrank as 1/√n around the point estimate; None when none would."""
    lo, hi = bounds

    def decides(scale: float) -> bool:
        shrink = 1 / math.sqrt(scale)
        return decide_at_least((point - (point - lo) * shrink, point + (hi - point) * shrink), target) != INCONCLUSIVE

    scale = _smallest_scale(decides)
    return None if scale is None else int(math.ceil(n * scale))
