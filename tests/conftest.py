"""Shared fixtures: the embedded model, its ONNX Runtime backend, a fake clock."""
from __future__ import annotations

import signal

import pytest

from green_mlops.models import resolve_model
from loadtests.gateway_process import GatewayProcess
from targets.backends.ort_target import OnnxRuntimeTarget


def pytest_configure(config):
    """Ctrl-C reaches the processes the tests start as it would in a terminal. A session started as
    a background job of a non-interactive shell inherits SIGINT (and SIGQUIT) ignored, as POSIX
    asks; every child would inherit that too, and Python installs no KeyboardInterrupt handler
    where SIGINT is ignored at start, so no Ctrl-C test could pass (seen: SigIgn 0x1001007 in the
    child of a backgrounded run). Child processes start with the disposition this sets."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def digits_spec():
    return resolve_model("digits")


@pytest.fixture(scope="session")
def digits_backend(digits_spec):
    return OnnxRuntimeTarget(digits_spec, device="cpu")


@pytest.fixture(scope="session")
def digits_eval(digits_spec):
    return digits_spec.load_eval()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now_s: float = 100.0):
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock():
    return FakeClock()


Gateway = GatewayProcess  # the name the tests use


@pytest.fixture
def start_gateway():
    """Start gateways with the given CLI arguments; all are stopped at the end of the test."""
    started: list[Gateway] = []

    def start(*args: str) -> Gateway:
        gateway = Gateway(*args)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def gateway_bio():
    gateway = Gateway("--controller", "bio", "--max-body-bytes", "65536")
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def gateway_off():
    gateway = Gateway("--controller", "off", "--max-concurrency", "1")
    yield gateway
    gateway.stop()


def settled_budget_controller(spec, backend, **overrides):
    """The budget policy certified on ``spec``'s validation split, resting at its ceiling, with τ(t)
    decayed at once (k = 10⁶/s): every decision at the ceiling thresholds, from the first request."""
    from targets.control.calibration import calibrator
    from targets.control.controller_config import build_config
    from targets.control.make_controller import make_controller

    flags = {"policy": "budget", "spend": "ceiling", "k_per_s": 1e6, **overrides}
    config = build_config(spec.controller_hints, None, flags, calibration=calibrator(spec, backend))
    return make_controller(config, spec, backend)


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory, digits_spec, digits_backend):
    """The python-flavour repository of digits, with ``digits_bio`` (a settled budget controller)."""
    from targets.control.controller_bundle import controller_bundle
    from targets.serving.triton_repo import RepoOptions, write_repository

    repo = tmp_path_factory.mktemp("triton-repo")
    bundle = controller_bundle(settled_budget_controller(digits_spec, digits_backend))
    write_repository(digits_spec, repo, RepoOptions(flavour="python", max_queue_delay_us=2000), bio_bundle=bundle)
    return repo


@pytest.fixture(scope="session")
def local_triton():
    """Skip, with the reason, where no tritonserver is installed (`green-mlops triton install`)."""
    from targets.errors import BackendError
    from targets.backends.triton_server import find_server

    try:
        return find_server()
    except BackendError as exc:
        pytest.skip(str(exc))


class ExternalTriton:
    """A Triton someone else started (GPU CI: the NGC container), named by the environment."""

    def __init__(self, url: str, metrics_url: str | None):
        self.url, self.metrics_url = url, metrics_url


@pytest.fixture(scope="session")
def triton_server(request):
    """A real Triton: the one $GREEN_MLOPS_TRITON_URL names, else one started on loopback for
    the whole session from the python-flavour repository."""
    import os

    if os.environ.get("GREEN_MLOPS_TRITON_URL"):
        yield ExternalTriton(os.environ["GREEN_MLOPS_TRITON_URL"], os.environ.get("GREEN_MLOPS_TRITON_METRICS_URL"))
        return
    from targets.backends.triton_server import TritonServer

    request.getfixturevalue("local_triton")
    server = TritonServer(request.getfixturevalue("triton_repo"))
    yield server
    server.stop()


class FakeTriton:
    """A misbehaving Triton on loopback, in a thread: every model is ready, configs say
    ``max_batch_size``, and every infer call fails the way ``mode`` says (a fault to inject):
    ``error`` (Triton's JSON error, HTTP 500), ``garbage`` (200, not JSON), ``no_outputs``
    (200, a valid answer without outputs), ``reset`` (the connection is dropped), ``cycle``
    (each of those in turn). ``infers`` counts the calls."""

    MODES = ("error", "garbage", "no_outputs", "reset")

    def __init__(self, max_batch_size: int = 8, mode: str = "cycle", hang_s: float = 30.0):
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.mode, self.infers = mode, 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/ready") or self.path.startswith("/v2/health"):
                    self._send(200, b"")
                elif self.path.endswith("/config"):
                    name = self.path.split("/")[3]
                    self._send(200, json.dumps({"name": name, "max_batch_size": max_batch_size}).encode())
                else:
                    self._send(404, b'{"error":"not found"}')

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with fake._lock:
                    n, fake.infers = fake.infers, fake.infers + 1
                mode = fake.MODES[n % len(fake.MODES)] if fake.mode == "cycle" else fake.mode
                if mode == "hang":
                    time.sleep(hang_s)
                    self._send(500, b'{"error":"too late"}')
                elif mode == "error":
                    self._send(500, b'{"error":"injected fault: model crashed"}')
                elif mode == "garbage":
                    self._send(200, b"\x00not json at all\xff")
                elif mode == "no_outputs":
                    self._send(200, json.dumps({"model_name": "x", "outputs": []}).encode())
                else:  # reset: drop the connection without an answer
                    self.close_connection = True
                    self.connection.shutdown(2)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-triton", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def fake_triton():
    servers: list[FakeTriton] = []

    def start(**kwargs) -> FakeTriton:
        servers.append(FakeTriton(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
