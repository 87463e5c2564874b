"""Reading request records (``requests.jsonl``, written by :mod:`loadtests.records`) and their
per-phase figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reports.checks import check_record, json_lines
from reports.stats import latency_summary


def read_records(path: Path) -> list[dict]:
    """All complete records of a requests.jsonl, each checked (RecordsError names the line and the
    field); a line cut short by a crash is skipped."""
    return json_lines(path, check_record)


def phase_summary(records: list[dict]) -> list[dict]:
    """Per load phase, in order of first appearance, then ``all``: n, throughput, latency
    percentiles over all samples, admission rate and accuracy over answered requests, rejected,
    failed and late counts."""
    phases: dict[str, list[dict]] = {}
    for record in records:
        phases.setdefault(record.get("phase", "?"), []).append(record)
    rows = [_figures(name, rs) for name, rs in phases.items()]
    if len(phases) > 1:
        rows.append(_figures("all", records))
    return rows


def _figures(name: str, records: list[dict]) -> dict:
    return {"phase": name, **request_figures(records)}


def request_figures(records: list[dict]) -> dict:
    """n, answered, rejected, failed and late counts, duration and throughput, latency over all
    answered samples, admission rate and accuracy over answered requests."""
    answered = [r for r in records if r["status"] == 200]
    sent = [r["t_sent"] for r in records]
    duration_s = (max(sent) - min(sent)) if len(sent) > 1 else 0.0
    latency = latency_summary(np.array([r["latency_ms"] for r in answered]))
    return {
        "n": len(records),
        "answered": len(answered),
        "rejected": sum(r["status"] == 503 for r in records),
        "failed": sum(r["status"] not in (200, 503) for r in records),
        "late": sum(bool(r.get("late")) for r in records),
        "duration_s": duration_s,
        "throughput_rps": len(answered) / duration_s if duration_s > 0 else None,
        "mean_latency_ms": latency["mean_ms"],
        "p50_ms": latency["p50_ms"],
        "p95_ms": latency["p95_ms"],
        "p99_ms": latency["p99_ms"],
        "admission_rate": (sum(bool(r["admitted"]) for r in answered) / len(answered)) if answered else None,
        "accuracy": (sum(bool(r["correct"]) for r in answered) / len(answered)) if answered else None,
    }
