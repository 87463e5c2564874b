"""Shared fixtures: the embedded model, its ONNX Runtime backend, a fake clock."""
from __future__ import annotations

import pytest

from green_mlops.models import resolve_model
from loadtests.gateway_process import GatewayProcess
from targets.ort_target import OnnxRuntimeTarget


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


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory, digits_spec):
    from targets.triton_repo import RepoOptions, write_repository

    repo = tmp_path_factory.mktemp("triton-repo")
    write_repository(digits_spec, repo, RepoOptions(flavour="python", max_queue_delay_us=2000))
    return repo


@pytest.fixture(scope="session")
def local_triton():
    """Skip, with the reason, where no tritonserver is installed (`green-mlops triton install`)."""
    from targets.errors import BackendError
    from targets.triton_server import find_server

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
    from targets.triton_server import TritonServer

    request.getfixturevalue("local_triton")
    server = TritonServer(request.getfixturevalue("triton_repo"))
    yield server
    server.stop()
