"""What the commands share below the CLI: exit codes, the consoles, the results directory, the
energy profiler the flags ask for, and the controller configuration from the flags.

``cli.py`` parses and dispatches; ``validate.py`` and the ``serve`` path take these from here, so
nothing imports back from the command line.
"""
from __future__ import annotations

from pathlib import Path

from reports.console import wide_console
from targets.errors import GreenMLOpsError

EXIT_OK = 0
EXIT_GATE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

# Markup off: user text such as "green-mlops[cpu]", "[controller]" or "[n, 1, 8, 8]" prints as is.
stderr = wide_console(stderr=True, markup=False, highlight=False)
stdout = wide_console(markup=False, highlight=False)


def open_energy(args, results: Path | None):
    """The profiler the flags ask for (None with --energy off); left-out sources are reported."""
    if args.energy == "off":
        return None
    from profilers.profiler import open_profiler

    profiler = open_profiler(country_iso_code=args.country, region=args.region,
                             record_path=None if results is None else results / "windows.jsonl")
    for name, reason in profiler.unavailable.items():
        stderr.print(f"energy source {name} left out: {reason}", soft_wrap=True)
    if not profiler.sources:
        stderr.print("no energy source reads here: energy is not reported")
    return profiler


def make_results_dir(path: Path | None) -> Path | None:
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GreenMLOpsError(f"cannot create results directory {path}: {exc}") from exc
    return path


CONTROLLER_FLAGS = ("alpha", "beta", "gamma", "tau0", "tau_inf", "k_per_s", "uncertainty",
                    "skip_action", "capacity", "slo_ms", "policy", "accuracy_budget_pp", "risk", "slo_p95_ms",
                    "overload_action", "spend", "budget_loss", "budget_path", "audit_rate", "audit_idle_rate",
                    "audit_risk")


def controller_config(args, spec, backend=None):
    """The controller's config: its thresholds calibrated per exit and per uncertainty measure on
    the model's validation split unless model.json or the user gives them (targets.control.calibration)."""
    from targets.control.calibration import calibrator
    from targets.control.controller_config import build_config

    overrides = {name: getattr(args, name) for name in CONTROLLER_FLAGS}
    return build_config(spec.controller_hints, args.config, overrides, calibration=calibrator(spec, backend))


def tau_inf_is_explicit(args) -> bool:
    """Whether the user set τ∞ (flag or the TOML file, at every exit or per exit), rather than the
    model's calibration."""
    from targets.control.controller_config import read_toml

    return args.tau_inf is not None or (args.config is not None
                                        and bool({"tau_inf", "exit_tau_inf"} & set(read_toml(args.config))))


DEFAULT_POLICY = "budget"
"""The policy of ``validate`` and ``serve`` alike when neither flag nor TOML names one: the
controller that holds its promise (a certified accuracy budget, audited live when serving);
``--policy paper`` runs the paper's formula unbounded."""


def make_default_controller(args, spec, backend):
    """The controller ``args`` ask for (None for ``--controller off``). With no policy named, the
    budget policy, certified here; a model whose validation split cannot certify the default
    budget falls back to the paper's policy, saying first, in one line, why, how many validation
    rows the budget needs and what the fallback's thresholds will do."""
    from dataclasses import replace

    from targets.control.certify import rows_needed
    from targets.control.controller_config import read_toml
    from targets.errors import ConfigError
    from targets.control.make_controller import make_controller

    if getattr(args, "controller", "bio") == "off":
        return None
    defaulted = args.policy is None and (args.config is None or "policy" not in read_toml(args.config))
    if defaulted:
        args.policy = DEFAULT_POLICY
    config = controller_config(args, spec, backend)
    try:
        return make_controller(config, spec, backend, explicit_tau_inf=tau_inf_is_explicit(args))
    except ConfigError as exc:
        if not defaulted:
            raise
        args.policy = "paper"
        controller = make_controller(replace(config, policy="paper"), spec, backend,
                                     explicit_tau_inf=tau_inf_is_explicit(args))
        stderr.print(f"budget policy unavailable for model {spec.name} ({exc}); the default budget "
                     f"({config.accuracy_budget_pp:g} pp at δ = {config.risk:g}) needs at least "
                     f"{rows_needed(config.accuracy_budget_pp / 100, config.risk):,} validation rows. Running the "
                     f"paper's policy instead (--policy paper), uncertified: {fallback_words(controller.config)}",
                     soft_wrap=True)
        return controller


def fallback_words(config) -> str:
    """What the paper policy's thresholds will do, exit by exit, in words (u* = 1 − τ∞/α)."""
    taus = config.exit_tau_inf or (config.tau_inf,)
    words = []
    for k, tau in enumerate(taus, start=1):
        u_star = 1.0 - tau / config.alpha if config.alpha > 0 else float("inf")
        if u_star >= 1.0:
            words.append(f"u* = {u_star:.2f} at exit {k}: every row reaching it leaves there"
                         + (", later stages never run" if len(taus) >= 1 else ""))
            break
        words.append(f"u* = {u_star:.2f} at exit {k}" + (": no row leaves there" if u_star <= 0 else ""))
    return "; ".join(words)
