"""Build the controller a config asks for: the paper's, or the budget policy with its certificate."""
from __future__ import annotations

import time
from typing import Callable

from targets.controller import BioController, Decision
from targets.controller_config import ControllerConfig
from targets.model_dir import ModelSpec


def make_controller(config: ControllerConfig, spec: ModelSpec, backend=None,
                    clock: Callable[[], float] = time.monotonic,
                    on_decision: Callable[[Decision], None] | None = None) -> BioController:
    """A BioController for ``config``; policy 'budget' first certifies its ceiling on the model's
    validation split (ConfigError, with the smallest certifiable budget, when it cannot)."""
    budget = None
    if config.policy == "budget":
        from targets.budget_policy import BudgetPolicy
        from targets.calibration import budget_calibration_for

        calibration = budget_calibration_for(spec, config.uncertainty, config.accuracy_budget_pp, config.risk,
                                             backend)
        budget = BudgetPolicy(calibration, config.slo_p95_ms, config.overload_action)
    return BioController(config, clock=clock, on_decision=on_decision, budget=budget)
