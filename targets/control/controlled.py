"""A controller wrapped around any early-exit backend: the unit the gateway serves and benchmarks time.

With a controller, a batch runs the ladder stage by stage: after each exit every row still
running is decided (continue, or leave with that exit's answer or the skip action), and the rows
that continue go on together as one sub-batch of hidden states, so no work is done twice. A
two-stage model is the ladder with one exit. Without a controller (``controller=None``) every
row runs the full model: the *standard* path of the paper's ablation. Every stage run and every
decision happens inside ``predict``, so a caller timing it times them all. With an auditor
(:mod:`targets.control.audit`), a sampled request's rows are handed to it as they are answered (a copy of
the hidden state a row left with, and a queue put): the stages they skipped run on the auditor's
thread, after the answer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from targets.control.audit import AuditJob, Auditor
from targets.control.controller import (ACTION_CACHE, ACTION_FULL, ACTION_REJECT, BioController, Decision, input_key,
                                uncertainty)
from targets.errors import ConfigError


class EarlyExitBackend(Protocol):
    """What the controlled target needs of a backend (ONNX Runtime in-process, Triton, ...).

    ``stage(i, x)`` runs stage ``i`` (0-based) of the ladder: ``(exit probabilities, hidden)``,
    or ``(final probabilities, None)`` for the last of the ``n_stages`` stages.
    """

    provider: str
    n_stages: int

    def check(self, batch) -> np.ndarray: ...
    def full_probabilities(self, batch: np.ndarray) -> np.ndarray: ...
    def stage(self, index: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass(frozen=True)
class Outcome:
    """One row's answer: probabilities (None when rejected), the controller's last decision for
    it, and the stage it left after (1-based; ``n_stages`` when it ran the whole ladder, None on
    the standard path)."""

    probabilities: np.ndarray | None
    decision: Decision | None
    stage: int | None = None

    @property
    def action(self) -> str:
        return ACTION_FULL if self.decision is None else self.decision.action


class ControlledTarget:
    """``predict(batch) -> list[Outcome]``, one per row, the controller deciding per row.

    With ``track_load`` (default) each call counts as in flight for the controller's congestion
    signal while it runs; a server that measures arrival-to-answer itself passes False.
    """

    def __init__(self, backend: EarlyExitBackend, controller: BioController | None, track_load: bool = True,
                 auditor: Auditor | None = None):
        self.backend = backend
        self.controller = controller
        self.track_load = track_load
        self.auditor = auditor
        self.n_stages = backend.n_stages
        per_exit = controller.config.exit_tau_inf if controller is not None else None
        if per_exit is not None and len(per_exit) != self.n_stages - 1:
            raise ConfigError(f"controller.exit_tau_inf lists {len(per_exit)} thresholds but the model has "
                              f"{self.n_stages - 1} exit(s)")

    @property
    def provider(self) -> str:
        return self.backend.provider

    def check(self, batch) -> np.ndarray:
        """The batch as the model takes it; InputError when it does not fit."""
        return self.backend.check(batch)

    def predict(self, batch, labels: list[int | None] | None = None) -> list[Outcome]:
        """Answer a batch; raises InputError for a batch that does not fit the model. ``labels``
        (the client's, one per row, when it sent them) go to the audit with the rows it samples."""
        batch = self.backend.check(batch)
        controller = self.controller
        if controller is None:
            return [Outcome(row, None) for row in self.backend.full_probabilities(batch)]
        shed = controller.shed_decision()
        if shed is not None:  # budget policy, SLO unmet at the ceiling: no model work at all
            return [Outcome(None, shed, 0) for _ in range(len(batch))]
        if not self.track_load:
            return self._controlled(batch, controller, labels)
        started_ns = time.perf_counter_ns()
        for _ in range(len(batch)):
            controller.request_started()
        try:
            return self._controlled(batch, controller, labels)
        finally:
            latency_ms = (time.perf_counter_ns() - started_ns) / 1e6
            for _ in range(len(batch)):
                controller.request_finished(latency_ms)

    def predict_many(self, batches: list, labels: list | None = None) -> list[list[Outcome]]:
        """Answer several requests' batches with shared stage runs (dynamic batching): one list of
        outcomes per request, each as :meth:`predict` would give it. Per request, as there: the
        shed decision, the audit's draw and the certified path's point; per row, the controller's
        decisions. The batches must have the same row shape and dtype (the caller groups them);
        ``labels`` has one entry (a list or None) per request. Raises InputError when a batch does
        not fit the model, before any model work."""
        if len(batches) == 1:
            return [self.predict(batches[0], labels[0] if labels else None)]
        checked = [self.backend.check(b) for b in batches]
        labels = labels or [None] * len(checked)
        controller = self.controller
        if controller is None:
            return _split([Outcome(row, None) for row in self.backend.full_probabilities(np.concatenate(checked))],
                          [len(b) for b in checked])
        results: list[list[Outcome] | None] = [None] * len(checked)
        served, rows, row_labels, points, audited = [], [], [], [], []
        for k, batch in enumerate(checked):
            shed = controller.shed_decision()
            if shed is not None:
                results[k] = [Outcome(None, shed, 0) for _ in range(len(batch))]
                continue
            served.append(k)
            rows.append(batch)
            request_labels = labels[k]
            row_labels += [_label(request_labels, i) for i in range(len(batch))]
            audit = self.auditor is not None and self.auditor.sample()
            point = controller.path_point()
            points += [point] * len(batch)
            audited += [audit] * len(batch)
        if served:
            joined = np.concatenate(rows)
            started_ns = time.perf_counter_ns()
            if self.track_load:
                for _ in range(len(joined)):
                    controller.request_started()
            try:
                outcomes = self._run_ladder(joined, controller, row_labels, points, audited)
            finally:
                if self.track_load:
                    latency_ms = (time.perf_counter_ns() - started_ns) / 1e6
                    for _ in range(len(joined)):
                        controller.request_finished(latency_ms)
            for k, part in zip(served, _split(outcomes, [len(r) for r in rows])):
                results[k] = part
        return results

    def _controlled(self, batch: np.ndarray, controller: BioController, labels=None) -> list[Outcome]:
        audit = self.auditor is not None and self.auditor.sample()
        point = controller.path_point()  # budget policy: one point of the certified path per request
        n = len(batch)
        return self._run_ladder(batch, controller, [_label(labels, i) for i in range(n)], [point] * n, [audit] * n)

    def _run_ladder(self, batch: np.ndarray, controller: BioController, labels: list, points: list,
                    audited: list) -> list[Outcome]:
        """The ladder on ``batch``, row ``i`` decided at ``points[i]`` and handed to the auditor
        when ``audited[i]``, with label ``labels[i]``."""
        backend, n_stages, n = self.backend, self.n_stages, len(batch)
        auditor = self.auditor
        kind = controller.config.uncertainty
        use_cache = controller.config.skip_action == ACTION_CACHE
        keys = [input_key(row) for row in batch] if use_cache else [None] * n
        answers: list[np.ndarray | None] = [None] * n
        decisions: list[Decision | None] = [None] * n
        left_at = [n_stages] * n
        running = list(range(n))  # original row of each row of `x`
        x = batch
        for index in range(n_stages):
            probabilities, hidden = backend.stage(index, x)
            if index == n_stages - 1:
                for r, i in enumerate(running):
                    answers[i] = probabilities[r]
                    if use_cache:
                        controller.remember(keys[i], probabilities[r])
                    if audited[i] and points[i] is not None:  # it ran the whole ladder: a sampled agreement, no work
                        auditor.submit(AuditJob(n_stages, None, int(probabilities[r].argmax()), points[i][0], labels[i]))
                break
            u = uncertainty(probabilities, kind)
            last_exit = index == n_stages - 2
            going_on = []
            for r, i in enumerate(running):
                decision = controller.decide(float(u[r]), keys[i], index + 1, last_exit, points[i])
                decisions[i] = decision
                if decision.admitted:
                    going_on.append(r)
                    continue
                left_at[i] = index + 1
                if decision.action == ACTION_CACHE:
                    cached = controller.cached(keys[i])
                    # Evicted between decision and lookup: the exit's answer still stands.
                    answers[i] = probabilities[r] if cached is None else cached
                elif decision.action != ACTION_REJECT:
                    answers[i] = probabilities[r]
                    if audited[i] and points[i] is not None:
                        auditor.submit(AuditJob(index + 1, np.array(hidden[r : r + 1]), int(probabilities[r].argmax()),
                                                points[i][0], labels[i]))
            if not going_on:
                break
            running = [running[r] for r in going_on]
            x = hidden if len(going_on) == len(hidden) else hidden[going_on]
        return [Outcome(answers[i], decisions[i], left_at[i]) for i in range(n)]


def _label(labels, i: int) -> int | None:
    return labels[i] if labels is not None and i < len(labels) else None


def _split(outcomes: list[Outcome], sizes: list[int]) -> list[list[Outcome]]:
    parts, start = [], 0
    for size in sizes:
        parts.append(outcomes[start : start + size])
        start += size
    return parts
