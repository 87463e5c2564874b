"""The bio-inspired τ(t) admission controller (DESIGN.md §1, with the paper's sign error resolved).

For each request::

    J = α·(1 − u) + β·ê + γ·ĉ        admit  ⇔  J ≤ τ(t)        τ(t) = τ∞ + (τ0 − τ∞)·e^(−k·t)

* ``u`` in [0, 1]: uncertainty of the exit head's answer (high u: the full model is worth running).
* ``ê`` in [0, 1]: EWMA of energy per request over a reference budget; 0 while no meter feeds it,
  and every decision records which source (``none`` then) it came from.
* ``ĉ`` in [0, 1]: congestion, ``max((in_flight − 1)/capacity, p95_recent_ms/slo_ms)`` clipped.
* ``t``: seconds since the controller started, on an injectable clock.

Over a ladder of exits the same rule runs at every exit k, with that exit's uncertainty u_k and
threshold τ_k(t) = τ∞_k + (τ0 − τ∞_k)·e^(−k·t) (τ∞_k calibrated per exit, see
:mod:`targets.control.calibration`): J ≤ τ_k means the row *continues* to the next stage (at the last exit:
the full model's final stage runs). A row that does not continue takes the configured skip action
there: ``exit`` (that exit's answer), ``cache`` (an earlier full answer for the same input, else
the exit's) or ``reject`` (no answer). Every decision records the exit it was made at.
All methods are thread-safe.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from targets.control.controller_config import ControllerConfig
from targets.errors import ConfigError

if TYPE_CHECKING:
    from targets.control.budget_policy import BudgetPolicy

ACTION_FULL, ACTION_EXIT, ACTION_CACHE, ACTION_REJECT = "full", "exit", "cache", "reject"
ACTION_SHED = "shed"  # budget policy: shed before any work, the SLO unmet at the certified ceiling
ACTION_CONTINUE = "continue"  # a ladder row goes on to the next stage (not yet its final decision)
P95_REFRESH_EVERY = 16  # finished requests between recomputations of the recent p95
# The SLO loop's p95s cover the requests finished in the last second, not the last N requests:
# once the loop sheds, N answered requests span ever longer, and a count window would keep showing
# it the overload it has already removed (measured: the p95 it acted on froze for 8 s at 95 % shed).
SLO_WINDOW_S = 1.0


def uncertainty(probabilities: np.ndarray, kind: str) -> np.ndarray:
    """Per-row uncertainty in [0, 1] of class probabilities ``(n, c)``.

    ``entropy``: Shannon entropy over log(c). ``least_confidence``: (1 − max p) over (1 − 1/c).
    ``margin``: 1 − (p_top1 − p_top2). All are 0 for a one-hot row and 1 for a uniform one.
    """
    n_classes = probabilities.shape[1]
    if kind == "entropy":
        logs = np.log(np.maximum(probabilities, 1e-12))
        u = np.einsum("ij,ij->i", probabilities, logs) * (-1.0 / math.log(n_classes))
    elif kind == "least_confidence":
        u = (1.0 - probabilities.max(axis=1)) * (1.0 / (1.0 - 1.0 / n_classes))
    elif kind == "margin":
        top2 = np.partition(probabilities, n_classes - 2, axis=1)[:, -2:]
        u = 1.0 - (top2[:, 1] - top2[:, 0])
    else:
        raise ValueError(f"unknown uncertainty '{kind}'")
    # np.clip costs more than the entropy itself on one row; min/max bound rounding error.
    return np.minimum(np.maximum(u, 0.0), 1.0)


def input_key(row: np.ndarray) -> bytes:
    """Cache key of one input: a 128-bit BLAKE2 hash of its bytes, dtype and shape."""
    digest = hashlib.blake2b(row.tobytes(), digest_size=16)
    digest.update(f"{row.dtype}{row.shape}".encode())
    return digest.digest()


@dataclass(frozen=True)
class Decision:
    """What the controller did for one request at one exit, and the signals it rested on.

    ``exit_index`` is the exit (1-based: exit 1 follows stage 1) the decision was made at;
    ``admitted`` means the row goes on past it.
    """

    t_s: float
    u: float
    energy_norm: float
    energy_source: str
    congestion: float
    j: float
    tau: float
    admitted: bool
    action: str
    exit_index: int = 1
    threshold: float | None = None  # budget policy: the exit threshold u was compared with (leave iff u < it)
    path_index: int | None = None  # budget policy: the point of the certified path the request ran

    def as_record(self) -> dict:
        return asdict(self)


class BioController:
    """Decides, per request, whether the full model runs; see the module docstring."""

    def __init__(
        self,
        config: ControllerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_decision: Callable[[Decision], None] | None = None,
        budget: "BudgetPolicy | None" = None,
    ):
        """``budget`` (policy 'budget', see :mod:`targets.control.budget_policy`) bounds every decision by
        the certified ceiling and carries the SLO loop; None is the paper's controller."""
        if (budget is None) != (config.policy == "paper"):
            raise ConfigError(f"controller policy '{config.policy}' needs "
                              f"{'a' if budget is None else 'no'} certified budget")
        self.budget = budget
        self.shed = 0
        self.config = config
        self._clock = clock
        self._started_s = clock()
        self._on_decision = on_decision
        self._lock = threading.Lock()
        self._in_flight = 0
        self.auditor = None  # the live audit of the budget policy's certificate (targets.control.audit), when one runs
        self._latencies_ms: deque[float] = deque(maxlen=config.latency_window)
        self._slo_samples: deque[tuple[float, float, float]] = deque()  # (finished s, latency ms, service ms)
        self._since_p95 = 0
        self._p95_ms = 0.0
        self._energy_j_per_request: float | None = None
        self._energy_source = "none"
        self._recent_admitted: deque[bool] = deque(maxlen=config.latency_window)
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._external_congestion = 0.0
        self.decisions = 0  # rows decided for good (left at an exit, or ran the full ladder)
        self.admitted = 0  # of those, rows that ran the full ladder
        self.exit_decisions = 0  # every decision at every exit

    # --- signals -------------------------------------------------------------------------
    def elapsed_s(self) -> float:
        return self._clock() - self._started_s

    def tau(self, elapsed_s: float | None = None, exit_index: int = 1) -> float:
        """τ_k(t) of exit ``exit_index`` at ``elapsed_s`` seconds since start (now when omitted)."""
        c = self.config
        t = self.elapsed_s() if elapsed_s is None else elapsed_s
        tau_inf = c.tau_inf_at(exit_index)
        return tau_inf + (c.tau0 - tau_inf) * math.exp(-c.k_per_s * max(t, 0.0))

    def energy_norm(self) -> float:
        """ê: the energy-per-request EWMA over ``energy_ref_j``, clipped to [0, 1]; 0 if unmeasured."""
        if self._energy_j_per_request is None:
            return 0.0
        return min(max(self._energy_j_per_request / self.config.energy_ref_j, 0.0), 1.0)

    def congestion(self) -> float:
        """ĉ: the largest of queue occupancy beyond this request, recent p95 over the SLO, and
        the backend's own congestion when one reports it (e.g. Triton's queue time)."""
        queue = (self._in_flight - 1) / self.config.capacity
        latency = self._p95_ms / self.config.slo_ms
        return min(max(queue, latency, self._external_congestion, 0.0), 1.0)

    def set_backend_congestion(self, value: float) -> None:
        """The backend's congestion in [0, 1], polled by whoever watches the backend."""
        self._external_congestion = min(max(float(value), 0.0), 1.0)

    def observe_energy(self, joules_per_request: float, source: str) -> None:
        """Feed one energy-per-request reading (e.g. a profiler window) into the EWMA behind ê."""
        if not math.isfinite(joules_per_request) or joules_per_request < 0:
            return
        with self._lock:
            previous = self._energy_j_per_request
            w = self.config.energy_ewma_weight
            self._energy_j_per_request = (
                joules_per_request if previous is None else w * joules_per_request + (1 - w) * previous
            )
            self._energy_source = source

    @property
    def in_flight(self) -> int:
        """Requests (or rows, when the caller counts rows) started and not yet finished."""
        return self._in_flight

    def request_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def request_finished(self, latency_ms: float | None, service_ms: float | None = None) -> None:
        """One request left; its latency (arrival to answer) joins the recent window unless None
        (e.g. bad input). The budget policy's SLO loop sees the p95 of latency and of service time
        (the model's work alone, no queueing; the latency when not given) over the requests
        finished in the last ``SLO_WINDOW_S``."""
        with self._lock:
            self._in_flight = max(self._in_flight - 1, 0)
            if latency_ms is None:
                return
            self._latencies_ms.append(latency_ms)
            if self.budget is not None and self.budget.loop is not None:
                now_s = self._clock()
                self._slo_samples.append((now_s, latency_ms, latency_ms if service_ms is None else service_ms))
                while self._slo_samples[0][0] < now_s - SLO_WINDOW_S:
                    self._slo_samples.popleft()
            self._since_p95 += 1
            if self._since_p95 >= P95_REFRESH_EVERY:
                self._p95_ms = float(np.percentile(self._latencies_ms, 95))
                self._since_p95 = 0
                if self._slo_samples:
                    window = np.array([(latency, service) for _, latency, service in self._slo_samples])
                    self.budget.observe_p95(float(np.percentile(window[:, 0], 95)),
                                            float(np.percentile(window[:, 1], 95)))

    # --- decisions -----------------------------------------------------------------------
    def path_point(self) -> tuple[int, tuple[float, ...]] | None:
        """Budget policy: the point of the certified path the signals choose now (see
        :mod:`targets.control.budget_policy`), ``(index, per-exit thresholds)``; None under the paper policy.
        Take it once per request and pass it to every :meth:`decide` of that request."""
        if self.budget is None:
            return None
        c = self.config
        with self._lock:
            slack = self.tau(self.elapsed_s()) - c.beta * self.energy_norm() - c.gamma * self.congestion()
            lambda_j = (1.0 - slack / c.alpha) if c.alpha > 0 else (math.inf if slack < 0 else -math.inf)
            return self.budget.point(lambda_j)

    def decide(self, u: float, key: bytes | None = None, exit_index: int = 1, last_exit: bool = True,
               point: tuple[int, tuple[float, ...]] | None = None) -> Decision:
        """Decide at exit ``exit_index`` for one row whose exit head there has uncertainty ``u``:
        continue (admitted) or leave with the skip action.

        ``last_exit``: this is the ladder's last exit, so continuing means the full model's answer
        (action ``full``); elsewhere continuing is action ``continue``. ``key`` (see
        :func:`input_key`) is needed only by the ``cache`` skip action. ``point`` (budget policy):
        the path point of this request, from :meth:`path_point`; taken now when omitted.
        """
        c = self.config
        if self.budget is not None and point is None:
            point = self.path_point()
        with self._lock:
            elapsed = self.elapsed_s()
            tau = self.tau(elapsed, exit_index)
            energy, congestion = self.energy_norm(), self.congestion()
            j = c.alpha * (1.0 - u) + c.beta * energy + c.gamma * congestion
            threshold = path_index = None
            if point is None:
                admitted = j <= tau
            else:
                path_index, threshold = point[0], point[1][exit_index - 1]
                admitted = not u < threshold
            if admitted:
                action = ACTION_FULL if last_exit else ACTION_CONTINUE
            elif c.skip_action == ACTION_CACHE and key is not None and key in self._cache:
                self._cache.move_to_end(key)
                action = ACTION_CACHE
            elif c.skip_action == ACTION_REJECT:
                action = ACTION_REJECT
            else:
                action = ACTION_EXIT
            self.exit_decisions += 1
            if action != ACTION_CONTINUE:
                self.decisions += 1
                self.admitted += admitted
                self._recent_admitted.append(admitted)
            decision = Decision(elapsed, float(u), energy, self._energy_source, congestion,
                                float(j), tau, bool(admitted), action, exit_index, threshold, path_index)
        if self._on_decision is not None:
            self._on_decision(decision)
        return decision

    def shed_decision(self) -> Decision | None:
        """Budget policy: a shed decision for a request about to start, or None to serve it.

        Load is shed only when the SLO loop sits at the certified ceiling and p95 still exceeds
        the SLO (overload action 'reject'); the request then costs no model work.
        """
        if self.budget is None or not self.budget.should_shed():
            return None
        with self._lock:
            elapsed = self.elapsed_s()
            self.shed += 1
            decision = Decision(elapsed, math.nan, self.energy_norm(), self._energy_source, self.congestion(),
                                math.nan, self.tau(elapsed), False, ACTION_SHED, 0, None, self.budget.ceiling_index)
        if self._on_decision is not None:
            self._on_decision(decision)
        return decision

    def cached(self, key: bytes) -> np.ndarray | None:
        with self._lock:
            return self._cache.get(key)

    def remember(self, key: bytes, probabilities: np.ndarray) -> None:
        """Keep a full-model answer for the ``cache`` skip action (LRU, ``cache_size`` entries)."""
        if self.config.cache_size <= 0:
            return
        with self._lock:
            self._cache[key] = probabilities
            self._cache.move_to_end(key)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    def state(self) -> dict:
        """The live state: τ, signals, counters and the admission rate over the recent window."""
        with self._lock:
            recent = list(self._recent_admitted)
            return {
                "t_s": self.elapsed_s(),
                "tau": self.tau(),
                "tau_per_exit": ([self.tau(None, k) for k in range(1, len(self.config.exit_tau_inf) + 1)]
                                 if self.config.exit_tau_inf else None),
                "energy_norm": self.energy_norm(),
                "energy_source": self._energy_source,
                "energy_j_per_request": self._energy_j_per_request,
                "congestion": self.congestion(),
                "in_flight": self._in_flight,
                "p95_recent_ms": self._p95_ms,
                "service_p95_recent_ms": (self.budget.loop.last_service_p95_ms
                                          if self.budget is not None and self.budget.loop is not None else None),
                "decisions": self.decisions,
                "admitted": self.admitted,
                "exit_decisions": self.exit_decisions,
                "policy": self.config.policy,
                "shed": self.shed,
                "budget": None if self.budget is None else self.budget.state(),
                "audit": None if self.auditor is None else self.auditor.state(),
                "admission_rate_recent": (sum(recent) / len(recent)) if recent else None,
                "cache_entries": len(self._cache),
                "config": asdict(self.config),
            }
