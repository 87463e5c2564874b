"""Congestion patterns: users and phase at each time."""
import pytest

from loadtests.shapes import Shape, ShapeParams

P = ShapeParams(base_users=4, peak_users=12, spike_multiple=3, phase_s=10, steps=3)


def test_steady():
    shape = Shape("steady", P)
    assert {shape.users_at(t) for t in range(0, 60, 5)} == {4}
    assert shape.phase_at(33) == "steady" and shape.end_s == 60


def test_ramp_rises_to_peak_then_holds():
    shape = Shape("ramp", P)
    users = [shape.users_at(t) for t in (0, 5, 10, 15)]
    assert users == [1, 7, 12, 12]
    assert [shape.phase_at(t) for t in (0, 9.9, 10, 19)] == ["ramp", "ramp", "peak", "peak"]


def test_spike_is_a_sudden_multiple():
    shape = Shape("spike", P)
    assert [shape.users_at(t) for t in (0, 9.99, 10, 19.99, 20, 29)] == [4, 4, 12, 12, 4, 4]
    assert [shape.phase_at(t) for t in (5, 15, 25)] == ["base", "spike", "recovery"]
    assert shape.load_factor(15) == pytest.approx(3.0)


def test_wave_swings_between_base_and_peak():
    shape = Shape("wave", P)
    assert shape.users_at(0) == 4 and shape.users_at(10) == 12 and shape.users_at(20) == 4
    assert 4 < shape.users_at(5) < 12
    assert [shape.phase_at(t) for t in (1, 11, 21, 31)] == ["rising", "falling", "rising", "falling"]


def test_step_climbs_in_steps():
    shape = Shape("step", P)
    assert [shape.users_at(t) for t in (0, 10, 20, 29, 40)] == [4, 8, 12, 12, 12]
    assert [shape.phase_at(t) for t in (0, 10, 20, 99)] == ["step-1", "step-2", "step-3", "step-3"]


def test_run_time_caps_the_pattern():
    assert Shape("spike", ShapeParams(run_time_s=7)).end_s == 7


@pytest.mark.parametrize("bad", [dict(base_users=0), dict(phase_s=0), dict(steps=0), dict(run_time_s=-1)])
def test_bad_parameters(bad):
    with pytest.raises(ValueError):
        ShapeParams(**bad)


def test_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape"):
        Shape("tsunami", P)


def test_spawn_rate_is_the_given_one_else_all_at_once():
    from loadtests.shapes import spawn_rate

    assert spawn_rate(8, 2.0) == 2.0  # -r honoured
    assert spawn_rate(8, None) == 80 and spawn_rate(0, None) == 10
