"""The model directory contract, usable for any early-exit model, and its one validation.

A model directory holds ``model.json``, the full graph (``full.onnx``: what the *standard* path
runs) and a ladder of N >= 2 stage graphs. ``model.json`` lists them either as ``stages`` (a list,
N entries) or, for N = 2, as ``stage1`` and ``stage2`` (the original two-stage form, still loaded
unchanged). Every stage but the last outputs, in role order, ``(exit logits, hidden state)``; the
last stage outputs the final logits. Stage 1 takes the model input; stage k+1 takes stage k's
hidden state. The runtime fetches outputs **by name**, never by the graph's output order.

Optional: ``eval`` (``eval.npz``, held-out ``x``, ``y``: what validate measures on),
``validation`` (``validation.npz``, the validation split: every exit threshold is calibrated on
it), ``tokenizer`` (text models: ``file``, ``max_length``, ``pad_id``) and ``controller`` (hints:
``uncertainty_skip_below``, a number for a two-stage model calibrated on entropy, or
``calibration``: per uncertainty measure, one u* per exit) and ``split`` (how the held-out set was
drawn: ``seed``, the split seed, an integer >= 0, apart from any training seed; ``heldout_sha256``,
:func:`heldout_digest` of the held-out rows' identities, their indices in the source data set).
A model directory without ``split`` (older builds, user models) loads with both unknown (None).
When ``eval.npz`` carries ``source_index`` (the held-out rows' indices in the source data set),
it must match ``split.heldout_sha256``: a held-out set swapped after the build is refused.

:func:`load_model_dir` validates the whole directory once, at load, against the graphs
themselves (names, dtypes, shapes, hidden widths between consecutive stages, classes against
output widths) and the data sets (labels' dtype and range, input width); ``validate``, ``serve``,
the locustfiles and ``triton repo`` all load through it. Every mistake is one
:class:`ModelDirError` line naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from targets.errors import BackendError, ModelDirError

# A model's name is a URL path segment (/v2/models/<name>) and a directory name: no separators.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
UNCERTAINTY_MEASURES = ("entropy", "least_confidence", "margin")
ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64), "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32), "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8), "tensor(bool)": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of a model: its file and its input and output names, in role order."""

    path: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """A validated model directory (see the module docstring)."""

    name: str
    directory: Path
    classes: tuple[str, ...]
    input_name: str
    input_dtype: np.dtype
    input_shape: tuple[int, ...]
    outputs_are: str
    full: GraphSpec
    stages: tuple[GraphSpec, ...]
    eval_path: Path | None
    validation_path: Path | None = None
    controller_hints: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    tokenizer_path: Path | None = None  # text models: tokenizer.json, run at the edge
    tokenizer_max_length: int | None = None
    tokenizer_pad_id: int = 0
    split_seed: int | None = None  # model.json → split.seed: the seed that drew the held-out set
    heldout_digest: str | None = None  # model.json → split.heldout_sha256 (see heldout_digest())

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def n_exits(self) -> int:
        """Early exits: one after every stage but the last."""
        return len(self.stages) - 1

    @property
    def stage1(self) -> GraphSpec:
        return self.stages[0]

    @property
    def graphs(self) -> dict[str, GraphSpec]:
        """Every graph by key: ``full``, then ``stage1`` … ``stage<N>``."""
        return {"full": self.full, **{f"stage{k}": g for k, g in enumerate(self.stages, start=1)}}

    @property
    def is_text(self) -> bool:
        return self.tokenizer_path is not None

    def load_tokenizer(self):
        """The edge tokenizer of a text model (None for models that take tensors only)."""
        if self.tokenizer_path is None:
            return None
        from targets.model.tokenizer import EdgeTokenizer

        return EdgeTokenizer(self.tokenizer_path, self.tokenizer_max_length, self.tokenizer_pad_id)

    def load_eval(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled held-out set ``(x, y)``; ModelDirError when the model ships none."""
        if self.eval_path is None:
            raise ModelDirError(f"model '{self.name}' has no evaluation set (eval.npz) in {self.directory}")
        return _read_dataset(self, self.eval_path, "eval")

    def load_validation(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled validation split ``(x, y)`` thresholds are calibrated on; ModelDirError
        when the model ships none."""
        if self.validation_path is None:
            raise ModelDirError(f"model '{self.name}' has no validation split (validation.npz) in "
                                f"{self.directory}")
        return _read_dataset(self, self.validation_path, "validation")


def _read_dataset(spec: ModelSpec, path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of an ``.npz`` named by ``model.json``'s ``key``, checked against the model:
    as many labels as inputs, integer labels in ``[0, classes)``, inputs of the model's width."""
    try:
        with np.load(path) as data:
            x, y = data["x"], data["y"]
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise ModelDirError(f"{path}: cannot read arrays 'x' and 'y' ('{key}.file' in model.json): {exc}") from exc
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ModelDirError(f"{path}: 'x' has shape {list(x.shape)} and 'y' {list(y.shape)}: "
                            "need as many labels as inputs, at least one")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ModelDirError(f"{path}: labels 'y' have dtype {y.dtype}, need integers")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ModelDirError(f"{path}: labels 'y' hold fractional or non-finite values; class indices are integers")
    n_classes = len(spec.classes)
    if y.min() < 0 or y.max() >= n_classes:
        raise ModelDirError(f"{path}: labels 'y' range over [{y.min():g}, {y.max():g}] but 'classes' in "
                            f"model.json has {n_classes} entries (labels must lie in [0, {n_classes - 1}])")
    want = spec.input_shape[1:]
    if x.ndim != len(spec.input_shape) or any(w > 0 and g != w for w, g in zip(want, x.shape[1:])):
        raise ModelDirError(f"{path}: inputs 'x' have shape {list(x.shape)} but 'input.shape' in model.json is "
                            f"{list(spec.input_shape)}")
    if not np.can_cast(x.dtype, spec.input_dtype, casting="same_kind"):
        raise ModelDirError(f"{path}: inputs 'x' have dtype {x.dtype}, which does not cast to 'input.dtype' "
                            f"{spec.input_dtype}")
    return x.astype(spec.input_dtype, copy=False), y.astype(np.int64)


def heldout_digest(source_index) -> str:
    """The identity of a held-out set: the sha256 (hex) of its rows' indices in the source data
    set, sorted ascending, written in decimal and joined by ','. Order-free: the same rows give
    the same digest however the builder ordered them."""
    indices = np.sort(np.asarray(source_index).astype(np.int64).ravel())
    return hashlib.sha256(",".join(str(int(i)) for i in indices).encode("ascii")).hexdigest()


# --- reading model.json ----------------------------------------------------------------------
def _fail(where: Path, field_name: str, problem: str) -> ModelDirError:
    return ModelDirError(f"{where}: '{field_name}' {problem}")


def _names(value, where: Path, field_name: str, count: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _fail(where, field_name, f"must be a list of names, got {value!r}")
    if len(value) != count:
        raise _fail(where, field_name, f"must name exactly {count}, got {len(value)}: {value}")
    return tuple(value)


def _graph(entry, where: Path, key: str, directory: Path, n_inputs: int, n_outputs: int) -> GraphSpec:
    if not isinstance(entry, dict):
        raise _fail(where, key, f"must be an object with 'file', 'inputs' and 'outputs', got {entry!r}")
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        raise _fail(where, f"{key}.file", f"must name the graph file, got {file!r}")
    path = directory / file
    if not path.is_file():
        raise _fail(where, f"{key}.file", f"names {file}, which is missing: {path}")
    inputs = _names(entry.get("inputs"), where, f"{key}.inputs", n_inputs)
    outputs = _names(entry.get("outputs"), where, f"{key}.outputs", n_outputs)
    return GraphSpec(path, inputs, outputs)


def _stages(meta: dict, where: Path, directory: Path) -> tuple[tuple[GraphSpec, ...], tuple[str, ...]]:
    """The stage graphs and the key each came from in model.json (``stages[i]`` or ``stageK``)."""
    if "stages" in meta:
        entries = meta["stages"]
        if not isinstance(entries, list) or len(entries) < 2:
            raise _fail(where, "stages", "must list at least 2 stages (every one but the last has an exit)")
        keys = tuple(f"stages[{i}]" for i in range(len(entries)))
    else:
        for key in ("stage1", "stage2"):
            if key not in meta:
                raise _fail(where, key, "is missing (or list the ladder as 'stages')")
        entries, keys = [meta["stage1"], meta["stage2"]], ("stage1", "stage2")
    last = len(entries) - 1
    stages = tuple(_graph(e, where, keys[i], directory, 1, 1 if i == last else 2) for i, e in enumerate(entries))
    return stages, keys


def _dataset_path(meta: dict, key: str, where: Path, directory: Path) -> Path | None:
    entry = meta.get(key)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
        raise _fail(where, f"{key}.file", f"is missing: '{key}' must be an object naming its .npz file, got {entry!r}")
    path = directory / entry["file"]
    if not path.is_file():
        raise _fail(where, f"{key}.file", f"names {entry['file']}, which is missing: {path}")
    return path


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_unit(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


def _controller_hints(meta: dict, where: Path, n_exits: int) -> dict:
    hints = meta.get("controller", {})
    if not isinstance(hints, dict):
        raise _fail(where, "controller", f"must be an object of controller hints, got {hints!r}")
    if "uncertainty_skip_below" in hints and not _is_unit(hints["uncertainty_skip_below"]):
        raise _fail(where, "controller.uncertainty_skip_below",
                    f"must be a number in [0, 1], got {hints['uncertainty_skip_below']!r}")
    calibration = hints.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict):
            raise _fail(where, "controller.calibration", "must map an uncertainty measure to one u* per exit")
        for measure, values in calibration.items():
            field_name = f"controller.calibration.{measure}"
            if measure not in UNCERTAINTY_MEASURES:
                raise _fail(where, field_name, f"is not an uncertainty measure ({', '.join(UNCERTAINTY_MEASURES)})")
            if not isinstance(values, list) or len(values) != n_exits or not all(_is_unit(v) for v in values):
                raise _fail(where, field_name, f"must list {n_exits} numbers in [0, 1] (one per exit), got {values!r}")
    return dict(hints)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _split(meta: dict, where: Path, eval_path: Path | None) -> tuple[int | None, str | None]:
    """``(split seed, held-out digest)`` from model.json → ``split`` (both None when absent),
    checked against ``eval.npz`` → ``source_index`` when both are there."""
    entry = meta.get("split")
    if entry is None:
        return None, None
    if not isinstance(entry, dict):
        raise _fail(where, "split", f"must be an object with 'seed' and 'heldout_sha256', got {entry!r}")
    seed, digest = entry.get("seed"), entry.get("heldout_sha256")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise _fail(where, "split.seed", f"must be an integer >= 0 (the split seed), got {seed!r}")
    if digest is not None and (not isinstance(digest, str) or not _SHA256.match(digest)):
        raise _fail(where, "split.heldout_sha256", f"must be 64 lowercase hex digits (sha256), got {digest!r}")
    if digest is not None and eval_path is not None:
        try:
            with np.load(eval_path) as data:
                source_index = data["source_index"] if "source_index" in data.files else None
        except (OSError, ValueError, EOFError) as exc:
            raise ModelDirError(f"{eval_path}: cannot read ('eval.file' in model.json): {exc}") from exc
        if source_index is not None and heldout_digest(source_index) != digest:
            raise _fail(where, "split.heldout_sha256",
                        f"is {digest[:12]}… but the rows of {eval_path.name} ('source_index') hash to "
                        f"{heldout_digest(source_index)[:12]}…: the held-out set is not the one the model was built with")
    return seed, digest


def _tokenizer(meta: dict, where: Path, directory: Path) -> tuple[Path | None, int | None, int]:
    entry = meta.get("tokenizer")
    if entry is None:
        return None, None, 0
    if not isinstance(entry, dict):
        raise _fail(where, "tokenizer", f"must be an object with 'file', 'max_length' and 'pad_id', got {entry!r}")
    file = entry.get("file", "tokenizer.json")
    if not isinstance(file, str) or not (directory / file).is_file():
        raise _fail(where, "tokenizer.file", f"names {file!r}, which is missing in {directory}")
    max_length = entry.get("max_length")
    if not _is_int(max_length) or max_length < 1:
        raise _fail(where, "tokenizer.max_length", f"must be an integer >= 1, got {max_length!r}")
    pad_id = entry.get("pad_id", 0)
    if not _is_int(pad_id) or pad_id < 0:
        raise _fail(where, "tokenizer.pad_id", f"must be an integer >= 0, got {pad_id!r}")
    return directory / file, max_length, pad_id


def _model_input(meta: dict, where: Path) -> tuple[str, np.dtype, tuple[int, ...]]:
    entry = meta.get("input")
    if not isinstance(entry, dict):
        raise _fail(where, "input", f"must be an object with 'name', 'dtype' and 'shape', got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(where, "input.name", f"must be the model input's name, got {name!r}")
    try:
        dtype = np.dtype(entry.get("dtype"))
        if entry.get("dtype") is None:
            raise TypeError
    except (TypeError, ValueError):
        raise _fail(where, "input.dtype", f"must be a numpy dtype such as 'float32', got {entry.get('dtype')!r}") from None
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) < 1 or not all(_is_int(d) and (d == -1 or d > 0) for d in shape)
            or shape[0] != -1):
        raise _fail(where, "input.shape", f"must be a list of sizes (-1 for a free axis) starting with -1 for "
                                          f"the batch axis, got {shape!r}")
    return name, dtype, tuple(shape)


def _classes(meta: dict, where: Path) -> tuple[str, ...]:
    classes = meta.get("classes")
    if (not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in classes)):
        raise _fail(where, "classes", f"must be a list of at least 2 class names, got {classes!r}")
    names = tuple(str(c) for c in classes)
    if len(set(names)) != len(names):
        raise _fail(where, "classes", f"must name each class once, got {classes!r}")
    return names


def load_model_dir(directory: str | Path, check_graphs: bool = True) -> ModelSpec:
    """Read and validate a model directory (see the module docstring); ModelDirError says, in
    one line naming the file and the field, what is wrong. ``check_graphs=False`` skips the
    checks against the ONNX graphs (which need ONNX Runtime)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelDirError(f"model directory not found: {directory}")
    where = directory / "model.json"
    try:
        meta = json.loads(where.read_text())
    except FileNotFoundError as exc:
        raise ModelDirError(f"{directory} is not a model directory: model.json is missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelDirError(f"{where} must hold a JSON object")

    for key in ("full", "input", "classes"):
        if key not in meta:
            raise ModelDirError(f"{where}: missing key '{key}'")
    if "stages" not in meta and not ("stage1" in meta and "stage2" in meta):
        raise ModelDirError(f"{where}: missing key 'stages' (or 'stage1' and 'stage2' for two stages)")
    name = meta.get("name", directory.name)
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise _fail(where, "name", f"must be letters, digits, '_', '.' or '-' (a URL segment, no '/'), got {name!r}")
    classes = _classes(meta, where)
    input_name, dtype, shape = _model_input(meta, where)
    outputs_are = meta.get("outputs_are", "logits")
    if outputs_are not in ("logits", "probabilities"):
        raise _fail(where, "outputs_are", f"must be 'logits' or 'probabilities', got {outputs_are!r}")
    if "full" not in meta:
        raise _fail(where, "full", "is missing: the full graph is what the standard path runs")
    full = _graph(meta["full"], where, "full", directory, 1, 1)
    stages, stage_keys = _stages(meta, where, directory)
    tokenizer_path, max_length, pad_id = _tokenizer(meta, where, directory)
    eval_path = _dataset_path(meta, "eval", where, directory)
    split_seed, digest = _split(meta, where, eval_path)
    spec = ModelSpec(
        name=name,
        directory=directory,
        classes=classes,
        input_name=input_name,
        input_dtype=dtype,
        input_shape=shape,
        outputs_are=outputs_are,
        full=full,
        stages=stages,
        eval_path=eval_path,
        validation_path=_dataset_path(meta, "validation", where, directory),
        controller_hints=_controller_hints(meta, where, len(stages) - 1),
        meta=meta,
        tokenizer_path=tokenizer_path,
        tokenizer_max_length=max_length,
        tokenizer_pad_id=pad_id,
        split_seed=split_seed,
        heldout_digest=digest,
    )
    if check_graphs:
        check_against_graphs(spec, ("full", *stage_keys))
    for path, key in ((spec.eval_path, "eval"), (spec.validation_path, "validation")):
        if path is not None:
            _read_dataset(spec, path, key)
    return spec


# --- checking model.json against the graphs ---------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype | None  # None: a type this contract does not use
    shape: tuple  # ints for static axes, None for dynamic ones


_SIGNATURES: dict[tuple, tuple[dict[str, TensorInfo], dict[str, TensorInfo]]] = {}


def graph_signature(path: Path) -> tuple[dict[str, TensorInfo], dict[str, TensorInfo]]:
    """``(inputs, outputs)`` of an ONNX graph by name, read with ONNX Runtime (cached per file)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _SIGNATURES:
        return _SIGNATURES[key]
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendError("ONNX Runtime is not installed: pip install 'green-mlops[cpu]' "
                           "(or '[gpu]' on a CUDA machine)") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for unreadable graphs
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelDirError(f"{path}: ONNX Runtime cannot load this graph: {first_line}") from exc

    def describe(values):
        return {v.name: TensorInfo(v.name, ORT_DTYPES.get(v.type),
                                   tuple(d if isinstance(d, int) and d > 0 else None for d in v.shape))
                for v in values}

    signature = describe(session.get_inputs()), describe(session.get_outputs())
    _SIGNATURES[key] = signature
    return signature


def _fmt(shape) -> str:
    return "[" + ", ".join("-1" if d is None or d == -1 else str(d) for d in shape) + "]"


def _same_names(where: Path, key: str, kind: str, listed: tuple[str, ...], graph: GraphSpec, found: dict) -> None:
    if set(listed) != set(found):
        raise _fail(where, f"{key}.{kind}", f"lists {list(listed)} but {graph.path.name} has {kind} "
                                            f"{sorted(found)}")


def _shapes_agree(a: tuple, b: tuple) -> bool:
    """Same rank, and equal sizes wherever both are static."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _check_logits(where: Path, key: str, graph: GraphSpec, info: TensorInfo, n_classes: int, role: str) -> None:
    if info.dtype is None or not np.issubdtype(info.dtype, np.floating):
        raise _fail(where, f"{key}.outputs", f"'{info.name}' of {graph.path.name} ({role}) must be a float "
                                             f"tensor, the graph gives {info.dtype}")
    if len(info.shape) != 2:
        raise _fail(where, f"{key}.outputs", f"names '{info.name}' as the {role}, but in {graph.path.name} it has "
                                             f"shape {_fmt(info.shape)}, not [-1, {n_classes}] (outputs are listed "
                                             "in role order: exit logits, then hidden state)")
    if info.shape[1] is not None and info.shape[1] != n_classes:
        raise _fail(where, "classes", f"has {n_classes} entries but the {role} '{info.name}' of "
                                      f"{graph.path.name} has {info.shape[1]} columns")


def check_against_graphs(spec: ModelSpec, keys: tuple[str, ...]) -> None:
    """Check ``model.json`` against every graph: see :func:`load_model_dir`. ``keys`` are the
    model.json fields of the full graph and of each stage, in that order (for the messages)."""
    where = spec.directory / "model.json"
    n_classes = len(spec.classes)
    model_shape = tuple(None if d == -1 else d for d in spec.input_shape)
    previous = None  # (stage key, graph, hidden TensorInfo) of the stage before
    for key, graph in zip(keys, (spec.full, *spec.stages)):
        inputs, outputs = graph_signature(graph.path)
        _same_names(where, key, "inputs", graph.inputs, graph, inputs)
        _same_names(where, key, "outputs", graph.outputs, graph, outputs)
        taken = inputs[graph.inputs[0]]
        if key == "full" or previous is None:
            if taken.name != spec.input_name:
                raise _fail(where, "input.name", f"is '{spec.input_name}' but {graph.path.name} takes "
                                                 f"'{taken.name}'")
            if taken.dtype != spec.input_dtype:
                raise _fail(where, "input.dtype", f"is {spec.input_dtype} but {graph.path.name} takes "
                                                  f"'{taken.name}' as {taken.dtype}")
            if not _shapes_agree(model_shape, taken.shape) or taken.shape[0] is not None or any(
                    m is None and g is not None for m, g in zip(model_shape, taken.shape)):
                raise _fail(where, "input.shape", f"is {_fmt(model_shape)} but {graph.path.name} takes "
                                                  f"'{taken.name}' as {_fmt(taken.shape)} (batch axis dynamic)")
        else:
            prev_key, prev_graph, hidden = previous
            if taken.dtype != hidden.dtype or not _shapes_agree(hidden.shape, taken.shape):
                raise _fail(where, f"{key}.inputs", f"'{taken.name}' of {graph.path.name} is {taken.dtype} "
                                                    f"{_fmt(taken.shape)} but the hidden state '{hidden.name}' "
                                                    f"of {prev_graph.path.name} ({prev_key}) is {hidden.dtype} "
                                                    f"{_fmt(hidden.shape)}: hidden widths must agree")
        if key == "full":
            _check_logits(where, key, graph, outputs[graph.outputs[0]], n_classes, "final logits")
            continue
        if len(graph.outputs) == 2:  # an exit stage: (exit logits, hidden) in role order
            exit_info, hidden_info = outputs[graph.outputs[0]], outputs[graph.outputs[1]]
            if (exit_info.shape[-1:] != (n_classes,) and len(hidden_info.shape) == 2
                    and hidden_info.shape[1] == n_classes):
                raise _fail(where, f"{key}.outputs", f"lists {list(graph.outputs)} but roles go (exit logits, "
                                                     f"hidden state): in {graph.path.name} '{hidden_info.name}' "
                                                     f"is [-1, {n_classes}], the exit logits' shape")
            _check_logits(where, key, graph, exit_info, n_classes, "exit logits")
            previous = (key, graph, outputs[graph.outputs[1]])
        else:
            _check_logits(where, key, graph, outputs[graph.outputs[0]], n_classes, "final logits")
