"""Checks of recorded results as ``report`` reads them: one bad field is a RecordsError naming the
file, the line and the field (the CLI prints it as one line and exits 2), never a traceback later.

The checks ask only what the reports rely on, so records of older and newer writers both pass:
a request record is an object with an integer ``status`` (0: no HTTP status), an ``outcome`` among
the known ones if it has one, a time (``t_intended`` or ``t_sent``), a ``latency_ms`` for an
answered request, and numbers (or null) where numbers are expected.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from targets.errors import RecordsError

OUTCOMES = ("answered", "rejected", "failed", "cut_off")
_OPTIONAL_NUMBERS = ("t_intended", "t_sent", "latency_ms", "service_ms", "tau", "u", "offset_s")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _object(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise RecordsError(f"{where}: must be a JSON object, got {type(row).__name__}")
    return row


def _numbers(row: dict, names, where: str) -> None:
    for name in names:
        if row.get(name) is not None and not _is_number(row[name]):
            raise RecordsError(f"{where}: '{name}' must be a finite number or null, got {row[name]!r:.40}")


def check_record(record, where: str) -> dict:
    """``record`` if it is one request's record, else RecordsError naming ``where`` and the field."""
    record = _object(record, where)
    status = record.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        raise RecordsError(f"{where}: 'status' must be an HTTP status code (0: none), got {status!r:.40}")
    if "outcome" in record and record["outcome"] not in OUTCOMES:
        raise RecordsError(f"{where}: 'outcome' must be one of {', '.join(OUTCOMES)}, got {record['outcome']!r:.40}")
    _numbers(record, _OPTIONAL_NUMBERS, where)
    if record.get("t_intended") is None and record.get("t_sent") is None:
        raise RecordsError(f"{where}: needs a time: 't_intended' or 't_sent'")
    answered = record.get("outcome", "answered" if status == 200 else None) == "answered"
    if answered and record.get("latency_ms") is None:
        raise RecordsError(f"{where}: an answered request needs 'latency_ms'")
    if not isinstance(record.get("phase", ""), str):
        raise RecordsError(f"{where}: 'phase' must be a string, got {record['phase']!r:.40}")
    return record


def check_window(window, where: str) -> dict:
    """An energy window (windows.jsonl): joules, CO2 and seconds are numbers; a measured window
    says how long it lasted and where its figure came from."""
    window = _object(window, where)
    _numbers(window, ("energy_j", "co2_g", "duration_s"), where)
    if window.get("energy_j") is not None:
        if window.get("duration_s") is None:
            raise RecordsError(f"{where}: a window with 'energy_j' needs 'duration_s'")
        if not isinstance(window.get("energy_source"), str):
            raise RecordsError(f"{where}: a window with 'energy_j' needs 'energy_source' (a string)")
    return window


def check_sample(sample, where: str) -> dict:
    """A sampler sample (timeline.jsonl): its time and power readings are numbers (or null)."""
    sample = _object(sample, where)
    _numbers(sample, ("t_s", "gpu_power_w", "cpu_power_w"), where)
    return sample


def check_metadata(metadata, where: str) -> dict:
    """run.json: an object whose ``scenario``, when present, is a string."""
    metadata = _object(metadata, where)
    if "scenario" in metadata and not isinstance(metadata["scenario"], str):
        raise RecordsError(f"{where}: 'scenario' must be a string, got {metadata['scenario']!r:.40}")
    return metadata


def json_lines(path: Path, check) -> list[dict]:
    """The checked rows of a JSON-lines file ([] when it does not exist). A line cut short by a
    crash (one that starts an object but does not parse) is skipped; any other line that is not
    JSON is a RecordsError."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"cannot read {path}: {exc}") from exc
    rows = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.startswith("{"):
                continue  # cut short mid-write
            raise RecordsError(f"{path}:{number}: not a JSON record: {exc}") from None
        rows.append(check(row, f"{path}:{number}"))
    return rows
