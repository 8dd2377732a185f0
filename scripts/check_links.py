"""Check the relative links and anchors of the Markdown docs, and the README's length.

    python scripts/check_links.py                 # README.md and docs/*.md of this repository
    python scripts/check_links.py FILE.md ...     # the files named

A link is checked when it is relative: ``[text](docs/x.md)``, ``[text](x.md#a-heading)``,
``[text](#a-heading)``, ``![figure](results/a.png)``, or a reference definition
``[label]: path``. Its file must exist (relative to the linking file), and an anchor into a
Markdown file must be a heading of that file, slugged as GitHub does: lower case, punctuation
other than ``-`` and ``_`` dropped, spaces turned into ``-``, ``-1``, ``-2`` ... appended to
repeated headings. Links with a scheme (``https:``, ``mailto:``) are not fetched. Text inside
fenced code blocks and inline code is ignored. Exit status 1 and one line per problem when
anything is broken. Standard library only.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HTML_ID = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: ``"Paper → code"`` -> ``"paper--code"``.

    >>> slug("Evaluation protocol: the paper's by default")
    'evaluation-protocol-the-papers-by-default'
    >>> slug("Catalog-constrained decoding (`--constrained`)")
    'catalog-constrained-decoding---constrained'
    """
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link may point at in a Markdown file: heading slugs and HTML ids."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        out.update(_HTML_ID.findall(line))
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the file's prose."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        m = _REF_DEF.match(line)
        if m:
            out.append((number, m.group(1)))
            continue
        for target in _INLINE_LINK.findall(_INLINE_CODE.sub("", line)):
            out.append((number, target))
    return out


def check_file(path: Path, cache: dict[Path, set[str]] | None = None) -> list[str]:
    """One message per broken relative link or anchor of ``path``."""
    cache = {} if cache is None else cache
    problems = []
    for number, target in links(path):
        if not target or _SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        where = f"{path}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into a file that is not Markdown")
                continue
            if dest not in cache:
                cache[dest] = anchors(dest)
            if anchor not in cache[dest]:
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def check_readme_length(readme: Path, max_lines: int = README_MAX_LINES) -> list[str]:
    n = len(readme.read_text(encoding="utf-8").splitlines())
    return [f"{readme}: {n} lines, more than {max_lines}"] if n > max_lines else []


def default_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or default_files()
    problems: list[str] = []
    cache: dict[Path, set[str]] = {}
    for f in files:
        if not f.is_file():
            problems.append(f"{f}: no such file")
            continue
        problems += check_file(f, cache)
        if f.name == "README.md":
            problems += check_readme_length(f)
    for p in problems:
        print(p)
    if not problems:
        print(f"links ok in {len(files)} files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
