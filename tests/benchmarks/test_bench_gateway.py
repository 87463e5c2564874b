"""The gateway's round trip (HTTP, JSON, uvicorn, thread hand-off) against the in-process target."""
from __future__ import annotations

import http.client
import json

import pytest

from targets.controlled import ControlledTarget


@pytest.fixture(scope="module")
def one_body(digits_eval):
    x = digits_eval[0][:1]
    return {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.mark.benchmark(group="gateway")
def test_gateway_round_trip(benchmark, gateway_off, one_body):
    """Batch 1, full model, one keep-alive connection of the standard library's client (httpx
    adds about 0.25 ms of its own per call here); the client's JSON encoding included."""
    host, port = gateway_off.host_port.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}

    def call():
        connection.request("POST", "/v2/models/digits/infer", body=json.dumps(one_body), headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200

    benchmark(call)
    connection.close()


@pytest.mark.benchmark(group="gateway")
def test_in_process_request(benchmark, digits_backend, digits_eval):
    target = ControlledTarget(digits_backend, None)
    x = digits_eval[0][:1]
    benchmark(target.predict, x)
