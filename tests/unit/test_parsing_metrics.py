"""The one parse, hits in both position modes, Recall/NDCG by hand, causal returns (issue 1/7)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankgrpo.catalog import Catalog, CatalogItem
from rankgrpo.metrics import (format_valid_ratio, hits, in_catalog_ratio, ndcg_at_k, recall_at_k,
                              score_completion)
from rankgrpo.parsing import format_recommendations, parse_recommendations
from rankgrpo.rewards import causal_returns, rank_relevance, sequence_dcg

CATALOG = Catalog([CatalogItem(t, y) for t, y in [("Heat", 1995), ("Alien", 1979), ("Ran", 1985),
                                                   ("Big Fish", 2003), ("Se7en", 1995), ("The Thing", 1982)]])
GT = [("Heat", 1995), ("Big Fish", 2003), ("Se7en", "1995"), ("The Thing", 1982)]
SEEN = ["Ran"]
COMPLETION = "\n".join([
    "1. **Heat (1995)**",   # rank 0: markdown-numbered, hit
    "Alien",                # rank 1: no year -> unparseable
    "",                     # rank 2: blank line
    "Ran (1985)",           # rank 3: seen
    "Nope Movie (2001)",    # rank 4: out of catalog
    "Big Fish (2005)",      # rank 5: year off by 2 -> hit
    "Se7en (1998)",         # rank 6: year off by 3 -> not this film (out of catalog within +-2) -> miss
    "Heat (1995)",          # rank 7: duplicate of a hit -> 0
])
L2 = [1 / math.log2(i + 2) for i in range(20)]  # 1, 0.6309, 0.5, 0.4307, ...


def test_parse_worked_example():
    items = parse_recommendations(COMPLETION)
    assert [(i.rank, i.title, i.year, i.valid) for i in items] == [
        (0, "Heat", 1995, True), (1, "Alien", None, False), (2, "", None, False), (3, "Ran", 1985, True),
        (4, "Nope Movie", 2001, True), (5, "Big Fish", 2005, True), (6, "Se7en", 1998, True),
        (7, "Heat", 1995, True)]
    assert [i.exact for i in items] == [False, False, False, True, True, True, True, True]
    for it in items:
        assert COMPLETION[it.start:it.end] == COMPLETION.split("\n")[it.rank]


@pytest.mark.parametrize("line,expected", [
    ('"The Thing (1982)"', ("The Thing", 1982)),
    ("- *Heat* (1995)", ("Heat", 1995)),
    ("### 12) Alien (1979)", ("Alien", 1979)),
    ("Blade Runner (Final Cut) (1982)", ("Blade Runner", 1982)),
    ("Heat (1995) - a great heist film", ("Heat", 1995)),
    ("Heat(1995)", ("Heat(1995)", None)),          # the authors' pattern needs a space before "("
    ("The Wall (201)", ("The Wall (201)", None)),  # not a four-digit year
    ("Oldie (0999)", ("Oldie (0999)", None)),       # four digits but impossible -> invalid
])
def test_parse_line_cleaning(line, expected):
    (item,) = parse_recommendations(line)
    assert (item.title, item.year) == expected
    assert item.valid == (expected[1] is not None)


def test_trailing_newline_is_an_empty_last_rank():
    items = parse_recommendations("Heat (1995)\n")
    assert len(items) == 2 and items[1].title == "" and not items[1].valid
    assert (items[1].start, items[1].end) == (12, 12)


def test_hits_fixed_and_shift_by_hand_paper():
    # The authors' rule: Big Fish (2005) and Se7en (1998) are not exact catalog rows -> dropped.
    items = parse_recommendations(COMPLETION)
    assert hits(items, GT, SEEN, CATALOG, positions="fixed").tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    shift = hits(items, GT, SEEN, CATALOG)
    assert shift.tolist() == [1, 0]  # kept: Heat, Heat (repeat: the first Heat already took the GT)
    assert recall_at_k(shift, 4, 5) == pytest.approx(1 / 4)
    # official IDCG: the filtered list has 2 items -> 2 ideal slots, 1 + 1/log2(3) = 1.6309
    assert ndcg_at_k(shift, 4, 5, ideal="official") == pytest.approx(1 / (1 + L2[1]))
    assert ndcg_at_k(shift, 4, 5, ideal="official") == pytest.approx(0.6131472)
    row = score_completion(items, GT, SEEN, CATALOG)
    assert row["ndcg@5"] == pytest.approx(0.6131472) and row["recall@20"] == pytest.approx(0.25)


def test_hits_fixed_and_shift_by_hand():
    items = parse_recommendations(COMPLETION)
    fixed = hits(items, GT, SEEN, CATALOG, positions="fixed", protocol="lenient")
    assert fixed.tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    shift = hits(items, GT, SEEN, CATALOG, positions="shift", protocol="lenient")
    assert shift.tolist() == [1, 1, 0]  # kept: Heat, Big Fish (2005), Heat (repeat)

    # Recall@5: fixed sees 1 hit in ranks 0..4; shift sees both hits. |GT| = 4.
    assert recall_at_k(fixed, 4, 5) == pytest.approx(1 / 4)
    assert recall_at_k(shift, 4, 5) == pytest.approx(2 / 4)
    # NDCG@5, standard IDCG over min(4, 5) = 4 positions: 1 + 1/log2(3) + 1/log2(4) + 1/log2(5) = 2.56161
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
    assert idcg == pytest.approx(2.5616063)
    assert ndcg_at_k(fixed, 4, 5) == pytest.approx(1 / idcg)
    assert ndcg_at_k(shift, 4, 5) == pytest.approx((1 + 1 / math.log2(3)) / idcg)
    assert ndcg_at_k(shift, 4, 5) == pytest.approx(0.6366824)
    # The authors' IDCG: ideal list as long as the filtered list (3), 3 ones, cut at min(5, 3).
    assert ndcg_at_k(shift, 4, 5, ideal="official") == pytest.approx((1 + L2[1]) / (1 + L2[1] + L2[2]))
    assert ndcg_at_k(shift, 4, 5, ideal="official") == pytest.approx(0.7653606)


def test_ratios_by_hand():
    items = parse_recommendations(COMPLETION)
    # parsed: Heat, Ran, Nope Movie, Big Fish 2005, Se7en 1998, Heat -> in catalog: Heat, Ran, Big Fish, Heat
    # (Big Fish 2005 is within 2 years of the catalog's 2003 in both protocols; Se7en 1998 is 3 off.)
    assert in_catalog_ratio(items, CATALOG) == pytest.approx(4 / 6)
    assert in_catalog_ratio(items, CATALOG, protocol="lenient") == pytest.approx(4 / 6)
    # 5 exact lines (ranks 3..7) out of max(N=20, 8 lines)
    assert format_valid_ratio(items) == pytest.approx(5 / 20)
    assert format_valid_ratio(parse_recommendations("\n".join(["Heat (1995)"] * 21))) == pytest.approx(20 / 21)
    row = score_completion(items, GT, SEEN, CATALOG, protocol="lenient")
    assert row["rank_hits"][:8] == [1, 0, 0, 0, 0, 1, 0, 0] and len(row["rank_hits"]) == 20
    assert row["recall@5"] == pytest.approx(0.5)
    row = score_completion(items, GT, SEEN, CATALOG)
    assert row["rank_hits"][:8] == [1, 0, 0, 0, 0, 0, 0, 0] and row["recall@5"] == pytest.approx(0.25)


def test_one_to_one_matching_and_multiset_groundtruth():
    cat = Catalog([CatalogItem("Heat", 1995)])
    items = [("Heat", 1995), ("heat", 1995), ("HEAT", 1996)]
    assert hits(items, [("Heat", 1995)], [], cat, positions="fixed", protocol="lenient").tolist() == [1, 0, 0]
    # two responders named the same film: both copies can be hit once each
    assert hits(items, [("Heat", 1995), ("Heat", 1995)], [], cat, positions="fixed",
                protocol="lenient").tolist() == [1, 1, 0]
    # the authors': only the exact ("Heat", 1995) passes the catalog filter, and both ground
    # truths mark that first copy
    assert hits(items, [("Heat", 1995), ("Heat", 1995)], [], cat, positions="fixed").tolist() == [1, 0, 0]


def test_exact_year_is_preferred_over_a_neighbour():
    cat = Catalog([CatalogItem("Dune", 1984), CatalogItem("Dune", 1985)])
    # GT has both remakes; a recommendation for 1985 consumes the 1985 one, the 1984 one stays
    assert hits([("Dune", 1985), ("Dune", 1984)], [("Dune", 1984), ("Dune", 1985)], [], cat,
                positions="fixed", protocol="lenient").tolist() == [1, 1]
    # the authors' loop has no exact-year preference: both ground truths mark the first Dune
    assert hits([("Dune", 1985), ("Dune", 1984)], [("Dune", 1984), ("Dune", 1985)], [], cat,
                positions="fixed").tolist() == [1, 0]


def test_empty_and_no_groundtruth():
    assert recall_at_k(np.array([]), 3, 5) == 0.0 and ndcg_at_k(np.array([]), 3, 5) == 0.0
    assert ndcg_at_k(np.array([]), 3, 5, ideal="official") == 0.0
    assert recall_at_k(np.array([1]), 0, 5) == 0.0 and ndcg_at_k(np.array([1]), 0, 5) == 0.0


def test_rank_relevance_uses_fixed_positions_and_pads():
    rel = rank_relevance(parse_recommendations(COMPLETION), GT, SEEN, CATALOG, n_items=10)
    assert rel.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    over = "\n".join(["Big Fish (2003)"] * 3 + ["Heat (1995)"])
    assert rank_relevance(parse_recommendations(over), GT, [], CATALOG, n_items=3).tolist() == [1, 0, 0]


def test_causal_returns_by_hand():
    rel = np.array([1.0, 0.0, 1.0, 0.0])
    assert causal_returns(rel, "exp_inf").tolist() == [1, 0, 1, 0]
    assert causal_returns(rel, "exp", gamma=2.0).tolist() == [1.25, 0.5, 1.0, 0.0]
    np.testing.assert_allclose(causal_returns(rel, "dcg"), [1 + 0.5, 0.5, 0.5, 0.0])
    assert sequence_dcg(rel) == pytest.approx(1.5)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(causal_returns(t, "exp", gamma=2.0), torch.tensor([[1.25, 0.5, 1.0, 0.0]],
                                                                                  dtype=torch.float64))
    with pytest.raises(ValueError):
        causal_returns(rel, "exp", gamma=1.0)
    with pytest.raises(ValueError):
        causal_returns(rel, "log")


rel_arrays = st.lists(st.integers(0, 1), min_size=1, max_size=20).map(lambda v: np.array(v, dtype=np.float64))


@settings(max_examples=200, deadline=None)
@given(rel=rel_arrays)
def test_return_properties(rel):
    assert causal_returns(rel, "dcg")[0] == pytest.approx(sequence_dcg(rel))      # DCG@1:N = DCG@N
    np.testing.assert_array_equal(causal_returns(rel, "exp_inf"), rel)
    np.testing.assert_allclose(causal_returns(rel, "exp", gamma=1e9), rel, atol=1e-8)  # Gamma -> inf
    batch = np.stack([rel, rel[::-1].copy()])
    torch.testing.assert_close(causal_returns(torch.from_numpy(batch), "dcg"),
                               torch.from_numpy(causal_returns(batch, "dcg")))
    # causality: changing relevance at ranks j < k never changes the return of rank k
    for kind, g in (("exp_inf", None), ("dcg", None), ("exp", 3.0)):
        r = causal_returns(rel, kind, g)
        changed = rel.copy()
        changed[: len(rel) // 2] = 1 - changed[: len(rel) // 2]
        np.testing.assert_allclose(causal_returns(changed, kind, g)[len(rel) // 2:], r[len(rel) // 2:])


titles = st.text(alphabet=st.sampled_from(list("abcXYZ &:'-!é0123456789")), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(hit_list=st.lists(st.integers(0, 1), max_size=25), n_gt=st.integers(1, 10), k=st.integers(1, 25))
def test_metric_bounds(hit_list, n_gt, k):
    h = np.array(hit_list)
    h[np.cumsum(h) > n_gt] = 0  # a list cannot hold more hits than ground truths
    assert 0.0 <= recall_at_k(h, n_gt, k) <= 1.0
    for ideal in ("standard", "official"):
        assert 0.0 <= ndcg_at_k(h, n_gt, k, ideal) <= 1.0 + 1e-12


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab (19)\n*-#1.\"'é ")), max_size=60))
def test_spans_slice_back_to_lines(text):
    items = parse_recommendations(text)
    assert [text[i.start:i.end] for i in items] == text.split("\n")
    assert [i.rank for i in items] == list(range(len(items)))


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(titles, st.integers(1900, 2024)), min_size=1, max_size=20))
def test_format_parse_round_trip(pairs):
    pairs = [(" ".join(t.split()), y) for t, y in pairs]
    pairs = [(t, y) for t, y in pairs if t and parse_recommendations(f"{t} ({y})")[0].title == t]
    if not pairs:
        return
    text = format_recommendations(pairs)
    assert not text.endswith("\n")
    items = parse_recommendations(text)
    assert [(i.title, i.year) for i in items] == pairs and all(i.exact for i in items)
    assert parse_recommendations(format_recommendations(items)) == items


def test_paired_difference_by_hand():
    from rankgrpo.metrics import paired_difference

    a = {"x": {"m": 0.5}, "y": {"m": 0.2}, "z": {"m": 0.3}, "only_in_a": {"m": 9.0}}
    b = {"x": {"m": 0.1}, "y": {"m": 0.2}, "z": {"m": 0.0}}
    d = paired_difference(a, b, "m")  # differences 0.4, 0.0, 0.3 over the three shared ids
    sd = ((0.4 - 0.7 / 3) ** 2 + (0.7 / 3) ** 2 + (0.3 - 0.7 / 3) ** 2) ** 0.5 / 2 ** 0.5
    assert d["n"] == 3 and abs(d["mean"] - 0.7 / 3) < 1e-12
    assert abs(d["stderr"] - sd / 3 ** 0.5) < 1e-12 and abs(d["z"] - d["mean"] / d["stderr"]) < 1e-12
    assert paired_difference(b, b, "m") == {"mean": 0.0, "stderr": 0.0, "z": 0.0, "n": 3, "n_clusters": 3}
