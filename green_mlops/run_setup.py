"""What the commands share below the CLI: exit codes, the consoles, the results directory, the
energy profiler the flags ask for, and the controller configuration from the flags.

``cli.py`` parses and dispatches; ``validate.py`` and the ``serve`` path take these from here, so
nothing imports back from the command line.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

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
    the model's validation split unless model.json or the user gives them (targets.calibration)."""
    from targets.calibration import calibrator
    from targets.controller_config import build_config

    overrides = {name: getattr(args, name) for name in CONTROLLER_FLAGS}
    return build_config(spec.controller_hints, args.config, overrides, calibration=calibrator(spec, backend))


def tau_inf_is_explicit(args) -> bool:
    """Whether the user set τ∞ (flag or the TOML file, at every exit or per exit), rather than the
    model's calibration."""
    from targets.controller_config import read_toml

    return args.tau_inf is not None or (args.config is not None
                                        and bool({"tau_inf", "exit_tau_inf"} & set(read_toml(args.config))))
