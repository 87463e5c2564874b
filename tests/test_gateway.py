"""The gateway as a real server: uvicorn subprocess on loopback, called by tritonclient and HTTP."""
from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def infer_body(x: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], **extra}


def expected_probabilities(backend, x, stage: int) -> np.ndarray:
    """What the in-process target answers for a row that left the ladder after ``stage``."""
    if stage == backend.n_stages:
        return backend.full_probabilities(x)[0]
    hidden = backend.check(x)
    for index in range(stage):
        probabilities, hidden = backend.stage(index, hidden)
    return probabilities[0]


def test_tritonclient_calls_the_gateway_like_triton(gateway_bio, digits_backend, digits_eval):
    client = triton_http.InferenceServerClient(gateway_bio.host_port)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    x = digits_eval[0]
    for i in range(20):
        for binary in (True, False):
            model_input = triton_http.InferInput("x", [1, 1, 8, 8], "FP32")
            model_input.set_data_from_numpy(x[i : i + 1], binary_data=binary)
            wanted = triton_http.InferRequestedOutput("probabilities", binary_data=binary)
            result = client.infer("digits", [model_input], outputs=[wanted])
            parameters = result.get_response()["parameters"]
            assert parameters["action"] in ("full", "exit")
            assert parameters["admitted"] == (parameters["action"] == "full")
            assert (parameters["j"] <= parameters["tau"]) == parameters["admitted"]
            # Where the row left the ladder: the exit of the last decision, or the final stage.
            assert parameters["stage"] == (digits_backend.n_stages if parameters["admitted"]
                                           else parameters["exit"])
            np.testing.assert_allclose(result.as_numpy("probabilities")[0],
                                       expected_probabilities(digits_backend, x[i : i + 1],
                                                              parameters["stage"]), atol=1e-6)
    client.close()


def test_plain_http_equals_the_in_process_full_model(start_gateway, digits_backend, digits_eval):
    gateway = start_gateway("--controller", "off")
    x = digits_eval[0][:8]
    response = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=infer_body(x, id="r-1"))
    assert response.status_code == 200
    document = response.json()
    assert document["id"] == "r-1" and document["model_name"] == "digits"
    (output,) = document["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [8, 10]
    np.testing.assert_allclose(np.array(output["data"]).reshape(8, 10), digits_backend.predict(x), atol=1e-6)
    assert document["parameters"] == {"admitted": True, "action": "full", "controller": "off"}
    assert httpx.get(f"{gateway.url}/v2/controller").json() == {"controller": "off"}


def test_batch_parameters_are_per_row(gateway_bio, digits_eval):
    x = digits_eval[0][:5]
    document = httpx.post(f"{gateway_bio.url}/v2/models/digits/infer", json=infer_body(x)).json()
    actions = document["parameters"]["action"].split(",")
    assert len(actions) == 5 and set(actions) <= {"full", "exit"}
    assert len(document["parameters"]["tau"].split(",")) == 5
    stages = [int(v) for v in document["parameters"]["stage"].split(",")]
    assert len(stages) == 5 and all(1 <= v <= 4 for v in stages)


def test_controller_state_and_metrics_count_what_was_served(start_gateway, digits_eval):
    gateway = start_gateway("--controller", "bio")
    x = digits_eval[0]
    actions = []
    with httpx.Client(base_url=gateway.url) as client:
        for i in range(30):
            actions.append(client.post("/v2/models/digits/infer",
                                       json=infer_body(x[i : i + 1])).json()["parameters"]["action"])
        assert client.post("/v2/models/nope/infer", json=infer_body(x[:1])).status_code == 404
        assert client.post("/v2/models/digits/infer", content=b"{").status_code == 400
        state = client.get("/v2/controller").json()
        metrics = client.get("/metrics").text
    assert state["controller"] == "bio" and state["decisions"] == 30
    assert state["admitted"] == actions.count("full")
    assert 0 <= state["tau"] <= 1.75
    for action in ("full", "exit"):
        if actions.count(action):
            line = f'green_mlops_requests_total{{action="{action}",model="digits",outcome="ok"}} ' \
                   f'{float(actions.count(action))}'
            assert line in metrics
    assert 'outcome="client_error"' in metrics
    assert "green_mlops_tau " in metrics and "green_mlops_in_flight 0.0" in metrics
    assert "green_mlops_request_latency_seconds_bucket" in metrics


def test_rejected_request_gets_503_with_retry_after(start_gateway, digits_eval):
    gateway = start_gateway("--skip-action", "reject", "--tau0", "0", "--tau-inf", "0")
    response = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=infer_body(digits_eval[0][:1]))
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    document = response.json()
    assert "not admitted" in document["error"]
    assert document["parameters"]["action"] == "reject"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["inputs"][0].update(shape=[1, 1, 8, 9]), "holds 64 values"),
        (lambda b: b["inputs"][0].update(shape=[1, 64], data=[0.0] * 64), "shape must be"),
        (lambda b: b["inputs"][0].update(datatype="FP64"), "datatype must be FP32"),
        (lambda b: b["inputs"][0].update(name="image"), "unknown input"),
        (lambda b: b["inputs"][0].update(data=["a"] * 64), "must be numbers"),
        (lambda b: b["inputs"][0].update(shape=[0, 1, 8, 8], data=[]), "n >= 1"),
        (lambda b: b["inputs"][0].update(shape=[-1, 1, 8, 8]), "integers in"),
        (lambda b: b.update(inputs=[]), "one input"),
        (lambda b: b.pop("inputs"), "one input"),
        (lambda b: b.update(outputs=[{"name": "logits"}]), "unknown output"),
    ],
)
def test_bad_requests_get_400_with_a_message(gateway_bio, digits_eval, mutate, message):
    body = infer_body(digits_eval[0][:1])
    mutate(body)
    response = httpx.post(f"{gateway_bio.url}/v2/models/digits/infer", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_values_get_400(gateway_bio, value):
    text = '{"inputs":[{"name":"x","shape":[1,1,8,8],"datatype":"FP32","data":[%s]}]}' % ",".join(
        [value] + ["0.5"] * 63)
    response = httpx.post(f"{gateway_bio.url}/v2/models/digits/infer", content=text)
    assert response.status_code == 400
    assert "NaN or infinite" in response.json()["error"]


def test_oversized_body_gets_413(gateway_bio):
    response = httpx.post(f"{gateway_bio.url}/v2/models/digits/infer", content=b" " * 70000)
    assert response.status_code == 413
    assert "exceeds 65536 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 4096

    response = httpx.post(f"{gateway_bio.url}/v2/models/digits/infer", content=chunks())
    assert response.status_code == 413


def test_unknown_routes_and_methods_answer_json(gateway_bio):
    for response in (httpx.get(f"{gateway_bio.url}/nope"),
                     httpx.get(f"{gateway_bio.url}/v2/models/digits/infer"),
                     httpx.get(f"{gateway_bio.url}/v2/models/other")):
        assert 400 <= response.status_code < 500
        assert response.json()["error"]


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["x", "X", "", "probabilities"]) | st.text(max_size=4),
        "shape": st.lists(st.integers(-2, 70), max_size=5) | json_values,
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "fp32"]) | json_values,
        "data": st.lists(finite | st.integers(-(2**70), 2**70) | st.text(max_size=2), max_size=70)
        | json_values,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-5, 300) | json_values})
        | json_values,
    },
)
hostile_document = st.fixed_dictionaries(
    {}, optional={"inputs": st.lists(entry, max_size=2) | json_values,
                  "outputs": st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]), json_values),
                                      max_size=2) | json_values,
                  "id": json_values, "parameters": json_values}) | json_values
hostile_body = st.one_of(
    hostile_document.map(lambda d: (json.dumps(d).encode(), None)),
    st.binary(max_size=300).map(lambda b: (b, None)),
    st.tuples(hostile_document.map(lambda d: json.dumps(d).encode()), st.binary(max_size=300),
              st.text("0123456789-x", min_size=1, max_size=6)).map(lambda t: (t[0] + t[1], t[2])),
)


@pytest.fixture(scope="module")
def bio_client(gateway_bio):
    with httpx.Client(base_url=gateway_bio.url, timeout=30) as client:
        yield client


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile_body)
def test_hostile_bodies_never_get_a_5xx(bio_client, body_and_header):
    body, header_length = body_and_header
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    response = bio_client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert response.status_code < 500, response.text
    document = response.json()
    if response.status_code >= 400:
        assert isinstance(document["error"], str) and document["error"]


def test_server_survives_the_hostile_bodies(gateway_bio, digits_eval):
    response = httpx.post(f"{gateway_bio.url}/v2/models/digits/infer", json=infer_body(digits_eval[0][:1]))
    assert response.status_code == 200
    assert httpx.get(f"{gateway_bio.url}/metrics").text.count('outcome="server_error"') == 0


def test_sigterm_drains_in_flight_requests(start_gateway, digits_eval):
    gateway = start_gateway("--controller", "off", "--max-concurrency", "1")
    x = digits_eval[0][:256]  # each request a 256-row batch: slow enough to be in flight
    statuses: list[int] = []
    started = threading.Barrier(9)

    def call():
        with httpx.Client(timeout=30) as client:
            started.wait()
            statuses.append(client.post(f"{gateway.url}/v2/models/digits/infer",
                                        json=infer_body(x)).status_code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)  # requests are queued behind one worker
    assert gateway.stop() == 0
    for t in threads:
        t.join()
    assert statuses == [200] * 8


def test_bind_failure_is_a_clear_error(start_gateway):
    import subprocess
    import sys

    first = start_gateway()
    port = first.host_port.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "green_mlops.cli", "serve", "--port", port],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot listen" in result.stderr and "Traceback" not in result.stderr


def test_energy_windows_feed_the_controller(start_gateway, digits_eval, tmp_path):
    gateway = start_gateway("--energy", "auto", "--energy-window-s", "0.3", "--results", str(tmp_path))
    x = digits_eval[0]
    with httpx.Client(base_url=gateway.url) as client:
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:
            assert client.post("/v2/models/digits/infer", json=infer_body(x[i % 100 : i % 100 + 1])).status_code == 200
            i += 1
        state = client.get("/v2/controller").json()
    assert state["energy_source"].startswith(("measured:", "estimated:"))
    assert state["energy_j_per_request"] > 0 and state["energy_norm"] > 0
    assert gateway.stop() == 0
    windows = [json.loads(line) for line in (tmp_path / "windows.jsonl").read_text().splitlines()]
    assert len(windows) >= 3 and all(w["window"].startswith("serve-") for w in windows)
