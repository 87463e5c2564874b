"""The validator validated: a model whose accuracy loss and rejections are planted is served by
the real gateway, loaded by the real Locust scenarios and judged by the real report; the report
must recover the planted loss inside its interval and score the planted rejections as wrong.

The planted model (ONNX graphs built here) has four classes and inputs of eight numbers: the full
model answers ``argmax(x[:4])`` and the exit head answers ``argmax(x[4:])``. Each evaluation row
is one of three kinds:

* uncertain: the exit logits are all 0 (u = 1): admitted, the full model answers, right;
* confident and right: the exit head gives the label with certainty (u ≈ 0): skipped, right;
* confident and wrong: the exit head gives another class with certainty: skipped, wrong.

With α = 1, β = γ = 0 and τ fixed at 0.5, admission is ``u >= 0.5``, so bio's loss against the
full model is exactly the share of requests on confident-and-wrong rows (skip action ``exit``),
or on any confident row (skip action ``reject``: every skipped request is rejected).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reports.build import build_report
from tests.processes import run_headless_locust

CLASSES, ROWS = 4, 200
KINDS = {"uncertain": 100, "right": 60, "wrong": 40}  # rows of each kind


def _matmul_graph(path: Path, inputs: list[tuple[str, int]], outputs: list[tuple[str, np.ndarray]]) -> None:
    """An ONNX graph: each output is the (only) input times a constant matrix."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (name, width), = inputs
    nodes, initializers, graph_outputs = [], [], []
    for out_name, matrix in outputs:
        initializers.append(numpy_helper.from_array(matrix.astype(np.float32), f"{out_name}_w"))
        nodes.append(helper.make_node("MatMul", [name, f"{out_name}_w"], [out_name]))
        graph_outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [None, matrix.shape[1]]))
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, width])],
                              graph_outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def planted_model(directory: Path) -> dict[int, str]:
    """Write the planted model directory; returns the kind of every evaluation row."""
    directory.mkdir(parents=True)
    first, second = np.vstack([np.eye(CLASSES), np.zeros((CLASSES, CLASSES))]), \
        np.vstack([np.zeros((CLASSES, CLASSES)), np.eye(CLASSES)])
    _matmul_graph(directory / "full.onnx", [("x", 2 * CLASSES)], [("logits", 10 * first)])
    _matmul_graph(directory / "stage1.onnx", [("x", 2 * CLASSES)], [("exit_logits", 30 * second), ("hidden", first)])
    _matmul_graph(directory / "stage2.onnx", [("hidden", CLASSES)], [("logits", 10 * np.eye(CLASSES))])
    kinds = [kind for kind, n in KINDS.items() for _ in range(n)]
    y = np.arange(ROWS) % CLASSES
    x = np.zeros((ROWS, 2 * CLASSES), dtype=np.float32)
    x[np.arange(ROWS), y] = 1.0  # the full model is always right
    for i, kind in enumerate(kinds):
        if kind == "right":
            x[i, CLASSES + y[i]] = 1.0
        elif kind == "wrong":
            x[i, CLASSES + (y[i] + 1) % CLASSES] = 1.0
    np.savez(directory / "eval.npz", x=x, y=y.astype(np.int64))
    (directory / "model.json").write_text(json.dumps({
        "name": "planted", "task": "classification", "classes": [str(c) for c in range(CLASSES)],
        "outputs_are": "logits", "input": {"name": "x", "dtype": "float32", "shape": [-1, 2 * CLASSES]},
        "full": {"file": "full.onnx", "inputs": ["x"], "outputs": ["logits"]},
        "stage1": {"file": "stage1.onnx", "inputs": ["x"], "outputs": ["exit_logits", "hidden"]},
        "stage2": {"file": "stage2.onnx", "inputs": ["hidden"], "outputs": ["logits"]},
        "eval": {"file": "eval.npz", "n": ROWS}, "controller": {"uncertainty_skip_below": 0.5}}))
    return dict(enumerate(kinds))


def controller_toml(path: Path, skip_action: str) -> Path:
    path.write_text("[controller]\npolicy = \"paper\"\nalpha = 1.0\nbeta = 0.0\ngamma = 0.0\ntau0 = 0.5\ntau_inf = 0.5\n"
                    f'k_per_s = 1.0\nuncertainty = "entropy"\nskip_action = "{skip_action}"\n')
    return path


def run_locust(scenario: str, model: Path, results: Path, config: Path) -> None:
    run_headless_locust(scenario, "--model", str(model), "--arrival-rate", "150", "--seed", "11", "-t", "5",
                        "--energy", "off", "--controller-config", str(config), "--results", str(results),
                        cwd=results.parent)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    kinds = planted_model(root / "model")
    for name, scenario, action in (("standard", "standard", "exit"), ("bio-exit", "bio", "exit"),
                                   ("bio-reject", "bio", "reject")):
        (root / name).mkdir()
        run_locust(scenario, root / "model", root / name / scenario, controller_toml(root / f"{name}.toml", action))
    return root, kinds


def planted_loss_pp(records: list[dict], kinds: dict[int, str], lost: set[str]) -> float:
    scored = [r for r in records if r["outcome"] in ("answered", "rejected")]
    return 100 * sum(kinds[r["row"]] in lost for r in scored) / len(scored)


def judged(root: Path, bio: str) -> dict:
    pair = root / f"pair-{bio}"
    pair.mkdir(exist_ok=True)
    for name, scenario in (("standard", "standard"), (bio, "bio")):
        link = pair / scenario
        if not link.exists():
            link.symlink_to(root / name / scenario)
    return build_report(pair, pair / "report", min_duration_s=1, min_requests=50)


def test_the_planted_accuracy_loss_is_recovered(planted):
    root, kinds = planted
    summary = judged(root, "bio-exit")
    c = summary["comparison"]
    records = [json.loads(line) for line in (root / "bio-exit" / "bio" / "requests.jsonl").read_text().splitlines()]
    assert {r["outcome"] for r in records} == {"answered"}
    # the planted truth: the exit head is wrong on 40 of 200 rows, and only those lose
    assert planted_loss_pp(records, kinds, {"wrong"}) == pytest.approx(20.0, abs=3.0)
    lo, hi = c["accuracy_loss_bounds95_pp"]
    assert lo <= 20.0 <= hi and hi - lo < 15
    assert c["accuracy_loss_pp"] == pytest.approx(planted_loss_pp([r for r in records if r["offset_s"] >= (c["warmup_s"] or 0)],
                                                                  kinds, {"wrong"}))
    assert c["admission_rate"] == pytest.approx(0.5, abs=0.08) and c["standard_matches_reference"] == 1.0
    assert next(cl for cl in summary["claims"] if cl["name"] == "accuracy_loss")["status"] == "not_held"


def test_the_planted_rejections_are_scored_as_wrong(planted):
    root, kinds = planted
    summary = judged(root, "bio-reject")
    c = summary["comparison"]
    records = [json.loads(line) for line in (root / "bio-reject" / "bio" / "requests.jsonl").read_text().splitlines()]
    rejected = [r for r in records if r["outcome"] == "rejected"]
    assert rejected and {kinds[r["row"]] for r in rejected} == {"right", "wrong"}  # every confident row
    assert all(not r["correct"] and r["status"] == 503 for r in rejected)
    assert c["rejected_scored_wrong"] == sum(r["offset_s"] >= (c["warmup_s"] or 0) for r in rejected)
    lo, hi = c["accuracy_loss_bounds95_pp"]
    assert lo <= 50.0 <= hi  # half the rows are confident: half the requests get no answer
    assert c["rejection_rate"] == pytest.approx(0.5, abs=0.08)
    assert summary["runs"]["bio"]["failed"] == 0  # a rejection is not a failure
