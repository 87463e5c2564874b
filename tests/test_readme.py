"""The README's set-up commands are the ones CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    start = ci.index("# README: tests") + 1
    commands = [line for line in ci[start:] if line.strip()]
    assert commands, "no README commands found in .ci/run"
    for command in commands:
        assert command in readme, f"README does not show the CI command: {command}"


def test_readme_shows_the_main_job():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e '.[cpu]'" in readme and "green-mlops validate" in readme
