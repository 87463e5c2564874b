"""Recorded runs on disk: a run directory holds ``requests.jsonl`` and ``run.json`` (and, when
profilers ran, ``windows.jsonl`` and ``timeline.jsonl``), as written by the Locust scenarios."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from reports.checks import check_metadata, check_sample, check_window, json_lines
from reports.records import read_records
from targets.errors import GreenMLOpsError


@dataclass
class Run:
    name: str
    path: Path
    metadata: dict
    records: list[dict]
    windows: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)

    @property
    def scenario(self) -> str:
        return self.metadata.get("scenario", self.name)


def load_run(path: Path) -> Run:
    try:
        metadata = json.loads((path / "run.json").read_text()) if (path / "run.json").exists() else {}
    except json.JSONDecodeError as exc:
        raise GreenMLOpsError(f"{path / 'run.json'} is not valid JSON: {exc}") from exc
    return Run(path.name, path, check_metadata(metadata, str(path / "run.json")), read_records(path / "requests.jsonl"),
               json_lines(path / "windows.jsonl", check_window), json_lines(path / "timeline.jsonl", check_sample))


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
