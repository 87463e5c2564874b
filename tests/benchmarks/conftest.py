"""The suite's benchmarks: helpers and a fault to inject. The ratio gates (thresholds in
ratios.toml beside this file, named by the ini option ``green_ratios`` in pyproject.toml) are the
green-mlops pytest plugin's (:mod:`green_mlops.pytest_plugin`), the same a user's project gets."""
from __future__ import annotations

import http.client
import json
import os
import time

import pytest

from targets.cpus import split_for_load_test


def pytest_addoption(parser):
    parser.addoption("--inject-decision-delay-us", type=int, default=0,
                     help="slow every controller decision down (proves the ratio gate can fail)")


@pytest.fixture(autouse=True)
def _slowed_controller(request, monkeypatch):
    delay_s = request.config.getoption("--inject-decision-delay-us") / 1e6
    if delay_s > 0:
        from targets.control.controller import BioController

        decide = BioController.decide

        def slow_decide(self, *args, **kwargs):
            until = time.perf_counter() + delay_s
            while time.perf_counter() < until:
                pass
            return decide(self, *args, **kwargs)

        monkeypatch.setattr(BioController, "decide", slow_decide)
    yield


def infer_body(x) -> str:
    """A KServe v2 JSON infer request for a float32 batch of the digits model."""
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})


class GatewayConnection:
    """One keep-alive connection of the standard library's client (httpx adds about 0.25 ms of
    its own per call here) to a gateway; ``infer(body)`` posts and checks the answer."""

    def __init__(self, gateway):
        host, port = gateway.host_port.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def infer(self, body: str) -> None:
        self.connection.request("POST", "/v2/models/digits/infer", body=body,
                                headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        response.read()
        assert response.status == 200

    def close(self) -> None:
        self.connection.close()


@pytest.fixture(scope="session")
def http_helpers():
    """``(infer_body, GatewayConnection)`` for the benchmarks that call a gateway over HTTP."""
    return infer_body, GatewayConnection


@pytest.fixture(scope="module")
def cpu_split():
    """``(this process's CPUs, the server's CPUs)``, or ``(None, None)`` on one CPU; this process is
    pinned to its half for the module (the server, wrk and the in-process calls each keep to theirs)."""
    split = split_for_load_test()
    if split is None:
        yield None, None
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, split[0])
    try:
        yield split
    finally:
        os.sched_setaffinity(0, before)
