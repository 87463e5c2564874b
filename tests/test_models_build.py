"""`green-mlops models build`: a quick build (few epochs) honours the model directory contract."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="building models needs the 'models' extra (torch)")
pytest.importorskip("sklearn", reason="building models needs the 'models' extra (scikit-learn)")

from green_mlops.cli import main  # noqa: E402
from targets.model.model_dir import load_model_dir  # noqa: E402
from targets.backends.ort_target import OnnxRuntimeTarget  # noqa: E402


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
    assert spec.n_stages == 4 and spec.n_exits == 3
    xv, yv = spec.load_validation()
    assert len(xv) == spec.meta["build"]["split"]["validation"] == len(yv)
    assert len(spec.meta["build"]["accuracy"]["heldout_per_stage"]) == 4
    split = spec.meta["build"]["split"]
    assert split["train"] + split["validation"] + split["heldout"] + split[
        "heldout_duplicates_dropped"] == 1797


def test_each_rung_of_the_ladder_is_cheap_beside_the_rest(quick_model):
    """Stage 1 costs a small fraction of the network, so leaving there saves most of it; each
    later stage is a similar slice, so leaving at exit 2 or 3 still saves."""
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

    macs = [conv_macs(quick_model / f"stage{k}.onnx") for k in range(1, 5)]
    full = conv_macs(quick_model / "full.onnx")
    assert sum(macs) == full
    assert macs[0] / full <= 0.1
    assert all(0.2 <= m / full <= 0.4 for m in macs[1:])  # 23 %, 37 %, 37 % in the embedded build


def test_build_command_writes_to_out(tmp_path, monkeypatch):
    import green_mlops.models.build_digits as build_digits

    calls = []
    monkeypatch.setattr(build_digits, "build", lambda out, log, split_seed: calls.append((out, split_seed)))
    assert main(["models", "build", "digits", "--out", str(tmp_path / "m")]) == 0
    assert main(["models", "build", "digits", "--out", str(tmp_path / "n"), "--split-seed", "20261202"]) == 0
    assert calls == [(tmp_path / "m", None), (tmp_path / "n", 20261202)]


@pytest.mark.parametrize("seed", ["-1", "x", str(2**32)])
def test_a_bad_split_seed_exits_2(seed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "build", "digits", "--split-seed", seed])
    assert exit_info.value.code == 2 and "--split-seed" in capsys.readouterr().err


def test_the_split_seed_draws_the_split_and_the_digest_names_the_heldout_rows():
    """Two split seeds hold out different images; the same seed the same ones; the training seed
    is apart (the split does not read it)."""
    from sklearn.datasets import load_digits

    from green_mlops.models.build_digits import _split
    from targets.model.model_dir import heldout_digest

    digits = load_digits()
    images, labels = digits.images, digits.target
    a = _split(len(labels), labels, images, 0)
    b = _split(len(labels), labels, images, 20261202)
    again = _split(len(labels), labels, images, 20261202)
    assert heldout_digest(a[2]) != heldout_digest(b[2]) == heldout_digest(again[2])
    for train, val, test, _ in (a, b):
        assert not set(train) & set(test) and not set(val) & set(test) and not set(train) & set(val)


def test_the_quick_build_records_its_split(quick_model):
    from targets.model.model_dir import heldout_digest

    from green_mlops.models.build_digits import SPLIT_SEED

    spec = load_model_dir(quick_model)
    assert spec.split_seed == spec.meta["build"]["split_seed"] == SPLIT_SEED
    with np.load(spec.eval_path) as data:
        assert spec.heldout_digest == heldout_digest(data["source_index"])
