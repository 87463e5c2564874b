"""Path B: the Triton repository, a real Triton server, the adapter, and the gateway in front."""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import httpx
import numpy as np
import onnxruntime
import pytest

from targets.errors import BackendError
from targets.serving.triton_repo import RepoOptions, config_pbtxt, triton_model_names, write_repository
from targets.backends.triton_target import FallbackBackend, TritonTarget, parse_metrics


def parsed_config(text: str) -> dict:
    """The fields of a config.pbtxt that must match the ONNX signature."""
    tensors = re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', text)
    return {
        "tensors": [(n, t, [int(d) for d in dims.split(",")]) for n, t, dims in tensors],
        "max_batch_size": int(re.search(r"max_batch_size: (\d+)", text).group(1)),
        "preferred": re.search(r"preferred_batch_size: \[ ([^\]]*) \]", text).group(1),
        "delay": int(re.search(r"max_queue_delay_microseconds: (\d+)", text).group(1)),
        "kind": re.search(r"kind: (\w+)", text).group(1),
    }


@pytest.mark.parametrize("key", ["full", "stage1", "stage2", "stage3", "stage4"])
def test_onnxruntime_config_matches_the_onnx_signature(digits_spec, key):
    graph = digits_spec.graphs[key]
    options = RepoOptions(flavour="onnxruntime_onnx", max_batch_size=32, preferred_batch_sizes=(2, 8),
                          max_queue_delay_us=100, instance_kind="gpu", instance_count=2)
    text = config_pbtxt(f"digits_{key}", graph, options)
    assert 'platform: "onnxruntime_onnx"' in text and "count: 2" in text
    config = parsed_config(text)
    session = onnxruntime.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    expected = [(v.name, "TYPE_FP32", list(v.shape[1:])) for v in [*session.get_inputs(), *session.get_outputs()]]
    assert config["tensors"] == expected
    assert config["max_batch_size"] == 32 and config["preferred"] == "2, 8" and config["delay"] == 100
    assert config["kind"] == "KIND_GPU"


def test_repository_layout(tmp_path, digits_spec):
    written = write_repository(digits_spec, tmp_path, RepoOptions(flavour="python"))
    assert {p.name for p in written.values()} == set(triton_model_names("digits", digits_spec.n_stages).values())
    assert len(written) == 1 + digits_spec.n_stages  # one Triton model per stage, and the full one
    for model_dir in written.values():
        assert (model_dir / "config.pbtxt").exists() and (model_dir / "1" / "model.onnx").exists()
        assert (model_dir / "1" / "model.py").exists()
        assert 'backend: "python"' in (model_dir / "config.pbtxt").read_text()


def test_repository_refuses_a_name_that_is_not_one_path_segment(tmp_path, digits_spec):
    from dataclasses import replace

    from targets.errors import GreenMLOpsError, ModelDirError

    with pytest.raises(ModelDirError, match="cannot name a Triton model.*no '/'"):
        write_repository(replace(digits_spec, name="team/bc"), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(GreenMLOpsError, match="is a file"):
        write_repository(digits_spec, tmp_path / "file")


def test_repository_cli_validates_the_model_directory(tmp_path, digits_spec, capsys):
    """`triton repo` loads the model through the one validation: a broken directory is refused."""
    import json
    import shutil

    from green_mlops.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(digits_spec.directory, broken)
    meta = json.loads((broken / "model.json").read_text())
    meta["classes"] = meta["classes"][:5]
    (broken / "model.json").write_text(json.dumps(meta))
    code = main(["triton", "repo", "--model", str(broken), "--out", str(tmp_path / "repo")])
    assert code != 0 and "'classes' has 5 entries" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_bad_repository_options():
    from targets.errors import GreenMLOpsError

    with pytest.raises(GreenMLOpsError, match="preferred batch sizes"):
        RepoOptions(max_batch_size=8, preferred_batch_sizes=(16,))
    with pytest.raises(GreenMLOpsError, match="flavour"):
        RepoOptions(flavour="tensorrt")


def test_triton_answers_equal_onnxruntime(triton_server, digits_spec, digits_backend, digits_eval):
    triton = TritonTarget(digits_spec, triton_server.url)
    x = digits_eval[0][:64]
    np.testing.assert_allclose(triton.full_probabilities(x), digits_backend.full_probabilities(x), atol=1e-5)
    exit_t, hidden_t = triton.stage1(x)
    exit_o, hidden_o = digits_backend.stage1(x)
    np.testing.assert_allclose(exit_t, exit_o, atol=1e-5)
    np.testing.assert_allclose(hidden_t, hidden_o, atol=1e-5)
    np.testing.assert_allclose(triton.stage2(hidden_t), digits_backend.stage2(hidden_o), atol=1e-5)
    assert triton.provider.startswith("triton:")


def test_dynamic_batching_batches_under_concurrency(triton_server, digits_spec, digits_eval):
    metrics_url = triton_server.metrics_url
    if metrics_url is None:
        pytest.skip("no Triton metrics URL ($GREEN_MLOPS_TRITON_METRICS_URL)")
    triton = TritonTarget(digits_spec, triton_server.url, metrics_url)
    before = triton.queue_metrics().get("digits_full", {})
    rows = [digits_eval[0][i : i + 1] for i in range(256)]

    def work(part):
        for row in part:
            triton.full_probabilities(row)

    threads = [threading.Thread(target=work, args=(rows[i::16],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = triton.queue_metrics()["digits_full"]
    inferences = after["nv_inference_count"] - before.get("nv_inference_count", 0)
    executions = after["nv_inference_exec_count"] - before.get("nv_inference_exec_count", 0)
    assert inferences == 256
    assert executions < inferences  # requests were batched together
    assert after["nv_inference_queue_duration_us"] > 0


def test_unreachable_triton_is_a_clear_error_within_the_timeout(digits_spec):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(BackendError, match="unreachable"):
        TritonTarget(digits_spec, f"127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - started < 5


def test_metrics_parsing_and_congestion(digits_spec):
    text = "\n".join([
        '# HELP nv_inference_count Number of inferences',
        'nv_inference_count{model="digits_full",version="1"} 12',
        'nv_inference_exec_count{model="digits_full",version="1"} 4',
        'nv_inference_queue_duration_us{model="digits_full",version="1"} 5000',
        'nv_inference_pending_request_count{model="digits_full",version="1"} 3',
        'nv_inference_count{model="other",version="1"} 99',
    ])
    metrics = parse_metrics(text, {"digits_full"})
    assert metrics == {"digits_full": {"nv_inference_count": 12, "nv_inference_exec_count": 4,
                                       "nv_inference_queue_duration_us": 5000,
                                       "nv_inference_pending_request_count": 3}}


def test_gateway_routes_to_triton(triton_server, start_gateway, digits_backend, digits_eval):
    metrics = ("--triton-metrics-url", triton_server.metrics_url) if triton_server.metrics_url else ()
    gateway = start_gateway("--backend", "triton", "--triton-url", triton_server.url, "--controller", "off", *metrics)
    x = digits_eval[0][:4]
    body = {"inputs": [{"name": "x", "shape": [4, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    document = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=body).json()
    np.testing.assert_allclose(np.array(document["outputs"][0]["data"]).reshape(4, 10),
                               digits_backend.predict(x), atol=1e-5)
    metadata = httpx.get(f"{gateway.url}/v2/models/digits").json()
    assert metadata["parameters"]["provider"].startswith("triton:") and metadata["platform"] == "green-mlops/triton"


def test_gateway_answers_503_or_falls_back_when_triton_dies(local_triton, triton_repo, start_gateway, digits_eval):
    from targets.backends.triton_server import TritonServer

    server = TritonServer(triton_repo)
    plain = start_gateway("--backend", "triton", "--triton-url", server.url, "--triton-timeout-s", "1")
    fallback = start_gateway("--backend", "triton", "--triton-url", server.url, "--triton-timeout-s", "1",
                             "--triton-fallback")
    server.stop()
    x = digits_eval[0][:1]
    body = {"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    started = time.monotonic()
    response = httpx.post(f"{plain.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 503 and "backend unavailable" in response.json()["error"]
    assert response.headers["retry-after"]
    assert time.monotonic() - started < 10
    response = httpx.post(f"{fallback.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200


def test_serve_against_a_missing_triton_is_a_clear_error():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "green_mlops.cli", "serve", "--backend", "triton",
                             "--triton-url", "127.0.0.1:1", "--triton-timeout-s", "1", "--energy", "off"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_fallback_backend_counts_fallbacks(digits_backend, digits_eval):
    class Dead:
        provider = "dead"

        def check(self, batch):
            return digits_backend.check(batch)

        def full_probabilities(self, batch):
            raise BackendError("down")

    backend = FallbackBackend(Dead(), digits_backend)
    x = digits_eval[0][:2]
    np.testing.assert_allclose(backend.full_probabilities(x), digits_backend.full_probabilities(x))
    assert backend.fallbacks == 1


def test_triton_up_checks_the_repository(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "green_mlops.cli", "triton", "up", "--repo", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not a Triton model repository" in result.stderr


def test_triton_up_serves_until_sigterm(local_triton, triton_repo):
    import signal
    import socket
    import subprocess
    import sys

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    process = subprocess.Popen([sys.executable, "-m", "green_mlops.cli", "triton", "up", "--repo", str(triton_repo),
                                "--http-port", str(ports[0]), "--metrics-port", str(ports[1])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert f"http://127.0.0.1:{ports[0]}" in line
    assert httpx.get(f"http://127.0.0.1:{ports[0]}/v2/models/digits_full/ready").status_code == 200
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and "tritonserver stopped" in out


# --- Hardening: the batch limit, no orphan server, the install message


def test_batch_above_max_batch_size_is_a_400_naming_the_limit(fake_triton, start_gateway, digits_eval):
    triton = fake_triton(max_batch_size=4)
    gateway = start_gateway("--backend", "triton", "--triton-url", triton.url, "--controller", "off",
                            "--triton-timeout-s", "2")
    x = digits_eval[0][:5]
    body = {"inputs": [{"name": "x", "shape": [5, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 400 and "retry-after" not in response.headers
    assert "max_batch_size of 4" in response.json()["error"]
    assert triton.infers == 0  # refused at the edge, never sent


def test_real_triton_batch_above_its_limit_is_a_400(triton_server, start_gateway, digits_eval):
    gateway = start_gateway("--backend", "triton", "--triton-url", triton_server.url, "--controller", "off")
    x = digits_eval[0][:65]  # the repository's max_batch_size is 64
    body = {"inputs": [{"name": "x", "shape": [65, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    response = httpx.post(f"{gateway.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 400 and "max_batch_size of 64" in response.json()["error"]
    body["inputs"][0].update(shape=[64, 1, 8, 8], data=x[:64].ravel().tolist())
    assert httpx.post(f"{gateway.url}/v2/models/digits/infer", json=body, timeout=30).status_code == 200


def children_named(pid: int, name: str) -> list[int]:
    """Live processes called ``name`` whose parent is ``pid``."""
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if comm == name and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_triton_up(triton_repo):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "green_mlops.cli", "triton", "up", "--repo", str(triton_repo),
                             "--http-port", "0", "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_server_child(process, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = children_named(process.pid, "tritonserver")
        if found:
            return found[0]
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    raise AssertionError("tritonserver never started")


@pytest.mark.parametrize("sig_name", ["SIGINT", "SIGTERM"])
def test_interrupting_triton_up_while_it_starts_leaves_no_server(local_triton, triton_repo, sig_name):
    import signal
    import subprocess

    from tests.processes import signal_masks

    process = start_triton_up(triton_repo)
    server = None
    try:
        server = wait_for_server_child(process)
        masks = signal_masks(process.pid)
        process.send_signal(getattr(signal, sig_name))  # Triton needs seconds to load three models
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"triton up ignored {sig_name} for 60 s; its signal masks then: {masks}") from None
        if "tritonserver ready" not in out:
            assert process.returncode == 130 and "interrupted" in err
        deadline = time.monotonic() + 30
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(server), "tritonserver was orphaned"
    finally:
        process.kill()
        process.communicate()
        if server is not None and alive(server):
            os.kill(server, signal.SIGKILL)


def test_killing_triton_up_leaves_no_server(local_triton, triton_repo):
    import signal

    process = start_triton_up(triton_repo)
    server = None
    try:
        assert "tritonserver ready" in process.stdout.readline()
        server = wait_for_server_child(process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
        deadline = time.monotonic() + 30
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(server), "tritonserver outlived a SIGKILLed parent"
    finally:
        process.kill()
        process.communicate()
        if server is not None and alive(server):
            os.kill(server, signal.SIGKILL)


def test_install_says_when_everything_is_already_installed(local_triton, tmp_path):
    from targets.backends.triton_server import install_venv, installed, triton_venv

    if not installed(triton_venv()):
        pytest.skip("the Triton venv is not complete here")
    lines: list[str] = []
    assert install_venv(triton_venv(), log=lines.append) == triton_venv()
    assert len(lines) == 1 and "already installed" in lines[0] and "400 MB" not in lines[0]
    # A venv without nvidia-pytriton is not "installed".
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    assert not installed(tmp_path)
