"""Out-of-fold comparison of calibration rules, without the held-out set deciding anything.

A rule (the paper policy's :func:`targets.control.calibration.calibrate_exits`, its older or simpler
variants, the budget policy's certificate :func:`targets.control.certified_path.calibrate_path`) turns a set of
calibration rows into one exit threshold per exit; a row then leaves at the first exit k whose
uncertainty u_k < t_k, else runs the whole ladder. Comparing rules on the held-out set makes it a
second validation set (DESIGN §4: "The held-out set is sealed"), so rules are compared here, out of
fold, on a pool of rows (validation ∪ held-out) whose per-exit outputs were computed once: no
retraining, no stage run twice.

Schemes (:func:`splits`), both seeded:

* ``resplit``: R random re-splits of the pool; each rule is fitted on ``n_fit`` rows (by default
  as many as the model's validation split, the size it is fitted on in use) and scored on the
  others;
* ``kfold``: K folds, repeated R times with fresh shuffles; each rule is fitted on K−1 folds and
  scored on the remaining one.

Per split and rule (:func:`score`): the accuracy loss against the full model on the scored rows,
in pp (accuracy of the full model − accuracy of the ladder), and the latency saving estimated from
stage costs, ``100·(1 − mean cost of the stages each row ran / cost of the standard path)``.
Per rule (:func:`summarise`): the mean over splits of each, the 2.5–97.5 percentile range of the
per-split figures (what one split could show: the scored sets of re-splits overlap, so this is a
spread, not a standard error of the mean), and the share of splits whose loss exceeds the target,
with a Clopper–Pearson 95 % interval over the R splits (Monte-Carlo uncertainty of that share for
this pool, not the pool's own sampling error).

The saving is an estimate: it counts the stages each row runs at the given costs, and leaves out
the decision's own cost and the fixed costs a request carries (the in-process ablation measures
those). The controller is taken at its steady state with ê = ĉ = 0 (τ = τ∞ at every exit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from targets.control.calibration import (LadderOutputs, NO_CHANGE_RULE_NAME, NO_CHANGE_RULE_VERSION, RULE_NAME, RULE_VERSION,
                                 calibrate_exits, no_change_cuts)
from targets.control.binomial_bounds import clopper_pearson
from targets.control.certified_path import PATH_NAME, PATH_VERSION, calibrate_path
from targets.control.controller import uncertainty
from targets.errors import ConfigError

SCHEMES = ("resplit", "kfold")
DEFAULT_REPEATS = {"resplit": 200, "kfold": 20}


@dataclass(frozen=True)
class Pool:
    """Per-exit outputs of every pooled row, computed once: the ladder's probabilities and labels."""

    outputs: LadderOutputs
    labels: np.ndarray
    measure: str = "entropy"
    u: np.ndarray = field(init=False, repr=False)  # [n, E] uncertainty at each exit
    exit_right: np.ndarray = field(init=False, repr=False)  # [n, E]
    full_right: np.ndarray = field(init=False, repr=False)  # [n]

    def __post_init__(self):
        labels = np.asarray(self.labels)
        n = len(labels)
        if not self.outputs.exits or any(len(e) != n for e in self.outputs.exits) or len(self.outputs.final) != n:
            raise ConfigError("crossval needs one row of every exit's and the final output per label")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "u", np.stack([uncertainty(p, self.measure) for p in self.outputs.exits], axis=1))
        object.__setattr__(self, "exit_right", np.stack([p.argmax(1) == labels for p in self.outputs.exits], axis=1))
        object.__setattr__(self, "full_right", self.outputs.final.argmax(1) == labels)

    @property
    def n_rows(self) -> int:
        return len(self.labels)

    @property
    def n_exits(self) -> int:
        return self.u.shape[1]

    def subset(self, rows: np.ndarray) -> tuple[LadderOutputs, np.ndarray]:
        return LadderOutputs(tuple(e[rows] for e in self.outputs.exits), self.outputs.final[rows]), self.labels[rows]


@dataclass(frozen=True)
class Fit:
    """What a rule returns for one set of calibration rows: a threshold per exit, and for a
    certificate whether it certified anything (None: the rule certifies nothing by design)."""

    thresholds: tuple[float, ...]
    certified: bool | None = None


@dataclass(frozen=True)
class Rule:
    """A calibration rule under test: ``fit(outputs, labels, measure) -> Fit``."""

    key: str
    name: str
    version: str | None
    description: str
    fit: Callable[[LadderOutputs, np.ndarray, str], Fit]


def standard_rules(accuracy_budget_pp: float = 0.5, risk: float = 0.1) -> list[Rule]:
    """The rules the toolkit ships, in the order the table shows them."""
    if not 0 < accuracy_budget_pp < 100:
        raise ConfigError(f"--accuracy-budget-pp must be in (0, 100), got {accuracy_budget_pp:g}")
    if not 0 < risk < 1:
        raise ConfigError(f"--risk must be in (0, 1), got {risk:g}")

    def budget(loss: str, kind: str):
        def fit(outputs, labels, measure):
            u = np.stack([uncertainty(p, measure) for p in outputs.exits], axis=1)
            answers = np.stack([p.argmax(1) for p in outputs.exits], axis=1)
            cal = calibrate_path(u, answers, outputs.final.argmax(1), labels, accuracy_budget_pp / 100.0, risk,
                                 loss=loss, kind=kind)
            # Not certified: validate would refuse the budget policy; nothing leaves early here.
            return Fit(cal.ceiling_thresholds or tuple([0.0] * len(outputs.exits)), cal.certified)
        return fit

    return [
        Rule("paper", RULE_NAME, RULE_VERSION,
             "calibrate_exits: fewest stages, loss + 1 s.e. ≤ 0 (the paper policy's rule)",
             lambda o, y, m: Fit(calibrate_exits(o, y, m))),
        Rule("paper-no-se", f"{RULE_NAME} (z = 0)", None,
             "calibrate_exits without the standard error (loss ≤ 0 on the fitted rows)",
             lambda o, y, m: Fit(calibrate_exits(o, y, m, standard_errors=0.0))),
        Rule("no-change", NO_CHANGE_RULE_NAME, NO_CHANGE_RULE_VERSION,
             "no_change_cuts: each exit stops at its first disagreement with the full model (step 1 alone)",
             lambda o, y, m: Fit(no_change_cuts(o, m))),
        Rule("budget", PATH_NAME, PATH_VERSION,
             f"budget policy's certificate as it runs by default: {accuracy_budget_pp:g} pp at δ = {risk:g}, "
             "the 'auto' path, the harm risk (the ceiling)", budget("harm", "auto")),
        Rule("budget-net", PATH_NAME, PATH_VERSION, "the same with the net risk (harms − fixes, exact trinomial test)",
             budget("net", "auto")),
        Rule("budget-shared", PATH_NAME, PATH_VERSION,
             "the same on the shared path (one threshold at every exit, every row tests)", budget("harm", "shared")),
        Rule("budget-per-exit", PATH_NAME, PATH_VERSION,
             "the same on the per-exit path (screened on a third, tested on two thirds)", budget("harm", "per-exit")),
        Rule("budget-net-shared", PATH_NAME, PATH_VERSION, "the net risk on the shared path",
             budget("net", "shared")),
    ]


def splits(n_rows: int, scheme: str, repeats: int, seed: int, n_fit: int | None = None,
           folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(fit rows, scored rows)`` per split (see the module docstring), seeded by ``seed``."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme '{scheme}'; known: {', '.join(SCHEMES)}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(seed)
    if scheme == "resplit":
        if n_fit is None or not 1 <= n_fit < n_rows:
            raise ConfigError(f"a re-split fits on n_fit rows and scores the rest: need 1 <= n_fit < {n_rows} "
                              f"pooled rows, got {n_fit}")
        out = []
        for _ in range(repeats):
            order = rng.permutation(n_rows)
            out.append((np.sort(order[:n_fit]), np.sort(order[n_fit:])))
        return out
    if not 2 <= folds <= n_rows:
        raise ConfigError(f"--folds must be in [2, {n_rows}] (the pooled rows), got {folds}")
    out = []
    for _ in range(repeats):
        parts = np.array_split(rng.permutation(n_rows), folds)
        for k, scored in enumerate(parts):
            out.append((np.sort(np.concatenate(parts[:k] + parts[k + 1:])), np.sort(scored)))
    return out


def _costs(stage_cost: np.ndarray, full_cost: float) -> tuple[np.ndarray, float]:
    stage_cost = np.asarray(stage_cost, dtype=np.float64)
    if stage_cost.ndim != 1 or not (np.isfinite(stage_cost).all() and (stage_cost > 0).all()):
        raise ConfigError(f"stage costs must be finite and > 0, got {stage_cost.tolist()}")
    if not (math.isfinite(full_cost) and full_cost > 0):
        raise ConfigError(f"the standard path's cost must be finite and > 0, got {full_cost}")
    return np.cumsum(stage_cost), float(full_cost)


def score(pool: Pool, rows: np.ndarray, thresholds, stage_cost, full_cost: float) -> dict:
    """One rule's thresholds on ``rows``: ``loss_pp``, ``saving_pct``, ``mean_stages`` (stages
    run per row, the full ladder counting all of them) and ``exit_rate`` (share leaving early)."""
    cumulative, full_cost = _costs(stage_cost, full_cost)
    if len(cumulative) != pool.n_exits + 1:
        raise ConfigError(f"{len(cumulative)} stage costs for a ladder of {pool.n_exits + 1} stages")
    u = pool.u[rows]
    leaves = u < np.asarray(thresholds, dtype=np.float64)[None, :]
    depth = np.where(leaves.any(axis=1), leaves.argmax(axis=1), pool.n_exits)  # 0-based stage index
    answers_right = np.concatenate([pool.exit_right[rows], pool.full_right[rows, None]], axis=1)
    right = answers_right[np.arange(len(rows)), depth]
    return {"loss_pp": 100.0 * (pool.full_right[rows].mean() - right.mean()),
            "saving_pct": 100.0 * (1.0 - cumulative[depth].mean() / full_cost),
            "mean_stages": float(depth.mean() + 1), "exit_rate": float((depth < pool.n_exits).mean())}


def _spread(values: np.ndarray) -> dict:
    return {"mean": float(values.mean()), "range95": [float(np.percentile(values, 2.5)),
                                                      float(np.percentile(values, 97.5))]}


def summarise(per_split: list[dict], loss_target_pp: float) -> dict:
    """Per rule: mean and 2.5–97.5 percentile range of the saving and the loss over splits, and
    the share of splits whose loss exceeds ``loss_target_pp`` (1e-9 tolerance) with its exact
    95 % interval."""
    loss = np.array([s["loss_pp"] for s in per_split])
    saving = np.array([s["saving_pct"] for s in per_split])
    above = int((loss > loss_target_pp + 1e-9).sum())
    certified = [s["certified"] for s in per_split if s.get("certified") is not None]
    return {"splits": len(per_split), "saving_pct": _spread(saving), "loss_pp": _spread(loss),
            "mean_stages": float(np.mean([s["mean_stages"] for s in per_split])),
            "loss_above_target": {"count": above, "share": above / len(per_split),
                                  "ci95": list(clopper_pearson(above, len(per_split)))},
            "uncertified_splits": (len(certified) - sum(certified)) if certified else None}


def crossval(pool: Pool, rules: list[Rule], split_list: list[tuple[np.ndarray, np.ndarray]],
             stage_cost, full_cost: float, loss_target_pp: float = 0.5) -> list[dict]:
    """Every rule fitted on each split's fit rows and scored on its other rows; per rule its
    identity, :func:`summarise`'s figures and the per-split values (``per_split``)."""
    if not split_list:
        raise ConfigError("crossval needs at least one split")
    if not (math.isfinite(loss_target_pp) and loss_target_pp > 0):
        raise ConfigError(f"the loss target must be a finite number of pp > 0, got {loss_target_pp}")
    results = []
    for rule in rules:
        per_split = []
        for fit_rows, scored_rows in split_list:
            fitted = rule.fit(*pool.subset(fit_rows), pool.measure)
            if len(fitted.thresholds) != pool.n_exits:
                raise ConfigError(f"rule {rule.key} gave {len(fitted.thresholds)} thresholds for {pool.n_exits} exits")
            per_split.append({**score(pool, scored_rows, fitted.thresholds, stage_cost, full_cost),
                              "certified": fitted.certified})
        results.append({"key": rule.key, "rule": rule.name, "version": rule.version,
                        "description": rule.description, **summarise(per_split, loss_target_pp),
                        "per_split": {"loss_pp": [round(s["loss_pp"], 6) for s in per_split],
                                      "saving_pct": [round(s["saving_pct"], 6) for s in per_split]}})
    return results
