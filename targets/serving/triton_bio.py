"""Bio inside Triton: the ladder and its τ(t) controller as one Triton model, ``<name>_bio``.

Triton's dynamic batcher hands the model a list of requests; :class:`BioModel` runs stage 1 on
all their rows at once, lets the controller decide every row (the same
:class:`~targets.control.controlled.ControlledTarget` and :class:`~targets.control.controller.BioController` the
gateway runs, rebuilt from a :mod:`controller bundle <targets.control.controller_bundle>` with the
certified thresholds), and sends the rows that continue on as one sub-batch to the next stage
model, through Triton's business-logic scripting (BLS): ``<name>_stage2`` … ``<name>_stageN``,
served by the same server. Each request gets its rows' probabilities and where each row left.

This module never imports Triton: the Python backend's ``model.py`` (:data:`MODEL_PY`, written
by :mod:`targets.serving.triton_repo`) passes a ``call(model, inputs, outputs)`` function that runs a BLS
request, so the same code runs in tests with ONNX Runtime behind ``call``. It imports the control
modules only (never FastAPI or the gateway): :data:`CONTROL_MODULES` lists what the repository
copies next to ``model.py``, byte for byte.

Outputs, per row: ``probabilities`` (FP32, NaN when the controller refused the row),
``exit_stage`` (INT32: the 1-based stage the row left after; 0 when shed before any work),
``path_index`` (INT32: the certified path point it was decided at; −1 under the paper's policy),
``action`` (BYTES: exit, full, cache, reject or shed). A request whose rows were shed or rejected
gets an error instead (Triton's ``UNAVAILABLE`` where the server has it): a refusal is never an
answer.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from targets.control.controlled import ControlledTarget, Outcome
from targets.control.controller import ACTION_REJECT, ACTION_SHED
from targets.control.controller_bundle import controller_from_bundle
from targets.errors import ConfigError
from targets.backends.ort_target import softmax, trim_padding

CONTROL_MODULES = ("__init__", "errors", "model/__init__", "model/model_dir", "model/tokenizer",
                   "backends/__init__", "backends/ort_target",
                   "control/__init__", "control/binomial_bounds", "control/certify", "control/certified_path",
                   "control/controller_config", "control/slo_loop", "control/budget_policy", "control/controller",
                   "control/audit", "control/controlled", "control/controller_bundle",
                   "serving/__init__", "serving/triton_bio")
"""The ``targets`` modules the Triton model imports, as paths under ``targets/`` (closed under their
imports; no FastAPI, no gateway)."""
OUTPUTS = (("probabilities", "TYPE_FP32"), ("exit_stage", "TYPE_INT32"), ("path_index", "TYPE_INT32"),
           ("action", "TYPE_STRING"))
PARAMETER = "green_mlops"  # the config.pbtxt parameter holding the ladder and the controller bundle
PARAMETERS_VERSION = 1

REFUSALS = {ACTION_SHED: "shed by the budget policy", ACTION_REJECT: "rejected by the controller"}
"""How a refusal's error message starts (after the model's name), by action: clients read them back
with :func:`refused_by_triton_bio`."""

Call = Callable[[str, dict, list], list]
"""``call(triton_model_name, {input_name: array}, [output_name, ...]) -> [array, ...]``."""


def refused_by_triton_bio(message) -> str | None:
    """The action (``shed``, ``reject``) of a bio model's refusal, from Triton's error message;
    None for any other message."""
    if not isinstance(message, str):
        return None
    return next((action for action, words in REFUSALS.items() if words in message), None)


def triton_bio_parameters(outputs: dict) -> dict:
    """A bio model's outputs (JSON ``data`` lists by output name, one row) as the parameters the
    gateway answers with: ``stage``, ``action``, ``admitted`` and ``path_index``."""
    def first(name):
        data = outputs.get(name)
        return data[0] if isinstance(data, list) and data else None

    action = first("action")
    path_index = first("path_index")
    return {"stage": first("exit_stage"), "action": action, "admitted": action == "full",
            "path_index": None if path_index is None or path_index < 0 else path_index}


class TritonStages:
    """The early-exit backend interface over stage models reached through ``call``."""

    def __init__(self, ladder: dict, call: Call):
        self.provider = "triton-bls"
        self.n_stages = len(ladder["stages"])
        self._stages = ladder["stages"]
        self._full = ladder["full"]
        self._call = call
        self._pad_id = ladder.get("pad_id")
        self._to_probabilities = softmax if ladder["outputs_are"] == "logits" else (lambda p: p)

    def check(self, batch) -> np.ndarray:
        """Triton checked the dtype and dims against config.pbtxt (text widths: :meth:`common_width`)."""
        return np.asarray(batch)

    def common_width(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Text: every request cut or padded (with the pad id) to the width of the longest row among
        them all, so the columns that are padding in every row go, as the gateway trims a request,
        and one dynamic batch is one ladder run. The text stages mask padding, so a row's answer
        does not depend on its width (up to float rounding). Other inputs are returned as they are."""
        if self._pad_id is None or any(b.ndim != 2 for b in batches):
            return batches
        width = max(trim_padding(b, self._pad_id).shape[1] for b in batches)
        return [b[:, :width] if b.shape[1] >= width else
                np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=self._pad_id) for b in batches]

    def full_probabilities(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self._call(self._full["model"], {self._full["input"]: batch}, self._full["outputs"][:1])
        return self._to_probabilities(np.asarray(logits, dtype=np.float32))

    def stage(self, index: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        g = self._stages[index]
        outs = self._call(g["model"], {g["input"]: np.ascontiguousarray(x)}, g["outputs"])
        probabilities = self._to_probabilities(np.asarray(outs[0], dtype=np.float32))
        return probabilities, (outs[1] if len(outs) > 1 else None)


def ladder_parameters(spec, names: dict[str, str]) -> dict:
    """What the Triton model needs to know of the ladder: stage models (Triton names), their
    input and output names, the full model, and how outputs become probabilities."""
    def graph(key: str, g) -> dict:
        return {"model": names[key], "input": g.inputs[0], "outputs": list(g.outputs)}

    return {"stages": [graph(f"stage{k + 1}", g) for k, g in enumerate(spec.stages)],
            "full": graph("full", spec.full), "outputs_are": spec.outputs_are, "classes": list(spec.classes),
            "pad_id": spec.tokenizer_pad_id if spec.is_text else None}


class BioModel:
    """The ladder and its controller inside Triton (see the module docstring).

    ``parameters``: ``{"version", "ladder": ladder_parameters(...), "bundle": controller_bundle(...)}``."""

    def __init__(self, parameters: dict, call: Call, clock: Callable[[], float] = time.monotonic):
        if not isinstance(parameters, dict) or parameters.get("version") != PARAMETERS_VERSION:
            raise ConfigError(f"the {PARAMETER} parameter is not version {PARAMETERS_VERSION} of the bio model's "
                              "settings: rewrite the repository with this green-mlops ('green-mlops triton repo --bio')")
        self.controller = controller_from_bundle(parameters["bundle"], clock=clock)
        self.backend = TritonStages(parameters["ladder"], call)
        self.target = ControlledTarget(self.backend, self.controller)
        self.n_stages = self.backend.n_stages
        self.rows_by_stage = [0] * (self.n_stages + 1)  # index 0: shed before any work
        self.requests = 0
        self.runs = 0
        self.refused_requests = 0

    def answer(self, batches: list[np.ndarray]) -> list[list[Outcome]]:
        """Outcomes per request; requests whose rows share a shape and dtype share the stage runs
        (text requests of any length do: :meth:`TritonStages.common_width`)."""
        results: list[list[Outcome] | None] = [None] * len(batches)
        batches = self.backend.common_width(batches)
        groups: dict[tuple, list[int]] = {}
        for k, batch in enumerate(batches):
            groups.setdefault((batch.shape[1:], batch.dtype.str), []).append(k)
        for members in groups.values():
            self.runs += 1
            for k, outcomes in zip(members, self.target.predict_many([batches[k] for k in members])):
                results[k] = outcomes
        self.requests += len(batches)
        for outcomes in results:
            for outcome in outcomes:
                self.rows_by_stage[self.left_after(outcome)] += 1
        return results

    def left_after(self, outcome: Outcome) -> int:
        """The 1-based stage a row left after; 0 when it was shed before any work."""
        if outcome.action == ACTION_SHED:
            return 0
        return self.n_stages if outcome.stage is None else outcome.stage

    @staticmethod
    def refusal(outcomes: list[Outcome]) -> str | None:
        """Why the request gets no answer (a row shed or rejected), or None."""
        actions = {o.action for o in outcomes if o.probabilities is None}
        if not actions:
            return None
        if ACTION_SHED in actions:
            return f"{REFUSALS[ACTION_SHED]}: the latency SLO is unmet at the certified ceiling (retry later)"
        if ACTION_REJECT in actions:
            return f"{REFUSALS[ACTION_REJECT]} (skip action 'reject'): the exit was not confident enough"
        return f"refused by the controller ({', '.join(sorted(actions))})"

    def encode(self, outcomes: list[Outcome]) -> dict[str, np.ndarray]:
        """One request's outputs as arrays (see the module docstring)."""
        n = len(outcomes)
        n_classes = next((len(o.probabilities) for o in outcomes if o.probabilities is not None), 1)
        probabilities = np.full((n, n_classes), np.nan, dtype=np.float32)
        for i, o in enumerate(outcomes):
            if o.probabilities is not None:
                probabilities[i] = o.probabilities
        return {
            "probabilities": probabilities,
            "exit_stage": np.array([[self.left_after(o)] for o in outcomes], dtype=np.int32),
            "path_index": np.array([[-1 if o.decision is None or o.decision.path_index is None
                                     else o.decision.path_index] for o in outcomes], dtype=np.int32),
            "action": np.array([[o.action.encode()] for o in outcomes], dtype=np.object_),
        }

    def state(self) -> dict:
        """Counters and the controller's state, for the custom metrics."""
        budget = self.controller.budget
        return {"requests": self.requests, "runs": self.runs, "rows_by_stage": list(self.rows_by_stage),
                "tau": self.controller.tau(), "congestion": self.controller.congestion(),
                "path_level": None if budget is None else budget.last_level,
                "path_index": None if budget is None else budget.last_index}


MODEL_PY = '''"""Triton Python backend model: the early-exit ladder and its tau(t) controller (written by
green-mlops; see targets/serving/triton_bio.py in the control/ folder next to this file)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "control"))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from targets.serving.triton_bio import PARAMETER, BioModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.input_name = config["input"][0]["name"]
        parameters = json.loads(config["parameters"][PARAMETER]["string_value"])
        call = self._call
        if parameters.get("stages_run") == "inline":
            call = self._inline_call(Path(args["model_repository"]).parent, parameters["ladder"],
                                     parameters.get("stages_device") == "gpu")
        self.bio = BioModel(parameters, call)
        self.metrics, self.families = None, []
        if hasattr(pb_utils, "MetricFamily"):
            labels = {"model": self.name}

            def family(name, description, kind):
                # A family must outlive its metrics (Triton's rule): keep every one until finalize.
                self.families.append(pb_utils.MetricFamily(name, description, kind))
                return self.families[-1]

            gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
            rows = family("green_mlops_bio_rows", "Rows answered, by the stage they left after (0: shed before "
                          "any work)", counter)
            self.metrics = {
                "rows": [rows.Metric(labels={**labels, "stage": str(k)}) for k in range(self.bio.n_stages + 1)],
                "requests": family("green_mlops_bio_requests", "Requests answered or refused",
                                   counter).Metric(labels=labels),
                "runs": family("green_mlops_bio_runs", "Ladder runs (one per batch the dynamic batcher formed, "
                               "per input shape)", counter).Metric(labels=labels),
                "tau": family("green_mlops_bio_tau", "The controller's tau(t)", gauge).Metric(labels=labels),
                "congestion": family("green_mlops_bio_congestion", "The controller's congestion signal c",
                                     gauge).Metric(labels=labels),
                "level": family("green_mlops_bio_path_level", "Budget policy: the level on the certified path "
                                "(0 strict, 1 the ceiling)", gauge).Metric(labels=labels),
            }
            self._reported = {"rows": [0] * (self.bio.n_stages + 1), "requests": 0, "runs": 0}

    @staticmethod
    def _inline_call(repository, ladder, gpu):
        """The stage graphs run here, in this process, with ONNX Runtime (no hop to another model)."""
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()  # as the repository's Python models: see triton_repo.PYTHON_MODEL
        options.intra_op_num_threads = max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else 0
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        graphs = [*ladder["stages"], ladder["full"]]
        sessions = {g["model"]: onnxruntime.InferenceSession(str(repository / g["model"] / "1" / "model.onnx"),
                                                            options, providers=providers) for g in graphs}

        def call(model, inputs, outputs):
            return sessions[model].run(list(outputs), inputs)

        return call

    def _call(self, model, inputs, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs]

    def _error(self, message):
        code = getattr(pb_utils.TritonError, "UNAVAILABLE", None)
        error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
        return pb_utils.InferenceResponse(error=error)

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            results = self.bio.answer(batches)
        except Exception as exc:  # a stage model failed: every request of this batch gets the error
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {exc}")) for _ in requests]
        responses = []
        for outcomes in results:
            refusal = self.bio.refusal(outcomes)
            if refusal is not None:
                self.bio.refused_requests += 1
                responses.append(self._error(f"{self.name}: {refusal}"))
                continue
            arrays = self.bio.encode(outcomes)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in arrays.items()]))
        self._report()
        return responses

    def _report(self):
        if self.metrics is None:
            return
        state = self.bio.state()
        for k, (now, before) in enumerate(zip(state["rows_by_stage"], self._reported["rows"])):
            if now > before:
                self.metrics["rows"][k].increment(now - before)
        for key in ("requests", "runs"):
            if state[key] > self._reported[key]:
                self.metrics[key].increment(state[key] - self._reported[key])
        self._reported = {"rows": list(state["rows_by_stage"]), "requests": state["requests"], "runs": state["runs"]}
        self.metrics["tau"].set(state["tau"])
        self.metrics["congestion"].set(state["congestion"])
        if state["path_level"] is not None:
            self.metrics["level"].set(state["path_level"])

    def finalize(self):
        self.metrics = None
        self.families = []
'''
