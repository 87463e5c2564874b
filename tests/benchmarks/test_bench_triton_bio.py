"""Issue 26: bio inside Triton against bio behind the gateway, at saturation, same model, same
machine, same controller.

wrk (16 connections, 3 s, the same held-out rows as KServe v2 JSON) against ``digits_bio`` on a
Triton server started here, then against a bio gateway; both run the budget policy certified on
the same validation split, at its ceiling from the first request (k = 10⁶/s), the gateway's live
audit off (the Triton model has none). Where the machine has 2 CPUs or more the server (Triton,
with every backend process it starts, or the gateway) runs on one half and wrk on the other.
Beside them, the full model on the same Triton (``digits_full``): the Python backend's own cost
per request. Each benchmark stores seconds per request in ``extra_info``; the ratio gate reads it. The Triton
side also stores the batches its dynamic batcher formed for ``digits_bio`` (requests per
execution, from Triton's own counters).
"""
from __future__ import annotations

import json
import urllib.request

import pytest

from loadtests.gateway_process import GatewayProcess
from targets.backends.triton_target import parse_metrics
from tests.conftest import settled_budget_controller

ROWS = 200
GATEWAY_BIO = ("--controller", "bio", "--policy", "budget", "--spend", "ceiling", "--k", "1e6",
               "--audit-rate", "0", "--audit-idle-rate", "0")


@pytest.fixture(scope="module")
def bodies(digits_eval):
    x = digits_eval[0][:ROWS]
    return [json.dumps({"inputs": [{"name": "x", "shape": [1, *x.shape[1:]], "datatype": "FP32",
                                    "data": row.ravel().tolist()}]}).encode() for row in x]


@pytest.fixture(scope="module")
def wrk_available():
    from loadtests.wrk import wrk_path

    if wrk_path() is None:
        pytest.skip("wrk is not installed (Debian: apt-get install wrk; tests/run installs it as root)")


@pytest.fixture(scope="module")
def bio_triton(local_triton, tmp_path_factory, digits_spec, digits_backend, cpu_split):
    from targets.control.controller_bundle import controller_bundle
    from targets.serving.triton_repo import RepoOptions, write_repository
    from targets.backends.triton_server import TritonServer

    repo = tmp_path_factory.mktemp("bio-bench-repo")
    bundle = controller_bundle(settled_budget_controller(digits_spec, digits_backend))
    write_repository(digits_spec, repo, RepoOptions(flavour="python"), bio_bundle=bundle)
    server = TritonServer(repo, cpus=cpu_split[1])
    yield server
    server.stop()


def _saturate(benchmark, url: str, path: str, bodies, cpus) -> dict:
    from loadtests.wrk import run_wrk

    result: dict = {}
    run_wrk(url, path, bodies[:32], connections=4, duration_s=1.0, cpus=cpus)  # warm-up, not timed

    def load() -> None:
        result.update(run_wrk(url, path, bodies, connections=16, duration_s=3.0, cpus=cpus))

    benchmark.pedantic(load, rounds=1, iterations=1)
    assert result["non_2xx"] == 0 and result["socket_errors"] == 0, result
    benchmark.extra_info.update({"seconds_per_request": 1.0 / result["requests_per_s"],
                                 "requests_per_s": result["requests_per_s"], "wrk_p50_ms": result["p50_ms"]})
    return result


def _counters(server) -> dict:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return parse_metrics(text, {"digits_bio"}).get("digits_bio", {})


@pytest.mark.benchmark(group="saturation, bio inside Triton vs behind the gateway")
def test_saturation_bio_inside_triton(benchmark, bio_triton, bodies, cpu_split, wrk_available):
    before = _counters(bio_triton)
    _saturate(benchmark, f"http://{bio_triton.url}", "/v2/models/digits_bio/infer", bodies, cpu_split[0])
    after = _counters(bio_triton)
    requests = after["nv_inference_count"] - before.get("nv_inference_count", 0)
    executions = after["nv_inference_exec_count"] - before.get("nv_inference_exec_count", 0)
    benchmark.extra_info["requests_per_execution"] = requests / executions  # the batches Triton formed
    assert requests > executions  # the dynamic batcher merged requests


@pytest.mark.benchmark(group="saturation, bio inside Triton vs behind the gateway")
def test_saturation_full_inside_triton(benchmark, bio_triton, bodies, cpu_split, wrk_available):
    """The standard path on the same server (``digits_full``, one Python-backend model): what a
    request costs Triton's Python backend whatever the model does."""
    _saturate(benchmark, f"http://{bio_triton.url}", "/v2/models/digits_full/infer", bodies, cpu_split[0])


@pytest.mark.benchmark(group="saturation, bio inside Triton vs behind the gateway")
def test_saturation_bio_behind_gateway(benchmark, bodies, cpu_split, wrk_available):
    gateway = GatewayProcess("--model", "digits", *GATEWAY_BIO, cpus=cpu_split[1])
    try:
        _saturate(benchmark, gateway.url, "/v2/models/digits/infer", bodies, cpu_split[0])
    finally:
        gateway.stop()
