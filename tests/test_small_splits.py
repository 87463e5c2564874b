"""A model whose validation split is too small to certify the default budget: validate says,
before any work, what the fallback is, what its thresholds will do and how many rows the budget
needs (issue 24, item 4); piped tables are never cut."""
from __future__ import annotations

import shutil

import numpy as np

from green_mlops.cli import main
from targets.control.certify import rows_needed, smallest_certifiable_budget


def test_rows_needed_is_the_fewest_rows_that_certify_the_budget():
    for budget, delta in ((0.005, 0.1), (0.02, 0.05), (0.001, 0.01)):
        n = rows_needed(budget, delta)
        assert smallest_certifiable_budget(n, delta) <= budget < smallest_certifiable_budget(n - 1, delta)
    assert rows_needed(0.005, 0.1) == 460


def test_a_small_validation_split_says_what_the_fallback_will_do_before_any_work(tmp_path, digits_spec, capsys):
    model = tmp_path / "digits"
    shutil.copytree(digits_spec.directory, model)
    split = dict(np.load(model / "validation.npz"))
    np.savez(model / "validation.npz", **{k: v[:40] for k, v in split.items()})
    assert main(["validate", "--model", str(model), "--no-load", "--requests", "2000", "--energy", "off"]) in (0, 1)
    captured = capsys.readouterr()
    line = next(line for line in captured.err.splitlines() if line.startswith("budget policy unavailable"))
    assert "needs at least 460 validation rows" in line and "Running the paper's policy instead" in line
    assert "u* = " in line and "at exit 1" in line
    # The table's figures are whole when piped (rich would cut them at 80 columns).
    assert "…" not in captured.out.split("standard vs bio", 1)[1].split("latency reduction", 1)[0]
