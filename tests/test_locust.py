"""Real headless Locust runs (subprocesses, a few seconds each) against a real gateway; what they
record is checked against what the gateway says it served (its /metrics counts)."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from reports.records import read_records

ROOT = Path(__file__).resolve().parents[1]
BIO, STANDARD = str(ROOT / "loadtests" / "bio.py"), str(ROOT / "loadtests" / "standard.py")
LOCUST = [sys.executable, "-m", "locust"]


def locust(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    result = subprocess.run([*LOCUST, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def served(gateway_url: str) -> Counter:
    """The gateway's answered requests by action (outcome ok or rejected), from /metrics."""
    counts = Counter()
    pattern = re.compile(r'^green_mlops_requests_total\{action="([^"]+)",model="digits",outcome="(ok|rejected)"\} (\S+)$')
    for line in httpx.get(f"{gateway_url}/metrics").text.splitlines():
        match = pattern.match(line)
        if match:
            counts[match.group(1)] += int(float(match.group(3)))
    return counts


def recorded(results: Path) -> list[dict]:
    return read_records(results / "requests.jsonl")


def check_against_gateway(records: list[dict], before: Counter, after: Counter) -> None:
    served_now = after - before
    assert sum(served_now.values()) == len(records) > 0
    assert Counter(r["action"] for r in records) == served_now
    for r in records:
        assert r["status"] == 200
        assert r["correct"] == (r["predicted"] == r["label"])
        assert r["admitted"] == (r["action"] == "full")
        assert r["latency_ms"] >= r["service_ms"] > 0


@pytest.mark.parametrize(
    "shape, expected_phases",
    [
        ("steady", {"steady"}),
        ("ramp", {"ramp", "peak"}),
        ("spike", {"base", "spike", "recovery"}),
        ("wave", {"rising", "falling"}),
        ("step", {"step-1", "step-2", "step-3"}),
    ],
)
def test_each_shape_records_what_the_gateway_served(gateway_bio, tmp_path, shape, expected_phases):
    before = served(gateway_bio.url)
    result = locust("-f", BIO, "--headless", "--host", gateway_bio.url, "--shape", shape, "--base-users", "2",
                    "--peak-users", "4", "--phase-s", "1", "--steps", "3", "-t", "3", "--energy", "off",
                    "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    check_against_gateway(records, before, served(gateway_bio.url))
    assert {r["phase"] for r in records} == expected_phases
    accuracy = sum(r["correct"] for r in records) / len(records)
    assert accuracy > 0.9
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["shape"] == shape and metadata["provider"] == "CPUExecutionProvider"
    assert metadata["n_records"] == len(records)
    assert {row["phase"] for row in metadata["phases"]} >= expected_phases
    assert "green-mlops bio" in result.stderr  # the per-phase summary table


def test_open_loop_sends_on_schedule_and_measures_from_intended_time(gateway_bio, tmp_path):
    before = served(gateway_bio.url)
    result = locust("-f", BIO, "--headless", "--host", gateway_bio.url, "--arrival-rate", "150", "-t", "3",
                    "--energy", "off", "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    check_against_gateway(records, before, served(gateway_bio.url))
    assert 300 <= len(records) <= 600  # Poisson, 150/s for 3 s
    for r in records:
        assert r["latency_ms"] == pytest.approx((r["t_sent"] - r["t_intended"]) * 1e3 + r["service_ms"])
        assert r["late"] == ((r["t_sent"] - r["t_intended"]) * 1e3 > 1.0)
    gaps = sorted(b["t_intended"] - a["t_intended"] for a, b in zip(records, records[1:]))
    assert gaps[len(gaps) // 2] < 0.02  # arrivals keep coming while answers are pending
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["open_loop"] and metadata["arrival_rate_rps"] == 150
    assert "open loop" in result.stderr and "late" in result.stderr


def test_standard_scenario_starts_its_own_gateway_with_the_controller_off(tmp_path):
    locust("-f", STANDARD, "--headless", "-u", "2", "-r", "2", "-t", "2", "--energy", "off",
           "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    assert records and {r["action"] for r in records} == {"full"} and all(r["admitted"] for r in records)
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["gateway_started_by_locustfile"] and metadata["controller"] == "off"
    host = metadata["host"]
    with pytest.raises(httpx.HTTPError):  # stopped with the run
        httpx.get(f"{host}/v2/health/live", timeout=2)


def test_default_results_directory_and_energy(tmp_path):
    locust("-f", BIO, "--headless", "-u", "2", "-r", "2", "-t", "3", cwd=tmp_path)
    (run_dir,) = (tmp_path / "results").iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z-bio", run_dir.name)
    metadata = json.loads((run_dir / "run.json").read_text())
    assert metadata["energy_source"].startswith(("measured:", "estimated:"))
    assert metadata["energy_per_request_j"] > 0
    assert (run_dir / "windows.jsonl").read_text() and (run_dir / "timeline.jsonl").exists()


def test_sigint_midway_loses_no_answered_request(gateway_bio, tmp_path):
    before = served(gateway_bio.url)
    process = subprocess.Popen([*LOCUST, "-f", BIO, "--headless", "--host", gateway_bio.url, "-u", "4", "-r", "4",
                                "-t", "60", "--energy", "off", "--results", str(tmp_path)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = tmp_path / "requests.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_size < 50_000):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    answered_by_gateway = sum((served(gateway_bio.url) - before).values())
    # Only requests cut off in flight by the interrupt (at most one per user) may be missing.
    assert 0 <= answered_by_gateway - len(records) <= 4
    assert len(records) > 100


def test_distributed_run_with_two_workers_writes_one_merged_set(gateway_bio, tmp_path):
    before = served(gateway_bio.url)
    locust("-f", BIO, "--headless", "--host", gateway_bio.url, "--processes", "2", "-u", "4", "-t", "3",
           "--energy", "off", "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    check_against_gateway(records, before, served(gateway_bio.url))
    assert len({r["source"] for r in records}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requests.jsonl", "run.json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_web_ui_drives_the_same_scenario(gateway_bio, tmp_path):
    port = free_port()
    process = subprocess.Popen([*LOCUST, "-f", BIO, "--host", gateway_bio.url, "--web-host", "127.0.0.1",
                                "--web-port", str(port), "--energy", "off", "--results", str(tmp_path)],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ui = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(ui, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.get(ui).status_code == 200
        started = httpx.post(f"{ui}/swarm", data={"user_count": 2, "spawn_rate": 2, "host": gateway_bio.url})
        assert started.status_code == 200
        time.sleep(2)
        httpx.get(f"{ui}/stop")
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    records = recorded(tmp_path)
    assert len(records) > 10 and all(r["status"] == 200 for r in records)


def test_locust_drives_triton_directly(triton_server, tmp_path):
    import urllib.request

    def served_by_triton() -> float:
        if not triton_server.metrics_url:
            return -1
        text = urllib.request.urlopen(triton_server.metrics_url).read().decode()
        line = next(l for l in text.splitlines() if l.startswith('nv_inference_request_success{model="digits_full"'))
        return float(line.rsplit(" ", 1)[1])

    before = served_by_triton()
    locust("-f", STANDARD, "--headless", "--backend", "triton", "--host", f"http://{triton_server.url}",
           "-u", "2", "-r", "2", "-t", "2", "--energy", "off", "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    assert records and all(r["status"] == 200 and r["action"] == "full" for r in records)
    assert sum(r["correct"] for r in records) / len(records) > 0.9
    if before >= 0:
        assert served_by_triton() - before == len(records)
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["backend"] == "triton" and metadata["provider"].startswith("triton:")


def test_backend_triton_needs_a_host(tmp_path):
    result = subprocess.run([*LOCUST, "-f", STANDARD, "--headless", "--backend", "triton", "-t", "1",
                             "--energy", "off"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0 and "give its address with --host" in result.stderr


def test_bad_shape_parameters_are_a_clear_error(tmp_path):
    result = subprocess.run([*LOCUST, "-f", BIO, "--headless", "--phase-s", "0", "-t", "1", "--energy", "off"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0 and "phase length" in result.stderr
    assert "Traceback" not in result.stderr
