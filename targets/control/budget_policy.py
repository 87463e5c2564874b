"""The `budget` policy: the paper's J ≤ τ(t) decision, moving along a certified path.

The paper's controller (policy `paper`) lets congestion and energy push J above τ without limit:
under load it skips nearly everything and spends accuracy nobody agreed to. The `budget` policy
keeps the same signals but lets them choose only among vectors the certificate covers:

* The certified path (see :mod:`targets.control.certified_path`) is an ordered list of per-exit threshold
  vectors, strict to loose, every point up to the *ceiling* certified at once: with probability
  ≥ 1 − δ the accuracy loss against the full model of each is at most the budget.
* The controller sets a *level* on that path, 0 (strict) … 1 (the ceiling), from the paper's rule
  in threshold form: λ_J = 1 − (τ(t) − β·ê − γ·ĉ)/α, clipped to [0, 1]. Congestion and energy
  raise it, the decay of τ(t) from τ0 to τ∞ opens it after warm-up; τ∞ sets where it rests when
  ĉ = ê = 0 (the *spend* mode, :data:`SPEND_MODES`). The level picks a point (rounding down, so
  never past the ceiling) once per request, and every exit of that request uses that point's
  threshold: the request runs a vector of the path, never a mix of two.
* With a latency SLO, an AIMD loop (:mod:`targets.control.slo_loop`) holds its own level; the level used
  is the larger of the two, so the loop may loosen towards the ceiling and no further, and it
  tightens again when p95 is well under the SLO. When p95 still exceeds the SLO at the ceiling,
  load is shed explicitly with the overload action instead of silently spending more accuracy:
  `reject` sheds (503 + Retry-After before any model work, counted, and counted against the budget
  by the report); `queue` sheds nothing and lets the gateway's bounded queue (`--max-queue`) hold
  the excess, answering 503 past its bound.
"""
from __future__ import annotations

import math
import random
import threading

from targets.control.certified_path import PathCalibration
from targets.control.controller_config import OVERLOAD_ACTIONS, SPEND_MODES
from targets.errors import ConfigError
from targets.control.slo_loop import SloLoop

ADAPTIVE_IDLE_LEVEL = 0.5
"""``--spend adaptive``: the level the controller rests at with spare capacity and cheap energy
(ĉ = ê = 0): the middle of the certified path; congestion (γ·ĉ) and energy (β·ê) push it to the
ceiling. ``--spend ceiling`` rests at 1, the ceiling: the most saving the budget allows."""


DEFAULT_SERVE_SPEND = "adaptive"
"""`serve`'s default: a server spends accuracy when it buys something (congestion, energy, an SLO)
and rests mid-path otherwise; `validate` defaults to the config's ``ceiling``, since its job is to
measure what the budget can buy."""


def idle_level(spend: str) -> float:
    """Where ``spend`` rests on the path when ĉ = ê = 0 (1: the ceiling)."""
    if spend not in SPEND_MODES:
        raise ConfigError(f"--spend must be one of {', '.join(SPEND_MODES)}, got '{spend}'")
    return 1.0 if spend == "ceiling" else ADAPTIVE_IDLE_LEVEL


class BudgetPolicy:
    """The certified path, the level the controller sits at on it, the SLO loop and the shed decision."""

    def __init__(self, calibration: PathCalibration, slo_p95_ms: float | None = None,
                 overload_action: str = "reject", seed: int = 0, spend: str = "ceiling"):
        if not calibration.certified:
            raise ConfigError(
                f"the validation split ({calibration.n_validation} rows, {calibration.n_test} of them testing the "
                f"{calibration.kind} path) cannot certify an accuracy budget of {100 * calibration.budget:g} pp at "
                f"risk {calibration.delta:g}: the smallest its test rows can certify is "
                f"{100 * calibration.smallest_certifiable:.2f} pp (raise --accuracy-budget-pp or --risk, or "
                f"use a model with a larger validation split)")
        if overload_action not in OVERLOAD_ACTIONS:
            raise ConfigError(f"--overload-action must be one of {', '.join(OVERLOAD_ACTIONS)}, got '{overload_action}'")
        self.spend = spend
        idle_level(spend)
        self.calibration = calibration
        self.ceiling = calibration.ceiling_thresholds
        self.ceiling_index = calibration.ceiling
        self.overload_action = overload_action
        self.loop = SloLoop(slo_p95_ms=slo_p95_ms, ceiling=1.0) if slo_p95_ms else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.shed = 0
        self.clamped = 0
        self.last_level = 0.0
        self.last_index = 0
        self.void_reason: str | None = None  # set by the live audit (targets.control.audit): the certificate no longer applies
        self.void_at_s: float | None = None
        self.void_after_audited: int | None = None

    def void(self, reason: str, at_s: float, audited: int) -> None:
        """The live audit found the inputs unlike the calibration data: from now on every request
        runs the strict end of the path (the full model), and the state says why and when."""
        with self._lock:
            if self.void_reason is None:
                self.void_reason, self.void_at_s, self.void_after_audited = reason, at_s, audited

    @property
    def certificate_state(self) -> str:
        return "void" if self.void_reason is not None else "held"

    def point(self, lambda_j: float) -> tuple[int, tuple[float, ...]]:
        """``(index, per-exit thresholds)`` of the path point for the paper's λ_J, raised by the
        SLO loop's level, at most the ceiling; the strict end (the full model) once the certificate
        is void."""
        level = lambda_j if self.loop is None else max(lambda_j, self.loop.threshold)
        if self.void_reason is not None:
            level = 0.0
        if not math.isfinite(level):
            level = 1.0 if level > 0 else 0.0
        self.clamped += level > 1.0 + 1e-12
        index, thresholds = self.calibration.thresholds_at(level)
        self.last_level, self.last_index = min(max(level, 0.0), 1.0), index
        return index, thresholds

    def should_shed(self) -> bool:
        """Whether to shed this request before any work is done (only at the ceiling, SLO violated)."""
        if self.loop is None or self.overload_action != "reject" or self.loop.shed_probability <= 0:
            return False
        with self._lock:
            shed = self._rng.random() < self.loop.shed_probability
            self.shed += shed
        return shed

    def observe_p95(self, p95_ms: float | None, service_p95_ms: float | None = None) -> None:
        """One control period of the SLO loop (call whenever the recent p95 is refreshed); see
        :meth:`SloLoop.update` for the two figures."""
        if self.loop is not None:
            with self._lock:
                self.loop.update(p95_ms, service_p95_ms)

    def state(self) -> dict:
        return {"policy": "budget", "spend": self.spend, "ceiling": list(self.ceiling),
                "ceiling_index": self.ceiling_index, "path_points": self.ceiling_index + 1,
                "level": self.last_level, "path_index": self.last_index,
                "thresholds": list(self.calibration.points[self.last_index]),
                "overload_action": self.overload_action, "shed": self.shed, "clamped": self.clamped,
                "certificate": self.calibration.as_dict(), "certificate_state": self.certificate_state,
                "void_reason": self.void_reason, "void_at_s": self.void_at_s,
                "slo": self.loop.state() if self.loop else None}
