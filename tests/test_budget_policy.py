"""The budget policy end to end: the certificate from the model's validation split, the clamp that
congestion cannot pass, refusal of a budget the split cannot certify, explicit shedding when
queueing breaks the SLO at the ceiling, and, through a real gateway, the ceiling held without
shedding when the service time alone breaks it."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest

from targets.control.budget_policy import BudgetPolicy
from targets.control.certified_path import calibrate_path
from targets.control.controller import BioController
from targets.control.controller_config import ControllerConfig, build_config
from targets.errors import ConfigError
from targets.control.make_controller import make_controller
from tests.test_gateway import infer_body


def synthetic_calibration(budget: float = 0.02, n_exits: int = 1, kind: str = "auto"):
    rng = np.random.default_rng(0)
    n = 3000
    u = rng.uniform(0, 1, (n, n_exits))
    labels = rng.integers(0, 2, n)
    exits = np.where(rng.uniform(size=(n, n_exits)) < 0.3 * u, 1 - labels[:, None], labels[:, None])
    return calibrate_path(u, exits, labels, labels, budget=budget, delta=0.1, kind=kind)


def test_congestion_cannot_push_past_the_certified_ceiling(clock):
    config = ControllerConfig(gamma=1.0, capacity=1, tau0=1.0, tau_inf=1.0, k_per_s=0.0, policy="budget")
    budget = BudgetPolicy(synthetic_calibration())
    paper = BioController(ControllerConfig(gamma=1.0, capacity=1, tau0=1.0, tau_inf=1.0, k_per_s=0.0), clock=clock)
    bounded = BioController(config, clock=clock, budget=budget)
    for controller in (paper, bounded):
        for _ in range(10):
            controller.request_started()  # ĉ = 1: the paper's J > τ for every u < 1
    (ceiling,) = budget.ceiling
    u = min(0.99, ceiling + 0.05)
    assert not paper.decide(u).admitted
    decision = bounded.decide(u)
    assert decision.admitted and decision.threshold == ceiling and decision.path_index == budget.ceiling_index
    assert not bounded.decide(ceiling / 2).admitted  # below the ceiling the row leaves


def test_a_request_runs_one_point_of_the_path_at_every_exit(clock):
    """The point is taken once per request: however the signals move between its exits, every
    decision of the request uses the thresholds of that one point (never a mix of two)."""
    calibration = synthetic_calibration(n_exits=3, kind="per-exit")
    assert calibration.ceiling > 4
    controller = BioController(ControllerConfig(policy="budget", tau0=1.0, tau_inf=1.0, k_per_s=0.0, gamma=1.0,
                                                capacity=1), clock=clock, budget=BudgetPolicy(calibration))
    point = controller.path_point()
    assert point[0] == 0  # λ_J = 1 − τ∞/α = 0 with no congestion: the strict end
    for _ in range(10):
        controller.request_started()  # congestion rises between this request's exits
    decisions = [controller.decide(0.99, exit_index=k, last_exit=k == 3, point=point) for k in (1, 2, 3)]
    assert [d.path_index for d in decisions] == [0, 0, 0]
    assert [d.threshold for d in decisions] == list(calibration.points[0])
    assert controller.path_point()[0] == calibration.ceiling


def test_adaptive_spend_rests_mid_path_and_congestion_takes_it_to_the_ceiling(digits_spec, digits_backend, clock):
    config = ControllerConfig(policy="budget", accuracy_budget_pp=2.0, spend="adaptive", tau0=1.0, k_per_s=100.0,
                              capacity=4)
    controller = make_controller(config, digits_spec, digits_backend, clock=clock)
    clock.advance(1.0)  # past warm-up
    ceiling = controller.budget.ceiling_index
    idle = controller.path_point()[0]
    assert idle == int(0.5 * ceiling) < ceiling
    for _ in range(5):
        controller.request_started()  # ĉ = 1: γ·ĉ = 0.5 lifts the level from 0.5 to 1
    assert controller.path_point()[0] == ceiling
    for _ in range(5):
        controller.request_finished(None)
    assert controller.path_point()[0] == idle
    at_ceiling = make_controller(replace(config, spend="ceiling"), digits_spec, digits_backend, clock=clock)
    clock.advance(1.0)
    assert at_ceiling.path_point()[0] == at_ceiling.budget.ceiling_index


def test_a_policy_and_its_budget_go_together(clock):
    with pytest.raises(ConfigError):
        BioController(ControllerConfig(policy="budget"), clock=clock)
    with pytest.raises(ConfigError):
        BioController(ControllerConfig(), clock=clock, budget=BudgetPolicy(synthetic_calibration()))


def test_digits_certifies_from_its_validation_split(digits_spec, digits_backend):
    config = ControllerConfig(policy="budget", accuracy_budget_pp=2.0)
    controller = make_controller(config, digits_spec, digits_backend)
    cert = controller.budget.calibration
    assert cert.certified and cert.n_validation == len(digits_spec.load_validation()[1])
    assert cert.kind == "shared" and cert.n_test == cert.n_validation  # 503 rows: too few to screen on
    per_exit = make_controller(replace(config, budget_path="per-exit"), digits_spec, digits_backend).budget
    assert per_exit.calibration.kind == "per-exit"
    assert per_exit.calibration.n_screen + per_exit.calibration.n_test == cert.n_validation
    assert all(0 < t <= 1 for t in controller.budget.ceiling)
    with pytest.raises(ConfigError, match="smallest its test rows can certify"):
        make_controller(ControllerConfig(policy="budget", accuracy_budget_pp=0.1), digits_spec, digits_backend)


def test_refusals_that_would_leave_the_certified_family_are_one_line(digits_spec, digits_backend):
    with pytest.raises(ConfigError, match="skip action 'reject' cannot run under the budget policy"):
        ControllerConfig(policy="budget", skip_action="reject")
    with pytest.raises(ConfigError, match="skip action 'cache' cannot run under a 'net' budget"):
        ControllerConfig(policy="budget", skip_action="cache", budget_loss="net")
    ControllerConfig(policy="budget", skip_action="cache")  # harm risk: a cached full answer harms nothing
    with pytest.raises(ConfigError, match="exit_tau_inf cannot be set under the budget policy"):
        make_controller(ControllerConfig(policy="budget", accuracy_budget_pp=2.0, exit_tau_inf=(0.0, 0.5, 0.5)),
                        digits_spec, digits_backend, explicit_tau_inf=True)
    with pytest.raises(ConfigError, match="controller.spend must be one of"):
        ControllerConfig(spend="everything")


def test_validate_refuses_an_uncertifiable_budget_with_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "green_mlops.cli", "validate", "--no-load", "--energy", "off",
                             "--policy", "budget", "--accuracy-budget-pp", "0.1", "--results", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "smallest its test rows can certify" in result.stderr and "Traceback" not in result.stderr


def test_gateway_holds_the_ceiling_and_says_so_when_service_time_breaks_the_slo(start_gateway, digits_eval):
    """An SLO no service time can meet (1 µs): the loop goes to the certified ceiling and no further,
    sheds nothing (fewer requests would not make one faster) and counts the periods as unreachable;
    the loop's state travels with every answer."""
    gateway = start_gateway("--controller", "bio", "--policy", "budget", "--accuracy-budget-pp", "2",
                            "--slo-p95-ms", "0.001", "--energy", "off")
    x = digits_eval[0]
    statuses, slo_states = [], []
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        for i in range(200):
            response = client.post("/v2/models/digits/infer", json=infer_body(x[i % len(x) : i % len(x) + 1]))
            statuses.append(response.status_code)
            parameters = response.json()["parameters"]
            slo_states.append({k: parameters.get(k) for k in ("slo_p95_ms", "slo_seen_p95_ms", "slo_service_p95_ms",
                                                              "slo_threshold", "shed_probability")})
        state = client.get("/v2/controller").json()
        metrics = client.get("/metrics").text
    assert set(statuses) == {200} and state["shed"] == 0
    slo = state["budget"]["slo"]
    assert slo["threshold"] == 1.0 and state["budget"]["level"] == 1.0  # the ceiling: nothing more may be skipped
    assert state["budget"]["path_index"] == state["budget"]["ceiling_index"]
    assert slo["shed_probability"] == 0 and slo["unreachable"] > 0 and slo["violations"] >= slo["unreachable"]
    assert 0 < slo["service_p95_ms"] <= slo["p95_ms"]  # the model's work is part of arrival-to-answer
    assert all(s["slo_p95_ms"] == 0.001 and s["slo_threshold"] is not None for s in slo_states)
    assert slo_states[-1]["slo_seen_p95_ms"] > 0.001 and slo_states[-1]["slo_service_p95_ms"] > 0.001
    assert "green_mlops_slo_p95_target_seconds 1e-06" in metrics and "green_mlops_slo_unreachable_periods" in metrics


def test_controller_sheds_when_queueing_breaks_the_slo_and_only_then(digits_spec, digits_backend):
    """The real controller and budget policy, fed request by request: latency far above the SLO with
    a short service time (queueing) makes it shed explicitly; the same latency with a service time
    above the SLO does not."""
    def controller_after(service_ms: float):
        config = build_config(digits_spec.controller_hints, overrides={"policy": "budget", "slo_p95_ms": 5.0,
                                                                       "accuracy_budget_pp": 2.0})
        controller = make_controller(config, digits_spec, digits_backend)
        for _ in range(400):
            controller.request_started()
            controller.request_finished(50.0, service_ms)
        return controller

    queueing = controller_after(service_ms=0.5)
    assert queueing.budget.loop.shed_probability > 0 and queueing.budget.loop.unreachable == 0
    decisions = [queueing.shed_decision() for _ in range(400)]
    assert sum(d is not None for d in decisions) > 100
    assert {d.action for d in decisions if d is not None} == {"shed"}
    slow_model = controller_after(service_ms=20.0)
    assert slow_model.budget.loop.shed_probability == 0 and slow_model.budget.loop.unreachable > 0
    assert all(slow_model.shed_decision() is None for _ in range(400))


def test_the_budget_policy_spends_the_certified_budget_unless_told_otherwise(digits_spec, digits_backend, clock):
    """The default rests at the ceiling (τ∞ = 0); an explicit scalar τ∞ places the controller on the
    path at level 1 − τ∞/α, and the paper rule's per-exit τ∞ never survives under the budget policy."""
    config = ControllerConfig(policy="budget", accuracy_budget_pp=2.0, tau_inf=0.95, exit_tau_inf=(0.9, 0.9, 0.9))
    controller = make_controller(config, digits_spec, digits_backend)
    assert controller.config.tau_inf == pytest.approx(0.0) and controller.config.exit_tau_inf is None
    kept = make_controller(replace(config, tau_inf=0.75, exit_tau_inf=None, tau0=0.75), digits_spec, digits_backend,
                           clock=clock, explicit_tau_inf=True)
    assert kept.config.tau_inf == 0.75 and kept.config.exit_tau_inf is None
    assert kept.path_point()[0] == int(0.25 * kept.budget.ceiling_index + 1e-9)


def test_the_slo_loop_sees_the_last_second_not_the_last_n_requests(digits_spec, digits_backend):
    """Slow requests long gone must not keep the loop shedding: after 16 requests of 50 ms at t = 0
    and 16 of 1 ms at t = 2 s, the p95 the loop acts on is 1 ms."""
    now = [0.0]
    config = build_config(digits_spec.controller_hints, overrides={"policy": "budget", "slo_p95_ms": 5.0,
                                                                   "accuracy_budget_pp": 2.0})
    controller = make_controller(config, digits_spec, digits_backend, clock=lambda: now[0])
    for latency_ms in [50.0] * 16 + [1.0] * 16:
        if latency_ms == 1.0:
            now[0] = 2.0
        controller.request_started()
        controller.request_finished(latency_ms, latency_ms / 2)
    loop = controller.budget.loop
    assert loop.last_p95_ms == pytest.approx(1.0) and loop.last_service_p95_ms == pytest.approx(0.5)
    assert controller.state()["p95_recent_ms"] > 1.0  # ĉ keeps its count window: 32 requests


def test_adaptive_spend_through_a_gateway_follows_rising_then_falling_load(start_gateway, digits_eval):
    """A real gateway, --spend adaptive: one request at a time it rests below the ceiling; 24
    concurrent clients fill it past its capacity and the requests run at the ceiling; one at a
    time again, it comes back down. Every answer says which point of the path it ran."""
    from concurrent.futures import ThreadPoolExecutor

    gateway = start_gateway("--controller", "bio", "--policy", "budget", "--accuracy-budget-pp", "2",
                            "--spend", "adaptive", "--capacity", "2", "--slo-ms", "10000", "--k", "50",
                            "--energy", "off")
    x = digits_eval[0]

    def send(client, i):
        response = client.post("/v2/models/digits/infer", json=infer_body(x[i % len(x): i % len(x) + 1]))
        assert response.status_code == 200, response.text
        return response.json()["parameters"]["path_index"]

    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        ceiling = client.get("/v2/controller").json()["budget"]["ceiling_index"]
        # τ(t) decays from τ0 in about 0.1 s at k = 50; thirty requests take less than that.
        deadline = time.monotonic() + 10
        while abs((state := client.get("/v2/controller").json())["tau"] - state["config"]["tau_inf"]) > 1e-6:
            assert time.monotonic() < deadline, state["tau"]
            time.sleep(0.02)
        before = [send(client, i) for i in range(30)]
    clients = [httpx.Client(base_url=gateway.url, timeout=60) for _ in range(24)]
    try:
        with ThreadPoolExecutor(24) as pool:
            during = list(pool.map(lambda i: send(clients[i % 24], i), range(24 * 25)))
    finally:
        for c in clients:
            c.close()
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        after = [send(client, i) for i in range(30)]
        metrics = client.get("/metrics").text
    assert ceiling > 4
    # At rest: the middle of the certified path (the recent p95 over a 10 s objective may move the
    # level by a hair across a point's edge).
    middle = {ceiling // 2 - 1, ceiling // 2, ceiling // 2 + 1}
    assert set(before[5:]) <= middle
    assert during.count(ceiling) > 0 and max(during) == ceiling  # congestion: the ceiling, never past it
    assert set(after[5:]) <= middle
    assert "green_mlops_path_level" in metrics and 'green_mlops_exit_threshold_ceiling{exit="3"}' in metrics


def test_the_slo_loop_loosens_under_violation_and_tightens_when_met_comfortably(digits_spec, digits_backend, clock):
    """The SLO loop's level on the path: p95 over the SLO lifts it to the ceiling; p95 well under
    it brings it back down step by step (buying accuracy back), and the point run follows."""
    config = build_config(digits_spec.controller_hints, overrides={"policy": "budget", "slo_p95_ms": 5.0,
                                                                   "accuracy_budget_pp": 2.0, "spend": "adaptive",
                                                                   "overload_action": "queue"})
    controller = make_controller(config, digits_spec, digits_backend, clock=clock)
    clock.advance(10.0)
    loop, ceiling = controller.budget.loop, controller.budget.ceiling_index
    resting = controller.path_point()[0]
    for _ in range(160):
        controller.request_started()
        controller.request_finished(20.0, 0.5)
    assert loop.threshold == 1.0 and controller.path_point()[0] == ceiling
    clock.advance(2.0)  # the slow requests leave the loop's one-second window
    levels = []
    for _ in range(60):
        clock.advance(0.1)
        for _ in range(16):
            controller.request_started()
            controller.request_finished(1.0, 0.5)
        levels.append(loop.threshold)
    # It stops shedding first (the queue action sheds nothing, but the loop's probability still
    # falls back), then its level falls by 0.01 per period met comfortably.
    assert all(b <= a for a, b in zip(levels, levels[1:])) and levels[-1] <= 0.9
    assert controller.path_point()[0] < ceiling and controller.path_point()[0] >= resting


def test_serve_rests_mid_path_unless_told_otherwise(start_gateway):
    """`serve` defaults to --spend adaptive (a server spends accuracy when it buys something);
    --spend ceiling is honoured; the state says which."""
    adaptive = start_gateway("--controller", "bio", "--policy", "budget", "--accuracy-budget-pp", "2", "--energy", "off")
    ceiling = start_gateway("--controller", "bio", "--policy", "budget", "--accuracy-budget-pp", "2", "--energy", "off",
                            "--spend", "ceiling")
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{adaptive.url}/v2/controller").json()["budget"]["spend"] == "adaptive"
        state = client.get(f"{ceiling.url}/v2/controller").json()
    assert state["budget"]["spend"] == "ceiling" and state["config"]["tau_inf"] == 0.0
