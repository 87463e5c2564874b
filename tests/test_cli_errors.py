"""The CLI's exit codes and error lines: 0 done, 1 gate, 2 bad input, 3 internal error (traceback
in a log file), 130 interrupted; every message printed verbatim (no rich markup)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import green_mlops.cli as cli
from targets.errors import ConfigError, GreenMLOpsError, InputError, ModelDirError, RecordsError


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "green_mlops.cli", *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


def raising(monkeypatch, exc: BaseException):
    def handler(args):
        raise exc

    monkeypatch.setattr(cli, "_run_report", handler)


@pytest.mark.parametrize("error", [ModelDirError, ConfigError, InputError, RecordsError, GreenMLOpsError])
@pytest.mark.parametrize("message", ["pip install 'green-mlops[cpu]'", "expected [controller]",
                                     "input shape must be [n, 1, 8, 8]", "bad [/y] and [red]x[/]"])
def test_bad_input_is_one_verbatim_line_and_exit_2(monkeypatch, capsys, error, message):
    raising(monkeypatch, error(message))
    assert cli.main(["report", "somewhere"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"


def test_config_path_with_markup_does_not_break_the_handler():
    result = run_cli("serve", "--config", "a[/y].toml", "--energy", "off", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: config file not found: a[/y].toml"


def test_internal_error_is_one_line_naming_the_traceback_log(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("GREEN_MLOPS_LOG_DIR", str(tmp_path))
    raising(monkeypatch, ZeroDivisionError("division by zero [in] a bug"))
    assert cli.main(["report", "somewhere"]) == cli.EXIT_INTERNAL == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error (ZeroDivisionError: division by zero [in] a bug)" in err
    (log,) = tmp_path.glob("error-*.log")
    assert str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError" in text
    assert text.startswith("green-mlops report somewhere")


def test_interrupt_exits_130(monkeypatch, capsys):
    raising(monkeypatch, KeyboardInterrupt())
    assert cli.main(["report", "somewhere"]) == cli.EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_exit_codes_are_distinct():
    codes = [cli.EXIT_OK, cli.EXIT_GATE, cli.EXIT_USAGE, cli.EXIT_INTERNAL, cli.EXIT_INTERRUPTED]
    assert codes == [0, 1, 2, 3, 130]


def test_bad_arguments_exit_2():
    result = run_cli("serve", "--max-queue", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def good_record(**changes) -> dict:
    record = {"t_intended": 1.0, "t_sent": 1.0, "latency_ms": 2.0, "service_ms": 2.0, "late": False,
              "status": 200, "admitted": True, "action": "full", "correct": True, "label": 1, "predicted": 1,
              "tau": 0.5, "u": 0.1, "phase": "p1", "row": 0, "source": "local"}
    record.update(changes)
    return record


@pytest.mark.parametrize(
    "lines, names",
    [
        (["[1, 2]", json.dumps(good_record())], ("requests.jsonl:1", "JSON object")),
        ([json.dumps(good_record(status="200"))], ("requests.jsonl:1", "'status'")),
        ([json.dumps(good_record()), json.dumps(good_record(latency_ms=None))], ("requests.jsonl:2", "'latency_ms'")),
        ([json.dumps(good_record(latency_ms="1"))], ("requests.jsonl:1", "'latency_ms'")),
        ([json.dumps(good_record(outcome="lost"))], ("requests.jsonl:1", "'outcome'")),
        ([json.dumps(good_record(tau="x"))], ("requests.jsonl:1", "'tau'")),
        ([json.dumps(good_record(phase=3))], ("requests.jsonl:1", "'phase'")),
        (["not json", json.dumps(good_record())], ("requests.jsonl:1", "not a JSON record")),
        ([json.dumps({k: v for k, v in good_record().items() if k not in ("t_sent", "t_intended")})],
         ("requests.jsonl:1", "'t_sent'")),
    ],
)
def test_malformed_records_are_one_line_and_exit_2(tmp_path, lines, names):
    run = tmp_path / "run"
    run.mkdir()
    (run / "requests.jsonl").write_text("\n".join(lines) + "\n")
    result = run_cli("report", str(run), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert all(name in result.stderr for name in names)


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path):
    from reports.records import read_records

    path = tmp_path / "requests.jsonl"
    path.write_text(json.dumps(good_record()) + "\n" + json.dumps(good_record())[:20])
    assert len(read_records(path)) == 1


def test_records_of_the_outcome_format_pass(tmp_path):
    """Records that say their outcome: a request cut off before it went on the wire has no
    t_sent, no latency and status 0."""
    from reports.records import read_records

    cut_off = good_record(outcome="cut_off", status=0, t_sent=None, latency_ms=None, service_ms=None,
                          tau=None, u=None, reason="not yet on the wire when the run ended")
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (good_record(outcome="answered"), cut_off)) + "\n")
    assert len(read_records(path)) == 2


@pytest.mark.parametrize(
    "file, line, names",
    [
        ("windows.jsonl", "[1]", ("windows.jsonl:1", "JSON object")),
        ("windows.jsonl", '{"energy_j": "x", "duration_s": 1}', ("windows.jsonl:1", "'energy_j'")),
        ("windows.jsonl", '{"energy_j": 1.0}', ("windows.jsonl:1", "'duration_s'")),
        ("timeline.jsonl", '{"t_s": "x"}', ("timeline.jsonl:1", "'t_s'")),
        ("run.json", '{"scenario": 5}', ("run.json", "'scenario'")),
    ],
)
def test_malformed_windows_samples_and_run_metadata_are_exit_2(tmp_path, file, line, names):
    run = tmp_path / "run"
    run.mkdir()
    (run / "requests.jsonl").write_text(json.dumps(good_record()) + "\n")
    (run / file).write_text(line + "\n")
    result = run_cli("report", str(run), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and all(name in result.stderr for name in names)


def test_run_json_must_be_an_object(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "requests.jsonl").write_text(json.dumps(good_record()) + "\n")
    (run / "run.json").write_text("[1]")
    result = run_cli("report", str(run), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "run.json: must be a JSON object" in result.stderr
