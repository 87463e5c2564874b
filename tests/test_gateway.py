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
            if parameters.get("threshold") is not None:
                # Budget policy (serve's default): a row leaves iff u < the certified path point's
                # threshold; J ≤ τ only sets the level, rounded down to a point of the path, so a row
                # whose J is a hair above τ may still be admitted.
                assert (parameters["u"] < parameters["threshold"]) == (not parameters["admitted"])
            else:
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
    gateway = start_gateway("--policy", "paper", "--skip-action", "reject", "--tau0", "0", "--tau-inf", "0")
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


# Every part of a request, not only its input: a valid request with one to three of its parts
# replaced by hostile values, so that each part (inputs, outputs, parameters, id) is reached and
# checked; plus hostile headers and paths.
def valid_request() -> dict:
    return {"id": "r-1",
            "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64,
                        "parameters": {}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": False}}


REQUEST_PARTS = (("id",), ("inputs",), ("inputs", 0), ("inputs", 0, "name"), ("inputs", 0, "shape"),
                 ("inputs", 0, "datatype"), ("inputs", 0, "data"), ("inputs", 0, "parameters"),
                 ("inputs", 0, "parameters", "binary_data_size"), ("outputs",), ("outputs", 0),
                 ("outputs", 0, "name"), ("outputs", 0, "parameters"), ("outputs", 0, "parameters", "binary_data"),
                 ("parameters",), ("parameters", "binary_data_output"), ("parameters", "priority"))


def replaced(document: dict, changes) -> dict:
    """``document`` with the value at each path replaced (a path no longer there is skipped)."""

    def holds(parent, key) -> bool:
        return (isinstance(parent, dict) and isinstance(key, str)) or (
            isinstance(parent, list) and isinstance(key, int) and key < len(parent))

    for path, value in changes:
        parent = document
        for key in path[:-1]:
            if not holds(parent, key) or (isinstance(parent, dict) and key not in parent):
                break
            parent = parent[key]
        else:
            if holds(parent, path[-1]):
                parent[path[-1]] = value
    return document


hostile_part = st.one_of(json_values, st.sampled_from(["probabilities", "x", "FP32", "BYTES"]),
                         st.lists(st.integers(-2, 70), max_size=5))
whole_request = st.lists(st.tuples(st.sampled_from(REQUEST_PARTS), hostile_part), min_size=1, max_size=3).map(
    lambda changes: replaced(valid_request(), changes))
header_value = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12).map(str.strip)
hostile_headers = st.dictionaries(
    st.sampled_from(["Inference-Header-Content-Length", "Content-Type", "Content-Encoding", "Accept",
                     "Expect", "Connection", "X-Request-Id"]),
    header_value | st.integers(-5, 10**6).map(str), max_size=3)
hostile_path = st.one_of(st.just("/v2/models/digits/infer"),
                         st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=6)
                         .map(lambda v: f"/v2/models/digits/versions/{v}/infer"))


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(whole_request, hostile_headers, hostile_path)
def test_hostile_requests_never_get_a_5xx_in_any_part(bio_client, document, headers, path):
    body = json.dumps(document).encode()
    response = bio_client.post(path, content=body, headers=headers)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert isinstance(response.json()["error"], str) and response.json()["error"]


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
    log = gateway.log_text()
    assert "Traceback" not in log and "ERROR" not in log and log.rstrip().endswith("stopped"), log


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


# --- Hardening: every part of a request, half-sent and oversized bodies, the event loop, the queue


def raw_request(host_port: str, head: bytes, body: bytes = b"", timeout_s: float = 10.0):
    """A socket that sent ``head`` (and ``body``); the caller reads and closes it."""
    import socket

    host, port = host_port.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.sendall(head + body)
    return sock


def read_status(sock) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.update(outputs=[{"name": "probabilities", "parameters": [1]}]), "output 'parameters'"),
        (lambda b: b.update(outputs=[{"name": "probabilities", "parameters": "binary"}]), "output 'parameters'"),
        (lambda b: b.update(outputs=[{"name": "probabilities", "parameters": {"binary_data": "yes"}}]),
         "binary_data"),
        (lambda b: b.update(parameters=[1]), "request 'parameters'"),
        (lambda b: b.update(parameters={"binary_data_output": [True]}), "binary_data_output"),
        (lambda b: b["inputs"][0].update(parameters="x"), "input 'parameters'"),
        (lambda b: b.update(id={"a": 1}), "'id' must be a string"),
        (lambda b: b.update(outputs={"name": "probabilities"}), "list of objects"),
    ],
)
def test_every_request_part_is_checked_with_a_400(gateway_bio, digits_eval, mutate, message):
    body = infer_body(digits_eval[0][:1])
    mutate(body)
    response = httpx.post(f"{gateway_bio.url}/v2/models/digits/infer", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_half_sent_bodies_are_not_in_flight_and_time_out_with_408(start_gateway, digits_eval):
    gateway = start_gateway("--controller", "bio", "--body-timeout-s", "2", "--capacity", "8")
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n")
    stalled = [raw_request(gateway.host_port, head, b'{"inputs": [') for _ in range(8)]
    try:
        time.sleep(0.3)
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            state = client.get("/v2/controller").json()
            assert state["in_flight"] == 0 and state["congestion"] == 0.0
            assert "green_mlops_in_flight 0.0" in client.get("/metrics").text
            response = client.post("/v2/models/digits/infer", json=infer_body(digits_eval[0][:1]))
            assert response.status_code == 200
        statuses = [read_status(sock) for sock in stalled]  # sockets time out after 10 s
    finally:
        for sock in stalled:
            sock.close()
    assert statuses == [408] * 8
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'outcome="body_timeout"} 8.0' in metrics


def test_oversized_body_gets_a_readable_413_even_with_connection_close(gateway_bio):
    import urllib.error
    import urllib.request

    # urllib sends Connection: close: the server must not close on 50 MB of unread body (RST).
    request = urllib.request.Request(f"{gateway_bio.url}/v2/models/digits/infer", data=b" " * (50 << 20),
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert "exceeds 65536 bytes" in json.loads(caught.value.read())["error"]


def test_oversized_declared_body_with_expect_continue_is_refused_before_upload(gateway_bio):
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 9000000\r\n"
            b"Expect: 100-continue\r\n\r\n")
    sock = raw_request(gateway_bio.host_port, head)
    try:
        assert read_status(sock) == 413  # answered at once: no 100 Continue, no body sent
    finally:
        sock.close()


def test_gateway_process_log_never_fills_a_pipe(start_gateway, digits_eval):
    """Each malformed request makes uvicorn log a line; 2,500 of them (> 64 KiB) would fill an
    unread pipe and hang the gateway."""
    gateway = start_gateway("--controller", "off")
    for _ in range(2500):
        sock = raw_request(gateway.host_port, b"NOT HTTP AT ALL\r\n\r\n", timeout_s=5)
        try:
            sock.recv(1024)
        finally:
            sock.close()
    response = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=infer_body(digits_eval[0][:1]), timeout=10)
    assert response.status_code == 200
    assert gateway.log_text().count("Invalid HTTP request") >= 2500


START_IN_MAIN = ("import sys, time; from loadtests.gateway_process import GatewayProcess; "
                 "g = GatewayProcess('--controller', 'off'); print(g.process.pid, g.log_path, flush=True); "
                 "time.sleep(600)")
START_IN_GREENLET = ("from gevent import monkey; monkey.patch_all()\n"  # as Locust starts it
                     "import gevent, time\nfrom loadtests.gateway_process import GatewayProcess\n"
                     "g = gevent.spawn(GatewayProcess, '--controller', 'off').get()\n"
                     "print(g.process.pid, g.log_path, flush=True)\ntime.sleep(600)\n")


@pytest.mark.parametrize("script", [START_IN_MAIN, START_IN_GREENLET], ids=["main-thread", "gevent-greenlet"])
def test_gateway_dies_with_its_parent_even_on_sigkill(script):
    import os
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, log_path = parent.stdout.readline().split(maxsplit=1)
        pid = int(pid_text)
        assert process_alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 60
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_alive(pid):
            from pathlib import Path

            status = Path(f"/proc/{pid}/status").read_text()
            log = Path(log_path.strip()).read_text(errors="replace")[-2000:]
            raise AssertionError(f"the gateway outlived its parent:\n{status}\n{log}")
    finally:
        parent.kill()
        parent.wait()
        if "pid" in locals() and process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# In-process app (no server): where the work runs, and the bounded queue.


class SlowBackend:
    """The digits backend, each full-model call blocking until ``release`` is set."""

    def __init__(self, backend):
        self._backend = backend
        self.provider = backend.provider
        self.n_stages = backend.n_stages
        self.release = threading.Event()
        self.entered = threading.Event()

    def check(self, batch):
        return self._backend.check(batch)

    def full_probabilities(self, batch):
        self.entered.set()
        self.release.wait(30)
        return self._backend.full_probabilities(batch)


def asgi_client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.mark.parametrize("inline_max_body_bytes, serial, on_loop", [
    (0, False, False),  # never inline: the worker pool
    (100, False, False),  # the body (about 1.5 kB) is above the inline limit: the pool
    (64 << 10, False, True),  # a small body while nothing else is in flight: on the loop
    (100, True, False),  # serial on the loop takes small bodies only
    (64 << 10, True, True),
])
def test_decoding_runs_off_the_event_loop(monkeypatch, digits_spec, digits_backend, digits_eval,
                                          inline_max_body_bytes, serial, on_loop):
    """A large body is decoded in the worker pool (json and numpy hold the GIL while they parse);
    a small one at idle, or with serial_on_loop, on the event loop (no thread hand-off)."""
    import asyncio

    import targets.serving.gateway as gateway_module

    threads = []
    decode = gateway_module.decode_infer_request

    def recording_decode(*args, **kwargs):
        threads.append(threading.get_ident())
        return decode(*args, **kwargs)

    monkeypatch.setattr(gateway_module, "decode_infer_request", recording_decode)
    settings = gateway_module.GatewaySettings(inline_max_body_bytes=inline_max_body_bytes, serial_on_loop=serial)
    app = gateway_module.create_app(digits_spec, digits_backend, None, settings)

    async def main():
        async with asgi_client(app) as client:
            response = await client.post("/v2/models/digits/infer", json=infer_body(digits_eval[0][:2]))
            return response.status_code, threading.get_ident()

    status, loop_thread = asyncio.run(main())
    assert status == 200 and threads and (loop_thread in threads) == on_loop


def test_a_full_queue_answers_503_with_retry_after(digits_spec, digits_backend, digits_eval):
    import asyncio

    from targets.serving.gateway import GatewaySettings, create_app

    slow = SlowBackend(digits_backend)
    app = create_app(digits_spec, slow, None, GatewaySettings(max_concurrency=1, max_queue=2))
    body = infer_body(digits_eval[0][:1])

    async def main():
        async with asgi_client(app) as client:
            first = [asyncio.create_task(client.post("/v2/models/digits/infer", json=body)) for _ in range(2)]
            while not slow.entered.is_set():
                await asyncio.sleep(0.01)
            refused = await client.post("/v2/models/digits/infer", json=body)
            slow.release.set()
            answered = [(await task).status_code for task in first]
            metrics = (await client.get("/metrics")).text
            return refused, answered, metrics

    refused, answered, metrics = asyncio.run(main())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "2 requests already queued" in refused.json()["error"]
    assert answered == [200, 200]
    assert 'outcome="overloaded"} 1.0' in metrics


def test_a_client_that_hangs_up_mid_body_is_counted_and_forgotten(start_gateway, digits_eval):
    gateway = start_gateway("--controller", "bio")
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n"
    for _ in range(5):
        raw_request(gateway.host_port, head, b'{"inputs": [').close()
    deadline = time.monotonic() + 10
    while 'outcome="client_gone"} 5.0' not in httpx.get(f"{gateway.url}/metrics").text:
        assert time.monotonic() < deadline, httpx.get(f"{gateway.url}/metrics").text
        time.sleep(0.1)
    assert httpx.get(f"{gateway.url}/v2/controller").json()["in_flight"] == 0
    response = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=infer_body(digits_eval[0][:1]))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "text", "datatype": "BYTES", "shape": [1], "data": ["good"], "parameters": "x"},
         "input 'parameters'"),
        ({"name": "text", "datatype": "BYTES", "shape": [1], "data": ["good"], "parameters": [1]},
         "input 'parameters'"),
        ({"name": "text", "datatype": "BYTES", "shape": [1], "data": [5]}, "list of strings"),
        ({"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a"]}, "holds 1 strings"),
    ],
)
def test_text_input_parts_are_checked_too(entry, message):
    """The BYTES (text) path, with a stand-in tokenizer: no text model needed."""
    from targets.errors import InputError
    from targets.backends.kserve import ProtocolError, decode_infer_request

    def tokenize(texts):
        if not all(isinstance(t, str) for t in texts):
            raise InputError("text input must be a non-empty list of strings")
        return np.zeros((len(texts), 4), dtype=np.int64)

    body = json.dumps({"inputs": [entry]}).encode()
    with pytest.raises(InputError, match=message):
        decode_infer_request(body, None, "input_ids", np.dtype(np.int64), 256, tokenize)
    assert issubclass(ProtocolError, InputError)


def test_sigterm_right_after_the_ready_line_stops_the_gateway():
    """The ready line is printed once uvicorn's own signal handlers are in place: a SIGTERM at
    once drains and exits 0 (it once raised KeyboardInterrupt inside the starting event loop, and
    the gateway hung about one time in six)."""
    import signal
    import subprocess
    import sys

    for _ in range(8):
        process = subprocess.Popen([sys.executable, "-m", "green_mlops.cli", "serve", "--port", "0",
                                    "--energy", "off", "--controller", "off"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert "listening on" in process.stdout.readline()
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=30)
            assert process.returncode == 0 and "stopped" in out, out
        finally:
            process.kill()
            process.communicate()


def test_an_oversized_body_that_arrived_whole_is_answered_at_once(gateway_bio):
    """Over the limit on its last piece: nothing is left to drain, the 413 comes at once."""
    body = b" " * 65600
    head = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(body))
    for _ in range(5):
        sock = raw_request(gateway_bio.host_port, head, body + b"\r\n0\r\n\r\n", timeout_s=5)
        try:
            assert read_status(sock) == 413
        finally:
            sock.close()
