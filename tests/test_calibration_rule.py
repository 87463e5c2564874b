"""The per-exit calibration rule (targets/control/calibration.py): planted truths and its contract on
random ladders (the constraint holds, the cost never rises, no single exit's cut can do better)."""
import numpy as np
import pytest

from targets.control.calibration import LadderOutputs, _ladder_outcome, calibrate_exits, no_change_cuts
from targets.control.controller import uncertainty


def _rows(p_first: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """Two-class probabilities whose top class is ``answers`` with confidence ``p_first``."""
    probabilities = np.stack([p_first, 1 - p_first], axis=1)
    probabilities[answers == 1] = probabilities[answers == 1, ::-1]
    return probabilities


def test_a_disagreement_that_fixes_an_error_is_passed_and_the_first_harm_stops_the_cut():
    """Ten rows by rising uncertainty at exit 1: rows 0-3 agree with the full model (right), row 4
    is a fix (the full model is wrong there, the exit right), rows 5-7 agree, row 8 is a harm (the
    full model right, the exit wrong), row 9 agrees. The only exit is followed by the full model.

    Step 1 stops before row 4 (the first disagreement). Step 2 with one standard error passes the
    fix (harmed − fixed + √(harmed + fixed) = −1 + 1 = 0) and stops before the harm (0 + √2 > 0).
    Without the standard error the harm is paid for by the fix and every row leaves."""
    labels = np.zeros(10, dtype=np.int64)
    confidence = np.linspace(0.99, 0.6, 10)
    exit_answers = np.zeros(10, dtype=np.int64)
    exit_answers[8] = 1
    full_answers = np.zeros(10, dtype=np.int64)
    full_answers[4] = 1
    exit1 = _rows(confidence, exit_answers)
    final = _rows(np.full(10, 0.9), full_answers)
    outputs = LadderOutputs((exit1,), final)
    u = uncertainty(exit1, "entropy")

    (strict,) = no_change_cuts(outputs, "entropy")
    assert u[3] < strict < u[4]
    (one_error,) = calibrate_exits(outputs, labels, "entropy")
    assert u[7] < one_error < u[8]
    (no_margin,) = calibrate_exits(outputs, labels, "entropy", standard_errors=0.0)
    assert no_margin == 1.0
    # A budget of three rows in ten (30 pp) covers the harm and its standard error: all leave.
    (budgeted,) = calibrate_exits(outputs, labels, "entropy", loss_budget_pp=30.0)
    assert budgeted == 1.0


def test_a_cheaper_later_exit_is_taken_when_an_earlier_one_must_stop():
    """Exit 1 harms every row it would answer; exit 2 is right everywhere: every row leaves at
    exit 2 (u*_2 = 1) and none at exit 1 (u*_1 = 0), whatever exit 1's confidence."""
    labels = np.zeros(8, dtype=np.int64)
    exit1 = _rows(np.full(8, 0.95), np.ones(8, dtype=np.int64))
    exit2 = _rows(np.linspace(0.9, 0.6, 8), np.zeros(8, dtype=np.int64))
    final = _rows(np.full(8, 0.9), np.zeros(8, dtype=np.int64))
    assert calibrate_exits(LadderOutputs((exit1, exit2), final), labels, "entropy") == (0.0, 1.0)


def test_exits_no_row_reaches_keep_a_cut_and_the_rule_does_not_fail():
    """Exit 1 is right on every row: all leave there, so exits 2 and 3 see no rows."""
    labels = np.array([0, 1, 0, 1, 0, 1])
    exit1 = _rows(np.linspace(0.95, 0.7, 6), labels)
    later = _rows(np.full(6, 0.6), 1 - labels)  # wrong everywhere: must not matter
    final = _rows(np.full(6, 0.9), labels)
    u_star = calibrate_exits(LadderOutputs((exit1, later, later), final), labels, "entropy")
    assert u_star[0] == 1.0 and len(u_star) == 3


def _stats(outputs, labels, u_star, measure="entropy"):
    u = np.stack([uncertainty(p, measure) for p in outputs.exits], axis=1)
    exit_right = np.stack([p.argmax(1) == labels for p in outputs.exits], axis=1)
    full_right = outputs.final.argmax(1) == labels
    stages, right = _ladder_outcome(u, exit_right, full_right, u_star, 0)
    harmed = int((full_right & ~right).sum())
    fixed = int((~full_right & right).sum())
    return stages.sum(), harmed, fixed, u


@pytest.mark.parametrize("seed", range(12))
def test_on_random_ladders_the_rule_keeps_its_constraint_and_no_single_cut_does_better(seed):
    rng = np.random.default_rng(seed)
    rows, exits, classes = 60, 3, 3
    labels = rng.integers(0, classes, rows)

    def head(skill):
        logits = rng.normal(size=(rows, classes))
        logits[np.arange(rows), labels] += skill * rng.random(rows)
        probabilities = np.exp(logits)
        return probabilities / probabilities.sum(1, keepdims=True)

    outputs = LadderOutputs(tuple(head(s) for s in (1.5, 2.5, 3.5)[:exits]), head(5.0))
    start = no_change_cuts(outputs, "entropy")
    u_star = calibrate_exits(outputs, labels, "entropy")
    cost, harmed, fixed, u = _stats(outputs, labels, u_star)
    start_cost = _stats(outputs, labels, start)[0]
    assert harmed - fixed + np.sqrt(harmed + fixed) <= 1e-9
    assert cost < start_cost  # these ladders leave step 2 room: it must use it
    # Local optimality: no other cut at any one exit (every cut between two rows) is cheaper
    # while keeping the constraint.
    for k in range(exits):
        values = np.unique(u[:, k])
        for cut in np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [1.0]]):
            trial = list(u_star)
            trial[k] = cut
            trial_cost, h, f, _ = _stats(outputs, labels, trial)
            if h - f + np.sqrt(h + f) <= 1e-9:
                assert trial_cost >= cost


def test_rule_record_names_the_rule_version_and_split(tmp_path):
    """What validate.json records: the budget policy's certificate, the paper rule with its version,
    thresholds stored in model.json, or an explicit τ∞; with the split seed and held-out digest."""
    from types import SimpleNamespace

    from targets.control.calibration import RULE_NAME, RULE_VERSION, rule_line, rule_record
    from targets.control.certified_path import PATH_NAME as CERTIFICATE_NAME, PATH_VERSION as CERTIFICATE_VERSION
    from targets.model.model_dir import load_model_dir
    from tests.model_factory import edit_json, make_model_dir

    directory = make_model_dir(tmp_path / "m", ladder=True, widths=(3, 3))
    spec = load_model_dir(directory)
    paper, budget = SimpleNamespace(policy="paper", uncertainty="entropy"), SimpleNamespace(policy="budget",
                                                                                            uncertainty="entropy")
    assert rule_record(spec, paper) == {"rule": RULE_NAME, "version": RULE_VERSION, "split_seed": None,
                                        "heldout_digest": None}
    assert rule_record(spec, budget, explicit_tau_inf=True)["rule"] == CERTIFICATE_NAME
    assert rule_record(spec, budget)["version"] == CERTIFICATE_VERSION
    assert rule_record(spec, paper, explicit_tau_inf=True)["rule"] == "explicit tau_inf"
    digest = "ab" * 32
    edit_json(directory, lambda m: m.update(split={"seed": 9, "heldout_sha256": digest},
                                            controller={"calibration": {"entropy": [0.2, 0.3]}}))
    stored = rule_record(load_model_dir(directory), paper)
    assert stored == {"rule": "model.json", "version": None, "split_seed": 9, "heldout_digest": digest}
    assert "split seed 9" in rule_line(stored) and "abababababab" in rule_line(stored)
    assert "split seed unknown" in rule_line(rule_record(spec, paper))
