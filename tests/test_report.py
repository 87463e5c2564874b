"""`green-mlops report`: from real recorded runs and from hand-made edge cases."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from green_mlops.cli import main

ROOT = Path(__file__).resolve().parents[1]
VOID = {"meta", "img", "br", "hr", "link", "input"}


class StrictParser(HTMLParser):
    """Collects images and checks that every opened element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def parse_html(path: Path) -> StrictParser:
    parser = StrictParser()
    parser.feed(path.read_text())
    parser.close()
    assert not parser.errors and parser.stack == [], (parser.errors, parser.stack)
    return parser


@pytest.fixture(scope="module")
def recorded_runs(tmp_path_factory):
    """A standard and a bio run, each a real 6 s headless open-loop Locust run under a spike,
    replaying the same seeded schedule."""
    import os
    import signal

    root = tmp_path_factory.mktemp("runs")
    for scenario in ("standard", "bio"):
        process = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / f"{scenario}.py"),
                                    "--headless", "--shape", "spike", "--base-users", "2", "--phase-s", "2", "-t", "6",
                                    "--arrival-rate", "40", "--seed", "3", "--results", str(root / scenario)],
                                   cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr[-3000:]
        finally:  # the run and the gateway it started, whatever happened
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
    return root


def test_report_from_real_runs(recorded_runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(recorded_runs), "--out", str(out), "--min-duration-s", "3",
                 "--min-requests", "100"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"valid", "invalid_reasons", "claims", "runs", "comparison"}
    assert set(summary["runs"]) == {"standard", "bio"}
    assert [c["name"] for c in summary["claims"]] == ["latency_reduction", "accuracy_loss", "energy_reduction"]
    assert all(c["status"] in ("held", "not_held", "inconclusive") and c["bounds95"][0] <= c["measured"] <= c["bounds95"][1]
               for c in summary["claims"][:2])
    comparison = summary["comparison"]
    assert comparison["accuracy_paired"] and comparison["standard_matches_reference"] == 1.0
    assert comparison["condition_differences"] == []
    assert summary["runs"]["standard"]["schedule"]["digest"] == summary["runs"]["bio"]["schedule"]["digest"]
    assert summary["runs"]["standard"]["schedule"]["n_scheduled"] == summary["runs"]["bio"]["schedule"]["n_scheduled"]
    bio = summary["runs"]["bio"]
    assert {p["phase"] for p in bio["phases"]} == {"base", "spike", "recovery", "all"}
    assert bio["energy_source"].startswith(("measured:", "estimated:"))
    assert bio["conditions"]["provider"] == "CPUExecutionProvider"
    html = parse_html(out / "report.html")
    # Five plots, and the budget policy's over time: the locustfile's bio gateway runs the default policy.
    assert len(html.images) == 6 and html.images[-1]["alt"].startswith("Budget policy over time")
    for image in html.images:
        assert base64.b64decode(image["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    assert "| latency_reduction |" in markdown and "![" in markdown
    assert markdown.rstrip().splitlines()[-1] == f"**{summary['verdict']}**"  # one verdict line, at the end
    assert "VALID/INVALID judges the load test's measurement" in markdown
    assert all((out / f"{name}.png").exists() for name in ("latency_cdf", "over_time", "admission_accuracy"))


def test_gate_and_baseline_regression(recorded_runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(recorded_runs), "--out", str(out), "--min-duration-s", "3",
                 "--min-requests", "100"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    baseline = json.loads((out / "summary.json").read_text())
    baseline["comparison"]["latency_reduction_pct"] = summary["comparison"]["latency_reduction_pct"] + 20
    (tmp_path / "baseline.json").write_text(json.dumps(baseline))
    code = main(["report", str(recorded_runs), "--out", str(tmp_path / "again"), "--min-duration-s", "3",
                 "--min-requests", "100", "--baseline", str(tmp_path / "baseline.json"), "--gate"])
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert any("latency_reduction_pct regressed" in r for r in again["regressions"])
    assert code == 1
    # with the default rules these 6 s runs are too short: INVALID, so the gate fails too
    assert main(["report", str(recorded_runs), "--out", str(tmp_path / "strict"), "--gate"]) == 1
    strict = json.loads((tmp_path / "strict" / "summary.json").read_text())
    assert not strict["valid"] and any("below the minimum 10 s" in r for r in strict["invalid_reasons"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed")
def test_report_displays_in_headless_chromium(recorded_runs, tmp_path):
    out = tmp_path / "report"
    main(["report", str(recorded_runs), "--out", str(out), "--min-duration-s", "3", "--min-requests", "100"])
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1100,2400",
                    f"--screenshot={shot}", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 2400 and pixels.shape[1] == 1100
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page
    lower_half = pixels[1200:, :, :3]
    assert (lower_half < 0.5).mean() > 0.005  # the plots rendered further down the page


# --- hand-made edge cases ---------------------------------------------------------------------------
def write_run(path: Path, scenario: str, n: int, *, admitted: bool | None = None, phase=lambda i: "steady",
              status=lambda i: 200, cut_short: bool = False, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    lines = []
    for i in range(n):
        is_admitted = bool(rng.random() < 0.3) if admitted is None else admitted
        if scenario == "standard":
            is_admitted = True
        lines.append(json.dumps({
            "t_intended": 1000.0 + i * 0.01, "t_sent": 1000.0 + i * 0.01, "latency_ms": float(rng.uniform(1, 3)),
            "service_ms": 1.0, "late": False, "status": status(i), "admitted": is_admitted,
            "action": "full" if is_admitted else "exit", "correct": bool(rng.random() < 0.97), "label": 1,
            "predicted": 1, "tau": 0.7, "u": 0.1, "phase": phase(i), "row": i, "source": "local"}))
    text = "\n".join(lines) + "\n"
    if cut_short:
        text = text[: len(text) - 40]  # a crash mid-line
    (path / "requests.jsonl").write_text(text)
    run = {"scenario": scenario, "model": "digits", "shape": "steady"}
    if not cut_short:
        (path / "run.json").write_text(json.dumps(run))
    return path


def report_of(root: Path) -> dict:
    assert main(["report", str(root), "--out", str(root / "out")]) == 0
    parse_html(root / "out" / "report.html")
    return json.loads((root / "out" / "summary.json").read_text())


def test_no_bio_run_claims_are_not_measurable(tmp_path):
    write_run(tmp_path / "standard", "standard", 300)
    summary = report_of(tmp_path)
    assert summary["comparison"] is None
    assert {c["status"] for c in summary["claims"]} == {"not_measurable"}
    assert "needs one standard and one bio run" in summary["claims"][0]["reason"]
    assert "not measurable" in (tmp_path / "out" / "report.html").read_text()


def test_zero_admissions(tmp_path):
    write_run(tmp_path / "standard", "standard", 300)
    write_run(tmp_path / "bio", "bio", 300, admitted=False, seed=1)
    summary = report_of(tmp_path)
    assert summary["runs"]["bio"]["admission_rate"] == 0.0
    assert summary["comparison"]["admission_rate"] == 0.0


def test_empty_phase(tmp_path):
    # every request of the 'spike' phase was rejected: the phase has no answered request
    write_run(tmp_path / "bio", "bio", 300, phase=lambda i: "spike" if 100 <= i < 200 else "base",
              status=lambda i: 503 if 100 <= i < 200 else 200)
    summary = report_of(tmp_path)
    spike = next(p for p in summary["runs"]["bio"]["phases"] if p["phase"] == "spike")
    assert spike["answered"] == 0 and spike["rejected"] == 100
    assert spike["p50_ms"] is None and spike["accuracy"] == 0.0  # a rejection is no right answer


def test_run_cut_short(tmp_path):
    write_run(tmp_path / "bio", "bio", 50, cut_short=True)
    summary = report_of(tmp_path)
    bio = summary["runs"]["bio"]
    assert bio["n"] == 49  # the line cut mid-write is skipped
    assert not summary["valid"]
    assert any("below the minimum" in r for r in summary["invalid_reasons"])
    assert bio["energy_source"] == "none" and bio["energy_per_request_j"] is None


def test_missing_results_dir_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "green_mlops.cli", "report", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "green_mlops.cli", "report", str(tmp_path / "empty")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no recorded runs" in result.stderr


def test_the_report_reads_the_runs_and_never_runs_a_model(recorded_runs, tmp_path, monkeypatch):
    import targets.backends.ort_target

    def refuse(*args, **kwargs):
        raise AssertionError("the report ran a model")

    monkeypatch.setattr(targets.backends.ort_target.OnnxRuntimeTarget, "__init__", refuse)
    out = tmp_path / "report"
    assert main(["report", str(recorded_runs), "--out", str(out), "--min-duration-s", "3",
                 "--min-requests", "100"]) == 0
    assert (out / "admission_accuracy.png").exists()  # drawn from the runs' reference answers


def test_the_report_covers_the_in_process_ablation(recorded_runs, tmp_path, capsys):
    root = tmp_path / "validate"
    shutil.copytree(recorded_runs, root)
    (root / "ablation").mkdir()
    (root / "ablation" / "ablation.json").write_text(json.dumps({
        "model": "digits", "provider": "CPUExecutionProvider", "latency_reduction_pct": 50.0,
        "latency_reduction_bounds95_pct": [48.0, 52.0], "accuracy_loss_pp": 0.3, "accuracy_loss_bounds95_pp": [0.1, 0.5],
        "admission_rate": 0.5, "energy_reduction_pct": None,
        "standard": {"n_requests": 2000, "energy_source": "none"}, "bio": {},
        "claims": [{"name": "latency_reduction", "target": ">= 42 %", "measured": 50.0, "bounds95": [48.0, 52.0],
                    "status": "held"},
                   {"name": "accuracy_loss", "target": "<= 0.5 pp", "measured": 0.3, "bounds95": [0.1, 0.5],
                    "status": "held"}]}))
    main(["report", str(root), "--min-duration-s", "3", "--min-requests", "100"])
    summary = json.loads((root / "summary.json").read_text())
    assert [c["status"] for c in summary["ablation_claims"]] == ["held", "held"]
    assert "held: in-process latency_reduction, in-process accuracy_loss" in summary["verdict"]
    markdown = (root / "report.md").read_text()
    assert "## In-process ablation" in markdown and "2000 requests per mode" in markdown
    console = capsys.readouterr().out
    assert summary["verdict"].split(" · ")[0] in console.replace("\n", " ")


def test_an_ablation_recorded_before_the_bounds_is_reported_as_it_was_recorded():
    from reports.render import _ablation_lines
    from reports.verdict import ablation_claims

    legacy = {"latency_reduction_pct": 50.0, "latency_reduction_ci95_pct": [48.0, 52.0], "accuracy_loss_pp": 0.3,
              "accuracy_loss_ci95_pp": [0.1, 0.5], "standard": {"n_requests": 2000},
              "claims": [{"name": "latency_reduction", "measured": 50.0, "passed": True},
                         {"name": "accuracy_loss", "measured": 0.3, "passed": False}]}
    (line,) = _ablation_lines({"ablation": legacy})
    assert "recorded before one-sided bounds" in line and "two-sided 95 % CI 48.0 … 52.0" in line
    assert [c["status"] for c in ablation_claims(legacy)] == ["held", "not_held"]


def test_distributed_replay_rules_catch_overlap_another_schedule_and_a_late_worker():
    """Planted: an arrival sent twice, a worker that replayed another schedule, one that never
    said, and one late on 2 % of its sends while the run as a whole is late on under 1 %."""
    from reports.runs import Run
    from reports.verdict import ValidityRules, _replay_reasons

    records = [{"seq": i, "late": False} for i in range(400)] + [{"seq": 7, "late": False}]
    workers = [
        {"source": "a", "worker_index": 0, "schedule_digest": "abc", "sent": 100, "late": 2},
        {"source": "b", "worker_index": 1, "schedule_digest": "abd", "sent": 200, "late": 0},
        {"source": "c", "sent": 101, "late": 0},
    ]
    run = Run("bio", Path("."), {"open_loop": True, "schedule": {"digest": "abc"}, "workers": workers}, records)
    reasons = _replay_reasons(run, ValidityRules())
    assert any("1 arrival(s) of the schedule sent more than once" in r for r in reasons)
    assert any("worker 0 (a) fell behind: 2 of its 100 sends on the wire late (2.0 % > 1 %)" in r for r in reasons)
    assert any("worker 1 (b) replayed schedule abd, not the run's abc" in r for r in reasons)
    assert any("worker ? (c) sent requests but never said which schedule" in r for r in reasons)
    assert len(reasons) == 4
    fine = Run("bio", Path("."), {"open_loop": True, "schedule": {"digest": "abc"}, "workers": workers[:1]},
               records[:400])
    assert _replay_reasons(fine, ValidityRules(max_late_fraction=0.05)) == []
    assert _replay_reasons(Run("bio", Path("."), {"open_loop": False}, records), ValidityRules()) == []
