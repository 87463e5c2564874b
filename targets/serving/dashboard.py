"""``/dashboard`` on the gateway: a live page of the controller at work, served by the gateway itself.

:func:`install_dashboard` adds to a gateway app

* ``GET /dashboard``: the page (HTML, the chart library vendored in ``targets/serving/static/dashboard``:
  uPlot, MIT; no CDN, no build step, no request to any other host);
* ``GET /dashboard/state?since=SEQ``: the live state as JSON (see :mod:`targets.serving.live`), the points
  after ``SEQ`` and the current figures; the page polls it twice a second;
* ``GET /dashboard/static/{file}``: the page's script, style and chart library;
* the live state (:class:`targets.serving.live.LiveState`) that the gateway's infer lane
  (:mod:`targets.serving.infer_lane`) hands every ``POST …/infer`` to after answering it: its status,
  latency, answer body and the client's ``X-Green-MLOps-Label`` header (if any).

With the gateway's Prometheus ``registry``, the same live figures are exported for Prometheus and
Grafana (:class:`LiveCollector`): energy per request and cumulative energy and CO2, each with a
``source`` label, the labelled rows and how many were answered right, and rows by exit depth.
A figure that is not known has its family declared and no sample (never a 0 standing for "unknown").

The energy feed is looked up at request time in ``app.state.energy_feed`` (set by ``serve`` when
an energy source reads), so the page says "not known" rather than 0 when there is none.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from targets.serving.live import LABEL_HEADER, LiveState

STATIC_DIR = Path(__file__).resolve().parent / "static" / "dashboard"
STATIC_FILES = {  # what /dashboard/static serves, and nothing else
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "uPlot.LICENSE": "text/plain",
}


class LiveCollector:
    """Prometheus families computed at scrape time from the live state and the energy feed."""

    def __init__(self, live: LiveState, energy):
        self.live, self.energy = live, energy

    def describe(self):
        return []  # families are declared at collect time; nothing to check at registration

    def collect(self):
        energy = self.energy() or {}
        source = energy.get("energy_source") or "none"
        per_request = GaugeMetricFamily("green_mlops_energy_per_request_joules",
                                        "Energy per answered request over the latest window, by source "
                                        "(measured: NVML/RAPL; estimated: CodeCarbon)", labels=["source"])
        total = CounterMetricFamily("green_mlops_energy_joules", "Energy since the gateway started, by source",
                                    labels=["source"])
        co2 = CounterMetricFamily("green_mlops_co2_grams", "CO2 since the gateway started (CodeCarbon: estimated)",
                                  labels=["source"])
        if energy.get("last_j_per_request") is not None:
            per_request.add_metric([source], energy["last_j_per_request"])
        if energy.get("energy_j_total") is not None:
            total.add_metric([source], energy["energy_j_total"])
        if energy.get("co2_g_total") is not None:
            co2.add_metric([energy.get("co2_source") or "estimated:codecarbon"], energy["co2_g_total"])
        totals = self.live.totals()
        labelled = CounterMetricFamily("green_mlops_labelled_rows",
                                       f"Rows whose label the client sent ({LABEL_HEADER} header)")
        labelled.add_metric([], totals["scored"])
        correct = CounterMetricFamily("green_mlops_labelled_correct_rows",
                                      "Labelled rows answered with the right class (rejections count as wrong)")
        correct.add_metric([], totals["correct"])
        depth = CounterMetricFamily("green_mlops_exit_depth_rows",
                                    "Answered rows by the number of stages they ran (1: first exit)", labels=["depth"])
        for key, value in totals["exit_depth_counts"].items():
            depth.add_metric([key], value)
        slo = GaugeMetricFamily("green_mlops_slo_seconds", "The latency objective the controller compares p95 with")
        if self.live.slo_ms is not None:
            slo.add_metric([], self.live.slo_ms / 1e3)
        yield from (per_request, total, co2, labelled, correct, depth, slo)


def reference_accuracy(spec) -> tuple[float, str] | None:
    """The full model's held-out accuracy recorded by the model's build (model.json), if any."""
    accuracy = ((spec.meta or {}).get("build") or {}).get("accuracy") or {}
    value = accuracy.get("heldout_full")
    if isinstance(value, (int, float)) and 0 <= value <= 1:
        return float(value), "held-out, recorded in model.json by the model's build"
    return None


def install_dashboard(app: FastAPI, spec, controller, provider: str, registry=None) -> LiveState:
    """Add the dashboard's routes to a gateway ``app`` (and, given the gateway's Prometheus
    ``registry``, the live figures to its ``/metrics``); returns its live state, which the caller
    feeds with every infer request (``LiveState.observe``)."""

    def energy():
        feed = getattr(app.state, "energy_feed", None)
        return feed.totals() if feed is not None else None

    live = LiveState(
        model=spec.name, provider=provider,
        controller_state=None if controller is None else controller.state,
        energy=energy,
        slo_ms=None if controller is None else controller.config.slo_ms,
        reference_accuracy=reference_accuracy(spec),
    )
    app.state.live = live
    if registry is not None:
        registry.register(LiveCollector(live, energy))
    page = (STATIC_DIR / "index.html").read_text()

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard_page():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/state", include_in_schema=False)
    async def dashboard_state(since: int = Query(0, ge=0)):
        return JSONResponse(live.snapshot(since), headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def dashboard_static(name: str):
        if name not in STATIC_FILES:
            return JSONResponse({"error": f"no dashboard file '{name}'"}, status_code=404)
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    return live
