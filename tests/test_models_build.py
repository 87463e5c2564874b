"""`green-mlops models build`: a quick build (few epochs) honours the model directory contract."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="building models needs the 'models' extra (torch)")
pytest.importorskip("sklearn", reason="building models needs the 'models' extra (scikit-learn)")

from green_mlops.cli import main  # noqa: E402
from targets.model_dir import load_model_dir  # noqa: E402
from targets.ort_target import OnnxRuntimeTarget  # noqa: E402


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    from green_mlops.models.build_digits import build

    build(out, log=lambda line: None, epochs=2)
    return out


def test_quick_build_honours_the_contract(quick_model):
    spec = load_model_dir(quick_model)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, y = spec.load_eval()
    _, hidden = backend.stage1(x)
    np.testing.assert_allclose(backend.stage2(hidden), backend.predict(x), atol=1e-5)
    assert spec.meta["build"]["epochs"] == 2
    assert 0.0 <= spec.controller_hints["uncertainty_skip_below"] <= 1.0
    split = spec.meta["build"]["split"]
    assert split["train"] + split["validation"] + split["heldout"] + split[
        "heldout_duplicates_dropped"] == 1797


def test_stage2_is_most_of_the_compute(quick_model):
    import onnx

    def conv_macs(path):
        graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
        weights = {w.name: w.dims for w in graph.initializer}
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
        total = 0
        for node in graph.node:
            if node.op_type == "Conv":
                out_hw = shapes[node.output[0]][2:]
                total += int(np.prod(weights[node.input[1]])) * int(np.prod(out_hw))
        return total

    stage1, stage2 = conv_macs(quick_model / "stage1.onnx"), conv_macs(quick_model / "stage2.onnx")
    assert stage2 / (stage1 + stage2) >= 0.75


def test_build_command_writes_to_out(tmp_path, monkeypatch):
    import green_mlops.models.build_digits as build_digits

    calls = []
    monkeypatch.setattr(build_digits, "build", lambda out, log: calls.append(out))
    assert main(["models", "build", "digits", "--out", str(tmp_path / "m")]) == 0
    assert calls == [tmp_path / "m"]
