"""Bio inside Triton: the controller bundle, the BLS ladder (ONNX Runtime behind ``call``), the
repository's ``<name>_bio`` and a real Triton server answering as the gateway's target does."""
from __future__ import annotations

import ast
import json
import subprocess
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from targets.control.controlled import ControlledTarget, Outcome
from targets.control.controller import ACTION_REJECT, ACTION_SHED, Decision
from targets.control.controller_bundle import BUNDLE_VERSION, controller_bundle, controller_from_bundle
from targets.errors import ConfigError
from targets.serving.triton_bio import CONTROL_MODULES, PARAMETER, PARAMETERS_VERSION, BioModel, ladder_parameters
from targets.serving.triton_repo import RepoOptions, pbtxt_string, triton_model_names, write_repository
from targets.backends.triton_target import parse_metrics
from tests.conftest import settled_budget_controller

ROOT = Path(__file__).resolve().parent.parent


def ort_call(spec):
    """``call`` for BioModel: the repository's model names, answered by ONNX Runtime in-process."""
    names = triton_model_names(spec.name, spec.n_stages)
    sessions = {names[key]: onnxruntime.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
                for key, graph in spec.graphs.items()}
    calls = []

    def call(model, inputs, outputs):
        calls.append((model, len(next(iter(inputs.values())))))
        return sessions[model].run(list(outputs), inputs)

    call.calls = calls
    return call


def bio_model(spec, controller, call=None):
    bundle = json.loads(json.dumps(controller_bundle(controller)))  # as the repository carries it
    parameters = {"version": PARAMETERS_VERSION, "bundle": bundle,
                  "ladder": ladder_parameters(spec, triton_model_names(spec.name, spec.n_stages))}
    return BioModel(parameters, call or ort_call(spec))


def test_bundle_rebuilds_the_same_controller(digits_spec, digits_backend):
    controller = settled_budget_controller(digits_spec, digits_backend)
    rebuilt = controller_from_bundle(json.loads(json.dumps(controller_bundle(controller))))
    assert rebuilt.config == controller.config
    assert rebuilt.budget.calibration == controller.budget.calibration
    assert (rebuilt.budget.spend, rebuilt.budget.overload_action) == ("ceiling", "reject")


def test_bundle_of_the_paper_policy_has_no_path(digits_spec, digits_backend):
    from targets.control.calibration import calibrator
    from targets.control.controller_config import build_config
    from targets.control.make_controller import make_controller

    config = build_config(digits_spec.controller_hints, None, {"policy": "paper"},
                          calibration=calibrator(digits_spec, digits_backend))
    bundle = controller_bundle(make_controller(config, digits_spec, digits_backend))
    assert bundle["path"] is None
    assert controller_from_bundle(bundle).config == config


def test_bundle_refuses_another_version_or_unknown_fields(digits_spec, digits_backend):
    bundle = controller_bundle(settled_budget_controller(digits_spec, digits_backend))
    with pytest.raises(ConfigError, match=f"version 99.*reads version {BUNDLE_VERSION}"):
        controller_from_bundle({**bundle, "version": 99})
    with pytest.raises(ConfigError, match="not understood.*'warp'"):
        controller_from_bundle({**bundle, "config": {**bundle["config"], "warp": 9}})
    with pytest.raises(ConfigError, match="needs its certified path"):
        controller_from_bundle({**bundle, "path": None})
    path = dict(bundle["path"])
    path.pop("ceiling")
    with pytest.raises(ConfigError, match="certified path has fields"):
        controller_from_bundle({**bundle, "path": path})


def test_bio_model_answers_as_the_gateway_target(digits_spec, digits_backend, digits_eval):
    """Every row leaves at the same stage with the same probabilities as in the gateway's
    ControlledTarget, whether the rows come one request each or merged by the batcher."""
    x = digits_eval[0][:96]
    call = ort_call(digits_spec)
    bio = bio_model(digits_spec, settled_budget_controller(digits_spec, digits_backend), call)
    reference = ControlledTarget(digits_backend, settled_budget_controller(digits_spec, digits_backend))
    requests = [x[i : i + 1] for i in range(64)] + [x[64:96]]
    answered = bio.answer(requests)
    expected = [reference.predict(r) for r in requests]
    assert [len(a) for a in answered] == [len(r) for r in requests]
    got = [o for a in answered for o in a]
    want = [o for e in expected for o in e]
    assert [bio.left_after(o) for o in got] == [o.stage for o in want]
    np.testing.assert_allclose(np.stack([o.probabilities for o in got]), np.stack([o.probabilities for o in want]),
                               atol=1e-6)
    stages = np.array([bio.left_after(o) for o in got])
    assert (stages < digits_spec.n_stages).any() and len(set(stages)) > 1  # the ladder exits, at more than one stage
    # One run for all 65 requests: stage 1 once on 96 rows, later stages on the rows that went on.
    assert bio.runs == 1 and call.calls[0] == ("digits_stage1", 96)
    assert [m for m, _ in call.calls] == [f"digits_stage{k}" for k in range(1, len(call.calls) + 1)]
    assert bio.rows_by_stage == [0] + [int((stages == k).sum()) for k in range(1, digits_spec.n_stages + 1)]
    encoded = bio.encode(answered[-1])
    assert encoded["probabilities"].shape == (32, len(digits_spec.classes))
    assert encoded["exit_stage"].ravel().tolist() == [o.stage for o in expected[-1]]
    ceiling = bio.controller.budget.calibration.ceiling
    assert set(encoded["path_index"].ravel().tolist()) == {ceiling}
    assert set(encoded["action"].ravel().tolist()) <= {b"exit", b"full"}


def test_bio_model_groups_requests_by_shape_and_dtype(digits_spec, digits_backend, digits_eval):
    base = ort_call(digits_spec)

    def call(model, inputs, outputs):  # the float64 request is its own group; the stages take float32
        return base(model, {k: v.astype(np.float32) for k, v in inputs.items()}, outputs)

    bio = bio_model(digits_spec, settled_budget_controller(digits_spec, digits_backend), call)
    x = digits_eval[0][:4]
    answered = bio.answer([x[:1], x[1:3].astype(np.float64), x[3:4]])
    assert [len(a) for a in answered] == [1, 2, 1] and bio.runs == 2


def test_refusals_are_errors_naming_the_reason():
    decision = Decision(0.0, 0.5, 0.0, "none", 0.0, 0.5, 0.4, False, ACTION_SHED)
    shed = [Outcome(None, decision, 0)]
    assert "shed by the budget policy" in BioModel.refusal(shed)
    rejected = [Outcome(np.ones(2), None, 2), Outcome(None, replace(decision, action=ACTION_REJECT), 1)]
    assert "rejected by the controller" in BioModel.refusal(rejected)
    assert BioModel.refusal([Outcome(np.ones(2), None, 2)]) is None


def test_bio_model_refuses_settings_of_another_version(digits_spec, digits_backend):
    with pytest.raises(ConfigError, match="triton repo --bio"):
        BioModel({"version": 0}, ort_call(digits_spec))


def test_pbtxt_string_escapes_quotes_backslashes_and_newlines():
    text = 'a "b" \\c\nd'
    literal = pbtxt_string(text)
    assert literal == '"a \\"b\\" \\\\c\\nd"'
    assert ast.literal_eval(literal) == text  # the same C-style escapes protobuf's text format reads


def test_repository_with_bio_layout_and_parameters(tmp_path, digits_spec, digits_backend):
    bundle = controller_bundle(settled_budget_controller(digits_spec, digits_backend))
    written = write_repository(digits_spec, tmp_path, RepoOptions(flavour="onnxruntime_onnx", bio_instance_count=2),
                               bio_bundle=bundle)
    bio_dir = written["bio"]
    assert bio_dir.name == "digits_bio"
    config = (bio_dir / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "count: 2" in config and "kind: KIND_CPU" in config
    for output in ("probabilities", "exit_stage", "path_index", "action"):
        assert f'name: "{output}"' in config
    value = config.split("string_value: ", 1)[1].rsplit("\n  }", 1)[0]
    parameters = json.loads(ast.literal_eval(value))
    assert parameters["version"] == PARAMETERS_VERSION and parameters["bundle"] == json.loads(json.dumps(bundle))
    assert [s["model"] for s in parameters["ladder"]["stages"]] == [f"digits_stage{k}" for k in range(1, 5)]
    assert f'key: "{PARAMETER}"' in config
    source = ROOT / "targets"
    for module in CONTROL_MODULES:  # the same control code as the gateway's, byte for byte
        assert (bio_dir / "1" / "control" / "targets" / f"{module}.py").read_bytes() == (source / f"{module}.py").read_bytes()


def test_control_modules_are_closed_under_their_imports_and_leave_out_the_gateway():
    for module in CONTROL_MODULES:
        tree = ast.parse((ROOT / "targets" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("targets."):
                assert node.module.removeprefix("targets.").replace(".", "/") in CONTROL_MODULES, \
                    f"{module} imports {node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("fastapi", "starlette", "uvicorn") for n in names), module


def test_the_triton_venv_imports_the_bio_model_without_fastapi_or_scipy(local_triton, triton_repo):
    """What a stock Triton's Python backend has (numpy) is enough: no web stack, no scipy."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import targets.serving.triton_bio, targets.control.controller_bundle; "
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'targets.serving.gateway', 'scipy') if m in sys.modules]; "
            "print('loaded', bad)")
    out = subprocess.run([str(local_triton.python), "-c", code, str(triton_repo / "digits_bio" / "1" / "control")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "loaded []"


def _infer_bio(client_module, url: str, x: np.ndarray) -> dict[str, np.ndarray]:
    client = client_module.InferenceServerClient(url)
    tensor = client_module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(x), binary_data=True)
    result = client.infer("digits_bio", [tensor])
    return {name: result.as_numpy(name) for name in ("probabilities", "exit_stage", "path_index", "action")}


def test_real_triton_bio_answers_as_the_gateway_target(triton_server, digits_spec, digits_backend, digits_eval):
    """128 one-row requests from 8 threads: every answer equals the in-process target's at the
    certified ceiling, the dynamic batcher merged requests, the custom metrics count them."""
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(triton_server.url)
    if not client.is_model_ready("digits_bio"):
        pytest.skip("this Triton serves no digits_bio (a server started elsewhere)")
    metrics_url = triton_server.metrics_url

    def bio_metrics():
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        return parse_metrics(text, {"digits_bio"}).get("digits_bio", {}), text

    before, _ = bio_metrics()
    x = digits_eval[0][:128]
    answers: dict[int, dict] = {}

    def work(rows):
        for i in rows:
            answers[i] = _infer_bio(triton_http, triton_server.url, x[i : i + 1])

    threads = [threading.Thread(target=work, args=(range(k, 128, 8),)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = ControlledTarget(digits_backend, settled_budget_controller(digits_spec, digits_backend))
    expected = reference.predict(x)
    stages = [int(answers[i]["exit_stage"][0, 0]) for i in range(128)]
    assert stages == [o.stage for o in expected]
    np.testing.assert_allclose(np.concatenate([answers[i]["probabilities"] for i in range(128)]),
                               np.stack([o.probabilities for o in expected]), atol=1e-5)
    ceiling = reference.controller.budget.calibration.ceiling
    assert {int(answers[i]["path_index"][0, 0]) for i in range(128)} == {ceiling}
    after, text = bio_metrics()
    assert after["nv_inference_count"] - before.get("nv_inference_count", 0) == 128
    assert after["nv_inference_exec_count"] - before.get("nv_inference_exec_count", 0) < 128  # batches formed
    rows = {int(k): float(v) for k, v in
            __import__("re").findall(r'green_mlops_bio_rows\{model="digits_bio",stage="(\d+)"\} (\S+)', text)}
    assert sum(rows.values()) >= 128 and rows.get(0, 0) == 0
    assert 'green_mlops_bio_path_level{model="digits_bio"} 1' in text


def test_locust_reads_a_triton_bio_answer_and_refusal_as_the_gateways():
    from loadtests.answers import outcome_of, parse_answer as _parse

    answer = json.dumps({"model_name": "digits_bio", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 3], "data": [0.1, 0.7, 0.2]},
        {"name": "exit_stage", "datatype": "INT32", "shape": [1, 1], "data": [2]},
        {"name": "path_index", "datatype": "INT32", "shape": [1, 1], "data": [17]},
        {"name": "action", "datatype": "BYTES", "shape": [1, 1], "data": ["exit"]}]}).encode()
    parsed = _parse(answer)
    assert parsed["predicted"] == 1
    assert parsed["parameters"] == {"stage": 2, "action": "exit", "admitted": False, "path_index": 17}
    assert outcome_of(200, parsed, None) == ("answered", None)
    full = json.loads(answer)
    full["outputs"][3]["data"], full["outputs"][2]["data"] = ["full"], [-1]
    assert _parse(json.dumps(full).encode())["parameters"] == {"stage": 2, "action": "full", "admitted": True,
                                                                "path_index": None}
    refused = _parse(json.dumps({"error": "digits_bio: shed by the budget policy: the latency SLO is unmet"}).encode())
    assert refused["parameters"]["action"] == "shed" and outcome_of(503, refused, None) == ("rejected", None)
    other = _parse(json.dumps({"error": "digits_stage2: failed"}).encode())
    assert outcome_of(500, other, None) == ("failed", "HTTP 500: digits_stage2: failed")


def test_load_spec_names_the_backend_on_locusts_command_line(tmp_path):
    from loadtests.runner import LoadSpec, command_for

    command = command_for("bio", tmp_path, LoadSpec(backend="triton"), host="http://127.0.0.1:9")
    assert command[command.index("--backend") + 1] == "triton" and "--host" in command
    assert "--backend" not in command_for("bio", tmp_path, LoadSpec())


def test_validate_refuses_compare_policies_with_triton(tmp_path):
    from tests.test_cli_errors import run_cli

    result = run_cli("validate", "--backend", "triton", "--compare-policies", "--results", str(tmp_path))
    assert result.returncode == 2 and "--compare-policies runs through the gateway only" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_against_triton_runs_bio_inside_triton(local_triton, tmp_path, capsys):
    """The whole job with --backend triton: one server, standard on digits_full and bio on
    digits_bio on one schedule, the records carrying where bio's rows left, the server gone after."""
    from green_mlops.cli import main

    code = main(["validate", "--backend", "triton", "--requests", "200", "--warmup", "20", "--load-s", "10",
                 "--load-phase-s", "3", "--repeats", "1", "--energy", "off", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "digits_full for standard, digits_bio for bio" in out
    load = json.loads((tmp_path / "validate.json").read_text())["load_test"]
    assert load["comparison"]["n_standard"] > 0 and load["comparison"]["n_bio"] > 0
    assert load["offered_load"]["target"] == "Triton digits_full"  # sized on Triton's standard path
    assert "offered load sized to this machine" in out
    assert load["comparison"]["condition_differences"] == []
    for scenario, model in (("standard", "digits_full"), ("bio", "digits_bio")):
        run = json.loads((tmp_path / scenario / "run.json").read_text())
        assert run["backend"] == "triton" and run["served_model"]["name"] == model
        assert run["controller_home"] == ("triton (<model>_bio)" if scenario == "bio" else "none")
    records = [json.loads(line) for line in (tmp_path / "bio" / "requests.jsonl").read_text().splitlines()]
    answered = [r for r in records if r["outcome"] == "answered"]
    assert answered and all(1 <= r["stage"] <= 4 for r in answered)
    assert any(r["stage"] == 1 for r in answered) and any(r["action"] == "exit" for r in answered)
    assert all(r["path_index"] is not None for r in answered)  # the budget policy's point, from inside Triton
    assert (tmp_path / "triton.log").exists() and (tmp_path / "triton-repo" / "digits_bio" / "config.pbtxt").exists()
    for line in (tmp_path / "triton.log").read_text().splitlines():
        assert "Failed to process" not in line


def test_triton_repo_bio_cli_certifies_and_writes_the_serve_controller(tmp_path, capsys):
    """`triton repo --bio`: the controller serve would run (budget policy, adaptive spend unless
    told), certified here and said so; controller flags apply; a bad flag is one line, exit 2."""
    from green_mlops.cli import main

    assert main(["triton", "repo", "--out", str(tmp_path / "a"), "--flavour", "python", "--bio"]) == 0
    err = capsys.readouterr().err
    assert "digits_bio: policy budget, spend adaptive, certified ceiling" in err
    config = (tmp_path / "a" / "digits_bio" / "config.pbtxt").read_text()
    parameters = json.loads(ast.literal_eval(config.split("string_value: ", 1)[1].rsplit("\n  }", 1)[0]))
    assert parameters["bundle"]["spend"] == "adaptive" and parameters["stages_run"] == "inline"
    assert main(["triton", "repo", "--out", str(tmp_path / "b"), "--bio", "--policy", "paper", "--tau-inf", "0.6"]) == 0
    config = (tmp_path / "b" / "digits_bio" / "config.pbtxt").read_text()
    parameters = json.loads(ast.literal_eval(config.split("string_value: ", 1)[1].rsplit("\n  }", 1)[0]))
    assert parameters["bundle"]["path"] is None and parameters["bundle"]["config"]["tau_inf"] == 0.6
    assert parameters["stages_run"] == "bls"  # auto: the onnxruntime_onnx flavour sends sub-batches by BLS
    assert not (tmp_path / "c").exists()
    from tests.test_cli_errors import run_cli

    result = run_cli("triton", "repo", "--out", str(tmp_path / "c"), "--bio", "--spend", "sideways")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_bio_model_stages_on_cuda_answer_as_on_the_cpu(digits_spec, digits_backend, digits_eval):
    """GPU: the bio model's stage graphs on ONNX Runtime's CUDA provider (what `--bio-stages inline`
    takes with `--instance-kind gpu`) leave every row at the same stage as on the CPU."""
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA execution provider: install the 'gpu' extra on a machine with a GPU")
    names = triton_model_names(digits_spec.name, digits_spec.n_stages)
    sessions = {names[key]: onnxruntime.InferenceSession(str(graph.path), providers=["CUDAExecutionProvider"])
                for key, graph in digits_spec.graphs.items()}
    assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions.values())

    def cuda_call(model, inputs, outputs):
        return sessions[model].run(list(outputs), inputs)

    x = digits_eval[0][:128]
    gpu = bio_model(digits_spec, settled_budget_controller(digits_spec, digits_backend), cuda_call)
    cpu = bio_model(digits_spec, settled_budget_controller(digits_spec, digits_backend))
    on_gpu, on_cpu = gpu.answer([x])[0], cpu.answer([x])[0]
    assert [gpu.left_after(o) for o in on_gpu] == [cpu.left_after(o) for o in on_cpu]
    np.testing.assert_allclose(np.stack([o.probabilities for o in on_gpu]),
                               np.stack([o.probabilities for o in on_cpu]), atol=1e-4)
