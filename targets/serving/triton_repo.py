"""Write a Triton model repository for a model directory's ONNX graphs: one Triton model per graph.

Models ``<name>_full`` and ``<name>_stage1`` … ``<name>_stageN`` (one per stage of the ladder; the
gateway's Triton adapter chains them), each with ``config.pbtxt``
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
from targets.backends.triton_target import triton_model_names
from targets.model.model_dir import GraphSpec, ModelSpec, graph_signature

NUMPY_TO_TRITON = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
FLAVOURS = ("onnxruntime_onnx", "python")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
BIO_STAGES = ("auto", "bls", "inline")

PYTHON_MODEL = '''"""Triton Python backend model: runs 1/model.onnx with ONNX Runtime (written by green-mlops)."""
import json
import os
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
        options = onnxruntime.SessionOptions()
        # One intra-op thread per CPU this server may use, none spinning: a spinning thread starves
        # the other backend processes on a server pinned to few CPUs.
        options.intra_op_num_threads = max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 0
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)

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
    bio_instance_count: int = 1  # instances of <name>_bio (each with a controller of its own)
    bio_stages: str = "auto"  # <name>_bio runs the stages as Triton models ("bls"), "inline" (in its own
    # process), or "auto": inline for the python flavour (each stage model another Python process, so BLS pays
    # two hops per stage: measured slower than the full model on digits), bls for onnxruntime_onnx

    @property
    def bio_stages_run(self) -> str:
        if self.bio_stages != "auto":
            return self.bio_stages
        return "inline" if self.flavour == "python" else "bls"

    names: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise GreenMLOpsError(f"flavour must be one of {', '.join(FLAVOURS)}, got '{self.flavour}'")
        if self.bio_stages not in BIO_STAGES:
            raise GreenMLOpsError(f"bio stages must be one of {', '.join(BIO_STAGES)}, got '{self.bio_stages}'")
        if self.instance_kind not in KINDS:
            raise GreenMLOpsError(f"instance kind must be cpu or gpu, got '{self.instance_kind}'")
        if (self.max_batch_size < 1 or self.instance_count < 1 or self.bio_instance_count < 1
                or self.max_queue_delay_us < 0):
            raise GreenMLOpsError("max batch size and instance count must be >= 1, queue delay >= 0")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes):
            raise GreenMLOpsError(f"preferred batch sizes must lie in [1, {self.max_batch_size}]")


def _signature(graph: GraphSpec):
    """(inputs, outputs) as (name, triton type, dims without the batch axis), from the ONNX graph,
    in the order model.json lists them."""
    inputs, outputs = graph_signature(graph.path)

    def describe(names, values):
        described = []
        for name in names:
            v = values[name]
            if v.dtype is None or v.dtype.name not in NUMPY_TO_TRITON:
                raise GreenMLOpsError(f"{graph.path}: {v.name} has type {v.dtype}, which this repository cannot serve")
            dims = [d if d is not None else -1 for d in v.shape[1:]]
            described.append((v.name, NUMPY_TO_TRITON[v.dtype.name], dims))
        return described

    return describe(graph.inputs, inputs), describe(graph.outputs, outputs)


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


def pbtxt_string(text: str) -> str:
    """``text`` as a protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def bio_config_pbtxt(name: str, spec: ModelSpec, options: RepoOptions, parameters: dict) -> str:
    """``config.pbtxt`` of ``<name>_bio`` (Python backend; see :mod:`targets.serving.triton_bio`): the
    model's input, the bio outputs, dynamic batching and instances as for the other models, and
    the ladder with the controller bundle as the ``green_mlops`` parameter (JSON)."""
    import json

    from targets.serving.triton_bio import OUTPUTS, PARAMETER

    input_name, input_type, input_dims = _signature(spec.stages[0])[0][0]
    dims = {"probabilities": [len(spec.classes)], "exit_stage": [1], "path_index": [1], "action": [1]}
    outputs = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, dims[n]))} ]\n  }}'
                         for n, t in OUTPUTS)
    preferred = ", ".join(str(b) for b in options.preferred_batch_sizes)
    value = pbtxt_string(json.dumps(parameters, separators=(",", ":")))
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {options.max_batch_size}\n'
            f'input [\n  {{\n    name: "{input_name}"\n    data_type: {input_type}\n'
            f'    dims: [ {", ".join(map(str, input_dims))} ]\n  }}\n]\n'
            f"output [\n{outputs}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
            f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}\n"
            # The controller runs on the CPU whatever the stages run on; every instance has its own.
            f"instance_group [\n  {{\n    count: {options.bio_instance_count}\n    kind: KIND_CPU\n  }}\n]\n"
            f'parameters {{\n  key: "{PARAMETER}"\n  value: {{\n    string_value: {value}\n  }}\n}}\n')


def write_bio_model(spec: ModelSpec, out: Path, options: RepoOptions, bundle: dict) -> Path:
    """Write ``<name>_bio`` into the repository ``out`` (whose stage models it calls): config,
    ``1/model.py`` and, under ``1/control/targets/``, the control modules it imports, copied
    byte for byte from this installation (:data:`targets.serving.triton_bio.CONTROL_MODULES`)."""
    import targets
    from targets.serving.triton_bio import CONTROL_MODULES, MODEL_PY, PARAMETERS_VERSION, ladder_parameters

    names = triton_model_names(spec.name, spec.n_stages)
    name = f"{spec.name}_bio"
    parameters = {"version": PARAMETERS_VERSION, "ladder": ladder_parameters(spec, names), "bundle": bundle,
                  "stages_run": options.bio_stages_run, "stages_device": options.instance_kind}
    config = bio_config_pbtxt(name, spec, options, parameters)
    model_dir = Path(out) / name
    control = model_dir / "1" / "control" / "targets"
    source = Path(targets.__file__).resolve().parent
    try:
        for module in CONTROL_MODULES:
            (control / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / f"{module}.py", control / f"{module}.py")
        (model_dir / "1" / "model.py").write_text(MODEL_PY)
        (model_dir / "config.pbtxt").write_text(config)
    except OSError as exc:
        raise GreenMLOpsError(f"cannot write the Triton repository into {out}: {exc}") from exc
    return model_dir


def write_repository(spec: ModelSpec, out: Path, options: RepoOptions = RepoOptions(),
                     bio_bundle: dict | None = None) -> dict[str, Path]:
    """Write one model per graph (full and every stage) under ``out``; returns their directories
    by graph key. The model directory was validated when ``spec`` was loaded; here the name and
    the output folder are checked before anything is written. With ``bio_bundle`` (a
    :func:`~targets.control.controller_bundle.controller_bundle`), also ``<name>_bio`` (key ``bio``): the
    ladder and its controller inside Triton (:mod:`targets.serving.triton_bio`)."""
    names = triton_model_names(spec.name, spec.n_stages)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GreenMLOpsError(f"--out {out} is a file, not a directory for the Triton repository")
    graphs = spec.graphs
    configs = {key: config_pbtxt(name, graphs[key], options) for key, name in names.items()}
    written = {}
    for key, name in names.items():
        model_dir = out / name
        version = model_dir / "1"
        try:
            version.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(graphs[key].path, version / "model.onnx")
            (model_dir / "config.pbtxt").write_text(configs[key])
            if options.flavour == "python":
                (version / "model.py").write_text(PYTHON_MODEL)
        except OSError as exc:
            raise GreenMLOpsError(f"cannot write the Triton repository into {out}: {exc}") from exc
        written[key] = model_dir
    if bio_bundle is not None:
        written["bio"] = write_bio_model(spec, out, options, bio_bundle)
    return written
