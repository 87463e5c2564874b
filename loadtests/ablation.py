"""The paper's ablation in-process: *standard* (full model on every request) vs *bio* (stage 1,
decision, stage 2 only when admitted), batch 1, closed loop, on the same request sequence.

The two modes run interleaved in blocks over one request order, so drift on a shared machine
(other processes, frequency scaling) lands on both alike. Each request's latency spans the whole
controlled-target call: for bio that is stage 1, the decision and stage 2 when admitted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from profilers.profiler import Profiler, WindowResult, feed_controller
from targets.controlled import ControlledTarget, EarlyExitBackend
from targets.controller import BioController
from targets.controller_config import ControllerConfig

BLOCK_REQUESTS = 64
SETTLE_FRACTION = 0.01  # τ counts as settled within 1 % of (τ0 − τ∞) of τ∞
MAX_SETTLE_S = 30.0


@dataclass
class ModeRun:
    """Per-request results of one mode, in request order."""

    mode: str
    latency_ms: list[float] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    admitted: list[bool] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    u: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    energy_j: float | None = None  # over the measured requests, from the profiler's windows
    energy_source: str = "none"
    co2_g: float | None = None

    def add_window(self, window: WindowResult) -> None:
        energy_j, label = window.energy_j()
        if energy_j is not None:
            self.energy_j = (self.energy_j or 0.0) + energy_j
            self.energy_source = label
        co2_g = window.co2_g()
        if co2_g is not None:
            self.co2_g = (self.co2_g or 0.0) + co2_g

    def record(self, latency_ms: float, outcome) -> None:
        self.latency_ms.append(latency_ms)
        probabilities, decision = outcome.probabilities, outcome.decision
        self.predicted.append(-1 if probabilities is None else int(np.argmax(probabilities)))
        self.admitted.append(True if decision is None else decision.admitted)
        self.actions.append(outcome.action)
        if decision is not None:
            self.tau.append(decision.tau)
            self.u.append(decision.u)


@dataclass
class AblationResult:
    standard: ModeRun
    bio: ModeRun
    request_index: np.ndarray  # evaluation-set row of each measured request
    labels: np.ndarray  # its label
    oracle_agree: np.ndarray  # exit head's answer equals the full model's, per request
    warmup_standard: int
    warmup_bio: int
    tau_settled: bool


def request_order(n_eval: int, n_requests: int | None, min_requests: int, seed: int = 0) -> np.ndarray:
    """The evaluation set repeated (each pass shuffled) to at least ``min_requests``, capped at
    ``n_requests`` when given."""
    passes = max(1, -(-min_requests // n_eval))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n_eval) for _ in range(passes)])
    return order[:n_requests] if n_requests else order


def _timed(target: ControlledTarget, row: np.ndarray):
    started = time.perf_counter_ns()
    (outcome,) = target.predict(row)
    return (time.perf_counter_ns() - started) / 1e6, outcome


def _settled(controller: BioController) -> bool:
    c = controller.config
    if c.k_per_s == 0 or c.tau0 == c.tau_inf:
        return True
    return abs(controller.tau() - c.tau_inf) <= SETTLE_FRACTION * abs(c.tau0 - c.tau_inf)


def oracle_agreement(backend: EarlyExitBackend, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Per evaluation row: does the exit head already give the full model's answer?"""
    agree = []
    for start in range(0, len(x), batch):
        chunk = backend.check(x[start : start + batch])
        exit_p, _ = backend.stage1(chunk)
        agree.append(exit_p.argmax(1) == backend.full_probabilities(chunk).argmax(1))
    return np.concatenate(agree)


def run_ablation(
    backend: EarlyExitBackend,
    config: ControllerConfig,
    x: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    warmup_requests: int = 200,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    profiler: Profiler | None = None,
) -> AblationResult:
    """Run both modes over ``order`` (rows of ``x``) after their warm-ups; see the module doc.

    Bio's warm-up lasts at least ``warmup_requests`` and until τ(t) has settled (at most
    ``MAX_SETTLE_S``), so the measured part sees the steady threshold the deployment would.
    With a ``profiler``, each block of each mode is one energy window (opened and closed outside
    the timed requests); bio's windows feed its controller's energy signal ê.
    """
    standard = ControlledTarget(backend, None)
    bio = ControlledTarget(backend, BioController(config, clock=clock))
    rows = [x[i : i + 1] for i in range(len(x))]
    warm = order[: max(1, min(warmup_requests, len(order)))]
    for i in warm:
        _timed(standard, rows[i])
    warm_bio, settle_deadline = 0, time.monotonic() + MAX_SETTLE_S
    while warm_bio < len(warm) or (not _settled(bio.controller) and time.monotonic() < settle_deadline):
        _timed(bio, rows[warm[warm_bio % len(warm)]])
        warm_bio += 1
    tau_settled = _settled(bio.controller)

    runs = {"standard": ModeRun("standard"), "bio": ModeRun("bio")}
    done = 0
    for start in range(0, len(order), BLOCK_REQUESTS):
        block = order[start : start + BLOCK_REQUESTS]
        for target, run in ((standard, runs["standard"]), (bio, runs["bio"])):
            window = f"{run.mode}-{start}"
            if profiler is not None:
                profiler.begin_window(window)
            block_started = time.perf_counter()
            for i in block:
                run.record(*_timed(target, rows[i]))
            run.wall_s += time.perf_counter() - block_started
            if profiler is not None:
                result = profiler.end_window(window)
                run.add_window(result)
                feed_controller(result, len(block), target.controller)
        done += len(block)
        if progress is not None:
            progress(done)

    agree = oracle_agreement(backend, x)
    return AblationResult(runs["standard"], runs["bio"], order, y[order], agree[order],
                          len(warm), warm_bio, tau_settled)


def run_sweep(
    backend: EarlyExitBackend,
    base: ControllerConfig,
    tau_values: list[float],
    x: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Bio at a fixed τ (τ0 = τ∞, no decay) for each value: measured admission, latency, accuracy."""
    rows = [x[i : i + 1] for i in range(len(x))]
    points = []
    for n, tau in enumerate(tau_values):
        target = ControlledTarget(backend, BioController(replace(base, tau0=tau, tau_inf=tau)))
        for i in order[: min(len(order), 50)]:
            _timed(target, rows[i])
        run = ModeRun("bio")
        for i in order:
            run.record(*_timed(target, rows[i]))
        points.append({
            "tau_inf": float(tau),
            "admission_rate": float(np.mean(run.admitted)),
            "mean_latency_ms": float(np.mean(run.latency_ms)),
            "accuracy": float(np.mean(np.asarray(run.predicted) == y[order])),
        })
        if progress is not None:
            progress(n + 1)
    return points
