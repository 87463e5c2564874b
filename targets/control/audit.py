"""The live audit: does the certificate still apply to the inputs the server sees now?

The budget policy's certificate (:mod:`targets.control.certified_path`) bounds the ladder's accuracy loss
against the full model *for inputs drawn like the validation split*. Production inputs drift. The
loss is measured against the full model, so its premise can be checked without labels: on a random
sample of the requests answered, the auditor runs the stages a row skipped (from the hidden state
it left with, on a thread of its own, after the answer was made: never on the request's latency
path) and records whether the full model would have answered differently (a *disagreement*; a row
that ran the whole ladder is a sampled 0, no work). A row the ladder harms is a row it disagrees
on, so the disagreement rate bounds the harm rate from above.

The test. At every point of the certified path the validation split showed a disagreement rate;
its one-sided upper Clopper–Pearson bound at δ/3 is that point's *reference*. The null hypothesis
is "every audited request disagrees with probability at most the reference of the point it ran".
The auditor bets against it (Waudby-Smith & Ramdas, "Estimating means of bounded random variables
by betting", JRSSB 2024; Shafer's test martingales): a mixture of constant-fraction bets, whose
wealth is a nonnegative supermartingale under the null, so by Ville's inequality it ever reaches
3/δ with probability at most δ/3 however often it is looked at (after every sample). Where labels
arrive (the client's label header), a second test of the same kind, at δ/3 too, bets against "the
harm rate (or, under the net risk, harm − fix) is at most the budget" on the labelled audited
rows. Together: a false alarm with probability at most δ (``audit_risk``, default 1 %) over a run
of any length.

When either test rejects, the certificate is *void*: the budget policy falls back to the strict
end of its path (the full model: the one point that needs no premise) and says so in its state,
which the gateway reports in ``/v2/controller``, ``/metrics``, every answer and the dashboard.
It stays void until the server restarts (recalibrate on data like the new inputs first).

The audit rate is ``audit_rate`` of the requests (default 2 %), raised to ``audit_idle_rate``
(default 25 %) when the request is the only one in flight (the server has idle capacity). A sample
is drawn only while the audit queue has room, a choice that never depends on the row's outcome.
The displayed rate and its bounds are a beta-binomial mixture confidence sequence (Robbins 1970;
Howard et al., Annals of Statistics 2021), valid at every sample size at once.
"""
from __future__ import annotations

import math
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from targets.control.binomial_bounds import clopper_pearson_upper
from targets.control.controller_config import ControllerConfig

AUDIT_RATE, AUDIT_IDLE_RATE, AUDIT_RISK = (ControllerConfig.audit_rate, ControllerConfig.audit_idle_rate,
                                          ControllerConfig.audit_risk)
QUEUE_BOUND = 64  # audit jobs waiting; while full, no request is sampled
BET_FRACTIONS = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7])
"""The mixture's bets, as fractions of the most the null allows (c = 1 would stake everything)."""
ADAPTIVE_WINDOW = 100  # samples the adaptive bet estimates the current rate from
ADAPTIVE_PRIOR = 10.0  # pseudo-samples at the null's rate in that estimate
ADAPTIVE_MAX = 0.9  # the adaptive bet never stakes more than this fraction
AUDIT_NICE = 10  # the audit thread's niceness (Linux sets it per thread): it yields to requests


class SequentialTest:
    """An anytime-valid test of "E[z] ≤ m_i for every sample i" (m_i may change per sample, and is
    known before z_i is seen), z ≥ ``lower``: rejects, for good, once the wealth reaches 1/``delta``.

    The wealth is half an *adaptive* bet and half a mixture of constant bets
    (:data:`BET_FRACTIONS`). The adaptive bet stakes, before each sample, the Kelly fraction for
    the rate of the last :data:`ADAPTIVE_WINDOW` samples (shrunk towards the null): near 0 while
    the data look like the null, so a long clean run costs it almost nothing, and large soon after
    a shift, so the alarm does not wait for the constant bets to earn back what the clean run cost
    them. Every stake is chosen from past samples only, so the wealth stays a nonnegative
    supermartingale under the null (Waudby-Smith & Ramdas 2024: any predictable bet is valid)."""

    def __init__(self, delta: float, lower: float = 0.0):
        self.delta, self.lower = delta, lower
        self.log_wealth = np.zeros(len(BET_FRACTIONS))
        self.log_adaptive = 0.0
        self._recent: deque[tuple[float, float]] = deque()  # (z, x = (z − m)/(m − lower)), the last window
        self._sum_z = self._sum_x = self._sum_x2 = 0.0
        self.n = 0
        self.rejected_at: int | None = None  # the sample count at rejection

    def adaptive_fraction(self, reference: float) -> float:
        """The adaptive bet's stake for the next sample (a fraction of the most the null allows)."""
        if not self._recent:
            return 0.0
        n = len(self._recent) + ADAPTIVE_PRIOR
        if self.lower == 0.0:  # z in {0, 1}: the exact Kelly fraction for the recent rate
            mean_z = (self._sum_z + ADAPTIVE_PRIOR * reference) / n
            b = 1.0 / reference - 1.0
            fraction = (mean_z * b - (1.0 - mean_z)) / b if b > 0 else 0.0
        else:  # bounded z: the growth-optimal fraction to second order, E[x] / E[x²]
            fraction = self._sum_x / max(self._sum_x2, 1e-12)
        return min(max(fraction, 0.0), ADAPTIVE_MAX)

    def update(self, z: float, reference: float) -> bool:
        """Take one sample; True when the null is (or already was) rejected."""
        self.n += 1
        reference = max(reference, 1e-9)  # a reference of 0 still rejects on the first disagreement
        x = (z - reference) / (reference - self.lower)
        self.log_adaptive += math.log1p(self.adaptive_fraction(reference) * x)
        self.log_wealth += np.log1p(BET_FRACTIONS * x)
        self._recent.append((z, x))
        self._sum_z, self._sum_x, self._sum_x2 = self._sum_z + z, self._sum_x + x, self._sum_x2 + x * x
        if len(self._recent) > ADAPTIVE_WINDOW:
            old_z, old_x = self._recent.popleft()
            self._sum_z, self._sum_x, self._sum_x2 = self._sum_z - old_z, self._sum_x - old_x, self._sum_x2 - old_x * old_x
        if self.rejected_at is None and self.e_value >= 1.0 / self.delta:
            self.rejected_at = self.n
        return self.rejected_at is not None

    @property
    def e_value(self) -> float:
        top = max(float(self.log_wealth.max()), self.log_adaptive)
        constant = float(np.mean(np.exp(self.log_wealth - top)))
        return math.exp(top) * (0.5 * math.exp(self.log_adaptive - top) + 0.5 * constant)


def rate_confidence_sequence(successes: int, n: int, delta: float, a: float = 0.5, b: float = 0.5) -> tuple[float, float]:
    """A (1 − δ) confidence sequence for a Bernoulli rate after ``successes`` of ``n``: the set of p
    whose beta-binomial mixture martingale (Beta(a, b) mixing) is below 1/δ. Valid at every n at
    once; (0, 1) before any sample."""
    if n <= 0:
        return 0.0, 1.0
    from scipy.special import betaln  # here, not at import: see targets.control.binomial_bounds

    threshold = math.log(1.0 / delta)
    log_mixture = betaln(a + successes, b + n - successes) - betaln(a, b)

    def log_m(p: float) -> float:  # log of the mixture martingale at p; convex in p
        return log_mixture - successes * math.log(p) - (n - successes) * math.log1p(-p)

    p_hat = successes / n

    def edge(inside: float, outside: float) -> float:
        for _ in range(60):
            middle = 0.5 * (inside + outside)
            if log_m(middle) < threshold:
                inside = middle
            else:
                outside = middle
        return inside

    centre = min(max(p_hat, 1e-12), 1 - 1e-12)
    low = 0.0 if successes == 0 else edge(centre, 1e-300)
    high = 1.0 if successes == n else edge(centre, 1 - 1e-16)
    return low, high


def point_references(disagreements, n_rows: int, delta: float) -> tuple[float, ...]:
    """Per certified point, the one-sided (1 − ``delta``) upper Clopper–Pearson bound of the
    disagreement rate the validation rows showed there."""
    return tuple(clopper_pearson_upper(int(k), n_rows, delta) for k in disagreements)


@dataclass(frozen=True)
class AuditJob:
    """One sampled request row: where it left (``next_stage``, 0-based, is the first stage it did
    not run; ``hidden`` the state it left with, None when it ran the whole ladder), the class it
    was served, the path point it ran and its label when the client sent one."""

    next_stage: int
    hidden: np.ndarray | None
    served: int
    point_index: int
    label: int | None = None


class Auditor:
    """Samples answered rows, runs what they skipped on a thread of its own, tests, and voids the
    budget policy's certificate on evidence (see the module docstring).

    ``backend`` runs the stages (:class:`targets.control.controlled.EarlyExitBackend`); ``controller`` is a
    :class:`targets.control.controller.BioController` with a budget policy; ``references`` the per-point
    disagreement bounds (:func:`point_references`). Start with :meth:`start`, end with :meth:`stop`.
    """

    def __init__(self, backend, controller, references, rate: float = AUDIT_RATE,
                 idle_rate: float = AUDIT_IDLE_RATE, risk: float = AUDIT_RISK, seed: int = 0):
        self.backend, self.controller = backend, controller
        self.budget = controller.budget
        self.references = tuple(references)
        self.rate, self.idle_rate, self.risk = rate, idle_rate, risk
        self._random = random.Random(seed)
        self._queue: queue.Queue[AuditJob | None] = queue.Queue(QUEUE_BOUND)
        self._lock = threading.Lock()
        self.disagreement = SequentialTest(risk / 3.0, lower=0.0)
        net = self.budget.calibration.loss == "net"
        self.harm = SequentialTest(risk / 3.0, lower=-1.0 if net else 0.0)
        self.audited = self.disagreed = 0
        self.labelled = self.served_right = self.full_right = self.harmed = self.fixed = 0
        self.reference_sum = 0.0
        self.skipped = 0  # sampled rows not audited: the queue was full
        self.failed = 0  # audits whose stages raised (the backend failed): not counted
        self._thread: threading.Thread | None = None

    # --- on the request's path: a draw and a put, nothing else --------------------------------------
    def sample(self) -> bool:
        """Whether to audit the current request's rows (drawn once per request)."""
        if self._queue.full():
            return False
        rate = self.idle_rate if self.controller.in_flight <= 1 else self.rate
        return rate > 0 and self._random.random() < rate

    def submit(self, job: AuditJob) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.skipped += 1

    # --- the audit thread ---------------------------------------------------------------------------
    def start(self) -> "Auditor":
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        self._thread = None

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until every submitted job is audited (for tests and orderly ends)."""
        done = threading.Event()
        self.submit_callback(done.set, timeout_s)
        done.wait(timeout_s)

    def submit_callback(self, callback, timeout_s: float) -> None:
        """Queue ``callback`` behind the jobs already queued (it runs on the audit thread)."""
        self._queue.put(callback, timeout=timeout_s)

    def _run(self) -> None:
        try:
            import os

            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AUDIT_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            job = self._queue.get()
            if job is None:
                return
            if callable(job):
                job()
                continue
            try:
                full_class = self._full_class(job)
            except Exception:
                with self._lock:
                    self.failed += 1
                continue
            self.record(job, full_class)

    def _full_class(self, job: AuditJob) -> int | None:
        if job.hidden is None:
            return None  # it ran the whole ladder: its answer is the full model's
        x = job.hidden
        for index in range(job.next_stage, self.backend.n_stages):
            probabilities, x = self.backend.stage(index, x)
        return int(np.asarray(probabilities)[0].argmax())

    def record(self, job: AuditJob, full_class: int | None) -> None:
        """Count one audited row (``full_class`` None: the served answer is the full model's)."""
        full = job.served if full_class is None else full_class
        disagrees = int(full != job.served)
        reference = self.references[min(job.point_index, len(self.references) - 1)]
        with self._lock:
            self.audited += 1
            self.disagreed += disagrees
            self.reference_sum += reference
            broke = self.disagreement.update(disagrees, reference)
            if job.label is not None:
                served_right, full_right = job.served == job.label, full == job.label
                self.labelled += 1
                self.served_right += served_right
                self.full_right += full_right
                harm, fix = int(full_right and not served_right), int(served_right and not full_right)
                self.harmed += harm
                self.fixed += fix
                z = harm - (fix if self.harm.lower < 0 else 0)
                broke = self.harm.update(z, self.budget.calibration.budget) or broke
            if broke and not self.budget.void_reason:
                self.budget.void(self._reason(), self.controller.elapsed_s(), self.audited)

    def _reason(self) -> str:
        if self.disagreement.rejected_at is not None:
            return (f"audited disagreement with the full model {100 * self.disagreed / self.audited:.2f} % over "
                    f"{self.audited} audited rows, above the validation split's "
                    f"{100 * self.reference_sum / self.audited:.2f} % at the same points (sequential test, "
                    f"false alarm ≤ {100 * self.risk:g} %): the inputs no longer look like the calibration data")
        return (f"audited labelled rows: the ladder harmed {self.harmed} and fixed {self.fixed} of {self.labelled} "
                f"against the full model, above the {100 * self.budget.calibration.budget:g} pp budget (sequential test)")

    def state(self) -> dict:
        """What ``/v2/controller`` → ``audit`` reports (rates as fractions)."""
        with self._lock:
            n, k = self.audited, self.disagreed
            low, high = rate_confidence_sequence(k, n, self.risk)
            labelled = None
            if self.labelled:
                labelled = {"rows": self.labelled, "served_accuracy": self.served_right / self.labelled,
                            "full_accuracy": self.full_right / self.labelled, "harmed": self.harmed,
                            "fixed": self.fixed, "loss_pp": 100 * (self.full_right - self.served_right) / self.labelled,
                            "harm_high": rate_confidence_sequence(self.harmed, self.labelled, self.risk)[1],
                            "e_value": self.harm.e_value, "rejected": self.harm.rejected_at is not None}
            return {"state": "void" if self.budget.void_reason else "held", "rate": self.rate,
                    "idle_rate": self.idle_rate, "risk": self.risk, "audited": n, "disagreed": k,
                    "disagreement": k / n if n else None, "disagreement_low": low, "disagreement_high": high,
                    "reference": self.reference_sum / n if n else None, "e_value": self.disagreement.e_value,
                    "alarm_at": 3.0 / self.risk, "skipped": self.skipped, "failed": self.failed,
                    "labelled": labelled, "void_reason": self.budget.void_reason,
                    "void_at_s": self.budget.void_at_s, "void_after_audited": self.budget.void_after_audited}


def make_auditor(backend, controller, seed: int = 0) -> Auditor | None:
    """The started auditor ``controller``'s config asks for (``audit_rate``, ``audit_idle_rate``,
    ``audit_risk``); None without a budget policy (no certificate to audit) or with both rates 0."""
    if controller is None or controller.budget is None:
        return None
    config = controller.config
    if config.audit_rate <= 0 and config.audit_idle_rate <= 0:
        return None
    calibration = controller.budget.calibration
    references = point_references(calibration.disagreements, calibration.n_test, config.audit_risk / 3.0)
    auditor = Auditor(backend, controller, references, config.audit_rate, config.audit_idle_rate,
                      config.audit_risk, seed)
    controller.auditor = auditor
    return auditor.start()
