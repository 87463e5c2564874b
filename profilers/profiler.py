"""Measurement windows over every available energy source, and a background power sampler.

Like Zeus's monitor: ``begin_window(name)`` / ``end_window(name)`` give the duration and, per
source, the energy in joules labelled measured or estimated (CO2 where the source knows it).
Sources that cannot read on this machine are left out, each with its reason logged once.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from profilers.sources import (
    MEASURED, CodeCarbonSource, NvmlSource, RaplSource, SourceReading, SourceUnavailable,
)

log = logging.getLogger("green_mlops.profilers")
SOURCE_NAMES = ("nvml", "rapl", "codecarbon")


@dataclass(frozen=True)
class WindowResult:
    name: str
    duration_s: float
    readings: tuple[SourceReading, ...]

    def energy_j(self) -> tuple[float | None, str]:
        """The window's energy and its label: measured sources summed (GPU + CPU) when any read,
        else the estimate; ``(None, "none")`` when no source read."""
        measured = [r for r in self.readings if r.kind == MEASURED and r.source != "codecarbon"]
        if measured:
            return sum(r.energy_j for r in measured), "+".join(r.label for r in measured)
        estimated = [r for r in self.readings if r.source == "codecarbon"]
        if estimated:
            return estimated[0].energy_j, estimated[0].label
        return None, "none"

    def co2_g(self) -> float | None:
        values = [r.co2_g for r in self.readings if r.co2_g is not None]
        return values[0] if values else None

    def co2_source(self) -> str:
        """Where the CO2 figure came from: CodeCarbon's own energy (measured only when it read
        RAPL) times the grid's intensity; never the label of another source's energy."""
        labels = [r.label for r in self.readings if r.co2_g is not None]
        return labels[0] if labels else "none"

    def as_record(self) -> dict:
        energy, label = self.energy_j()
        return {"window": self.name, "duration_s": self.duration_s, "energy_j": energy,
                "energy_source": label, "co2_g": self.co2_g(), "co2_source": self.co2_source(),
                "sources": [asdict(r) | {"label": r.label} for r in self.readings]}


@dataclass
class Profiler:
    """Open and close named windows over the given sources (see :func:`open_profiler`)."""

    sources: list
    unavailable: dict[str, str] = field(default_factory=dict)
    record_path: Path | None = None
    _open: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin_window(self, name: str) -> None:
        tokens = []
        for source in self.sources:
            try:
                tokens.append((source, source.begin()))
            except Exception as exc:  # a meter that fails mid-run is left out of this window
                log.warning("%s failed to begin window %s: %s", source.name, name, exc)
        with self._lock:
            if name in self._open:
                raise ValueError(f"window '{name}' is already open")
            self._open[name] = (time.perf_counter(), tokens)

    def end_window(self, name: str) -> WindowResult:
        ended = time.perf_counter()
        with self._lock:
            if name not in self._open:
                raise ValueError(f"window '{name}' was not begun")
            started, tokens = self._open.pop(name)
        readings = []
        for source, token in tokens:
            try:
                readings.append(source.end(token))
            except Exception as exc:
                log.warning("%s failed to end window %s: %s", source.name, name, exc)
        result = WindowResult(name, ended - started, tuple(readings))
        if self.record_path is not None:
            with self.record_path.open("a") as out:
                out.write(json.dumps(result.as_record()) + "\n")
        return result

    def source_labels(self) -> list[str]:
        return [f"{s.kind}:{s.name}" for s in self.sources]

    def close(self) -> None:
        for source in self.sources:
            if hasattr(source, "close"):
                source.close()


def open_profiler(
    wanted: tuple[str, ...] = SOURCE_NAMES,
    country_iso_code: str = "USA",
    region: str | None = None,
    rapl_root: str | Path = "/sys/class/powercap",
    record_path: Path | None = None,
) -> Profiler:
    """A profiler over every wanted source that can read here; the others are logged once."""
    sources, unavailable = [], {}
    makers = {
        "nvml": lambda: NvmlSource(),
        "rapl": lambda: RaplSource(rapl_root),
        "codecarbon": lambda: CodeCarbonSource(country_iso_code, region),
    }
    for name in wanted:
        if name not in makers:
            raise ValueError(f"unknown energy source '{name}'; known: {', '.join(makers)}")
        try:
            sources.append(makers[name]())
        except SourceUnavailable as exc:
            unavailable[name] = str(exc)
            log.info("energy source %s left out: %s", name, exc)
    return Profiler(sources, unavailable, record_path)


class BackgroundLoop:
    """A daemon thread running ``self._run()``, which watches ``self._stop``; ``stop()`` sets it
    and waits for the loop to finish."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_percent_reader():
    """psutil's system-wide CPU utilisation since the previous call, or None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    psutil.cpu_percent(interval=None)
    return lambda: psutil.cpu_percent(interval=None)


def feed_controller(window: WindowResult, n_requests: int, controller) -> float | None:
    """Joules per request over ``window``; fed to the controller's ê EWMA when one is given."""
    energy_j, label = window.energy_j()
    if energy_j is None or n_requests <= 0:
        return None
    per_request = energy_j / n_requests
    if controller is not None:
        controller.observe_energy(per_request, label)
    return per_request


class Sampler(BackgroundLoop):
    """A background thread sampling power, utilisation and memory at ``rate_hz`` into a timeline.

    RAPL power comes from counter deltas between samples; NVML's from its power reading. Each
    sample is appended to ``timeline`` and, with ``path``, written as one JSON line.
    """

    def __init__(self, profiler: Profiler, rate_hz: float = 10.0, path: Path | None = None):
        if rate_hz <= 0:
            raise ValueError("sampler rate must be > 0 Hz")
        self.interval_s = 1.0 / rate_hz
        self._nvml = [s for s in profiler.sources if isinstance(s, NvmlSource)]
        self._rapl = [s for s in profiler.sources if isinstance(s, RaplSource)]
        self.timeline: list[dict] = []
        self._path = path
        self.cpu_time_s = 0.0  # CPU time the sampler thread itself used
        self._cpu_percent = _cpu_percent_reader()
        self._rapl_last = {id(s): (time.monotonic(), s.begin()) for s in self._rapl}
        super().__init__("power-sampler")

    def sample_once(self) -> dict:
        """Take one sample now (the thread calls this every interval)."""
        sample = {"t_s": time.time()}
        if self._cpu_percent is not None:
            sample["cpu_util_pct"] = self._cpu_percent()
        for source in self._nvml:
            sample.update(source.sample())
        for source in self._rapl:
            now, token = time.monotonic(), source.begin()
            last_t, last_token = self._rapl_last[id(source)]
            energy_j = source.delta_j(last_token, token)
            sample["cpu_power_w"] = energy_j / (now - last_t) if now > last_t else None
            self._rapl_last[id(source)] = (now, token)
        self.timeline.append(sample)
        return sample

    def _run(self) -> None:
        out = self._path.open("a") if self._path is not None else None
        try:
            while not self._stop.wait(self.interval_s):
                sample = self.sample_once()
                if out is not None:
                    out.write(json.dumps(sample) + "\n")
                    out.flush()
        finally:
            self.cpu_time_s = time.thread_time()
            if out is not None:
                out.close()
