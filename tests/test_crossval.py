"""`green-mlops crossval` (targets/control/crossval.py, green_mlops/crossval.py): planted truths on
synthetic ladders whose out-of-fold loss and saving are known, the exact interval of the share,
and the command on the embedded digits model (one pass of the stages, bad input exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from targets.control.calibration import LadderOutputs
from targets.control.crossval import Fit, Pool, Rule, clopper_pearson, crossval, score, splits, standard_rules
from targets.errors import ConfigError


def _two_class(confidence: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """Probabilities whose top class is ``answers`` with probability ``confidence``."""
    p = np.stack([confidence, 1 - confidence], axis=1)
    p[answers == 1] = p[answers == 1, ::-1]
    return p


def _ladder(n_rows: int, harmed: np.ndarray, exit_confidence: np.ndarray) -> Pool:
    """One exit before the full model. The full model is right on every row; the exit is right
    except on the ``harmed`` rows (the planted loss)."""
    labels = np.tile([0, 1], n_rows // 2)
    exit_answers = np.where(harmed, 1 - labels, labels)
    return Pool(LadderOutputs((_two_class(exit_confidence, exit_answers),), _two_class(np.full(n_rows, 0.99), labels)),
                labels)


EXIT_ALL = Rule("exit-all", "exit-all", None, "every row leaves at the first exit", lambda o, y, m: Fit((1.0,)))


def test_a_planted_loss_of_2_pp_is_recovered_exactly_out_of_fold():
    """20 of 1,000 rows harmed (2 pp) by a rule that lets every row leave at exit 1 of a two-stage
    ladder (unit costs: 50 % saving). K equal folds score every row once: the mean over folds is
    the pool's loss exactly; random re-splits recover it in the mean."""
    rng = np.random.default_rng(3)
    harmed = np.zeros(1000, dtype=bool)
    harmed[rng.choice(1000, 20, replace=False)] = True
    pool = _ladder(1000, harmed, rng.uniform(0.6, 0.99, 1000))
    (kfold,) = crossval(pool, [EXIT_ALL], splits(1000, "kfold", 4, seed=1, folds=5), [1, 1], 2.0)
    assert kfold["splits"] == 20
    assert kfold["loss_pp"]["mean"] == pytest.approx(2.0, abs=1e-9)
    assert kfold["saving_pct"]["mean"] == pytest.approx(50.0, abs=1e-9)
    assert kfold["mean_stages"] == pytest.approx(1.0)
    (resplit,) = crossval(pool, [EXIT_ALL], splits(1000, "resplit", 300, seed=2, n_fit=500), [1, 1], 2.0)
    assert resplit["loss_pp"]["mean"] == pytest.approx(2.0, abs=0.05)
    assert resplit["loss_pp"]["range95"][0] < 2.0 < resplit["loss_pp"]["range95"][1]
    assert resplit["loss_above_target"]["share"] > 0.95  # 2 pp passes 0.5 pp in nearly every split
    (clean,) = crossval(_ladder(1000, np.zeros(1000, dtype=bool), np.full(1000, 0.9)), [EXIT_ALL],
                        splits(1000, "resplit", 50, seed=2, n_fit=500), [1, 1], 2.0)
    assert clean["loss_pp"]["mean"] == 0.0 and clean["loss_above_target"]["count"] == 0


def test_the_shipped_rules_find_a_clean_gap_and_their_out_of_fold_loss_is_zero():
    """The exit agrees with the full model on the 70 % of rows it is confident about (confidence
    0.95-0.99) and harms every other row (0.6-0.75): the paper rule and the no-change cuts cut in
    the gap on any fitted part, so out of fold they lose nothing and save 70 % × 50 % = 35 %
    (unit costs; equal folds make the mean exact). The budget certificate may pass a harm or two
    inside its 0.5 pp budget: its loss is small, not zero."""
    rng = np.random.default_rng(5)
    n = 1000
    confident = rng.permutation(np.arange(n) < 700)
    confidence = np.where(confident, rng.uniform(0.95, 0.99, n), rng.uniform(0.6, 0.75, n))
    pool = _ladder(n, ~confident, confidence)
    results = {r["key"]: r for r in crossval(pool, standard_rules(), splits(n, "kfold", 2, seed=0, folds=5),
                                             [1, 1], 2.0)}
    for key in ("paper", "no-change", "paper-no-se"):
        assert results[key]["loss_pp"]["mean"] == 0.0, key
        assert results[key]["saving_pct"]["mean"] == pytest.approx(35.0, abs=1e-9), key
    assert 0.0 <= results["budget"]["loss_pp"]["mean"] < 0.5
    assert results["budget"]["uncertified_splits"] == 0


def test_the_standard_error_keeps_the_paper_rule_below_its_z0_variant_on_noise():
    """Harms and fixes spread at random over the uncertainty order (no signal to find): the
    variant without the standard error chases the noise and loses more out of fold."""
    rng = np.random.default_rng(11)
    n = 1200
    labels = np.tile([0, 1], n // 2)
    full_answers = np.where(rng.random(n) < 0.05, 1 - labels, labels)  # the full model errs on 5 %
    exit_answers = np.where(rng.random(n) < 0.08, 1 - full_answers, full_answers)  # the exit differs on 8 %
    pool = Pool(LadderOutputs((_two_class(rng.uniform(0.55, 0.99, n), exit_answers),),
                              _two_class(np.full(n, 0.99), full_answers)), labels)
    results = {r["key"]: r for r in crossval(pool, standard_rules(), splits(n, "resplit", 60, seed=0, n_fit=500),
                                             [1, 1], 2.0)}
    assert results["paper-no-se"]["loss_pp"]["mean"] > results["paper"]["loss_pp"]["mean"]


def test_saving_counts_the_stages_each_row_runs_at_the_given_costs():
    pool = _ladder(4, np.zeros(4, dtype=bool), np.array([0.99, 0.99, 0.6, 0.6]))
    u = pool.u[:, 0]
    rows = np.arange(4)
    # Two rows leave after stage 1 (cost 1 ms), two run both (1 + 3 ms); the standard path costs 5 ms.
    figures = score(pool, rows, (float(u.min() + u.max()) / 2,), [1.0, 3.0], 5.0)
    assert figures["saving_pct"] == pytest.approx(100 * (1 - (1 + 1 + 4 + 4) / 4 / 5))
    assert figures["exit_rate"] == 0.5 and figures["mean_stages"] == 1.5


def test_clopper_pearson_matches_the_beta_quantiles():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 20), (3, 20), (20, 20), (38, 200)):
        lo, hi = clopper_pearson(k, n)
        want_lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
        want_hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
        assert (lo, hi) == pytest.approx((want_lo, want_hi), abs=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "resplit", "n_fit": 10}, "n_fit"), ({"scheme": "resplit", "n_fit": None}, "n_fit"),
    ({"scheme": "kfold", "folds": 1}, "--folds"), ({"scheme": "loo"}, "unknown scheme"),
    ({"scheme": "kfold", "repeats": 0}, "--repeats"),
])
def test_bad_splits_are_refused(kwargs, message):
    args = {"repeats": 2, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        splits(10, **args)


def test_splits_are_seeded_and_partition_the_pool():
    a, b = splits(50, "kfold", 2, seed=4, folds=5), splits(50, "kfold", 2, seed=4, folds=5)
    assert all((x[1] == y[1]).all() for x, y in zip(a, b))
    scored = np.concatenate([s for _, s in a[:5]])
    assert sorted(scored.tolist()) == list(range(50))
    assert all(not set(f) & set(s) for f, s in a)


# --- the command on the embedded digits model ------------------------------------------------
def test_crossval_command_runs_the_stages_once_and_writes_json(tmp_path, monkeypatch, capsys):
    import green_mlops.crossval as command
    from green_mlops.cli import main
    from green_mlops.models import resolve_model

    calls = []
    real = command.ladder_outputs
    monkeypatch.setattr(command, "ladder_outputs", lambda backend, x: calls.append(len(x)) or real(backend, x))
    out = tmp_path / "cv.json"
    assert main(["crossval", "--model", "digits", "--repeats", "3", "--costs", "unit", "--json", str(out)]) == 0
    spec = resolve_model("digits")
    n_pool = spec.meta["validation"]["n"] + spec.meta["eval"]["n"]
    assert calls == [n_pool]  # every stage over the pool, once
    document = json.loads(out.read_text())
    assert document["split_seed"] == spec.split_seed and document["heldout_digest"] == spec.heldout_digest
    assert [r["key"] for r in document["rules"]] == ["paper", "paper-no-se", "no-change", "budget", "budget-net",
                                                       "budget-shared", "budget-per-exit", "budget-net-shared"]
    assert document["fit_rows"] == spec.meta["validation"]["n"] and document["splits"] == 3
    for rule in document["rules"]:
        assert len(rule["per_split"]["loss_pp"]) == 3
        assert 0.0 <= rule["loss_above_target"]["ci95"][0] <= rule["loss_above_target"]["share"] \
            <= rule["loss_above_target"]["ci95"][1] <= 1.0
    printed = capsys.readouterr().out
    assert "out-of-fold rules" in printed and "budget" in printed


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "kfold", "--folds", "1"], "--folds must be in"),
    (["--risk", "2"], "--risk must be in (0, 1)"),
    (["--model", "/no/such/model"], "model"),
])
def test_crossval_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    from green_mlops.cli import main

    assert main(["crossval", "--costs", "unit", "--repeats", "2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err
