"""Open-loop schedules: seeded, shaped, balanced over rows, and stored with a digest."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from loadtests.schedule import ScheduleError, load_schedule, make_schedule
from loadtests.shapes import Shape, ShapeParams


def spike(run_time_s: float = 15.0) -> Shape:
    return Shape("spike", ShapeParams(base_users=4, peak_users=8, phase_s=5.0, run_time_s=run_time_s))


def test_same_seed_same_schedule_other_seed_other_schedule():
    a, b = make_schedule(50, spike(), 899, seed=0), make_schedule(50, spike(), 899, seed=0)
    assert a.digest == b.digest and a.offsets_s == b.offsets_s and a.rows == b.rows
    assert make_schedule(50, spike(), 899, seed=1).digest != a.digest


def test_the_rate_follows_the_shape():
    schedule = make_schedule(200, spike(), 899, seed=3)
    offsets = np.array(schedule.offsets_s)
    base, burst = np.sum(offsets < 5), np.sum((offsets >= 5) & (offsets < 10))
    assert base == pytest.approx(1000, rel=0.1) and burst == pytest.approx(4000, rel=0.1)
    assert np.all(np.diff(offsets) >= 0) and offsets.max() < 15


def test_rows_are_shuffled_passes_over_the_evaluation_set():
    schedule = make_schedule(100, Shape("steady", ShapeParams(run_time_s=20)), 50, seed=0)
    counts = Counter(schedule.rows)
    assert set(counts) == set(range(50)) and max(counts.values()) - min(counts.values()) <= 1


def test_saved_schedule_round_trips_and_refuses_an_altered_one(tmp_path):
    schedule = make_schedule(30, spike(), 20, seed=7)
    path = schedule.save(tmp_path / "schedule.json")
    assert load_schedule(path, 20).digest == schedule.digest
    with pytest.raises(ScheduleError, match="evaluation set has 10"):
        load_schedule(path, 10)
    document = json.loads(path.read_text())
    document["rows"][0] = (document["rows"][0] + 1) % 20
    path.write_text(json.dumps(document))
    with pytest.raises(ScheduleError, match="altered"):
        load_schedule(path)


@pytest.mark.parametrize("rate", [0, -5])
def test_bad_rate_is_an_error(rate):
    with pytest.raises(ScheduleError, match="must be > 0"):
        make_schedule(rate, spike(), 10)
