"""Relevance hits, Recall@k, NDCG@k, in-catalog and format-valid ratios (§2.3.1, §3).

Two protocols (``protocol=``), i.e. two rules for which recommendation hits which ground truth:

``"paper"`` (the default) -- the authors' ``libs/metrics.py::evaluate_direct_match`` exactly:

1. only parsed items count (a line with a title and a "(YYYY)");
2. seen removal: the title string is exactly one of ``seen_titles``;
3. catalog filter: the exact ``(title, int year)`` tuple is a catalog row (no case folding,
   no year tolerance);
4. the survivors shift up; then, for each ground truth in its order, the **first** survivor
   with an identical, case-sensitive title and ``|year difference| <= year_tolerance`` (2)
   is marked 1, whether or not it is already marked;
5. IDCG is the authors' (``ideal="official"``): capped by the length of the filtered list.

   Consequences, all the authors' behaviour: there is no exact-year preference (rank order
   decides), a position can absorb several ground truths, and a ground truth never moves on
   to a later copy of the same film. So two copies of a film in the list give one hit, and a
   film listed twice in the ground truth also gives one hit (Recall counts it once in the
   numerator, twice in the denominator). Recall's denominator is every ground truth,
   including those outside the catalog. An empty filtered list scores 0.

``"lenient"`` -- the same list, matched the way the training reward matches:

* titles compared after ``normalize_title`` (casefold, NFKC, whitespace), also in the seen
  filter; the catalog filter is ``Catalog.lookup`` (normalised title, year within tolerance);
* one-to-one: items are visited in rank order; each takes the first not-yet-consumed ground
  truth with its title whose year is the exact year, then +1, -1, +2, -2 (``year_offsets``);
* the textbook IDCG over min(|GT|, k) positions (``ideal="standard"``).

Dune example (ground truth [Dune 1984, Dune 1986], list [Dune 1985, Dune 1987], both in the
catalog): paper -> [1, 0] (both ground truths mark the first Dune, the first within 2 years
of each); lenient -> [1, 0] (Dune 1985 takes Dune 1986 (+1 before -1); Dune 1987 finds 1986
consumed and 1985 (-2) absent). If the years were tried lowest first, lenient would give
[1, 1]. They differ for [Dune 1985, Dune 1984] against [Dune 1984, Dune 1985]: paper [1, 0]
(the first Dune absorbs both), lenient [1, 1].

Two position views:

* ``positions="shift"`` -- the evaluation: drop unparseable, seen and out-of-catalog items, let
  the list shift up, then cut at k. Hits ``[len(kept list)]``.
* ``positions="fixed"`` -- every item keeps its generated rank; dropped items score 0 in
  place. ``protocol="lenient"`` at fixed positions is the training reward's rule
  (``rankgrpo.rewards.rank_relevance``, §2.3.1); ``protocol="paper"`` gives the
  per-rank hit curve under the authors' rule. Hits ``[len(recs)]``.

Worked example (k = 5, ground truth {Heat 1995, Alien 1979}, seen {Ran}, either protocol)::

    line                      fixed   shift list      shift hit
    1. Heat (1995)            1       Heat (1995)     1
    Ran (1985)      (seen)    0       -
    Nope (2099)     (OOC)     0       -
    Alien (1979)              1       Alien (1979)    1
    Heat (1995)     (repeat)  0       Heat (1995)     0

    Recall@5 = 2/2 = 1 in both views.
    shift NDCG@5 = (1 + 1/log2(3)) / (1 + 1/log2(3)) = 1
    fixed NDCG@5 (standard IDCG) = (1 + 1/log2(5)) / (1 + 1/log2(3)) = 1.4307 / 1.6309 = 0.8772
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from rankgrpo.catalog import Catalog, normalize_title, year_offsets
from rankgrpo.parsing import Item
from rankgrpo.stats import clustered_mean_and_stderr, mean_and_stderr, paired_difference  # noqa: F401  (public here since v1)

KS = (5, 10, 15, 20)
PROTOCOLS = ("paper", "lenient")
# The IDCG each protocol uses (see ``ndcg_at_k``).
IDEAL_OF_PROTOCOL = {"paper": "official", "lenient": "standard"}


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def _as_pairs(recs: Iterable[Item | Sequence]) -> list[tuple[str, int | None, bool]]:
    """(title, year, parsed) for Items or (title, year) pairs."""
    out = []
    for r in recs:
        if isinstance(r, Item):
            out.append((r.title, r.year, r.valid))
        else:
            title, year = r[0], r[1]
            year = int(year) if year is not None and str(year).strip().lstrip("-").isdigit() else None
            out.append((title, year, bool(title) and year is not None))
    return out


def hits(recs, groundtruth, seen_titles, catalog: Catalog, *, year_tolerance: int = 2,
         positions: str = "shift", protocol: str = "paper") -> np.ndarray:
    """0/1 relevance of each recommendation (see the module docstring for both protocols).

    recs:        Items from ``parse_recommendations`` or (title, year) pairs, in rank order.
    groundtruth: [(title, year)] in the data's order (a multiset).
    seen_titles: titles the user already mentioned (no years).
    Returns ``int64 [len(recs)]`` for ``"fixed"``, ``[len(kept list)]`` for ``"shift"``.
    """
    if positions not in ("shift", "fixed"):
        raise ValueError(f"positions must be 'shift' or 'fixed', got {positions!r}")
    check_protocol(protocol)
    pairs = _as_pairs(recs)
    if protocol == "paper":
        return _paper_hits(pairs, groundtruth, seen_titles, catalog, year_tolerance, positions)
    return _lenient_hits(pairs, groundtruth, seen_titles, catalog, year_tolerance, positions)


def _paper_hits(pairs, groundtruth, seen_titles, catalog: Catalog, year_tolerance: int, positions: str):
    """``evaluate_direct_match``'s hit vector (parse, seen and catalog filters, shift, match)."""
    seen = set(seen_titles)
    kept = [i for i, (title, year, parsed) in enumerate(pairs)
            if parsed and title not in seen and catalog.contains_exact(title, year)]
    marked = np.zeros(len(kept), dtype=np.int64)
    for gt_title, gt_year in groundtruth:
        for j, i in enumerate(kept):
            title, year, _ = pairs[i]
            if title == gt_title and abs(int(gt_year) - year) <= year_tolerance:
                marked[j] = 1
                break
    if positions == "shift":
        return marked
    out = np.zeros(len(pairs), dtype=np.int64)
    out[kept] = marked
    return out


def _lenient_hits(pairs, groundtruth, seen_titles, catalog: Catalog, year_tolerance: int, positions: str):
    """Normalised titles, year-tolerant catalog, one-to-one matching with the exact year first."""
    seen = {normalize_title(s) for s in seen_titles}
    remaining: dict[tuple[str, int], int] = defaultdict(int)
    for title, year in groundtruth:
        remaining[(normalize_title(title), int(year))] += 1

    out = []
    for title, year, parsed in pairs:
        norm = normalize_title(title)
        keep = parsed and norm not in seen and catalog.lookup(title, year, year_tolerance) is not None
        if not keep:
            if positions == "fixed":
                out.append(0)
            continue
        hit = 0
        for d in year_offsets(year_tolerance):
            key = (norm, year + d)
            if remaining.get(key, 0) > 0:
                remaining[key] -= 1
                hit = 1
                break
        out.append(hit)
    return np.asarray(out, dtype=np.int64)


def recall_at_k(hits: np.ndarray, n_groundtruth: int, k: int) -> float:
    """Recall@k = (hits in the first k) / |ground truth|; 0 when there is no ground truth."""
    if n_groundtruth <= 0:
        return 0.0
    return float(np.sum(np.asarray(hits)[:k])) / n_groundtruth


def dcg_at_k(hits: np.ndarray, k: int) -> float:
    """DCG@k = sum_{i<k} hit_i / log2(i + 2) (0-based positions)."""
    h = np.asarray(hits, dtype=np.float64)[:k]
    return float(np.sum(h / np.log2(np.arange(len(h)) + 2.0)))


def ndcg_at_k(hits: np.ndarray, n_groundtruth: int, k: int, ideal: str = "standard") -> float:
    """NDCG@k = DCG@k / IDCG@k.

    ideal="standard": IDCG over min(|GT|, k) positions (the textbook definition; the lenient
    protocol).
    ideal="official": the authors' ``ndcg_at_k`` (the paper protocol): the ideal list has the
    length of ``hits`` (the filtered list), its first min(|GT|, len) entries 1, cut at
    min(k, len) -- a short filtered list gets a smaller IDCG. An empty list scores 0 in both.
    No ground truth scores 0 (the authors' code would divide by zero).

    Example (|GT| = 3, filtered list of 2 with hits [0, 1], k = 5):
    official IDCG = 1 + 1/log2(3) (two ideal slots), NDCG = 0.6309 / 1.6309 = 0.3869;
    standard IDCG = 1 + 1/log2(3) + 1/log2(4) = 2.1309, NDCG = 0.2961.
    ``score_completion`` picks ``ideal`` from the protocol (``IDEAL_OF_PROTOCOL``).
    """
    h = np.asarray(hits)
    if n_groundtruth <= 0 or (ideal == "official" and len(h) == 0):
        return 0.0
    if ideal == "standard":
        n_ideal = min(n_groundtruth, k)
    elif ideal == "official":
        n_ideal = min(n_groundtruth, len(h), k)
    else:
        raise ValueError(f"ideal must be 'standard' or 'official', got {ideal!r}")
    idcg = float(np.sum(1.0 / np.log2(np.arange(n_ideal) + 2.0)))
    return dcg_at_k(h, k) / idcg if idcg > 0 else 0.0


def in_catalog_ratio(items: Sequence[Item], catalog: Catalog, *, year_tolerance: int = 2,
                     n_items: int = 20, protocol: str = "paper") -> float:
    """Share of parsed items that are catalog items; 0 when nothing parsed (Fig. 1, Fig. 6).

    protocol="paper": the authors' eval scripts -- the first ``n_items`` *parsed* items, each
    in the catalog when its lower-cased title equals a lower-cased catalog title whose year is
    within ``year_tolerance`` (``Catalog.contains_lowercase``).
    protocol="lenient": the parsed items among the first ``n_items`` *lines*, looked up with
    ``Catalog.lookup`` (normalised title, year within tolerance).
    Unparseable lines are never in the denominator.
    """
    check_protocol(protocol)
    if protocol == "paper":
        parsed = [it for it in items if it.valid][:n_items]
        found = [catalog.contains_lowercase(it.title, it.year, year_tolerance) for it in parsed]
    else:
        parsed = [it for it in items[:n_items] if it.valid]
        found = [catalog.lookup(it.title, it.year, year_tolerance) is not None for it in parsed]
    return sum(found) / len(parsed) if parsed else 0.0


def format_valid_ratio(items: Sequence[Item], *, n_items: int = 20) -> float:
    """Exact "Title (YYYY)" lines among the first ``n_items``, divided by max(n_items, #lines).

    1.0 exactly when the completion is ``n_items`` clean lines (Eq. 1); missing lines,
    decorated lines, blank lines and overflow lines all lower it.
    """
    return sum(it.exact for it in items[:n_items]) / max(n_items, len(items))


def score_completion(items: Sequence[Item], groundtruth, seen_titles, catalog: Catalog, *,
                     ks: Sequence[int] = KS, year_tolerance: int = 2, positions: str = "shift",
                     protocol: str = "paper", n_items: int = 20) -> dict:
    """All per-example numbers for one parsed completion under ``protocol`` ("paper" or "lenient").

    The protocol sets the matching rule (``hits``), the IDCG (``IDEAL_OF_PROTOCOL``) and the
    in-catalog rule (``in_catalog_ratio``); with the defaults, Recall@k and NDCG@k are the
    authors' ``evaluate_direct_match(item, k, ...)``.
    Returns {"recall@k", "ndcg@k" for k in ks, "in_catalog", "format_valid", "n_items",
    "rank_hits": fixed-position hits over the first ``n_items`` ranks (the per-rank curve)}.
    """
    check_protocol(protocol)
    h = hits(items, groundtruth, seen_titles, catalog, year_tolerance=year_tolerance, positions=positions,
             protocol=protocol)
    fixed = hits(items[:n_items], groundtruth, seen_titles, catalog, year_tolerance=year_tolerance,
                 positions="fixed", protocol=protocol)
    out: dict = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(h, len(groundtruth), k)
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(h, len(groundtruth), k, ideal=IDEAL_OF_PROTOCOL[protocol])
    out["in_catalog"] = in_catalog_ratio(items, catalog, year_tolerance=year_tolerance, n_items=n_items,
                                         protocol=protocol)
    out["format_valid"] = format_valid_ratio(items, n_items=n_items)
    out["n_items"] = len(items)
    out["rank_hits"] = np.pad(fixed, (0, n_items - len(fixed))).tolist()
    return out


def aggregate(per_example: Sequence[dict], clusters: Sequence | None = None) -> dict:
    """Mean and standard error over examples of every scalar metric; the per-rank hit curve as a list.

    clusters: [n] keys, one per example (e.g. its prompt), for standard errors clustered by key
    (``rankgrpo.stats.clustered_mean_and_stderr``); None: examples are independent.
    Returns {name: {"mean": m, "stderr": s}, ..., "rank_hit_rate": [N floats], "n_examples": n,
    "n_clusters": G}.
    """
    if not per_example:
        return {"n_examples": 0}
    keys = list(range(len(per_example))) if clusters is None else list(clusters)
    out: dict = {"n_examples": len(per_example), "n_clusters": len(set(keys))}
    for name, value in per_example[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            m, se, _ = clustered_mean_and_stderr([row[name] for row in per_example], keys)
            out[name] = {"mean": m, "stderr": se}
    if "rank_hits" in per_example[0]:
        out["rank_hit_rate"] = np.mean([row["rank_hits"] for row in per_example], axis=0).tolist()
    return out


def format_table(rows: dict[str, dict], ks: Sequence[int] = KS, stderr: bool = True) -> str:
    """The paper's table: one row per run, R@k and N@k (with standard errors), in-catalog, format-valid."""
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["in_catalog", "format_valid"]
    heads = [f"R@{k}" for k in ks] + [f"N@{k}" for k in ks] + ["InCat", "Format"]
    name_w = max([len("run")] + [len(n) for n in rows])
    cell_w = 16 if stderr else 7
    lines = ["run".ljust(name_w) + " | " + " | ".join(h.rjust(cell_w) for h in heads)]
    lines.append("-" * len(lines[0]))
    for name, agg in rows.items():
        cells = []
        for c in cols:
            m = agg.get(c, {}).get("mean", float("nan"))
            s = agg.get(c, {}).get("stderr", float("nan"))
            cells.append((f"{m:.4f} ±{s:.4f}" if stderr else f"{m:.4f}").rjust(cell_w))
        lines.append(name.ljust(name_w) + " | " + " | ".join(cells))
    return "\n".join(lines)
