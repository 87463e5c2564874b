"""Shared fixtures: the embedded model, its ONNX Runtime backend, a fake clock."""
from __future__ import annotations

import pytest

from green_mlops.models import resolve_model
from targets.ort_target import OnnxRuntimeTarget


@pytest.fixture(scope="session")
def digits_spec():
    return resolve_model("digits")


@pytest.fixture(scope="session")
def digits_backend(digits_spec):
    return OnnxRuntimeTarget(digits_spec, device="cpu")


@pytest.fixture(scope="session")
def digits_eval(digits_spec):
    return digits_spec.load_eval()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now_s: float = 100.0):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock():
    return FakeClock()


class Gateway:
    """A real `green-mlops serve` subprocess on an ephemeral loopback port."""

    def __init__(self, *args: str):
        import subprocess
        import sys

        if "--energy" not in args:  # CodeCarbon's start-up costs 1.3 s: only where a test asks
            args = (*args, "--energy", "off")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "green_mlops.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if "listening on " not in line:
            self.process.kill()
            raise RuntimeError(f"gateway did not start: {line}{self.process.stderr.read()}")
        self.url = line.rsplit("listening on ", 1)[1].strip()
        self.host_port = self.url.removeprefix("http://")

    def stop(self, timeout_s: float = 30.0) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


@pytest.fixture
def start_gateway():
    """Start gateways with the given CLI arguments; all are stopped at the end of the test."""
    started: list[Gateway] = []

    def start(*args: str) -> Gateway:
        gateway = Gateway(*args)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def gateway_bio():
    gateway = Gateway("--controller", "bio", "--max-body-bytes", "65536")
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def gateway_off():
    gateway = Gateway("--controller", "off", "--max-concurrency", "1")
    yield gateway
    gateway.stop()
