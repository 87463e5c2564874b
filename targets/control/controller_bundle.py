"""A controller as plain data: what a server that cannot run the calibration itself (Triton's Python
backend) needs to rebuild the very controller ``serve`` would run.

``controller_bundle(controller)`` holds the controller's config (every knob, the thresholds the
calibration set) and, under the budget policy, the whole certified path (its points, ceiling and
how they were certified). ``controller_from_bundle(bundle)`` rebuilds a :class:`BioController`
with a fresh state (τ(t) restarts at τ0; counters at zero) that decides every row as the original
would in the same state. The bundle is JSON-serialisable; its ``version`` changes when its fields do.
"""
from __future__ import annotations

import time
from dataclasses import asdict, fields
from typing import Callable

from targets.control.certified_path import PathCalibration
from targets.control.controller import BioController
from targets.control.controller_config import ControllerConfig
from targets.errors import ConfigError

BUNDLE_VERSION = 1


def controller_bundle(controller: BioController) -> dict:
    """The controller as JSON-ready data (see the module docstring)."""
    budget = controller.budget
    return {
        "version": BUNDLE_VERSION,
        "config": asdict(controller.config),
        "path": None if budget is None else asdict(budget.calibration),
        "overload_action": None if budget is None else budget.overload_action,
        "spend": None if budget is None else budget.spend,
    }


def _path(data: dict) -> PathCalibration:
    names = {f.name for f in fields(PathCalibration)}
    if set(data) != names:
        raise ConfigError(f"controller bundle: the certified path has fields {sorted(data)}, expected {sorted(names)}")
    values = dict(data)
    values["points"] = tuple(tuple(float(t) for t in point) for point in data["points"])
    for name in ("p_values", "test_risks", "disagreements"):
        values[name] = tuple(data[name])
    if data["depth_histogram"] is not None:
        values["depth_histogram"] = tuple(data["depth_histogram"])
    return PathCalibration(**values)


def controller_from_bundle(bundle: dict, clock: Callable[[], float] = time.monotonic) -> BioController:
    """A fresh controller equal to the one ``bundle`` was made from; ConfigError for a bundle of
    another version or with missing or unknown fields."""
    if not isinstance(bundle, dict) or bundle.get("version") != BUNDLE_VERSION:
        found = bundle.get("version") if isinstance(bundle, dict) else type(bundle).__name__
        raise ConfigError(f"controller bundle version {found!r}: this code reads version {BUNDLE_VERSION}")
    config_data = bundle.get("config")
    known = {f.name for f in fields(ControllerConfig)}
    if not isinstance(config_data, dict) or set(config_data) - known:
        raise ConfigError(f"controller bundle: config fields not understood: "
                          f"{sorted(set(config_data or {}) - known) if isinstance(config_data, dict) else config_data!r}")
    config = ControllerConfig(**config_data)
    budget = None
    if config.policy == "budget":
        from targets.control.budget_policy import BudgetPolicy

        if not isinstance(bundle.get("path"), dict):
            raise ConfigError("controller bundle: the budget policy needs its certified path")
        budget = BudgetPolicy(_path(bundle["path"]), config.slo_p95_ms, bundle.get("overload_action") or "reject",
                              spend=bundle.get("spend") or config.spend)
    return BioController(config, clock=clock, budget=budget)
