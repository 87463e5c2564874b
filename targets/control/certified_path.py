"""The budget policy's certificate: an ordered path of per-exit threshold vectors, certified by
Learn-then-Test with fixed-sequence testing.

A *threshold vector* t = (t_1 … t_E) holds one threshold per exit: a row leaves at the first exit k
whose uncertainty u_k < t_k, else it runs the whole ladder. The *path* is an ordered list of such
vectors, from strict (all zero: nothing leaves early) to loose. Its points are tested in order on
the *test* rows: the null hypothesis at a point is "the risk of this vector exceeds the budget B";
testing stops at the first point whose null is not rejected at level δ. Fixed-sequence testing
controls the family-wise error at δ, so with probability at least 1 − δ over the draw of the test
rows, **every** point up to the last rejected one (the *certified ceiling*) has risk ≤ B at once.
The controller may therefore run any of them, and only them.

How the path is made (:func:`calibrate_path`, ``path`` setting):

* ``per-exit``: *screen, then test* (Angelopoulos et al., "Learn then Test", 2021; the two-stage
  design of Ringel et al., "Early Time Classification with Accumulated Accuracy Gap Control",
  ICML 2024). A seeded third of the validation rows (the *screen* part) orders the vectors:
  starting from all zeros, each step loosens the one exit whose next grid threshold buys the most
  saving (stage costs; every stage one in use) per unit of risk added on the screen rows
  (:func:`greedy_path`). The other
  two thirds (the *test* part) certify it. The screen rows never enter a p-value, so the path is
  fixed before the test rows are looked at, as fixed-sequence testing requires.
* ``shared``: the data-free path (λ, …, λ) over :data:`THRESHOLD_GRID`, tested on every validation
  row: one threshold at every exit (what Jazbec et al., "Fast yet Safe: Early-Exiting with Risk
  Control", NeurIPS 2024, control). No screen rows are spent, so it can certify with fewer rows.
* ``auto`` (default): ``per-exit`` when the test part alone could certify the budget with at least
  :data:`AUTO_MIN_HARMS` harmed rows observed (a property of n, B and δ, never of the data), else
  ``shared``: screening pays only when the test part has room to spare.

The risk (``loss`` setting), per row, against the full model's answer on the same row:

* ``harm``: 1 when the full model is right and the ladder wrong, else 0. Its mean bounds the
  accuracy loss from above (fixes are ignored), and a {0, 1} loss admits the exact binomial p-value.
* ``net``: harm − fix, in {−1, 0, 1} (fix: the full model wrong, the ladder right). Its mean *is*
  the accuracy gap, so fixes offset harms. The p-value is exact for the trinomial counts, the
  discordance a nuisance parameter handled as Berger & Boos (JASA 1994) do: maximised over a
  confidence interval for it, that interval's risk added (:func:`trinomial_p_value`). A betting
  test (Waudby-Smith & Ramdas, JRSSB 2024) would be valid too, but it pays for validity at every
  sample size: with the rows fixed in advance it needs about 2·ln(1/δ)/z² ≈ 2.8 times the rows
  for the same bound at δ = 0.1.

What the certificate covers: the expected loss over the population the validation split was drawn
from, given one calibration draw, for the vectors on the path up to the ceiling. Not covered: a
finite held-out set (its own sampling noise remains), a shifted input distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from targets.control.binomial_bounds import clopper_pearson_lower, clopper_pearson_upper
from targets.control.certify import THRESHOLD_GRID, binomial_p_value, smallest_certifiable_budget
from targets.errors import ConfigError

PATH_NAME = "ltt-fixed-sequence-path"
PATH_VERSION = "1"
"""The certificate as validate.json records it: :func:`calibrate_path`. Any change to what it
returns takes a new version."""
LOSSES = ("harm", "net")
PATH_KINDS = ("auto", "per-exit", "shared")
SCREEN_FRACTION = 1.0 / 3.0
SCREEN_SEED = 0  # which validation rows screen the path (fixed, so a model's certificate is reproducible)
AUTO_MIN_HARMS = 10
"""``auto`` takes the per-exit path when the test part could certify the budget with this many
harmed rows observed (the exact binomial test); fewer, and the screen rows are worth more as test
rows. Chosen out of fold: on ``reviews`` (3,060 validation rows, whose two-thirds test part allows
5 harms at 0.5 pp), 200 re-splits of validation ∪ held-out saved 30.0 % with the shared path and
26.4 % with the per-exit one (``green-mlops crossval --model reviews``)."""
NUISANCE_GAMMA = 1e-3  # net risk: the share of δ spent on the discordance's confidence interval
NUISANCE_GRID = 48
GREEDY_PRIOR_ROWS = 0.5  # risk added to every greedy step, in rows: a free step that saves more goes first


@dataclass(frozen=True)
class PathCalibration:
    """A certified path: its points (vectors of per-exit thresholds, strict first), how far it is
    certified, and how it was made. ``ceiling`` is the index of the loosest certified point (None:
    not even the strict end passed); ``p_values`` and ``test_risks`` follow the points tested, up
    to and including the first failure; ``exit_rate`` and ``depth_histogram`` describe the ceiling
    on the test rows."""

    points: tuple[tuple[float, ...], ...]
    ceiling: int | None
    budget: float
    delta: float
    loss: str
    kind: str  # "per-exit" or "shared"
    n_validation: int
    n_screen: int
    n_test: int
    p_values: tuple[float, ...]
    test_risks: tuple[float, ...]
    exit_rate: float | None
    depth_histogram: tuple[int, ...] | None
    disagreements: tuple[int, ...] = ()
    """Per point up to the ceiling: test rows whose answer there differs from the full model's (the
    live audit's reference, :mod:`targets.control.audit`)."""

    @property
    def certified(self) -> bool:
        return self.ceiling is not None

    @property
    def ceiling_thresholds(self) -> tuple[float, ...] | None:
        return None if self.ceiling is None else self.points[self.ceiling]

    @property
    def smallest_certifiable(self) -> float:
        """The smallest budget the test rows could certify, with no row harmed or fixed (for the net
        risk, up to the γ it spends on the discordance)."""
        return smallest_certifiable_budget(self.n_test, self.delta - (NUISANCE_GAMMA if self.loss == "net" else 0.0))

    def thresholds_at(self, level: float) -> tuple[int, tuple[float, ...]]:
        """The point at ``level`` ∈ [0, 1] of the certified part (0: strict, 1: the ceiling):
        ``(index, thresholds)``, rounding down, so a level never reaches past the ceiling."""
        if self.ceiling is None:
            raise ConfigError("the certificate certified no point of its path")
        level = min(max(level, 0.0), 1.0) if math.isfinite(level) else (1.0 if level > 0 else 0.0)
        index = min(int(math.floor(level * self.ceiling + 1e-9)), self.ceiling)
        return index, self.points[index]

    def as_dict(self) -> dict:
        return {"rule": PATH_NAME, "version": PATH_VERSION, "path": self.kind, "loss": self.loss,
                "budget_pp": 100 * self.budget, "risk_delta": self.delta, "certified": self.certified,
                "n_validation": self.n_validation, "n_screen": self.n_screen, "n_test": self.n_test,
                "n_calibration": self.n_test, "path_points": len(self.points), "ceiling_index": self.ceiling,
                "ceiling_thresholds": list(self.ceiling_thresholds) if self.certified else None,
                "smallest_certifiable_budget_pp": 100 * self.smallest_certifiable,
                "exit_rate": self.exit_rate,
                "depth_histogram": list(self.depth_histogram) if self.depth_histogram else None,
                "test_risk_pp": [100 * r for r in self.test_risks], "p_values": list(self.p_values),
                "disagreements": list(self.disagreements)}


def ladder_depths(u: np.ndarray, thresholds) -> np.ndarray:
    """Per row, the 0-based exit it leaves at under ``thresholds`` (E: it runs the whole ladder)."""
    leaves = u < np.asarray(thresholds, dtype=np.float64)[None, :]
    return np.where(leaves.any(axis=1), leaves.argmax(axis=1), u.shape[1])


def row_outcomes(u: np.ndarray, exit_right: np.ndarray, full_right: np.ndarray, thresholds):
    """``(depth, harmed, fixed)`` per row under one threshold vector."""
    depth = ladder_depths(u, thresholds)
    answers = np.concatenate([exit_right, full_right[:, None]], axis=1)
    right = answers[np.arange(len(full_right)), depth]
    return depth, full_right & ~right, ~full_right & right


def trinomial_p_value(harms: int, fixes: int, n: int, budget: float) -> float:
    """Exact p-value of H0 "harm rate − fix rate ≥ ``budget``" from ``harms`` and ``fixes`` among
    ``n`` rows (see the module docstring).

    T = harms − fixes. Given the discordant rows D = harms + fixes, harms ~ Binomial(D, π) with
    π = p_h / (p_h + p_f), so P(T ≤ t) = Σ_D P(D) · P(harms ≤ (t + D)/2 | D) exactly; under H0 it is
    largest on the boundary p_h − p_f = B, where it depends on the discordance p_d = p_h + p_f
    alone. p_d is a nuisance: the p-value is the largest P(T ≤ t) over a (1 − γ) Clopper–Pearson
    interval of p_d, plus γ (Berger & Boos 1994), γ = :data:`NUISANCE_GAMMA`; the largest is taken
    over :data:`NUISANCE_GRID` points of the interval."""
    from scipy import special

    if n <= 0:
        return 1.0
    t = harms - fixes
    discordant = harms + fixes
    low = max(clopper_pearson_lower(discordant, n, NUISANCE_GAMMA / 2), budget)
    high = clopper_pearson_upper(discordant, n, NUISANCE_GAMMA / 2)
    if high < budget:  # the discordance alone is below the budget: the gap cannot reach it
        return NUISANCE_GAMMA
    p_d = np.unique(np.linspace(low, high, NUISANCE_GRID))[:, None]
    spread = 12.0 * math.sqrt(n * high * (1 - low)) + 12.0  # D beyond this carries no mass at any p_d
    d = np.arange(max(0, int(n * low - spread)), min(n, int(n * high + spread)) + 1)[None, :].astype(np.float64)
    log_pmf = (special.gammaln(n + 1.0) - special.gammaln(d + 1.0) - special.gammaln(n - d + 1.0)
               + d * np.log(p_d) + (n - d) * np.log1p(-p_d))
    harms_at_most = np.floor((t + d) / 2.0)  # T ≤ t  ⇔  harms ≤ (t + D)/2
    k = np.clip(harms_at_most, 0, d).astype(np.int64)
    conditional = np.where(harms_at_most < 0, 0.0, np.where(
        harms_at_most >= d, 1.0, special.bdtr(k, d.astype(np.int64), (p_d + budget) / (2.0 * p_d))))
    largest = float((np.exp(log_pmf) * conditional).sum(axis=1).max())
    return float(min(1.0, largest + NUISANCE_GAMMA))


def point_p_value(harmed: np.ndarray, fixed: np.ndarray, loss: str, budget: float) -> float:
    if loss == "harm":
        return binomial_p_value(int(harmed.sum()), len(harmed), budget)
    return trinomial_p_value(int(harmed.sum()), int(fixed.sum()), len(harmed), budget)


def greedy_path(u: np.ndarray, exit_right: np.ndarray, full_right: np.ndarray, stage_cost, loss: str,
                grid: np.ndarray = THRESHOLD_GRID) -> list[tuple[float, ...]]:
    """The screen step of ``per-exit``: from all zeros, loosen one exit at a time to its next grid
    value that moves at least one screen row, choosing the exit with the least risk added (rows, +
    :data:`GREEDY_PRIOR_ROWS`) per stage cost saved; until every threshold is at the grid's top."""
    n_exits = u.shape[1]
    cumulative = np.cumsum(np.asarray(stage_cost, dtype=np.float64))
    thresholds = np.zeros(n_exits)
    points = [tuple(thresholds)]
    depth, harmed, fixed = row_outcomes(u, exit_right, full_right, thresholds)
    risk = lambda h, f: float(h.sum()) - (float(f.sum()) if loss == "net" else 0.0)  # noqa: E731
    while True:
        best = None
        for k in range(n_exits):
            # The next grid value past t_k that lets a screen row go at exit k: the rows running
            # beyond k whose u_k is at or above t_k; none, and the exit jumps to the grid's top.
            waiting = u[(depth > k) & (u[:, k] >= thresholds[k]), k]
            above = grid[grid > (waiting.min() if waiting.size else grid[-1] - 1e-12)]
            if thresholds[k] >= grid[-1] or not above.size:
                continue
            trial = thresholds.copy()
            trial[k] = above[0] if waiting.size else grid[-1]
            outcome = row_outcomes(u, exit_right, full_right, trial)
            saved = float((cumulative[depth] - cumulative[outcome[0]]).sum())
            added = risk(outcome[1], outcome[2]) - risk(harmed, fixed) + GREEDY_PRIOR_ROWS
            score = added / saved if saved > 0 else math.inf
            if best is None or score < best[0]:
                best = (score, trial, outcome)
        if best is None:
            return points
        _, thresholds, (depth, harmed, fixed) = best
        points.append(tuple(float(v) for v in thresholds))


def resolve_kind(kind: str, n_rows: int, budget: float, delta: float) -> str:
    """``auto`` → ``per-exit`` or ``shared`` from the row count alone (see the module docstring)."""
    if kind not in PATH_KINDS:
        raise ConfigError(f"budget path must be one of {', '.join(PATH_KINDS)}, got '{kind}'")
    if kind != "auto":
        return kind
    n_test = n_rows - int(round(SCREEN_FRACTION * n_rows))
    return "per-exit" if binomial_p_value(AUTO_MIN_HARMS, n_test, budget) <= delta else "shared"


def screen_rows(n_rows: int) -> np.ndarray:
    """Mask of the screen part: a seeded :data:`SCREEN_FRACTION` of the rows."""
    mask = np.zeros(n_rows, dtype=bool)
    mask[np.random.default_rng(SCREEN_SEED).permutation(n_rows)[: int(round(SCREEN_FRACTION * n_rows))]] = True
    return mask


def calibrate_path(u: np.ndarray, exit_predictions: np.ndarray, full_predictions: np.ndarray, labels: np.ndarray,
                   budget: float, delta: float, stage_cost=None, loss: str = "harm",
                   kind: str = "auto") -> PathCalibration:
    """Make and certify the path on the validation split (see the module docstring).

    ``u`` and ``exit_predictions`` are ``[n, E]`` (each exit's uncertainty and class),
    ``full_predictions`` and ``labels`` ``[n]``; ``stage_cost`` (E + 1 values; default 1 each)
    weighs the stages when the path is screened."""
    u = np.asarray(u, dtype=np.float64)
    if u.ndim == 1:
        u = u[:, None]
    exit_predictions = np.asarray(exit_predictions).reshape(u.shape)
    labels = np.asarray(labels)
    n, n_exits = u.shape
    if n == 0:
        raise ConfigError("the budget policy needs validation rows to certify on")
    if not 0.0 < budget < 1.0:
        raise ConfigError(f"accuracy budget must be in (0, 100) pp, got {100 * budget:g} pp")
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"risk δ must be in (0, 1), got {delta:g}")
    if loss not in LOSSES:
        raise ConfigError(f"budget loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    stage_cost = np.ones(n_exits + 1) if stage_cost is None else np.asarray(stage_cost, dtype=np.float64)
    if stage_cost.shape != (n_exits + 1,) or not (stage_cost > 0).all():
        raise ConfigError(f"stage costs: {n_exits + 1} positive values needed, got {stage_cost.tolist()}")
    exit_right = exit_predictions == labels[:, None]
    full_right = np.asarray(full_predictions) == labels
    kind = resolve_kind(kind, n, budget, delta)
    if kind == "per-exit":
        screen = screen_rows(n)
        points = greedy_path(u[screen], exit_right[screen], full_right[screen], stage_cost, loss)
        test = ~screen
    else:
        points = [tuple([float(v)] * n_exits) for v in THRESHOLD_GRID]
        test = np.ones(n, dtype=bool)
    u_t, exit_t, full_t = u[test], exit_right[test], full_right[test]
    exit_answers_t, full_answers_t = exit_predictions[test], np.asarray(full_predictions)[test]
    ceiling, p_values, risks, depth_at_ceiling, disagreements = None, [], [], None, []
    known: dict[tuple[int, int], float] = {}  # p-value by (harms, fixes): neighbouring points often share them
    for index, point in enumerate(points):
        depth, harmed, fixed = row_outcomes(u_t, exit_t, full_t, point)
        counts = (int(harmed.sum()), int(fixed.sum()))
        if counts not in known:
            known[counts] = point_p_value(harmed, fixed, loss, budget)
        p = known[counts]
        p_values.append(p)
        risks.append(float(harmed.mean() - (fixed.mean() if loss == "net" else 0.0)))
        if p > delta:
            break
        ceiling, depth_at_ceiling = index, depth
        served = np.where(depth < n_exits, exit_answers_t[np.arange(len(depth)), np.minimum(depth, n_exits - 1)],
                          full_answers_t)
        disagreements.append(int((served != full_answers_t).sum()))
    histogram = (None if depth_at_ceiling is None else
                 tuple(int(c) for c in np.bincount(depth_at_ceiling, minlength=n_exits + 1)))
    return PathCalibration(points=tuple(points), ceiling=ceiling, budget=budget, delta=delta, loss=loss, kind=kind,
                           n_validation=n, n_screen=int(n - test.sum()), n_test=int(test.sum()),
                           p_values=tuple(p_values), test_risks=tuple(risks),
                           exit_rate=None if depth_at_ceiling is None else float((depth_at_ceiling < n_exits).mean()),
                           depth_histogram=histogram, disagreements=tuple(disagreements))
