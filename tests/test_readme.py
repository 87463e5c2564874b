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
    for page, base in [(ROOT / "README.md", ROOT), *((p, p.parent) for p in sorted((ROOT / "docs").glob("*.md")))]:
        text = page.read_text()
        assert "../shared" not in text, page
        for link, anchor in re.findall(r"\]\(([^)#]*)(#[^)]*)?\)", text):
            if "://" in link:
                continue
            target = (base / link) if link else page
            assert target.exists(), f"{page.name}: broken link {link}"
            if anchor and target.suffix == ".md":
                assert anchor[1:] in {_slug(h) for h in re.findall(r"^#+ (.*)$", target.read_text(), re.M)}, \
                    f"{page.name}: no heading for {link}{anchor}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_landing_page():
    """What it is, the two set-up commands, one table of what it measured, the user's-model path,
    links: about 250 lines at most; the reference lives in docs/reference.md."""
    assert len(README.splitlines()) <= 250
    for heading in ("## Set up", "## What it measured here", "## Your own model", "## Reference"):
        assert heading in README, heading
