"""The SLO loop (AIMD on the exit threshold, then shedding) against a simulated server whose p95
follows its utilisation: it meets the SLO when capacity allows, never passes the certified
ceiling, and sheds explicitly, saying so, when the ceiling is not enough."""
from __future__ import annotations

import pytest

from targets.errors import ConfigError
from targets.control.slo_loop import SloLoop


def simulated_p95_ms(arrival_rps: float, exit_rate: float, shed: float) -> float:
    """M/M/1-like: service 1 ms per request that runs deep, 0.2 ms per early exit."""
    service_ms = 0.2 + 0.8 * (1 - exit_rate)
    utilisation = min(0.99, arrival_rps * (1 - shed) * service_ms / 1000)
    return service_ms * 3.0 / (1 - utilisation)  # p95 of an exponential sojourn ≈ 3 × mean


def exit_rate_at(threshold: float) -> float:
    return min(1.0, threshold / 0.6)  # the fraction of rows whose uncertainty is below λ


def simulated_service_p95_ms(exit_rate: float) -> float:
    """The same server's p95 of service time alone (no queueing)."""
    return (0.2 + 0.8 * (1 - exit_rate)) * 3.0


def run(loop: SloLoop, arrival_rps: float, periods: int = 200) -> list[float]:
    p95s = []
    for _ in range(periods):
        p95 = simulated_p95_ms(arrival_rps, exit_rate_at(loop.threshold), loop.shed_probability)
        loop.update(p95, simulated_service_p95_ms(exit_rate_at(loop.threshold)))
        p95s.append(p95)
        assert loop.floor <= loop.threshold <= loop.ceiling
    return p95s


def test_meets_the_slo_within_the_budget_when_capacity_allows():
    loop = SloLoop(slo_p95_ms=10.0, ceiling=0.5, floor=0.0)
    p95s = run(loop, arrival_rps=900)
    assert max(p95s[-50:]) <= 10.0 and loop.shed_probability == 0.0
    assert 0 < loop.threshold < 0.5  # skips only as much as the SLO needs


def test_sheds_explicitly_when_the_ceiling_is_not_enough():
    loop = SloLoop(slo_p95_ms=4.0, ceiling=0.3, floor=0.0)
    p95s = run(loop, arrival_rps=1500)
    assert loop.at_ceiling and loop.shed_probability > 0
    assert max(p95s[-50:]) <= 4.0 * 1.5  # shedding brings p95 back near the SLO
    assert loop.state()["shed_probability"] == loop.shed_probability


def test_does_not_shed_when_the_service_time_alone_breaks_the_slo():
    # At the ceiling the service p95 is 1.8 ms: an SLO of 1 ms is out of reach at any load, and
    # shedding would only throw requests away. The loop holds the ceiling and says so instead.
    loop = SloLoop(slo_p95_ms=1.0, ceiling=0.3, floor=0.0)
    run(loop, arrival_rps=1500)
    assert loop.at_ceiling and loop.shed_probability == 0.0
    assert loop.unreachable > 100 and loop.state()["unreachable"] == loop.unreachable
    assert loop.state()["service_p95_ms"] == pytest.approx(simulated_service_p95_ms(exit_rate_at(0.3)))


def test_stops_shedding_once_the_service_time_breaks_the_slo():
    loop = SloLoop(slo_p95_ms=4.0, ceiling=0.3, floor=0.0)
    run(loop, arrival_rps=1500)
    assert loop.shed_probability > 0  # queueing: shedding helps
    for _ in range(40):
        loop.update(9.0, 6.0)  # the model itself got slower than the SLO: shedding cannot help
    assert loop.shed_probability == 0.0 and loop.unreachable == 40


def test_buys_accuracy_back_when_load_falls():
    loop = SloLoop(slo_p95_ms=4.0, ceiling=0.3, floor=0.0)
    run(loop, arrival_rps=1500)
    run(loop, arrival_rps=100, periods=100)
    assert loop.shed_probability == 0 and loop.threshold < 0.05  # back to (nearly) full accuracy


def test_no_traffic_holds_the_state():
    loop = SloLoop(slo_p95_ms=4.0, ceiling=0.3)
    loop.update(None)
    assert loop.updates == 0 and loop.threshold == 0.0


@pytest.mark.parametrize("kwargs", [{"slo_p95_ms": 0, "ceiling": 0.3}, {"slo_p95_ms": 5, "ceiling": 0.1, "floor": 0.2},
                                    {"slo_p95_ms": 5, "ceiling": 0.3, "backoff": 0}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        SloLoop(**kwargs)


def test_budget_policy_clamps_at_the_ceiling_and_refuses_what_it_cannot_certify():
    import numpy as np

    from targets.control.budget_policy import BudgetPolicy
    from targets.control.certified_path import calibrate_path

    rng = np.random.default_rng(0)
    n = 2000
    u = rng.uniform(0, 1, (n, 1))
    labels = rng.integers(0, 2, n)
    exits = np.where(rng.uniform(size=(n, 1)) < 0.3 * u, 1 - labels[:, None], labels[:, None])
    calibration = calibrate_path(u, exits, labels, labels, budget=0.02, delta=0.1, kind="shared")
    policy = BudgetPolicy(calibration, slo_p95_ms=5.0)
    assert 0 < policy.ceiling[0] < 1
    assert policy.point(1.5) == (policy.ceiling_index, policy.ceiling) and policy.clamped == 1
    assert policy.point(0.5)[0] == int(0.5 * policy.ceiling_index)  # a level on the certified part only
    assert not policy.should_shed()
    for _ in range(20):
        policy.observe_p95(50.0)  # far above the SLO: up to the ceiling, then shedding
    assert policy.loop.at_ceiling and sum(policy.should_shed() for _ in range(200)) > 100
    assert policy.point(0.0)[0] == policy.ceiling_index  # the loop's level holds the ceiling
    with pytest.raises(ConfigError, match="smallest its test rows can certify is 10.87 pp"):
        BudgetPolicy(calibrate_path(u[:20], exits[:20], labels[:20], labels[:20], budget=0.005, delta=0.1))
