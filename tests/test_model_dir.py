"""The model directory contract, the ONNX Runtime adapter and the embedded digits model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from targets.errors import BackendError, InputError, ModelDirError
from targets.model_dir import load_model_dir
from targets.ort_target import OnnxRuntimeTarget


def test_stage1_then_stage2_equals_full(digits_backend, digits_eval):
    x, _ = digits_eval
    _, hidden = digits_backend.stage1(x)
    np.testing.assert_allclose(digits_backend.stage2(hidden), digits_backend.predict(x), atol=1e-5)


def test_embedded_model_meets_its_contract(digits_spec, digits_backend, digits_eval):
    x, y = digits_eval
    meta = digits_spec.meta["build"]
    assert len(x) == digits_spec.meta["eval"]["n"] == meta["split"]["heldout"] >= 850
    assert set(digits_spec.meta["build"]["split"]) >= {"train", "validation", "heldout"}
    accuracy = float((digits_backend.predict(x).argmax(1) == y).mean())
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(meta["accuracy"]["heldout_full"], abs=1e-6)


def test_no_heldout_image_appears_in_training():
    from sklearn.datasets import load_digits  # shipped with scikit-learn, the 'models' extra

    from green_mlops.models import resolve_model

    spec = resolve_model("digits")
    with np.load(spec.eval_path) as data:
        heldout = set(data["source_index"].tolist())
    images = load_digits().images
    split = spec.meta["build"]["split"]
    assert len(heldout) == split["heldout"]
    heldout_bytes = {(images[i] / 16.0).astype(np.float32).tobytes() for i in heldout}
    others = [i for i in range(len(images)) if i not in heldout]
    assert len(others) == split["train"] + split["validation"]
    assert not heldout_bytes & {(images[i] / 16.0).astype(np.float32).tobytes() for i in others}


def test_probabilities_sum_to_one(digits_backend, digits_eval):
    p = digits_backend.predict(digits_eval[0][:16])
    assert p.shape == (16, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_provider_is_the_one_really_used(digits_backend):
    assert digits_backend.provider == "CPUExecutionProvider"
    assert {s.get_providers()[0] for s in (digits_backend._full, digits_backend._stage1)} == {
        "CPUExecutionProvider"}


def test_cuda_demanded_without_cuda_is_a_clear_error(digits_spec):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendError, match="cuda"):
        OnnxRuntimeTarget(digits_spec, device="cuda")


@pytest.mark.gpu
def test_cuda_provider_is_used_when_present(digits_spec, digits_eval):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDA execution provider: install the 'gpu' extra on a machine with a GPU")
    backend = OnnxRuntimeTarget(digits_spec, device="cuda")
    assert backend.provider == "CUDAExecutionProvider"
    np.testing.assert_allclose(backend.predict(digits_eval[0][:32]).sum(1), 1.0, atol=1e-4)


@pytest.mark.parametrize(
    "batch, message",
    [
        (np.zeros((1, 8, 8), np.float32), "shape"),
        (np.zeros((1, 1, 8, 9), np.float32), "shape"),
        (np.zeros((0, 1, 8, 8), np.float32), "n >= 1"),
        (np.zeros((1, 1, 8, 8), np.float64), "dtype"),
        (np.zeros((1, 1, 8, 8), np.int64), "dtype"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), "NaN"),
        (np.full((1, 1, 8, 8), np.inf, np.float32), "infinite"),
        ([[0.0]], "numpy array"),
    ],
)
def test_bad_input_is_a_clear_error(digits_backend, batch, message):
    with pytest.raises(InputError, match=message):
        digits_backend.predict(batch)


@pytest.fixture
def model_copy(tmp_path, digits_spec):
    target = tmp_path / "model"
    shutil.copytree(digits_spec.directory, target)
    return target


def test_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        load_model_dir(tmp_path / "nope")


def test_missing_model_json(tmp_path):
    with pytest.raises(ModelDirError, match="model.json is missing"):
        load_model_dir(tmp_path)


def test_missing_graph_file(model_copy):
    (model_copy / "stage2.onnx").unlink()
    with pytest.raises(ModelDirError, match="stage2.onnx"):
        load_model_dir(model_copy)


def test_malformed_model_json(model_copy):
    (model_copy / "model.json").write_text("{ not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        load_model_dir(model_copy)


def test_model_json_names_that_do_not_match_the_graph(model_copy):
    meta = json.loads((model_copy / "model.json").read_text())
    meta["stage2"]["inputs"] = ["features"]
    (model_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match="model.json says"):
        OnnxRuntimeTarget(load_model_dir(model_copy), device="cpu")


def test_corrupt_graph_file(model_copy):
    (model_copy / "full.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ModelDirError, match="cannot load"):
        OnnxRuntimeTarget(load_model_dir(model_copy), device="cpu")
