"""Run a locustfile scenario headless as a child process, bounded in time, and wait for it.

The locustfile is the unit users run (`locust -f loadtests/bio.py`), so the main job runs exactly
that; a child process also keeps gevent's monkey-patching out of the caller's process.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def run_scenario(scenario: str, results: Path, spec: LoadSpec, host: str | None = None,
                 on_line: Callable[[str], None] | None = None) -> Path:
    """Run ``scenario`` into ``results``; returns ``results``. GreenMLOpsError if Locust fails.

    ``on_line`` receives each line Locust writes to stderr as it comes (e.g. the gateway's and
    its dashboard's URL, printed by the locustfile when it starts the gateway)."""
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
    timeout_s = spec.run_time_s + STARTUP_ALLOWANCE_S
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read_stderr():  # line by line, so the caller sees e.g. the dashboard URL while it runs
        for line in process.stderr:
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))

    reader = threading.Thread(target=read_stderr, name=f"locust-{scenario}-stderr", daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        process.kill()
        process.wait()
        raise GreenMLOpsError(f"the {scenario} load test did not finish within {timeout_s:.0f} s") from exc
    finally:
        if process.poll() is None:  # interrupted: the child dies with us
            process.kill()
            process.wait()
        reader.join(timeout=5)
    if code != 0 or not (results / "requests.jsonl").exists():
        raise GreenMLOpsError(f"the {scenario} load test failed (exit {code}):\n{''.join(lines)[-2000:]}")
    return results
