"""Optional: the authors' Reddit-v2 sample and catalog, read through environment variables.

Set RANKGRPO_REDDIT_SAMPLE (JSONL in the authors' format) and RANKGRPO_REDDIT_CATALOG (the
authors' gt_catalog.pkl). The files are never part of this repository.
"""
import os

import pytest

from rankgrpo.catalog import load_catalog
from rankgrpo.data import load_examples
from rankgrpo.evaluation import score_examples
from rankgrpo.parsing import parse_recommendations

SAMPLE = os.environ.get("RANKGRPO_REDDIT_SAMPLE")
CATALOG = os.environ.get("RANKGRPO_REDDIT_CATALOG")
pytestmark = pytest.mark.skipif(not (SAMPLE and CATALOG), reason="RANKGRPO_REDDIT_SAMPLE/CATALOG not set")


def test_authors_sample_parses_and_scores():
    catalog = load_catalog(CATALOG)
    # 7,404 rows, one corrupt ('The Wall', 201) dropped and reported
    assert catalog.report.n_rows == 7404 and len(catalog) == 7403
    assert catalog.report.dropped == {"impossible year": 1}
    examples = load_examples(SAMPLE)
    assert len(examples) == 100 and all(isinstance(y, int) for e in examples for _, y in e.groundtruth)

    lines = valid = 0
    invalid_lines = []
    for ex in examples:
        for item in parse_recommendations(ex.completion):
            lines += 1
            if item.valid:
                valid += 1
                assert item.title and 1000 <= item.year <= 9999
            else:
                invalid_lines.append(ex.completion[item.start:item.end])
    # Found in the sample: 2,000 lines (20 per demonstration), all valid except the one line
    # that carries the catalog's corrupt year.
    assert (lines, valid) == (2000, 1999)
    assert invalid_lines == ["The Wall (201)"]

    agg, rows = score_examples(examples, [e.completion for e in examples], catalog)
    assert agg["n_examples"] == 100
    assert 0.0 < agg["recall@20"]["mean"] <= 1.0 and 0.0 < agg["ndcg@20"]["mean"] <= 1.0
    assert agg["in_catalog"]["mean"] == pytest.approx(1.0)  # demonstrations are catalog-grounded
    assert agg["format_valid"]["mean"] == pytest.approx(1999 / 2000)
