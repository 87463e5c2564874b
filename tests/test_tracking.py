"""MLflow tracking: `validate --mlflow` and `report --mlflow` against the real package and a local
store, read back with MlflowClient."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reports.tracking import flatten, log_run, per_second, resolve_uri, validate_documents
from targets.errors import GreenMLOpsError

ROOT = Path(__file__).resolve().parent.parent
mlflow = pytest.importorskip("mlflow", reason="the optional extra green-mlops[mlflow] is not installed")


def client_for(uri: str):
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=resolve_uri(uri))


def only_run(uri: str, experiment: str = "green-mlops"):
    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} in {uri}"
    (run,) = client.search_runs([found.experiment_id])
    return client, run


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    paths = set()
    for item in client.list_artifacts(run_id, path):
        paths |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def test_flatten_names_energy_by_its_kind_and_keeps_every_claim_and_phase():
    document = {
        "model": "digits",
        "latency_reduction_bounds95_pct": [40.0, 44.0],
        "claims": [{"name": "latency_reduction", "measured": 42.5, "passed": True, "status": "held"},
                   {"name": "accuracy_loss", "measured": 0.7, "passed": False, "status": "not_held"}],
        "controller": {"alpha": 1.0, "skip_action": "exit"},
        "runs": {"bio": {"energy_per_request_j": 0.03, "energy_source": "estimated:codecarbon",
                         "co2_g_per_1k_requests": 0.004, "co2_source": "estimated:codecarbon",
                         "phases": [{"phase": "spike", "p95_ms": 12.5, "energy_j": 1.0}],
                         "conditions": {"shape": "spike", "versions": {"python": "3.11"}}},
                 "standard": {"energy_per_request_j": 0.2, "energy_source": "measured:rapl+measured:nvml"}},
        "comparison": {"energy_reduction_pct": 80.0, "energy_source": "none"},
        "invalid_reasons": ["bio: too short"],
    }
    metrics, params, tags = flatten(document, "load")
    assert metrics["load.latency_reduction_bounds95_pct.low"] == 40.0 and metrics["load.latency_reduction_bounds95_pct.high"] == 44.0
    assert metrics["load.claims.latency_reduction.measured"] == 42.5
    assert metrics["load.claims.latency_reduction.held"] == 1.0 and metrics["load.claims.accuracy_loss.held"] == 0.0
    assert metrics["load.claims.accuracy_loss.passed"] == 0.0
    assert metrics["load.runs.bio.energy_per_request_j.estimated"] == 0.03  # never a bare energy figure
    assert metrics["load.runs.bio.co2_g_per_1k_requests.estimated"] == 0.004
    assert metrics["load.runs.standard.energy_per_request_j.measured"] == 0.2
    assert metrics["load.runs.bio.phases.spike.p95_ms"] == 12.5
    assert "load.comparison.energy_reduction_pct" in metrics  # no source: no kind claimed
    assert not any(k.endswith("energy_per_request_j") for k in metrics)
    assert tags["load.runs.bio.energy_source"] == "estimated:codecarbon"
    assert tags["load.claims.accuracy_loss.status"] == "not_held" and tags["load.invalid_reasons"] == "bio: too short"
    assert params["load.controller.alpha"] == "1.0" and params["load.controller.skip_action"] == "exit"
    assert params["load.runs.bio.conditions.versions.python"] == "3.11" and params["load.model"] == "digits"


def test_per_second_histories_recover_planted_seconds():
    records = []
    for second, (n, rejected) in enumerate([(10, 0), (20, 5), (0, 0), (4, 4)]):
        for i in range(n):
            records.append({"t_intended": 1000.0 + second + i / (n + 1), "status": 503 if i < rejected else 200,
                            "latency_ms": float(i + 1), "admitted": i % 2 == 0 and i >= rejected,
                            "correct": i >= rejected})
    series = per_second(records)
    assert [(step, value) for step, _, value in series["requests_per_s"]] == [(0, 10), (1, 20), (3, 4)]
    assert [value for _, _, value in series["rejected_rate"]] == [0.0, 0.25, 1.0]
    assert series["p95_ms"][0][2] == 10.0 and series["p50_ms"][0][2] == 5.0  # nearest rank over 1..10 ms
    assert series["accuracy"][1][2] == 15 / 20
    assert series["requests_per_s"][2][1] == 1003.0  # the second's unix time
    assert per_second([]) == {}


def test_validate_documents_take_the_load_settings():
    params, metrics, tags = validate_documents({"model": "digits", "provider": "cpu", "admission_rate": 0.1}, None,
                                               {"shape": "spike", "users": 4, "arrival_rate_rps": None})
    assert params["load.shape"] == "spike" and "load.arrival_rate_rps" not in params
    assert metrics == {"ablation.admission_rate": 0.1} and tags["green_mlops.command"] == "validate"


def test_a_store_that_cannot_be_used_gives_a_message(tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with pytest.raises(GreenMLOpsError, match="MLflow logging"):
        log_run(str(blocked / "mlruns"), "x", "r", {}, {"m": 1.0}, {}, {})


def test_missing_mlflow_fails_before_any_work(tmp_path):
    script = ("import sys; sys.modules['mlflow'] = None\n"
              "from green_mlops.cli import main\n"
              f"sys.exit(main(['validate', '--no-load', '--results', {str(tmp_path / 'r')!r}, '--mlflow']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "pip install 'green-mlops[mlflow]'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "r").exists()


def test_validate_then_report_logged_to_mlflow_and_read_back(tmp_path):
    results, store = tmp_path / "results", tmp_path / "mlruns"
    done = subprocess.run(
        [sys.executable, "-m", "green_mlops.cli", "validate", "--requests", "300", "--warmup", "30",
         "--load-s", "6", "--load-phase-s", "2", "--load-users", "2", "--repeats", "1", "--results", str(results),
         "--mlflow", str(store)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dashboard http://127.0.0.1:" in done.stdout  # each gateway validate starts, with its page
    assert "MLflow: run " in done.stdout
    client, run = only_run(str(store))
    validate_doc = json.loads((results / "validate.json").read_text())
    summary = json.loads((results / "summary.json").read_text())
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    # params: controller, model, load
    assert params["model"] == "digits" and params["load.shape"] == "spike" and params["load.run_time_s"] == "6"
    assert float(params["ablation.controller.tau_inf"]) == pytest.approx(validate_doc["controller"]["tau_inf"])
    # every claim figure, in-process and under load
    for claim in validate_doc["claims"]:
        assert metrics[f"ablation.claims.{claim['name']}.measured"] == pytest.approx(claim["measured"])
    for claim in summary["claims"]:
        assert metrics[f"load.claims.{claim['name']}.measured"] == pytest.approx(claim["measured"])
        assert tags[f"load.claims.{claim['name']}.status"] == claim["status"]
    # per-phase latency of each load run
    for name, figures in summary["runs"].items():
        for phase in figures["phases"]:
            assert metrics[f"load.runs.{name}.phases.{phase['phase']}.p95_ms"] == pytest.approx(phase["p95_ms"])
    # energy and CO2 with their source: the name says measured or estimated, the tag the source
    bio = summary["runs"]["bio"]
    if bio["energy_per_request_j"] is not None:
        kind = bio["energy_source"].split(":")[0]
        assert metrics[f"load.runs.bio.energy_per_request_j.{kind}"] == pytest.approx(bio["energy_per_request_j"])
        assert tags["load.runs.bio.energy_source"] == bio["energy_source"]
    if bio["co2_g_per_1k_requests"] is not None:
        assert any(k.startswith("load.runs.bio.co2_g_per_1k_requests.") for k in metrics)
    # per-second histories of each load run
    history = client.get_metric_history(run.info.run_id, "load.runs.bio.per_second.p95_ms")
    assert len(history) >= 4 and [m.step for m in history] == sorted(m.step for m in history)
    # artifacts: report, plots, records

    artifacts = artifact_paths(client, run.info.run_id)
    assert {"report.html", "report.md", "summary.json", "validate.json", "controller.toml",
            "latency_cdf.png", "bio/requests.jsonl", "bio/run.json", "standard/requests.jsonl"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "back")))
    assert json.loads(local.read_text()) == summary

    # `report --mlflow` logs the same results as a run of its own
    other = tmp_path / "mlruns-report"
    done = subprocess.run([sys.executable, "-m", "green_mlops.cli", "report", str(results), "--out",
                           str(tmp_path / "report"), "--min-duration-s", "3", "--min-requests", "50",
                           "--mlflow", str(other), "--mlflow-experiment", "reports"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(str(other), "reports")
    assert run.data.tags["green_mlops.command"] == "report"
    assert "load.claims.latency_reduction.measured" in run.data.metrics
    artifacts = artifact_paths(client, run.info.run_id)
    assert {"report.html", "summary.json", "records/bio/requests.jsonl"} <= artifacts
