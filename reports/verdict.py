"""From recorded runs to figures, the standard-vs-bio comparison, the claims verdict, validity
rules (in the spirit of MLPerf LoadGen) and regressions against a baseline summary.

Pure functions of the runs: no I/O, no plotting.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reports.ablation import PAPER_ACCURACY_LOSS_PP, PAPER_LATENCY_REDUCTION_PCT
from reports.records import phase_summary, request_figures
from reports.runs import Run
from reports.stats import independent_bootstrap_ci, reduction_pct

HELD, NOT_HELD, NOT_MEASURABLE = "held", "not_held", "not_measurable"


@dataclass(frozen=True)
class ValidityRules:
    min_duration_s: float = 10.0  # per run
    min_requests: int = 500  # answered, per run
    max_late_fraction: float = 0.01  # open loop: sends that left late
    stability_windows: int = 3  # last whole seconds whose throughput must agree
    max_stability_cv: float = 0.25  # coefficient of variation of those seconds' throughput


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the baseline a figure may get before ``--gate`` fails."""

    latency_reduction_pp: float = 5.0
    energy_reduction_pp: float = 5.0
    accuracy_loss_pp: float = 0.25


def _answered(run: Run) -> list[dict]:
    return [r for r in run.records if r["status"] == 200]


def run_figures(run: Run) -> dict:
    """The figures of one run: conditions, throughput, latency, accuracy, admission, energy."""
    records = run.records
    windows = [w for w in run.windows if w.get("energy_j") is not None]
    energy_j = sum(w["energy_j"] for w in windows) if windows else None
    co2 = [w["co2_g"] for w in run.windows if w.get("co2_g") is not None]
    m = run.metadata
    return {
        "name": run.name,
        "scenario": run.scenario,
        "conditions": {k: m.get(k) for k in ("model", "provider", "controller", "shape", "shape_params",
                                             "open_loop", "arrival_rate_rps", "host", "versions", "machine",
                                             "started_at", "ended_at")},
        **request_figures(records),
        "energy_per_request_j": energy_j / len(records) if energy_j is not None and records else None,
        "energy_source": windows[-1]["energy_source"] if windows else "none",
        "co2_g_per_1k_requests": 1000 * sum(co2) / len(records) if co2 and records else None,
        "co2_source": windows[-1]["energy_source"] if co2 and windows else "none",
        "phases": phase_summary(records) if records else [],
    }


def _pick(runs: list[Run], scenario: str) -> Run | None:
    matching = [r for r in runs if r.scenario == scenario and _answered(r)]
    return matching[-1] if matching else None


def compare(runs: list[Run]) -> dict | None:
    """Standard vs bio (the last run of each scenario with answers); None without both."""
    standard, bio = _pick(runs, "standard"), _pick(runs, "bio")
    if standard is None or bio is None:
        return None
    std_lat = np.array([r["latency_ms"] for r in _answered(standard)])
    bio_lat = np.array([r["latency_ms"] for r in _answered(bio)])
    std_ok = np.array([bool(r["correct"]) for r in _answered(standard)], dtype=float)
    bio_ok = np.array([bool(r["correct"]) for r in _answered(bio)], dtype=float)

    def mean_reduction(a, b):
        return reduction_pct(float(a.mean()), float(b.mean()))

    def loss_pp(a, b):
        return 100 * (float(a.mean()) - float(b.mean()))

    std_fig, bio_fig = run_figures(standard), run_figures(bio)
    energy = None
    if std_fig["energy_per_request_j"] and bio_fig["energy_per_request_j"] is not None:
        energy = reduction_pct(std_fig["energy_per_request_j"], bio_fig["energy_per_request_j"])
    return {
        "standard_run": standard.name,
        "bio_run": bio.name,
        "latency_reduction_pct": mean_reduction(std_lat, bio_lat),
        "latency_reduction_ci95_pct": list(independent_bootstrap_ci(std_lat, bio_lat, mean_reduction)),
        "p95_reduction_pct": reduction_pct(std_fig["p95_ms"], bio_fig["p95_ms"]),
        "accuracy_loss_pp": loss_pp(std_ok, bio_ok),
        "accuracy_loss_ci95_pp": list(independent_bootstrap_ci(std_ok, bio_ok, loss_pp)),
        "energy_reduction_pct": energy,
        "energy_source": std_fig["energy_source"],
        "admission_rate": bio_fig["admission_rate"],
        "n_standard": len(std_lat),
        "n_bio": len(bio_lat),
    }


def claims(comparison: dict | None) -> list[dict]:
    """The paper's claims, each held, not held or not measurable, with the numbers it rests on."""
    if comparison is None:
        reason = "needs one standard and one bio run with answered requests"
        return [
            {"name": "latency_reduction", "target": f">= {PAPER_LATENCY_REDUCTION_PCT:g} %", "measured": None,
             "status": NOT_MEASURABLE, "reason": reason},
            {"name": "accuracy_loss", "target": f"<= {PAPER_ACCURACY_LOSS_PP:g} pp", "measured": None,
             "status": NOT_MEASURABLE, "reason": reason},
        ]
    c = comparison
    latency, loss = c["latency_reduction_pct"], c["accuracy_loss_pp"]
    return [
        {"name": "latency_reduction", "target": f">= {PAPER_LATENCY_REDUCTION_PCT:g} %", "measured": latency,
         "ci95": c["latency_reduction_ci95_pct"], "n": [c["n_standard"], c["n_bio"]],
         "status": HELD if latency >= PAPER_LATENCY_REDUCTION_PCT else NOT_HELD},
        {"name": "accuracy_loss", "target": f"<= {PAPER_ACCURACY_LOSS_PP:g} pp", "measured": loss,
         "ci95": c["accuracy_loss_ci95_pp"], "n": [c["n_standard"], c["n_bio"]],
         "status": HELD if loss <= PAPER_ACCURACY_LOSS_PP else NOT_HELD},
    ]


def _stability_cv(run: Run, seconds: int) -> float | None:
    """Coefficient of variation of answered requests per second over the last whole seconds."""
    answered = [r["t_sent"] for r in _answered(run)]
    if not answered:
        return None
    start = min(answered)
    last_whole = int(max(answered) - start)  # the final, partial second is left out
    if last_whole < seconds:
        return None
    counts = np.bincount(np.floor(np.array(answered) - start).astype(int), minlength=last_whole + 1)
    tail = counts[last_whole - seconds : last_whole].astype(float)
    return float(tail.std() / tail.mean()) if tail.mean() > 0 else None


def validity(runs: list[Run], figures: list[dict], rules: ValidityRules = ValidityRules()) -> list[str]:
    """Why the report is INVALID (empty: VALID)."""
    reasons = []
    if not runs:
        return ["no runs"]
    for run, f in zip(runs, figures):
        if f["duration_s"] < rules.min_duration_s:
            reasons.append(f"{run.name}: ran {f['duration_s']:.1f} s, below the minimum {rules.min_duration_s:g} s")
        if f["answered"] < rules.min_requests:
            reasons.append(f"{run.name}: {f['answered']} answered requests, below the minimum {rules.min_requests}")
        if f["n"] and f["late"] / f["n"] > rules.max_late_fraction:
            reasons.append(f"{run.name}: {f['late']} of {f['n']} open-loop sends left late "
                           f"({100 * f['late'] / f['n']:.1f} % > {100 * rules.max_late_fraction:g} %)")
        if f["failed"]:
            reasons.append(f"{run.name}: {f['failed']} requests failed")
        cv = _stability_cv(run, rules.stability_windows)
        if cv is None:
            reasons.append(f"{run.name}: too short to judge the stability of its last "
                           f"{rules.stability_windows} seconds")
        elif cv > rules.max_stability_cv:
            reasons.append(f"{run.name}: throughput of the last {rules.stability_windows} s varies by "
                           f"{100 * cv:.0f} % (max {100 * rules.max_stability_cv:g} %): not stable")
    return reasons


def regressions(summary: dict, baseline: dict, tolerances: Tolerances = Tolerances()) -> list[str]:
    """Figures that got worse than ``baseline`` (a previous summary.json) beyond the tolerances."""
    found = []
    now, then = summary.get("comparison") or {}, baseline.get("comparison") or {}
    checks = [("latency_reduction_pct", tolerances.latency_reduction_pp, -1),
              ("energy_reduction_pct", tolerances.energy_reduction_pp, -1),
              ("accuracy_loss_pp", tolerances.accuracy_loss_pp, +1)]
    for key, tolerance, worse_sign in checks:
        if now.get(key) is None or then.get(key) is None:
            continue
        change = now[key] - then[key]
        if change * worse_sign > tolerance:
            found.append(f"{key} regressed: {then[key]:.2f} -> {now[key]:.2f} (tolerance {tolerance:g})")
    return found


def build_summary(runs: list[Run], baseline: dict | None = None, rules: ValidityRules = ValidityRules(),
                  tolerances: Tolerances = Tolerances()) -> dict:
    figures = [run_figures(r) for r in runs]
    comparison = compare(runs)
    reasons = validity(runs, figures, rules)
    summary = {
        "valid": not reasons,
        "invalid_reasons": reasons,
        "claims": claims(comparison),
        "comparison": comparison,
        "runs": {f["name"]: f for f in figures},
        "validity_rules": vars(rules),
    }
    if baseline is not None:
        summary["regressions"] = regressions(summary, baseline, tolerances)
    return summary
