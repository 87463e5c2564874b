"""Ladders end to end: validate's in-process ablation on a user's own two-stage directory (loaded
unchanged) and on a ladder, the per-exit figures it records, and the sweep chosen on the
validation split and measured interleaved with standard."""
from __future__ import annotations

import json

import numpy as np
import pytest

from green_mlops.cli import main
from targets.control.calibration import calibrator
from targets.control.controller_config import build_config
from targets.errors import ConfigError
from targets.model.model_dir import load_model_dir
from tests.model_factory import make_model_dir


def _validate(model_dir, results, *extra) -> dict:
    code = main(["validate", "--model", str(model_dir), "--no-load", "--requests", "192", "--warmup", "16",
                 "--energy", "off", "--results", str(results), *extra])
    assert code == 0
    return json.loads((results / "validate.json").read_text())


def test_a_users_two_stage_directory_validates_unchanged(tmp_path):
    directory = make_model_dir(tmp_path / "mine")
    document = _validate(directory, tmp_path / "run")
    ladder = document["ladder"]
    assert ladder["n_stages"] == 2 and sum(ladder["depth_histogram"].values()) == 192
    assert ladder["calibration"]["source"] == "model.json"  # its own uncertainty_skip_below
    assert document["controller"]["tau_inf"] == pytest.approx(0.7)
    assert document["bio"]["n_requests"] == 192


def test_two_stage_directory_without_validation_split_refuses_another_measure(tmp_path):
    spec = load_model_dir(make_model_dir(tmp_path / "mine"))
    assert spec.validation_path is None  # the two-stage form here names no validation split
    with pytest.raises(ConfigError, match="no calibration for uncertainty 'margin'|carries no calibration"):
        build_config(spec.controller_hints, None, {"uncertainty": "margin"}, calibrator(spec))


def test_validate_on_a_ladder_records_where_requests_left(tmp_path):
    directory = make_model_dir(tmp_path / "ladder", widths=(3, 5, 4), ladder=True)
    document = _validate(directory, tmp_path / "run", "--sweep", "--sweep-points", "3")
    ladder = document["ladder"]
    assert ladder["n_stages"] == 4 and len(ladder["stage_accuracy_heldout"]) == 4
    assert ladder["stage_accuracy_heldout"][-1] == pytest.approx(1.0)  # labels are the full model's answers
    assert sum(ladder["depth_histogram"].values()) == 192
    assert sum(ladder["oracle_depth_histogram"].values()) == 192
    assert 1.0 <= ladder["oracle_mean_depth"] <= 4.0 and len(ladder["stage_cost_ms"]) == 4
    calibration = ladder["calibration"]
    assert calibration["source"] == "validation.npz" and len(calibration["u_star"]) == 3
    assert len(document["controller"]["exit_tau_inf"]) == 3
    # The sweep's standard ran interleaved with it: one standard figure shared by every point.
    points = document["sweep"]
    assert points and len({p["standard_mean_latency_ms"] for p in points}) == 1
    assert all(1.0 <= p["mean_depth"] <= 4.0 for p in points)


def test_oracle_is_the_earliest_exit_with_the_full_models_answer(tmp_path):
    from loadtests.ablation import ladder_oracle
    from targets.control.calibration import ladder_outputs
    from targets.backends.ort_target import OnnxRuntimeTarget

    spec = load_model_dir(make_model_dir(tmp_path / "ladder", widths=(3, 5, 4), ladder=True))
    backend = OnnxRuntimeTarget(spec, device="cpu")
    x, y = spec.load_eval()
    oracle = ladder_oracle(backend, x, y)
    outputs = ladder_outputs(backend, x)
    full = outputs.final.argmax(1)
    answers = [p.argmax(1) for p in outputs.exits] + [full]
    for i, stage in enumerate(oracle.stage):
        assert answers[stage - 1][i] == full[i]
        assert all(answers[k][i] != full[i] for k in range(stage - 1))
    assert oracle.stage_accuracy == [float(np.mean(a == y)) for a in answers]


def test_exit_depth_plot_reads_only_the_recorded_figures():
    from reports.depth_plot import exit_depth_png

    ladder = {"n_stages": 3, "depth_histogram": {"1": 70, "2": 20, "3": 10}, "mean_depth": 1.4,
              "oracle_depth_histogram": {"1": 90, "2": 5, "3": 5}, "oracle_mean_depth": 1.15,
              "stage_accuracy_heldout": [0.9, 0.95, 0.97]}
    png = exit_depth_png(ladder)
    assert png.startswith(b"\x89PNG") and len(png) > 5000
