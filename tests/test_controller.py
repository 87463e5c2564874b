"""The controller's semantics: J = α(1−u) + βê + γĉ, admit iff J ≤ τ(t), τ decays τ0 → τ∞."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from targets.control.controlled import ControlledTarget
from targets.control.controller import BioController, input_key, uncertainty
from targets.control.controller_config import ControllerConfig


def controller(clock, **settings_) -> BioController:
    return BioController(ControllerConfig(**settings_), clock=clock)


def test_tau_decays_from_tau0_to_tau_inf(clock):
    c = controller(clock, tau0=1.75, tau_inf=0.5, k_per_s=2.0)
    assert c.tau() == pytest.approx(1.75)
    clock.advance(0.5)
    assert c.tau() == pytest.approx(0.5 + 1.25 * math.exp(-1.0))
    clock.advance(100)
    assert c.tau() == pytest.approx(0.5, abs=1e-12)
    taus = [c.tau(t) for t in np.linspace(0, 5, 50)]
    assert all(a > b for a, b in zip(taus, taus[1:]))


def test_default_tau0_admits_everything(clock):
    c = controller(clock, tau_inf=0.1)
    assert c.config.tau0 == pytest.approx(1.75)
    assert c.decide(0.0).admitted  # the most confident request, at t = 0


def test_higher_uncertainty_lowers_cost_and_is_admitted(clock):
    c = controller(clock, tau0=0.6, tau_inf=0.6)
    confident, unsure = c.decide(0.1), c.decide(0.9)
    assert unsure.j < confident.j
    assert unsure.admitted and not confident.admitted
    assert unsure.action == "full" and confident.action == "exit"


def test_energy_raises_cost(clock):
    c = controller(clock, tau0=0.5, tau_inf=0.5, beta=1.0, energy_ref_j=2.0)
    before = c.decide(0.6)
    assert before.energy_source == "none" and before.energy_norm == 0.0 and before.admitted
    c.observe_energy(1.0, "measured:test")
    after = c.decide(0.6)
    assert after.energy_norm == pytest.approx(0.5)
    assert after.energy_source == "measured:test"
    assert after.j == pytest.approx(before.j + 0.5)
    assert not after.admitted


def test_energy_ewma_and_bad_readings(clock):
    c = controller(clock, energy_ewma_weight=0.5, energy_ref_j=10.0)
    c.observe_energy(2.0, "measured:a")
    c.observe_energy(4.0, "measured:a")
    c.observe_energy(float("nan"), "measured:a")
    c.observe_energy(-1.0, "measured:a")
    assert c.state()["energy_j_per_request"] == pytest.approx(3.0)
    c.observe_energy(1e9, "measured:a")
    assert c.energy_norm() == 1.0  # clipped


def test_in_flight_raises_congestion_and_cost(clock):
    c = controller(clock, tau0=0.5, tau_inf=0.5, capacity=4)
    c.request_started()
    alone = c.decide(0.6)
    for _ in range(3):
        c.request_started()
    crowded = c.decide(0.6)
    assert alone.congestion == 0.0
    assert crowded.congestion == pytest.approx(0.75)
    assert crowded.j > alone.j and alone.admitted and not crowded.admitted
    for _ in range(10):
        c.request_started()
    assert c.decide(0.6).congestion == 1.0  # clipped


def test_recent_p95_against_slo_raises_congestion(clock):
    c = controller(clock, slo_ms=10.0)
    for _ in range(32):
        c.request_started()
        c.request_finished(5.0)
    assert c.congestion() == pytest.approx(0.5)
    for _ in range(256):
        c.request_started()
        c.request_finished(50.0)
    assert c.congestion() == 1.0


def test_reject_action(clock):
    c = controller(clock, tau0=0.0, tau_inf=0.0, skip_action="reject")
    d = c.decide(0.2)
    assert not d.admitted and d.action == "reject"


def test_cache_action_needs_an_earlier_full_answer(clock):
    c = controller(clock, tau0=0.0, tau_inf=0.0, skip_action="cache", cache_size=2)
    key = input_key(np.ones((1, 2), np.float32))
    assert c.decide(0.2, key).action == "exit"  # miss: falls back to the exit head
    c.remember(key, np.array([0.0, 1.0]))
    assert c.decide(0.2, key).action == "cache"
    for i in range(2):  # LRU evicts the oldest entry
        c.remember(input_key(np.full((1, 2), i + 5, np.float32)), np.array([1.0, 0.0]))
    assert c.decide(0.2, key).action == "exit"


def test_input_key_tells_dtype_and_shape_apart():
    a = np.zeros((1, 4), np.float32)
    assert input_key(a) == input_key(a.copy())
    assert input_key(a) != input_key(a.reshape(2, 2))
    assert input_key(a) != input_key(np.zeros((1, 2), np.float64))


def test_every_decision_is_recorded(clock):
    records = []
    c = BioController(ControllerConfig(tau0=0.5, tau_inf=0.5), clock=clock, on_decision=records.append)
    clock.advance(1.5)
    c.decide(0.9)
    c.decide(0.1)
    assert [r.admitted for r in records] == [True, False]
    record = records[0].as_record()
    assert set(record) == {"t_s", "u", "energy_norm", "energy_source", "congestion", "j", "tau",
                           "admitted", "action", "exit_index", "threshold", "path_index"}
    assert record["t_s"] == pytest.approx(1.5)


def test_thread_safety_counts_every_decision(clock):
    c = controller(clock, tau0=0.8, tau_inf=0.8, gamma=0.0)

    def work():
        for i in range(2000):
            c.request_started()
            c.decide((i % 10) / 10 + 0.05)
            c.request_finished(1.0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = c.state()
    assert state["decisions"] == 8000 and state["in_flight"] == 0
    assert state["admitted"] == 4 * 2000 * 8 // 10  # u in {0.25, …, 0.95}: 1 − u ≤ 0.8


probabilities = arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(2, 12)),
                       elements=st.floats(0.0, 1.0)).filter(lambda a: (a.sum(axis=1) > 0).all())


@settings(max_examples=200, deadline=None)
@given(probabilities, st.sampled_from(["entropy", "least_confidence", "margin"]))
def test_uncertainty_is_in_unit_interval(raw, kind):
    p = raw / raw.sum(axis=1, keepdims=True)
    u = uncertainty(p, kind)
    assert u.shape == (len(p),) and np.all((u >= 0) & (u <= 1))


@pytest.mark.parametrize("kind", ["entropy", "least_confidence", "margin"])
def test_uncertainty_extremes(kind):
    one_hot, uniform = np.eye(5)[:1], np.full((1, 5), 0.2)
    assert uncertainty(one_hot, kind)[0] == pytest.approx(0.0, abs=1e-9)
    assert uncertainty(uniform, kind)[0] == pytest.approx(1.0)


def test_ladder_runs_each_stage_only_for_the_rows_that_continue(digits_backend, digits_eval, clock):
    from targets.control.calibration import ladder_outputs

    x = digits_eval[0][:64]
    calls = []

    class Counting:
        provider = digits_backend.provider
        n_stages = digits_backend.n_stages
        check = digits_backend.check
        full_probabilities = digits_backend.full_probabilities

        def stage(self, index, rows):
            calls.append((index, len(rows)))
            return digits_backend.stage(index, rows)

    n_exits = digits_backend.n_stages - 1
    assert n_exits >= 3
    # Steady thresholds that let some rows leave at every exit (u spreads differently per exit).
    exit_tau = tuple(0.97 - 0.01 * k for k in range(n_exits))
    config = ControllerConfig(tau0=0.97, tau_inf=exit_tau[0], exit_tau_inf=exit_tau, k_per_s=1.0, beta=0, gamma=0)
    c = BioController(config, clock=clock)
    clock.advance(1e6)
    outcomes = ControlledTarget(Counting(), c).predict(x)
    reference = ladder_outputs(digits_backend, x)
    stages = [o.stage for o in outcomes]
    # Stage k runs once, on exactly the rows that did not leave before it.
    expected_calls = [(k, sum(s > k for s in stages)) for k in range(digits_backend.n_stages)
                      if sum(s > k for s in stages)]
    assert calls == expected_calls
    for i, o in enumerate(outcomes):
        if o.stage <= n_exits:
            assert o.decision.exit_index == o.stage and not o.decision.admitted and o.action == "exit"
            assert o.decision.tau == pytest.approx(exit_tau[o.stage - 1])
            np.testing.assert_allclose(o.probabilities, reference.exits[o.stage - 1][i], atol=1e-5)
        else:
            assert o.decision.exit_index == n_exits and o.decision.admitted and o.action == "full"
            np.testing.assert_allclose(o.probabilities, reference.final[i], atol=1e-5)
    # One counted decision per row; every exit's decisions counted apart.
    assert c.decisions == 64 and c.admitted == stages.count(digits_backend.n_stages)
    assert c.exit_decisions == sum(min(s, n_exits) for s in stages)


def test_per_exit_threshold_length_must_match_the_ladder(digits_backend):
    from targets.errors import ConfigError

    with pytest.raises(ConfigError, match="lists 2 thresholds but the model has 3 exit"):
        ControlledTarget(digits_backend, BioController(ControllerConfig(exit_tau_inf=(0.5, 0.5))))


def test_controlled_target_reject_gives_no_answer(digits_backend, digits_eval):
    x, _ = digits_eval
    target = ControlledTarget(digits_backend, BioController(ControllerConfig(tau0=0, tau_inf=0,
                                                                            skip_action="reject")))
    (outcome,) = target.predict(x[:1])
    assert outcome.probabilities is None and outcome.action == "reject"


def test_controlled_target_cache_answers_from_earlier_full_run(digits_backend, digits_eval, clock):
    x, _ = digits_eval
    c = BioController(ControllerConfig(tau0=1.75, tau_inf=0.0, k_per_s=1.0, skip_action="cache"),
                      clock=clock)
    target = ControlledTarget(digits_backend, c)
    (first,) = target.predict(x[:1])  # t = 0: τ0 admits everything, the answer is cached
    clock.advance(1000)  # τ = 0: nothing is admitted any more
    (second,) = target.predict(x[:1])
    (other,) = target.predict(x[1:2])
    assert first.action == "full" and second.action == "cache" and other.action == "exit"
    np.testing.assert_array_equal(second.probabilities, first.probabilities)


def test_finished_without_latency_leaves_the_window_alone(clock):
    c = controller(clock, slo_ms=10.0)
    for _ in range(32):
        c.request_started()
        c.request_finished(5.0)
    for _ in range(64):
        c.request_started()
        c.request_finished(None)
    state = c.state()
    assert state["in_flight"] == 0 and state["p95_recent_ms"] == pytest.approx(5.0)
