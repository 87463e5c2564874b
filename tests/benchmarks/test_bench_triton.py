"""Path B (Triton, dynamic batching) against Path A (the FastAPI gateway over ONNX Runtime):
batch-1 requests of the full model from 1 and from 16 concurrent clients. Each round sends
REQUESTS_PER_ROUND requests; time per round is the inverse of throughput."""
from __future__ import annotations

import threading

import numpy as np
import pytest

REQUESTS_PER_ROUND = 192


def _rows(digits_eval):
    x = digits_eval[0]
    return [x[i : i + 1] for i in range(REQUESTS_PER_ROUND)]


def _in_threads(clients: int, make_client, send, rows) -> None:
    """Send ``rows`` split over ``clients`` threads, each with its own connection."""
    def work(part):
        client = make_client()
        for row in part:
            send(client, row)

    threads = [threading.Thread(target=work, args=(rows[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.fixture(scope="module")
def gateway_path_a():
    from loadtests.gateway_process import GatewayProcess

    gateway = GatewayProcess("--controller", "off", "--max-concurrency", "4")
    yield gateway
    gateway.stop()


def _path_a(gateway, clients, rows, http_helpers):
    infer_body, GatewayConnection = http_helpers
    bodies = [infer_body(r) for r in rows]
    return lambda: _in_threads(clients, lambda: GatewayConnection(gateway),
                               lambda connection, body: connection.infer(body), bodies)


def _path_b(server, clients, rows):
    import tritonclient.http as triton_http

    def send(client, row):
        tensor = triton_http.InferInput("x", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(row, binary_data=True)
        client.infer("digits_full", [tensor])

    return lambda: _in_threads(clients, lambda: triton_http.InferenceServerClient(server.url), send, rows)


def _measure_rounds(benchmark, run) -> None:
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["throughput_rps"] = REQUESTS_PER_ROUND / benchmark.stats.stats.median


@pytest.mark.parametrize("clients", [1, 16])
@pytest.mark.benchmark(group="path A vs path B")
def test_path_a_round(benchmark, gateway_path_a, digits_eval, clients, http_helpers):
    _measure_rounds(benchmark, _path_a(gateway_path_a, clients, _rows(digits_eval), http_helpers))


@pytest.mark.parametrize("clients", [1, 16])
@pytest.mark.benchmark(group="path A vs path B")
def test_path_b_round(benchmark, triton_server, digits_eval, clients):
    _measure_rounds(benchmark, _path_b(triton_server, clients, _rows(digits_eval)))


BATCH = 16


@pytest.mark.benchmark(group="batched request (16 rows)")
def test_path_a_batched_request(benchmark, gateway_path_a, digits_eval, http_helpers):
    infer_body, GatewayConnection = http_helpers
    connection = GatewayConnection(gateway_path_a)
    body = infer_body(digits_eval[0][:BATCH])
    benchmark(connection.infer, body)
    connection.close()


@pytest.mark.benchmark(group="batched request (16 rows)")
def test_path_b_batched_request(benchmark, triton_server, digits_eval):
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(triton_server.url)
    x = np.ascontiguousarray(digits_eval[0][:BATCH])
    tensor = triton_http.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    benchmark(client.infer, "digits_full", [tensor])
    client.close()
