"""ONNX Runtime adapter: the full graph and the ladder of stages of an early-exit model, batch in,
probabilities out."""
from __future__ import annotations

import numpy as np

from targets.errors import BackendError, InputError, ModelDirError
from targets.model.model_dir import GraphSpec, ModelSpec

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(
            "ONNX Runtime is not installed: pip install 'green-mlops[cpu]' (or '[gpu]' on a CUDA machine)"
        ) from exc
    return onnxruntime


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable, float32 in and out."""
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def trim_padding(batch: np.ndarray, pad_id: int) -> np.ndarray:
    """Drop trailing columns that are padding in every row (keeping at least one column)."""
    used = np.flatnonzero((batch != pad_id).any(axis=0))
    width = int(used[-1]) + 1 if used.size else 1
    return batch if width == batch.shape[1] else batch[:, :width]


def check_batch(batch, spec: ModelSpec) -> np.ndarray:
    """Return ``batch`` as the model's input array or raise InputError naming what is wrong.

    The batch must be an array of the model's dtype (no silent casts), of shape
    ``(n, *spec.input_shape[1:])`` with ``n >= 1`` (any size >= 1 where the shape says -1),
    holding only finite values. Text models (a tokenizer and a free sequence axis) are trimmed to
    the batch's longest sequence: trailing columns that are padding in every row are dropped, so
    both modes run the same, shorter batch.
    """
    if not isinstance(batch, np.ndarray):
        raise InputError(f"input must be a numpy array, got {type(batch).__name__}")
    if batch.dtype != spec.input_dtype:
        raise InputError(f"input dtype must be {spec.input_dtype}, got {batch.dtype}")
    expected = spec.input_shape[1:]
    if (batch.ndim != len(spec.input_shape) or batch.shape[0] < 1
            or any(e != -1 and g != e or g < 1 for e, g in zip(expected, batch.shape[1:]))):
        want = "[n, " + ", ".join("L" if d == -1 else str(d) for d in expected) + "]"
        raise InputError(f"input shape must be {want} with n >= 1, got {list(batch.shape)}")
    if np.issubdtype(batch.dtype, np.floating) and not np.isfinite(batch).all():
        raise InputError("input holds NaN or infinite values")
    if spec.is_text and batch.ndim == 2 and expected[0] == -1:
        batch = trim_padding(batch, spec.tokenizer_pad_id)
    return np.ascontiguousarray(batch)


class OnnxRuntimeTarget:
    """The full model and every stage of its ladder as ONNX Runtime sessions.

    ``device='auto'`` takes the CUDA execution provider when ONNX Runtime offers it and CPU
    otherwise; ``'cuda'`` insists and raises BackendError when CUDA did not load (ONNX Runtime
    falls back to CPU silently, so the providers each session really got are checked).
    ``provider`` names the provider the sessions run on. Outputs are fetched by the names
    ``model.json`` gives, in role order, never by the graph's output order.

    Intra-op threads do not spin-wait by default: the sessions share the cores, and a pool
    spinning after one session's run stalls the next session's run (measured here: batch-1 p95
    of the full model 9.2 ms with spinning, 1.4 ms without, when sessions alternate).
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: str = "auto",
        intra_op_threads: int | None = None,
        spin_wait: bool = False,
    ):
        if device not in DEVICES:
            raise BackendError(f"device must be one of {', '.join(DEVICES)}, got '{device}'")
        ort = _onnxruntime()
        self.spec = spec
        available = ort.get_available_providers()
        wants_cuda = device == "cuda" or (device == "auto" and CUDA in available)
        if device == "cuda" and CUDA not in available:
            raise BackendError(f"device 'cuda' requested but ONNX Runtime offers only {available}")
        providers = [CUDA, CPU] if wants_cuda else [CPU]
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        self._full = self._session(ort, spec.full, options, providers)
        self._stages = [self._session(ort, graph, options, providers) for graph in spec.stages]
        got = {s.get_providers()[0] for s in (self._full, *self._stages)}
        if wants_cuda and got != {CUDA}:
            if device == "cuda":
                raise BackendError(f"CUDA execution provider failed to load; sessions run on {sorted(got)}")
            got = {CPU}
        self.provider = got.pop()
        self.n_stages = spec.n_stages
        # Output names in role order, asked for by name: the graph's own output order is irrelevant.
        self._full_io = (list(spec.full.outputs), spec.full.inputs[0])
        self._stage_io = [(list(g.outputs), g.inputs[0]) for g in spec.stages]
        self._to_probabilities = softmax if spec.outputs_are == "logits" else (lambda p: p)

    @staticmethod
    def _session(ort, graph: GraphSpec, options, providers):
        try:
            session = ort.InferenceSession(str(graph.path), options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors for unreadable graphs
            raise ModelDirError(f"ONNX Runtime cannot load {graph.path}: {exc}") from exc
        names = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        if names != (set(graph.inputs), set(graph.outputs)):
            raise ModelDirError(
                f"{graph.path}: graph has inputs {sorted(names[0])} and outputs {sorted(names[1])}, "
                f"model.json says {list(graph.inputs)} and {list(graph.outputs)}"
            )
        return session

    def check(self, batch) -> np.ndarray:
        """See :func:`check_batch`."""
        return check_batch(batch, self.spec)

    def predict(self, batch) -> np.ndarray:
        """Class probabilities of the full model, shape ``(n, n_classes)``."""
        return self.full_probabilities(self.check(batch))

    # The methods below take already checked arrays: they are the controlled target's hot path.
    def full_probabilities(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self._full.run(self._full_io[0], {self._full_io[1]: batch})
        return self._to_probabilities(logits)

    def stage(self, index: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run stage ``index`` (0-based) on a checked batch (stage 0) or the previous stage's
        hidden state: ``(exit probabilities, hidden)``, or ``(final probabilities, None)`` for the
        last stage."""
        outputs, input_name = self._stage_io[index]
        outs = self._stages[index].run(outputs, {input_name: x})
        return self._to_probabilities(outs[0]), (outs[1] if len(outs) == 2 else None)

    def stage1(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(exit probabilities, hidden state)`` of the first exit for a checked batch."""
        return self.stage(0, batch)

    def stage2(self, hidden: np.ndarray) -> np.ndarray:
        """Final probabilities from stage 1's hidden state: the rest of the ladder, no exit taken."""
        for index in range(1, self.n_stages):
            probabilities, hidden = self.stage(index, hidden)
        return probabilities
