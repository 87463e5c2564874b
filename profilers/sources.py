"""Energy sources: each reads joules over a window, says whether that is measured or estimated,
and fails soft: a source that cannot read raises ``SourceUnavailable`` at construction, with the
reason, and is left out by the profiler (never crashing a run).

* :class:`NvmlSource`: NVIDIA GPUs through ``pynvml`` (the ``nvidia-ml-py`` package): the
  total-energy counter (mJ, Volta and newer), else the power reading (mW) integrated over the
  sampler's timeline. Measured.
* :class:`RaplSource`: CPU packages through ``/sys/class/powercap/intel-rapl*/energy_uj``, with
  counter wrap-around (``max_energy_range_uj``). Measured.
* :class:`CodeCarbonSource`: CodeCarbon's ``OfflineEmissionsTracker`` (no network): CO2 for every
  window, and CPU + RAM energy, which is *estimated* from CPU load and TDP where the machine has
  no RAPL (CodeCarbon's ``cpu_load`` mode).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("green_mlops.profilers")

MEASURED, ESTIMATED = "measured", "estimated"


class SourceUnavailable(Exception):
    """This source cannot read on this machine; the message says why."""


@dataclass(frozen=True)
class SourceReading:
    """Energy of one source over one window."""

    source: str  # e.g. "nvml", "rapl", "codecarbon"
    kind: str  # "measured" or "estimated"
    energy_j: float
    co2_g: float | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.source}"


# --- arithmetic, kept pure so recorded series can test it --------------------------------------
def counter_delta(start: int, end: int, max_range: int) -> int:
    """Increase of a counter that wraps to 0 after ``max_range`` (RAPL's energy_uj)."""
    return end - start if end >= start else end + max_range - start


def integrate_power_j(timestamps_s, power_w) -> float:
    """Trapezoidal integral of power samples over time, in joules."""
    energy = 0.0
    for i in range(1, len(timestamps_s)):
        energy += 0.5 * (power_w[i] + power_w[i - 1]) * (timestamps_s[i] - timestamps_s[i - 1])
    return energy


# --- RAPL ---------------------------------------------------------------------------------------
class RaplSource:
    """CPU package energy from the powercap tree (top-level ``intel-rapl:N`` zones only, so
    sub-zones such as ``core`` or ``dram`` are not counted twice)."""

    name, kind = "rapl", MEASURED

    def __init__(self, root: str | Path = "/sys/class/powercap"):
        root = Path(root)
        zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not zones:
            raise SourceUnavailable(f"no RAPL zones under {root}")
        self._zones = []
        for zone in zones:
            try:
                self._zones.append((zone, int((zone / "max_energy_range_uj").read_text())))
                int((zone / "energy_uj").read_text())
            except PermissionError as exc:
                raise SourceUnavailable(f"RAPL counters are not readable ({exc}); "
                                        "run as root or grant read access to energy_uj") from exc
            except (OSError, ValueError) as exc:
                raise SourceUnavailable(f"cannot read RAPL zone {zone}: {exc}") from exc
        self.zone_names = [z.name for z, _ in self._zones]

    def _read(self) -> list[int]:
        return [int((zone / "energy_uj").read_text()) for zone, _ in self._zones]

    def begin(self):
        return self._read()

    def delta_j(self, earlier, later) -> float:
        """Joules between two readings of :meth:`begin`, wrap-around included."""
        return sum(counter_delta(a, b, m) for a, b, (_, m) in zip(earlier, later, self._zones)) / 1e6

    def end(self, token) -> SourceReading:
        return SourceReading(self.name, self.kind, self.delta_j(token, self._read()))


# --- NVML ---------------------------------------------------------------------------------------
class NvmlSource:
    """GPU energy from NVML for every visible GPU (or the given indices)."""

    name, kind = "nvml", MEASURED

    def __init__(self, gpu_indices: list[int] | None = None):
        try:
            import pynvml
        except ImportError as exc:
            raise SourceUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from exc
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise SourceUnavailable(f"NVML cannot start: {exc}") from exc
        if count == 0:
            raise SourceUnavailable("NVML sees no GPU")
        self._nvml = pynvml
        self.indices = list(range(count)) if gpu_indices is None else gpu_indices
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.indices]
        self.has_counter = True
        try:
            for handle in self._handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except pynvml.NVMLError:
            self.has_counter = False  # pre-Volta: integrate polled power instead
        self._power_lock = threading.Lock()
        self._power: list[tuple[float, float]] = []

    def sample(self) -> dict:
        """One timeline sample: power (W), utilisation (%) and memory (MiB), summed over GPUs."""
        nvml, now = self._nvml, time.monotonic()
        power_w = sum(nvml.nvmlDeviceGetPowerUsage(h) for h in self._handles) / 1e3
        util = [nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
        memory = sum(nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles) / 2**20
        with self._power_lock:
            self._power.append((now, power_w))
            del self._power[:-100_000]
        return {"gpu_power_w": power_w, "gpu_util_pct": sum(util) / len(util), "gpu_memory_mib": memory}

    def begin(self):
        if self.has_counter:
            return [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
        self.sample()
        with self._power_lock:
            return self._power[-1][0]  # the window starts at this sample

    def end(self, token) -> SourceReading:
        if self.has_counter:
            now = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
            return SourceReading(self.name, self.kind, sum(b - a for a, b in zip(token, now)) / 1e3)
        self.sample()
        with self._power_lock:
            series = [(t, p) for t, p in self._power if t >= token]
        return SourceReading(self.name, self.kind,
                             integrate_power_j([t for t, _ in series], [p for _, p in series]))


# --- CodeCarbon ---------------------------------------------------------------------------------
class CodeCarbonSource:
    """CO2 and CPU/RAM energy from CodeCarbon's offline tracker, one task per window.

    The tracker starts (1–1.6 s of hardware detection) at construction, outside any window. Its
    CPU energy is labelled measured only when CodeCarbon itself reads RAPL.
    """

    name = "codecarbon"

    def __init__(self, country_iso_code: str = "USA", region: str | None = None,
                 output_dir: str | Path | None = None):
        try:
            from codecarbon import OfflineEmissionsTracker, OutputMethod
            from codecarbon.input import DataSource
        except ImportError as exc:
            raise SourceUnavailable(f"codecarbon >= 3 is not installed ({exc})") from exc
        known = DataSource().get_global_energy_mix_data()
        if country_iso_code not in known:
            raise SourceUnavailable(f"CodeCarbon knows no country '{country_iso_code}' "
                                    "(use an ISO 3166 alpha-3 code such as USA, FRA, DEU)")
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        # No CSV (or any other output) unless an output directory is asked for.
        options = dict(country_iso_code=country_iso_code, log_level="error", measure_power_secs=3600,
                       tracking_mode="machine",
                       output_methods=[] if output_dir is None else [OutputMethod.CSV])
        if region:
            options["region"] = region
        if output_dir is not None:
            options["output_dir"] = str(output_dir)
        try:
            self._tracker = OfflineEmissionsTracker(**options)
            self._tracker.start()
        except Exception as exc:  # CodeCarbon raises many types for unknown countries or hardware
            raise SourceUnavailable(f"CodeCarbon cannot start: {exc}") from exc
        modes = {getattr(h, "_mode", None) for h in getattr(self._tracker, "_hardware", [])}
        self.kind = MEASURED if "intel_rapl" in modes else ESTIMATED
        self._lock = threading.Lock()
        self._task_ids = 0

    def begin(self):
        with self._lock:
            self._task_ids += 1
            task = f"window-{self._task_ids}"
            self._tracker.start_task(task)
        return task

    def end(self, token) -> SourceReading:
        with self._lock:
            data = self._tracker.stop_task(token)
        return SourceReading(self.name, self.kind, float(data.energy_consumed) * 3.6e6,
                             co2_g=float(data.emissions) * 1e3)

    def close(self) -> None:
        try:
            self._tracker.stop()
        except Exception as exc:  # stopping must never lose a run's results
            log.warning("CodeCarbon did not stop cleanly: %s", exc)
