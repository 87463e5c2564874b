"""The gateway's round trip (HTTP, JSON, uvicorn, thread hand-off) against the in-process target."""
from __future__ import annotations

import pytest

from targets.control.controlled import ControlledTarget


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


@pytest.fixture(scope="module")
def gateway_two_workers():
    from loadtests.gateway_process import GatewayProcess

    gateway = GatewayProcess("--controller", "off", "--max-concurrency", "2")
    yield gateway
    gateway.stop()


def _large_bodies(gateway, stop, http_helpers):
    """Post ~1 MiB bodies (80,000 numbers: parsed, converted, then refused with a 400) until ``stop``."""
    import http.client
    import json

    host, port = gateway.host_port.rsplit(":", 1)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": [0.123456789] * 80000}]})
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    while not stop.is_set():
        connection.request("POST", "/v2/models/digits/infer", body=body)
        response = connection.getresponse()
        response.read()
        assert response.status == 400
    connection.close()


@pytest.mark.benchmark(group="gateway beside large bodies")
def test_gateway_round_trip_alone(benchmark, gateway_two_workers, digits_eval, http_helpers):
    infer_body, GatewayConnection = http_helpers
    connection = GatewayConnection(gateway_two_workers)
    x = digits_eval[0][:1]
    benchmark(lambda: connection.infer(infer_body(x)))
    connection.close()


@pytest.mark.benchmark(group="gateway beside large bodies")
def test_gateway_round_trip_beside_large_bodies(benchmark, gateway_two_workers, digits_eval, http_helpers):
    """The same call while another client keeps sending 1 MiB bodies: their decoding runs in the
    worker pool, not on the event loop (it still holds the GIL while json and numpy parse)."""
    import threading

    infer_body, GatewayConnection = http_helpers
    stop = threading.Event()
    sender = threading.Thread(target=_large_bodies, args=(gateway_two_workers, stop, http_helpers))
    sender.start()
    connection = GatewayConnection(gateway_two_workers)
    x = digits_eval[0][:1]
    try:
        benchmark(lambda: connection.infer(infer_body(x)))
    finally:
        stop.set()
        sender.join()
        connection.close()
