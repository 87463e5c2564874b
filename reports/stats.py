"""Statistics over per-request samples: latency summaries, reductions, and the unpaired bootstrap
(two runs whose requests do not pair). One-sided bounds and claim decisions: :mod:`reports.bounds`."""
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
