// The live dashboard: polls dashboard/state (same origin, relative URL) twice a second and draws
// the points with uPlot. No other host is contacted. window.dashboard exposes the page's state
// (points, charts, updates) for tests and for curious users.
"use strict";
(function () {
  const POLL_MS = 500;
  const MAX_POINTS = 900;
  const points = [];
  const charts = {};
  const page = { points, charts, updates: 0, errors: 0, last: null, since: 0 };
  window.dashboard = page;

  const $ = (id) => document.getElementById(id);
  const fmt = (v, digits = 2, unit = "") => (v === null || v === undefined || Number.isNaN(v)) ? "–" : v.toFixed(digits) + unit;
  const pct = (v, digits = 1) => (v === null || v === undefined) ? "–" : (100 * v).toFixed(digits) + " %";
  const col = (key, f) => points.map((p) => { const v = f ? f(p) : p[key]; return (v === null || v === undefined) ? null : v; });
  const COLOURS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#65a30d", "#db2777"];

  function sourceBadge(el, label, note) {
    const kind = !label || label === "none" ? "none" : label.split(":")[0];
    el.className = "badge " + (kind === "measured" || kind === "estimated" ? kind : "none");
    el.textContent = !label || label === "none" ? (note || "not known") : label.replace("+", " + ");
  }

  function width(el) { return Math.max(el.clientWidth - 4, 300); }

  function makeChart(id, series, scales) {
    const el = $(id);
    const opts = {
      width: width(el), height: 200,
      scales: Object.assign({ x: { time: true } }, scales || {}),
      axes: [{}].concat(Object.keys(scales || { y: {} }).filter((k) => k !== "x").map((k, i) => ({
        scale: k, side: i === 0 ? 3 : 1, grid: { show: i === 0 },
      }))),
      series: [{}].concat(series.map((s, i) => Object.assign({ stroke: COLOURS[i % COLOURS.length], width: 1.5, spanGaps: false }, s))),
      legend: { live: true },
    };
    el.innerHTML = "";
    return new uPlot(opts, [[]].concat(series.map(() => [])), el);
  }

  function tauSeries() {
    const last = [...points].reverse().find((p) => Array.isArray(p.tau));
    return last ? last.tau.length : 0;
  }

  function ensureCharts() {
    if (!charts.throughput) {
      charts.throughput = makeChart("chart-throughput", [
        { label: "requests/s" }, { label: "answered/s" }, { label: "rejected/s" }, { label: "failed/s" }]);
      charts.latency = makeChart("chart-latency", [
        { label: "p50 ms" }, { label: "p95 ms" }, { label: "p99 ms" }, { label: "SLO ms", dash: [6, 4] }]);
      charts.depth = makeChart("chart-depth", [
        { label: "exit depth", scale: "depth" }, { label: "shed rate", scale: "rate" }],
        { depth: { range: (u, lo, hi) => [0, Math.max(2, hi || 2)] }, rate: { range: [0, 1] } });
      charts.energy = makeChart("chart-energy", [
        { label: "J/request", scale: "j" }, { label: "ê", scale: "norm" }],
        { j: {}, norm: { range: [0, 1] } });
      charts.co2 = makeChart("chart-co2", [
        { label: "CO₂ g (estimated)", scale: "g" }, { label: "accuracy", scale: "acc" }],
        { g: {}, acc: { range: [0, 1] } });
    }
    const n = tauSeries();
    if (!charts.tau || charts.tauExits !== n) {
      const series = [];
      for (let i = 0; i < n; i++) series.push({ label: n > 1 ? "τ exit " + (i + 1) : "τ", scale: "tau" });
      series.push({ label: "admission", scale: "tau" });
      charts.tau = makeChart("chart-tau", series, { tau: {} });
      charts.tauExits = n;
    }
  }

  function draw() {
    ensureCharts();
    const x = points.map((p) => p.t);
    charts.throughput.setData([x, col("rps"), col("answered_rps"), col("rejected_rps"), col("failed_rps")]);
    charts.latency.setData([x, col("p50_ms"), col("p95_ms"), col("p99_ms"), col("slo_ms")]);
    const tau = [x];
    for (let i = 0; i < charts.tauExits; i++) tau.push(col(null, (p) => Array.isArray(p.tau) ? p.tau[i] : null));
    tau.push(col("admission_rate"));
    charts.tau.setData(tau);
    charts.depth.setData([x, col("exit_depth_mean"), col("shed_rate")]);
    charts.energy.setData([x, col("energy_j_per_request"), col("energy_norm")]);
    charts.co2.setData([x, col("co2_g_total"), col("accuracy")]);
  }

  function tiles(s) {
    const last = s.latest || {};
    const t = s.totals || {};
    $("identity").textContent = `model ${s.model} · controller ${s.controller}` +
      (s.policy ? ` (${s.policy})` : "") + ` · ${s.provider} · ${t.requests} requests since start`;
    $("v-rps").textContent = fmt(last.rps, 1);
    $("s-rps").textContent = `answered ${fmt(last.answered_rps, 1)}/s · failed ${fmt(last.failed_rps, 1)}/s`;
    $("v-latency").textContent = `${fmt(last.p50_ms, 1)} / ${fmt(last.p95_ms, 1)} ms`;
    $("v-latency").classList.toggle("over", s.slo_ms != null && last.p95_ms != null && last.p95_ms > s.slo_ms);
    $("s-latency").textContent = (s.slo_ms != null ? `SLO ${s.slo_ms} ms · ` : "no SLO · ") +
      `last ${s.window_s} s (${last.window_n ?? 0} requests)`;
    const tau = last.tau;
    $("tau-kind").textContent = Array.isArray(tau) && tau.length > 1 ? `(${tau.length} exits)` : "";
    $("v-tau").textContent = Array.isArray(tau) ? tau.map((v) => v.toFixed(3)).join(" · ") : "–";
    const cfg = (s.controller_state || {}).config || {};
    $("s-tau").textContent = s.controller === "off" ? "controller off" :
      `τ0 ${fmt(cfg.tau0, 3)} → τ∞ ${Array.isArray(cfg.tau_inf) ? cfg.tau_inf.map((v) => v.toFixed(3)).join("/") : fmt(cfg.tau_inf, 3)}`;
    $("v-admission").textContent = pct(last.admission_rate);
    $("s-admission").textContent = `since start ${pct(t.admission_rate)}`;
    $("v-depth").textContent = fmt(last.exit_depth_mean, 2);
    $("s-depth").textContent = Object.entries(t.exit_depth_counts || {}).map(([k, v]) => `${k}: ${v}`).join(" · ");
    $("v-signals").textContent = s.controller === "off" ? "–" : `${fmt(last.energy_norm, 3)} / ${fmt(last.congestion, 3)}`;
    const e = s.energy || {};
    $("s-signals").textContent = s.controller === "off" ? "controller off" :
      "ê source: " + (((s.controller_state || {}).energy_source) || "none");
    $("v-energy").textContent = e.last_j_per_request == null ? "–" : fmt(e.last_j_per_request, 4, " J");
    sourceBadge($("energy-source"), e.energy_source, e.note ? "not known: no energy feed" : "no reading yet");
    $("v-co2").textContent = e.co2_g_total == null ? "–" : fmt(e.co2_g_total, 4, " g");
    sourceBadge($("co2-source"), e.co2_source, "not known");
    $("v-shed").textContent = pct(last.shed_rate);
    $("s-shed").textContent = `${t.rejected} rejected · ${t.failed} failed · ${t.client_errors} bad input`;
    $("v-accuracy").textContent = t.scored ? pct(t.correct / t.scored, 2) : "–";
    $("s-accuracy").textContent = t.scored ? `${t.scored} labelled rows` : "no labels sent: not known";
  }

  function verdict(s) {
    const body = $("verdict").tBodies[0];
    body.innerHTML = "";
    for (const line of s.verdict || []) {
      const row = body.insertRow();
      row.insertCell().textContent = line.name;
      const badge = document.createElement("span");
      badge.className = "badge " + line.status;
      badge.textContent = line.status === "not_held" ? "not held" : line.status;
      row.insertCell().appendChild(badge);
      row.insertCell().textContent = line.detail;
    }
    const c = s.counterfactual || {};
    $("counterfactual").textContent = c.known
      ? `Under ${c.other}: of ${c.rows} decisions, ${c.more_admitted} more admitted and ${c.fewer_admitted} fewer ` +
        `(${pct(c.differ_rate)} differ)` + (c.shed ? `; it would also have decided the ${c.shed} requests shed here` : "") +
        `. ${c.basis || ""}`
      : `Not known: ${c.reason}`;
  }

  function setLink(ok, text) {
    const el = $("link");
    el.className = "badge " + (ok ? "live" : "stale");
    el.textContent = text;
  }

  async function poll() {
    try {
      const response = await fetch("dashboard/state?since=" + page.since, { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const s = await response.json();
      for (const p of s.points) points.push(p);
      if (points.length > MAX_POINTS) points.splice(0, points.length - MAX_POINTS);
      if (s.points.length) page.since = s.points[s.points.length - 1].seq;
      page.last = s;
      tiles(s);
      verdict(s);
      draw();
      page.updates += 1;
      setLink(true, "live · " + new Date(s.now * 1000).toLocaleTimeString());
    } catch (err) {
      page.errors += 1;
      setLink(false, "no answer from the gateway (" + err.message + ")");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  window.addEventListener("resize", () => {
    for (const key of ["throughput", "latency", "tau", "depth", "energy", "co2"]) {
      const chart = charts[key];
      if (chart) chart.setSize({ width: width(chart.root.parentElement), height: 200 });
    }
  });
  poll();
})();
