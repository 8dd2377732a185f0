"""Calibration: where the popularity list, the raw teacher and the oracle stand on a split.

Popularity is the floor every learned recommender must beat; the oracle (the true latent
relevance ranking) is the ceiling no list can reach in expectation. The raw teacher should
sit clearly in between, so that Remap, Reflect, Adjust, SFT and RL all have headroom.
"""
from __future__ import annotations

import numpy as np

from rankgrpo.data import Example
from rankgrpo.metrics import aggregate, format_table, score_completion
from rankgrpo.parsing import format_recommendations, parse_recommendations
from rankgrpo.sandbox.teacher import SandboxTeacher
from rankgrpo.sandbox.world import World


def _top_unseen(world: World, scores: np.ndarray, seen_titles, n: int) -> list[tuple[str, int]]:
    scores = np.where(world.seen_mask_from_titles(seen_titles), -np.inf, scores)
    order = np.argsort(-scores, kind="stable")
    order = order[np.isfinite(scores[order])][:n]
    return [(world.catalog[int(i)].title, world.catalog[int(i)].year) for i in order]


def popularity_baseline(world: World, seen_titles=(), n: int = 20) -> list[tuple[str, int]]:
    """The ``n`` most popular films (catalog ``popularity``) whose title is not among ``seen_titles``."""
    return _top_unseen(world, world.popularity.astype(float), seen_titles, n)


def oracle_baseline(world: World, example: Example | str, n: int = 20) -> list[tuple[str, int]]:
    """The ``n`` unseen films of highest latent relevance for the conversation's true taste: the
    ranking that maximises expected Recall@n. ``example`` is an Example or a conversation text."""
    conversation = example.conversation if isinstance(example, Example) else example
    taste = world.taste_of(conversation)
    if taste is None:
        raise KeyError("the oracle only knows conversations of this world")
    seen = example.seen_titles if isinstance(example, Example) else [world.catalog[i].title for i in taste.seen]
    return _top_unseen(world, world.relevance(taste), seen, n)


def calibrate(world: World, teacher: SandboxTeacher | None = None, split: str = "test", *,
              limit: int | None = None, n_items: int = 20, per_example: bool = False):
    """Score popularity, the raw teacher and the oracle on ``split`` (``rankgrpo.metrics``,
    the evaluation's shift view). Returns {run name: ``metrics.aggregate`` dict}; with
    ``per_example`` also {run name: {example id: score row}}, for paired differences."""
    teacher = teacher or SandboxTeacher(world)
    examples = world.examples(split)[:limit]
    rows: dict[str, list[dict]] = {}
    by_id: dict[str, dict[str, dict]] = {}
    for name, kind in (("popularity", "popularity"), ("teacher (raw)", "teacher"), ("oracle", "oracle")):
        lists = baseline_predictions(world, kind, split, teacher=teacher, n_items=n_items, limit=limit)
        rows[name] = [score_completion(parse_recommendations(p["completion"]), ex.groundtruth, ex.seen_titles,
                                       world.catalog, n_items=n_items) for p, ex in zip(lists, examples)]
        by_id[name] = {ex.id: row for ex, row in zip(examples, rows[name])}
    results = {name: aggregate(r) for name, r in rows.items()}
    return (results, by_id) if per_example else results


def baseline_predictions(world: World, kind: str, split: str = "test", *, teacher: SandboxTeacher | None = None,
                         n_items: int = 20, limit: int | None = None) -> list[dict]:
    """[{"id", "completion"}] of one baseline ("popularity", "teacher" or "oracle") for the samples
    of ``split`` (the first ``limit``, or all): the same lists ``calibrate`` scores, as predictions
    for ``evaluate.py``."""
    if kind not in ("popularity", "teacher", "oracle"):
        raise ValueError(f"kind must be popularity, teacher or oracle, got {kind!r}")
    teacher = teacher or (SandboxTeacher(world) if kind == "teacher" else None)
    cache: dict[str, str] = {}
    rows = []
    for ex in world.examples(split)[:limit]:
        if kind == "popularity":
            text = format_recommendations(popularity_baseline(world, ex.seen_titles, n_items))
        elif kind == "oracle":
            text = format_recommendations(oracle_baseline(world, ex, n_items))
        else:
            text = cache.setdefault(ex.prompt_text, teacher.chat(ex.messages))
        rows.append({"id": ex.id, "completion": text})
    return rows


def calibration_report(results: dict[str, dict]) -> str:
    """The calibration table, the teacher's in-catalog and format-valid ratios, and how its
    hit rate falls from the head to the tail of its list."""
    t = results["teacher (raw)"]
    curve = np.asarray(t.get("rank_hit_rate", [0.0]))
    return (format_table(results, stderr=False) + "\n"
            f"teacher in-catalog ratio {t['in_catalog']['mean']:.3f}, "
            f"format-valid ratio {t['format_valid']['mean']:.3f}, hit rate per rank "
            f"{curve[:5].mean():.3f} (ranks 1-5) -> {curve[-5:].mean():.3f} (ranks {len(curve) - 4}-{len(curve)}) "
            f"(n = {t['n_examples']})")
