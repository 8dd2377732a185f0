"""Fill the generated blocks of a hand-written report from the benchmark outputs beside it.

The report's prose is written by hand; its tables are not. Each table sits between two markers
that name where it comes from, a Markdown file under the report's folder and, optionally, one of
its sections (the text under that heading, heading line left out, down to the next heading of the
same or a higher level):

    <!-- generated from paper_tables.md "## Table 1 analogue: on-policy RL (μ = 1)" -->
    (replaced by that section of benchmarks/results/paper_tables.md)
    <!-- end generated -->

`benchmarks/paper_tables.py` runs this on REPORT.md after writing its tables, so a rerun updates
every block; the benchmarks that write their own Markdown (objective_ablation.py, lora_quality.py)
are named the same way. tests/components/test_report_consistency.py checks that the committed
REPORT.md is what this makes of the committed outputs.

    python -m rankgrpo.report_blocks benchmarks/results/REPORT.md           # rewrite the blocks
    python -m rankgrpo.report_blocks benchmarks/results/REPORT.md --check   # exit 1 if one is stale
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rankgrpo.io import atomic_write_text

BLOCK = re.compile(r'(<!-- generated from (?P<file>\S+)(?: "(?P<heading>[^"]+)")? -->\n)(?P<body>.*?)'
                   r'(<!-- end generated -->)', re.S)


def heading_bounds(lines: list[str], heading: str, source: str) -> tuple[int, int]:
    """(index of the ``heading`` line, index of the next heading of its level or higher, or the end).

    >>> heading_bounds(["# A", "x", "## B", "y", "### C", "## D"], "## B", "f.md")
    (2, 5)
    """
    try:
        start = [line.strip() for line in lines].index(heading)
    except ValueError:
        raise SystemExit(f"error: {source}: no heading {heading!r}") from None
    level = len(heading) - len(heading.lstrip("#"))
    end = next((j for j in range(start + 1, len(lines))
                if lines[j].startswith("#") and len(lines[j]) - len(lines[j].lstrip("#")) <= level), len(lines))
    return start, end


def heading_section(text: str, heading: str, source: str) -> str:
    """The text under ``heading`` (exact line), without it, to the next heading of its level or
    higher, stripped of blank lines at either end.

    >>> heading_section("# A\\nx\\n## B\\ny\\n\\n### C\\nz\\n## D\\nw", "## B", "f.md")
    'y\\n\\n### C\\nz'
    """
    lines = text.splitlines()
    start, end = heading_bounds(lines, heading, source)
    return "\n".join(lines[start + 1:end]).strip("\n")


def render(text: str, folder: Path) -> str:
    """``text`` with every generated block replaced by its source under ``folder``."""
    def fill(m: re.Match) -> str:
        path = folder / m["file"]
        if not path.is_file():
            raise SystemExit(f"error: {path}: the source of a generated block is missing")
        source = path.read_text(encoding="utf-8")
        body = heading_section(source, m["heading"], str(path)) if m["heading"] else source.strip("\n")
        return f"{m.group(1)}{body}\n{m.group(5)}"

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="The report; its blocks' sources are read from its folder.")
    parser.add_argument("--check", action="store_true", help="Only check: exit 1 if a block is stale.")
    args = parser.parse_args(argv)
    text = args.report.read_text(encoding="utf-8")
    new = render(text, args.report.parent)
    if args.check:
        if new != text:
            print(f"{args.report}: generated blocks are stale; run python -m rankgrpo.report_blocks {args.report}")
            return 1
        return 0
    if new != text:
        atomic_write_text(args.report, new)
    print(f"{args.report}: {len(BLOCK.findall(text))} generated block(s), {'updated' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
