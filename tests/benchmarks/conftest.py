"""Ratio gates over pytest-benchmark results (thresholds in ratios.toml beside this file).

Each ratio is a statistic (``stat``: median by default, or mean, or ``extra:KEY``: a figure in
seconds the benchmark stored in its ``extra_info``) of one benchmark over the same statistic of
another from the same session. The
ratios land in the numerator's ``extra_info`` (so in ``--benchmark-json`` and saved runs), print
as a table at the end, and fail the session when one exceeds its ``max`` (a rule without ``max``
is reported only).
"""
from __future__ import annotations

import http.client
import json
import time
import tomllib
from pathlib import Path

import pytest

RATIOS_FILE = Path(__file__).with_name("ratios.toml")
_fixtures: dict[str, object] = {}
_results: list[dict] = []
_selected: set[str] = set()
_notes: list[str] = []


def pytest_addoption(parser):
    parser.addoption("--no-ratio-gate", action="store_true",
                     help="report benchmark ratios without failing the session")
    parser.addoption("--inject-decision-delay-us", type=int, default=0,
                     help="slow every controller decision down (proves the ratio gate can fail)")


@pytest.fixture(autouse=True)
def _slowed_controller(request, monkeypatch):
    delay_s = request.config.getoption("--inject-decision-delay-us") / 1e6
    if delay_s > 0:
        from targets.controller import BioController

        decide = BioController.decide

        def slow_decide(self, *args, **kwargs):
            until = time.perf_counter() + delay_s
            while time.perf_counter() < until:
                pass
            return decide(self, *args, **kwargs)

        monkeypatch.setattr(BioController, "decide", slow_decide)
    yield


def infer_body(x) -> str:
    """A KServe v2 JSON infer request for a float32 batch of the digits model."""
    return json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})


class GatewayConnection:
    """One keep-alive connection of the standard library's client (httpx adds about 0.25 ms of
    its own per call here) to a gateway; ``infer(body)`` posts and checks the answer."""

    def __init__(self, gateway):
        host, port = gateway.host_port.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def infer(self, body: str) -> None:
        self.connection.request("POST", "/v2/models/digits/infer", body=body,
                                headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        response.read()
        assert response.status == 200

    def close(self) -> None:
        self.connection.close()


@pytest.fixture(scope="session")
def http_helpers():
    """``(infer_body, GatewayConnection)`` for the benchmarks that call a gateway over HTTP."""
    return infer_body, GatewayConnection


@pytest.fixture(autouse=True)
def _remember_benchmark(request):
    if "benchmark" in request.fixturenames:
        _fixtures[request.node.name] = request.getfixturevalue("benchmark")
    yield


def _statistic_s(name: str, stat: str) -> float | None:
    """``stat`` of a benchmark's timings, or with ``extra:KEY`` a figure in seconds the benchmark
    measured itself and stored in its ``extra_info`` (e.g. seconds per request under load)."""
    fixture = _fixtures.get(name)
    stats = getattr(fixture, "stats", None)
    if stats is None:
        return None
    if stat.startswith("extra:"):
        return fixture.extra_info.get(stat.removeprefix("extra:"))
    return getattr(stats.stats, stat)


def pytest_collection_finish(session):
    _selected.clear()
    _selected.update(item.name for item in session.items)


def compute_ratios(selected: set[str] | None = None) -> list[dict]:
    """Every rule's ratio; a gated rule with one side selected but not measured fails."""
    selected = _selected if selected is None else selected
    rules = tomllib.loads(RATIOS_FILE.read_text())["ratio"]
    results = []
    for rule in rules:
        stat = rule.get("stat", "median")
        top, bottom = _statistic_s(rule["numerator"], stat), _statistic_s(rule["denominator"], stat)
        if top is None or bottom is None or bottom == 0:
            sides = (rule["numerator"], rule["denominator"])
            if not any(side in selected for side in sides):
                results.append({**rule, "stat": stat, "ratio": None, "status": "not selected", "passed": True})
                continue
            missing = [side for side, value in zip(sides, (top, bottom)) if not value]
            results.append({**rule, "stat": stat, "ratio": None, "status": "not measured",
                            "reason": f"did not run: {', '.join(missing)}", "passed": "max" not in rule})
            continue
        ratio = top / bottom
        result = {**rule, "stat": stat, "ratio": ratio, "difference_ms": (top - bottom) * 1e3, "status": "measured",
                  "passed": "max" not in rule or ratio <= rule["max"]}
        extra = _fixtures[rule["numerator"]].extra_info
        extra[f"ratio: {rule['name']}"] = round(ratio, 6)
        extra[f"difference ms: {rule['name']}"] = round(result["difference_ms"], 6)
        results.append(result)
    return results


def _benchmarks_off(config) -> bool:
    return bool(config.getoption("benchmark_disable", False) or config.getoption("benchmark_skip", False))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    _notes.clear()
    if _benchmarks_off(session.config):
        _results.clear()
        _notes.append("benchmarks disabled (--benchmark-disable/--benchmark-skip): no ratio measured or gated")
    elif not _selected & {name for rule in tomllib.loads(RATIOS_FILE.read_text())["ratio"]
                          for name in (rule["numerator"], rule["denominator"])}:
        _results.clear()  # no benchmark a rule names was selected: nothing to gate
    else:
        _results[:] = compute_ratios()
        if not session.config.getoption("--no-ratio-gate") and any(not r["passed"] for r in _results):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    yield


def pytest_terminal_summary(terminalreporter):
    if not _results and not _notes:
        return
    terminalreporter.section("benchmark ratios (same run)")
    for note in _notes:
        terminalreporter.write_line(note)
    for r in _results:
        limit = f"max {r['max']}" if "max" in r else "no gate"
        if r["status"] != "measured":
            verdict = "FAIL" if not r["passed"] else "info"
            terminalreporter.write_line(f"{verdict:4}  {r['name']:32} {r['status']:>10}   "
                                        f"({limit}{'; ' + r['reason'] if r.get('reason') else ''})")
            continue
        verdict = ("ok" if r["passed"] else "FAIL") if "max" in r else "info"
        terminalreporter.write_line(f"{verdict:4}  {r['name']:32} {r['ratio']:10.4f}   "
                                    f"({r['stat']}, {limit}; difference {r['difference_ms']:+.3f} ms)")
