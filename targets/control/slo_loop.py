"""A latency SLO loop: AIMD on the exit threshold inside the certified range, then explicit shedding.

Why AIMD rather than PI: the measured signal, a p95 over a sliding window of recent requests, is
noisy, lags by the window and jumps when load steps; AIMD needs no plant model and no gains tuned
per deployment, reacts fast to a violation and recovers slowly, and cannot wind up (the state is
clamped every step). Clipper adapts its batch size the same way, for the same reasons.

The state is the skip threshold λ (a row leaves at an exit when its uncertainty u < λ) and a shed
probability s. λ lives in [floor, ceiling], the ceiling being the loosest threshold the accuracy
budget certified, so the loop can never spend more accuracy than promised:

* p95 above the SLO, λ below the ceiling: the headroom (ceiling − λ) is cut multiplicatively
  (λ moves `backoff` of the way to the ceiling): skip more, at once.
* p95 above the SLO at the ceiling: nothing more may be skipped, so load is shed explicitly:
  s grows multiplicatively (from `shed_step`, capped at `shed_max`), but only while shedding can
  help: when the recent p95 of *service* time alone (the model's work, no queueing) is above the
  SLO, fewer requests cannot make each one faster, so s shrinks instead and the period is counted
  as ``unreachable`` (the SLO is out of reach at this service time, whatever the load).
* p95 at most `(1 − margin)` × SLO: first s shrinks additively by `shed_step`; once nothing is shed,
  λ tightens additively by `step` towards the floor (buy accuracy back).
* In between (within the margin): hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from targets.errors import ConfigError


@dataclass
class SloLoop:
    """AIMD controller of the skip threshold and the shed probability; ``update`` once per period."""

    slo_p95_ms: float
    ceiling: float
    floor: float = 0.0
    step: float = 0.01
    backoff: float = 0.5
    margin: float = 0.2
    shed_step: float = 0.05
    shed_max: float = 0.95
    threshold: float = field(default=-1.0)
    shed_probability: float = 0.0
    last_p95_ms: float | None = None
    last_service_p95_ms: float | None = None
    violations: int = 0
    unreachable: int = 0  # violated periods at the ceiling where the service time alone broke the SLO
    updates: int = 0

    def __post_init__(self) -> None:
        if not self.slo_p95_ms > 0:
            raise ConfigError(f"--slo-p95-ms must be > 0, got {self.slo_p95_ms:g}")
        if not self.floor <= self.ceiling:
            raise ConfigError(f"SLO loop: floor {self.floor:g} above ceiling {self.ceiling:g}")
        if not (0 < self.backoff <= 1 and 0 < self.step and 0 <= self.margin < 1 and 0 < self.shed_step <= self.shed_max <= 1):
            raise ConfigError("SLO loop: step > 0, 0 < backoff ≤ 1, 0 ≤ margin < 1, 0 < shed_step ≤ shed_max ≤ 1")
        if self.threshold < self.floor:
            self.threshold = self.floor

    def update(self, p95_ms: float | None, service_p95_ms: float | None = None) -> None:
        """One control period: move λ and s from the recent p95 of latency (arrival to answer) and,
        when known, of service time (the model's work alone); None p95: no traffic, hold."""
        if p95_ms is None:
            return
        self.updates += 1
        self.last_p95_ms = p95_ms
        self.last_service_p95_ms = service_p95_ms
        if p95_ms > self.slo_p95_ms:
            self.violations += 1
            if self.threshold < self.ceiling - 1e-12:
                self.threshold += self.backoff * (self.ceiling - self.threshold)
                if self.ceiling - self.threshold < self.step / 2:
                    self.threshold = self.ceiling
            elif service_p95_ms is not None and service_p95_ms > self.slo_p95_ms:
                self.threshold = self.ceiling
                self.unreachable += 1
                self.shed_probability = max(0.0, self.shed_probability - self.shed_step)
            else:
                self.threshold = self.ceiling
                self.shed_probability = min(self.shed_max, max(self.shed_step, 2 * self.shed_probability))
        elif p95_ms <= (1 - self.margin) * self.slo_p95_ms:
            if self.shed_probability > 0:
                self.shed_probability = max(0.0, self.shed_probability - self.shed_step)
            else:
                self.threshold = max(self.floor, self.threshold - self.step)

    @property
    def at_ceiling(self) -> bool:
        return self.threshold >= self.ceiling - 1e-12

    def state(self) -> dict:
        return {"slo_p95_ms": self.slo_p95_ms, "p95_ms": self.last_p95_ms,
                "service_p95_ms": self.last_service_p95_ms, "threshold": self.threshold,
                "ceiling": self.ceiling, "floor": self.floor, "shed_probability": self.shed_probability,
                "violations": self.violations, "unreachable": self.unreachable, "updates": self.updates}
