"""Energy sources against what this machine really has, and their arithmetic on recorded series."""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import pytest

from profilers.profiler import Profiler, Sampler, WindowResult, feed_controller, open_profiler
from profilers.sources import (
    CodeCarbonSource, NvmlSource, RaplSource, SourceReading, SourceUnavailable, counter_delta, integrate_power_j,
)
from targets.control.controller import BioController
from targets.control.controller_config import ControllerConfig

HAS_RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj").exists()


# --- arithmetic ----------------------------------------------------------------------------------
def test_counter_delta_handles_wrap_around():
    assert counter_delta(100, 250, 1000) == 150
    assert counter_delta(900, 50, 1000) == 150


def test_power_integration_on_a_recorded_series():
    timestamps = [0.0, 0.1, 0.2, 0.4, 0.5]
    power_w = [100.0, 120.0, 120.0, 80.0, 100.0]
    # trapezoids: 11 + 12 + 20 + 9
    assert integrate_power_j(timestamps, power_w) == pytest.approx(52.0)
    assert integrate_power_j([1.0], [50.0]) == 0.0


# --- RAPL on a powercap tree laid out in a temp dir ----------------------------------------------
def powercap(root: Path, packages=((1_000, 10_000), (5_000, 10_000))) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (energy, max_range) in enumerate(packages):
        zone = root / f"intel-rapl:{i}"
        zone.mkdir()
        (zone / "energy_uj").write_text(f"{energy}\n")
        (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
        sub = root / f"intel-rapl:{i}:0"  # a sub-zone (core): must not be counted twice
        sub.mkdir()
        (sub / "energy_uj").write_text("999999\n")
        (sub / "max_energy_range_uj").write_text("1000000\n")
    return root


def test_rapl_sums_packages_and_handles_wrap_around(tmp_path):
    root = powercap(tmp_path)
    source = RaplSource(root)
    assert source.zone_names == ["intel-rapl:0", "intel-rapl:1"]
    token = source.begin()
    (root / "intel-rapl:0" / "energy_uj").write_text("4000\n")  # +3,000 µJ
    (root / "intel-rapl:1" / "energy_uj").write_text("1000\n")  # wrapped: +6,000 µJ
    reading = source.end(token)
    assert reading.energy_j == pytest.approx(0.009)
    assert reading.label == "measured:rapl"


def test_rapl_absent_or_unreadable_is_unavailable(tmp_path, monkeypatch):
    with pytest.raises(SourceUnavailable, match="no RAPL zones"):
        RaplSource(tmp_path)
    root = powercap(tmp_path / "tree")
    real_read_text = Path.read_text

    def deny(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(SourceUnavailable, match="not readable"):
        RaplSource(root)


@pytest.mark.skipif(not HAS_RAPL, reason="this machine has no RAPL powercap counters")
def test_rapl_reads_this_machine():
    source = RaplSource()
    token = source.begin()
    time.sleep(0.2)
    assert source.end(token).energy_j > 0


# --- NVML -------------------------------------------------------------------------------------------
def test_nvml_absence_is_detected_cleanly():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    except Exception:
        pass
    with pytest.raises(SourceUnavailable, match="NVML"):
        NvmlSource()


def fake_pynvml(counter_mj=None, power_mw=None, counter_supported=True):
    """A stand-in pynvml module replaying recorded series (one GPU)."""
    module = types.SimpleNamespace()

    class NVMLError(Exception):
        pass

    counters, powers = iter(counter_mj or []), iter(power_mw or [])
    module.NVMLError = NVMLError
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetCount = lambda: 1
    module.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"

    def total_energy(handle):
        if not counter_supported:
            raise NVMLError("Not Supported")
        return next(counters)

    module.nvmlDeviceGetTotalEnergyConsumption = total_energy
    module.nvmlDeviceGetPowerUsage = lambda handle: next(powers)
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=50)
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=2**30)
    return module


def test_nvml_counter_arithmetic(monkeypatch):
    # probe read at construction, then begin and end: 1,250,000 mJ -> 1,262,500 mJ
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(counter_mj=[1_000_000, 1_250_000, 1_262_500]))
    source = NvmlSource()
    assert source.has_counter
    token = source.begin()
    assert source.end(token).energy_j == pytest.approx(12.5)


def test_nvml_power_fallback_integrates_samples(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power_mw=[100_000, 100_000, 300_000, 300_000],
                                                           counter_supported=False))
    source = NvmlSource()
    assert not source.has_counter
    clock = iter([10.0, 10.5, 11.0, 11.5])
    monkeypatch.setattr("profilers.sources.time.monotonic", lambda: next(clock))
    token = source.begin()  # sample at 10.0 s: 100 W
    sample = source.sample()  # 10.5 s: 100 W
    assert sample == {"gpu_power_w": 100.0, "gpu_util_pct": 50, "gpu_memory_mib": 1024.0}
    source.sample()  # 11.0 s: 300 W
    reading = source.end(token)  # 11.5 s: 300 W
    assert reading.energy_j == pytest.approx(50 + 100 + 150)


# --- CodeCarbon, offline, for real ------------------------------------------------------------------
@pytest.fixture(scope="module")
def codecarbon_source():
    source = CodeCarbonSource(country_iso_code="FRA")
    yield source
    source.close()


def test_codecarbon_offline_window(codecarbon_source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token = codecarbon_source.begin()
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        sum(range(1000))
    reading = codecarbon_source.end(token)
    assert reading.energy_j > 0 and reading.co2_g > 0
    assert reading.kind == ("measured" if HAS_RAPL else "estimated")
    assert list(tmp_path.iterdir()) == []  # no emissions.csv litter


def test_codecarbon_unknown_country_is_unavailable():
    with pytest.raises(SourceUnavailable, match="CodeCarbon"):
        CodeCarbonSource(country_iso_code="ZZZ")


# --- windows, feeding the controller, the sampler -------------------------------------------------
class FakeSource:
    def __init__(self, name, kind, joules, fail=False):
        self.name, self.kind, self.joules, self.fail = name, kind, joules, fail

    def begin(self):
        if self.fail:
            raise RuntimeError("meter went away")
        return None

    def end(self, token):
        return SourceReading(self.name, self.kind, self.joules, co2_g=0.5 if self.name == "codecarbon" else None)


def test_windows_prefer_measured_energy_and_record_to_disk(tmp_path):
    profiler = Profiler([FakeSource("nvml", "measured", 3.0), FakeSource("rapl", "measured", 1.0),
                         FakeSource("codecarbon", "estimated", 9.0), FakeSource("x", "measured", 5.0, fail=True)],
                        record_path=tmp_path / "windows.jsonl")
    profiler.begin_window("w")
    result = profiler.end_window("w")
    assert result.energy_j() == (4.0, "measured:nvml+measured:rapl")
    assert result.co2_g() == 0.5
    record = json.loads((tmp_path / "windows.jsonl").read_text())
    assert record["window"] == "w" and record["energy_j"] == 4.0 and len(record["sources"]) == 3
    # CO2 carries its own source (CodeCarbon's estimate), not the measured energy's label
    assert record["energy_source"] == "measured:nvml+measured:rapl"
    assert record["co2_source"] == "estimated:codecarbon" and result.co2_source() == "estimated:codecarbon"
    with pytest.raises(ValueError, match="not begun"):
        profiler.end_window("w")
    profiler.begin_window("v")
    with pytest.raises(ValueError, match="already open"):
        profiler.begin_window("v")


def test_estimate_only_window_is_labelled_estimated():
    result = WindowResult("w", 1.0, (SourceReading("codecarbon", "estimated", 2.0, 0.1),))
    assert result.energy_j() == (2.0, "estimated:codecarbon")
    assert WindowResult("w", 1.0, ()).energy_j() == (None, "none")


def test_energy_per_request_feeds_the_controller():
    controller = BioController(ControllerConfig(energy_ref_j=0.5))
    window = WindowResult("w", 1.0, (SourceReading("rapl", "measured", 2.0),))
    assert feed_controller(window, 10, controller) == pytest.approx(0.2)
    assert controller.energy_norm() == pytest.approx(0.4)
    assert controller.state()["energy_source"] == "measured:rapl"
    assert feed_controller(window, 0, controller) is None


def test_open_profiler_leaves_out_what_cannot_read(tmp_path):
    profiler = open_profiler(wanted=("nvml", "rapl"), rapl_root=powercap(tmp_path))
    names = [s.name for s in profiler.sources]
    assert "rapl" in names and "rapl" not in profiler.unavailable
    assert ("nvml" in names) != ("nvml" in profiler.unavailable)  # either reads or says why
    with pytest.raises(ValueError, match="unknown energy source"):
        open_profiler(wanted=("watts",))


def test_sampler_writes_a_timeline(tmp_path):
    profiler = Profiler([RaplSource(powercap(tmp_path / "powercap"))])
    path = tmp_path / "timeline.jsonl"
    with Sampler(profiler, rate_hz=20, path=path) as sampler:
        time.sleep(0.5)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert 5 <= len(lines) <= 12 and len(sampler.timeline) == len(lines)
    assert all("cpu_power_w" in s and "t_s" in s for s in lines)
    assert sampler.cpu_time_s >= 0
    with pytest.raises(ValueError):
        Sampler(profiler, rate_hz=0)


def test_validate_writes_energy_windows_and_timeline(tmp_path):
    from green_mlops.cli import main

    assert main(["validate", "--requests", "200", "--warmup", "20", "--k", "50", "--no-load",
                 "--results", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "validate.json").read_text())
    for mode in ("standard", "bio"):
        assert summary[mode]["energy_source"].startswith(("measured:", "estimated:"))
        assert summary[mode]["energy_per_request_j"] > 0
        assert summary[mode]["co2_g_per_1k_requests"] > 0
    assert isinstance(summary["energy_reduction_pct"], float)
    windows = [json.loads(line) for line in (tmp_path / "ablation" / "windows.jsonl").read_text().splitlines()]
    assert {w["window"].split("-")[0] for w in windows} == {"standard", "bio"}
    total = sum(w["energy_j"] for w in windows if w["window"].startswith("standard"))
    assert total / 200 == pytest.approx(summary["standard"]["energy_per_request_j"])
    assert os.path.getsize(tmp_path / "ablation" / "timeline.jsonl") > 0
