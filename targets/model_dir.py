"""The model directory contract, usable for any early-exit model.

A model directory holds ``full.onnx``, ``stage1.onnx``, ``stage2.onnx`` and ``model.json``;
optionally an evaluation set (``eval.npz`` with arrays ``x`` and ``y``) and, for text models, a
``tokenizer`` entry (``file``, ``max_length``, ``pad_id``) naming a ``tokenizer.json`` that turns
text into the model's token ids at the edge. ``model.json`` names,
for each graph, its file, input names and output names; the model input's name, dtype and shape
(``-1`` for the batch axis); the class labels; and whether the final outputs are ``logits`` or
``probabilities``. Stage 1 returns ``(exit_output, hidden)``; stage 2 takes ``hidden``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from targets.errors import ModelDirError

GRAPH_KEYS = ("full", "stage1", "stage2")


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a model: its file and its input and output names, in order."""

    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A validated model directory."""

    name: str
    directory: Path
    classes: tuple[str, ...]
    input_name: str
    input_dtype: np.dtype
    input_shape: tuple[int, ...]
    outputs_are: str
    full: GraphSpec
    stage1: GraphSpec
    stage2: GraphSpec
    eval_path: Path | None
    controller_hints: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    tokenizer_path: Path | None = None  # text models: tokenizer.json, run at the edge
    tokenizer_max_length: int | None = None
    tokenizer_pad_id: int = 0

    def load_tokenizer(self):
        """The edge tokenizer of a text model (None for models that take tensors only)."""
        if self.tokenizer_path is None:
            return None
        from targets.tokenizer import EdgeTokenizer

        return EdgeTokenizer(self.tokenizer_path, self.tokenizer_max_length, self.tokenizer_pad_id)

    def load_eval(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled evaluation set ``(x, y)``; ModelDirError when the model ships none."""
        if self.eval_path is None:
            raise ModelDirError(f"model '{self.name}' has no evaluation set (eval.npz) in {self.directory}")
        try:
            with np.load(self.eval_path) as data:
                x, y = data["x"].astype(self.input_dtype, copy=False), data["y"].astype(np.int64)
        except (OSError, KeyError, ValueError) as exc:
            raise ModelDirError(f"cannot read evaluation set {self.eval_path}: {exc}") from exc
        if len(x) != len(y) or len(x) == 0:
            raise ModelDirError(f"evaluation set {self.eval_path} has {len(x)} inputs and {len(y)} labels")
        return x, y


def _require(meta: dict, key: str, where: Path):
    if key not in meta:
        raise ModelDirError(f"{where}: missing key '{key}'")
    return meta[key]


def _graph(meta: dict, key: str, directory: Path, where: Path) -> GraphSpec:
    entry = _require(meta, key, where)
    try:
        path = directory / entry["file"]
        inputs, outputs = tuple(entry["inputs"]), tuple(entry["outputs"])
    except (TypeError, KeyError) as exc:
        raise ModelDirError(f"{where}: '{key}' needs 'file', 'inputs' and 'outputs'") from exc
    if not path.is_file():
        raise ModelDirError(f"model file missing: {path}")
    return GraphSpec(path, inputs, outputs)


def load_model_dir(directory: str | Path) -> ModelSpec:
    """Read and check ``model.json`` and the files it names; ModelDirError says what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"model directory not found: {directory}")
    where = directory / "model.json"
    try:
        meta = json.loads(where.read_text())
    except FileNotFoundError as exc:
        raise ModelDirError(f"{directory} is not a model directory: model.json is missing") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelDirError(f"{where} must hold a JSON object")

    graphs = {key: _graph(meta, key, directory, where) for key in GRAPH_KEYS}
    if len(graphs["stage1"].outputs) != 2 or len(graphs["stage2"].inputs) != 1:
        raise ModelDirError(f"{where}: stage1 must output (exit, hidden) and stage2 take one input")
    model_input = _require(meta, "input", where)
    try:
        dtype = np.dtype(model_input["dtype"])
        shape = tuple(int(d) for d in model_input["shape"])
        input_name = str(model_input["name"])
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelDirError(f"{where}: 'input' needs 'name', a numpy 'dtype' and a 'shape'") from exc
    outputs_are = meta.get("outputs_are", "logits")
    if outputs_are not in ("logits", "probabilities"):
        raise ModelDirError(f"{where}: 'outputs_are' must be 'logits' or 'probabilities'")
    tokenizer = meta.get("tokenizer")
    tokenizer_path = None
    if isinstance(tokenizer, dict):
        tokenizer_path = directory / tokenizer.get("file", "tokenizer.json")
        if not tokenizer_path.is_file():
            raise ModelDirError(f"tokenizer missing: {tokenizer_path}")
        if not isinstance(tokenizer.get("max_length"), int):
            raise ModelDirError(f"{where}: 'tokenizer' needs an integer 'max_length'")
    eval_entry = meta.get("eval")
    eval_path = directory / eval_entry["file"] if isinstance(eval_entry, dict) else None
    if eval_path is not None and not eval_path.is_file():
        raise ModelDirError(f"evaluation set missing: {eval_path}")
    return ModelSpec(
        name=str(meta.get("name", directory.name)),
        directory=directory,
        classes=tuple(str(c) for c in _require(meta, "classes", where)),
        input_name=input_name,
        input_dtype=dtype,
        input_shape=shape,
        outputs_are=outputs_are,
        full=graphs["full"],
        stage1=graphs["stage1"],
        stage2=graphs["stage2"],
        eval_path=eval_path,
        controller_hints=dict(meta.get("controller", {})),
        meta=meta,
        tokenizer_path=tokenizer_path,
        tokenizer_max_length=tokenizer.get("max_length") if tokenizer_path else None,
        tokenizer_pad_id=int(tokenizer.get("pad_id", 0)) if tokenizer_path else 0,
    )
