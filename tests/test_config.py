"""Controller configuration: defaults, model hints, TOML, flags, and clear errors."""
from __future__ import annotations

import pytest

from targets.controller_config import ControllerConfig, build_config
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
