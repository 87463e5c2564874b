"""Recorded runs on disk: a run directory holds ``requests.jsonl`` and ``run.json`` (and, when
profilers ran, ``windows.jsonl`` and ``timeline.jsonl``), as written by the Locust scenarios."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from reports.checks import check_metadata, check_sample, check_window, json_lines
from reports.records import read_records
from targets.errors import GreenMLOpsError

REFERENCE_FILE = "reference.json"  # written by the locustfiles (loadtests/reference.py)
ABLATION_FILE = "ablation.json"  # written by validate once the in-process ablation is done


@dataclass
class Run:
    name: str
    path: Path
    metadata: dict
    records: list[dict]
    windows: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    reference: dict | None = None  # reference.json: the full and exit answers per evaluation row

    @property
    def scenario(self) -> str:
        return self.metadata.get("scenario", self.name)


def load_run(path: Path) -> Run:
    try:
        metadata = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    except json.JSONDecodeError as exc:
        raise GreenMLOpsError(f"{path / 'run.json'} is not valid JSON: {exc}") from exc
    return Run(path.name, path, check_metadata(metadata, str(path / "run.json")), read_records(path / "requests.jsonl"),
               json_lines(path / "windows.jsonl", check_window), json_lines(path / "timeline.jsonl", check_sample),
               _reference(path))


def _reference(path: Path) -> dict | None:
    """The run's reference answers (``reference.json``), or None for a run recorded without."""
    file = path / REFERENCE_FILE
    if not file.exists():
        return None
    try:
        document = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise GreenMLOpsError(f"{file} is not valid JSON: {exc}") from exc
    keys = ("label", "full_predicted", "exit_predicted", "exit_u")
    if not isinstance(document, dict) or any(k not in document for k in keys):
        raise GreenMLOpsError(f"{file} lacks one of {', '.join(keys)}")
    return document


OFFERED_LOAD_FILE = "offered_load.json"  # written by validate before its first load run (loadtests.capacity)


def load_offered_load(results: Path) -> dict | None:
    """How validate chose the open-loop rate (``offered_load.json``) when it sized it to the
    machine; None when the file is absent or not a sizing record."""
    file = results / OFFERED_LOAD_FILE
    if not file.exists():
        return None
    try:
        document = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GreenMLOpsError(f"{file} is not valid JSON: {exc}") from exc
    return document if isinstance(document, dict) and "arrival_rate_rps" in document else None


def load_ablation(results: Path) -> dict | None:
    """The in-process ablation's figures (``ablation/ablation.json``, else ``validate.json``)
    when ``results`` is a validate directory; None otherwise."""
    for file in (results / "ablation" / ABLATION_FILE, results / "validate.json"):
        if file.exists():
            try:
                document = json.loads(file.read_text())
            except json.JSONDecodeError as exc:
                raise GreenMLOpsError(f"{file} is not valid JSON: {exc}") from exc
            if isinstance(document, dict) and "claims" in document and "standard" in document:
                return {k: v for k, v in document.items() if k != "load_test"}
    return None


def find_runs(results: Path) -> list[Run]:
    """``results`` itself when it is a run, else every run directory directly inside it."""
    if not results.is_dir():
        raise GreenMLOpsError(f"results directory not found: {results}")
    if (results / "requests.jsonl").exists():
        return [load_run(results)]
    runs = [load_run(p) for p in sorted(results.iterdir()) if (p / "requests.jsonl").exists()]
    if not runs:
        raise GreenMLOpsError(f"no recorded runs in {results} (no requests.jsonl in it or its sub-directories)")
    return runs
