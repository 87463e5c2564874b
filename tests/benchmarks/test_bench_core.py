"""Core-loop benchmarks: the controller's decision against the inference it gates."""
from __future__ import annotations

import numpy as np
import pytest

from targets.control.controlled import ControlledTarget
from targets.control.controller import BioController, uncertainty
from targets.control.controller_config import build_config


@pytest.fixture(scope="module")
def one_input(digits_eval):
    return digits_eval[0][:1]


@pytest.fixture(scope="module")
def bio_config(digits_spec):
    from targets.control.calibration import calibrator

    return build_config(digits_spec.controller_hints, None, {"k_per_s": 1e6}, calibrator(digits_spec))


@pytest.mark.benchmark(group="controller")
def test_controller_decision(benchmark, digits_backend, one_input, bio_config):
    """One decision as the controlled path makes it: uncertainty of the exit head, then decide."""
    exit_probabilities, _ = digits_backend.stage1(one_input)
    controller = BioController(bio_config)

    def decide():
        return controller.decide(float(uncertainty(exit_probabilities, "entropy")[0]))

    benchmark(decide)


@pytest.mark.benchmark(group="controller")
def test_stage2_inference(benchmark, digits_backend, one_input):
    _, hidden = digits_backend.stage1(one_input)
    benchmark(digits_backend.stage2, hidden)


@pytest.mark.benchmark(group="onnxruntime")
def test_stage1_inference(benchmark, digits_backend, one_input):
    benchmark(digits_backend.stage1, one_input)


@pytest.mark.benchmark(group="onnxruntime")
def test_full_inference(benchmark, digits_backend, one_input):
    benchmark(digits_backend.full_probabilities, one_input)


@pytest.mark.benchmark(group="per request")
def test_standard_request(benchmark, digits_backend, digits_eval):
    target = ControlledTarget(digits_backend, None)
    rows = [digits_eval[0][i : i + 1] for i in range(len(digits_eval[0]))]
    cycle = iter(np.tile(np.arange(len(rows)), 1000))
    benchmark(lambda: target.predict(rows[next(cycle)]))


@pytest.mark.benchmark(group="per request")
def test_bio_request(benchmark, digits_backend, digits_eval, bio_config):
    """Stage 1, decision and stage 2 when admitted, cycling over the held-out inputs."""
    target = ControlledTarget(digits_backend, BioController(bio_config))
    rows = [digits_eval[0][i : i + 1] for i in range(len(digits_eval[0]))]
    cycle = iter(np.tile(np.arange(len(rows)), 1000))
    benchmark(lambda: target.predict(rows[next(cycle)]))
