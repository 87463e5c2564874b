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
