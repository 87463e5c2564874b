"""The gateway's round trip (HTTP, JSON, uvicorn, thread hand-off) against the in-process target."""
from __future__ import annotations

import pytest

from targets.controlled import ControlledTarget


@pytest.mark.benchmark(group="gateway")
def test_gateway_round_trip(benchmark, gateway_off, digits_eval, http_helpers):
    """Batch 1, full model, one keep-alive connection; the client's JSON encoding included."""
    infer_body, GatewayConnection = http_helpers
    connection = GatewayConnection(gateway_off)
    x = digits_eval[0][:1]
    benchmark(lambda: connection.infer(infer_body(x)))
    connection.close()


@pytest.mark.benchmark(group="gateway")
def test_in_process_request(benchmark, digits_backend, digits_eval):
    target = ControlledTarget(digits_backend, None)
    x = digits_eval[0][:1]
    benchmark(target.predict, x)
