"""The gateway's live state for the dashboard: per-second figures from the requests it answers.

:class:`LiveState` is fed one :meth:`LiveState.observe` per infer request (status, latency, the
answer's body and, when the client sends it, the row's label) and closes a time point every
``interval_s`` seconds (:meth:`LiveState.tick`). A point holds, for the interval it closes:

* requests/s by outcome (answered, rejected by the controller, failed, client error) and the shed
  rate (rejected over served);
* p50/p95/p99 of the served requests' latency over a sliding window (``window_s``), and the SLO;
* τ (a list: one value per exit of a ladder, one value otherwise), the admission rate and the mean
  exit depth of the rows decided in the interval;
* ê, energy per request and its source label (measured or estimated), cumulative energy and CO2
  (from the gateway's energy feed when it has one: never a figure without its source);
* the running accuracy over the rows whose label the client sent (never guessed otherwise).

The running verdict and the counterfactual ("what the paper's τ(t) would have done on the same J
values") are computed from the same real data; where they cannot be known, they say why.
Pure logic: no web framework; the dashboard module wires it to the gateway.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# The paper's targets (Table III): the same figures as reports.ablation (targets never import
# reports; tests/test_dashboard.py checks that they agree).
PAPER_LATENCY_REDUCTION_PCT = 42.0
PAPER_ACCURACY_LOSS_PP = 0.5

LABEL_HEADER = "x-green-mlops-label"  # the row's true class index, comma-separated for a batch
HEADER_LENGTH = "inference-header-content-length"
PAPER_POLICY = "paper"
EXIT_KEYS = ("exit", "exit_index", "depth")  # where an answer's parameters may say where a row left
Z95 = 1.959963984540054
Z95_ONE_SIDED = 1.6448536269514722  # each bound of the live accuracy verdict holds with probability >= 95 %


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion (None for n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(centre - half, 0.0), min(centre + half, 1.0)


def _split(value, n: int) -> list:
    """A parameter for n rows: a scalar (one row) or a comma-joined string (n rows)."""
    if isinstance(value, str) and "," in value:
        parts = value.split(",")
        return parts if len(parts) == n else [None] * n
    return [value] * n if n == 1 else [None] * n


def _as_bool(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    return None


def _as_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_int(value) -> int | None:
    number = _as_float(value)
    return None if number is None else int(number)


def as_list(value) -> list[float] | None:
    """τ as a list: one entry per exit of a ladder, a single entry otherwise (None if absent)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        values = [_as_float(v) for v in value]
        return values if all(v is not None for v in values) else None
    number = _as_float(value)
    return None if number is None else [number]


@dataclass
class Row:
    """One row of an answer, as the client saw it."""

    action: str | None
    admitted: bool | None
    j: float | None
    tau: float | None
    exit_index: int | None  # the 1-based exit of the row's last decision, when the answer says so
    predicted: int | None
    stage: int | None = None  # stages the row ran, as the gateway counted them (0: shed before any work)


def _argmax_rows(data, binary: bytes, shape: list) -> list[int]:
    if data is not None:  # JSON: a flat list; pure Python beats numpy on a few rows
        n, c = shape
        if len(data) != n * c:
            raise ValueError("output data does not match its shape")
        return [max(range(c), key=data[i * c : (i + 1) * c].__getitem__) for i in range(n)]
    return [int(i) for i in np.frombuffer(binary, dtype=np.float32).reshape(shape).argmax(axis=1)]


def parse_answer(body: bytes, header_length: str | None, predictions: bool = True) -> tuple[list[Row], bool]:
    """The rows of an infer answer's body (JSON or the binary extension) and whether the
    controller rejected it; the predicted classes only with ``predictions``. An answer that
    cannot be read gives no rows, never an exception."""
    try:
        if header_length is not None:
            n = int(header_length)
            document, binary = json.loads(body[:n]), body[n:]
        else:
            document, binary = json.loads(body), b""
    except (ValueError, TypeError):
        return [], False
    if not isinstance(document, dict):
        return [], False
    parameters = document.get("parameters") or {}
    rejected = "error" in document and parameters.get("action") is not None
    if not isinstance(parameters, dict):
        return [], False
    predicted: list[int | None] = []
    outputs = document.get("outputs") or []
    if predictions and outputs and isinstance(outputs[0], dict):
        shape = outputs[0].get("shape") or []
        if len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape):
            try:
                predicted = _argmax_rows(outputs[0].get("data"), binary, shape)
            except (ValueError, TypeError):
                predicted = []
    action = parameters.get("action")
    n = len(predicted) or (len(action.split(",")) if isinstance(action, str) else 0)
    if n == 0:
        return [], rejected
    if not predicted:
        predicted = [None] * n
    if n == 1 and not isinstance(parameters.get("exit", parameters.get("exit_index")), str):
        exit_value = next((parameters[k] for k in EXIT_KEYS if k in parameters), None)
        return [Row(action=action if isinstance(action, str) else None,
                    admitted=_as_bool(parameters.get("admitted")), j=_as_float(parameters.get("j")),
                    tau=_as_float(parameters.get("tau")), exit_index=_as_int(exit_value),
                    predicted=predicted[0], stage=_as_int(parameters.get("stage")))], rejected
    exit_key = next((k for k in EXIT_KEYS if k in parameters), None)
    columns = {
        "action": _split(parameters.get("action"), n),
        "admitted": _split(parameters.get("admitted"), n),
        "j": _split(parameters.get("j"), n),
        "tau": _split(parameters.get("tau"), n),
        "exit": _split(parameters.get(exit_key), n) if exit_key else [None] * n,
        "stage": _split(parameters.get("stage"), n),
    }
    rows = [Row(action=columns["action"][i] if isinstance(columns["action"][i], str) else None,
                admitted=_as_bool(columns["admitted"][i]),
                j=_as_float(columns["j"][i]), tau=_as_float(columns["tau"][i]),
                exit_index=_as_int(columns["exit"][i]), predicted=predicted[i],
                stage=_as_int(columns["stage"][i]))
            for i in range(n)]
    return rows, rejected


def exit_depth(row: Row, n_stages: int) -> int | None:
    """Stages a row ran (1 = left at the first exit; ``n_stages`` = the full model); None when it
    ran none (shed) or the answer does not say.

    From the answer's ``stage`` when it gives one (the gateway's own count), else from its 1-based
    ``exit`` and action (``full`` ran every stage; otherwise it left at that exit), else from the
    action of the two-stage controller: ``full`` ran every stage, ``exit``/``cache``/``reject``
    stage 1 only.
    """
    if row.stage is not None:
        return row.stage if row.stage >= 1 else None
    if row.exit_index is not None:
        return n_stages if row.action == "full" else row.exit_index
    if row.action == "full":
        return n_stages
    if row.action in ("exit", "cache", "reject"):
        return 1
    return None


def policy_name(state: dict | None) -> str | None:
    """The policy a controller state names: ``policy`` as a string, or as a dict's ``policy``
    (a policy's own state); ``paper`` when the state names none (today's τ(t) controller)."""
    if state is None:
        return None
    policy = state.get("policy", PAPER_POLICY)
    if isinstance(policy, dict):
        policy = policy.get("policy", policy.get("name"))
    return policy if isinstance(policy, str) else PAPER_POLICY


def paper_tau(config: dict, elapsed_s: float) -> float | list[float] | None:
    """The paper's τ(t) = τ∞ + (τ0 − τ∞)·e^(−k·t) from a controller config (per exit when τ∞ or
    τ0 are lists); None when the config lacks a parameter."""
    tau0, tau_inf, k = config.get("tau0"), config.get("tau_inf"), _as_float(config.get("k_per_s"))
    if tau0 is None or tau_inf is None or k is None:
        return None
    decay = math.exp(-k * max(elapsed_s, 0.0))
    if isinstance(tau_inf, (list, tuple)) or isinstance(tau0, (list, tuple)):
        n = len(tau_inf) if isinstance(tau_inf, (list, tuple)) else len(tau0)
        inf = list(tau_inf) if isinstance(tau_inf, (list, tuple)) else [tau_inf] * n
        zero = list(tau0) if isinstance(tau0, (list, tuple)) else [tau0] * n
        return [i + (z - i) * decay for z, i in zip(zero, inf)]
    return float(tau_inf) + (float(tau0) - float(tau_inf)) * decay


@dataclass
class _Bucket:
    """What happened since the last point."""

    requests: int = 0
    answered: int = 0
    rejected: int = 0
    failed: int = 0
    client_errors: int = 0
    rows_decided: int = 0
    rows_admitted: int = 0
    depth_sum: int = 0
    depth_n: int = 0


@dataclass
class _Totals:
    requests: int = 0
    answered: int = 0
    rejected: int = 0
    failed: int = 0
    client_errors: int = 0
    latency_ms_sum: float = 0.0
    served: int = 0
    rows_decided: int = 0
    rows_admitted: int = 0
    scored: int = 0
    correct: int = 0
    depth_counts: dict = field(default_factory=dict)
    # counterfactual: rows where the paper's τ(t) on the same J would have decided otherwise
    cf_rows: int = 0
    cf_more_admitted: int = 0
    cf_fewer_admitted: int = 0
    cf_shed: int = 0


class LiveState:
    """Per-second live figures of one gateway; see the module docstring. Thread-safe.

    ``controller_state``: a callable returning the controller's state dict (None: controller
    off). ``energy``: a callable returning the energy feed's totals dict, or None when no feed
    reads energy. ``reference_accuracy``: the full model's held-out accuracy and where it comes
    from, for the accuracy verdict (None: not known).
    """

    def __init__(
        self,
        model: str,
        provider: str,
        controller_state: Callable[[], dict] | None = None,
        energy: Callable[[], dict | None] | None = None,
        slo_ms: float | None = None,
        reference_accuracy: tuple[float, str] | None = None,
        interval_s: float = 1.0,
        window_s: float = 5.0,
        history: int = 900,
        clock: Callable[[], float] = time.time,
    ):
        if interval_s <= 0 or window_s <= 0:
            raise ValueError("interval_s and window_s must be > 0")
        self.model, self.provider = model, provider
        self._controller_state = controller_state
        self._energy = energy
        self.slo_ms = slo_ms
        self.reference_accuracy = reference_accuracy
        self.interval_s, self.window_s = interval_s, window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started_s = clock()
        self._last_point_s = self._started_s
        self._bucket = _Bucket()
        self._totals = _Totals()
        self._window: deque[tuple[float, float]] = deque()  # (t_s, latency_ms) of served requests
        self.points: deque[dict] = deque(maxlen=history)
        self._seq = 0
        # The controller's state, read once per point (reading it per request would cost more
        # than the dashboard is worth): policy, config and n_stages change rarely.
        self._state = controller_state() if controller_state is not None else None
        self._state_at_s = self._started_s

    # --- input ---------------------------------------------------------------------------------
    def observe(self, status: int, latency_ms: float, body: bytes = b"", header_length: str | None = None,
                labels: str | None = None) -> None:
        """One infer request ended with ``status`` after ``latency_ms``; ``body`` is the answer."""
        rows, rejected = (parse_answer(body, header_length, predictions=labels is not None)
                          if status in (200, 503) and body else ([], False))
        truth = None
        if labels is not None and rows:
            truth = [_as_int(v) for v in labels.split(",")]
            if len(truth) != len(rows):
                truth = None
        now = self._clock()
        with self._lock:
            self._tick_locked(now)
            state = self._state
            b, t = self._bucket, self._totals
            b.requests += 1
            t.requests += 1
            if status == 200:
                b.answered += 1
                t.answered += 1
            elif status == 503 and rejected:
                b.rejected += 1
                t.rejected += 1
            elif 400 <= status < 500:
                b.client_errors += 1
                t.client_errors += 1
            else:
                b.failed += 1
                t.failed += 1
            if status == 200 or rejected:
                self._window.append((now, latency_ms))
                t.served += 1
                t.latency_ms_sum += latency_ms
            if rows:
                self._rows_locked(rows, status, truth, state, now)

    def _rows_locked(self, rows: list[Row], status: int, truth: list | None, state: dict | None,
                     now: float) -> None:
        b, t = self._bucket, self._totals
        state = state or {}
        n_stages = state["n_stages"] if isinstance(state.get("n_stages"), int) else 2
        tau_then = None
        if state and policy_name(state) != PAPER_POLICY:
            # the controller's clock now: its t at the last point plus the time since
            elapsed = float(state.get("t_s", 0.0)) + (now - self._state_at_s)
            tau_then = paper_tau(state.get("config") or {}, elapsed)
        for i, row in enumerate(rows):
            if row.admitted is not None:
                b.rows_decided += 1
                t.rows_decided += 1
                b.rows_admitted += row.admitted
                t.rows_admitted += row.admitted
            depth = exit_depth(row, n_stages) if row.action is not None else None
            if depth is not None and row.action != "reject":
                b.depth_sum += depth
                b.depth_n += 1
                t.depth_counts[depth] = t.depth_counts.get(depth, 0) + 1
            if truth is not None and truth[i] is not None:
                t.scored += 1
                # A rejected row got no answer: scored as wrong, as the report does.
                t.correct += status == 200 and row.predicted is not None and row.predicted == truth[i]
            if tau_then is not None and row.j is None and row.action == "reject" and status == 503:
                t.cf_shed += 1  # shed before any decision: the paper's controller never sheds
            if tau_then is not None and row.j is not None and row.admitted is not None:
                threshold = (tau_then[min(row.exit_index or 0, len(tau_then) - 1)]
                             if isinstance(tau_then, list) else tau_then)
                would = row.j <= threshold
                t.cf_rows += 1
                t.cf_more_admitted += would and not row.admitted
                t.cf_fewer_admitted += row.admitted and not would

    # --- points --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Close the current point if an interval has passed (called by readers and writers)."""
        now = self._clock()
        with self._lock:
            self._tick_locked(now)

    def _tick_locked(self, now: float) -> None:
        if now - self._last_point_s < self.interval_s:
            return
        elapsed = now - self._last_point_s
        b = self._bucket
        while self._window and self._window[0][0] < now - self.window_s:
            self._window.popleft()
        latencies = np.fromiter((v for _, v in self._window), dtype=np.float64, count=len(self._window))
        p50, p95, p99 = (np.percentile(latencies, (50, 95, 99)).tolist() if len(latencies)
                         else (None, None, None))
        served = b.answered + b.rejected
        state = self._controller_state() if self._controller_state is not None else None
        self._state, self._state_at_s = state, now
        energy = self._energy() if self._energy is not None else None
        self._seq += 1
        self.points.append({
            "seq": self._seq,
            "t": now,
            "rps": b.requests / elapsed,
            "answered_rps": b.answered / elapsed,
            "rejected_rps": b.rejected / elapsed,
            "failed_rps": b.failed / elapsed,
            "client_error_rps": b.client_errors / elapsed,
            "shed_rate": b.rejected / served if served else None,
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "window_n": len(latencies),
            "slo_ms": self.slo_ms,
            "tau": as_list(state.get("tau")) if state else None,
            "admission_rate": b.rows_admitted / b.rows_decided if b.rows_decided else None,
            "exit_depth_mean": b.depth_sum / b.depth_n if b.depth_n else None,
            "energy_norm": state.get("energy_norm") if state else None,
            "congestion": state.get("congestion") if state else None,
            "energy_j_per_request": (energy or {}).get("last_j_per_request"),
            "energy_source": (energy or {}).get("energy_source"),
            "energy_j_total": (energy or {}).get("energy_j_total"),
            "co2_g_total": (energy or {}).get("co2_g_total"),
            "accuracy": self._totals.correct / self._totals.scored if self._totals.scored else None,
        })
        self._bucket = _Bucket()
        self._last_point_s = now

    # --- output --------------------------------------------------------------------------------
    def totals(self) -> dict:
        """Counts since start: labelled rows, how many right, rows by exit depth."""
        with self._lock:
            t = self._totals
            return {"scored": t.scored, "correct": t.correct,
                    "exit_depth_counts": {str(k): v for k, v in sorted(t.depth_counts.items())}}

    def snapshot(self, since: int = 0) -> dict:
        """Everything the page shows: the points after ``since`` (a point's ``seq``), the current
        figures, the running verdict and the counterfactual."""
        self.tick()
        state = self._controller_state() if self._controller_state is not None else None
        energy = self._energy() if self._energy is not None else None
        with self._lock:
            points = [p for p in self.points if p["seq"] > since]
            t = self._totals
            latest = self.points[-1] if self.points else {}
            totals = {
                "requests": t.requests, "answered": t.answered, "rejected": t.rejected, "failed": t.failed,
                "client_errors": t.client_errors,
                "mean_latency_ms": t.latency_ms_sum / t.served if t.served else None,
                "admission_rate": t.rows_admitted / t.rows_decided if t.rows_decided else None,
                "shed_rate": t.rejected / t.served if t.served else None,
                "exit_depth_counts": {str(k): v for k, v in sorted(t.depth_counts.items())},
                "scored": t.scored, "correct": t.correct,
            }
            counterfactual = self._counterfactual(state, t)
        return {
            "model": self.model, "provider": self.provider,
            "controller": "off" if self._controller_state is None else "bio",
            "policy": policy_name(state),
            "started_at": self._started_s, "now": self._clock(),
            "interval_s": self.interval_s, "window_s": self.window_s, "slo_ms": self.slo_ms,
            "controller_state": _jsonable(state),
            "energy": _jsonable(energy) if energy else {
                "energy_source": "none",
                "note": "no energy source feeds this gateway (started with --energy off, or none reads "
                        "here): energy and CO2 are not known live"},
            "totals": totals,
            "latest": latest,
            "verdict": self._verdict(totals, latest, state) + audit_lines(state),
            "counterfactual": counterfactual,
            "points": points,
        }

    def _verdict(self, totals: dict, latest: dict, state: dict | None = None) -> list[dict]:
        """The running verdict, each line with the numbers it rests on or the reason it is unknown.
        The accuracy target is the budget policy's certified budget when it runs, else the paper's."""
        lines = []
        budget_pp = (((state or {}).get("budget") or {}).get("certificate") or {}).get("budget_pp")
        target_pp = budget_pp if budget_pp is not None else PAPER_ACCURACY_LOSS_PP
        target_name = "budget" if budget_pp is not None else "paper"
        p95, slo = latest.get("p95_ms"), self.slo_ms
        if slo is None:
            lines.append({"name": "p95 latency vs SLO", "status": "unknown", "value": p95,
                          "detail": "no SLO on this gateway (controller off)"})
        elif p95 is None:
            lines.append({"name": "p95 latency vs SLO", "status": "unknown", "value": None,
                          "detail": f"no served request in the last {self.window_s:g} s"})
        else:
            lines.append({"name": "p95 latency vs SLO", "status": "held" if p95 <= slo else "not_held",
                          "value": p95, "target": slo,
                          "detail": f"p95 {p95:.2f} ms over the last {self.window_s:g} s "
                                    f"({latest.get('window_n')} requests) vs SLO {slo:g} ms"})
        lines.append({"name": f"mean latency reduction vs standard (paper: ≥ {PAPER_LATENCY_REDUCTION_PCT:g} %)",
                      "status": "unknown", "value": totals["mean_latency_ms"],
                      "detail": "needs the standard run at the same offered load: the report decides it "
                                "after the run (mean latency here: "
                                + ("–" if totals["mean_latency_ms"] is None else f"{totals['mean_latency_ms']:.2f} ms")
                                + ")"})
        name = (f"accuracy loss vs the full model's build-time accuracy, unpaired ({target_name}: ≤ {target_pp:g} pp)")
        if totals["scored"] == 0:
            lines.append({"name": name, "status": "unknown", "value": None,
                          "detail": "no labelled request yet: accuracy is known live only when the client "
                                    f"sends each row's label ({LABEL_HEADER} header; the locustfiles do)"})
        else:
            accuracy = totals["correct"] / totals["scored"]
            low, high = wilson_interval(totals["correct"], totals["scored"], z=Z95_ONE_SIDED)
            text = (f"live accuracy {100 * accuracy:.2f} % [{100 * low:.2f}, {100 * high:.2f}] over "
                    f"{totals['scored']} labelled rows (rejections scored as wrong)")
            if self.reference_accuracy is None:
                lines.append({"name": name, "status": "unknown", "value": accuracy,
                              "detail": text + "; the full model's accuracy is not known here"})
            else:
                reference, source = self.reference_accuracy
                loss_pp = 100 * (reference - accuracy)
                low_pp, high_pp = 100 * (reference - high), 100 * (reference - low)
                # Decided on the one-sided 95 % bounds, as the report decides: held when the upper
                # bound is within the target, not held when the lower bound is past it.
                status = ("held" if high_pp <= target_pp else
                          "not_held" if low_pp > target_pp else "inconclusive")
                margin = abs(loss_pp - target_pp)
                to_decide = ""
                if status == "inconclusive":
                    half = (high_pp - loss_pp) if loss_pp <= target_pp else (loss_pp - low_pp)
                    to_decide = ("; the estimate sits on the target: no number of rows decides it" if margin == 0 else
                                 f"; about {math.ceil(totals['scored'] * (half / margin) ** 2):,} labelled rows "
                                 "would decide it")
                lines.append({"name": name, "value": loss_pp, "target": target_pp,
                              "status": status,
                              "interval_pp": [100 * (reference - high), 100 * (reference - low)],
                              "detail": f"{text}; full model {100 * reference:.2f} % ({source}); "
                                        f"loss {loss_pp:+.2f} pp, one-sided 95 % bounds "
                                        f"[{100 * (reference - high):+.2f}, {100 * (reference - low):+.2f}] pp "
                                        f"(unpaired, the rows differ: the report pairs by row, and the live audit's "
                                        f"labelled line pairs with the full model on the same rows){to_decide}"})
        return lines

    @staticmethod
    def _counterfactual(state: dict | None, t: _Totals) -> dict:
        if state is None:
            return {"known": False, "reason": "controller off: every request runs the full model"}
        policy = policy_name(state)
        if isinstance(state.get("counterfactual"), dict):  # a controller that computes its own
            return {"known": True, **state["counterfactual"]}
        if policy == PAPER_POLICY:
            return {"known": False, "policy": policy, "other": "budget/SLO feedback",
                    "reason": "this gateway runs the paper's τ(t); the other policy's threshold depends on "
                              "its calibration and feedback state, which this controller does not have: "
                              "not known"}
        if t.cf_rows == 0:
            return {"known": False, "policy": policy, "other": PAPER_POLICY,
                    "reason": "no decision with its J value yet (answers carry J in their parameters)"}
        return {"known": True, "policy": policy, "other": PAPER_POLICY, "rows": t.cf_rows,
                "more_admitted": t.cf_more_admitted, "fewer_admitted": t.cf_fewer_admitted,
                "shed": t.cf_shed,
                "differ_rate": (t.cf_more_admitted + t.cf_fewer_admitted) / t.cf_rows,
                "basis": "the paper's τ(t) = τ∞ + (τ0 − τ∞)·e^(−k·t) from this controller's config, "
                         "applied to the J value of each decision (t taken when its answer left)"}


def audit_lines(state: dict | None) -> list[dict]:
    """The live audit's verdict lines (see targets.control.audit): the certificate held or void, with the
    audited disagreement against the validation split's, and the labelled rows paired against the
    full model on the same rows when the client sent labels. None without a budget policy."""
    audit = (state or {}).get("audit")
    budget = (state or {}).get("budget") or {}
    if not isinstance(audit, dict):
        if budget:
            return [{"name": "certificate (live audit)", "status": "unknown", "value": None,
                     "detail": "the live audit is off (--audit-rate 0 --audit-idle-rate 0): nothing checks that "
                               "the inputs still look like the calibration data"}]
        return []
    n = audit.get("audited") or 0
    if audit.get("state") == "void":
        detail = (f"void since t = {audit.get('void_at_s') or 0:.1f} s, after {audit.get('void_after_audited')} audited "
                  f"rows: {audit.get('void_reason')}; every request now runs the full model")
    elif n == 0:
        detail = "no row audited yet"
    else:
        detail = (f"audited disagreement with the full model {100 * audit['disagreement']:.2f} % "
                  f"[{100 * audit['disagreement_low']:.2f}, {100 * audit['disagreement_high']:.2f}] over {n} rows, "
                  f"validation {100 * audit['reference']:.2f} % at the same points; test wealth "
                  f"{audit['e_value']:.3g} (void at {audit['alarm_at']:.0f})")
    lines = [{"name": "certificate (live audit)", "value": audit.get("disagreement"),
              "status": "not_held" if audit.get("state") == "void" else "held" if n else "unknown",
              "detail": detail}]
    labelled = audit.get("labelled")
    if isinstance(labelled, dict) and labelled.get("rows"):
        budget_pp = (budget.get("certificate") or {}).get("budget_pp")
        status = ("not_held" if labelled.get("rejected") else
                  "held" if budget_pp is not None and 100 * labelled["harm_high"] <= budget_pp else "inconclusive")
        lines.append({"name": "accuracy loss vs full model, same rows (audited, labelled)",
                      "status": status, "value": labelled["loss_pp"], "target": budget_pp,
                      "detail": f"served {100 * labelled['served_accuracy']:.2f} % vs full model "
                                f"{100 * labelled['full_accuracy']:.2f} % on the same {labelled['rows']} rows "
                                f"(harmed {labelled['harmed']}, fixed {labelled['fixed']}): "
                                f"{labelled['loss_pp']:+.2f} pp against a {budget_pp:g} pp budget (rows harmed: at "
                                f"most {100 * labelled['harm_high']:.2f} %, anytime-valid); the audit's labelled test "
                                "voids the certificate when the loss is past the budget"})
    return lines


def _jsonable(value):
    """Replace non-finite floats (JSON has none) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
