"""Open-loop arrival schedules: seeded Poisson arrival times *and* evaluation rows, generated once
and replayed identically against standard and bio, so both runs see the same offered load.

A schedule is a pure function of (seed, rate, shape and its parameters, number of evaluation
rows): the arrival rate at time t is ``rate_rps × shape.load_factor(t)`` (a non-homogeneous
Poisson process, drawn by thinning) and the rows are shuffled passes over the evaluation set, so
every row is sent about equally often. ``schedule.json`` stores it with its digest; the reports
compare runs only when their digests match.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loadtests.shapes import Shape, ShapeParams

SCHEDULE_FILE = "schedule.json"
MAX_ARRIVALS = 5_000_000  # a bound on memory: rate × duration beyond this is a mistake


class ScheduleError(ValueError):
    """A schedule that cannot be made or read; the message says why."""


@dataclass(frozen=True)
class Schedule:
    """Arrival ``offsets_s`` (seconds after the generator starts, increasing) and the evaluation
    ``rows`` they carry, with everything they were drawn from."""

    seed: int
    rate_rps: float
    shape: str
    shape_params: dict
    duration_s: float
    n_rows: int
    offsets_s: list[float] = field(repr=False)
    rows: list[int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.offsets_s)

    @property
    def digest(self) -> str:
        """SHA-256 of the arrivals and rows (12 hex digits): equal digests, equal offered load."""
        payload = json.dumps([self.offsets_s, self.rows], separators=(",", ":")).encode()
        return hashlib.sha256(payload).hexdigest()[:12]

    @property
    def requested_rps(self) -> float:
        return len(self) / self.duration_s

    def describe(self) -> dict:
        """Everything but the arrivals: what run.json and the report show."""
        return {"seed": self.seed, "rate_rps": self.rate_rps, "shape": self.shape,
                "shape_params": self.shape_params, "duration_s": self.duration_s, "n_rows": self.n_rows,
                "n_scheduled": len(self), "requested_rps": self.requested_rps, "digest": self.digest}

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schedule_document(self), separators=(",", ":")) + "\n")
        return path


def make_schedule(rate_rps: float, shape: Shape, n_rows: int, seed: int = 0) -> Schedule:
    """Poisson arrivals at ``rate_rps`` scaled by ``shape`` over ``shape.end_s`` seconds, each
    carrying a row of shuffled passes over ``range(n_rows)``."""
    if rate_rps <= 0:
        raise ScheduleError(f"arrival rate must be > 0 requests/s, got {rate_rps:g}")
    if n_rows < 1:
        raise ScheduleError("the evaluation set is empty")
    duration_s = float(shape.end_s)
    peak = shape.peak_factor
    expected = rate_rps * peak * duration_s
    if expected > MAX_ARRIVALS:
        raise ScheduleError(f"{expected:.0f} arrivals is more than {MAX_ARRIVALS}: lower the rate or the duration")
    rng = np.random.default_rng(seed)
    # Thinning: candidates at the peak rate, each kept with probability factor(t) / peak.
    gaps = rng.exponential(1.0 / (rate_rps * peak), size=int(expected + 10 * np.sqrt(expected) + 100))
    candidates = np.cumsum(gaps)
    candidates = candidates[candidates < duration_s]
    keep = rng.random(candidates.size) * peak <= np.array([shape.load_factor(float(t)) for t in candidates])
    offsets = candidates[keep]
    passes = -(-offsets.size // n_rows) if offsets.size else 0
    rows = np.concatenate([rng.permutation(n_rows) for _ in range(passes)])[: offsets.size] if passes else []
    return Schedule(seed, float(rate_rps), shape.name, asdict(shape.p), duration_s, n_rows,
                    [round(float(t), 6) for t in offsets], [int(r) for r in rows])


def load_schedule(path: Path, n_rows: int | None = None) -> Schedule:
    """Read a ``schedule.json``; checks its digest and, given ``n_rows``, that its rows exist."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ScheduleError(f"cannot read schedule {path}: {exc}") from exc
    return schedule_from_document(document, n_rows, str(path))


def schedule_document(schedule: Schedule) -> dict:
    """The schedule as JSON-ready data with its digest (what ``schedule.json`` holds)."""
    return {**asdict(schedule), "digest": schedule.digest}


def schedule_from_document(document: dict, n_rows: int | None = None, path: str = "schedule") -> Schedule:
    """A schedule from :func:`schedule_document`'s data, checked as :func:`load_schedule` checks a file."""
    try:
        document = dict(document)
        digest = document.pop("digest", None)
        schedule = Schedule(**document)
    except (ValueError, TypeError) as exc:
        raise ScheduleError(f"cannot read schedule {path}: {exc}") from exc
    if digest is not None and digest != schedule.digest:
        raise ScheduleError(f"schedule {path} was altered (digest {schedule.digest}, recorded {digest})")
    if len(schedule.rows) != len(schedule.offsets_s) or any(b < a for a, b in zip(schedule.offsets_s,
                                                                                   schedule.offsets_s[1:])):
        raise ScheduleError(f"schedule {path}: offsets must increase and match the rows one to one")
    if n_rows is not None and schedule.rows and (max(schedule.rows) >= n_rows or min(schedule.rows) < 0):
        raise ScheduleError(f"schedule {path} sends rows up to {max(schedule.rows)}, "
                            f"but this model's evaluation set has {n_rows}")
    return schedule


def shape_of(name: str, params: dict) -> Shape:
    return Shape(name, ShapeParams(**params))
