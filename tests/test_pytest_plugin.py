"""The pytest plugin in a user's project: a throw-away project outside the repository, holding only
the example test of docs/your-own-model.md, gates a built ladder with
``pytest --benchmark-only --green-model DIR``, and fails when a gate is made impossible."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "your-own-model.md"


def example_test() -> str:
    """The docs' example test, word for word (the python block of its CI section)."""
    section = DOC.read_text().split("## Gate it in your CI", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *args], cwd=project,
                          capture_output=True, text=True, timeout=600)


def test_a_users_project_gates_its_model_with_the_example_test(tmp_path, digits_spec):
    project = tmp_path / "their-project"
    project.mkdir()
    (project / "test_green.py").write_text(example_test())
    model = shutil.copytree(digits_spec.directory, tmp_path / "their-ladder")
    assert len(example_test().strip().splitlines()) <= 12  # the docs promise about ten lines

    passed = run_pytest(project, "--benchmark-only", "--green-model", str(model))
    assert passed.returncode == 0, passed.stdout[-3000:] + passed.stderr[-2000:]
    assert re.search(r"^ok\s+bio / standard \(per request\)\s+0\.\d+", passed.stdout, re.M), passed.stdout[-2000:]

    (project / "ratios.toml").write_text('[[ratio]]\nname = "bio / standard (per request)"\n'
                                         'numerator = "test_bio"\ndenominator = "test_standard"\nstat = "mean"\n'
                                         'max = 0.0001\n')
    failed = run_pytest(project, "--benchmark-only", "--green-model", str(model))
    assert failed.returncode == 1 and re.search(r"^FAIL\s+bio / standard", failed.stdout, re.M), failed.stdout[-2000:]

    # A gate whose benchmarks did not run (no model given) fails as not measured: it cannot pass by skipping.
    forgot = run_pytest(project, "--benchmark-only")
    assert forgot.returncode == 1 and "not measured" in forgot.stdout, forgot.stdout[-2000:]
    # Without gates of its own and without a model, the fixtures skip and say why; nothing is gated.
    (project / "ratios.toml").unlink()
    without = run_pytest(project, "--benchmark-only")
    assert without.returncode == 0 and "pytest --green-model DIR" in without.stdout, without.stdout[-2000:]
