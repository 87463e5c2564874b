"""The paper's ablation in-process: *standard* (full model on every request) vs *bio* (the ladder
stage by stage, a decision after each exit, the next stage only for rows that continue), batch 1,
closed loop, on the same request sequence.

The two modes run interleaved in blocks over one request order, so drift on a shared machine
(other processes, frequency scaling) lands on both alike. Each request's latency spans the whole
controlled-target call: for bio that is every stage it ran and every decision it took.

Ladder figures (:func:`ladder_figures`): each exit's held-out accuracy, the exit-depth histogram
(where bio's requests left), and the oracle: per request the earliest exit whose answer equals
the full model's, with the latency it would have cost at the measured median stage costs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from profilers.profiler import Profiler, WindowResult, feed_controller
from targets.control.calibration import ladder_outputs
from targets.control.controlled import ControlledTarget, EarlyExitBackend
from targets.control.controller import BioController, uncertainty
from targets.control.controller_config import ControllerConfig

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
    stages: list[int] = field(default_factory=list)  # stage each request left after (1-based)
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
        if outcome.stage is not None:
            self.stages.append(outcome.stage)
        if decision is not None:
            self.tau.append(decision.tau)
            self.u.append(decision.u)


@dataclass
class AblationResult:
    standard: ModeRun
    bio: ModeRun
    request_index: np.ndarray  # evaluation-set row of each measured request
    labels: np.ndarray  # its label
    oracle_agree: np.ndarray  # some exit's answer equals the full model's, per request
    warmup_standard: int
    warmup_bio: int
    tau_settled: bool
    n_stages: int = 2
    oracle_stage: np.ndarray | None = None  # earliest stage whose answer is the full model's, per request
    stage_accuracy: list[float] = field(default_factory=list)  # each exit's, then the final's, on held-out rows
    stage_cost_ms: list[float] = field(default_factory=list)  # mean batch-1 cost of each stage
    block_requests: int = BLOCK_REQUESTS  # requests per interleaved block (the latency bound's unit)


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


@dataclass(frozen=True)
class LadderOracle:
    """Per evaluation row: the earliest stage (1-based) whose answer equals the full model's;
    and each stage's accuracy (every exit's, then the final stage's) over all rows."""

    stage: np.ndarray
    stage_accuracy: list[float]


def ladder_oracle(backend: EarlyExitBackend, x: np.ndarray, y: np.ndarray) -> LadderOracle:
    """See :class:`LadderOracle`; the final stage always agrees (it *is* the full model)."""
    outputs = ladder_outputs(backend, x)
    full_answer = outputs.final.argmax(1)
    earliest = np.full(len(x), backend.n_stages, dtype=np.int64)
    for k in range(len(outputs.exits) - 1, -1, -1):  # deepest first, so the earliest agreeing wins
        earliest[outputs.exits[k].argmax(1) == full_answer] = k + 1
    accuracy = [float((p.argmax(1) == y).mean()) for p in (*outputs.exits, outputs.final)]
    return LadderOracle(earliest, accuracy)


def oracle_agreement(backend: EarlyExitBackend, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Per evaluation row: does some exit already give the full model's answer?"""
    return ladder_oracle(backend, x, np.zeros(len(x), dtype=np.int64)).stage < backend.n_stages


def stage_costs_ms(backend: EarlyExitBackend, x: np.ndarray, rows: int = 200, warmup: int = 20) -> list[float]:
    """Median batch-1 latency of each stage of the ladder, every row running every stage (the
    median, so that a shared machine's stalls do not decide the shape of the ladder)."""
    sample = [backend.check(x[i : i + 1]) for i in range(min(rows, len(x)))]
    timings = np.zeros((len(sample), backend.n_stages))
    for n, row in enumerate([*sample[:warmup], *sample]):
        hidden = row
        for index in range(backend.n_stages):
            started = time.perf_counter_ns()
            _, hidden = backend.stage(index, hidden)
            if n >= min(warmup, len(sample)):
                timings[n - min(warmup, len(sample)), index] = (time.perf_counter_ns() - started) / 1e6
    return [float(v) for v in np.median(timings, axis=0)]


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
    controller: BioController | None = None,
) -> AblationResult:
    """Run both modes over ``order`` (rows of ``x``) after their warm-ups; see the module doc.

    Bio's warm-up lasts at least ``warmup_requests`` and until τ(t) has settled (at most
    ``MAX_SETTLE_S``), so the measured part sees the steady threshold the deployment would.
    With a ``profiler``, each block of each mode is one energy window (opened and closed outside
    the timed requests); bio's windows feed its controller's energy signal ê.
    """
    standard = ControlledTarget(backend, None)
    bio = ControlledTarget(backend, controller or BioController(config, clock=clock))
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

    oracle = ladder_oracle(backend, x, y)
    earliest = oracle.stage[order]
    return AblationResult(runs["standard"], runs["bio"], order, y[order], earliest < backend.n_stages,
                          len(warm), warm_bio, tau_settled, n_stages=backend.n_stages, oracle_stage=earliest,
                          stage_accuracy=oracle.stage_accuracy, stage_cost_ms=stage_costs_ms(backend, x))


def sweep_taus(backend: EarlyExitBackend, x_validation: np.ndarray, config: ControllerConfig,
               n_points: int) -> list[float]:
    """Sweep points chosen on the validation split: τ = α·(1 − q) for ``n_points`` quantiles q
    (10 %…90 %) of the uncertainty the validation rows show at the first exit (every row
    reaches it; with one τ at every exit it decides most of the admission rate)."""
    outputs = ladder_outputs(backend, x_validation)
    u = uncertainty(outputs.exits[0], config.uncertainty)
    quantiles = np.quantile(u, np.linspace(0.1, 0.9, n_points))
    return sorted({round(config.alpha * (1 - q), 4) for q in quantiles})


def run_sweep(
    backend: EarlyExitBackend,
    base: ControllerConfig,
    tau_values: list[float],
    x: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Bio at a fixed τ (τ0 = τ∞ at every exit, no decay) for each value, interleaved block by
    block with standard over the same requests: measured admission, depth, latency, accuracy,
    and the latency reduction against the standard runs interleaved with it."""
    rows = [x[i : i + 1] for i in range(len(x))]
    standard = ControlledTarget(backend, None)
    targets = [ControlledTarget(backend, BioController(replace(base, tau0=tau, tau_inf=tau, exit_tau_inf=None,
                                                                                policy="paper")))
               for tau in tau_values]
    for target in (standard, *targets):
        for i in order[: min(len(order), 50)]:
            _timed(target, rows[i])
    std_run, runs = ModeRun("standard"), [ModeRun("bio") for _ in targets]
    for start in range(0, len(order), BLOCK_REQUESTS):
        block = order[start : start + BLOCK_REQUESTS]
        for i in block:
            std_run.record(*_timed(standard, rows[i]))
        for target, run in zip(targets, runs):
            for i in block:
                run.record(*_timed(target, rows[i]))
        if progress is not None:
            progress(min(start + BLOCK_REQUESTS, len(order)))
    std_mean = float(np.mean(std_run.latency_ms))
    points = []
    for tau, run in zip(tau_values, runs):
        mean_ms = float(np.mean(run.latency_ms))
        points.append({
            "tau_inf": float(tau),
            "admission_rate": float(np.mean(run.admitted)),
            "mean_depth": float(np.mean(run.stages)) if run.stages else None,
            "mean_latency_ms": mean_ms,
            "standard_mean_latency_ms": std_mean,
            "latency_reduction_pct": 100 * (1 - mean_ms / std_mean),
            "accuracy": float(np.mean(np.asarray(run.predicted) == y[order])),
            "standard_accuracy": float(np.mean(np.asarray(std_run.predicted) == y[order])),
        })
    return points


def _histogram(stages, n_stages: int) -> dict[str, int]:
    counts = np.bincount(np.asarray(stages, dtype=np.int64), minlength=n_stages + 1)[1:]
    return {str(k): int(c) for k, c in enumerate(counts, start=1)}


def ladder_figures(result: AblationResult, calibration=None) -> dict:
    """What the report needs about the ladder (validate.json → ``ladder``): see the module doc.

    ``oracle_latency_reduction_pct_estimated`` is an estimate: every request leaving at its oracle
    stage, costed at the measured median batch-1 stage costs, against running every stage.
    """
    n_stages = result.n_stages
    bio_stages = np.asarray(result.bio.stages, dtype=np.int64)
    costs = np.asarray(result.stage_cost_ms)
    cumulative = np.cumsum(costs) if costs.size else None
    oracle = result.oracle_stage if result.oracle_stage is not None else np.full(len(result.labels), n_stages)
    oracle_ms = float(np.mean(cumulative[oracle - 1])) if cumulative is not None and len(oracle) else None
    ladder_ms = float(cumulative[-1]) if cumulative is not None else None
    labels = np.asarray(result.labels)
    bio_correct = np.asarray(result.bio.predicted) == labels
    figures = {
        "n_stages": n_stages,
        "n_exits": n_stages - 1,
        "stage_accuracy_heldout": [round(a, 6) for a in result.stage_accuracy],
        "depth_histogram": _histogram(bio_stages, n_stages),
        "mean_depth": float(bio_stages.mean()) if bio_stages.size else None,
        "accuracy_by_depth": {str(k): float(bio_correct[bio_stages == k].mean())
                              for k in range(1, n_stages + 1) if (bio_stages == k).any()},
        "oracle_depth_histogram": _histogram(oracle, n_stages),
        "oracle_mean_depth": float(np.mean(oracle)) if len(oracle) else None,
        "stage_cost_ms": [round(c, 4) for c in costs.tolist()],
        "oracle_mean_latency_ms_estimated": oracle_ms,
        "oracle_latency_reduction_pct_estimated": (100 * (1 - oracle_ms / ladder_ms)
                                                   if oracle_ms is not None and ladder_ms else None),
    }
    if calibration is not None:
        figures["calibration"] = {"measure": calibration.measure, "u_star": list(calibration.u_star),
                                  "source": calibration.source, "method": calibration.method,
                                  "n_validation": calibration.n_validation}
    return figures


def ladder_lines(figures: dict) -> list[str]:
    """The ladder figures as plain console lines."""
    n = figures["n_stages"]
    total = sum(figures["depth_histogram"].values()) or 1
    depth = " · ".join(f"{k}: {100 * c / total:.1f} %" for k, c in figures["depth_histogram"].items())
    oracle = " · ".join(f"{k}: {100 * c / max(sum(figures['oracle_depth_histogram'].values()), 1):.1f} %"
                        for k, c in figures["oracle_depth_histogram"].items())
    accuracy = " · ".join(f"{k}: {100 * a:.2f} %" for k, a in enumerate(figures["stage_accuracy_heldout"], start=1))
    lines = [f"ladder: {n} stages ({n - 1} exits) · held-out accuracy per stage {accuracy}",
             f"bio left after stage (of {n}) {depth} · mean depth {figures['mean_depth']:.2f}",
             f"oracle (earliest exit with the full model's answer) {oracle} · mean depth "
             f"{figures['oracle_mean_depth']:.2f}"]
    if figures.get("oracle_latency_reduction_pct_estimated") is not None:
        costs = ", ".join(f"{c:.3f}" for c in figures["stage_cost_ms"])
        lines.append(f"oracle latency reduction {figures['oracle_latency_reduction_pct_estimated']:.1f} % "
                     f"(estimated: median stage costs {costs} ms, against running every stage)")
    if "calibration" in figures:
        c = figures["calibration"]
        lines.append(f"u* per exit ({c['measure']}, from {c['source']}): "
                     + ", ".join(f"{u:.4f}" for u in c["u_star"]))
    return lines
