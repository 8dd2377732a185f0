"""Every figure of the benchmark report and of the README's results must come from a committed output.

A figure is a number written with three or more decimals (0.4243, +0.018, −0.0358). It is sourced
when some number in the committed outputs, rounded to the same decimals, gives it (the sign is
ignored: "a − b" and "b − a" quote one difference). The outputs are the JSON files the benchmark
scripts write (every number in them, at any depth) and the tables they generate (Markdown).

    python scripts/check_report.py                       # REPORT.md and README.md's "## Results"
    python scripts/check_report.py DOC.md --outputs DIR  # one document against one folder of outputs

Prints each unsourced figure with its line and exits 1 if there is one. The committed outputs:
benchmarks/results/ (paper_tables.py's summary.json and paper_tables.md, objective_ablation/,
lora_quality/) for REPORT.md, benchmarks/results/demo/ (make demo's comparison.json files) for the
README.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

from rankgrpo.report_blocks import heading_bounds

ROOT = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"(?<![\w.])[+\-−±]?(\d+\.\d{3,})(?!\w|\.\d)")  # "0.989." ends a sentence
CHECKS = (  # (document, section heading or None for all of it, folder of its committed outputs)
    ("benchmarks/results/REPORT.md", None, "benchmarks/results"),
    ("README.md", "## Results", "benchmarks/results/demo"),
)


def figures(text: str) -> Iterator[tuple[int, str]]:
    """(line number, figure without its sign) of every number with three or more decimals.

    >>> list(figures("N@20 0.4243 (+0.018, −2.3 SE); 1,200 steps; v1.2.345; ends 0.989."))
    [(1, '0.4243'), (1, '0.018'), (1, '0.989')]
    """
    for i, line in enumerate(text.splitlines(), 1):
        for m in FIGURE.finditer(line):
            yield i, m.group(1)


def section(text: str, heading: str | None) -> tuple[str, int]:
    """The text from ``heading`` to the next heading of its level or higher, and the line it starts on."""
    if heading is None:
        return text, 0
    lines = text.splitlines()
    start, end = heading_bounds(lines, heading, "document")
    return "\n".join(lines[start:end]), start


def numbers_in(obj: Any) -> Iterator[float]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers_in(v)


def committed_numbers(folder: Path) -> list[float]:
    """Every number in the JSON files and the Markdown tables (*.md but REPORT.md) under ``folder``."""
    out: list[float] = []
    for path in sorted(folder.rglob("*.json")):
        out += numbers_in(json.loads(path.read_text(encoding="utf-8")))
    for path in sorted(folder.rglob("*.md")):
        if path.name != "REPORT.md":
            out += [float(f) for _, f in figures(path.read_text(encoding="utf-8"))]
    return out


def sourced(figure: str, values: Iterable[float]) -> bool:
    decimals = len(figure.split(".")[1])
    return any(f"{abs(v):.{decimals}f}" == figure for v in values)


def unsourced(doc: Path, heading: str | None, outputs: Path) -> list[tuple[int, str]]:
    text, offset = section(doc.read_text(encoding="utf-8"), heading)
    values = committed_numbers(outputs)
    formatted = {}
    missing = []
    for line, fig in figures(text):
        if fig not in formatted:
            formatted[fig] = sourced(fig, values)
        if not formatted[fig]:
            missing.append((line + offset, fig))
    return missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("doc", nargs="?", help="One document (default: every document of CHECKS).")
    p.add_argument("--outputs", help="Its folder of committed outputs.")
    p.add_argument("--section", help="Only the text under this heading (e.g. '## Results').")
    args = p.parse_args(argv)
    checks = [(args.doc, args.section, args.outputs)] if args.doc else [(ROOT / d, s, ROOT / o) for d, s, o in CHECKS]
    bad = 0
    for doc, heading, outputs in checks:
        missing = unsourced(Path(doc), heading, Path(outputs))
        where = f"{doc}" + (f" ({heading})" if heading else "")
        for line, fig in missing:
            print(f"{Path(doc).name}:{line}: {fig} appears in no committed output under {outputs}")
        print(f"{where}: {len(missing)} unsourced figure(s)")
        bad += len(missing)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
