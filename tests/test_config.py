"""Controller configuration: defaults, model hints, TOML, flags, and clear errors."""
from __future__ import annotations

import pytest

from targets.control.controller_config import ControllerConfig, build_config
from targets.errors import ConfigError


def test_precedence_defaults_hint_toml_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[controller]\nalpha = 2.0\ngamma = 0.0\n")
    assert build_config().tau_inf == ControllerConfig().tau_inf
    assert build_config({"uncertainty_skip_below": 0.25}).tau_inf == pytest.approx(0.75)
    from_toml = build_config({"uncertainty_skip_below": 0.25}, toml)
    assert from_toml.alpha == 2.0 and from_toml.tau_inf == pytest.approx(1.5)
    assert from_toml.tau0 == pytest.approx(2.25)
    flagged = build_config({"uncertainty_skip_below": 0.25}, toml, {"tau_inf": 0.3, "beta": None})
    assert flagged.tau_inf == 0.3 and flagged.beta == ControllerConfig.beta


@pytest.mark.parametrize(
    "text, message",
    [
        ("[controller\nalpha = 1", "not valid TOML"),
        ("[controller]\nalpah = 1\n", "unknown controller setting"),
        ("[other]\nx = 1\n", "unknown table"),
        ("controller = 3\n", "must be a table"),
        ("[controller]\nalpha = -1\n", "alpha must be >= 0"),
        ("[controller]\nalpha = 'high'\n", "alpha must be a finite number"),
        ("[controller]\nslo_ms = 0\n", "slo_ms must be > 0"),
        ("[controller]\ncapacity = 0\n", "capacity must be an integer"),
        ("[controller]\nuncertainty = 'vibes'\n", "uncertainty must be one of"),
        ("[controller]\nskip_action = 'drop'\n", "skip_action must be one of"),
        ("[controller]\nenergy_ewma_weight = 0\n", "energy_ewma_weight"),
        ("[controller]\ntau_inf = nan\n", "finite"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    toml = tmp_path / "c.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config(None, toml)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(None, tmp_path / "absent.toml")


# --- calibration: per uncertainty measure and per exit, on the validation split ------------------
def test_legacy_entropy_threshold_never_stands_in_for_another_measure():
    hints = {"uncertainty_skip_below": 0.25}
    assert build_config(hints, None, {"uncertainty": "entropy"}).tau_inf == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="calibrated for entropy, not 'margin'"):
        build_config(hints, None, {"uncertainty": "margin"})
    assert build_config(hints, None, {"uncertainty": "margin", "tau_inf": 0.6}).tau_inf == 0.6


def test_calibration_per_measure_sets_a_threshold_per_exit(tmp_path):
    seen = []

    def calibration(measure):
        seen.append(measure)
        return {"entropy": (0.2, 0.4, 0.5), "margin": (0.1, 0.3, 0.6)}[measure]

    config = build_config({}, None, {"uncertainty": "margin", "alpha": 2.0}, calibration)
    assert seen == ["margin"]
    assert config.exit_tau_inf == pytest.approx((1.8, 1.4, 0.8)) and config.tau_inf == pytest.approx(1.8)
    assert config.tau_inf_at(2) == pytest.approx(1.4) and config.tau_inf_at(9) == pytest.approx(1.8)
    # An explicit τ∞ holds at every exit; the calibration is not even computed.
    flagged = build_config({}, None, {"tau_inf": 0.5}, calibration)
    assert flagged.exit_tau_inf is None and flagged.tau_inf_at(3) == 0.5 and seen == ["margin"]
    # A TOML file carries per-exit thresholds as a list (what validate writes for the load test).
    toml = tmp_path / "c.toml"
    toml.write_text("[controller]\ntau_inf = 0.9\nexit_tau_inf = [0.9, 0.8, 0.7]\n")
    assert build_config({}, toml).exit_tau_inf == (0.9, 0.8, 0.7)
    with pytest.raises(ConfigError, match="exit_tau_inf must be a list of finite numbers"):
        ControllerConfig(exit_tau_inf=("a",))


def test_calibrate_exits_recovers_a_planted_safe_threshold():
    """Exit 1 is right exactly where u < 0.5 (and wrong above), the full model always right:
    u*_1 falls between the last safe row and the first harmful one. Exit 2 is calibrated only on
    the rows that reach it."""
    import numpy as np

    from targets.control.calibration import LadderOutputs, calibrate_exits

    labels = np.zeros(10, dtype=np.int64)
    confident = np.linspace(0.99, 0.6, 10)  # p(class 0): falling, so entropy rises with the row index
    exit1 = np.stack([confident, 1 - confident], axis=1)
    exit1[6:] = exit1[6:, ::-1]  # rows 6..9 answer class 1: wrong
    exit2 = np.tile([[0.7, 0.3]], (10, 1))  # right everywhere it is asked
    final = np.tile([[0.9, 0.1]], (10, 1))
    from targets.control.controller import uncertainty

    u1 = uncertainty(exit1, "entropy")
    u_star = calibrate_exits(LadderOutputs((exit1, exit2), final), labels, "entropy")
    assert u1[5] < u_star[0] < u1[6]
    assert u_star[1] == 1.0  # every row reaching exit 2 may leave there: it is never worse


def test_digits_ladder_is_calibrated_from_its_validation_split(digits_spec, digits_backend):
    from targets.control.calibration import calibration_for

    for measure in ("entropy", "least_confidence", "margin"):
        calibration = calibration_for(digits_spec, measure, digits_backend)
        assert calibration.source == "validation.npz" and calibration.n_validation == len(digits_spec.load_validation()[1]) == 503
        assert len(calibration.u_star) == digits_spec.n_exits
        assert all(0.0 <= u <= 1.0 for u in calibration.u_star)
