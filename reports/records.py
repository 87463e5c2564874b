"""Reading request records (``requests.jsonl``, written by :mod:`loadtests.records`) and their
per-phase figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reports.checks import check_record, json_lines
from reports.stats import latency_summary

ANSWERED, REJECTED, FAILED, CUT_OFF = "answered", "rejected", "failed", "cut_off"


def read_records(path: Path) -> list[dict]:
    """All complete records of a requests.jsonl, each checked (RecordsError names the line and the
    field); a line cut short by a crash is skipped."""
    return json_lines(path, check_record)


def outcome(record: dict) -> str:
    """The record's outcome; records written before outcomes existed are read by status."""
    if "outcome" in record:
        return record["outcome"]
    status = record.get("status")
    return ANSWERED if status == 200 else REJECTED if status == 503 else FAILED


def phase_summary(records: list[dict]) -> list[dict]:
    """Per load phase, in order of first appearance, then ``all``: counts, throughput, latency
    percentiles over answered requests, admission rate, and accuracy over answered and rejected
    requests (a rejection is scored as wrong)."""
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
    """n (requests sent) and its outcomes, late count, duration and throughput (answered per
    second), latency over all answered samples, admission rate over answered requests, accuracy
    over answered *and* rejected requests (a user who got no answer got no right answer)."""
    by = {k: [r for r in records if outcome(r) == k] for k in (ANSWERED, REJECTED, FAILED, CUT_OFF)}
    answered = by[ANSWERED]
    sent = [r["t_intended"] if r.get("t_intended") is not None else r.get("t_sent") for r in records]
    sent = [t for t in sent if t is not None]
    duration_s = (max(sent) - min(sent)) if len(sent) > 1 else 0.0
    latency = latency_summary(np.array([r["latency_ms"] for r in answered]))
    scored = answered + by[REJECTED]
    reasons: dict[str, int] = {}
    for r in by[FAILED]:
        reason = str(r.get("reason") or f"HTTP {r.get('status')}")[:160]
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "n": len(records),
        "answered": len(answered),
        "rejected": len(by[REJECTED]),
        "failed": len(by[FAILED]),
        "cut_off": len(by[CUT_OFF]),
        "failure_reasons": reasons,
        "late": sum(bool(r.get("late")) for r in records),
        "duration_s": duration_s,
        "throughput_rps": len(answered) / duration_s if duration_s > 0 else None,
        "mean_latency_ms": latency["mean_ms"],
        "p50_ms": latency["p50_ms"],
        "p95_ms": latency["p95_ms"],
        "p99_ms": latency["p99_ms"],
        "admission_rate": (sum(bool(r["admitted"]) for r in answered) / len(answered)) if answered else None,
        "accuracy": (sum(bool(r["correct"]) for r in answered) / len(scored)) if scored else None,
    }
