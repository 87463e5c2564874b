"""Real headless Locust runs (subprocesses, a few seconds each) against a real gateway; what they
record is checked against what the gateway says it served (its /metrics counts).

Every test starts its own gateway (none is shared with a test that may still be loading it), and
every process a test starts runs in a session of its own that is killed, with its children,
whatever happens (fixtures with ``finally``)."""
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
from types import SimpleNamespace

import httpx
import pytest

from loadtests.gateway_process import GatewayProcess
from reports.records import read_records
from tests.processes import kill_session

ROOT = Path(__file__).resolve().parents[1]
BIO, STANDARD = str(ROOT / "loadtests" / "bio.py"), str(ROOT / "loadtests" / "standard.py")
LOCUST = [sys.executable, "-m", "locust"]


@pytest.fixture
def spawn():
    """``spawn(*locust_args, cwd=...)`` starts Locust in a session of its own; all are killed at
    the end of the test, with their children (a gateway the locustfile started), whatever happens."""
    started: list[subprocess.Popen] = []

    def start(*args: str, cwd: Path) -> subprocess.Popen:
        process = subprocess.Popen([*LOCUST, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            kill_session(process)


@pytest.fixture
def locust(spawn):
    """Run Locust to the end; its exit status must be 0."""

    def run(*args: str, cwd: Path, timeout: float = 120) -> SimpleNamespace:
        process = spawn(*args, cwd=cwd)
        stdout, stderr = process.communicate(timeout=timeout)
        assert process.returncode == 0, stderr[-3000:]
        return SimpleNamespace(stdout=stdout, stderr=stderr, returncode=process.returncode)

    return run


@pytest.fixture
def gateway_bio():
    """A gateway of this test's own (never one another test may still be loading)."""
    gateway = GatewayProcess("--controller", "bio", "--max-body-bytes", "65536")
    try:
        yield gateway
    finally:
        gateway.stop()


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
    """Every answer the gateway gave is a record; what is not an answer was cut off (a user the
    shape stopped, or the run's end), never failed."""
    served_now = after - before
    answered = [r for r in records if r["outcome"] == "answered"]
    cut_off = [r for r in records if r["outcome"] == "cut_off"]
    assert len(answered) + len(cut_off) == len(records) and len(answered) > 0
    in_flight = [r for r in cut_off if r["t_sent"] is not None]  # the gateway may have answered these
    assert len(answered) <= sum(served_now.values()) <= len(answered) + len(in_flight)
    assert len(cut_off) <= max(4, len(records) // 200)  # at most a handful, at the edges
    if not in_flight:
        assert Counter(r["action"] for r in answered) == served_now
    for r in answered:
        assert r["status"] == 200
        assert r["correct"] == (r["predicted"] == r["label"])
        assert r["admitted"] == (r["action"] == "full")
        assert r["latency_ms"] >= r["service_ms"] > 0
    for r in cut_off:
        assert r["reason"] and not r["correct"]


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
def test_each_shape_records_what_the_gateway_served(locust, gateway_bio, tmp_path, shape, expected_phases):
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
    assert metadata["n_records"] == len(records) and metadata["finished"]
    assert {row["phase"] for row in metadata["phases"]} >= expected_phases
    assert "green-mlops bio" in result.stderr  # the per-phase summary table


def test_open_loop_replays_its_schedule_and_measures_from_intended_time(locust, gateway_bio, tmp_path):
    before = served(gateway_bio.url)
    result = locust("-f", BIO, "--headless", "--host", gateway_bio.url, "--arrival-rate", "150", "-t", "3",
                    "--energy", "off", "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    check_against_gateway(records, before, served(gateway_bio.url))
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    assert 300 <= len(schedule["offsets_s"]) <= 600  # Poisson, 150/s for 3 s
    assert len(records) >= 0.95 * len(schedule["offsets_s"])
    for r in records:
        assert r["latency_ms"] == pytest.approx((r["t_sent"] - r["t_intended"]) * 1e3 + r["service_ms"])
        assert r["late"] == ((r["t_sent"] - r["t_intended"]) * 1e3 > 10.0)
        assert r["row"] == schedule["rows"][r["seq"]]
        assert r["offset_s"] == pytest.approx(schedule["offsets_s"][r["seq"]], abs=1e-5)
    gaps = sorted(b["t_intended"] - a["t_intended"] for a, b in zip(records, records[1:]))
    assert gaps[len(gaps) // 2] < 0.02  # arrivals keep coming while answers are pending
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["open_loop"] and metadata["arrival_rate_rps"] == 150
    assert metadata["schedule"]["digest"] == schedule["digest"]
    assert (tmp_path / "reference.json").exists()
    assert "open loop" in result.stderr and "late" in result.stderr


def test_the_same_seed_or_schedule_replays_the_same_load(locust, gateway_bio, tmp_path):
    first, second, replay = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, extra in ((first, ("--seed", "5")), (second, ("--seed", "5")),
                       (replay, ("--schedule", str(first / "schedule.json")))):
        locust("-f", BIO, "--headless", "--host", gateway_bio.url, "--arrival-rate", "100", "-t", "2",
               "--energy", "off", "--results", str(out), *extra, cwd=tmp_path)
    digests = {json.loads((d / "run.json").read_text())["schedule"]["digest"] for d in (first, second, replay)}
    assert len(digests) == 1
    # the same arrivals carry the same rows (the last instant before -t may be sent or not)
    rows = [sorted((r["seq"], r["row"]) for r in recorded(d) if r["offset_s"] < 1.8) for d in (first, second, replay)]
    assert len(rows[0]) > 100 and rows[0] == rows[1] == rows[2]


def test_standard_scenario_starts_its_own_gateway_with_the_controller_off(locust, tmp_path):
    locust("-f", STANDARD, "--headless", "-u", "2", "-r", "2", "-t", "2", "--energy", "off",
           "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    assert records and {r["action"] for r in records} == {"full"} and all(r["admitted"] for r in records)
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["gateway_started_by_locustfile"] and metadata["controller"] == "off"
    from targets.cpus import cpu_list, split_for_load_test

    split = split_for_load_test()  # Locust and the gateway on disjoint CPUs where there are two
    cpu_sets = metadata["machine"]["cpu_sets"]
    if split is None:
        assert cpu_sets.startswith("shared")
    else:
        assert cpu_sets == {"load_generator": cpu_list(split[0]), "gateway": cpu_list(split[1])}
    host = metadata["host"]
    with pytest.raises(httpx.HTTPError):  # stopped with the run
        httpx.get(f"{host}/v2/health/live", timeout=2)


def test_default_results_directory_and_energy(locust, tmp_path):
    locust("-f", BIO, "--headless", "-u", "2", "-r", "2", "-t", "3", cwd=tmp_path)
    (run_dir,) = (tmp_path / "results").iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z-bio", run_dir.name)
    metadata = json.loads((run_dir / "run.json").read_text())
    assert metadata["energy_source"].startswith(("measured:", "estimated:"))
    assert metadata["energy_per_request_j"] > 0
    assert (run_dir / "windows.jsonl").read_text() and (run_dir / "timeline.jsonl").exists()
    # the gateway the locustfile started ran its own profiler: bio's controller was fed ê
    assert metadata["controller_state_at_end"]["energy_source"].startswith(("measured:", "estimated:"))


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_records(path: Path, min_records: int, timeout_s: float = 60) -> None:
    """Until ``path`` holds ``min_records`` records (counted in lines, not bytes: a record's size
    changes whenever a field is added)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _lines(path) < min_records:
        time.sleep(0.1)
    assert _lines(path) >= min_records, "Locust recorded too little in time"


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_midway_loses_no_answered_request(spawn, gateway_bio, tmp_path, stop_signal):
    before = served(gateway_bio.url)
    process = spawn("-f", BIO, "--headless", "--host", gateway_bio.url, "-u", "4", "-r", "4", "-t", "60",
                    "--energy", "off", "--results", str(tmp_path), cwd=tmp_path)
    path = tmp_path / "requests.jsonl"
    wait_for_records(path, 150)
    stopped = time.monotonic()
    process.send_signal(stop_signal)
    process.communicate(timeout=30)
    assert time.monotonic() - stopped < 25  # users finish the request in hand, then it exits
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    answered_by_gateway = sum((served(gateway_bio.url) - before).values())
    answered = [r for r in records if r["outcome"] in ("answered", "rejected")]
    # every answer the gateway gave is on disk, unless its request was cut off in flight
    cut_off = [r for r in records if r["outcome"] == "cut_off"]
    assert 0 <= answered_by_gateway - len(answered) <= len(cut_off)
    assert len(answered) > 100
    metadata = json.loads((tmp_path / "run.json").read_text())
    assert metadata["finished"] and metadata["n_records"] == len(records)


def test_distributed_run_with_two_workers_writes_one_merged_set(locust, gateway_bio, tmp_path):
    before = served(gateway_bio.url)
    locust("-f", BIO, "--headless", "--host", gateway_bio.url, "--processes", "2", "-u", "4", "-t", "3",
           "--energy", "off", "--results", str(tmp_path), cwd=tmp_path)
    records = recorded(tmp_path)
    check_against_gateway(records, before, served(gateway_bio.url))
    assert len({r["source"] for r in records}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.json", "requests.jsonl", "run.json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_web_ui_drives_the_same_scenario(spawn, gateway_bio, tmp_path):
    port = free_port()
    process = spawn("-f", BIO, "--host", gateway_bio.url, "--web-host", "127.0.0.1", "--web-port", str(port),
                    "--energy", "off", "--results", str(tmp_path), cwd=tmp_path)
    ui = f"http://127.0.0.1:{port}"
    for _ in range(300):
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
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    records = recorded(tmp_path)
    assert len(records) > 10 and all(r["status"] == 200 for r in records)
    assert json.loads((tmp_path / "run.json").read_text())["finished"]


def test_locust_drives_triton_directly(locust, triton_server, tmp_path):
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


def failing(spawn, tmp_path, *args: str) -> tuple[subprocess.Popen, str, float]:
    started = time.monotonic()
    process = spawn("-f", BIO, "--headless", *args, cwd=tmp_path)
    _, stderr = process.communicate(timeout=60)
    return process, stderr, time.monotonic() - started


def test_backend_triton_needs_a_host(spawn, tmp_path):
    process, stderr, _ = failing(spawn, tmp_path, "--backend", "triton", "-t", "1", "--energy", "off")
    assert process.returncode == 2 and "give its address with --host" in stderr


def test_bad_shape_parameters_are_a_clear_error(spawn, tmp_path):
    process, stderr, _ = failing(spawn, tmp_path, "--phase-s", "0", "-t", "1", "--energy", "off")
    assert process.returncode == 2 and "phase length" in stderr
    assert "Traceback" not in stderr


def test_a_broken_model_is_one_message_and_exit_2_at_once(spawn, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{}")
    process, stderr, took_s = failing(spawn, tmp_path, "--model", str(broken), "-u", "4", "-t", "30",
                                      "--energy", "off", "--results", str(tmp_path / "r"))
    assert process.returncode == 2 and "cannot load model" in stderr
    assert "Traceback" not in stderr and stderr.count("green-mlops:") == 1
    assert took_s < 25  # at once, not after -t


def _distributed(spawn, locustfile: str, host: str, common: list[str], results: Path, cwd: Path) -> None:
    """A master and two worker processes on loopback (``--master`` / ``--worker``), run to the end."""
    port = free_port()
    master = spawn("-f", locustfile, "--master", "--expect-workers", "2", "--master-bind-host", "127.0.0.1",
                   "--master-bind-port", str(port), "--host", host, *common, "--results", str(results), cwd=cwd)
    workers = [spawn("-f", locustfile, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port),
                     "--energy", "off", cwd=cwd) for _ in range(2)]
    _, stderr = master.communicate(timeout=120)
    assert master.returncode == 0, stderr[-3000:]
    for worker in workers:
        worker.communicate(timeout=30)


def test_master_and_two_workers_replay_the_single_process_schedule(spawn, locust, tmp_path):
    """One seeded schedule, partitioned over two worker processes: the same digest, the same
    arrivals (index and row), the same count as one process; each worker's share is recorded
    and the merged report over standard and bio is VALID."""
    from reports.build import build_report

    common = ["--headless", "--shape", "steady", "--arrival-rate", "60", "--seed", "3", "-t", "12",
              "--open-loop-users", "2", "--energy", "off"]
    bio, off = GatewayProcess("--controller", "bio"), GatewayProcess("--controller", "off")
    try:
        single = tmp_path / "single"
        locust("-f", BIO, "--host", bio.url, *common, "--results", str(single), cwd=tmp_path)
        merged = tmp_path / "merged"
        _distributed(spawn, BIO, bio.url, common, merged / "bio", tmp_path)
        _distributed(spawn, STANDARD, off.url, common, merged / "standard", tmp_path)
    finally:
        bio.stop()
        off.stop()
    one, two = (json.loads((d / "run.json").read_text()) for d in (single, merged / "bio"))
    assert one["schedule"]["digest"] == two["schedule"]["digest"]
    arrivals = {d: sorted((r["seq"], r["row"]) for r in recorded(d)) for d in (single, merged / "bio")}
    assert arrivals[single] == arrivals[merged / "bio"]
    assert len(arrivals[single]) == one["schedule"]["n_scheduled"]  # every arrival once, none twice
    workers = two["workers"]
    assert sorted(w["worker_index"] for w in workers) == [0, 1]
    assert {w["schedule_digest"] for w in workers} == {one["schedule"]["digest"]}
    assert len({w["source"] for w in workers}) == 2 and all(w["sent"] > 0 for w in workers)
    assert sum(w["sent"] for w in workers) == sum(r["t_sent"] is not None for r in recorded(merged / "bio"))
    report = build_report(merged, merged)
    assert report["valid"], report["invalid_reasons"]
