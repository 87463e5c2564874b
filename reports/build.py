"""A report end to end: read the runs, judge them, write the files."""
from __future__ import annotations

import json
from pathlib import Path

from reports.render import make_plots, write_report
from reports.runs import find_runs, load_ablation, load_offered_load
from reports.verdict import ValidityRules, build_summary
from targets.errors import GreenMLOpsError


def build_report(results: Path, out: Path, baseline_path: Path | None = None,
                 min_duration_s: float = 10.0, min_requests: int = 500) -> dict:
    """Read the runs under ``results``, write the report into ``out``; returns summary.json's content."""
    baseline = None
    if baseline_path is not None:
        try:
            baseline = json.loads(baseline_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GreenMLOpsError(f"cannot read baseline {baseline_path}: {exc}") from exc
    runs = find_runs(results)
    summary = build_summary(runs, baseline, ValidityRules(min_duration_s=min_duration_s, min_requests=min_requests),
                            ablation=load_ablation(results))
    offered = load_offered_load(results)
    if offered is not None:
        summary["offered_load"] = offered
    try:
        write_report(out, summary, make_plots(runs, summary))
    except OSError as exc:
        raise GreenMLOpsError(f"cannot write the report into {out}: {exc}") from exc
    return summary


def gate_failures(summary: dict) -> list[str]:
    """Why ``--gate`` fails: invalid, a load-test claim not held (or not measurable; an energy
    claim that only an estimate could decide is not gated), a regression."""
    failures = [] if summary["valid"] else ["report INVALID"]
    failures += [f"claim {c['name']} {c['status']}" for c in summary["claims"]
                 if c["status"] != "held" and c.get("gated", True)]
    return failures + summary.get("regressions", [])
