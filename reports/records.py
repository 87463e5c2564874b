"""Reading request records (``requests.jsonl``, written by :mod:`loadtests.records`) and their
per-phase figures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reports.stats import latency_summary
from targets.errors import RecordsError

_NUMBERS = ("t_sent", "latency_ms")  # required
_OPTIONAL_NUMBERS = ("t_intended", "service_ms", "tau", "u")  # may be null


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def check_record(record, where: str) -> dict:
    """``record`` if it is one request's record, else RecordsError naming ``where`` and the field."""
    if not isinstance(record, dict):
        raise RecordsError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    status = record.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        raise RecordsError(f"{where}: 'status' must be an HTTP status code, got {status!r:.40}")
    for name in _NUMBERS:
        if not _is_number(record.get(name)):
            raise RecordsError(f"{where}: '{name}' must be a finite number, got {record.get(name)!r:.40}")
    for name in _OPTIONAL_NUMBERS:
        if record.get(name) is not None and not _is_number(record[name]):
            raise RecordsError(f"{where}: '{name}' must be a finite number or null, got {record[name]!r:.40}")
    if not isinstance(record.get("phase", ""), str):
        raise RecordsError(f"{where}: 'phase' must be a string, got {record['phase']!r:.40}")
    return record


def read_records(path: Path) -> list[dict]:
    """All records of a requests.jsonl, each checked (RecordsError names the line and field).
    Only the last line may be cut short (a crash mid-write): it is skipped."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"cannot read {path}: {exc}") from exc
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                continue
            raise RecordsError(f"{path}:{number}: not a JSON record: {exc}") from None
        records.append(check_record(record, f"{path}:{number}"))
    return records


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
