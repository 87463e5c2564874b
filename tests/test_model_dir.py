"""The model directory contract (two stages or a ladder), its validation at load, the ONNX Runtime
adapter and the embedded digits model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from targets.errors import BackendError, InputError, ModelDirError
from targets.model.model_dir import load_model_dir
from targets.backends.ort_target import OnnxRuntimeTarget


def test_stage1_then_stage2_equals_full(digits_backend, digits_eval):
    x, _ = digits_eval
    _, hidden = digits_backend.stage1(x)
    np.testing.assert_allclose(digits_backend.stage2(hidden), digits_backend.predict(x), atol=1e-5)


def test_embedded_model_meets_its_contract(digits_spec, digits_backend, digits_eval):
    x, y = digits_eval
    meta = digits_spec.meta["build"]
    assert len(x) == digits_spec.meta["eval"]["n"] == meta["split"]["heldout"] >= 500
    assert set(digits_spec.meta["build"]["split"]) >= {"train", "validation", "heldout"}
    accuracy = float((digits_backend.predict(x).argmax(1) == y).mean())
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(meta["accuracy"]["heldout_per_stage"][-1], abs=1e-6)
    assert digits_spec.n_exits >= 3 and digits_spec.validation_path is not None
    total_bytes = sum(f.stat().st_size for f in digits_spec.directory.iterdir() if f.is_file())
    assert total_bytes < 9_000_000


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
    assert {s.get_providers()[0] for s in (digits_backend._full, *digits_backend._stages)} == {
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
    meta["stages"][1]["inputs"] = ["features"]
    (model_copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelDirError, match=r"'stages\[1\].inputs' lists \['features'\] but stage2.onnx"):
        load_model_dir(model_copy)


def test_corrupt_graph_file(model_copy):
    (model_copy / "full.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(ModelDirError, match="cannot load"):
        load_model_dir(model_copy)


# --- a user's own model directory: the 12 contract mistakes of issue #13, each one line ---------
from tests.model_factory import edit_json, make_model_dir  # noqa: E402


@pytest.fixture
def tiny(tmp_path):
    return make_model_dir(tmp_path / "tiny")


def one_line_error(directory, match: str, file: str = "model.json") -> str:
    with pytest.raises(ModelDirError) as caught:
        load_model_dir(directory)
    message = str(caught.value)
    assert "\n" not in message and file in message, message
    assert __import__("re").search(match, message), message
    return message


def test_two_stage_directory_loads_and_answers_unchanged(tiny):
    from targets.control.controlled import ControlledTarget
    from targets.control.controller import BioController
    from targets.control.controller_config import build_config

    spec = load_model_dir(tiny)
    assert spec.n_stages == 2 and spec.stage1.inputs == ("x",)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, y = spec.load_eval()
    np.testing.assert_allclose(backend.stage2(backend.stage1(x)[1]), backend.predict(x), atol=1e-5)
    config = build_config(spec.controller_hints, None, {"k_per_s": 1e9})
    assert config.tau_inf == pytest.approx(0.7) and config.exit_tau_inf is None
    outcomes = ControlledTarget(backend, BioController(config)).predict(x)
    assert {o.stage for o in outcomes} <= {1, 2}
    assert all(o.decision.exit_index == 1 for o in outcomes)


def test_stage_outputs_in_the_other_graph_order_are_taken_by_name(tmp_path):
    """Graph order (hidden, exit_logits), model.json in role order: answers are still right."""
    directory = make_model_dir(tmp_path / "swapped", swap_stage_outputs=True)
    spec = load_model_dir(directory)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, _ = spec.load_eval()
    exit_p, hidden = backend.stage1(x)
    assert exit_p.shape == (len(x), 2) and hidden.shape == (len(x), 3)
    np.testing.assert_allclose(exit_p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(backend.stage2(hidden), backend.predict(x), atol=1e-5)


def test_outputs_listed_out_of_role_order(tiny):
    edit_json(tiny, lambda m: m["stage1"].update(outputs=["hidden", "exit_logits"]))
    one_line_error(tiny, r"'stage1.outputs' lists \['hidden', 'exit_logits'\] but roles go \(exit logits")


def test_hidden_width_differs_from_the_next_stage_input(tmp_path):
    directory = make_model_dir(tmp_path / "m", next_input_width=5)
    one_line_error(directory, r"'stage2.inputs' .*stage2.onnx.*\[-1, 5\].*stage1.onnx.*\[-1, 3\].*hidden widths")


def test_input_dtype_differs_from_the_graph(tiny):
    edit_json(tiny, lambda m: m["input"].update(dtype="float64"))
    one_line_error(tiny, r"'input.dtype' is float64 but full.onnx takes 'x' as float32")


def test_input_name_differs_from_the_graph(tiny):
    edit_json(tiny, lambda m: m["input"].update(name="features"))
    one_line_error(tiny, r"'input.name' is 'features' but full.onnx takes 'x'")


def test_classes_differ_from_the_output_width(tiny):
    edit_json(tiny, lambda m: m.update(classes=["a", "b", "c"]))
    one_line_error(tiny, r"'classes' has 3 entries but .* has 2 columns")


def test_input_shape_disagrees_with_the_graph(tiny):
    edit_json(tiny, lambda m: m["input"].update(shape=[-1, 5]))
    one_line_error(tiny, r"'input.shape' is \[-1, 5\] but full.onnx takes 'x' as \[-1, 4\]")


@pytest.mark.parametrize("labels, match", [
    (np.full(64, 0.5), "fractional"),
    (np.full(64, 2), r"range over \[2, 2\].* 2 entries"),
    (np.full(64, -1), r"range over \[-1, -1\]"),
])
def test_bad_labels(tiny, labels, match):
    with np.load(tiny / "eval.npz") as data:
        x = data["x"]
    np.savez(tiny / "eval.npz", x=x, y=labels)
    one_line_error(tiny, match, file="eval.npz")


def test_eval_inputs_of_the_wrong_width(tiny):
    np.savez(tiny / "eval.npz", x=np.zeros((64, 5), np.float32), y=np.zeros(64, np.int64))
    one_line_error(tiny, r"inputs 'x' have shape \[64, 5\]", file="eval.npz")


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(controller="x"), r"'controller' must be an object"),
    (lambda m: m.update(classes=5), r"'classes' must be a list of at least 2 class names, got 5"),
    (lambda m: m.update(eval={"n": 64}), r"'eval.file' is missing"),
    (lambda m: m["full"].update(outputs=["logits", "h"]), r"'full.outputs' must name exactly 1, got 2"),
    (lambda m: m["controller"].update(uncertainty_skip_below="low"), r"'controller.uncertainty_skip_below'"),
    (lambda m: m.update(stages=[m["stage1"]]), r"'stages' must list at least 2 stages"),
    (lambda m: m.update(name="team/bc"), r"'name' must be letters, digits"),
    (lambda m: m["input"].update(shape=[1, 4]), r"'input.shape' must be a list of sizes .*starting with -1"),
    (lambda m: m.update(outputs_are="scores"), r"'outputs_are' must be 'logits' or 'probabilities'"),
])
def test_malformed_fields(tiny, change, match):
    edit_json(tiny, change)
    one_line_error(tiny, match)


def test_tokenizer_pad_id_not_an_int(tiny):
    (tiny / "tokenizer.json").write_text("{}")
    edit_json(tiny, lambda m: m.update(tokenizer={"file": "tokenizer.json", "max_length": 8, "pad_id": "0"}))
    one_line_error(tiny, r"'tokenizer.pad_id' must be an integer >= 0, got '0'")


def test_full_graph_with_two_outputs(tmp_path):
    directory = make_model_dir(tmp_path / "m", full_outputs=2)
    one_line_error(directory, r"'full.outputs' lists \['logits'\] but full.onnx has outputs \['h', 'logits'\]")


def test_a_ladder_directory_loads_and_its_stages_chain(tmp_path):
    directory = make_model_dir(tmp_path / "ladder", widths=(3, 5, 4), ladder=True)
    spec = load_model_dir(directory)
    assert spec.n_stages == 4 and spec.n_exits == 3
    assert list(spec.graphs) == ["full", "stage1", "stage2", "stage3", "stage4"]
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, _ = spec.load_validation()
    np.testing.assert_allclose(backend.stage2(backend.stage1(x)[1]), backend.predict(x), atol=1e-4)


def test_ladder_hidden_width_mismatch_names_the_stage(tmp_path):
    directory = make_model_dir(tmp_path / "ladder", widths=(3, 5, 4), ladder=True)
    edit_json(directory, lambda m: m["stages"].__setitem__(2, m["stages"][1]))  # stage 3 := stage 2's graph
    one_line_error(directory, r"'stages\[2\].inputs' .*stage2.onnx.*\[-1, 3\].*\[-1, 5\]")


def test_text_batches_are_trimmed_to_their_longest_sequence(tiny):
    from dataclasses import replace

    from targets.backends.ort_target import check_batch, trim_padding

    batch = np.array([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0]], dtype=np.int64)
    assert trim_padding(batch, 0).tolist() == [[5, 6], [7, 0]]
    assert trim_padding(np.zeros((2, 4), np.int64), 0).shape == (2, 1)
    text = replace(load_model_dir(tiny), tokenizer_path=tiny / "tokenizer.json", tokenizer_pad_id=0,
                   input_dtype=np.dtype(np.int64), input_shape=(-1, -1))
    assert check_batch(batch, text).shape == (2, 2)
    assert check_batch(np.ones((1, 3), np.int64), text).shape == (1, 3)
    image_like = replace(text, tokenizer_path=None)  # not a text model: never trimmed
    assert check_batch(batch, image_like).shape == (2, 5)


# --- the sealed split: model.json → split (seed, held-out digest) ----------------------------
def test_split_seed_and_heldout_digest_are_read_and_optional(tmp_path):
    from targets.model.model_dir import heldout_digest

    plain = load_model_dir(make_model_dir(tmp_path / "old", ladder=True, widths=(3, 3)))
    assert plain.split_seed is None and plain.heldout_digest is None  # older and user model dirs load
    directory = make_model_dir(tmp_path / "sealed", ladder=True, widths=(3, 3))
    with np.load(directory / "eval.npz") as data:
        x, y = data["x"], data["y"]
    source_index = np.arange(100, 100 + len(y))[::-1]  # the builder's order does not matter
    np.savez(directory / "eval.npz", x=x, y=y, source_index=source_index)
    digest = heldout_digest(source_index)
    assert digest == heldout_digest(np.sort(source_index)) != heldout_digest(source_index + 1)
    edit_json(directory, lambda m: m.update(split={"seed": 20261202, "heldout_sha256": digest}))
    spec = load_model_dir(directory)
    assert (spec.split_seed, spec.heldout_digest) == (20261202, digest)


@pytest.mark.parametrize("split, field", [
    ({"seed": -1}, "split.seed"), ({"seed": "7"}, "split.seed"), ({"seed": True}, "split.seed"),
    ({"heldout_sha256": "abc"}, "split.heldout_sha256"), ("seed 7", "'split'"),
])
def test_a_malformed_split_is_one_line_naming_the_field(tmp_path, split, field):
    directory = edit_json(make_model_dir(tmp_path / "m", ladder=True, widths=(3, 3)),
                          lambda m: m.update(split=split))
    with pytest.raises(ModelDirError, match=field.replace(".", r"\.")):
        load_model_dir(directory)


def test_a_heldout_set_that_does_not_match_its_digest_is_refused(tmp_path):
    """A held-out set swapped after the build (other source rows) no longer hashes to the digest."""
    from targets.model.model_dir import heldout_digest

    directory = make_model_dir(tmp_path / "m", ladder=True, widths=(3, 3))
    with np.load(directory / "eval.npz") as data:
        x, y = data["x"], data["y"]
    np.savez(directory / "eval.npz", x=x, y=y, source_index=np.arange(len(y)) + 1)
    edit_json(directory, lambda m: m.update(split={"seed": 1, "heldout_sha256": heldout_digest(np.arange(len(y)))}))
    with pytest.raises(ModelDirError, match="split.heldout_sha256.*not the one the model was built with"):
        load_model_dir(directory)


def test_the_embedded_digits_model_records_its_split_and_its_heldout_rows_match():
    from green_mlops.models import resolve_model
    from targets.model.model_dir import heldout_digest

    spec = resolve_model("digits")
    assert isinstance(spec.split_seed, int) and spec.split_seed == spec.meta["build"]["split_seed"]
    with np.load(spec.eval_path) as data:
        assert heldout_digest(data["source_index"]) == spec.heldout_digest
