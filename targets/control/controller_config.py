"""Controller parameters: documented defaults, a TOML file's ``[controller]`` table, CLI flags.

Precedence, lowest first: defaults, the model's calibration (per exit k, for the uncertainty
measure in use: τ∞_k = α·(1 − u*_k), see :mod:`targets.control.calibration`), the TOML file, explicit
flags. An explicit ``tau_inf`` (flag or file) without ``exit_tau_inf`` applies at every exit.
A model whose only calibration is the legacy entropy threshold (``uncertainty_skip_below``) is an
error with another measure unless ``tau_inf`` is given: never the entropy threshold for a
different measure.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

from targets.control.certified_path import LOSSES, PATH_KINDS
from targets.errors import ConfigError

UNCERTAINTIES = ("entropy", "least_confidence", "margin")
SKIP_ACTIONS = ("exit", "cache", "reject")
POLICIES = ("paper", "budget")
OVERLOAD_ACTIONS = ("reject", "queue")
SPEND_MODES = ("ceiling", "adaptive")  # budget policy: see targets.control.budget_policy
BUDGET_LOSSES, BUDGET_PATHS = LOSSES, PATH_KINDS  # budget policy: the certified risk and family
DEFAULT_TAU_INF = 0.8


@dataclass(frozen=True)
class ControllerConfig:
    """Every knob of the τ(t) controller. ``tau0=None`` means α+β+γ (admit everything at t=0)."""

    alpha: float = 1.0  # weight of (1 − u): performance / accuracy priority
    beta: float = 0.25  # weight of ê: ecology priority
    gamma: float = 0.5  # weight of ĉ: congestion priority
    tau0: float | None = None
    tau_inf: float = DEFAULT_TAU_INF
    k_per_s: float = 1.0  # decay rate of τ(t), per second
    uncertainty: str = "entropy"
    skip_action: str = "exit"
    capacity: int = 8  # in-flight requests that count as full congestion
    slo_ms: float = 100.0  # latency objective the recent p95 is compared with
    latency_window: int = 256  # requests in the recent-latency and admission-rate windows
    energy_ref_j: float = 1.0  # joules per request that count as ê = 1
    energy_ewma_weight: float = 0.2  # weight of the newest reading in the energy EWMA
    cache_size: int = 4096  # entries of the LRU answer cache (skip action 'cache')
    exit_tau_inf: tuple[float, ...] | None = None  # τ∞ per exit (ladders); None: tau_inf at every exit
    policy: str = "paper"  # 'paper': J ≤ τ(t) alone; 'budget': held inside a certified accuracy budget
    accuracy_budget_pp: float = 0.5  # budget policy: accuracy loss against the full model, pp
    risk: float = 0.1  # budget policy: δ, the probability the certificate may fail
    slo_p95_ms: float | None = None  # budget policy: the latency SLO the AIMD loop holds (None: off)
    overload_action: str = "reject"  # budget policy, SLO unmet at the ceiling: 'reject' sheds, 'queue' waits
    spend: str = "ceiling"  # budget policy: 'ceiling' rests at the certified ceiling, 'adaptive' below it
    budget_loss: str = "harm"  # budget policy: certify harms alone ('harm') or harms − fixes ('net')
    budget_path: str = "auto"  # budget policy: the certified family, 'per-exit' thresholds or one 'shared'
    audit_rate: float = 0.02  # budget policy, served: share of requests the live audit checks (targets.control.audit)
    audit_idle_rate: float = 0.25  # the same when the request is the only one in flight
    audit_risk: float = 0.01  # the live audit's false-alarm probability over a whole run

    def tau_inf_at(self, exit_index: int) -> float:
        """τ∞ of exit ``exit_index`` (1-based)."""
        if self.exit_tau_inf and 1 <= exit_index <= len(self.exit_tau_inf):
            return self.exit_tau_inf[exit_index - 1]
        return self.tau_inf

    def __post_init__(self):
        numbers = ("alpha", "beta", "gamma", "tau0", "tau_inf", "k_per_s", "slo_ms", "energy_ref_j",
                   "energy_ewma_weight", "accuracy_budget_pp", "risk", "slo_p95_ms", "audit_rate", "audit_idle_rate",
                   "audit_risk")
        for name in numbers:
            value = getattr(self, name)
            if name in ("tau0", "slo_p95_ms") and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"controller.{name} must be a finite number, got {value!r}")
        if self.exit_tau_inf is not None:
            values = self.exit_tau_inf
            if (not isinstance(values, (list, tuple)) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
                raise ConfigError(f"controller.exit_tau_inf must be a list of finite numbers (one per exit), "
                                  f"got {values!r}")
            object.__setattr__(self, "exit_tau_inf", tuple(float(v) for v in values))
        if self.tau0 is None:
            object.__setattr__(self, "tau0", self.alpha + self.beta + self.gamma)
        for name in ("alpha", "beta", "gamma", "k_per_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"controller.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("slo_ms", "energy_ref_j"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"controller.{name} must be > 0, got {getattr(self, name)}")
        for name in ("capacity", "latency_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"controller.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ConfigError(f"controller.cache_size must be an integer >= 0, got {self.cache_size!r}")
        if not 0 < self.energy_ewma_weight <= 1:
            raise ConfigError(f"controller.energy_ewma_weight must be in (0, 1], got {self.energy_ewma_weight}")
        if self.uncertainty not in UNCERTAINTIES:
            raise ConfigError(f"controller.uncertainty must be one of {', '.join(UNCERTAINTIES)}, "
                              f"got {self.uncertainty!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"controller.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.overload_action not in OVERLOAD_ACTIONS:
            raise ConfigError(f"controller.overload_action must be one of {', '.join(OVERLOAD_ACTIONS)}, "
                              f"got {self.overload_action!r}")
        if not 0 < self.accuracy_budget_pp < 100:
            raise ConfigError(f"controller.accuracy_budget_pp must be in (0, 100), got {self.accuracy_budget_pp}")
        if not 0 < self.risk < 1:
            raise ConfigError(f"controller.risk must be in (0, 1), got {self.risk}")
        if not 0 <= self.audit_rate <= 1 or not self.audit_rate <= self.audit_idle_rate <= 1:
            raise ConfigError(f"controller.audit_rate and audit_idle_rate must satisfy 0 <= audit_rate <= "
                              f"audit_idle_rate <= 1, got {self.audit_rate} and {self.audit_idle_rate}")
        if not 0 < self.audit_risk < 1:
            raise ConfigError(f"controller.audit_risk must be in (0, 1), got {self.audit_risk}")
        if self.slo_p95_ms is not None and self.slo_p95_ms <= 0:
            raise ConfigError(f"controller.slo_p95_ms must be > 0, got {self.slo_p95_ms}")
        if self.skip_action not in SKIP_ACTIONS:
            raise ConfigError(f"controller.skip_action must be one of {', '.join(SKIP_ACTIONS)}, "
                              f"got {self.skip_action!r}")
        for name, known in (("spend", SPEND_MODES), ("budget_loss", BUDGET_LOSSES), ("budget_path", BUDGET_PATHS)):
            if getattr(self, name) not in known:
                raise ConfigError(f"controller.{name} must be one of {', '.join(known)}, got {getattr(self, name)!r}")
        if self.policy == "budget" and self.skip_action == "reject":
            raise ConfigError("skip action 'reject' cannot run under the budget policy: its certificate assumes every "
                              "row gets an answer (use 'exit', or the paper policy)")
        if self.policy == "budget" and self.skip_action == "cache" and self.budget_loss == "net":
            raise ConfigError("skip action 'cache' cannot run under a 'net' budget: a cached full answer can lose the "
                              "fixes the certificate counted (use budget_loss 'harm', which covers it, or skip action 'exit')")


FIELD_NAMES = tuple(f.name for f in fields(ControllerConfig))


def read_toml(path: str | Path) -> dict:
    """The ``[controller]`` table of a TOML file; ConfigError for a missing or malformed file."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown_tables = set(document) - {"controller"}
    if unknown_tables:
        raise ConfigError(f"config file {path}: unknown table(s) {sorted(unknown_tables)}; "
                          "expected [controller]")
    table = document.get("controller", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: 'controller' must be a table")
    return table


def build_config(
    model_hints: dict | None = None,
    toml_path: str | Path | None = None,
    overrides: dict | None = None,
    calibration: Callable[[str], Sequence[float]] | None = None,
) -> ControllerConfig:
    """Resolve a ControllerConfig from defaults, the model's calibration, a TOML file and flag
    overrides (see the module docstring).

    ``calibration(measure)`` returns u* per exit for an uncertainty measure (it may compute them
    on the validation split); without it, the legacy hint ``uncertainty_skip_below`` in
    ``model_hints`` (entropy, one exit) is used.
    """
    values: dict = {}
    if toml_path is not None:
        values.update(read_toml(toml_path))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "tau_inf" in flags and "exit_tau_inf" not in flags:
        values.pop("exit_tau_inf", None)  # an explicit flag τ∞ holds at every exit
    values.update(flags)
    unknown = set(values) - set(FIELD_NAMES)
    if unknown:
        raise ConfigError(f"unknown controller setting(s) {sorted(unknown)}; known: {', '.join(FIELD_NAMES)}")
    if "tau_inf" not in values:
        alpha = values.get("alpha", ControllerConfig.alpha)
        measure = values.get("uncertainty", ControllerConfig.uncertainty)
        u_star = _model_u_star(model_hints or {}, measure, calibration)
        if u_star is not None and isinstance(alpha, (int, float)):
            per_exit = tuple(alpha * (1.0 - float(u)) for u in u_star)
            values["tau_inf"] = per_exit[0]
            if len(per_exit) > 1 and "exit_tau_inf" not in values:
                values["exit_tau_inf"] = per_exit
    try:
        return ControllerConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"bad controller setting: {exc}") from exc


def _model_u_star(hints: dict, measure: str, calibration) -> Sequence[float] | None:
    if calibration is not None:
        return calibration(measure)
    stored = hints.get("calibration") or {}
    if isinstance(stored, dict) and measure in stored:
        return stored[measure]
    skip_below = hints.get("uncertainty_skip_below")
    if not isinstance(skip_below, (int, float)):
        return None
    if measure != "entropy":
        raise ConfigError(f"the model's threshold (uncertainty_skip_below) is calibrated for entropy, not "
                          f"'{measure}': add a validation split (validation.npz) to calibrate it, or set tau_inf")
    return (skip_below,)
