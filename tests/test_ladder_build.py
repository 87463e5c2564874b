"""`green-mlops ladder build` (text): tiny random-initialised BERT-, DistilBERT- and RoBERTa-shaped
checkpoints made offline here, and a bare encoder, each cut into a ladder and run through
`validate --no-load`; the build-time checks recorded; every bad input one line and exit 2."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="ladder build needs the 'models' extra (torch)")
pytest.importorskip("transformers", reason="ladder build needs the 'models' extra (transformers)")

from green_mlops.cli import main  # noqa: E402
from green_mlops.ladder.common import rows_for_default_budget  # noqa: E402
from targets.model.model_dir import load_model_dir  # noqa: E402
from tests.checkpoint_factory import labelled_texts, tiny_text_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return labelled_texts(tmp_path_factory.mktemp("data") / "reviews.csv")


def build(checkpoint, data, out, *extra) -> int:
    return main(["ladder", "build", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--max-length", "24", *extra])


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_a_checkpoint_becomes_a_ladder_that_validate_runs(kind, data, tmp_path, capsys):
    checkpoint = tiny_text_checkpoint(tmp_path / "checkpoint", kind)
    out = tmp_path / "model"
    assert build(checkpoint, data, out) == 0
    spec = load_model_dir(out)
    meta = json.loads((out / "model.json").read_text())
    checks = meta["build"]["checks"]
    # The stages chained are the full graph, and the full graph is the user's own checkpoint.
    assert checks["chain_vs_full_max_abs"] < 1e-4
    assert checks["checkpoint_answers_equal"] == checks["checkpoint_rows"] == meta["eval"]["n"]
    assert spec.n_stages == 3 and meta["classes"] == ["negative", "positive"]
    assert meta["tokenizer"]["pad_id"] == (1 if kind == "roberta" else 0)
    assert meta["split"]["seed"] == 0 and len(meta["split"]["heldout_sha256"]) == 64
    assert meta["build"]["final_classifier"] == "the checkpoint's own"
    capsys.readouterr()
    assert main(["validate", "--model", str(out), "--no-load", "--requests", "2000", "--energy", "off"]) == 0
    out_text = capsys.readouterr().out
    assert "ladder check: chained stages equal full.onnx" in out_text and "standard vs bio" in out_text


def test_a_bare_encoder_gets_its_final_head_trained_and_exits_every_k_layers(data, tmp_path):
    checkpoint = tiny_text_checkpoint(tmp_path / "encoder", "bert", head=False, layers=4)
    out = tmp_path / "model"
    assert build(checkpoint, data, out, "--exits", "2", "--name", "my-encoder") == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["name"] == "my-encoder" and meta["build"]["exit_after_layers"] == [2]
    assert meta["build"]["final_classifier"] == "trained here (bare encoder)" and meta["classes"] == ["0", "1"]
    assert load_model_dir(out).n_stages == 2
    assert meta["build"]["accuracy"]["heldout"]["final"] > 0.6  # the synthetic labels are learnable


def test_labels_given_as_class_names_map_onto_the_classifiers_classes(tmp_path):
    data = labelled_texts(tmp_path / "named.jsonl.csv", names=True)
    checkpoint = tiny_text_checkpoint(tmp_path / "checkpoint", "distilbert")
    assert build(checkpoint, data, tmp_path / "model") == 0


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line_and_exit_2(data, tmp_path, capsys):
    checkpoint = tiny_text_checkpoint(tmp_path / "checkpoint", "bert")
    capsys.readouterr()
    # An unsupported architecture: say which are supported.
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert build(gpt, data, tmp_path / "m1") == 2
    assert "unsupported architecture 'gpt2'" in (err := one_line(capsys)) and "bert, roberta" in err
    # Not a checkpoint at all.
    assert build(tmp_path, data, tmp_path / "m1") == 2
    assert "no config.json" in one_line(capsys)
    # A label column with values the classifier's head does not have.
    three = labelled_texts(tmp_path / "three.csv")
    text = three.read_text().splitlines()
    text[5] = text[5].rsplit(",", 1)[0] + ",7"
    three.write_text("\n".join(text) + "\n")
    assert build(checkpoint, three, tmp_path / "m2") == 2
    assert "values the classifier's head does not have (7)" in (err := one_line(capsys)) and "negative, positive" in err
    # A data file without the named columns.
    assert build(checkpoint, data, tmp_path / "m3", "--text-column", "review") == 2
    assert "has no column 'review'" in (err := one_line(capsys)) and "'text', 'label'" in err
    # Too few rows to certify the default budget: say how many are needed.
    small = labelled_texts(tmp_path / "small.csv", rows=600)
    assert build(checkpoint, small, tmp_path / "m4") == 2
    validation, total = rows_for_default_budget()
    assert f"needs {validation:,}, so at least {total:,} labelled rows" in one_line(capsys)
    assert not any((tmp_path / name).exists() for name in ("m1", "m2", "m3", "m4"))  # nothing half-written


def test_a_resnet18_and_an_image_folder_become_a_ladder_that_validate_runs(tmp_path, capsys):
    """ResNet-18 (random init, trained briefly on scikit-learn's digits written as PNGs), through
    ladder build and validate; its full graph answers as the network does."""
    from tests.checkpoint_factory import digits_image_folder, trained_resnet18

    images = digits_image_folder(tmp_path / "images")
    weights = trained_resnet18(tmp_path / "resnet18.pt", images)
    out = tmp_path / "model"
    assert main(["ladder", "build", "--arch", "resnet18", "--weights", str(weights), "--images", str(images),
                 "--image-size", "32", "--out", str(out), "--name", "digits-resnet"]) == 0
    meta = json.loads((out / "model.json").read_text())
    checks = meta["build"]["checks"]
    assert checks["chain_vs_full_max_abs"] < 1e-3 and checks["checkpoint_answers_equal"] == checks["checkpoint_rows"]
    assert load_model_dir(out).n_stages == 4 and meta["classes"] == [str(k) for k in range(10)]
    assert meta["input"]["shape"] == [-1, 3, 32, 32]
    capsys.readouterr()
    assert main(["validate", "--model", str(out), "--no-load", "--requests", "2000", "--energy", "off"]) == 0
    assert "standard vs bio" in capsys.readouterr().out
    # Weights of another architecture: one line, exit 2.
    assert main(["ladder", "build", "--arch", "resnet34", "--weights", str(weights), "--images", str(images),
                 "--image-size", "32", "--out", str(tmp_path / "bad")]) == 2
    assert "do not fit resnet34" in one_line(capsys)
    assert main(["ladder", "build", "--arch", "vgg16", "--weights", str(weights), "--images", str(images),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "unsupported architecture 'vgg16'" in one_line(capsys)
    assert main(["ladder", "build", "--arch", "resnet18", "--out", str(tmp_path / "bad")]) == 2
    assert "--weights and --images missing" in one_line(capsys)


def test_finetune_trains_every_layer_and_records_how_far_the_full_model_moved(data, tmp_path):
    checkpoint = tiny_text_checkpoint(tmp_path / "checkpoint", "bert")
    out = tmp_path / "model"
    assert build(checkpoint, data, out, "--finetune", "--epochs", "1") == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["build"]["training"]["mode"] == "finetune" and len(meta["build"]["training"]["history"]) == 1
    checks = meta["build"]["checks"]
    # The final classifier was trained too: full.onnx is the fine-tuned network, and the check says
    # how far it moved from the checkpoint (its logits differ; answers may too).
    assert checks["chain_vs_full_max_abs"] < 1e-4 and checks["checkpoint_rows"] == meta["eval"]["n"]
    assert checks["checkpoint_max_abs"] > 1e-3
    assert load_model_dir(out).n_stages == 3
