"""The documented edges of rankgrpo.rewards that the main tests leave open: the defaults, the year
tolerance reaching the matcher, the authors' one-to-one consumption of ground truths, and the
returns' type, dtype, device and memory. Found by mutation testing (docs/testing.md, "Mutation
score"); expected values are worked out by hand in the comments."""
import numpy as np
import pytest
import torch

from rankgrpo.catalog import Catalog, CatalogItem
from rankgrpo.parsing import parse_recommendations
from rankgrpo.rewards import authors_rank_relevance, causal_returns, rank_relevance

CATALOG = Catalog([CatalogItem("Heat", 1995), CatalogItem("Heat", 1997), CatalogItem("Alien", 1979)])


def lines(*titles):
    return parse_recommendations("\n".join(titles))


# ---------------------------------------------------------------------------------------
# Relevance: defaults and the year tolerance
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("matching", ["in_place", "parsed_list"])
def test_relevance_defaults_to_20_ranks_and_2_years(matching):
    items = lines("Heat (1995)", "Heat (1995)")
    rel = rank_relevance(items, [("Heat", 1993), ("Heat", 1992)], [], CATALOG, matching=matching)
    # 1995 - 1993 = 2 is within the default tolerance, 1995 - 1992 = 3 is not: one hit, 20 ranks
    assert rel.shape == (20,) and rel.dtype == np.float64 and rel.tolist() == [1.0] + [0.0] * 19
    assert authors_rank_relevance(items, [("Heat", 1993), ("Heat", 1992)], [], CATALOG).tolist() == rel.tolist()


def test_in_place_year_tolerance_reaches_the_matcher():
    # the catalog has Heat 1995 (and 1997), the line and the ground truth say 1996
    items, gt = lines("Heat (1996)"), [("Heat", 1996)]
    assert rank_relevance(items, gt, [], CATALOG, n_items=1).tolist() == [1.0]
    assert rank_relevance(items, gt, [], CATALOG, n_items=1, year_tolerance=0).tolist() == [0.0]


def test_parsed_list_year_tolerance_reaches_the_matcher():
    # an exact catalog row, a ground truth one year later
    items, gt = lines("Heat (1995)"), [("Heat", 1996)]
    assert rank_relevance(items, gt, [], CATALOG, n_items=1, matching="parsed_list").tolist() == [1.0]
    assert rank_relevance(items, gt, [], CATALOG, n_items=1, matching="parsed_list",
                          year_tolerance=0).tolist() == [0.0]


# ---------------------------------------------------------------------------------------
# The authors' matching: one ground truth per hit
# ---------------------------------------------------------------------------------------

def authors(items, gt):
    return authors_rank_relevance(items, gt, [], CATALOG, n_items=len(items)).tolist()


def test_authors_relevance_needs_the_ground_truth_title():
    # a catalog film that is not a ground truth scores 0, also when another ground truth has its year
    assert authors(lines("Heat (1995)"), [("Alien", 1995)]) == [0.0]
    assert authors(lines("Heat (1995)"), []) == [0.0]


def test_authors_relevance_consumes_each_ground_truth_once():
    heat3 = lines("Heat (1995)", "Heat (1995)", "Heat (1995)")
    assert authors(heat3, [("Heat", 1995)]) == [1.0, 0.0, 0.0]
    assert authors(heat3, [("Heat", 1995), ("Heat", 1995)]) == [1.0, 1.0, 0.0]   # a multiset
    # a ground truth matched one year off (1996 for 1995) is consumed too
    assert authors(lines("Heat (1995)", "Heat (1995)"), [("Heat", 1996)]) == [1.0, 0.0]
    assert authors(lines("Heat (1995)", "Heat (1995)"), [("Heat", 1994)]) == [1.0, 0.0]


def test_authors_relevance_tries_plus_one_before_minus_one():
    # Heat 1995 takes the 1996 ground truth (+1 before -1), so Heat 1997 finds 1996 consumed and
    # 1998, 1999, 1995 absent: [1, 0]. Trying -1 first would leave 1996 for Heat 1997: [1, 1].
    assert authors(lines("Heat (1995)", "Heat (1997)"), [("Heat", 1994), ("Heat", 1996)]) == [1.0, 0.0]


# ---------------------------------------------------------------------------------------
# Causal returns: default kind, type, dtype, device, memory
# ---------------------------------------------------------------------------------------

REL = [1.0, 0.0, 1.0, 0.0]
EXPECTED = {"exp_inf": [1.0, 0.0, 1.0, 0.0], "exp": [1.25, 0.5, 1.0, 0.0], "dcg": [1.5, 0.5, 0.5, 0.0]}
KINDS = [("exp_inf", None), ("exp", 2.0), ("dcg", None)]


def test_the_default_kind_is_exp_inf():
    rel = np.array(REL)
    assert causal_returns(rel).tolist() == REL
    assert causal_returns(torch.tensor(REL)).tolist() == REL


def test_returns_never_share_memory_with_the_input():
    rel = np.array(REL)
    out = causal_returns(rel, "exp_inf")
    assert not np.shares_memory(out, rel)
    out[0] = 5.0
    assert rel[0] == 1.0
    t = torch.tensor(REL)
    assert causal_returns(t, "exp_inf").data_ptr() != t.data_ptr()


@pytest.mark.parametrize("kind,gamma", KINDS)
def test_numpy_returns_are_float64(kind, gamma):
    out = causal_returns(np.array(REL, dtype=np.float32), kind, gamma)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, EXPECTED[kind], rtol=1e-6)


@pytest.mark.parametrize("kind,gamma", KINDS)
def test_torch_returns_keep_the_dtype(kind, gamma):
    for dtype in (torch.float32, torch.float64):
        out = causal_returns(torch.tensor([REL, REL[::-1]], dtype=dtype), kind, gamma)
        assert torch.is_tensor(out) and out.dtype == dtype
        torch.testing.assert_close(out[0], torch.tensor(EXPECTED[kind], dtype=dtype))


@pytest.mark.parametrize("kind,gamma", KINDS)
def test_torch_returns_stay_on_the_device(kind, gamma):
    # the meta device stands in for an accelerator: mixing it with a CPU tensor is an error
    out = causal_returns(torch.zeros(2, 4, device="meta"), kind, gamma)
    assert out.device.type == "meta" and out.shape == (2, 4)


def test_bad_kinds_name_the_problem():
    with pytest.raises(ValueError, match="kind='exp' needs gamma > 1, got 1.0"):
        causal_returns(np.array(REL), "exp", gamma=1.0)
    with pytest.raises(ValueError, match="unknown reward kind 'log'"):
        causal_returns(np.array(REL), "log")
