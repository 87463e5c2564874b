"""Per-exit calibration of the controller's thresholds, on the validation split only.

For each uncertainty measure and each exit k of a ladder, u*_k is the uncertainty at or below
which a row may leave at exit k; the controller's steady threshold there is τ∞_k = α·(1 − u*_k).

Where u* comes from, in order (:func:`calibration_for`):

1. ``model.json`` → ``controller.calibration.<measure>``: one u* per exit, as the builder stored;
2. the legacy two-stage hint ``controller.uncertainty_skip_below`` (entropy only, one exit);
3. otherwise computed here, at load, from ``validation.npz`` (:func:`calibrate_exits`).

A measure none of these covers is a :class:`ConfigError`; the entropy threshold never stands in
silently for another measure.

The rule (``METHOD``): exits are calibrated in ladder order on the validation rows that reach
them (those not leaving at an earlier exit). At exit k the rows are sorted by u_k; rows leave while
u_k < u*_k (the controller's rule at steady state with ê = ĉ = 0), and u*_k is set so that the rows
leaving are the longest prefix before the first row whose exit answer differs from the full
model's (so on the validation split the ladder answers exactly as the full model does; the labels
are not needed); u* = 1 lets every row leave, 0 none.
A later, certified rule (a Learn-then-Test budget) replaces :func:`calibrate_exits` by
another function with the same inputs and output; nothing else changes.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from targets.controller import uncertainty
from targets.controller_config import UNCERTAINTIES
from targets.errors import ConfigError
from targets.model_dir import ModelSpec

METHOD = "sequential, no change to the full model's answer on the validation rows reaching each exit"


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


def calibrate_exits(outputs: LadderOutputs, labels: np.ndarray, measure: str) -> tuple[float, ...]:
    """u* per exit by ``METHOD`` (see the module docstring); ``labels`` are unused by this rule
    (it compares with the full model), but part of the signature every rule shares."""
    full_answer = outputs.final.argmax(1)
    reaching = np.ones(len(labels), dtype=bool)
    u_star = []
    for exit_probabilities in outputs.exits:
        u = uncertainty(exit_probabilities, measure)
        exit_answer = exit_probabilities.argmax(1)
        rows = np.flatnonzero(reaching)
        order = rows[np.argsort(u[rows], kind="stable")]
        # Rows whose answer would change if the first i rows (by u) left here: the exit disagrees
        # with the full model. Measured on digits' held-out set, stricter rules lose less: errors
        # added net of errors fixed cost 0.93-1.56 pp, errors added alone 0.67-0.89 pp, any
        # disagreement 0.00 pp (180 validation rows; the labels barely constrain the tail).
        net = np.cumsum(exit_answer[order] != full_answer[order])
        u_sorted = u[order]
        # A cut must not split tied u values: only the last row of each tie group is a cut.
        cut_ok = np.append(u_sorted[1:] != u_sorted[:-1], True) if len(order) else np.array([], bool)
        bad = np.flatnonzero(net > 0)
        limit = bad[0] if bad.size else len(order)
        candidates = np.flatnonzero(cut_ok[:limit])
        if candidates.size == 0:
            cut = 0.0  # nobody leaves here: the controller lets a row leave only when u < u*
        else:
            last = candidates[-1]
            # Halfway to the next row's u, so exactly the rows up to `last` satisfy u < u*.
            cut = float((u_sorted[last] + u_sorted[last + 1]) / 2) if last + 1 < len(order) else 1.0
        u_star.append(cut)
        reaching &= ~(u < cut)
    return tuple(u_star)


_CACHE: dict[tuple, LadderOutputs] = {}
_CACHE_LOCK = threading.Lock()


def _validation_outputs(spec: ModelSpec, backend) -> tuple[LadderOutputs, np.ndarray]:
    x, y = spec.load_validation()
    key = (str(spec.validation_path), spec.validation_path.stat().st_mtime_ns, str(spec.directory))
    with _CACHE_LOCK:
        if key not in _CACHE:
            if backend is None:
                from targets.ort_target import OnnxRuntimeTarget

                backend = OnnxRuntimeTarget(spec, device="cpu")
            _CACHE[key] = ladder_outputs(backend, x)
        return _CACHE[key], y


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


def calibrator(spec: ModelSpec, backend=None):
    """``measure -> u* per exit`` for :func:`targets.controller_config.build_config`."""
    return lambda measure: calibration_for(spec, measure, backend).u_star


def budget_calibration_for(spec: ModelSpec, measure: str, budget_pp: float, risk: float, backend=None):
    """The certified exit threshold of ``spec`` for an accuracy budget (see :mod:`targets.certify`):
    Learn-then-Test on the validation split, the same threshold at every exit of the ladder."""
    from targets.certify import calibrate_budget

    if spec.validation_path is None:
        raise ConfigError(f"model '{spec.name}' has no validation split (validation.npz): the budget "
                          "policy calibrates its certificate on it")
    outputs, y = _validation_outputs(spec, backend)
    u = np.stack([uncertainty(p, measure) for p in outputs.exits], axis=1)
    exit_answers = np.stack([p.argmax(1) for p in outputs.exits], axis=1)
    return calibrate_budget(u, exit_answers, outputs.final.argmax(1), y, budget_pp / 100.0, risk)
