"""The documented edges of rankgrpo.metrics and rankgrpo.parsing that the main tests leave open:
return dtypes, every keyword passed through, the aggregation and the printed table, empty and
one-element inputs. Found by mutation testing (docs/testing.md, "Mutation score"); every expected
value is worked out by hand in the comments."""
import math

import numpy as np
import pytest

from rankgrpo.catalog import Catalog, CatalogItem
from rankgrpo.metrics import (aggregate, check_protocol, format_table, hits, in_catalog_ratio, mean_and_stderr,
                              ndcg_at_k, score_completion)
from rankgrpo.parsing import parse_line, parse_recommendations

HEAT = Catalog([CatalogItem("Heat", 1995), CatalogItem("Alien", 1979)])
L2 = [1 / math.log2(i + 2) for i in range(5)]  # 1, 0.6309, 0.5, ...


# ---------------------------------------------------------------------------------------
# hits: dtype, year strings, year tolerance
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["paper", "lenient"])
@pytest.mark.parametrize("positions", ["shift", "fixed"])
@pytest.mark.parametrize("recs", [[], [("Heat", 1995)], [("Nope", 2001)]])
def test_hits_are_int64_even_when_empty(protocol, positions, recs):
    h = hits(recs, [("Heat", 1995)], [], HEAT, positions=positions, protocol=protocol)
    assert h.dtype == np.int64


@pytest.mark.parametrize("protocol", ["paper", "lenient"])
def test_pairs_with_a_missing_or_non_numeric_year_score_zero(protocol):
    # (title, year) pairs: the year may be an int or a string of digits; None or text is "not parsed"
    recs = [("Heat", None), ("Heat", "n/a"), ("Heat", "1995"), ("Alien", 1979)]
    assert hits(recs, [("Heat", 1995), ("Alien", 1979)], [], HEAT, positions="fixed",
                protocol=protocol).tolist() == [0, 0, 1, 1]


def test_a_signed_year_string_is_an_int():
    odd = Catalog([CatalogItem("Odd", -5)])
    assert hits([("Odd", "-5")], [("Odd", -5)], [], odd, positions="fixed").tolist() == [1]


def test_lenient_year_tolerance_reaches_the_catalog_lookup():
    # the catalog has Heat 1995 only; the ground truth and the item say 1996
    recs, gt = [("Heat", 1996)], [("Heat", 1996)]
    assert hits(recs, gt, [], HEAT, positions="fixed", protocol="lenient").tolist() == [1]      # within 2
    assert hits(recs, gt, [], HEAT, positions="fixed", protocol="lenient", year_tolerance=0).tolist() == [0]


def test_invalid_choices_name_the_argument():
    with pytest.raises(ValueError, match="protocol must be one of"):
        check_protocol("strict")
    with pytest.raises(ValueError, match="positions must be 'shift' or 'fixed'"):
        hits([], [], [], HEAT, positions="sorted")
    with pytest.raises(ValueError, match="ideal must be 'standard' or 'official'"):
        ndcg_at_k(np.array([1]), 1, 5, ideal="best")


# ---------------------------------------------------------------------------------------
# NDCG, in-catalog ratio, score_completion
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ideal", ["standard", "official"])
def test_ndcg_at_zero_is_zero(ideal):
    # k = 0: no ideal slot, IDCG = 0, so the score is 0 (not a division by zero)
    assert ndcg_at_k(np.array([1, 1]), 2, 0, ideal=ideal) == 0.0


def test_in_catalog_year_tolerance_is_passed_on():
    items = parse_recommendations("Heat (1996)")  # the catalog's Heat is 1995
    for protocol in ("paper", "lenient"):
        assert in_catalog_ratio(items, HEAT, protocol=protocol) == 1.0
        assert in_catalog_ratio(items, HEAT, protocol=protocol, year_tolerance=0) == 0.0


def test_score_completion_by_hand():
    items = parse_recommendations("Nope (2001)\nHeat (1995)\n- Alien (1979)")
    row = score_completion(items, [("Heat", 1995), ("Alien", 1979)], [], HEAT, ks=(1, 5), n_items=4)
    # paper protocol: Nope is out of the catalog, the list shifts to [Heat, Alien] -> hits [1, 1];
    # official IDCG@1 = 1, IDCG@5 = 1 + 1/log2(3) = DCG@5; in-catalog 2 of 3 parsed; 2 exact lines
    # ("- Alien" is decorated) over max(n_items = 4, 3 lines); rank_hits at fixed positions, padded to 4
    assert row == {"recall@1": 0.5, "recall@5": 1.0, "ndcg@1": 1.0, "ndcg@5": pytest.approx(1.0),
                   "in_catalog": pytest.approx(2 / 3), "format_valid": 0.5, "n_items": 3,
                   "rank_hits": [0, 1, 1, 0]}


def test_score_completion_passes_positions_on():
    items = parse_recommendations("Nope (2001)\nHeat (1995)")
    gt = [("Heat", 1995)]
    assert score_completion(items, gt, [], HEAT, ks=(5,))["ndcg@5"] == 1.0            # shifted: [1]
    # fixed: [0, 1] -> DCG = 1/log2(3); official IDCG over min(1, 2, 5) = 1 slot
    assert score_completion(items, gt, [], HEAT, ks=(5,), positions="fixed")["ndcg@5"] == pytest.approx(L2[1])


def test_score_completion_passes_year_tolerance_on():
    items = parse_recommendations("Heat (1995)")
    row = score_completion(items, [("Heat", 1996)], [], HEAT, ks=(5,))
    assert row["recall@5"] == 1.0 and row["rank_hits"][0] == 1                    # |1996 - 1995| <= 2
    row = score_completion(items, [("Heat", 1996)], [], HEAT, ks=(5,), year_tolerance=0)
    assert row["recall@5"] == 0.0 and row["rank_hits"][0] == 0
    off = parse_recommendations("Heat (1997)")                                     # in the catalog within 2
    assert score_completion(off, [], [], HEAT, ks=(5,))["in_catalog"] == 1.0
    assert score_completion(off, [], [], HEAT, ks=(5,), year_tolerance=0)["in_catalog"] == 0.0


def test_score_completion_in_catalog_follows_protocol_and_n_items():
    # two blank lines, then Heat: the paper rule counts the first n_items PARSED items (Heat: 1/1),
    # the lenient rule the parsed items among the first n_items LINES (none: 0)
    items = parse_recommendations("\n\nHeat (1995)")
    assert score_completion(items, [], [], HEAT, ks=(5,), n_items=2)["in_catalog"] == 1.0
    assert score_completion(items, [], [], HEAT, ks=(5,), n_items=2, protocol="lenient")["in_catalog"] == 0.0
    assert score_completion(items, [], [], HEAT, ks=(5,), protocol="lenient")["in_catalog"] == 1.0


# ---------------------------------------------------------------------------------------
# Aggregation over examples and the table
# ---------------------------------------------------------------------------------------

def test_mean_and_stderr_small_inputs():
    assert mean_and_stderr([]) == (0.0, 0.0)
    assert mean_and_stderr([3.0]) == (3.0, 0.0)
    # [1, 2, 3, 4]: mean 2.5, sample variance 5/3, stderr sqrt(5/3) / 2 = 0.6455
    m, se = mean_and_stderr([1, 2, 3, 4])
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)


def test_aggregate_by_hand():
    assert aggregate([]) == {"n_examples": 0}
    rows = [{"recall@5": 1.0, "n_items": 3, "exact": True, "id": "a", "rank_hits": [1, 0]},
            {"recall@5": 0.0, "n_items": 5, "exact": False, "id": "b", "rank_hits": [1, 1]}]
    # recall: mean 0.5, sample std sqrt(0.5), stderr sqrt(0.5)/sqrt(2) = 0.5; n_items: mean 4, stderr 1;
    # booleans and strings are not averaged; the hit curve is averaged per rank
    assert aggregate(rows) == {"n_examples": 2, "n_clusters": 2,
                               "recall@5": {"mean": 0.5, "stderr": pytest.approx(0.5)},
                               "n_items": {"mean": 4.0, "stderr": pytest.approx(1.0)},
                               "rank_hit_rate": [1.0, 0.5]}
    assert "rank_hit_rate" not in aggregate([{"recall@5": 1.0}])


def test_aggregate_clusters_its_standard_errors():
    rows = [{"m": 1.0}, {"m": 3.0}, {"m": 2.0}, {"m": 6.0}]
    # rows 1 and 2 share a prompt: cluster sums -2, -1, 3 -> stderr^2 = 3/2 * 14 / 16 (rankgrpo.stats)
    out = aggregate(rows, clusters=["p", "p", "q", "r"])
    assert out["n_clusters"] == 3 and out["m"]["mean"] == 3.0
    assert out["m"]["stderr"] == pytest.approx((1.5 * 14 / 16) ** 0.5, abs=1e-15)
    assert aggregate(rows)["m"]["stderr"] == pytest.approx((14 / 3 / 4) ** 0.5, abs=1e-15)


def test_format_table_by_hand():
    rows = {"zero-shot": {"recall@5": {"mean": 0.25, "stderr": 0.05}, "ndcg@5": {"mean": 0.125, "stderr": 0.0125},
                          "in_catalog": {"mean": 1.0, "stderr": 0.0}, "format_valid": {"mean": 0.5, "stderr": 0.25}},
            "sft": {"recall@5": {"mean": 0.5}}}  # a missing stderr or metric prints nan
    assert format_table(rows, ks=(5,)).split("\n") == [
        "run       |              R@5 |              N@5 |            InCat |           Format",
        "-------------------------------------------------------------------------------------",
        "zero-shot |   0.2500 ±0.0500 |   0.1250 ±0.0125 |   1.0000 ±0.0000 |   0.5000 ±0.2500",
        "sft       |      0.5000 ±nan |         nan ±nan |         nan ±nan |         nan ±nan",
    ]
    assert format_table(rows, ks=(5,), stderr=False).split("\n") == [
        "run       |     R@5 |     N@5 |   InCat |  Format",
        "-------------------------------------------------",
        "zero-shot |  0.2500 |  0.1250 |  1.0000 |  0.5000",
        "sft       |  0.5000 |     nan |     nan |     nan",
    ]
    # the default columns: R@5, R@10, R@15, R@20, N@5, ..., N@20, in-catalog, format; names shorter than "run"
    head, rule, line = format_table({"a": {}}).split("\n")
    assert head.split(" | ") == ["run", *(f"{h:>16}" for h in ("R@5", "R@10", "R@15", "R@20", "N@5", "N@10",
                                                              "N@15", "N@20", "InCat", "Format"))]
    assert rule == "-" * len(head) and line.startswith("a   | ")


# ---------------------------------------------------------------------------------------
# Parsing: quotes and a heading behind a number
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    ('""', ("", None)),                     # just a pair of quotes: an empty title
    ('"', ('"', None)),                     # one quote is not a pair
    ("'Heat (1995)'", ("Heat", 1995)),
    ("XXX", ("XXX", None)),                 # only quote characters are stripped
    ("1. ## Heat (1995)", ("Heat", 1995)),  # a markdown heading behind the number
])
def test_quotes_and_headings(line, expected):
    assert parse_line(line) == expected
