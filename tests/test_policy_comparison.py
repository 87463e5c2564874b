"""The report's side-by-side of policies under one schedule: planted runs whose accuracy spent,
shedding and p95 are known, recovered per policy, with the budget and SLO verdicts they imply."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reports.render import POLICY_HEADER, _md_table, _policy_rows
from reports.runs import Run
from reports.verdict import build_summary, verdict_line

N_ROWS = 200


def records(rng, *, action_of, latency_ms: float, wrong_rows: set[int]):
    rows = rng.integers(0, N_ROWS, 1000)
    out = []
    for seq, row in enumerate(rows):
        action = action_of(seq)
        shed = action == "shed"
        out.append({"seq": seq, "row": int(row), "label": 1, "t_intended": 1000 + seq * 0.01, "t_sent": 1000 + seq * 0.01,
                    "offset_s": seq * 0.01, "phase": 0, "source": "local", "status": 503 if shed else 200,
                    "outcome": "rejected" if shed else "answered", "reason": None, "admitted": action == "full",
                    "action": action, "correct": (not shed) and int(row) not in wrong_rows,
                    "predicted": None if shed else (0 if int(row) in wrong_rows else 1),
                    "tau": None, "u": None, "latency_ms": None if shed else latency_ms, "service_ms": latency_ms,
                    "late": False})
    return out


def run(name, scenario, recs, state=None):
    reference = {"label": [1] * N_ROWS, "full_predicted": [1] * N_ROWS, "exit_predicted": [1] * N_ROWS,
                 "exit_u": [0.0] * N_ROWS}
    return Run(name, Path(name), {"scenario": scenario, "open_loop": True, "controller_state_at_end": state},
               recs, reference=reference)


def budget_state(slo_p95_ms=None):
    return {"policy": "budget", "budget": {"certificate": {"budget_pp": 0.5, "certified": True,
                                                           "smallest_certifiable_budget_pp": 0.46},
                                           "slo": {"slo_p95_ms": slo_p95_ms} if slo_p95_ms else None}}


def test_each_policy_is_compared_with_standard_and_judged_against_its_own_promises():
    rng = np.random.default_rng(0)
    standard = run("standard", "standard", records(rng, action_of=lambda s: "full", latency_ms=10.0, wrong_rows=set()))
    # paper: exits everything and gets 4 of 200 rows wrong (2 pp); budget: 1 wrong row (0.5 pp)
    # and sheds every 5th request under an SLO of 2 ms it cannot meet (p95 3 ms): the shed requests
    # count as lost accuracy in "budget held" (refusals inside the promise).
    paper = run("bio-paper", "bio", records(rng, action_of=lambda s: "exit", latency_ms=2.0, wrong_rows={0, 1, 2, 3}),
                {"policy": "paper"})
    budget = run("bio", "bio", records(rng, action_of=lambda s: "shed" if s % 5 == 0 else "exit", latency_ms=3.0,
                                       wrong_rows={7}), budget_state(slo_p95_ms=2.0))
    summary = build_summary([standard, budget, paper])
    assert summary["comparison"]["bio_run"] == "bio"  # the claims rest on the run named bio
    by_policy = {row["policy"]: row for row in summary["policies"]}
    assert by_policy["paper"]["accuracy_spent_pp"] == pytest.approx(2.0, abs=0.6)
    assert by_policy["paper"]["budget_status"] is None and by_policy["paper"]["shed"] == 0
    row = by_policy["budget"]
    assert row["shed"] == 200 and row["shed_rate"] == pytest.approx(0.2)
    assert row["accuracy_spent_answered_pp"] == pytest.approx(0.5, abs=0.3)  # on answers alone
    assert row["accuracy_spent_pp"] == pytest.approx(row["accuracy_loss_pp"]) and row["accuracy_spent_pp"] > 15
    assert row["refused_scored_wrong"] == 200
    lo, hi = row["accuracy_spent_bounds95_pp"]
    assert lo > 0.5 and row["budget_status"] == "not_held"  # 200 shed of 1,000: far past the budget
    assert row["p95_ms"] == pytest.approx(3.0) and row["held_slo"] is False
    line = verdict_line(summary)
    assert "bio (budget): budget not held (spent" in line and "200 shed or rejected, counted as lost" in line
    assert "SLO not held (p95 3.0 > 2 ms, 20.0 % shed)" in line and "bio-paper (paper)" not in line
    table = _md_table(POLICY_HEADER, _policy_rows(summary))
    assert "| bio-paper | paper |" in table and "| bio | budget |" in table and "(NO)" in table


def test_the_verdict_says_when_the_slo_was_out_of_reach_of_shedding():
    rng = np.random.default_rng(3)
    standard = run("standard", "standard", records(rng, action_of=lambda s: "full", latency_ms=10.0, wrong_rows=set()))
    state = budget_state(slo_p95_ms=1.0)
    state["budget"]["slo"].update(unreachable=40, violations=50, service_p95_ms=2.5)
    bio = run("bio", "bio", records(rng, action_of=lambda s: "exit", latency_ms=3.0, wrong_rows=set()), state)
    line = verdict_line(build_summary([standard, bio]))
    # No harm seen on 197 rows: the upper bound, 1 − 0.025^(1/197) = 1.86 pp, still reaches past the budget.
    assert "bio (budget): budget inconclusive (spent 0.00 pp, one-sided 95 % bounds -1.86 … 1.86, against 0.5 pp)" in line
    assert ("SLO not held (p95 3.0 > 1 ms, out of reach of "
            "shedding: the gateway's service time alone (p95 2.50 ms at the end) broke it in 40 of 50 violated "
            "periods)") in line


def test_a_single_paper_run_adds_no_policy_table():
    rng = np.random.default_rng(1)
    standard = run("standard", "standard", records(rng, action_of=lambda s: "full", latency_ms=10.0, wrong_rows=set()))
    bio = run("bio", "bio", records(rng, action_of=lambda s: "exit", latency_ms=2.0, wrong_rows=set()), {"policy": "paper"})
    assert "policies" not in build_summary([standard, bio])


def test_slo_series_over_time_recover_the_planted_shedding_and_p95():
    """Planted: 100 requests a second for 10 s; from second 5 every 4th is shed and answered latency
    is 8 ms (2 ms before); the loop's state is stamped on every record. Recovered per second."""
    from reports.slo_plot import per_second, slo_over_time

    rng = np.random.default_rng(2)
    recs = records(rng, action_of=lambda s: "shed" if s >= 500 and s % 4 == 0 else "exit", latency_ms=2.0,
                   wrong_rows=set())
    for r in recs:
        late = r["seq"] >= 500
        if r["latency_ms"] is not None:
            r["latency_ms"] = 8.0 if late else 2.0
        r.update(slo_p95_ms=5.0, slo_seen_p95_ms=8.0 if late else 2.0, slo_threshold=1.0 if late else 0.5,
                 shed_probability=0.25 if late else 0.0, threshold=0.2, path_index=40 if late else 20)
    bio = run("bio", "bio", recs, budget_state(slo_p95_ms=5.0) | {"budget": {**budget_state(5.0)["budget"],
                                                                             "ceiling_index": 40}})
    series = per_second(bio)
    assert list(series["second"]) == list(range(10))
    assert series["p95_ms"][:5] == pytest.approx([2.0] * 5) and series["p95_ms"][5:] == pytest.approx([8.0] * 5)
    assert series["shed_rate"][:5] == pytest.approx([0.0] * 5) and series["shed_rate"][5:] == pytest.approx([0.25] * 5)
    assert series["shed_probability"][5:] == pytest.approx([0.25] * 5)
    assert series["level"] == pytest.approx([0.5] * 5 + [1.0] * 5)  # the path index over the ceiling's
    png = slo_over_time([bio])
    assert png is not None and png.startswith(b"\x89PNG")
    paper = run("bio", "bio", records(rng, action_of=lambda s: "exit", latency_ms=2.0, wrong_rows=set()), {"policy": "paper"})
    assert slo_over_time([paper]) is None  # nothing to show without the budget policy
