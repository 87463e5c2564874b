"""Build the controller a config asks for: the paper's, or the budget policy with its certificate."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from targets.control.controller import BioController, Decision
from targets.control.controller_config import ControllerConfig
from targets.errors import ConfigError
from targets.model.model_dir import ModelSpec


def make_controller(config: ControllerConfig, spec: ModelSpec, backend=None,
                    clock: Callable[[], float] = time.monotonic,
                    on_decision: Callable[[Decision], None] | None = None,
                    explicit_tau_inf: bool = False) -> BioController:
    """A BioController for ``config``; policy 'budget' first certifies its path on the model's
    validation split (ConfigError, with the smallest certifiable budget, when it cannot).

    Under the budget policy τ∞ sets where the controller rests on the certified path when ĉ = ê = 0:
    level 1 − τ∞/α, so τ∞ = α·(1 − level) with the level of ``config.spend`` (the ceiling, or
    its middle for ``adaptive``), unless the user set a scalar τ∞ explicitly (``explicit_tau_inf``),
    which then places that level. Thresholds per exit (``exit_tau_inf``) cannot be set under the budget
    policy: the certificate covers only the vectors on its path. ``controller.config`` is the config
    actually used."""
    budget = None
    if config.policy == "budget":
        from targets.control.budget_policy import BudgetPolicy, idle_level
        from targets.control.calibration import budget_calibration_for

        if explicit_tau_inf and config.exit_tau_inf is not None:
            raise ConfigError("exit_tau_inf cannot be set under the budget policy: the certificate covers only the "
                              "threshold vectors on its path (set a single tau_inf to place the controller on it, "
                              "or use --policy paper)")
        calibration = budget_calibration_for(spec, config.uncertainty, config.accuracy_budget_pp, config.risk,
                                             backend, loss=config.budget_loss, kind=config.budget_path)
        budget = BudgetPolicy(calibration, config.slo_p95_ms, config.overload_action, spend=config.spend)
        if not explicit_tau_inf:
            config = replace(config, tau_inf=config.alpha * (1.0 - idle_level(config.spend)), exit_tau_inf=None)
        else:
            config = replace(config, exit_tau_inf=None)
    return BioController(config, clock=clock, on_decision=on_decision, budget=budget)
