"""Energy per request for a long-running server: back-to-back windows feeding the controller's ê."""
from __future__ import annotations

from typing import Callable

from profilers.profiler import BackgroundLoop, Profiler, feed_controller


class PeriodicEnergyFeed(BackgroundLoop):
    """Every ``window_s`` seconds, close the current energy window, divide its energy by the
    requests answered in it (``answered()`` is a running count) and feed the controller.

    Windows are recorded by the profiler (its ``record_path``); ``last_j_per_request`` holds the
    latest figure. ``stop()`` closes the open window, so a shutdown loses no energy record.
    """

    def __init__(self, profiler: Profiler, controller, answered: Callable[[], int], window_s: float = 1.0):
        if window_s <= 0:
            raise ValueError("energy window must be > 0 s")
        self.profiler, self.controller, self.answered, self.window_s = profiler, controller, answered, window_s
        self.last_j_per_request: float | None = None
        self.windows = 0
        self.energy_j_total: float | None = None  # over every closed window, as labelled
        self.co2_g_total: float | None = None
        self.energy_source = "none"
        super().__init__("energy-feed")

    def _run(self) -> None:
        count = self.answered()
        while True:
            name = f"serve-{self.windows}"
            self.profiler.begin_window(name)
            stopping = self._stop.wait(self.window_s)
            window = self.profiler.end_window(name)
            self._accumulate(window)
            now = self.answered()
            per_request = feed_controller(window, now - count, self.controller)
            if per_request is not None:
                self.last_j_per_request = per_request
            count, self.windows = now, self.windows + 1
            if stopping:
                return

    def _accumulate(self, window) -> None:
        energy_j, label = window.energy_j()
        if energy_j is not None:
            self.energy_j_total = (self.energy_j_total or 0.0) + energy_j
            self.energy_source = label
        co2_g = window.co2_g()
        if co2_g is not None:
            self.co2_g_total = (self.co2_g_total or 0.0) + co2_g

    def totals(self) -> dict:
        """The running figures, each with its source label (for the live dashboard)."""
        return {"last_j_per_request": self.last_j_per_request, "energy_source": self.energy_source,
                "energy_j_total": self.energy_j_total, "co2_g_total": self.co2_g_total,
                "co2_source": "estimated:codecarbon" if self.co2_g_total is not None else "none",
                "window_s": self.window_s, "windows": self.windows}
