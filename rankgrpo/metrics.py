"""Relevance hits, Recall@k, NDCG@k, in-catalog and format-valid ratios (PAPER.md sections 6.1, 8).

Two views of the same matching rule:

* ``positions="shift"`` -- the authors' evaluation (``evaluate_direct_match``): drop
  unparseable, seen and out-of-catalog items, let the list shift up, then cut at k.
* ``positions="fixed"`` -- every item keeps its generated rank; seen, out-of-catalog,
  unparseable and repeated items score 0. This is what the per-rank reward uses
  (``rankgrpo.rewards.rank_relevance``).

Matching (both views): one-to-one. Items are visited in rank order; an item hits the
first not-yet-consumed ground truth with the same normalised title (``normalize_title``)
whose year is within ``year_tolerance`` (exact year tried first, then +1, -1, +2, -2),
and consumes it. A repeated recommendation of a matched film therefore scores 0.

Deliberate differences from the authors' code (PAPER.md 8.6, 12.4), chosen so that
reward and evaluation agree: titles match after normalisation (casefold, NFKC,
whitespace) everywhere, including the seen filter; catalog membership uses the same
year tolerance as the ground-truth match. ``ideal="official"`` reproduces the
authors' IDCG quirk.

Worked example (k = 5, ground truth {Heat 1995, Alien 1979}, seen {Ran})::

    line                      fixed   shift list      shift hit
    1. Heat (1995)            1       Heat (1995)     1
    Ran (1985)      (seen)    0       -
    Nope (2099)     (OOC)     0       -
    Alien (1979)              1       Alien (1979)    1
    Heat (1995)     (repeat)  0       Heat (1995)     0

    Recall@5 = 2/2 = 1 in both views.
    shift NDCG@5 = (1 + 1/log2(3)) / (1 + 1/log2(3)) = 1
    fixed NDCG@5 = (1 + 1/log2(5)) / (1 + 1/log2(3)) = 1.4307 / 1.6309 = 0.8772
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

from rankgrpo.catalog import Catalog, normalize_title, year_offsets
from rankgrpo.parsing import Item

KS = (5, 10, 15, 20)


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
         positions: str = "shift") -> np.ndarray:
    """0/1 relevance of each recommendation.

    recs:        Items from ``parse_recommendations`` or (title, year) pairs, in rank order.
    groundtruth: [(title, year)] (a multiset; each entry can be hit once).
    seen_titles: titles the user already mentioned (no years).
    Returns ``int64 [len(recs)]`` for ``"fixed"``, ``[len(kept list)]`` for ``"shift"``.
    """
    if positions not in ("shift", "fixed"):
        raise ValueError(f"positions must be 'shift' or 'fixed', got {positions!r}")
    seen = {normalize_title(s) for s in seen_titles}
    remaining: dict[tuple[str, int], int] = defaultdict(int)
    for title, year in groundtruth:
        remaining[(normalize_title(title), int(year))] += 1

    out = []
    for title, year, parsed in _as_pairs(recs):
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

    ideal="standard": IDCG over min(|GT|, k) positions (the textbook definition).
    ideal="official": the authors' quirk: the ideal list has the length of ``hits`` (the
    filtered list), its first min(|GT|, len) entries 1, cut at min(k, len) -- a short
    filtered list gets a smaller IDCG. An empty list scores 0 in both.
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
                     n_items: int = 20) -> float:
    """Share of the parsed items among the first ``n_items`` lines that resolve to a catalog item
    (normalised title, year within tolerance). Unparseable lines are not in the denominator;
    0 when nothing parsed (PAPER.md 8.5)."""
    parsed = [it for it in items[:n_items] if it.valid]
    if not parsed:
        return 0.0
    return sum(catalog.lookup(it.title, it.year, year_tolerance) is not None for it in parsed) / len(parsed)


def format_valid_ratio(items: Sequence[Item], *, n_items: int = 20) -> float:
    """Exact "Title (YYYY)" lines among the first ``n_items``, divided by max(n_items, #lines).

    1.0 exactly when the completion is ``n_items`` clean lines (Eq. 1); missing lines,
    decorated lines, blank lines and overflow lines all lower it.
    """
    return sum(it.exact for it in items[:n_items]) / max(n_items, len(items))


def score_completion(items: Sequence[Item], groundtruth, seen_titles, catalog: Catalog, *,
                     ks: Sequence[int] = KS, year_tolerance: int = 2, positions: str = "shift",
                     ideal: str = "standard", n_items: int = 20) -> dict:
    """All per-example numbers for one parsed completion.

    Returns {"recall@k", "ndcg@k" for k in ks, "in_catalog", "format_valid", "n_items",
    "rank_hits": fixed-position hits over the first ``n_items`` ranks (the per-rank curve)}.
    """
    h = hits(items, groundtruth, seen_titles, catalog, year_tolerance=year_tolerance, positions=positions)
    fixed = hits(items[:n_items], groundtruth, seen_titles, catalog, year_tolerance=year_tolerance,
                 positions="fixed")
    out: dict = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(h, len(groundtruth), k)
    for k in ks:
        out[f"ndcg@{k}"] = ndcg_at_k(h, len(groundtruth), k, ideal=ideal)
    out["in_catalog"] = in_catalog_ratio(items, catalog, year_tolerance=year_tolerance, n_items=n_items)
    out["format_valid"] = format_valid_ratio(items, n_items=n_items)
    out["n_items"] = len(items)
    out["rank_hits"] = np.pad(fixed, (0, n_items - len(fixed))).tolist()
    return out


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); stderr 0 for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return 0.0, 0.0
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def aggregate(per_example: Sequence[dict]) -> dict:
    """Mean and standard error over examples of every scalar metric; the per-rank hit curve as a list.

    Returns {name: {"mean": m, "stderr": s}, ..., "rank_hit_rate": [N floats], "n_examples": n}.
    """
    if not per_example:
        return {"n_examples": 0}
    out: dict = {"n_examples": len(per_example)}
    for name, value in per_example[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            m, se = mean_and_stderr([row[name] for row in per_example])
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
