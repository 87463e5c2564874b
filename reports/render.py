"""Writing a report: ``report.html`` (self-contained, plots inline), ``report.md`` (plots beside
it as PNG files), ``summary.json``, and the rich console summary."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reports.console import wide_console
from reports import plots, slo_plot
from reports.runs import Run
from reports.verdict import HELD, NOT_HELD
from targets.control.calibration import rule_line

PLOT_TITLES = {
    "latency_cdf": "Latency CDF, standard vs bio",
    "over_time": "Latency, τ(t) and admission rate over time, with the load",
    "power": "Power over time",
    "admission_accuracy": "Admission–accuracy curve, oracle bound and the paper's point",
    "throughput_energy": "Throughput vs energy per request",
    "slo_over_time": "Budget policy over time: p95 against the SLO, shed rate, exit threshold under the certified ceiling",
}


def make_plots(runs: list[Run], summary: dict) -> dict[str, bytes]:
    """Every plot from the recorded runs and their reference answers; no model is run."""
    figures = list(summary["runs"].values())
    comparison = summary["comparison"]
    measured = []
    if comparison is not None and comparison.get("accuracy_loss_pp") is not None:
        measured.append((comparison["bio_run"], comparison["admission_rate"], comparison["accuracy_loss_pp"]))
    bio = next((r for r in reversed(runs) if r.scenario == "bio" and r.reference), None)
    reference = bio.reference if bio else next((r.reference for r in runs if r.reference), None)
    measure = (((bio.metadata.get("controller_state_at_end") or {}).get("config") or {}).get("uncertainty")
               if bio else None) or "entropy"
    made = {
        "latency_cdf": plots.latency_cdf(runs),
        "over_time": plots.over_time(runs, None if comparison is None else comparison.get("warmup_s")),
        "power": plots.power_over_time(runs),
        "admission_accuracy": plots.admission_accuracy(plots.reference_tradeoff(reference, measure), measured),
        "throughput_energy": plots.throughput_energy(figures),
        "slo_over_time": slo_plot.slo_over_time(runs),
    }
    return {name: png for name, png in made.items() if png is not None}


def _num(value, spec=".2f") -> str:
    return "–" if value is None else format(value, spec)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _run_rows(summary: dict) -> list[list[str]]:
    rows = []
    for f in summary["runs"].values():
        energy = "–" if f["energy_per_request_j"] is None else f"{1e3 * f['energy_per_request_j']:.3f} mJ ({f['energy_source']})"
        co2 = "–" if f["co2_g_per_1k_requests"] is None else f"{f['co2_g_per_1k_requests']:.2e} g ({f['co2_source']})"
        achieved = ("closed loop" if f["achieved_fraction"] is None else
                    f"{f['achieved_rps']:.1f}/{f['schedule']['requested_rps']:.1f} req/s")
        rows.append([f["name"], f["scenario"], str(f["n"]), str(f["answered"]), str(f["rejected"]), str(f["failed"]),
                     str(f["cut_off"]), str(f["late"]), achieved, _num(f["throughput_rps"], ".1f"),
                     _num(f["p50_ms"]), _num(f["p95_ms"]), _num(f["p99_ms"]), _pct(f["accuracy"]),
                     _pct(f["admission_rate"]), energy, co2])
    return rows


RUN_HEADER = ["run", "scenario", "sent", "answered", "rejected", "failed", "cut off", "late", "achieved / requested",
              "answered/s", "p50 ms", "p95 ms", "p99 ms", "accuracy", "admitted", "energy/request",
              "CO2 / 1k requests"]
PHASE_HEADER = ["run", "phase", "n", "req/s", "p50 ms", "p95 ms", "p99 ms", "admitted", "accuracy", "rejected",
                "failed", "late"]
CLAIM_HEADER = ["claim", "target", "measured", "one-sided 95 % bounds", "n (standard, bio)", "status"]


def _phase_rows(summary: dict) -> list[list[str]]:
    return [[f["name"], p["phase"], str(p["n"]), _num(p["throughput_rps"], ".1f"), _num(p["p50_ms"]),
             _num(p["p95_ms"]), _num(p["p99_ms"]), _pct(p["admission_rate"]), _pct(p["accuracy"]),
             str(p["rejected"]), str(p.get("failed", 0)), str(p["late"])]
            for f in summary["runs"].values() for p in f["phases"]]


def _claim_rows(claims: list[dict]) -> list[list[str]]:
    rows = []
    for c in claims:
        bounds = "–" if c.get("bounds95") is None else f"{c['bounds95'][0]:.2f} … {c['bounds95'][1]:.2f}"
        rows.append([c["name"], c["target"], _num(c["measured"]), bounds, str(c.get("n", "–")),
                     c["status"] + (f" ({c['reason']})" if c.get("reason") else "")])
    return rows


def _failure_lines(summary: dict) -> list[str]:
    return [f"{f['name']}: {reason} ×{n}" for f in summary["runs"].values()
            for reason, n in sorted(f["failure_reasons"].items(), key=lambda kv: -kv[1])]


def _ablation_lines(summary: dict) -> list[str]:
    a = summary.get("ablation")
    if not a:
        return []
    if "latency_reduction_bounds95_pct" not in a:  # an ablation recorded before the bounds: its two-sided intervals
        lo, hi = a.get("latency_reduction_ci95_pct") or (float("nan"),) * 2
        alo, ahi = a.get("accuracy_loss_ci95_pp") or (float("nan"),) * 2
        return [f"In-process (recorded before one-sided bounds): latency reduction {a['latency_reduction_pct']:.1f} % "
                f"(two-sided 95 % CI {lo:.1f} … {hi:.1f}); accuracy loss {a['accuracy_loss_pp']:.2f} pp (two-sided "
                f"95 % CI {alo:.2f} … {ahi:.2f})"]
    lo, hi = a["latency_reduction_bounds95_pct"]
    alo, ahi = a["accuracy_loss_bounds95_pp"]
    energy = ("not measured" if a.get("energy_reduction_pct") is None
              else f"{a['energy_reduction_pct']:.1f} % ({a['standard']['energy_source']}"
                   + (", an estimate: a throughput ratio, not a measurement)" if
                      str(a["standard"]["energy_source"]).startswith("estimated") else ")"))
    return [
        f"In-process, paired, batch 1, closed loop: {a['standard']['n_requests']} requests per mode on "
        f"{a['model']} ({a['provider']}), the same requests in both modes.",
        f"latency reduction {a['latency_reduction_pct']:.1f} % (one-sided 95 % bounds {lo:.1f} … {hi:.1f}, over "
        f"interleaved time blocks); accuracy loss {a['accuracy_loss_pp']:.2f} pp (one-sided 95 % bounds {alo:.2f} … "
        f"{ahi:.2f}, the wider of exact Clopper–Pearson on rows harmed and fixed and a cluster bootstrap over rows); "
        f"admission rate {_pct(a['admission_rate'])}; energy reduction {energy}",
        *([rule_line(a["calibration_rule"])] if a.get("calibration_rule") else []),
    ]


def _comparison_lines(summary: dict) -> list[str]:
    c = summary["comparison"]
    if c is None:
        return ["Standard vs bio: not measurable (needs one standard and one bio run)."]
    lines = [f"Standard ({c['standard_run']}, n={c['n_standard']} answered after the warm-up) vs bio "
             f"({c['bio_run']}, n={c['n_bio']}):"]
    if not c["open_loop"]:
        lines.append("closed loop: unequal offered load (the faster mode receives more requests); "
                     "shown, but no claim rests on it.")
    for difference in c["condition_differences"]:
        lines.append(f"conditions differ: {difference}")
    warm = c["warmup_excluded"]
    lines.append(f"warm-up: {_num(c['warmup_s'], '.2f')} s ({c['warmup_rule']}); excluded from the claims "
                 f"in both runs: standard {warm['standard']}, bio {warm['bio']} requests")
    if c["latency_reduction_pct"] is not None:
        lo, hi = c["latency_reduction_bounds95_pct"]
        lines.append(f"latency reduction {c['latency_reduction_pct']:.1f} % (one-sided 95 % bounds {lo:.1f} … {hi:.1f}, "
                     f"{c.get('latency_bound_method')}); p95 reduction {_num(c['p95_reduction_pct'], '.1f')} %")
    for k, r in enumerate(c.get("replicates") or [], start=1):
        rlo, rhi = r["latency_reduction_bounds95_pct"] or (None, None)
        lines.append(f"replicate {k} (schedule seed {r['schedule_seed']}, {r['standard_run']} vs {r['bio_run']}): "
                     f"latency reduction {_num(r['latency_reduction_pct'], '.1f')} % ({_num(rlo, '.1f')} … "
                     f"{_num(rhi, '.1f')} within the run), accuracy loss {_num(r['accuracy_loss_pp'])} pp")
    if c.get("accuracy_loss_pp") is not None:
        alo, ahi = c["accuracy_loss_bounds95_pp"]
        if c.get("accuracy_paired"):
            detail = c.get("accuracy_loss_detail") or {}
            lines.append(f"accuracy loss {c['accuracy_loss_pp']:.2f} pp (one-sided 95 % bounds {alo:.2f} … {ahi:.2f}, "
                         f"the wider of exact Clopper–Pearson on {_num(detail.get('rows_harmed'), 'g')} rows harmed and "
                         f"{_num(detail.get('rows_fixed'), 'g')} fixed and a cluster "
                         f"bootstrap over {c['rows_covered']} evaluation rows), paired with the full model's "
                         f"answer for each request's row; {c['rejected_scored_wrong']} rejections scored as wrong; "
                         f"standard's answers match the reference on {_pct(c.get('standard_matches_reference'))}")
        else:
            lines.append(f"accuracy loss {c['accuracy_loss_pp']:.2f} pp (one-sided 95 % bounds {alo:.2f} … {ahi:.2f}), unpaired: "
                         "the runs carry no reference answers")
    energy = ("not measured" if c["energy_reduction_pct"] is None
              else f"{c['energy_reduction_pct']:.1f} % ({c['energy_source']}"
                   + (", an estimate from time and utilisation: a throughput ratio in disguise" if "estimated" in
                      c["energy_source"] else "")
                   + ("; includes the load generator" if c.get("energy_includes_load_generator") else "") + ")")
    fed = c.get("gateway_energy_fed")
    lines.append(f"energy reduction per answered request {energy}; bio's controller fed ê from "
                 f"{fed if fed else 'nothing (β·ê was 0)'}; admission rate {_pct(c['admission_rate'])}, "
                 f"rejection rate {_pct(c['rejection_rate'])}")
    return lines


POLICY_HEADER = ["run", "policy", "latency reduction %", "accuracy loss pp (one-sided 95 % bounds)", "accuracy spent pp (shed and rejected lost)",
                 "on answers alone pp", "budget pp (held)", "p95 ms / SLO ms (held)", "admitted", "shed"]


def _yes_no(value) -> str:
    return "–" if value is None else "yes" if value else "NO"


def _policy_rows(summary: dict) -> list[list[str]]:
    """One row per bio run under the same schedule: what each policy did and what it promised."""
    rows = []
    for row in summary.get("policies", []):
        ci = row.get("accuracy_loss_bounds95_pp")
        loss = _num(row["accuracy_loss_pp"]) + (f" ({_num(ci[0])} … {_num(ci[1])})" if ci else "")
        budget = ("–" if row["budget_pp"] is None else
                  f"{row['budget_pp']:g} ({(row.get('budget_status') or '–').replace('_', ' ')})")
        slo = (_num(row["p95_ms"], ".1f") if row["slo_p95_ms"] is None else
               f"{_num(row['p95_ms'], '.1f')} / {row['slo_p95_ms']:g} ({_yes_no(row['held_slo'])})")
        shed = f"{row['shed']} ({_pct(row['shed_rate'])})"
        rows.append([row["run"], row["policy"], _num(row["latency_reduction_pct"]), loss,
                     _num(row["accuracy_spent_pp"]), _num(row.get("accuracy_spent_answered_pp")), budget, slo, _pct(row["admission_rate"]), shed])
    return rows


POLICIES_MEANING = ("Each bio run against the same standard run, under the same schedule. 'accuracy spent' is the "
                    "paired loss over answered requests only: what the controller's early exits cost; shed and "
                    "rejected requests are counted apart (and scored as wrong in the claims). A budget is held "
                    "when the upper one-sided 95 % bound of the accuracy spent is within it (not held when the "
                    "lower bound is past it, else inconclusive); an SLO when bio's p95 is within it.")


def _conditions(summary: dict) -> list[list[str]]:
    rows = []
    for f in summary["runs"].values():
        c = f["conditions"]
        versions = ", ".join(f"{k} {v}" for k, v in (c.get("versions") or {}).items())
        machine = c.get("machine") or {}
        schedule = f.get("schedule")
        load = f"{c.get('shape')} " + (f"open loop, schedule {schedule['digest']} ({schedule['n_scheduled']} arrivals, "
                                       f"seed {schedule['seed']})" if schedule else
                                       "open loop" if c.get("open_loop") else "closed loop")
        rows.append([f["name"], str(c.get("model")), str(c.get("provider")), str(c.get("controller")), load,
                     f"{machine.get('platform', '?')}, {machine.get('cpus', '?')} CPUs{_cpu_sets(machine)}", versions])
    return rows


def offered_load_line(offered: dict | None) -> str | None:
    """One sentence on how validate sized the open-loop rate to the machine (None: not sized)."""
    if not offered or offered.get("source") != "auto":
        return None
    probe = offered.get("probe") or {}
    limit = ("the ceiling" if offered.get("capped") else
             f"{100 * offered.get('utilisation', 0):.0f} % of that at the shape's {offered.get('peak_factor', 0):g}x peak")
    stretch = offered.get("duration_stretch") or 1.0
    return (f"Offered load sized to this machine: {offered['arrival_rate_rps']:g} req/s base ({offered.get('target')}: "
            f"mean round trip {probe.get('mean_ms', 0):.2f} ms over {probe.get('requests', 0)} requests one at a "
            f"time, about {probe.get('capacity_rps', 0):.0f} req/s; {limit}, at most {offered.get('ceiling_rps', 0):g} "
            f"req/s; the peak asks for {100 * offered.get('peak_utilisation', 0):.0f} % of it)"
            + (f"; runs and phases {stretch:.2f}x longer" if stretch > 1 else "") + ".")


def _cpu_sets(machine: dict) -> str:
    """Where Locust and the gateway ran (run.json's machine.cpu_sets), after the CPU count."""
    sets = machine.get("cpu_sets")
    if isinstance(sets, dict):
        return f"; Locust on CPU {sets.get('load_generator')}, gateway on CPU {sets.get('gateway')}"
    return f"; {sets}" if isinstance(sets, str) else ""


CONDITION_HEADER = ["run", "model", "provider", "controller", "load", "machine", "versions"]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(summary: dict) -> str:
    return "VALID" if summary["valid"] else "INVALID"


VALIDITY_MEANING = ("VALID/INVALID judges the load test's measurement (same conditions, offered load achieved, "
                    "failures ≤ 0.1 %, sends on time, long and stable enough), not whether the claims held.")


def render_html(summary: dict, pngs: dict[str, bytes]) -> str:
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in summary["invalid_reasons"])
    regressions = "".join(f"<li>{html.escape(r)}</li>" for r in summary.get("regressions", []))
    failures = "".join(f"<li>{html.escape(line)}</li>" for line in _failure_lines(summary))
    offered = offered_load_line(summary.get("offered_load"))
    figures = "".join(
        f'<figure><img alt="{html.escape(PLOT_TITLES[name])}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(PLOT_TITLES[name])}</figcaption></figure>'
        for name, png in pngs.items())
    colour = "#1a7f37" if summary["valid"] else "#b42318"
    ablation = ""
    if summary.get("ablation"):
        ablation = (f"<h2>In-process ablation</h2>{''.join(f'<p>{html.escape(x)}</p>' for x in _ablation_lines(summary))}"
                    f"{_html_table(CLAIM_HEADER, _claim_rows(summary['ablation_claims']))}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>green-mlops report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }}
th {{ background: #f6f8fa; }} td:first-child, th:first-child {{ text-align: left; }}
.verdict {{ font-size: 1.6em; font-weight: bold; color: {colour}; }}
.line {{ font-weight: bold; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #d0d7de; }}
</style></head><body>
<h1>green-mlops report</h1>
<p class="verdict">load test {_verdict(summary)}</p>
<p>{html.escape(VALIDITY_MEANING)}</p>
{f"<ul>{reasons}</ul>" if reasons else "<p>All validity rules hold.</p>"}
{f"<h2>Regressions against the baseline</h2><ul>{regressions}</ul>" if regressions else ""}
{ablation}
<h2>Load test: claims (paper: −42 % latency, ≤ 0.5 pp accuracy loss)</h2>
{_html_table(CLAIM_HEADER, _claim_rows(summary["claims"]))}
{(f"<h2>Policies under the same schedule</h2><p>{html.escape(POLICIES_MEANING)}</p>"
   + _html_table(POLICY_HEADER, _policy_rows(summary))) if summary.get("policies") else ""}
<h2>Standard vs bio under load</h2>
{"".join(f"<p>{html.escape(line)}</p>" for line in _comparison_lines(summary))}
<h2>Runs</h2>
{_html_table(RUN_HEADER, _run_rows(summary))}
{f"<h2>Failures</h2><ul>{failures}</ul>" if failures else ""}
<h2>Per load phase</h2>
{_html_table(PHASE_HEADER, _phase_rows(summary))}
<h2>Run conditions</h2>
{_html_table(CONDITION_HEADER, _conditions(summary))}
{f"<p>{html.escape(offered)}</p>" if offered else ""}
<h2>Plots</h2>
{figures or "<p>No plots: no answered requests.</p>"}
<h2>Verdict</h2>
<p class="line">{html.escape(summary["verdict"])}</p>
</body></html>
"""


def render_markdown(summary: dict, png_names: list[str]) -> str:
    ablation = []
    if summary.get("ablation"):
        ablation = ["## In-process ablation", "", *_ablation_lines(summary), "",
                    _md_table(CLAIM_HEADER, _claim_rows(summary["ablation_claims"])), ""]
    failures = _failure_lines(summary)
    offered = offered_load_line(summary.get("offered_load"))
    parts = [
        "# green-mlops report", "", f"**load test {_verdict(summary)}**", "", VALIDITY_MEANING, "",
        *[f"- {r}" for r in summary["invalid_reasons"]], "",
        *(["Regressions against the baseline:", *[f"- {r}" for r in summary["regressions"]], ""]
          if summary.get("regressions") else []),
        *ablation,
        "## Load test: claims", "", _md_table(CLAIM_HEADER, _claim_rows(summary["claims"])), "",
        *(["## Policies under the same schedule", "", POLICIES_MEANING, "",
           _md_table(POLICY_HEADER, _policy_rows(summary)), ""] if summary.get("policies") else []),
        "## Standard vs bio under load", "", *[f"- {line}" for line in _comparison_lines(summary)], "",
        "## Runs", "", _md_table(RUN_HEADER, _run_rows(summary)), "",
        *(["## Failures", "", *[f"- {line}" for line in failures], ""] if failures else []),
        "## Per load phase", "", _md_table(PHASE_HEADER, _phase_rows(summary)), "",
        "## Run conditions", "", _md_table(CONDITION_HEADER, _conditions(summary)), "",
        *([offered, ""] if offered else []),
        "## Plots", "",
        *[f"![{PLOT_TITLES[name]}]({name}.png)" for name in png_names], "",
        "## Verdict", "", f"**{summary['verdict']}**",
    ]
    return "\n".join(parts) + "\n"


def write_report(out: Path, summary: dict, pngs: dict[str, bytes]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    for name, png in pngs.items():
        (out / f"{name}.png").write_bytes(png)
    paths = [out / "report.html", out / "report.md", out / "summary.json"]
    paths[0].write_text(render_html(summary, pngs))
    paths[1].write_text(render_markdown(summary, list(pngs)))
    paths[2].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return paths


def _claims_table(title: str, claims: list[dict]) -> Table:
    """Claims, one row each; the reasons print below the table (they are sentences)."""
    table = Table(title=title)
    for column in ("claim", "target", "measured", "95 % bounds", "status"):
        table.add_column(column, no_wrap=column in ("claim", "status"))
    for row, c in zip(_claim_rows(claims), claims):
        colour = {HELD: "green", NOT_HELD: "red"}.get(c["status"], "yellow")
        table.add_row(*[escape(cell) for cell in row[:4]], f"[{colour}]{escape(c['status'])}[/]")
    return table


def print_report(summary: dict, console: Console | None = None, verdict: bool = True) -> None:
    """The report on the console; it ends with the one verdict line (``verdict=False``: the
    caller prints it last, after its own lines)."""
    console = console or wide_console()
    style = "bold green" if summary["valid"] else "bold red"
    console.print(f"[{style}]load test {_verdict(summary)}[/]")
    for reason in summary["invalid_reasons"]:
        console.print(f"  · {escape(reason)}", highlight=False)
    compact_runs = [[f["name"], str(f["n"]), str(f["answered"]), str(f["rejected"]), str(f["failed"]),
                     str(f["cut_off"]), str(f["late"]), _num(f["achieved_rps"], ".0f"), _num(f["p50_ms"], ".1f"),
                     _num(f["p95_ms"], ".1f"), _pct(f["accuracy"]), _pct(f["admission_rate"])]
                    for f in summary["runs"].values()]
    table = Table(title="load test runs (latency ms; every column in report.md)")
    for column in ["run", "sent", "ok", "rej", "fail", "cut", "late", "req/s", "p50", "p95", "acc", "admit"]:
        table.add_column(column, no_wrap=True)
    for row in compact_runs:
        table.add_row(*[escape(cell) for cell in row])
    console.print(table)
    console.print(_claims_table("claims under load", summary["claims"]))
    for c in summary["claims"]:
        if c.get("reason"):
            console.print(f"  {c['name']}: {c['status']}: {c['reason']}", highlight=False, markup=False)
    if summary.get("policies"):
        table = Table(title="policies under the same schedule")
        for column in ("run", "policy", "latency −%", "acc loss pp", "spent pp", "budget (held)", "p95/SLO (held)",
                       "admit", "shed"):
            table.add_column(column)
        for row in _policy_rows(summary):
            table.add_row(*[escape(cell) for cell in row])
        console.print(table)
    for line in _comparison_lines(summary):
        console.print(line, highlight=False, markup=False)
    for line in _failure_lines(summary):
        console.print(f"failure: {line}", highlight=False, markup=False)
    for regression in summary.get("regressions", []):
        console.print(f"[red]regression:[/] {escape(regression)}", highlight=False)
    if verdict:
        console.print(summary["verdict"], highlight=False, markup=False, soft_wrap=True)
