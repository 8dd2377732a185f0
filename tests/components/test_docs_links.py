"""README.md and docs/*.md: every relative link and anchor resolves, and the README stays short.

The checker is ``scripts/check_links.py``; the cases at the bottom show that it fails on a
broken file link, a broken anchor and a long README, so a pass on the real docs means something.
"""
from __future__ import annotations

from pathlib import Path
from rankgrpo.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


check_links = load_script(ROOT / "scripts" / "check_links.py")


def test_readme_and_docs_links_resolve():
    files = check_links.default_files(ROOT)
    assert (ROOT / "docs").is_dir() and len(files) > 1, files
    problems = [p for f in files for p in check_links.check_file(f)]
    assert problems == []


def test_readme_is_at_most_300_lines():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail to docs/"


def test_readme_keeps_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("make test ") or line == "make test" for line in lines)
    assert any(line.startswith("make demo ") or line == "make demo" for line in lines)


# ------------------------------------------------------------------ the checker fails when it should


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path):
    _write(tmp_path / "docs" / "a.md", "# Page A\n\n## Choices that differ (`--x`)\n\ntext\n")
    readme = _write(tmp_path / "README.md", "\n".join([
        "# Title",
        "[ok](docs/a.md) [ok](docs/a.md#choices-that-differ---x) [ok](#title) [web](https://example.org/x)",
        "[gone](docs/missing.md)",
        "[bad anchor](docs/a.md#choices-that-differ)",
        "[bad local](#nowhere)",
        "`[in code](docs/none.md)`",
        "```bash",
        "# not a heading [nor a link](docs/none.md)",
        "```",
    ]) + "\n")
    problems = check_links.check_file(readme)
    assert len(problems) == 3, problems
    assert "docs/missing.md: no such file" in problems[0]
    assert "#choices-that-differ" in problems[1] and "#nowhere" in problems[2]


def test_checker_slugs_repeated_headings_like_github(tmp_path):
    page = _write(tmp_path / "p.md", "# Notes\n\n## Notes\n\n[first](#notes) [second](#notes-1) [third](#notes-2)\n")
    problems = check_links.check_file(page)
    assert len(problems) == 1 and "#notes-2" in problems[0]


def test_checker_reports_a_long_readme(tmp_path):
    readme = _write(tmp_path / "README.md", "line\n" * 301)
    assert check_links.check_readme_length(readme) != []
    assert check_links.check_readme_length(_write(tmp_path / "short" / "README.md", "line\n" * 300)) == []
    assert check_links.main([str(readme)]) == 1
