"""Per-exit calibration of the controller's thresholds, on the validation split only.

For each uncertainty measure and each exit k of a ladder, u*_k is the uncertainty at or below
which a row may leave at exit k; the controller's steady threshold there is τ∞_k = α·(1 − u*_k).

Where u* comes from, in order (:func:`calibration_for`):

1. ``model.json`` → ``controller.calibration.<measure>``: one u* per exit, as the builder stored;
2. the legacy two-stage hint ``controller.uncertainty_skip_below`` (entropy only, one exit);
3. otherwise computed here, at load, from ``validation.npz`` (:func:`calibrate_exits`).

A measure none of these covers is a :class:`ConfigError`; the entropy threshold never stands in
silently for another measure.

The rule (``METHOD``), on the validation rows, in two steps:

1. *Start safe* (:func:`no_change_cuts`): exits are cut in ladder order on the rows that reach
   them; at exit k the rows are sorted by u_k and u*_k lets leave the longest prefix before the
   first row whose exit answer differs from the full model's. The ladder then answers every
   validation row exactly as the full model does.
2. *Save stages, spend no accuracy beyond noise* (:func:`calibrate_exits`): coordinate descent
   on the mean number of stages run (every stage counted as one), one exit at a time with the
   others fixed, over every cut between two validation rows, subject to

       harmed − fixed + z·√(harmed + fixed) ≤ B·n

   where harmed (fixed) counts validation rows the full model answers rightly (wrongly) and the
   ladder wrongly (rightly), n the rows, B = ``LOSS_BUDGET_PP`` = 0 and z = ``STANDARD_ERRORS`` = 1:
   the ladder's accuracy loss against the full model, plus one standard error of it, is at most
   zero. Each step is exact (a sort and cumulative sums per exit), never raises the cost, and the
   sweeps repeat until none lowers it.

Step 1 alone is strict: an exit stops at its first disagreement, however far down the uncertainty
order it lies. Step 2 without the standard error (z = 0) would fit the validation noise (the
winner's curse: the cuts that look best on the validation rows are often the ones the noise
flattered). The README ("Controller parameters", "The text model `reviews`") gives what the rule
measured. u* = 1 lets every row leave, 0 none; a cut never splits rows of equal u.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from targets.control.controller import uncertainty
from targets.control.controller_config import UNCERTAINTIES
from targets.errors import ConfigError, ModelDirError
from targets.model.model_dir import ModelSpec

LOSS_BUDGET_PP = 0.0
STANDARD_ERRORS = 1.0
RULE_NAME = "fewest-stages-loss-plus-1se"
RULE_VERSION = "4"
"""The rule :func:`calibrate_exits` implements, as validate.json records it. Versions: 1, an exit's
fixes offset its harms; 2, they no longer do (e2668e3); 3, stop at the first disagreement with the
full model, :func:`no_change_cuts` (694b5e0); 4, step 2 above (05c6fd7), frozen at 7ecec13. Any
change to what the rule returns takes a new version."""
NO_CHANGE_RULE_NAME, NO_CHANGE_RULE_VERSION = "no-change-cuts", "3"
METHOD = ("per-exit cuts minimising the stages run on the validation split, its accuracy loss against the "
          "full model plus one standard error at most 0 (coordinate descent from the cuts that change no answer)")


@dataclass(frozen=True)
class ExitCalibration:
    """u* per exit for one uncertainty measure, and where it came from."""

    measure: str
    u_star: tuple[float, ...]
    source: str  # "model.json" or "validation.npz"
    method: str
    n_validation: int | None = None


@dataclass(frozen=True)
class LadderOutputs:
    """Every exit's probabilities and the final probabilities for a set of rows (no exit taken)."""

    exits: tuple[np.ndarray, ...]
    final: np.ndarray


def ladder_outputs(backend, x: np.ndarray, batch: int = 256) -> LadderOutputs:
    """Run every stage of ``backend``'s ladder on all of ``x`` (in chunks of ``batch`` rows)."""
    exits: list[list[np.ndarray]] = [[] for _ in range(backend.n_stages - 1)]
    finals = []
    for start in range(0, len(x), batch):
        hidden = backend.check(x[start : start + batch])
        for index in range(backend.n_stages):
            probabilities, hidden = backend.stage(index, hidden)
            (exits[index] if index < backend.n_stages - 1 else finals).append(probabilities)
    return LadderOutputs(tuple(np.concatenate(e) for e in exits), np.concatenate(finals))


def no_change_cuts(outputs: LadderOutputs, measure: str) -> tuple[float, ...]:
    """Step 1 of ``METHOD``: per exit, in ladder order, the longest run of the rows reaching it
    (by increasing u) before the first whose exit answer differs from the full model's."""
    full_answer = outputs.final.argmax(1)
    reaching = np.ones(len(full_answer), dtype=bool)
    u_star = []
    for exit_probabilities in outputs.exits:
        u = uncertainty(exit_probabilities, measure)
        rows = np.flatnonzero(reaching)
        order = rows[np.argsort(u[rows], kind="stable")]
        changed = np.cumsum(exit_probabilities.argmax(1)[order] != full_answer[order])
        bad = np.flatnonzero(changed > 0)
        u_star.append(_cut(u[order], bad[0] if bad.size else len(order)))
        reaching &= ~(u < u_star[-1])
    return tuple(u_star)


def _cut(u_sorted: np.ndarray, prefix: int) -> float:
    """The u* that lets leave the longest tie-respecting prefix of ``u_sorted`` not longer than
    ``prefix`` rows: halfway between the prefix's last u and the next one; 0 lets none, 1 all."""
    ends = np.flatnonzero(np.append(u_sorted[1:] != u_sorted[:-1], True)[:prefix])
    if ends.size == 0:
        return 0.0
    last = ends[-1]
    return float((u_sorted[last] + u_sorted[last + 1]) / 2) if last + 1 < len(u_sorted) else 1.0


def _ladder_outcome(u: np.ndarray, exit_right: np.ndarray, full_right: np.ndarray, u_star, first: int):
    """Stages run and correctness per row when every row starts at exit ``first`` (0-based) and
    leaves at the first exit k ≥ first with u_k < u*_k, else runs the full ladder."""
    n_exits = u.shape[1]
    stages = np.full(len(full_right), n_exits + 1.0)
    right = full_right.copy()
    for k in range(n_exits - 1, first - 1, -1):
        leaves = u[:, k] < u_star[k]
        stages = np.where(leaves, k + 1.0, stages)
        right = np.where(leaves, exit_right[:, k], right)
    return stages, right


def calibrate_exits(outputs: LadderOutputs, labels: np.ndarray, measure: str,
                    loss_budget_pp: float = LOSS_BUDGET_PP, standard_errors: float = STANDARD_ERRORS) -> tuple[float, ...]:
    """u* per exit by ``METHOD`` (see the module docstring): the fewest stages run on the
    validation split such that its accuracy loss against the full model, plus ``standard_errors``
    standard errors, is at most ``loss_budget_pp``."""
    labels = np.asarray(labels)
    u = np.stack([uncertainty(p, measure) for p in outputs.exits], axis=1)
    exit_right = np.stack([p.argmax(1) == labels for p in outputs.exits], axis=1)
    full_right = outputs.final.argmax(1) == labels
    n_rows, n_exits = u.shape
    allowed_rows = loss_budget_pp / 100.0 * n_rows
    u_star = list(no_change_cuts(outputs, measure))
    start_stages, start_right = _ladder_outcome(u, exit_right, full_right, u_star, 0)
    best = (start_stages.sum(), -start_right.sum())
    improved = True
    while improved:
        improved = False
        for k in range(n_exits):
            stages, right = _ladder_outcome(u, exit_right, full_right, u_star, 0)
            reaching = stages > k  # a row leaving at exit j runs j + 1 stages
            if not reaching.any():
                continue  # every row leaves earlier: this exit's cut changes nothing
            gone = ~reaching
            onward_stages, onward_right = _ladder_outcome(u, exit_right, full_right, u_star, k + 1)
            rows = np.flatnonzero(reaching)
            order = rows[np.argsort(u[rows, k], kind="stable")]
            full_o, exit_o, onward_o = full_right[order], exit_right[order, k], onward_right[order]
            # Totals over all rows when the first i rows of `order` leave here (i = 0 … len):
            # rows gone earlier are fixed, the first i take exit k, the rest go on under later cuts.
            total_stages = stages[gone].sum() + _prefix(np.full(len(order), k + 1.0)) + _suffix(onward_stages[order])
            total_right = right[gone].sum() + _prefix(exit_o) + _suffix(onward_o)
            harmed = (full_right & ~right)[gone].sum() + _prefix(full_o & ~exit_o) + _suffix(full_o & ~onward_o)
            fixed = (~full_right & right)[gone].sum() + _prefix(~full_o & exit_o) + _suffix(~full_o & onward_o)
            u_sorted = u[order, k]
            # Prefixes a cut can make: none, each tie group's end, all (unless a row has u = 1).
            possible = np.append(True, np.append(u_sorted[1:] != u_sorted[:-1], True))
            possible[-1] &= not (len(order) and u_sorted[-1] >= 1.0)
            within = harmed - fixed + standard_errors * np.sqrt(harmed + fixed) <= allowed_rows + 1e-9
            candidates = np.flatnonzero(possible & within)
            choice = candidates[np.lexsort((-total_right[candidates], total_stages[candidates]))[0]]
            if (total_stages[choice], -total_right[choice]) < best:
                best = (total_stages[choice], -total_right[choice])
                u_star[k] = _cut(u_sorted, choice)
                improved = True
    return tuple(u_star)


def _prefix(values: np.ndarray) -> np.ndarray:
    """Sums of the first i values, i = 0 … len."""
    return np.concatenate([[0], np.cumsum(values, dtype=float)])


def _suffix(values: np.ndarray) -> np.ndarray:
    """Sums of the values from i on, i = 0 … len."""
    return np.concatenate([np.cumsum(values[::-1], dtype=float)[::-1], [0.0]])


_CACHE: dict[tuple, LadderOutputs] = {}
_CACHE_LOCK = threading.Lock()


def _validation_outputs(spec: ModelSpec, backend) -> tuple[LadderOutputs, np.ndarray]:
    x, y = spec.load_validation()
    key = (str(spec.validation_path), spec.validation_path.stat().st_mtime_ns, str(spec.directory))
    with _CACHE_LOCK:
        if key not in _CACHE:
            if backend is None:
                from targets.backends.ort_target import OnnxRuntimeTarget

                backend = OnnxRuntimeTarget(spec, device="cpu")
            _CACHE[key] = ladder_outputs(backend, x)
        return _CACHE[key], y


LADDER_TOLERANCE = 1e-3
"""Chained stages against ``full.onnx``: the largest difference allowed in any class probability
(float32 graphs of one network differ by about 1e-6)."""
LADDER_CHECK_ROWS = 256
"""Validation rows the load-time check runs (the first ones): a stage from another build disagrees
on most rows, and the check must not double a large model's start-up."""


def check_ladder(spec: ModelSpec, backend=None, tolerance: float = LADDER_TOLERANCE) -> dict | None:
    """The ladder's chained stages against ``full.onnx`` on the first :data:`LADDER_CHECK_ROWS`
    validation rows: every probability
    within ``tolerance`` and every answer the same (a row whose two top classes are within
    ``tolerance`` may answer either). ModelDirError, one line, when they are not: calibration
    treats the last stage as the full model, so a stage graph from another training run would
    certify the wrong network. ``{"rows", "max_abs_diff", "answers_differ"}``; None without a
    validation split (nothing to check on)."""
    if spec.validation_path is None:
        return None
    if backend is None:
        from targets.backends.ort_target import OnnxRuntimeTarget

        backend = OnnxRuntimeTarget(spec, device="cpu")
    x = spec.load_validation()[0][:LADDER_CHECK_ROWS]
    chained = ladder_outputs(backend, x).final
    full = np.concatenate([backend.full_probabilities(backend.check(x[i : i + 256])) for i in range(0, len(x), 256)])
    difference = np.abs(chained - full).max(axis=1)
    answers_differ = chained.argmax(1) != full.argmax(1)
    top_two = np.sort(full, axis=1)[:, -2:]
    near_tie = (top_two[:, 1] - top_two[:, 0]) <= 2 * tolerance
    bad = (difference > tolerance) | (answers_differ & ~near_tie)
    if bad.any():
        raise ModelDirError(
            f"model {spec.name}: its chained stages do not reproduce full.onnx on {int(bad.sum())} of {len(x)} "
            f"validation rows (answers differ on {int(answers_differ.sum())}; largest probability difference "
            f"{float(difference.max()):.3g} > {tolerance:g}): the stage graphs and full.onnx come from different "
            f"builds; rebuild the model directory")
    return {"rows": len(x), "max_abs_diff": float(difference.max()), "answers_differ": int(answers_differ.sum())}


def calibration_for(spec: ModelSpec, measure: str, backend=None, rule=None) -> ExitCalibration:
    """u* per exit of ``spec`` for ``measure`` (see the module docstring for the order).

    ``backend`` (anything with ``n_stages``, ``check`` and ``stage``) runs the validation split
    when calibration is computed; an ONNX Runtime CPU target is made when none is given.
    ``rule(outputs, labels, measure) -> u* per exit`` is the calibration rule (default
    :func:`calibrate_exits`; its ``__doc__``'s first line is recorded as the method).
    """
    if measure not in UNCERTAINTIES:
        raise ConfigError(f"unknown uncertainty '{measure}'; known: {', '.join(UNCERTAINTIES)}")
    stored = spec.controller_hints.get("calibration") or {}
    if measure in stored:
        return ExitCalibration(measure, tuple(float(u) for u in stored[measure]), "model.json", "as stored")
    skip_below = spec.controller_hints.get("uncertainty_skip_below")
    if measure == "entropy" and skip_below is not None and spec.n_exits == 1:
        return ExitCalibration(measure, (float(skip_below),), "model.json", "uncertainty_skip_below")
    if spec.validation_path is None:
        raise ConfigError(
            f"model '{spec.name}' carries no calibration for uncertainty '{measure}' "
            f"(model.json: controller.calibration.{measure}) and has no validation split (validation.npz) "
            "to calibrate on: add one, or set tau_inf explicitly")
    outputs, y = _validation_outputs(spec, backend)
    rule = rule or calibrate_exits
    method = METHOD if rule is calibrate_exits else (rule.__doc__ or rule.__name__).strip().splitlines()[0]
    return ExitCalibration(measure, tuple(rule(outputs, y, measure)), "validation.npz", method, len(y))


def rule_record(spec: ModelSpec, config, explicit_tau_inf: bool = False) -> dict:
    """Which rule set the exit thresholds of ``spec`` under ``config`` (a ControllerConfig: its
    ``policy`` and ``uncertainty``), and on which split: ``{"rule", "version", "split_seed",
    "heldout_digest"}`` (split fields None for a model.json without ``split``). The budget policy's
    rule is its certificate (:data:`targets.control.certified_path.PATH_NAME`); the paper policy's is
    :data:`RULE_NAME`, or ``"model.json"`` (version None) when the thresholds are stored there, or
    ``"explicit tau_inf"`` when the user set τ∞ under the paper policy. Reads model.json only: nothing is computed."""
    from targets.control.certified_path import PATH_NAME, PATH_VERSION

    stored = spec.controller_hints.get("calibration") or {}
    if config.policy == "budget":  # its certified path bounds every exit, whatever τ∞ is
        rule, version = PATH_NAME, PATH_VERSION
    elif explicit_tau_inf:
        rule, version = "explicit tau_inf", None
    elif config.uncertainty in stored or (config.uncertainty == "entropy" and spec.n_exits == 1
                                         and spec.controller_hints.get("uncertainty_skip_below") is not None):
        rule, version = "model.json", None
    else:
        rule, version = RULE_NAME, RULE_VERSION
    return {"rule": rule, "version": version, "split_seed": spec.split_seed, "heldout_digest": spec.heldout_digest}


def rule_line(record: dict) -> str:
    """:func:`rule_record` in words, for the console and the report."""
    version = f" v{record['version']}" if record.get("version") else ""
    split = ("split seed unknown (model.json has no 'split')" if record.get("split_seed") is None
             else f"split seed {record['split_seed']}")
    digest = f", held-out sha256 {record['heldout_digest'][:12]}…" if record.get("heldout_digest") else ""
    return f"exit thresholds: rule {record['rule']}{version}; {split}{digest}"


def calibrator(spec: ModelSpec, backend=None):
    """``measure -> u* per exit`` for :func:`targets.control.controller_config.build_config`."""
    return lambda measure: calibration_for(spec, measure, backend).u_star


def budget_calibration_for(spec: ModelSpec, measure: str, budget_pp: float, risk: float, backend=None,
                           loss: str = "harm", kind: str = "auto"):
    """The certified path of ``spec`` for an accuracy budget (see :mod:`targets.control.certified_path`):
    screened and tested on the validation split, every stage counted as one."""
    from targets.control.certified_path import calibrate_path

    if spec.validation_path is None:
        raise ConfigError(f"model '{spec.name}' has no validation split (validation.npz): the budget "
                          "policy calibrates its certificate on it")
    outputs, y = _validation_outputs(spec, backend)
    u = np.stack([uncertainty(p, measure) for p in outputs.exits], axis=1)
    exit_answers = np.stack([p.argmax(1) for p in outputs.exits], axis=1)
    return calibrate_path(u, exit_answers, outputs.final.argmax(1), y, budget_pp / 100.0, risk, loss=loss, kind=kind)
