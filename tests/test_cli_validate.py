"""`green-mlops validate` end to end, and the CLI's answers to bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from green_mlops.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "green_mlops.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_validate(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate") / "v.json"
    assert main(["validate", "--requests", "400", "--warmup", "50", "--k", "50", "--no-load",
                 "--results", str(out.parent / "results"), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_validate_json_has_the_documented_keys(quick_validate):
    v = quick_validate
    for key in ("latency_reduction_pct", "accuracy_loss_pp", "accuracy_loss_bounds95_pp", "admission_rate",
                "oracle_skip_rate", "standard", "bio", "claims", "provider"):
        assert key in v
    for mode in ("standard", "bio"):
        assert set(v[mode]) >= {"mean_latency_ms", "p50_ms", "p95_ms", "p99_ms", "throughput_rps",
                                "accuracy", "n_requests"}
        assert v[mode]["n_requests"] == 400
        assert v[mode]["p50_ms"] <= v[mode]["p95_ms"] <= v[mode]["p99_ms"]
    lo, hi = v["accuracy_loss_bounds95_pp"]
    assert lo < v["accuracy_loss_pp"] < hi  # never a zero-width interval, even with no harm seen
    assert [c["name"] for c in v["claims"]] == ["latency_reduction", "accuracy_loss"]
    assert all(set(c) >= {"name", "target", "measured", "bounds95", "status"} for c in v["claims"])
    assert all(c["status"] in ("held", "not_held", "inconclusive") for c in v["claims"])
    assert v["provider"] == "CPUExecutionProvider"
    for mode in ("standard", "bio"):
        assert set(v[mode]) >= {"energy_per_request_j", "energy_source", "co2_g_per_1k_requests"}
    assert "energy_reduction_pct" in v


def test_validate_figures_are_consistent(quick_validate):
    v = quick_validate
    assert 0.0 <= v["admission_rate"] <= 1.0 and 0.0 <= v["oracle_skip_rate"] <= 1.0
    assert v["bio"]["admission_rate"] == v["admission_rate"]
    assert sum(v["bio"]["actions"].values()) == 400
    assert v["bio"]["actions"].get("full", 0) == round(400 * v["admission_rate"])
    expected = 100 * (1 - v["bio"]["mean_latency_ms"] / v["standard"]["mean_latency_ms"])
    assert v["latency_reduction_pct"] == pytest.approx(expected)
    expected_loss = 100 * (v["standard"]["accuracy"] - v["bio"]["accuracy"])
    assert v["accuracy_loss_pp"] == pytest.approx(expected_loss)
    assert v["warmup"]["tau_settled"]


def test_gate_fails_when_a_claim_is_not_held_or_undecided(tmp_path):
    from tests.model_factory import make_model_dir

    out = tmp_path / "v.json"
    # The paper's policy at τ = 0 skips every request: the tiny model's exit head, a random linear
    # map, disagrees with the full model on far more than 0.5 pp of the rows (planted, not measured
    # on a held-out set whose figures move with the split).
    model = make_model_dir(tmp_path / "tiny", ladder=True, widths=(3,), n_eval=200)
    code = main(["validate", "--model", str(model), "--requests", "300", "--warmup", "20", "--tau0", "0",
                 "--tau-inf", "0", "--policy", "paper", "--no-load", "--energy", "off", "--results",
                 str(tmp_path / "results"), "--gate", "--json", str(out)])
    v = json.loads(out.read_text())
    assert v["admission_rate"] == 0.0
    accuracy_claim = next(c for c in v["claims"] if c["name"] == "accuracy_loss")
    # Tens of pp lost: not held, or (should the bounds straddle 0.5 pp) undecided, which fails the
    # gate as a claim not held does.
    assert code == 1 and accuracy_claim["status"] in ("not_held", "inconclusive")
    assert accuracy_claim["measured"] > 0.5 and accuracy_claim["bounds95"][1] > 0.5
    if accuracy_claim["status"] == "inconclusive":
        assert accuracy_claim["rows_to_decide"] > accuracy_claim["n_rows"]


def test_sweep_measures_a_curve(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["validate", "--requests", "200", "--warmup", "20", "--k", "50", "--sweep", "--no-load",
                 "--energy", "off", "--sweep-points", "3", "--results", str(tmp_path), "--json", str(out)]) == 0
    sweep = json.loads(out.read_text())["sweep"]
    assert 1 <= len(sweep) <= 3
    rates = [p["admission_rate"] for p in sorted(sweep, key=lambda p: p["tau_inf"])]
    assert rates == sorted(rates)  # a higher threshold admits at least as much
    assert "sweep" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["validate", "--model", "/nonexistent/model"], "no model"),
        (["validate", "--requests", "0"], "must be >= 1"),
        (["validate", "--tau-inf", "abc"], "invalid float value"),
        (["validate", "--uncertainty", "vibes"], "invalid choice"),
        (["validate", "--repeats", "0"], "must be >= 1"),
        (["validate", "--repeats", "3", "--load-arrival-rate", "0"], "needs open loop"),
        (["validate", "--load-arrival-rate", "-5"], "must be 'auto', 0 (closed loop) or requests per second > 0"),
        (["validate", "--load-arrival-rate", "fast"], "must be 'auto'"),
        (["validate", "--load-arrival-rate", "nan"], "must be 'auto'"),
        (["validate", "--load-s", "0"], "must be >= 1"),
        (["validate", "--load-phase-s", "0"], "must be a finite number > 0"),
    ],
)
def test_bad_input_gives_a_message_not_a_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_malformed_toml_gives_a_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[controller\nalpha=")
    result = run_cli("validate", "--config", str(bad))
    assert result.returncode == 2
    assert "not valid TOML" in result.stderr and "Traceback" not in result.stderr


def test_incomplete_model_dir_gives_a_message(tmp_path):
    (tmp_path / "model.json").write_text("{}")
    result = run_cli("validate", "--model", str(tmp_path))
    assert result.returncode == 2
    assert "missing key 'full'" in result.stderr and "Traceback" not in result.stderr


def test_unwritable_json_path_gives_a_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli("validate", "--requests", "50", "--warmup", "5", "--k", "100", "--no-load",
                     "--energy", "off", "--results", str(tmp_path / "r"), "--json", str(blocker / "v.json"))
    assert result.returncode == 2
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr


def test_validate_runs_the_load_test_and_the_report(tmp_path, capsys):
    code = main(["validate", "--requests", "200", "--warmup", "20", "--k", "50", "--load-s", "4",
                 "--load-phase-s", "1", "--load-users", "2", "--repeats", "2", "--results", str(tmp_path), "--gate"])
    v = json.loads((tmp_path / "validate.json").read_text())
    load = v["load_test"]
    assert [c["name"] for c in load["claims"]] == ["latency_reduction", "accuracy_loss", "energy_reduction"]
    assert load["comparison"]["n_standard"] > 0 and load["comparison"]["n_bio"] > 0
    assert load["comparison"]["open_loop"] and load["comparison"]["condition_differences"] == []
    assert not load["valid"]  # 4 s runs are below the 10 s minimum: the report says so
    assert any("below the minimum" in r for r in load["invalid_reasons"])
    # The rate was sized to this machine (the default, auto) before any run, and every schedule uses it;
    # the lengths were given, so they are not stretched.
    offered = load["offered_load"]
    assert offered == json.loads((tmp_path / "offered_load.json").read_text())
    assert offered["source"] == "auto" and offered["target"].startswith("gateway --controller off")
    assert offered["probe"]["requests"] == 200 and offered["probe"]["mean_ms"] > 0
    assert 0 < offered["arrival_rate_rps"] <= 40 and offered["duration_stretch"] == 1.0
    assert offered["peak_factor"] == 4.0 and (offered["capped"] or offered["peak_utilisation"] <= 0.5)
    assert (tmp_path / "offered-load-probe.log").exists()
    assert "Offered load sized to this machine" in (tmp_path / "report.md").read_text()
    assert code == 1  # so the gate fails
    for name in ("report.html", "report.md", "summary.json", "controller.toml", "schedule.json",
                 "ablation/ablation.json"):
        assert (tmp_path / name).exists()
    # Two replicates, each its own schedule (seeds 0 and 1) replayed by both modes, bio first in the second.
    for suffix, seed in (("", 0), ("-r2", 1)):
        schedule = json.loads((tmp_path / f"schedule{suffix}.json").read_text())
        assert schedule["seed"] == seed
        assert schedule["rate_rps"] == offered["arrival_rate_rps"]
        for scenario in ("standard", "bio"):
            run = json.loads((tmp_path / f"{scenario}{suffix}" / "run.json").read_text())
            assert run["scenario"] == scenario and run["shape"] == "spike" and run["finished"]
            assert run["schedule"]["digest"] == schedule["digest"]  # one schedule, replayed by both
    started = {name: json.loads((tmp_path / name / "run.json").read_text())["started_at"]
               for name in ("standard", "bio", "standard-r2", "bio-r2")}
    assert sorted(started, key=started.get) == ["standard", "bio", "bio-r2", "standard-r2"]  # counterbalanced
    comparison = load["comparison"]
    assert comparison["n_replicates"] == 2 and comparison["run_to_run_included"]
    assert [r["bio_run"] for r in comparison["replicates"]] == ["bio", "bio-r2"]
    assert "load stage 2 replicates" in load["verdict"]
    assert "tau_inf" in (tmp_path / "controller.toml").read_text()
    # one verdict, in one place: the report covers the ablation too, and the console ends with it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ablation_claims"] and summary["verdict"] == load["verdict"]
    assert "in-process" in summary["verdict"] and "load test INVALID" in summary["verdict"]
    out = capsys.readouterr().out
    assert "verdict: " in out and "paired-bootstrap" not in out and "cluster bootstrap" in out
    assert "one-sided 95 % bounds" in out


def test_gate_help_names_the_invalid_report():
    result = run_cli("validate", "--help")
    assert "or the report is INVALID" in " ".join(result.stdout.split())


def test_ctrl_c_in_the_load_stage_keeps_the_ablation_and_what_was_recorded(tmp_path):
    import os
    import signal
    import time

    from tests.processes import kill_session, signal_masks

    results = tmp_path / "r"
    process = subprocess.Popen([sys.executable, "-m", "green_mlops.cli", "validate", "--requests", "200",
                                "--warmup", "20", "--k", "50", "--load-s", "30", "--energy", "off",
                                "--results", str(results)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        records = results / "standard" / "requests.jsonl"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (not records.exists() or records.stat().st_size < 20_000):
            time.sleep(0.1)
        assert records.exists(), "the load stage did not start"
        masks = signal_masks(process.pid)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole group
        _, stderr = process.communicate(timeout=90)
        assert process.returncode == 130, f"signal masks at the Ctrl-C: {masks}\n{stderr[-2000:]}"
        assert "Traceback" not in stderr
    finally:
        kill_session(process)
    v = json.loads((results / "validate.json").read_text())
    assert v["claims"] and v["standard"]["n_requests"] == 200  # the finished ablation
    assert v["load_test"]["interrupted"]
    assert (results / "ablation" / "ablation.json").exists()
    run = json.loads((results / "standard" / "run.json").read_text())
    assert run["finished"] and run["n_records"] == len((results / "standard" / "requests.jsonl").read_text().splitlines())
    assert (results / "summary.json").exists()  # the partial report
    with pytest.raises(ProcessLookupError):  # nothing left behind
        os.killpg(process.pid, 0)
