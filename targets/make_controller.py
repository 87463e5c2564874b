"""Build the controller a config asks for: the paper's, or the budget policy with its certificate."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from targets.controller import BioController, Decision
from targets.controller_config import ControllerConfig
from targets.model_dir import ModelSpec


def make_controller(config: ControllerConfig, spec: ModelSpec, backend=None,
                    clock: Callable[[], float] = time.monotonic,
                    on_decision: Callable[[Decision], None] | None = None,
                    explicit_tau_inf: bool = False) -> BioController:
    """A BioController for ``config``; policy 'budget' first certifies its ceiling λ̂ on the model's
    validation split (ConfigError, with the smallest certifiable budget, when it cannot).

    Under the budget policy the steady threshold is the certified one, τ∞ = α·(1 − λ̂) at every
    exit (the budget the user agreed to is what the controller may spend), unless the user set
    τ∞ explicitly (``explicit_tau_inf``); ``controller.config`` is the config actually used."""
    budget = None
    if config.policy == "budget":
        from targets.budget_policy import BudgetPolicy
        from targets.calibration import budget_calibration_for

        calibration = budget_calibration_for(spec, config.uncertainty, config.accuracy_budget_pp, config.risk,
                                             backend)
        budget = BudgetPolicy(calibration, config.slo_p95_ms, config.overload_action)
        if not explicit_tau_inf:
            config = replace(config, tau_inf=config.alpha * (1.0 - budget.ceiling), exit_tau_inf=None)
    return BioController(config, clock=clock, on_decision=on_decision, budget=budget)
