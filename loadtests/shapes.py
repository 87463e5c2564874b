"""Congestion patterns as pure functions of elapsed time: how many users (or how much of the
open-loop arrival rate) at time t, which named phase t falls in, and when the pattern ends.

Locust's ``LoadTestShape`` in :mod:`loadtests.scenario` and the request records both use these,
so every record's phase agrees with the load that was applied when it was sent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("steady", "ramp", "spike", "wave", "step")


def _users(value: float) -> int:
    """Round half up (Python's round() goes to even), never below one user."""
    return max(1, int(value + 0.5))


@dataclass(frozen=True)
class ShapeParams:
    """``base_users`` is the steady load; ``peak_users`` the top of ramp, wave and step;
    ``spike_multiple`` the sudden factor of spike; ``phase_s`` the length of one phase (a wave's
    half period, a step's length); ``run_time_s`` caps the pattern (None: its natural length)."""

    base_users: int = 10
    peak_users: int = 20
    spike_multiple: float = 4.0
    phase_s: float = 10.0
    steps: int = 3
    run_time_s: float | None = None

    def __post_init__(self):
        if self.base_users < 1 or self.peak_users < 1:
            raise ValueError("base and peak users must be >= 1")
        if self.phase_s <= 0 or self.spike_multiple <= 0 or self.steps < 1:
            raise ValueError("phase length, spike multiple and steps must be positive")
        if self.run_time_s is not None and self.run_time_s <= 0:
            raise ValueError("run time must be > 0")


class Shape:
    """One congestion pattern; ``users_at(t)`` for t in seconds since the test started."""

    def __init__(self, name: str, params: ShapeParams):
        if name not in SHAPES:
            raise ValueError(f"unknown shape '{name}'; known: {', '.join(SHAPES)}")
        self.name, self.p = name, params

    @property
    def natural_end_s(self) -> float:
        p = self.p
        return {"steady": 6 * p.phase_s, "ramp": 2 * p.phase_s, "spike": 3 * p.phase_s,
                "wave": 4 * p.phase_s, "step": p.steps * p.phase_s}[self.name]

    @property
    def end_s(self) -> float:
        return self.p.run_time_s if self.p.run_time_s is not None else self.natural_end_s

    @property
    def peak_factor(self) -> float:
        """The largest :meth:`load_factor` over the pattern (2,001 evenly spaced instants): the
        open-loop peak rate over the base rate (4 for the default spike)."""
        return max(self.load_factor(float(t)) for t in np.linspace(0.0, float(self.end_s), 2001))

    def users_at(self, t: float) -> int:
        p = self.p
        if self.name == "steady":
            return p.base_users
        if self.name == "ramp":
            return _users(1 + (p.peak_users - 1) * min(t / p.phase_s, 1.0))
        if self.name == "spike":
            in_spike = p.phase_s <= t < 2 * p.phase_s
            return _users(p.base_users * (p.spike_multiple if in_spike else 1.0))
        if self.name == "wave":
            swing = (1 - math.cos(math.pi * t / p.phase_s)) / 2  # 0 at t=0, 1 at t=phase_s
            return _users(p.base_users + (p.peak_users - p.base_users) * swing)
        step = min(int(t // p.phase_s), p.steps - 1)
        return _users(p.base_users + (p.peak_users - p.base_users) * step / max(p.steps - 1, 1))

    def load_factor(self, t: float) -> float:
        """Load at t relative to the base load: scales the open-loop arrival rate."""
        return self.users_at(t) / self.p.base_users

    def phase_at(self, t: float) -> str:
        p = self.p
        if self.name == "steady":
            return "steady"
        if self.name == "ramp":
            return "ramp" if t < p.phase_s else "peak"
        if self.name == "spike":
            return "base" if t < p.phase_s else "spike" if t < 2 * p.phase_s else "recovery"
        if self.name == "wave":
            return "rising" if int(t // p.phase_s) % 2 == 0 else "falling"
        return f"step-{min(int(t // p.phase_s), p.steps - 1) + 1}"


def spawn_rate(users: int, given: float | None) -> float:
    """Users started per second when a shape changes the user count: ``-r`` when the user gave
    it, else all at once (ten times the users per second), so a spike is a spike."""
    return given if given else max(users, 1) * 10
