"""Optional: the authors' Reddit-v2 sample and catalog, read through environment variables.

Set RANKGRPO_REDDIT_SAMPLE (JSONL in the authors' format) and RANKGRPO_REDDIT_CATALOG (the
authors' gt_catalog.pkl). The files are never part of this repository.

Every expected number is computed here from the raw files, without the project's loaders or
parser: the pickle read by a bare unpickler that admits no class at all, the JSONL by ``json``,
list lines by one regular expression for the authors' "Title (YYYY)" format.
"""
import json
import os
import pickle
import re

import pytest

from rankgrpo.catalog import load_catalog
from rankgrpo.data import load_examples
from rankgrpo.evaluation import score_examples
from rankgrpo.parsing import parse_recommendations

SAMPLE = os.environ.get("RANKGRPO_REDDIT_SAMPLE")
CATALOG = os.environ.get("RANKGRPO_REDDIT_CATALOG")
pytestmark = pytest.mark.skipif(not (SAMPLE and CATALOG), reason="RANKGRPO_REDDIT_SAMPLE/CATALOG not set")

LINE = re.compile(r"^(.*\S)\s+\((\d{4})\)$")   # a demonstration line: Title (YYYY), nothing else
PLAUSIBLE = range(1870, 2101)


class _NoClasses(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"the catalog pickle holds a {module}.{name}")


def raw_catalog() -> list[tuple[str, int]]:
    with open(CATALOG, "rb") as f:
        return [tuple(row) for row in _NoClasses(f).load()]


def raw_rows() -> list[dict]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def raw_line(line: str):
    """(title, year) of a well-formed line with a plausible year, else None."""
    m = LINE.match(line)
    return (m.group(1), int(m.group(2))) if m and int(m.group(2)) in PLAUSIBLE else None


def test_catalog_matches_the_raw_pickle():
    raw = raw_catalog()
    kept = [(t, y) for t, y in raw if y in PLAUSIBLE]
    catalog = load_catalog(CATALOG)
    assert catalog.report.n_rows == len(raw)
    assert [(it.title, it.year) for it in catalog] == kept  # same rows, same order, nothing else lost
    assert catalog.report.dropped == {"impossible year": len(raw) - len(kept)}
    # Found in the authors' file: 7,404 rows, one corrupt ('The Wall', 201).
    assert (len(raw), len(kept)) == (7404, 7403)


def test_examples_match_the_raw_jsonl():
    rows = raw_rows()
    examples = load_examples(SAMPLE)
    assert len(examples) == len(rows) == 100
    for ex, row in zip(examples, rows):
        assert ex.groundtruth == [(t, int(y)) for t, y in row["groundtruth_with_release_year"]]
        assert len(ex.groundtruth) == row["num_groundtruth"]
        assert ex.seen_titles == row["seen_titles"]
        assert ex.completion == row["completion"][0]["content"]
        assert ex.messages == row["prompt"]


def test_parse_agrees_line_by_line_with_the_raw_format():
    rows = raw_rows()
    lines = valid = 0
    for row in rows:
        text = row["completion"][0]["content"]
        items = parse_recommendations(text)
        assert len(items) == len(text.split("\n"))
        for line, item in zip(text.split("\n"), items):
            expected = raw_line(line)
            lines += 1
            valid += expected is not None
            assert item.valid == (expected is not None), line
            if expected is not None:
                assert (item.title, item.year) == expected
    assert (lines, valid) == (2000, 1999)  # 20 lines per demonstration; one carries the corrupt year


def test_list_scores_against_independent_counts():
    """in_catalog and format_valid recomputed from the raw files (exact title and year in the raw
    catalog; well-formed lines out of N = 20), per example, then averaged."""
    rows = raw_rows()
    catalog_set = {(t, y) for t, y in raw_catalog() if y in PLAUSIBLE}
    in_catalog, format_valid = [], []
    for row in rows:
        parsed = [raw_line(line) for line in row["completion"][0]["content"].split("\n")]
        good = [p for p in parsed if p is not None]
        in_catalog.append(sum(p in catalog_set for p in good) / len(good))
        format_valid.append(len(good) / 20)
    examples = load_examples(SAMPLE)
    agg, _ = score_examples(examples, [e.completion for e in examples], load_catalog(CATALOG))
    assert agg["n_examples"] == len(rows)
    assert agg["in_catalog"]["mean"] == pytest.approx(sum(in_catalog) / len(rows), abs=1e-12)
    assert agg["format_valid"]["mean"] == pytest.approx(sum(format_valid) / len(rows), abs=1e-12)
    assert 0.0 < agg["recall@20"]["mean"] <= 1.0 and 0.0 < agg["ndcg@20"]["mean"] <= 1.0
