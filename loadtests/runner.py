"""Run a locustfile scenario headless as a child process, bounded in time, and wait for it.

The locustfile is the unit users run (`locust -f loadtests/bio.py`), so the main job runs exactly
that; a child process also keeps gevent's monkey-patching out of the caller's process. Its output
goes to ``RESULTS/locust.log`` (a file, so no pipe can fill). Ctrl-C (or SIGTERM) of the caller
is passed on: the child stops gracefully and finishes its records and ``run.json`` first.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from targets.cpus import cpu_list, pin_to
from targets.errors import GreenMLOpsError

SCENARIOS = ("standard", "bio")
STARTUP_ALLOWANCE_S = 150.0  # Locust's start and the gateway's (whose own limit is 120 s): a bio gateway
# runs every stage over the validation split before it listens (reviews: 3,060 rows, about 25 s here,
# more with its CPUs pinned and Locust beside it), and the schedule starts only once it listens
INTERRUPT_GRACE_S = 30.0  # how long an interrupted child may take to write what it has
LOG_FILE = "locust.log"
CPU_SETS_ENV = "GREEN_MLOPS_CPU_SETS"  # the CPU sets of a run whose server the caller started, for run.json


@dataclass(frozen=True)
class LoadSpec:
    shape: str = "spike"
    base_users: int = 4
    phase_s: float = 5.0
    run_time_s: int = 15
    arrival_rate: float = 0.0  # open loop when > 0
    seed: int = 0
    schedule: Path | None = None  # open loop: replay this schedule.json
    model: str = "digits"
    energy: str = "auto"
    country: str = "USA"
    controller_config: Path | None = None  # TOML handed to the gateway the locustfile starts
    backend: str = "gateway"  # what the host is: the gateway, or a Triton server (<model>_full, <model>_bio)


def locustfile(scenario: str) -> Path:
    if scenario not in SCENARIOS:
        raise GreenMLOpsError(f"unknown scenario '{scenario}'; known: {', '.join(SCENARIOS)}")
    return Path(__file__).resolve().parent / f"{scenario}.py"


def command_for(scenario: str, results: Path, spec: LoadSpec, host: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "locust", "-f", str(locustfile(scenario)), "--headless",
               "--shape", spec.shape, "--base-users", str(spec.base_users), "--phase-s", str(spec.phase_s),
               "-t", str(spec.run_time_s), "--model", spec.model, "--energy", spec.energy,
               "--country", spec.country, "--results", str(results)]
    if spec.arrival_rate > 0:
        command += ["--arrival-rate", str(spec.arrival_rate), "--seed", str(spec.seed)]
        if spec.schedule is not None:
            command += ["--schedule", str(spec.schedule)]
    if spec.controller_config is not None:
        command += ["--controller-config", str(spec.controller_config)]
    if spec.backend != "gateway":
        command += ["--backend", spec.backend]
    if host:
        command += ["--host", host]
    return command


def run_scenario(scenario: str, results: Path, spec: LoadSpec, host: str | None = None,
                 on_line: Callable[[str], None] | None = None, cpu_sets: dict | None = None) -> Path:
    """Run ``scenario`` into ``results``; returns ``results``. GreenMLOpsError if Locust fails;
    KeyboardInterrupt, once the child has stopped, if the caller is interrupted.

    ``cpu_sets`` (``{"load_generator": [...], "server": [...]}``, for a server started by the
    caller) pins Locust to the load generator's CPUs; ``run.json`` records both.

    Locust's output goes to a log file; ``on_line`` receives each of its lines as it is written
    (e.g. the gateway's and its dashboard's URL, printed by the locustfile when it starts)."""
    results.mkdir(parents=True, exist_ok=True)
    log_path = results / LOG_FILE
    with log_path.open("w") as log:
        env, preexec = None, None
        if cpu_sets is not None:
            env = {**os.environ, CPU_SETS_ENV: json.dumps({k: cpu_list(v) for k, v in cpu_sets.items()})}
            preexec = pin_to(cpu_sets["load_generator"])
        process = subprocess.Popen(command_for(scenario, results, spec, host), stdout=log, stderr=subprocess.STDOUT,
                                   env=env, preexec_fn=preexec)
        tail = _Tail(log_path, on_line) if on_line is not None else None
        try:
            code = process.wait(timeout=spec.run_time_s + STARTUP_ALLOWANCE_S)
        except subprocess.TimeoutExpired as exc:
            _stop(process)
            raise GreenMLOpsError(f"the {scenario} load test did not finish within "
                                  f"{spec.run_time_s + STARTUP_ALLOWANCE_S:.0f} s (log: {log_path})") from exc
        except BaseException:  # Ctrl-C: the child finishes what it recorded, then we go on
            _stop(process)
            raise
        finally:
            if tail is not None:
                tail.stop()
    # Locust exits 1 when requests failed: the run is complete and its report says INVALID.
    if code not in (0, 1) or not _finished(results):
        tail = log_path.read_text(errors="replace")[-2000:]
        raise GreenMLOpsError(f"the {scenario} load test failed (exit {code}, log: {log_path}):\n{tail}")
    return results


def _finished(results: Path) -> bool:
    import json

    try:
        return bool(json.loads((results / "run.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGINT (a graceful stop: records and run.json are finished), then SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=INTERRUPT_GRACE_S)
    except BaseException:  # it hangs, or a second Ctrl-C: never leave it running
        process.kill()
        process.wait()
        if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
            raise


class _Tail:
    """Follows a log file in a thread, handing each complete line to a callback, until stopped."""

    def __init__(self, path: Path, on_line: Callable[[str], None], interval_s: float = 0.2):
        self._path, self._on_line, self._interval_s = path, on_line, interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"tail-{path.name}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        with self._path.open(errors="replace") as lines:
            pending = ""
            while True:
                stopping = self._stopped.is_set()
                pending += lines.read()
                *complete, pending = pending.split("\n")
                for line in complete:
                    self._on_line(line)
                if stopping:
                    return
                self._stopped.wait(self._interval_s)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
