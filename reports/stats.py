"""Statistics over per-request samples: latency summaries and paired bootstrap intervals."""
from __future__ import annotations

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def latency_summary(latency_ms: np.ndarray) -> dict:
    """n, mean and p50/p95/p99 (linear interpolation) of all samples, in milliseconds."""
    latency_ms = np.asarray(latency_ms, dtype=np.float64)
    if latency_ms.size == 0:
        return {"n": 0, "mean_ms": None, "p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(latency_ms, [50, 95, 99])
    return {"n": int(latency_ms.size), "mean_ms": float(latency_ms.mean()),
            "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def reduction_pct(baseline: float, treated: float) -> float:
    """How much smaller ``treated`` is than ``baseline``, in percent of the baseline."""
    return 100.0 * (baseline - treated) / baseline


def _resample(clusters: np.ndarray, rng: np.random.Generator, resamples: int) -> list[np.ndarray]:
    """Index sets of a cluster bootstrap: whole clusters are drawn with replacement."""
    unique, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(unique))]
    draws = rng.integers(0, len(unique), size=(resamples, len(unique)))
    return [np.concatenate([members[c] for c in draw]) for draw in draws]


def paired_bootstrap_ci(
    baseline: np.ndarray,
    treated: np.ndarray,
    statistic,
    clusters: np.ndarray | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(baseline[idx], treated[idx])`` over paired resamples.

    Pairs are resampled together. With ``clusters`` (e.g. the evaluation image each request
    carried), whole clusters are resampled, so repeats of one input do not narrow the interval.
    """
    baseline, treated = np.asarray(baseline), np.asarray(treated)
    rng = np.random.default_rng(seed)
    if clusters is None:
        index_sets = rng.integers(0, len(baseline), size=(resamples, len(baseline)))
    else:
        index_sets = _resample(np.asarray(clusters), rng, resamples)
    values = np.array([statistic(baseline[idx], treated[idx]) for idx in index_sets])
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


def accuracy_loss_pp(correct_baseline: np.ndarray, correct_treated: np.ndarray) -> float:
    """Accuracy of the baseline minus accuracy of the treated run, in percentage points."""
    return 100.0 * (float(np.mean(correct_baseline)) - float(np.mean(correct_treated)))


def mean_reduction_pct(baseline: np.ndarray, treated: np.ndarray) -> float:
    return reduction_pct(float(np.mean(baseline)), float(np.mean(treated)))


def independent_bootstrap_ci(
    baseline: np.ndarray,
    treated: np.ndarray,
    statistic,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(baseline*, treated*)``, each run resampled on its own
    (for two runs whose requests are not paired, such as two load tests)."""
    baseline, treated = np.asarray(baseline), np.asarray(treated)
    rng = np.random.default_rng(seed)
    values = np.array([
        statistic(baseline[rng.integers(0, len(baseline), len(baseline))],
                  treated[rng.integers(0, len(treated), len(treated))])
        for _ in range(resamples)
    ])
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


def cluster_mean_ci(
    values: np.ndarray,
    clusters: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` under a cluster bootstrap: whole clusters
    (e.g. the evaluation row each request carried) are drawn with replacement, so the repeats of
    one input do not narrow the interval. Vectorised over per-cluster sums and counts."""
    values, clusters = np.asarray(values, dtype=np.float64), np.asarray(clusters)
    if values.size == 0:
        raise ValueError("no values to resample")
    unique, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unique), size=(resamples, len(unique)))
    weights = np.zeros((resamples, len(unique)))
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    means = (weights @ sums) / (weights @ counts)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)
