"""Writing a report: ``report.html`` (self-contained, plots inline), ``report.md`` (plots beside
it as PNG files), ``summary.json``, and the rich console summary."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from reports import plots
from reports.runs import Run
from reports.verdict import HELD, NOT_HELD

PLOT_TITLES = {
    "latency_cdf": "Latency CDF, standard vs bio",
    "over_time": "Latency, τ(t) and admission rate over time, with the load",
    "power": "Power over time",
    "admission_accuracy": "Admission–accuracy curve, oracle bound and the paper's point",
    "throughput_energy": "Throughput vs energy per request",
}


def make_plots(runs: list[Run], summary: dict) -> dict[str, bytes]:
    figures = list(summary["runs"].values())
    model = next((f["conditions"].get("model") for f in figures if f["conditions"].get("model")), None)
    comparison = summary["comparison"]
    measured = []
    if comparison is not None:
        measured.append((comparison["bio_run"], comparison["admission_rate"], comparison["accuracy_loss_pp"]))
    made = {
        "latency_cdf": plots.latency_cdf(runs),
        "over_time": plots.over_time(runs),
        "power": plots.power_over_time(runs),
        "admission_accuracy": plots.admission_accuracy(plots.model_tradeoff(model), measured),
        "throughput_energy": plots.throughput_energy(figures),
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
        rows.append([f["name"], f["scenario"], str(f["answered"]), _num(f["throughput_rps"], ".1f"),
                     _num(f["p50_ms"]), _num(f["p95_ms"]), _num(f["p99_ms"]), _pct(f["accuracy"]),
                     _pct(f["admission_rate"]), energy, co2])
    return rows


RUN_HEADER = ["run", "scenario", "answered", "req/s", "p50 ms", "p95 ms", "p99 ms", "accuracy", "admitted",
              "energy/request", "CO2 / 1k requests"]
PHASE_HEADER = ["run", "phase", "n", "req/s", "p50 ms", "p95 ms", "p99 ms", "admitted", "accuracy", "rejected", "late"]
CLAIM_HEADER = ["claim", "target", "measured", "95 % CI", "n (standard, bio)", "status"]


def _phase_rows(summary: dict) -> list[list[str]]:
    return [[f["name"], p["phase"], str(p["n"]), _num(p["throughput_rps"], ".1f"), _num(p["p50_ms"]),
             _num(p["p95_ms"]), _num(p["p99_ms"]), _pct(p["admission_rate"]), _pct(p["accuracy"]),
             str(p["rejected"]), str(p["late"])]
            for f in summary["runs"].values() for p in f["phases"]]


def _claim_rows(summary: dict) -> list[list[str]]:
    rows = []
    for c in summary["claims"]:
        ci = "–" if c.get("ci95") is None else f"{c['ci95'][0]:.2f} … {c['ci95'][1]:.2f}"
        rows.append([c["name"], c["target"], _num(c["measured"]), ci, str(c.get("n", "–")),
                     c["status"] + (f" ({c['reason']})" if c.get("reason") else "")])
    return rows


def _comparison_lines(summary: dict) -> list[str]:
    c = summary["comparison"]
    if c is None:
        return ["Standard vs bio: not measurable (needs one standard and one bio run)."]
    lo, hi = c["latency_reduction_ci95_pct"]
    alo, ahi = c["accuracy_loss_ci95_pp"]
    energy = ("not measured" if c["energy_reduction_pct"] is None
              else f"{c['energy_reduction_pct']:.1f} % ({c['energy_source']})")
    return [
        f"Standard ({c['standard_run']}, n={c['n_standard']}) vs bio ({c['bio_run']}, n={c['n_bio']}):",
        f"latency reduction {c['latency_reduction_pct']:.1f} % (95 % CI {lo:.1f} … {hi:.1f}); "
        f"p95 reduction {c['p95_reduction_pct']:.1f} %",
        f"accuracy loss {c['accuracy_loss_pp']:.2f} pp (95 % CI {alo:.2f} … {ahi:.2f})",
        f"energy reduction {energy}; bio admission rate {_pct(c['admission_rate'])}",
    ]


def _conditions(summary: dict) -> list[list[str]]:
    rows = []
    for f in summary["runs"].values():
        c = f["conditions"]
        versions = ", ".join(f"{k} {v}" for k, v in (c.get("versions") or {}).items())
        machine = c.get("machine") or {}
        rows.append([f["name"], str(c.get("model")), str(c.get("provider")), str(c.get("controller")),
                     f"{c.get('shape')} {'open loop' if c.get('open_loop') else 'closed loop'}",
                     f"{machine.get('platform', '?')}, {machine.get('cpus', '?')} CPUs", versions])
    return rows


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


def render_html(summary: dict, pngs: dict[str, bytes]) -> str:
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in summary["invalid_reasons"])
    regressions = "".join(f"<li>{html.escape(r)}</li>" for r in summary.get("regressions", []))
    figures = "".join(
        f'<figure><img alt="{html.escape(PLOT_TITLES[name])}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(PLOT_TITLES[name])}</figcaption></figure>'
        for name, png in pngs.items())
    colour = "#1a7f37" if summary["valid"] else "#b42318"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>green-mlops report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }}
th {{ background: #f6f8fa; }} td:first-child, th:first-child {{ text-align: left; }}
.verdict {{ font-size: 1.6em; font-weight: bold; color: {colour}; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #d0d7de; }}
.held {{ color: #1a7f37; }} .not_held {{ color: #b42318; }} .not_measurable {{ color: #9a6700; }}
</style></head><body>
<h1>green-mlops report</h1>
<p class="verdict">{_verdict(summary)}</p>
{f"<ul>{reasons}</ul>" if reasons else "<p>All validity rules hold.</p>"}
{f"<h2>Regressions against the baseline</h2><ul>{regressions}</ul>" if regressions else ""}
<h2>Claims (paper: −42 % latency, ≤ 0.5 pp accuracy loss)</h2>
{_html_table(CLAIM_HEADER, _claim_rows(summary))}
<h2>Standard vs bio</h2>
{"".join(f"<p>{html.escape(line)}</p>" for line in _comparison_lines(summary))}
<h2>Runs</h2>
{_html_table(RUN_HEADER, _run_rows(summary))}
<h2>Per load phase</h2>
{_html_table(PHASE_HEADER, _phase_rows(summary))}
<h2>Run conditions</h2>
{_html_table(CONDITION_HEADER, _conditions(summary))}
<h2>Plots</h2>
{figures or "<p>No plots: no answered requests.</p>"}
</body></html>
"""


def render_markdown(summary: dict, png_names: list[str]) -> str:
    parts = [
        "# green-mlops report", "", f"**{_verdict(summary)}**", "",
        *[f"- {r}" for r in summary["invalid_reasons"]], "",
        *(["Regressions against the baseline:", *[f"- {r}" for r in summary["regressions"]], ""]
          if summary.get("regressions") else []),
        "## Claims", "", _md_table(CLAIM_HEADER, _claim_rows(summary)), "",
        "## Standard vs bio", "", *_comparison_lines(summary), "",
        "## Runs", "", _md_table(RUN_HEADER, _run_rows(summary)), "",
        "## Per load phase", "", _md_table(PHASE_HEADER, _phase_rows(summary)), "",
        "## Run conditions", "", _md_table(CONDITION_HEADER, _conditions(summary)), "",
        "## Plots", "",
        *[f"![{PLOT_TITLES[name]}]({name}.png)" for name in png_names],
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


def print_report(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    style = "bold green" if summary["valid"] else "bold red"
    console.print(f"[{style}]{_verdict(summary)}[/]")
    for reason in summary["invalid_reasons"]:
        console.print(f"  · {reason}", highlight=False)
    compact_runs = [[f["name"], str(f["answered"]), _num(f["throughput_rps"], ".0f"), _num(f["p50_ms"]),
                     _num(f["p95_ms"]), _num(f["p99_ms"]), _pct(f["accuracy"]), _pct(f["admission_rate"]),
                     _num(None if f["energy_per_request_j"] is None else 1e3 * f["energy_per_request_j"], ".2f")]
                    for f in summary["runs"].values()]
    compact_header = ["run", "answered", "req/s", "p50", "p95", "p99", "acc", "admit", "mJ/req"]
    for name, header, rows in (("runs (latency ms)", compact_header, compact_runs),
                               ("claims", CLAIM_HEADER[:3] + CLAIM_HEADER[-1:],
                                [row[:3] + row[-1:] for row in _claim_rows(summary)])):
        table = Table(title=name)
        for column in header:
            table.add_column(column)
        for row in rows:
            if name.startswith("claims"):
                status = row[-1].split(" ")[0]
                colour = {HELD: "green", NOT_HELD: "red"}.get(status, "yellow")
                row = [*row[:-1], f"[{colour}]{row[-1]}[/]"]
            table.add_row(*row)
        console.print(table)
    for line in _comparison_lines(summary):
        console.print(line, highlight=False)
    sources = {f["energy_source"] for f in summary["runs"].values()}
    console.print(f"energy source: {', '.join(sorted(sources))}", highlight=False)
    for regression in summary.get("regressions", []):
        console.print(f"[red]regression:[/] {regression}", highlight=False)
