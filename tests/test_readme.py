"""The README's set-up commands are the ones CI runs, and the README documents itself."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    start = ci.index("# README: tests") + 1
    commands = [line for line in ci[start:] if line.strip()]
    assert commands == ["bash tests/run"], commands
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    assert "bash tests/run\n" in blocks, "the README shows no block holding exactly the test command"


def test_readme_shows_the_main_job():
    assert "```bash\npip install -e '.[cpu]' && green-mlops validate\n```" in README


def test_the_project_documents_itself():
    assert "../shared" not in README
    assert "docs/design.md" in README and (ROOT / "docs" / "design.md").is_file()
    links = re.findall(r"\]\(([^)#]+)", README + (ROOT / "docs" / "design.md").read_text())
    for link in links:
        if "://" not in link:
            target = (ROOT / link) if not link.startswith("../") else (ROOT / "docs" / link)
            assert target.exists() or (ROOT / "docs" / link).exists(), f"broken link {link}"
