"""The budget policy over time: p95 against the latency SLO, the shed rate, and the level on the
certified path (0 strict … 1 the certified ceiling, the budget line), per second of each bio run's schedule.

Reads only the runs' records and metadata (see :mod:`loadtests.records` for the SLO fields every
record carries when the SLO loop is on): never re-runs a model.
"""
from __future__ import annotations

import numpy as np

from reports.records import ANSWERED, outcome
from reports.runs import Run


def _budget_state(run: Run) -> dict:
    return ((run.metadata.get("controller_state_at_end") or {}).get("budget")) or {}


def shows_slo(run: Run) -> bool:
    """Whether ``run`` is a bio run with a budget policy (an SLO, or anything shed, to show)."""
    return run.scenario == "bio" and bool(_budget_state(run) or any(r.get("action") == "shed" for r in run.records))


def per_second(run: Run) -> dict:
    """Per second of the schedule (from its first intended send): the p95 of answered requests as
    the client measured them, the mean p95 the SLO loop acted on, the share of requests sent that
    second which were shed, the mean shed probability and the mean level on the certified path
    (``path_index`` over the ceiling's index, from the run's controller state; NaN without it)."""
    timed = [r for r in run.records if r.get("t_intended") is not None]
    if not timed:
        return {"second": np.array([], dtype=int)}
    start = min(r["t_intended"] for r in timed)
    second = np.floor(np.array([r["t_intended"] for r in timed]) - start).astype(int)
    xs = np.unique(second)

    def mean_of(field: str) -> list[float]:
        out = []
        for x in xs:
            values = [r[field] for r, s in zip(timed, second)  # numbers only: a multi-row request joins them
                      if s == x and isinstance(r.get(field), (int, float)) and not isinstance(r.get(field), bool)]
            out.append(float(np.mean(values)) if values else np.nan)
        return out

    p95 = []
    for x in xs:
        latency = [r["latency_ms"] for r, s in zip(timed, second) if s == x and outcome(r) == ANSWERED]
        p95.append(float(np.percentile(latency, 95)) if latency else np.nan)
    shed = [float(np.mean([r.get("action") == "shed" for r, s in zip(timed, second) if s == x])) for x in xs]
    ceiling_index = _budget_state(run).get("ceiling_index")
    levels = np.array(mean_of("path_index")) / ceiling_index if ceiling_index else np.full(len(xs), np.nan)
    return {"second": xs, "p95_ms": np.array(p95), "seen_p95_ms": np.array(mean_of("slo_seen_p95_ms")),
            "shed_rate": np.array(shed), "shed_probability": np.array(mean_of("shed_probability")),
            "level": levels}


def slo_over_time(runs: list[Run]) -> bytes | None:
    """Three panels over time for every bio run (None when no run used the budget policy)."""
    if not any(shows_slo(run) for run in runs):
        return None
    from reports.plots import _colour, _png, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    slo_lines = set()
    for i, run in enumerate(runs):
        if run.scenario != "bio":
            continue
        series = per_second(run)
        if not series["second"].size:
            continue
        colour, xs = _colour(run, i) if shows_slo(run) else f"C{i + 3}", series["second"]
        axes[0].plot(xs, series["p95_ms"], color=colour, label=f"{run.name} p95 (client)")
        if not np.all(np.isnan(series["seen_p95_ms"])):
            axes[0].plot(xs, series["seen_p95_ms"], color=colour, ls=":", label=f"{run.name} p95 the loop saw")
        axes[1].plot(xs, 100 * series["shed_rate"], color=colour, label=f"{run.name} shed")
        if not np.all(np.isnan(series["shed_probability"])):
            axes[1].plot(xs, 100 * series["shed_probability"], color=colour, ls=":",
                         label=f"{run.name} shed probability")
        if not np.all(np.isnan(series["level"])):
            axes[2].plot(xs, series["level"], color=colour, label=f"{run.name} level on the certified path")
        state = _budget_state(run)
        if (state.get("slo") or {}).get("slo_p95_ms"):
            slo_lines.add(float(state["slo"]["slo_p95_ms"]))
    for slo in sorted(slo_lines):
        axes[0].axhline(slo, color="crimson", ls="--", lw=1, label=f"SLO p95 {slo:g} ms")
    if any(_budget_state(run).get("ceiling_index") is not None for run in runs):
        axes[2].axhline(1.0, color="crimson", ls="--", lw=1, label="certified ceiling (the budget line)")
    for ax, label in zip(axes, ("latency p95 (ms)", "shed (% of requests sent)", "level on the path")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("seconds since the run started")
    fig.suptitle("Budget policy over time: p95 against the SLO, shedding, and the level on the certified path")
    return _png(fig)
