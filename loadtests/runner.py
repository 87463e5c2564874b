"""Run a locustfile scenario headless as a child process, bounded in time, and wait for it.

The locustfile is the unit users run (`locust -f loadtests/bio.py`), so the main job runs exactly
that; a child process also keeps gevent's monkey-patching out of the caller's process.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from targets.errors import GreenMLOpsError

SCENARIOS = ("standard", "bio")
STARTUP_ALLOWANCE_S = 60.0


@dataclass(frozen=True)
class LoadSpec:
    shape: str = "spike"
    base_users: int = 4
    phase_s: float = 5.0
    run_time_s: int = 15
    arrival_rate: float = 0.0  # open loop when > 0
    model: str = "digits"
    energy: str = "auto"
    country: str = "USA"
    controller_config: Path | None = None  # TOML handed to the gateway the locustfile starts


def locustfile(scenario: str) -> Path:
    if scenario not in SCENARIOS:
        raise GreenMLOpsError(f"unknown scenario '{scenario}'; known: {', '.join(SCENARIOS)}")
    return Path(__file__).resolve().parent / f"{scenario}.py"


def run_scenario(scenario: str, results: Path, spec: LoadSpec, host: str | None = None) -> Path:
    """Run ``scenario`` into ``results``; returns ``results``. GreenMLOpsError if Locust fails."""
    command = [sys.executable, "-m", "locust", "-f", str(locustfile(scenario)), "--headless",
               "--shape", spec.shape, "--base-users", str(spec.base_users), "--phase-s", str(spec.phase_s),
               "-t", str(spec.run_time_s), "--model", spec.model, "--energy", spec.energy,
               "--country", spec.country, "--results", str(results)]
    if spec.arrival_rate > 0:
        command += ["--arrival-rate", str(spec.arrival_rate)]
    if spec.controller_config is not None:
        command += ["--controller-config", str(spec.controller_config)]
    if host:
        command += ["--host", host]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=spec.run_time_s + STARTUP_ALLOWANCE_S)
    except subprocess.TimeoutExpired as exc:
        raise GreenMLOpsError(f"the {scenario} load test did not finish within "
                              f"{spec.run_time_s + STARTUP_ALLOWANCE_S:.0f} s") from exc
    if done.returncode != 0 or not (results / "requests.jsonl").exists():
        raise GreenMLOpsError(f"the {scenario} load test failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return results
