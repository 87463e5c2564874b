"""The ratio gate cannot pass by not running: a gated rule whose benchmarks did not both run
fails the session as "not measured" (unless --no-ratio-gate)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "tests/benchmarks/test_bench_core.py", "-q", "-p",
                           "no:cacheprovider", "--benchmark-max-time=0.05", "--benchmark-min-rounds=3", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_rule_with_one_side_deselected_fails_as_not_measured():
    result = bench("-k", "controller_decision")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "not measured" in result.stdout and "did not run: test_stage2_inference" in result.stdout


def test_no_ratio_gate_reports_without_failing():
    result = bench("-k", "controller_decision", "--no-ratio-gate")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "not measured" in result.stdout


def test_benchmarks_disabled_say_so_and_gate_nothing():
    result = bench("-k", "controller_decision", "--benchmark-disable")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "no ratio measured or gated" in result.stdout
