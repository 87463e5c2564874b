"""Faults during a Locust run, with real processes: the gateway killed mid-run, Ctrl-C and SIGTERM
mid-run. Nothing answered may be lost, every sent request ends as one record, the report builds
and says what happened, and no process is left behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests.gateway_process import GatewayProcess
from reports.build import build_report
from reports.records import read_records

ROOT = Path(__file__).resolve().parents[1]
BIO = str(ROOT / "loadtests" / "bio.py")


@pytest.fixture
def spawn():
    """Start Locust in a session of its own; killed with its children whatever happens."""
    started: list[subprocess.Popen] = []

    def start(*args: str, cwd: Path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "locust", "-f", BIO, "--headless", *args], cwd=cwd,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the process and whatever it started
            except ProcessLookupError:
                pass
            process.wait(timeout=30)


@pytest.fixture
def gateway():
    gateway = GatewayProcess("--controller", "bio")
    try:
        yield gateway
    finally:
        gateway.stop()


def wait_for(path: Path, min_bytes: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < min_bytes):
        time.sleep(0.05)
    assert path.exists() and path.stat().st_size >= min_bytes, "Locust recorded too little in time"


def answered_by(gateway_url: str) -> int:
    text = httpx.get(f"{gateway_url}/metrics").text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("green_mlops_requests_total{")
                   and ('outcome="ok"' in line or 'outcome="rejected"' in line)))


def test_gateway_killed_mid_run_failures_are_recorded_with_reasons_and_the_report_is_invalid(spawn, gateway,
                                                                                              tmp_path):
    process = spawn("--host", gateway.url, "--arrival-rate", "100", "-t", "6", "--energy", "off",
                    "--request-timeout-s", "2", "--results", str(tmp_path), cwd=tmp_path)
    wait_for(tmp_path / "requests.jsonl", 20_000)
    gateway.process.kill()  # the system under test dies mid-run
    gateway.process.wait(timeout=10)
    process.communicate(timeout=60)
    assert process.returncode == 1  # Locust's exit status when requests failed
    records = read_records(tmp_path / "requests.jsonl")
    failed = [r for r in records if r["outcome"] == "failed"]
    assert len(failed) > 20 and all(r["reason"] for r in failed)
    assert any("refused" in r["reason"].lower() or "reset" in r["reason"].lower() for r in failed)
    assert {r["outcome"] for r in records} <= {"answered", "failed", "cut_off"}
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["finished"] and metadata["n_records"] == len(records)
    summary = build_report(tmp_path, tmp_path / "report", min_duration_s=1, min_requests=10)
    assert not summary["valid"]
    assert any("requests failed" in r for r in summary["invalid_reasons"])
    assert "Failures" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_open_loop_run_keeps_every_answer_and_leaves_no_process(spawn, gateway, tmp_path,
                                                                               stop_signal):
    before = answered_by(gateway.url)
    # An own gateway besides: the locustfile's must stop with it, the external one counts answers.
    own = tmp_path / "own"
    own.mkdir()
    with_own = spawn("--arrival-rate", "80", "-t", "60", "--energy", "off", "--results", str(own), cwd=own)
    counted = spawn("--host", gateway.url, "--arrival-rate", "150", "-t", "60", "--energy", "off",
                    "--results", str(tmp_path / "counted"), cwd=tmp_path)
    wait_for(own / "requests.jsonl", 20_000)
    wait_for(tmp_path / "counted" / "requests.jsonl", 40_000)
    for process in (with_own, counted):
        process.send_signal(stop_signal)
    for process in (with_own, counted):
        process.communicate(timeout=45)
        assert process.returncode in (0, 1)  # Locust's own exit code; never killed by the signal
    records = read_records(tmp_path / "counted" / "requests.jsonl")
    answered = sum(r["outcome"] in ("answered", "rejected") for r in records)
    cut_off = sum(r["outcome"] == "cut_off" for r in records)
    assert 0 <= answered_by(gateway.url) - before - answered <= cut_off
    for run in (own, tmp_path / "counted"):
        metadata = json.loads((run / "run.json").read_text())
        assert metadata["finished"] and metadata["n_records"] == len(read_records(run / "requests.jsonl"))
        summary = build_report(run, run / "report")  # the partial report builds
        assert summary["runs"]
    host = json.loads((own / "run.json").read_text())["host"]
    with pytest.raises(httpx.HTTPError):  # the gateway the locustfile started is gone
        httpx.get(f"{host}/v2/health/live", timeout=2)
    for process in (with_own, counted):  # and nothing is left in its session
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)
