"""The live audit (targets.control.audit): its sequential test and confidence sequence are valid (planted
Bernoulli streams), it notices a planted drift in-process and through a real gateway and Locust,
the controller then falls back to the full model, and nothing alarms without drift."""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from scipy.special import betaln

from reports.records import read_records
from targets.control.audit import (AuditJob, Auditor, SequentialTest, make_auditor, point_references,
                           rate_confidence_sequence)
from targets.control.controlled import ControlledTarget
from targets.control.controller_config import build_config
from targets.errors import ConfigError
from targets.control.make_controller import make_controller
from tests.processes import run_headless_locust



def alarm_rate(streams: int, draw, delta: float, lower: float = 0.0) -> float:
    """The share of ``streams`` streams on which :class:`SequentialTest`, checked after every
    sample, ever rejects; ``draw(rng) -> (z, references)`` makes one stream."""
    rng = np.random.default_rng(0)
    alarms = 0
    for _ in range(streams):
        test = SequentialTest(delta, lower)
        z, references = draw(rng)
        for value, reference in zip(z.tolist(), references.tolist()):
            if test.update(value, reference):
                alarms += 1
                break
    return alarms / streams


def test_the_sequential_test_alarms_at_most_delta_of_the_time_at_the_null_looking_after_every_sample():
    """1,000 streams of 2,000 samples each, every sample's disagreement probability exactly its
    reference (the worst case the null allows), references changing along the stream as the path
    point does: the test alarms, checked after every sample, in at most δ of them."""
    delta, streams = 0.1, 1000

    def draw(rng):
        references = rng.choice([0.005, 0.02, 0.08], size=2000)
        return (rng.random(2000) < references).astype(float), references

    rate = alarm_rate(streams, draw, delta)
    assert rate <= delta + 3 * np.sqrt(delta * (1 - delta) / streams), rate


def test_the_sequential_test_of_a_gap_in_minus_one_to_one_holds_its_level_too():
    """The net risk's labelled test: z = harm − fix ∈ {−1, 0, 1} with mean exactly the budget."""
    delta, streams, budget = 0.1, 600, 0.005

    def draw(rng):
        u = rng.random(1500)
        z = np.where(u < 0.03 + budget, 1.0, 0.0) - np.where(u > 1 - 0.03, 1.0, 0.0)  # harms 3.5 %, fixes 3 %
        return z, np.full(1500, budget)

    rate = alarm_rate(streams, draw, delta, lower=-1.0)
    assert rate <= delta + 3 * np.sqrt(delta * (1 - delta) / streams), rate


def test_the_sequential_test_notices_a_fivefold_rate_soon_even_after_a_long_clean_run():
    """2,000 samples at the reference (2 %), then 10 %: the alarm comes within a few hundred
    samples of the shift (the adaptive bet), and never before it."""
    rng = np.random.default_rng(2)
    detected_after = []
    for _ in range(100):
        test = SequentialTest(delta=0.01 / 3)
        for n in range(1, 4001):
            rate = 0.02 if n <= 2000 else 0.10
            if test.update(float(rng.random() < rate), 0.02):
                detected_after.append(n - 2000)
                break
    assert len(detected_after) == 100 and min(detected_after) > 0, detected_after
    assert np.median(detected_after) < 200 and max(detected_after) < 600, sorted(detected_after)


def test_the_confidence_sequence_covers_the_rate_at_every_sample_size_at_once():
    """The beta-binomial mixture martingale at the true p stays below 1/δ in at least 1 − δ of the
    streams (then p is inside the sequence at every n), and the bounds bracket the estimate."""
    rng = np.random.default_rng(3)
    streams, length, delta, p = 3000, 1500, 0.05, 0.07
    successes = np.cumsum(rng.random((streams, length)) < p, axis=1)
    n = np.arange(1, length + 1)[None, :]
    log_m = betaln(0.5 + successes, 0.5 + n - successes) - betaln(0.5, 0.5) - successes * np.log(p) \
        - (n - successes) * np.log1p(-p)
    missed = (log_m >= np.log(1 / delta)).any(axis=1).mean()
    assert missed <= delta, missed
    low, high = rate_confidence_sequence(7, 100, delta)
    assert 0 < low < 0.07 < high < 1 and rate_confidence_sequence(0, 0, delta) == (0.0, 1.0)
    assert rate_confidence_sequence(0, 50, delta)[0] == 0.0 and rate_confidence_sequence(50, 50, delta)[1] == 1.0
    # Membership agrees with the martingale at the bounds.
    inside = rate_confidence_sequence(30, 400, delta)
    for q in inside:
        value = betaln(30.5, 370.5) - betaln(0.5, 0.5) - 30 * np.log(q) - 370 * np.log1p(-q)
        assert value == pytest.approx(np.log(1 / delta), abs=1e-6)


def test_references_are_upper_bounds_of_the_validation_rate():
    refs = point_references([0, 2, 10], 500, 0.01 / 3)
    assert refs[0] > 0 and refs[0] < refs[1] < refs[2] and refs[2] > 10 / 500


def budget_controller(spec, backend, **overrides):
    config = build_config(spec.controller_hints, overrides={"policy": "budget", "k_per_s": 1e6, "gamma": 0.0,
                                                           "beta": 0.0, **overrides})
    return make_controller(config, spec, backend)


def noisy(x: np.ndarray, scale: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (x + rng.standard_normal(x.shape) * scale * (x.std(axis=0, keepdims=True) + 1e-6)).astype(x.dtype)


def test_the_audit_voids_the_certificate_on_planted_drift_and_the_controller_falls_back(digits_spec, digits_backend,
                                                                                       digits_eval):
    """Held-out rows (drawn like validation) three times over: no alarm. Then the same rows with
    noise: the audit voids the certificate within a bounded number of audited rows, the state
    says why and when, and every request from then on runs the full model."""
    controller = budget_controller(digits_spec, digits_backend, audit_rate=1.0, audit_idle_rate=1.0)
    auditor = make_auditor(digits_backend, controller)
    try:
        target = ControlledTarget(digits_backend, controller, auditor=auditor)
        x, y = digits_eval
        for _ in range(3):
            for i in range(len(x)):
                target.predict(x[i : i + 1], [int(y[i])])
                if i % 50 == 0:
                    auditor.drain()
        auditor.drain()
        clean = auditor.state()
        assert clean["state"] == "held" and clean["audited"] > 1000 and clean["void_reason"] is None
        assert clean["disagreement_high"] >= clean["disagreement"] >= clean["disagreement_low"]
        assert clean["labelled"]["rows"] == clean["audited"]
        before = clean["audited"]
        shifted = noisy(x, 1.0)
        for i in range(len(x)):
            target.predict(shifted[i : i + 1], [int(y[i])])
            auditor.drain()
            if controller.budget.void_reason:
                break
        state = controller.state()
        audit = state["audit"]
        assert audit["state"] == "void" and state["budget"]["certificate_state"] == "void"
        assert "no longer look like the calibration data" in audit["void_reason"]
        assert audit["void_after_audited"] - before <= 150, audit  # the stated detection bound (README)
        assert audit["disagreement_low"] > 0
        outcomes = [target.predict(shifted[i : i + 1])[0] for i in range(50)]
        assert all(o.stage == digits_spec.n_stages for o in outcomes)  # the full model, for every request
        assert all(d == 0.0 for d in controller.budget.state()["thresholds"])
    finally:
        auditor.stop()


def test_the_audit_runs_only_the_stages_a_row_skipped(digits_spec, digits_backend, digits_eval):
    """A job from exit 1 runs stages 2..4 on the hidden state; the answer is the full model's."""
    controller = budget_controller(digits_spec, digits_backend, audit_rate=0.0, audit_idle_rate=0.0)
    auditor = Auditor(digits_backend, controller, (0.5,) * (controller.budget.ceiling_index + 1))
    x = digits_backend.check(digits_eval[0][:1])
    _, hidden = digits_backend.stage(0, x)
    full = int(digits_backend.full_probabilities(x)[0].argmax())
    calls = []
    stage = digits_backend.stage

    class Counting:
        n_stages = digits_backend.n_stages

        def stage(self, index, h):
            calls.append(index)
            return stage(index, h)

    auditor.backend = Counting()
    assert auditor._full_class(AuditJob(1, hidden, (full + 1) % 10, 0)) == full
    assert calls == [1, 2, 3]
    auditor.record(AuditJob(1, hidden, (full + 1) % 10, 0), full)
    assert auditor.state()["disagreed"] == 1


def test_audit_settings_are_checked_at_the_edge():
    with pytest.raises(ConfigError, match="audit_rate and audit_idle_rate"):
        build_config({}, overrides={"audit_rate": 0.5, "audit_idle_rate": 0.1})
    with pytest.raises(ConfigError, match="audit_risk"):
        build_config({}, overrides={"audit_risk": 0.0})


def test_no_auditor_without_a_certificate(digits_spec, digits_backend):
    config = build_config(digits_spec.controller_hints, overrides={"policy": "paper", "tau_inf": 0.5})
    assert make_auditor(digits_backend, make_controller(config, digits_spec, digits_backend)) is None


def test_planted_drift_through_a_gateway_and_locust_voids_the_certificate_and_the_report_says_when(tmp_path):
    """Standard and bio under Locust, one seeded open-loop schedule (40 requests/s, 16 s), noise
    planted from 5 s on; the bio gateway audits half its requests (all when idle). The
    certificate held before the drift, is void after it, every request after the void ran the
    full model, and the report's verdict says the guarantee broke and when."""
    toml = tmp_path / "controller.toml"
    toml.write_text('[controller]\npolicy = "budget"\naccuracy_budget_pp = 0.5\nk_per_s = 50.0\n'
                    'audit_rate = 0.5\naudit_idle_rate = 1.0\n')
    drift_at_s = 5.0
    for scenario in ("standard", "bio"):
        run_headless_locust(scenario, "-t", "16", "--arrival-rate", "40", "--seed", "3", "--energy", "off",
                            "--controller-config", str(toml), "--drift-at-s", str(drift_at_s), "--drift-noise", "1.0",
                            "--results", str(tmp_path / "runs" / scenario), cwd=tmp_path, timeout_s=240)
    records = [r for r in read_records(tmp_path / "runs" / "bio" / "requests.jsonl") if r["outcome"] == "answered"]
    assert all(r["certificate"] == "held" for r in records if not r["drifted"])
    void = [r for r in records if r["certificate"] == "void"]
    assert void, "the audit never voided the certificate"
    void_at = min(r["offset_s"] for r in void)
    assert void_at >= drift_at_s
    assert all(r["stage"] == 4 for r in records if r["offset_s"] > void_at + 0.5)  # the full model from then on
    first_drifted = min((r for r in records if r["drifted"]), key=lambda r: r["offset_s"])
    run = json.loads((tmp_path / "runs" / "bio" / "run.json").read_text())
    audit = run["controller_state_at_end"]["audit"]
    assert audit["void_after_audited"] - first_drifted["audited"] <= 150, audit
    from green_mlops.cli import main

    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--min-duration-s", "3",
                 "--min-requests", "100"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    row = next(p for p in summary["policies"] if p["run"] == "bio")
    assert row["certificate_state"] == "void" and row["certificate_void_at_s"] == pytest.approx(void_at)
    assert f"guarantee BROKEN: the live audit voided the certificate at t = {void_at:.1f} s" in summary["verdict"]


def test_the_gateway_reports_the_audit_in_its_state_metrics_and_answers(start_gateway, digits_eval):
    gateway = start_gateway("--controller", "bio", "--policy", "budget", "--audit-rate", "1", "--audit-idle-rate", "1")
    x, y = digits_eval
    from tests.test_gateway import infer_body

    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        for i in range(40):
            answer = client.post("/v2/models/digits/infer", json=infer_body(x[i : i + 1]),
                                 headers={"X-Green-MLOps-Label": str(int(y[i]))}).json()
            assert answer["parameters"]["certificate"] == "held"
        deadline = time.monotonic() + 30
        while (audit := client.get("/v2/controller").json()["audit"])["audited"] < 40:
            assert time.monotonic() < deadline, audit
            time.sleep(0.05)
        metrics = client.get("/metrics").text
        page = client.get("/dashboard/state").json()
    assert audit["state"] == "held" and audit["labelled"]["rows"] == 40
    assert "green_mlops_audit_audited 40.0" in metrics and "green_mlops_certificate_void 0.0" in metrics
    assert "green_mlops_audit_disagreement_high" in metrics
    names = [line["name"] for line in page["verdict"]]
    assert "certificate (live audit)" in names and "accuracy loss vs full model, same rows (audited, labelled)" in names


def test_exit_depth_on_the_dashboard_and_in_metrics_equals_the_gateways_stage_counts(start_gateway, digits_eval):
    """A 4-stage ladder under the paper policy (rows leave at every depth): the dashboard's and
    Prometheus' rows by depth are the answers' own `stage` counts, batches included."""
    from collections import Counter

    from tests.test_gateway import infer_body

    gateway = start_gateway("--controller", "bio", "--policy", "paper", "--tau-inf", "0.6", "--k", "50")
    x = digits_eval[0]
    stages: Counter = Counter()
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        time.sleep(0.2)
        for i in range(0, 120, 3):
            batch = x[i : i + (1 if i % 2 else 3)]
            parameters = client.post("/v2/models/digits/infer", json=infer_body(batch)).json()["parameters"]
            stages.update(int(s) for s in str(parameters["stage"]).split(","))
        totals = client.get("/dashboard/state").json()["totals"]["exit_depth_counts"]
        metrics = client.get("/metrics").text
    assert len(stages) > 1, stages  # more than one depth, or the test shows nothing
    assert {int(k): v for k, v in totals.items()} == dict(stages)
    for depth, count in stages.items():
        assert f'green_mlops_exit_depth_rows_total{{depth="{depth}"}} {float(count)}' in metrics


def test_a_stage_from_another_build_is_one_line_and_exit_2(tmp_path, digits_spec, capsys):
    """digits with stage 2's weights from another training run (perturbed): chained stages no
    longer equal full.onnx; validate and serve say so in one line and exit 2 before any work."""
    import shutil

    onnx = pytest.importorskip("onnx", reason="editing a graph needs the 'models' extra (onnx)")
    from onnx import numpy_helper

    from green_mlops.cli import main

    model = tmp_path / "digits"
    shutil.copytree(digits_spec.directory, model)
    graph = onnx.load(model / "stage2.onnx")
    rng = np.random.default_rng(0)
    for initializer in graph.graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if weights.dtype == np.float32 and weights.size > 16:
            initializer.CopyFrom(numpy_helper.from_array(
                (weights + rng.standard_normal(weights.shape).astype(np.float32) * weights.std()), initializer.name))
    onnx.save(graph, model / "stage2.onnx")
    for command in (["validate", "--model", str(model), "--no-load", "--requests", "50"],
                    ["serve", "--model", str(model), "--port", "0", "--energy", "off"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "do not reproduce full.onnx" in err and "Traceback" not in err, err
