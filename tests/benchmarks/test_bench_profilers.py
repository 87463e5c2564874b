"""The power sampler's own cost: one sample, and what that makes at 10 Hz of one core."""
from __future__ import annotations

from pathlib import Path

import pytest

from profilers.profiler import Profiler, Sampler
from profilers.sources import RaplSource, SourceUnavailable

RATE_HZ = 10.0


def _rapl(tmp_path: Path) -> RaplSource:
    """This machine's RAPL when readable, else a powercap tree laid out in a temp dir."""
    try:
        return RaplSource()
    except SourceUnavailable:
        zone = tmp_path / "intel-rapl:0"
        zone.mkdir()
        (zone / "energy_uj").write_text("123456\n")
        (zone / "max_energy_range_uj").write_text("262143328850\n")
        return RaplSource(tmp_path)


@pytest.mark.benchmark(group="profilers")
def test_sampler_sample(benchmark, tmp_path):
    """One sample as the 10 Hz thread takes it: CPU utilisation and RAPL power (NVML too on a GPU
    machine: the NVML source is added when it reads)."""
    sources = [_rapl(tmp_path)]
    try:
        from profilers.sources import NvmlSource

        sources.append(NvmlSource())
    except SourceUnavailable:
        pass
    sampler = Sampler(Profiler(sources), rate_hz=RATE_HZ)
    benchmark(sampler.sample_once)
    if benchmark.stats is not None:
        share = benchmark.stats.stats.median * RATE_HZ
        benchmark.extra_info["share of one core at 10 Hz"] = round(share, 6)
