"""The green-mlops pytest plugin (registered under ``pytest11``, so any project with green-mlops
installed has it): ratio gates over pytest-benchmark results, and fixtures for a model directory,
so ``pytest --benchmark-only --green-model DIR`` gates a user's own model in their own CI as the
toolkit's suite gates ``digits``.

**Ratio gates.** Each rule of a TOML file (``[[ratio]]``: ``name``, ``numerator``, ``denominator``,
optional ``stat`` and ``max``) is a statistic of one benchmark over the same statistic of another
from the same session (``stat``: ``median`` by default, ``mean``, or ``extra:KEY``, a figure in
seconds the benchmark stored in its ``extra_info``). The ratios land in the numerator's
``extra_info``, print as a table at the end, and fail the session when one exceeds its ``max``; a
gated rule whose benchmarks did not both run fails as "not measured" (``--no-ratio-gate``: report
only). The file: ``--green-ratios PATH``, else the ini option ``green_ratios``, else
``ratios.toml`` where pytest was started or in the rootdir, else, with ``--green-model``,
:data:`DEFAULT_RULES`.

**Fixtures** (need ``--green-model DIR``, an embedded model name or a model directory; skipped
with that reason otherwise): ``green_model`` (its :class:`targets.model.model_dir.ModelSpec`),
``green_standard`` and ``green_bio`` (in-process targets: every row the full model, and the
budget policy's controller at its steady state, or the paper's where the budget cannot be
certified), ``green_rows`` (held-out rows one at a time, cycling: ``green_rows.next()``),
``green_gateway`` (a gateway serving the model with the controller on, stopped at the end:
``.url``) and ``green_validate`` (``validate --no-load`` run once: its ``validate.json``).

The example of the docs (``docs/your-own-model.md``)::

    def test_standard(benchmark, green_standard, green_rows):
        benchmark(lambda: green_standard.predict(green_rows.next()))

    def test_bio(benchmark, green_bio, green_rows):
        benchmark(lambda: green_bio.predict(green_rows.next()))

    def test_accuracy_held(green_validate):
        assert green_validate["claims"][1]["status"] != "not_held"
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

DEFAULT_RULES = [
    {"name": "bio / standard (per request)", "numerator": "test_bio", "denominator": "test_standard",
     "stat": "mean", "max": 0.58},  # the paper's -42 % latency
]
_fixtures: dict[str, object] = {}
_results: list[dict] = []
_selected: set[str] = set()
_notes: list[str] = []


def pytest_addoption(parser):
    group = parser.getgroup("green-mlops")
    group.addoption("--green-model", help="model directory (or embedded model name) for the green_* fixtures")
    group.addoption("--green-ratios", help="ratio gates (TOML [[ratio]] rules); default: the ini option "
                                           "green_ratios, else ratios.toml in the rootdir, else the built-in gates")
    group.addoption("--no-ratio-gate", action="store_true", help="report benchmark ratios without failing the session")
    parser.addini("green_ratios", "ratio gates file, relative to the rootdir", default="")


def ratio_rules(config) -> list[dict]:
    """The rules in force (see the module docstring); [] when there are none."""
    option = config.getoption("--green-ratios") or config.getini("green_ratios")
    if option:
        path = Path(option)
        path = path if path.is_absolute() else Path(config.rootpath) / path
        if not path.is_file():
            raise pytest.UsageError(f"ratio gates file not found: {path}")
        return tomllib.loads(path.read_text()).get("ratio", [])
    # Where pytest was started, then the rootdir (which a --green-model path may have moved up).
    for folder in (Path(config.invocation_params.dir), Path(config.rootpath)):
        if (folder / "ratios.toml").is_file():
            return tomllib.loads((folder / "ratios.toml").read_text()).get("ratio", [])
    return list(DEFAULT_RULES) if config.getoption("--green-model") else []


@pytest.fixture(autouse=True)
def _remember_benchmark(request):
    if "benchmark" in request.fixturenames:
        _fixtures[request.node.name] = request.getfixturevalue("benchmark")
    yield


def _statistic_s(name: str, stat: str) -> float | None:
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


def compute_ratios(rules: list[dict], selected: set[str] | None = None) -> list[dict]:
    """Every rule's ratio; a gated rule with one side selected but not measured fails."""
    selected = _selected if selected is None else selected
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
    _results.clear()
    rules = ratio_rules(session.config)
    named = {name for rule in rules for name in (rule["numerator"], rule["denominator"])}
    if rules and _selected & named:
        if _benchmarks_off(session.config):
            _notes.append("benchmarks disabled (--benchmark-disable/--benchmark-skip): no ratio measured or gated")
        else:
            _results[:] = compute_ratios(rules)
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


# --- fixtures for a model directory ---------------------------------------------------------------
@pytest.fixture(scope="session")
def green_model(pytestconfig):
    model = pytestconfig.getoption("--green-model")
    if not model:
        pytest.skip("the green_* fixtures need a model: pytest --green-model DIR")
    from targets.model.registry import resolve_model

    return resolve_model(model)


@pytest.fixture(scope="session")
def green_backend(green_model):
    from targets.backends.ort_target import OnnxRuntimeTarget

    return OnnxRuntimeTarget(green_model, device="cpu")


@pytest.fixture(scope="session")
def green_standard(green_backend):
    from targets.control.controlled import ControlledTarget

    return ControlledTarget(green_backend, None)


@pytest.fixture(scope="session")
def green_bio(green_model, green_backend):
    """The budget policy at its steady state (τ = τ∞ from the start, no congestion or energy
    term), or the paper's policy where the model's validation split cannot certify the budget."""
    from targets.control.calibration import calibrator
    from targets.control.controlled import ControlledTarget
    from targets.control.controller_config import build_config
    from targets.errors import ConfigError
    from targets.control.make_controller import make_controller

    steady = {"k_per_s": 1e6, "gamma": 0.0, "beta": 0.0}
    try:
        controller = make_controller(build_config(green_model.controller_hints, overrides={"policy": "budget", **steady}),
                                     green_model, green_backend)
    except ConfigError:
        config = build_config(green_model.controller_hints, overrides={"policy": "paper", **steady},
                              calibration=calibrator(green_model, green_backend))
        controller = make_controller(config, green_model, green_backend)
    return ControlledTarget(green_backend, controller)


class Rows:
    """Held-out rows one at a time (``[1, …]`` arrays), cycling: ``next()``."""

    def __init__(self, x):
        self.rows = [x[i : i + 1] for i in range(len(x))]
        self.i = -1

    def next(self):
        self.i = (self.i + 1) % len(self.rows)
        return self.rows[self.i]


@pytest.fixture(scope="session")
def green_rows(green_model):
    return Rows(green_model.load_eval()[0])


@pytest.fixture(scope="session")
def green_gateway(green_model):
    from loadtests.gateway_process import GatewayProcess

    gateway = GatewayProcess("--model", str(green_model.directory), "--controller", "bio")
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def green_validate(green_model, tmp_path_factory):
    """``validate --no-load`` on the model, run once: its ``validate.json``."""
    import json

    from green_mlops.cli import main

    results = tmp_path_factory.mktemp("green-validate")
    code = main(["validate", "--model", str(green_model.directory), "--no-load", "--energy", "off",
                 "--results", str(results)])
    if code not in (0, 1):
        pytest.fail(f"green-mlops validate exited {code}")
    return json.loads((results / "validate.json").read_text())
