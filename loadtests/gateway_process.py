"""A `green-mlops serve` subprocess on an ephemeral loopback port, for locustfiles and tests."""
from __future__ import annotations

import signal
import subprocess
import sys


class GatewayProcess:
    """Start the gateway with the given CLI arguments; ``url`` is where it listens.

    Energy sources are off unless ``--energy`` is among the arguments (CodeCarbon's start-up
    costs over a second). ``stop()`` sends SIGTERM, so in-flight requests drain.
    """

    def __init__(self, *args: str, host: str = "127.0.0.1"):
        if "--energy" not in args:
            args = (*args, "--energy", "off")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "green_mlops.cli", "serve", "--host", host, "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if "listening on " not in line:
            self.process.kill()
            raise RuntimeError(f"gateway did not start: {line}{self.process.stderr.read()}")
        self.url = line.rsplit("listening on ", 1)[1].strip()
        self.host_port = self.url.removeprefix("http://")
        self.dashboard_url = f"{self.url}/dashboard"

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
