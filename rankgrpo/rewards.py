"""Per-rank relevance and the causal returns of Rank-GRPO (§2.3.1, Eq. 5, 8, 9).

``rel[..., k]`` is 1 when the item at rank k is a not-yet-hit ground truth (fixed
positions: seen, out-of-catalog, unparseable, repeated and missing ranks are 0). The
return of rank k only looks at ranks j >= k (the causal part of DCG, Eq. 5), so an
action is never credited for items placed before it.

Worked example (N = 4, 0-based ranks, rel = [1, 0, 1, 0]):

    exp_inf:        r = rel                              = [1, 0, 1, 0]
    exp, Gamma = 2: r_k = sum_{j>=k} rel_j / 2^(j-k)     = [1.25, 0.5, 1, 0]
    dcg (Eq. 8):    r_k = sum_{j>=k} rel_j / log2(j+2)   = [1.5, 0.5, 0.5, 0]
    sequence_dcg:   DCG@N = 1/log2(2) + 1/log2(4)        = 1.5  (= dcg return of rank 0)
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from rankgrpo.catalog import Catalog, year_offsets
from rankgrpo.metrics import hits
from rankgrpo.parsing import Item, parse_line

REWARD_KINDS = ("exp_inf", "exp", "dcg")
REWARD_MATCHINGS = ("in_place", "parsed_list")


def rank_relevance(items: Sequence[Item], groundtruth, seen_titles, catalog: Catalog, *, n_items: int = 20,
                   year_tolerance: int = 2, matching: str = "in_place") -> np.ndarray:
    """rel_k for k < n_items from the one parse (§2.3.1): ``float64 [n_items]``.

    matching="in_place" (default, §2.3.1 as written): line k of the completion is rank k, and
    its rule is ``hits(..., positions="fixed", protocol="lenient")``: normalised titles
    (``normalize_title``) also in the seen filter, year-tolerant catalog lookup, ground truths
    consumed on match, exact year first. It is not the evaluation's default (the authors'
    ``evaluate_direct_match``). Ranks past the last line are 0; lines past ``n_items``
    (overflow) are ignored here and handled by length shaping in the loss.

    matching="parsed_list": the authors' reward (``libs/metrics_align.py``,
    ``evaluate_direct_match_aligned``, on the list of ``libs/utils.py::process_rec_raw``), see
    ``authors_rank_relevance``. Position k is the k-th PARSED item, not line k.
    """
    if matching == "parsed_list":
        return authors_rank_relevance(items, groundtruth, seen_titles, catalog, n_items=n_items,
                                      year_tolerance=year_tolerance)
    if matching != "in_place":
        raise ValueError(f"matching must be one of {REWARD_MATCHINGS}, got {matching!r}")
    h = hits(list(items[:n_items]), groundtruth, seen_titles, catalog, year_tolerance=year_tolerance,
             positions="fixed", protocol="lenient")
    rel = np.zeros(n_items, dtype=np.float64)
    rel[: len(h)] = h
    return rel


def authors_parsed_items(items: Sequence[Item]) -> list[tuple[str, int]]:
    """The list ``process_rec_raw`` (``libs/utils.py``) returns, from the one parse: (title, year)
    of every line that parses to "<title> (<YYYY>)", in order. Blank lines and lines without a
    four-digit year in parentheses are dropped, so later items move up. A four-digit year outside
    the plausible range (``Item.valid`` is False) still parses there, so it keeps its place in the
    list (the catalog filter then scores it 0).

    >>> from rankgrpo.parsing import parse_recommendations
    >>> authors_parsed_items(parse_recommendations("Heat (1995)\\n\\nno year\\nAlien (1979)\\nX (0123)"))
    [('Heat', 1995), ('Alien', 1979), ('X', 123)]
    """
    out = []
    for it in items:
        if it.valid:
            out.append((it.title, it.year))
        elif it.title:
            title, year = parse_line(it.title)  # an implausible year: the cleaned line text, parsed again
            if year is not None:
                out.append((title, year))
    return out


def authors_rank_relevance(items: Sequence[Item], groundtruth, seen_titles, catalog: Catalog, *,
                           n_items: int = 20, year_tolerance: int = 2) -> np.ndarray:
    """rel_k as the authors' reward computes it: ``float64 [n_items]``, k indexing PARSED items.

    The authors' ``libs/metrics_align.py::evaluate_direct_match_aligned`` scores the list of
    ``libs/utils.py::process_rec_raw`` (``authors_parsed_items``). Position k is 1 when the k-th
    parsed item
      1. has a raw title that is not exactly one of ``seen_titles`` (exact string),
      2. is a catalog row as the exact pair (title, int year) (``Catalog.contains_exact``: no case
         folding, no whitespace change, no year tolerance),
      3. and its title equals a not-yet-consumed ground-truth title after whitespace collapse,
         strip and ``casefold()`` (no Unicode NFKC), with that ground truth's year within
         ``year_tolerance`` of the item's, tried exact, +1, -1, +2, -2; the ground truth is
         consumed.
    Positions past the parsed list are 0; parsed items past ``n_items`` are ignored.

    Reading of "exact title and year strings": the ground-truth comparison itself folds case and
    tolerates ±2 years, but rule 2 admits only an item written exactly as a catalog row, title
    and year, so a case or spacing variant, or a year off the catalog's, scores 0 where
    ``matching="in_place"`` (normalised catalog lookup within ±2 years) would score it.

    The rank shift: the loss gives advantage k to the tokens of LINE k
    (``_segment_items_from_tokens`` counts every "\\n"), so after a blank or unparseable line
    every later reward lands on the line above the one it scored. It is a defect of the
    authors' code, reproduced here because it shaped the paper's numbers. (A parse error in
    their code zeroes all rewards; the one parse here never raises.)

    >>> from rankgrpo.catalog import CatalogItem
    >>> from rankgrpo.parsing import parse_recommendations
    >>> cat = Catalog([CatalogItem("Heat", 1995), CatalogItem("Alien", 1979)])
    >>> items = parse_recommendations("heat (1995)\\n\\nAlien (1979)")
    >>> authors_rank_relevance(items, [("Heat", 1995), ("Alien", 1979)], [], cat, n_items=3).tolist()
    [0.0, 1.0, 0.0]
    """
    seen = set(seen_titles)
    remaining: dict[tuple[str, int], int] = defaultdict(int)
    for title, year in groundtruth:
        remaining[(_casefold_spaces(title), int(year))] += 1
    rel = np.zeros(n_items, dtype=np.float64)
    for k, (title, year) in enumerate(authors_parsed_items(items)[:n_items]):
        if title in seen or not catalog.contains_exact(title, year):
            continue
        norm = _casefold_spaces(title)
        for d in year_offsets(year_tolerance):
            if remaining.get((norm, year + d), 0) > 0:
                remaining[(norm, year + d)] -= 1
                rel[k] = 1.0
                break
    return rel


def _casefold_spaces(title: str) -> str:
    """The authors' reward normalisation: whitespace runs collapsed to one space, stripped, casefolded."""
    return " ".join(str(title).split()).casefold()


def _discounts(n: int, like) -> np.ndarray | torch.Tensor:
    d = 1.0 / np.log2(np.arange(n) + 2.0)
    return torch.as_tensor(d, dtype=like.dtype, device=like.device) if torch.is_tensor(like) else d


def _reverse_cumsum(x):
    if torch.is_tensor(x):
        return x.flip(-1).cumsum(-1).flip(-1)
    return np.flip(np.cumsum(np.flip(x, -1), -1), -1).copy()


def causal_returns(rel, kind: str = "exp_inf", gamma: float | None = None):
    """Per-rank returns r(x, y^(k)) from relevance ``rel: [..., N]`` (numpy or torch, float).

    kind="exp_inf": r_k = rel_k (Gamma -> infinity; the paper's headline reward).
    kind="exp":     r_k = sum_{j>=k} rel_j / gamma^(j-k), gamma > 1 (Eq. 9).
    kind="dcg":     r_k = DCG@k:N = sum_{j>=k} rel_j / log2(j+2), 0-based j (Eq. 8; "log").
    Returns the same shape and type as ``rel``.
    """
    if kind == "exp_inf":
        return rel.clone() if torch.is_tensor(rel) else np.array(rel, dtype=np.float64, copy=True)
    if kind == "dcg":
        return _reverse_cumsum(rel * _discounts(rel.shape[-1], rel))
    if kind == "exp":
        if gamma is None or not gamma > 1:
            raise ValueError(f"kind='exp' needs gamma > 1, got {gamma!r}")
        n = rel.shape[-1]
        j = np.arange(n)
        # W[k, j] = gamma^-(j-k) for j >= k, else 0;  r = rel @ W^T
        w = np.where(j[None, :] >= j[:, None], float(gamma) ** -(j[None, :] - j[:, None]).clip(min=0), 0.0)
        if torch.is_tensor(rel):
            return rel @ torch.as_tensor(w.T, dtype=rel.dtype, device=rel.device)
        return np.asarray(rel, dtype=np.float64) @ w.T
    raise ValueError(f"unknown reward kind {kind!r}; choose from {REWARD_KINDS}")


def sequence_dcg(rel):
    """The vanilla GRPO / GSPO list reward DCG@N = sum_j rel_j / log2(j+2): ``rel.shape[:-1]``."""
    return (rel * _discounts(rel.shape[-1], rel)).sum(-1)
