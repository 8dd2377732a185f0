"""Mutation score of the five core modules (``make mutation``; docs/testing.md, "Mutation score").

Runs mutmut (configured in setup.cfg's ``[mutmut]`` section) on one module at a time, each mutant
against the unit tests that call the mutated function, then prints a table per module: mutants,
killed, survived, timeouts, other (no test reaches the function, or the run crashed), score, and
the names of the mutants that were not killed.

    python scripts/mutation_report.py                       # all five, from a fresh mutants/
    python scripts/mutation_report.py losses metrics --keep # two modules, reuse mutants/ and its stats
    python scripts/mutation_report.py --report-only         # the table of the last run

score = (killed + timeouts) / mutants. A timeout is a mutant that made the tests run far longer
than their clean time (e.g. a loop that never ends): the tests noticed it. Lines marked
``# pragma: no mutate`` produce no mutants. Exits 1 when a module scores below ``--fail-under``.
mutmut's own output goes to mutants/mutmut-<module>.log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

MODULES = ("losses", "rewards", "segment", "parsing", "metrics")
ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"

# mutmut 3.8.1's exit codes (mutmut/stats.py ``status_by_exit_code``), folded into the table's columns
KILLED_CODES = {1, 3}
SURVIVED_CODES = {0}
TIMEOUT_CODES = {36, -24, 24, 152, 255}
OTHER_STATUS = {None: "not checked", 5: "no tests", 33: "no tests", 2: "interrupted", 34: "skipped",
                -11: "segfault", -9: "segfault"}


def classify(exit_code) -> str:
    if exit_code in KILLED_CODES:
        return "killed"
    if exit_code in SURVIVED_CODES:
        return "survived"
    if exit_code in TIMEOUT_CODES:
        return "timeout"
    return "other"  # not checked, no tests, suspicious, segfault, interrupted


def mutant_order(name: str) -> tuple[str, int]:
    """rankgrpo.losses.x_sft_loss__mutmut_12 -> ("rankgrpo.losses.x_sft_loss", 12): numbered mutants in order."""
    function, _, number = name.rpartition("__mutmut_")
    return function, int(number) if number.isdigit() else 0


def module_counts(module: str, mutants_dir: Path = MUTANTS) -> tuple[Counter, list[tuple[str, str]]]:
    """(counts by column, [(mutant name, column)] of the mutants not killed) from mutmut's .meta file."""
    meta = json.loads((mutants_dir / "rankgrpo" / f"{module}.py.meta").read_text())
    counts: Counter = Counter()
    missed = []
    for name, code in sorted(meta["exit_code_by_key"].items(), key=lambda kv: mutant_order(kv[0])):
        column = classify(code)
        counts[column] += 1
        if column in ("survived", "other"):
            missed.append((name, column if column == "survived" else OTHER_STATUS.get(code, "suspicious")))
    counts["mutants"] = len(meta["exit_code_by_key"])
    return counts, missed


def score(counts: Counter) -> float:
    return 100.0 * (counts["killed"] + counts["timeout"]) / max(counts["mutants"], 1)


def mutmut_command() -> list[str]:
    """The mutmut console script of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "mutmut"
    return [str(beside)] if beside.exists() else [shutil.which("mutmut") or "mutmut"]


def run_module(module: str, max_children: int) -> int:
    MUTANTS.mkdir(exist_ok=True)
    log = MUTANTS / f"mutmut-{module}.log"
    cmd = [*mutmut_command(), "run", "--max-children", str(max_children), f"rankgrpo.{module}.*"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print(f"mutmut: rankgrpo/{module}.py (log: {log.relative_to(ROOT)})", flush=True)
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def table(rows: dict[str, Counter]) -> str:
    heads = ("module", "mutants", "killed", "survived", "timeouts", "other", "score")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for module, c in rows.items():
        lines.append(f"| {module}.py | {c['mutants']} | {c['killed']} | {c['survived']} | {c['timeout']} | "
                     f"{c['other']} | {score(c):.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of {', '.join(MODULES)} (default: all)")
    ap.add_argument("--keep", action="store_true", help="reuse mutants/ (its stats and untouched mutants)")
    ap.add_argument("--report-only", action="store_true", help="print the table of the last run, run nothing")
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (default 2)")
    ap.add_argument("--fail-under", type=float, default=90.0, help="exit 1 when a module scores lower")
    args = ap.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")

    if not args.report_only:
        if not args.keep and MUTANTS.exists():
            shutil.rmtree(MUTANTS)
        for module in modules:
            rc = run_module(module, args.max_children)
            if rc != 0:
                print(f"mutmut failed on {module} (exit {rc}); see mutants/mutmut-{module}.log", file=sys.stderr)
                return rc

    rows, missed = {}, {}
    for module in modules:
        if not (MUTANTS / "rankgrpo" / f"{module}.py.meta").is_file():
            print(f"error: {MUTANTS}: no mutmut results for {module}.py; run make mutation first", file=sys.stderr)
            return 2
        rows[module], missed[module] = module_counts(module)
    print(table(rows))
    for module in modules:
        if missed[module]:
            print(f"\nnot killed in {module}.py:")
            for name, column in missed[module]:
                print(f"  {column:11s} {name}")
    low = [m for m in modules if score(rows[m]) < args.fail_under]
    if low:
        print(f"\nbelow {args.fail_under:.0f}%: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
