"""The GPU workflow (it cannot run here, so it is checked by construction) and the ratio gate's
ability to fail."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "gpu.yml"


def test_gpu_workflow_is_a_valid_github_workflow():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                             "vendor.github-workflows", str(WORKFLOW)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_workflow_does_what_ci_needs():
    import yaml  # shipped with check-jsonschema's dependencies

    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["gpu"]
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])
    steps = {step.get("name", step.get("uses")): step for step in job["steps"]}
    scripts = "\n".join(step.get("run", "") for step in job["steps"])
    assert "pip install -e '.[gpu,test]'" in scripts
    assert "CUDAExecutionProvider" in scripts
    assert "pytest --benchmark-only tests/benchmarks" in scripts and "--benchmark-compare-fail" in scripts
    assert "green-mlops validate --device cuda --gate" in scripts
    assert "--flavour onnxruntime_onnx" in scripts and "docker run" in scripts and "--gpus all" in scripts
    assert "GREEN_MLOPS_TRITON_URL" in scripts
    baseline = steps["Keep this run as the benchmark baseline"]
    assert baseline["if"] == "success()" and "--benchmark-save" in baseline["run"]
    assert "--benchmark-autosave" not in scripts  # a regressed run must never become the baseline
    upload = steps["Upload the report"]
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "always()"


def run_gate(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "benchmarks" / "test_bench_core.py"), "-k", "decision or stage2",
                           *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("delay_us, code, verdict", [(0, 0, "ok    decision / stage 2"),
                                                      (200, 1, "FAIL  decision / stage 2")])
def test_the_ratio_gate_can_fail(delay_us, code, verdict):
    result = run_gate("--inject-decision-delay-us", str(delay_us))
    assert verdict in result.stdout
    assert result.returncode == code, result.stdout[-2000:]
