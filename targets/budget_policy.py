"""The `budget` policy: the paper's J ≤ τ(t) decision, held inside a certified accuracy budget.

The paper's controller (policy `paper`) lets congestion and energy push J above τ without limit:
under load it skips nearly everything and spends accuracy nobody agreed to. The `budget` policy
keeps the same formula but bounds what it may do:

* The certified ceiling λ̂ (see :mod:`targets.certify`) is the loosest exit threshold for which
  the accuracy loss against the full model is at most the budget with probability ≥ 1 − δ. A row
  may leave early only if its uncertainty u < λ̂, whatever J says.
* Below that ceiling, J decides as in the paper: a row leaves when J > τ(t), i.e. when
  u < λ_J = 1 − (τ(t) − β·ê − γ·ĉ)/α. Congestion and energy loosen λ_J, up to λ̂ and no further.
* With a latency SLO, an AIMD loop (:mod:`targets.slo_loop`) may loosen the threshold further,
  again only up to λ̂; when p95 still exceeds the SLO at λ̂, load is shed explicitly with the
  overload action instead of silently spending more accuracy: `reject` sheds (503 + Retry-After
  before any model work, counted, scored as wrong by the report); `queue` sheds nothing and lets
  the gateway's bounded queue (`--max-queue`) hold the excess, answering 503 past its bound.
"""
from __future__ import annotations

import math
import random
import threading

from targets.certify import CERTIFICATE_NAME, CERTIFICATE_VERSION, THRESHOLD_GRID, BudgetCalibration
from targets.controller_config import OVERLOAD_ACTIONS
from targets.errors import ConfigError
from targets.slo_loop import SloLoop

GRID_STEP = float(THRESHOLD_GRID[1] - THRESHOLD_GRID[0])


class BudgetPolicy:
    """Clamp of the exit threshold at the certified ceiling, the SLO loop, and the shed decision."""

    def __init__(self, calibration: BudgetCalibration, slo_p95_ms: float | None = None,
                 overload_action: str = "reject", seed: int = 0):
        if calibration.threshold is None:
            cert = calibration.certificate
            raise ConfigError(
                f"the validation split ({cert.n} rows) cannot certify an accuracy budget of "
                f"{100 * cert.budget:g} pp at risk {cert.delta:g}: the smallest it can certify is "
                f"{100 * cert.smallest_certifiable:.2f} pp (raise --accuracy-budget-pp or --risk, or "
                f"use a model with a larger validation split)")
        if overload_action not in OVERLOAD_ACTIONS:
            raise ConfigError(f"--overload-action must be one of {', '.join(OVERLOAD_ACTIONS)}, got '{overload_action}'")
        self.calibration = calibration
        self.ceiling = float(calibration.threshold)
        self.overload_action = overload_action
        self.loop = SloLoop(slo_p95_ms=slo_p95_ms, ceiling=self.ceiling) if slo_p95_ms else None
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.shed = 0
        self.clamped = 0

    def leave_threshold(self, lambda_j: float) -> float:
        """The threshold a row's uncertainty is compared with: λ_J, loosened by the SLO loop, ≤ λ̂."""
        loosest = lambda_j if self.loop is None else max(lambda_j, self.loop.threshold)
        if loosest >= self.ceiling:
            self.clamped += loosest > self.ceiling
            return self.ceiling
        # Down to the tested grid: fixed-sequence testing certified every grid point up to λ̂.
        return math.floor(loosest / GRID_STEP + 1e-9) * GRID_STEP if loosest > 0 else loosest

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
        return {"policy": "budget", "ceiling": self.ceiling, "overload_action": self.overload_action,
                "shed": self.shed, "clamped": self.clamped,
                "certificate": self.calibration.as_dict(),
                "certificate_rule": {"rule": CERTIFICATE_NAME, "version": CERTIFICATE_VERSION},
                "slo": self.loop.state() if self.loop else None}
