"""Write a Triton model repository for a model directory's three ONNX graphs.

Models ``<name>_full``, ``<name>_stage1`` and ``<name>_stage2``, each with ``config.pbtxt``
(explicit input/output names, datatypes and dims read from the ONNX signature, ``max_batch_size``,
``dynamic_batching``, ``instance_group``) and ``1/model.onnx``. Two flavours:

* ``onnxruntime_onnx``: Triton's ONNX Runtime backend (what a GPU Triton container runs);
* ``python``: ``1/model.py`` runs ONNX Runtime inside Triton's Python backend, for servers that
  have no ONNX Runtime backend (such as the ``tritonserver`` the ``nvidia-pytriton`` wheel ships).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from targets.errors import GreenMLOpsError
from targets.model_dir import GraphSpec, ModelSpec

ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8", "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING",
}
FLAVOURS = ("onnxruntime_onnx", "python")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}

PYTHON_MODEL = '''"""Triton Python backend model: runs 1/model.onnx with ONNX Runtime (written by green-mlops)."""
import json
from pathlib import Path

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = onnxruntime.InferenceSession(str(path), providers=providers)

    def execute(self, requests):
        # Dynamic batching hands several requests over at once: one ONNX Runtime run for all.
        feeds = {name: np.concatenate([pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests])
                 for name in self.inputs}
        sizes = [pb_utils.get_input_tensor_by_name(r, self.inputs[0]).as_numpy().shape[0] for r in requests]
        results = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                       for name, out in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


@dataclass(frozen=True)
class RepoOptions:
    flavour: str = "onnxruntime_onnx"
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16)
    max_queue_delay_us: int = 500
    instance_kind: str = "cpu"
    instance_count: int = 1
    names: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise GreenMLOpsError(f"flavour must be one of {', '.join(FLAVOURS)}, got '{self.flavour}'")
        if self.instance_kind not in KINDS:
            raise GreenMLOpsError(f"instance kind must be cpu or gpu, got '{self.instance_kind}'")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0:
            raise GreenMLOpsError("max batch size and instance count must be >= 1, queue delay >= 0")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes):
            raise GreenMLOpsError(f"preferred batch sizes must lie in [1, {self.max_batch_size}]")


def triton_model_names(model_name: str) -> dict[str, str]:
    return {key: f"{model_name}_{key}" for key in ("full", "stage1", "stage2")}


def _signature(graph: GraphSpec):
    """(inputs, outputs) as (name, triton type, dims without the batch axis), from the ONNX graph."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])

    def describe(values):
        described = []
        for v in values:
            if v.type not in ORT_TO_TRITON:
                raise GreenMLOpsError(f"{graph.path}: {v.name} has type {v.type}, which Triton cannot serve")
            dims = [d if isinstance(d, int) and d > 0 else -1 for d in v.shape[1:]]
            described.append((v.name, ORT_TO_TRITON[v.type], dims))
        return described

    return describe(session.get_inputs()), describe(session.get_outputs())


def config_pbtxt(name: str, graph: GraphSpec, options: RepoOptions) -> str:
    inputs, outputs = _signature(graph)

    def tensors(kind, items):
        body = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
                          for n, t, d in items)
        return f"{kind} [\n{body}\n]"

    engine = ('platform: "onnxruntime_onnx"' if options.flavour == "onnxruntime_onnx" else 'backend: "python"')
    preferred = ", ".join(str(b) for b in options.preferred_batch_sizes)
    return (f'name: "{name}"\n{engine}\nmax_batch_size: {options.max_batch_size}\n'
            f"{tensors('input', inputs)}\n{tensors('output', outputs)}\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
            f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
            f"instance_group [\n  {{\n    count: {options.instance_count}\n"
            f"    kind: {KINDS[options.instance_kind]}\n  }}\n]\n")


def write_repository(spec: ModelSpec, out: Path, options: RepoOptions = RepoOptions()) -> dict[str, Path]:
    """Write the three models under ``out``; returns their directories by graph key."""
    written = {}
    for key, name in triton_model_names(spec.name).items():
        graph = getattr(spec, key)
        model_dir = out / name
        version = model_dir / "1"
        try:
            version.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(graph.path, version / "model.onnx")
            (model_dir / "config.pbtxt").write_text(config_pbtxt(name, graph, options))
            if options.flavour == "python":
                (version / "model.py").write_text(PYTHON_MODEL)
        except OSError as exc:
            raise GreenMLOpsError(f"cannot write the Triton repository into {out}: {exc}") from exc
        written[key] = model_dir
    return written
