"""Tiny model directories a user could have written, built with ``onnx.helper`` in milliseconds.

A linear "network" on 4 features: every stage multiplies its input by a fixed matrix; exit heads
and the final head are linear too. ``make_model_dir`` writes a two-stage directory in the
original ``stage1``/``stage2`` form (or a ladder with ``stages``) whose full graph equals the
chained stages, plus eval.npz and validation.npz. Keyword options plant one mistake at a time.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

onnx = __import__("pytest").importorskip("onnx", reason="tiny test models are written with the 'onnx' package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FEATURES, CLASSES = 4, 2
RNG = np.random.default_rng(7)


def _matrix(rows: int, cols: int) -> np.ndarray:
    return RNG.standard_normal((rows, cols)).astype(np.float32)


def _save(path: Path, nodes, inputs, outputs, initializers) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _tensor(name: str, width, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, ["n", width])


def make_model_dir(
    root: Path,
    widths: tuple[int, ...] = (3,),
    ladder: bool = False,
    swap_stage_outputs: bool = False,
    next_input_width: int | None = None,
    full_outputs: int = 1,
    n_eval: int = 64,
) -> Path:
    """Write a model directory under ``root`` and return it; see the module docstring.

    ``widths``: hidden width after each exit stage (one exit per entry). ``swap_stage_outputs``:
    exit stages emit (hidden, exit_logits) in graph order. ``next_input_width``: stage 2 expects
    this width instead of stage 1's hidden width. ``full_outputs``: 2 gives full.onnx a second
    output.
    """
    root.mkdir(parents=True, exist_ok=True)
    weights = []
    previous = FEATURES
    for width in widths:
        weights.append((_matrix(previous, width), _matrix(width, CLASSES)))
        previous = width
    final = _matrix(previous, CLASSES)

    stage_entries = []
    for k, (w, head) in enumerate(weights, start=1):
        in_name = "x" if k == 1 else "h_in"
        in_width = w.shape[0] if not (k == 2 and next_input_width) else next_input_width
        if k == 2 and next_input_width:
            w = _matrix(next_input_width, w.shape[1])
        nodes = [helper.make_node("MatMul", [in_name, "W"], ["hidden"]),
                 helper.make_node("MatMul", ["hidden", "E"], ["exit_logits"])]
        outs = [_tensor("exit_logits", CLASSES), _tensor("hidden", w.shape[1])]
        if swap_stage_outputs:
            outs.reverse()
        _save(root / f"stage{k}.onnx", nodes, [_tensor(in_name, in_width)], outs,
              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(head, "E")])
        stage_entries.append({"file": f"stage{k}.onnx", "inputs": [in_name], "outputs": ["exit_logits", "hidden"]})
    last = len(weights) + 1
    last_weights = _matrix(next_input_width, CLASSES) if last == 2 and next_input_width else final
    _save(root / f"stage{last}.onnx", [helper.make_node("MatMul", ["h_in", "F"], ["logits"])],
          [_tensor("h_in", last_weights.shape[0])], [_tensor("logits", CLASSES)],
          [numpy_helper.from_array(last_weights, "F")])
    stage_entries.append({"file": f"stage{last}.onnx", "inputs": ["h_in"], "outputs": ["logits"]})

    chain = weights[0][0]
    for w, _ in weights[1:]:
        chain = chain @ w
    nodes = [helper.make_node("MatMul", ["x", "C"], ["h"]), helper.make_node("MatMul", ["h", "F"], ["logits"])]
    outs = [_tensor("logits", CLASSES)]
    if full_outputs == 2:
        outs.append(_tensor("h", chain.shape[1]))
    _save(root / "full.onnx", nodes, [_tensor("x", FEATURES)], outs,
          [numpy_helper.from_array(chain, "C"), numpy_helper.from_array(final, "F")])

    for name, n in (("eval", n_eval), ("validation", n_eval)):
        x = RNG.standard_normal((n, FEATURES)).astype(np.float32)
        logits = x @ chain @ final
        np.savez(root / f"{name}.npz", x=x, y=logits.argmax(1).astype(np.int64))

    meta = {
        "name": "tiny",
        "classes": ["no", "yes"],
        "outputs_are": "logits",
        "input": {"name": "x", "dtype": "float32", "shape": [-1, FEATURES]},
        "full": {"file": "full.onnx", "inputs": ["x"], "outputs": ["logits"]},
        "eval": {"file": "eval.npz", "n": n_eval},
    }
    if ladder:
        meta["stages"] = stage_entries
        meta["validation"] = {"file": "validation.npz", "n": n_eval}
    else:
        assert len(widths) == 1, "the two-stage form has one exit"
        meta["stage1"], meta["stage2"] = stage_entries
        meta["controller"] = {"uncertainty_skip_below": 0.3}
    (root / "model.json").write_text(json.dumps(meta, indent=2))
    return root


def edit_json(directory: Path, change) -> Path:
    """Apply ``change(meta)`` to ``model.json`` in place."""
    path = directory / "model.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))
    return directory
