"""A `green-mlops serve` subprocess on an ephemeral loopback port, for locustfiles and tests.

The gateway's stdout and stderr go to a log file, never to a pipe nobody reads (a full pipe
blocks the server's next log line, and with it the server). The gateway dies with the process
that started it, even when that one is killed with SIGKILL (see :mod:`targets.child_process`);
``stop()`` in a ``finally`` (or ``with GatewayProcess(...)``) covers every orderly exit.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from targets.child_process import die_with_parent, preexec_steps
from targets.cpus import pin_to

READY_MARK = "listening on "


class GatewayProcess:
    """Start the gateway with the given CLI arguments; ``url`` is where it listens.

    Energy sources are off unless ``--energy`` is among the arguments (CodeCarbon's start-up
    costs over a second). ``log_path`` (default: a temporary file, removed by a clean ``stop()``)
    receives everything the gateway prints. ``stop()`` sends SIGTERM, so in-flight requests drain.
    ``cpus`` pins the gateway to those CPUs (its ONNX Runtime threads follow its share).
    """

    def __init__(self, *args: str, host: str = "127.0.0.1", log_path: Path | None = None,
                 startup_timeout_s: float = 120.0, cpus: list[int] | None = None):
        if "--energy" not in args:
            args = (*args, "--energy", "off")
        self._final_log: str | None = None
        self._tmp = None if log_path is not None else tempfile.mkdtemp(prefix="green-mlops-gateway-")
        self.log_path = Path(log_path) if log_path is not None else Path(self._tmp) / "gateway.log"
        self._log = self.log_path.open("wb")
        self.cpus = list(cpus) if cpus else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "green_mlops.cli", "serve", "--host", host, "--port", "0", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=preexec_steps(die_with_parent(), pin_to(self.cpus) if self.cpus else None))
        try:
            line = self._wait_listening(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.url = line.rsplit(READY_MARK, 1)[1].strip()
        self.host_port = self.url.removeprefix("http://")
        self.dashboard_url = f"{self.url}/dashboard"

    def _wait_listening(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log_text().splitlines():
                if READY_MARK in line:
                    return line
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway did not start (exit {self.process.returncode}): "
                                   f"{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not listen within {timeout_s:.0f} s: {self.log_text()[-3000:]}")
            time.sleep(0.05)

    def log_text(self) -> str:
        """Everything the gateway printed so far (after ``stop()``: everything it printed)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (drain), SIGKILL after ``timeout_s``; the exit code. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if not self._log.closed:
            self._log.close()
        if self._tmp is not None and code == 0:  # a failed gateway's log stays for whoever debugs it
            self._final_log = self.log_text()
            shutil.rmtree(self._tmp, ignore_errors=True)
        return code

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
