"""A controller wrapped around any early-exit backend: the unit the gateway serves and benchmarks time.

With a controller, a batch runs stage 1 once, each row is decided, and stage 2 runs only on the
admitted rows' hidden states, so no work is done twice. Without one (``controller=None``) every
row runs the full model: the *standard* path of the paper's ablation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from targets.controller import ACTION_CACHE, ACTION_FULL, ACTION_REJECT, BioController, Decision, input_key, uncertainty


class EarlyExitBackend(Protocol):
    """What the controlled target needs of a backend (ONNX Runtime in-process, Triton, ...)."""

    provider: str

    def check(self, batch) -> np.ndarray: ...
    def full_probabilities(self, batch: np.ndarray) -> np.ndarray: ...
    def stage1(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def stage2(self, hidden: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Outcome:
    """One row's answer: probabilities (None when rejected) and the controller's decision."""

    probabilities: np.ndarray | None
    decision: Decision | None

    @property
    def action(self) -> str:
        return ACTION_FULL if self.decision is None else self.decision.action


class ControlledTarget:
    """``predict(batch) -> list[Outcome]``, one per row, the controller deciding per row.

    With ``track_load`` (default) each call counts as in flight for the controller's congestion
    signal while it runs; a server that measures arrival-to-answer itself passes False.
    """

    def __init__(self, backend: EarlyExitBackend, controller: BioController | None, track_load: bool = True):
        self.backend = backend
        self.controller = controller
        self.track_load = track_load

    @property
    def provider(self) -> str:
        return self.backend.provider

    def predict(self, batch) -> list[Outcome]:
        """Answer a batch; raises InputError for a batch that does not fit the model."""
        batch = self.backend.check(batch)
        controller = self.controller
        if controller is None:
            return [Outcome(row, None) for row in self.backend.full_probabilities(batch)]
        if not self.track_load:
            return self._controlled(batch, controller)
        started_ns = time.perf_counter_ns()
        for _ in range(len(batch)):
            controller.request_started()
        try:
            return self._controlled(batch, controller)
        finally:
            latency_ms = (time.perf_counter_ns() - started_ns) / 1e6
            for _ in range(len(batch)):
                controller.request_finished(latency_ms)

    def _controlled(self, batch: np.ndarray, controller: BioController) -> list[Outcome]:
        exit_probabilities, hidden = self.backend.stage1(batch)
        u = uncertainty(exit_probabilities, controller.config.uncertainty)
        use_cache = controller.config.skip_action == ACTION_CACHE
        keys = [input_key(row) for row in batch] if use_cache else [None] * len(batch)
        decisions = [controller.decide(float(u[i]), keys[i]) for i in range(len(batch))]
        admitted = [i for i, d in enumerate(decisions) if d.admitted]
        answers: list[np.ndarray | None] = list(exit_probabilities)
        if admitted:
            full = self.backend.stage2(hidden[admitted])
            for row, i in enumerate(admitted):
                answers[i] = full[row]
                if use_cache:
                    controller.remember(keys[i], full[row])
        for i, decision in enumerate(decisions):
            if decision.action == ACTION_REJECT:
                answers[i] = None
            elif decision.action == ACTION_CACHE:
                cached = controller.cached(keys[i])
                # Evicted between decision and lookup: the exit head's answer still stands.
                answers[i] = exit_probabilities[i] if cached is None else cached
        return [Outcome(answers[i], decisions[i]) for i in range(len(batch))]
