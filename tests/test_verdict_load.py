"""The load-test verdict on hand-made runs whose truth is known: rejections scored as wrong,
failures, unequal offered load, different conditions, achieved rate, warm-up, tolerance, energy
labels; and, by simulation, the coverage of the cluster-bootstrap interval."""
from __future__ import annotations

import numpy as np
import pytest

from reports.ablation import claims as ablation_claims
from reports.runs import Run
from reports.bounds import cluster_mean_bounds
from reports.verdict import ValidityRules, build_summary, claims, compare

N_ROWS = 100
RULES = ValidityRules(min_duration_s=5, min_requests=100)


def reference(full_correct: np.ndarray | None = None) -> dict:
    labels = np.arange(N_ROWS) % 10
    full = labels.copy() if full_correct is None else np.where(full_correct, labels, (labels + 1) % 10)
    return {"label": labels.tolist(), "full_predicted": full.tolist(), "exit_predicted": labels.tolist(),
            "exit_u": {"entropy": [0.5] * N_ROWS}}


def metadata(scenario: str, **overrides) -> dict:
    m = {"scenario": scenario, "model": "digits", "provider": "CPUExecutionProvider", "backend": "gateway",
         "shape": "steady", "shape_params": {"base_users": 4}, "open_loop": True, "arrival_rate_rps": 100.0,
         "schedule": {"digest": "abc", "n_scheduled": 2000, "duration_s": 20.0, "requested_rps": 100.0,
                      "seed": 0},
         "finished": True,
         "controller_state_at_end": {"config": {"tau0": 1.75, "tau_inf": 0.7, "k_per_s": 1.0}}}
    m.update(overrides)
    return m


def records(n: int = 2000, *, outcome=lambda i: "answered", correct=lambda i: True, latency=lambda i: 2.0,
            tau=lambda i: None, late=lambda i: False, sent=lambda i: True) -> list[dict]:
    rows = []
    for i in range(n):
        o = outcome(i)
        row = i % N_ROWS
        t = 1000.0 + i * 0.01
        rows.append({"seq": i, "row": row, "label": row % 10, "t_intended": t, "t_sent": t if sent(i) else None,
                     "offset_s": i * 0.01, "phase": "steady", "status": {"answered": 200, "rejected": 503}.get(o, 0),
                     "outcome": o, "reason": "ConnectionRefusedError" if o == "failed" else None,
                     "admitted": o == "answered", "action": "full" if o == "answered" else None,
                     "correct": o == "answered" and bool(correct(i)), "predicted": row % 10, "tau": tau(i),
                     "latency_ms": latency(i) if o == "answered" else None, "late": late(i)})
    return rows


def run(name: str, recs: list[dict], ref: dict | None = None, windows=None, **meta) -> Run:
    return Run(name, None, metadata(name.split("-")[0], **meta), recs, windows or [], [], ref or reference())


def pair(std=None, bio=None, std_meta=None, bio_meta=None, windows=(None, None)) -> list[Run]:
    return [run("standard", std or records(), windows=windows[0], **(std_meta or {})),
            run("bio", bio or records(latency=lambda i: 1.0), windows=windows[1], **(bio_meta or {}))]


def claim(summary: dict, name: str) -> dict:
    return next(c for c in summary["claims"] if c["name"] == name)


def test_rejections_are_scored_as_wrong():
    # bio rejects 60 % and answers the rest correctly: that is a 60 pp loss, never a gain
    summary = build_summary(pair(bio=records(outcome=lambda i: "rejected" if i % 5 < 3 else "answered")), rules=RULES)
    c = summary["comparison"]
    assert c["accuracy_loss_pp"] == pytest.approx(60.0) and c["rejected_scored_wrong"] == 1200
    assert claim(summary, "accuracy_loss")["status"] == "not_held"
    assert c["rejection_rate"] == pytest.approx(0.6)


def test_paired_loss_uses_the_full_models_answer_per_row():
    full_correct = np.arange(N_ROWS) % 10 != 0  # the full model is wrong on 10 % of the rows
    bio = records(correct=lambda i: (i % N_ROWS) % 10 != 0 and (i % N_ROWS) % 25 != 1)  # + wrong on 4 more rows
    summary = build_summary([run("standard", records(), reference(full_correct)),
                             run("bio", bio, reference(full_correct))], rules=RULES)
    c = summary["comparison"]
    assert c["accuracy_paired"] and c["accuracy_loss_pp"] == pytest.approx(4.0)
    assert c["accuracy_loss_bounds95_pp"][0] <= 4.0 <= c["accuracy_loss_bounds95_pp"][1]


def test_failures_above_a_thousandth_make_the_run_invalid_with_their_reason():
    summary = build_summary(pair(bio=records(outcome=lambda i: "failed" if i < 3 else "answered")), rules=RULES)
    assert not summary["valid"]
    assert any("3 of 2000 requests failed" in r and "ConnectionRefusedError" in r for r in summary["invalid_reasons"])
    ok = build_summary(pair(bio=records(outcome=lambda i: "failed" if i < 2 else "answered")), rules=RULES)
    assert ok["valid"], ok["invalid_reasons"]


def test_closed_loop_is_unequal_offered_load_and_decides_nothing():
    closed = {"open_loop": False, "arrival_rate_rps": None, "schedule": None}
    summary = build_summary(pair(std_meta=closed, bio_meta=closed), rules=RULES)
    assert {c["status"] for c in summary["claims"]} == {"not_measurable"}
    assert "unequal offered load" in claim(summary, "latency_reduction")["reason"]


@pytest.mark.parametrize("key, value, named", [
    ("model", "reviews", "model"),
    ("provider", "CUDAExecutionProvider", "provider"),
    ("shape", "spike", "shape"),
    ("shape_params", {"base_users": 8}, "shape_params"),
    ("arrival_rate_rps", 200.0, "arrival_rate_rps"),
    ("schedule", {"digest": "other", "n_scheduled": 2000, "duration_s": 20.0, "requested_rps": 100.0, "seed": 1},
     "arrival schedule"),
])
def test_different_conditions_are_invalid_naming_the_difference(key, value, named):
    summary = build_summary(pair(bio_meta={key: value}), rules=RULES)
    assert not summary["valid"]
    assert any("different conditions" in r and named in r for r in summary["invalid_reasons"])
    assert {c["status"] for c in summary["claims"]} == {"not_measurable"}


def test_an_achieved_rate_short_of_the_requested_one_is_invalid():
    summary = build_summary(pair(bio=records(sent=lambda i: i < 1800)), rules=RULES)  # 1,800 of 2,000 sent
    assert any("achieved 90.0 requests/s of the 100.0 requested" in r for r in summary["invalid_reasons"])


def test_late_sends_are_invalid():
    summary = build_summary(pair(std=records(late=lambda i: i % 50 == 0)), rules=RULES)  # 2 % late
    assert any("on the wire late" in r for r in summary["invalid_reasons"])


def test_warmup_is_excluded_from_both_runs_over_the_same_span():
    # τ settles 5 s in (offset 5.0): before it, bio is wrong on everything
    tau = lambda i: 0.7 if i >= 500 else 1.2  # noqa: E731
    bio = records(latency=lambda i: 1.0, tau=tau, correct=lambda i: i >= 500)
    summary = build_summary(pair(bio=bio), rules=RULES)
    c = summary["comparison"]
    assert c["warmup_s"] == pytest.approx(5.0)
    assert c["warmup_excluded"] == {"standard": 500, "bio": 500}
    assert c["accuracy_loss_pp"] == pytest.approx(0.0) and c["n_standard"] == c["n_bio"] == 1500


def test_a_tau_that_never_settles_is_invalid():
    summary = build_summary(pair(bio=records(tau=lambda i: 1.2)), rules=RULES)
    assert any("never came within" in r for r in summary["invalid_reasons"])


def test_claims_are_decided_on_their_bounds_with_a_tolerance():
    loss = {"accuracy_loss_pp": 0.2, "accuracy_loss_bounds_pp": [-0.1, 0.5000000000000004], "bound_method": "exact",
            "n_rows": 540, "rows_harmed": 1.0, "rows_fixed": 0.0}
    latency, accuracy = ablation_claims(45.0, [41.99999999999999, 48.0], 30, loss)
    assert latency["status"] == accuracy["status"] == "held"
    comparison = compare(pair())
    comparison.update(accuracy_loss_pp=0.2, accuracy_loss_bounds95_pp=[-0.1, 0.5000000000000004],
                      latency_reduction_pct=45.0, latency_reduction_bounds95_pct=[41.99999999999999, 48.0])
    assert [c["status"] for c in claims(comparison)][:2] == ["held", "held"]
    # The point estimate alone decides nothing: 0.2 pp with an upper bound past 0.5 pp is inconclusive.
    comparison.update(accuracy_loss_bounds95_pp=[-0.1, 0.5001], latency_reduction_bounds95_pct=[41.9, 48.0])
    assert [c["status"] for c in claims(comparison)][:2] == ["inconclusive", "inconclusive"]
    comparison.update(accuracy_loss_pp=0.7, accuracy_loss_bounds95_pp=[0.5001, 0.9],
                      latency_reduction_pct=40.0, latency_reduction_bounds95_pct=[38.0, 41.9])
    assert [c["status"] for c in claims(comparison)][:2] == ["not_held", "not_held"]


def window(energy_j: float, source: str) -> dict:
    return {"window": "w", "duration_s": 1.0, "energy_j": energy_j, "energy_source": source, "co2_g": 1e-4,
            "co2_source": "estimated:codecarbon"}


def test_energy_from_an_estimate_is_not_measurable_and_not_gated():
    estimated = [window(10.0, "estimated:codecarbon")], [window(5.0, "estimated:codecarbon")]
    summary = build_summary(pair(windows=estimated), rules=RULES)
    energy = claim(summary, "energy_reduction")
    assert energy["status"] == "not_measurable" and not energy["gated"]
    assert "estimate" in energy["reason"] and "throughput ratio" in energy["reason"]
    assert summary["runs"]["bio"]["co2_source"] == "estimated:codecarbon"


def test_measured_energy_decides_the_claim_and_labels_stay_per_source():
    measured = [window(10.0, "measured:rapl")], [window(5.0, "measured:rapl"), window(1.0, "measured:rapl+x")]
    summary = build_summary(pair(windows=measured), rules=RULES)
    energy = claim(summary, "energy_reduction")
    assert energy["status"] == "held" and energy["gated"]
    assert "includes the load generator" in energy["reason"]  # RAPL reads the whole machine
    assert summary["runs"]["bio"]["energy_source"] == "measured:rapl+measured:rapl+x"  # not the last one seen


def test_nvml_keeps_the_load_generator_out_of_the_energy_of_the_system_under_test():
    def gpu_window(gpu_j: float, cpu_j: float) -> dict:
        return {**window(gpu_j + cpu_j, "measured:nvml+measured:rapl"),
                "sources": [{"source": "nvml", "energy_j": gpu_j}, {"source": "rapl", "energy_j": cpu_j}]}

    summary = build_summary(pair(windows=([gpu_window(10.0, 50.0)], [gpu_window(4.0, 50.0)])), rules=RULES)
    std = summary["runs"]["standard"]
    assert std["energy_source"] == "measured:nvml" and std["energy_includes_load_generator"] is False
    assert std["energy_per_request_j"] == pytest.approx(10.0 / 2000)
    assert std["machine_energy_per_request_j"] == pytest.approx(60.0 / 2000)
    assert summary["comparison"]["energy_reduction_pct"] == pytest.approx(60.0)


def test_the_verdict_line_says_what_held_and_what_valid_means():
    summary = build_summary(pair(bio=records(outcome=lambda i: "rejected" if i % 2 else "answered",
                                             latency=lambda i: 1.0)), rules=RULES,
                            ablation={"claims": [{"name": "latency_reduction", "passed": True},
                                                 {"name": "accuracy_loss", "passed": False}], "standard": {}})
    line = summary["verdict"]
    assert line.startswith("verdict: held: in-process latency_reduction, under load latency_reduction")
    assert "not held: in-process accuracy_loss, under load accuracy_loss" in line
    assert "load test VALID (VALID refers to the load test's measurement" in line


def test_cluster_bootstrap_bounds_cover_the_true_loss_about_90_percent_of_the_time_together():
    """400 seeded replications of paired data in which each row repeats 6–21 times and whether
    bio loses a row is a property of the row (as under load): the bootstrap's one-sided 95 % bounds
    must together cover the true loss in 87–93 % of them (a per-request bootstrap would cover far
    less often)."""
    rng = np.random.default_rng(12345)
    true_loss, rows, covered = 0.04, 600, 0
    for replication in range(400):
        repeats = rng.integers(6, 22, size=rows)
        full_right = rng.random(rows) < 0.95
        loses = full_right & (rng.random(rows) < true_loss / 0.95)
        wins = ~full_right & (rng.random(rows) < 0.2)  # bio right where the full model is wrong
        per_row = loses.astype(float) - wins.astype(float)
        truth = true_loss - 0.05 * 0.2  # E[loses] − E[wins]
        values = np.repeat(per_row, repeats)
        lo, hi = cluster_mean_bounds(values, np.repeat(np.arange(rows), repeats), resamples=1000, seed=replication)
        covered += lo <= truth <= hi
    # Two one-sided 95 % bounds: together a 90 % interval.
    assert 0.87 <= covered / 400 <= 0.93, covered / 400


def test_open_loop_stability_asks_whether_the_server_kept_up_not_whether_poisson_is_smooth():
    rng = np.random.default_rng(0)
    # Poisson arrivals at 40/s: per-second counts vary by ~16 %, yet the server keeps up
    gaps = rng.exponential(1 / 40, size=800)
    times = np.cumsum(gaps)
    steady = records(len(times))
    for r, t in zip(steady, times):
        r["t_intended"] = r["t_sent"] = 1000.0 + float(t)
        r["offset_s"] = float(t)
    summary = build_summary(pair(std=steady, bio=steady), rules=RULES)
    assert not any("steady state" in r or "not stable" in r for r in summary["invalid_reasons"])
    # a server falling behind: latency grows by 0.3 s per second, answers trail the arrivals
    behind = [dict(r, latency_ms=300.0 * r["offset_s"] ** 2) for r in steady]
    summary = build_summary(pair(std=behind, bio=steady), rules=RULES)
    assert any(r.startswith("standard: completed") and "a queue grows" in r for r in summary["invalid_reasons"])
