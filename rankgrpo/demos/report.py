"""The stage report of ``build_demos.py``: each Remap-Reflect-Adjust stage's lists, scored.

The list each stage would give as a demonstration (the teacher's raw reply, then the top N
after Remap, after Reflect and after Adjust: ``rankgrpo.demos.pipeline.RRAResult``) is scored
as a model's completion would be (``rankgrpo.evaluation.score_examples``: Recall@k, NDCG@k,
the in-catalog ratio, the format-valid ratio), every stage on the same conversations: those
that got a demonstration. The demonstrations themselves are checked (N "Title (YYYY)" lines,
in the catalog, no title the user mentioned, no repeat) and the run's failures are counted.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

from rankgrpo.catalog import Catalog, normalize_title
from rankgrpo.data import Example
from rankgrpo.demos.pipeline import RRAConfig, RRAResult, format_demo, seeded_order
from rankgrpo.evaluation import score_examples
from rankgrpo.metrics import format_table
from rankgrpo.parsing import parse_recommendations

STAGE_NAMES = {"raw": "teacher (raw)", "identity": "identity map", "remap": "remap", "reflect": "reflect",
               "adjust": "adjust"}


def stage_completions(result: RRAResult, catalog: Catalog, stage: str) -> list[str | None]:
    """The list each example would get as its demonstration at ``stage`` (None where skipped)."""
    if stage == "raw":
        return result.teacher_replies
    tops = {"identity": result.remap_top, "remap": result.remap_top, "reflect": result.reflect_top,
            "adjust": result.final_top}[stage]
    return [format_demo(top, catalog) if top is not None else None for top in tops]


def score_stages(examples: Sequence[Example], rows: Sequence[int], result: RRAResult, catalog: Catalog,
                 cfg: RRAConfig) -> dict[str, dict]:
    """Stage -> aggregate metrics (``rankgrpo.metrics.aggregate``) over ``rows``, for every stage that ran.

    Every stage is scored on the same examples: those that got a demonstration.
    """
    out = {}
    for stage in ["raw"] + result.stats["stages"]:
        completions = stage_completions(result, catalog, stage)
        agg, _ = score_examples([examples[i] for i in rows], [completions[i] for i in rows], catalog,
                                year_tolerance=cfg.identity_year_tolerance, n_items=cfg.n_items)
        out[stage] = agg
    return out


def check_demonstrations(examples: Sequence[Example], completions: Sequence[str | None], catalog: Catalog,
                         n_items: int) -> dict:
    """Count the demonstrations that are exactly ``n_items`` "Title (YYYY)" lines, name catalog items
    (exact title and year), mention no seen title and repeat no item (None = skipped, not counted).

    >>> from rankgrpo.catalog import CatalogItem
    >>> cat = Catalog([CatalogItem("Heat", 1995), CatalogItem("Alien", 1979)])
    >>> ex = Example("0", [{"role": "user", "content": "I loved Alien"}], ["Alien"], [])
    >>> check_demonstrations([ex, ex, ex], ["Heat (1995)\\nAlien (1979)", "Heat (1995)\\nHeat (1995)", None], cat, 2)
    {'demonstrations': 2, 'format_valid': 2, 'in_catalog': 2, 'no_seen_title': 1, 'no_repeat': 1}
    """
    counts = Counter()
    for ex, text in zip(examples, completions):
        if text is None:
            continue
        items = parse_recommendations(text)
        seen = {normalize_title(t) for t in ex.seen_titles}
        counts["demonstrations"] += 1
        counts["format_valid"] += len(items) == n_items and all(it.exact for it in items)
        counts["in_catalog"] += all(catalog.lookup(it.title, it.year, 0) is not None for it in items)
        counts["no_seen_title"] += not any(normalize_title(it.title) in seen for it in items)
        counts["no_repeat"] += len({it.key for it in items}) == len(items)
    return {k: counts[k] for k in ("demonstrations", "format_valid", "in_catalog", "no_seen_title", "no_repeat")}


def stage_report(examples: Sequence[Example], splits: dict[str, Sequence[int]], result: RRAResult,
                 catalog: Catalog, cfg: RRAConfig, *, n_in_file: dict[str, int], report_train: int, seed: int,
                 data: dict, teacher_requests: dict) -> dict:
    """The report of one ``run_rra`` over ``examples`` (``build_demos.py`` adds its ``seconds``).

    splits:           "train" and "validation" -> their rows of ``examples`` (the selected ones).
    n_in_file:        split -> examples in its file (before the training subset was drawn).
    report_train:     score the stages on up to this many training demonstrations too (a sample
                      seeded by ``seed + 1``; 0: validation only).
    data:             the input files' reports (rows read, dropped, ...), kept as given.
    teacher_requests: {"sent": ..., "from_cache": ...}, kept as given.
    """
    kept = {s: [i for i in rows if result.completions[i] is not None] for s, rows in splits.items()}
    metrics = {"validation": score_stages(examples, kept["validation"], result, catalog, cfg)}
    if report_train and kept["train"]:
        sample = sorted(kept["train"][j] for j in seeded_order(len(kept["train"]), seed + 1)[:report_train])
        metrics["train"] = score_stages(examples, sample, result, catalog, cfg)
    s = result.stats
    return {
        "stages": ["raw"] + s["stages"],
        "demonstration_stage": s["stages"][-1],
        "ablations": {"remap_reflect": cfg.remap_reflect, "reflect": cfg.reflect, "adjust": cfg.adjust},
        "n_items": cfg.n_items,
        "counts": {
            "train": {"examples": n_in_file["train"], "selected": len(splits["train"]),
                      "demonstrations": len(kept["train"]), "skipped": len(splits["train"]) - len(kept["train"]),
                      "scored": metrics["train"]["raw"]["n_examples"] if "train" in metrics else 0},
            "validation": {"examples": n_in_file["validation"], "selected": len(splits["validation"]),
                           "demonstrations": len(kept["validation"]),
                           "skipped": len(splits["validation"]) - len(kept["validation"]),
                           "scored": len(kept["validation"])},
        },
        "checks": check_demonstrations(examples, result.completions, catalog, cfg.n_items),
        "data": data,
        "metrics": metrics,
        "failures": {
            "teacher_list": s.get("list_failures", 0), "judge": s.get("judge_failures", 0),
            "metadata": s.get("metadata_failures", 0), "judge_lines_unparsed": s.get("judge_lines_unparsed", 0),
            "ratings_missing": s.get("ratings_missing", 0),
            "groundtruth_not_in_catalog": s.get("groundtruth_not_in_catalog", 0),
            "reasons": s["failure_reasons"],
        },
        "skipped_ids": {split: [examples[i].id for i in rows if result.completions[i] is None][:100]
                        for split, rows in splits.items()},
        "teacher_requests": teacher_requests,
        "rra": {k: v for k, v in s.items() if k not in ("failure_reasons", "seconds", "stages")},
    }


def print_report(report: dict, ks: Sequence[int] = (5, 10, 20), log: Callable[[str], None] = print) -> None:
    """The report as ``build_demos.py`` prints it: a metrics table per split, then the checks, the
    skips and failures, the teacher requests and the seconds of every stage."""
    for split, stages in report["metrics"].items():
        n = next(iter(stages.values())).get("n_examples", 0) if stages else 0
        log(f"\n{split} ({n} conversations with a demonstration; each stage's top {report['n_items']} scored):")
        log(format_table({STAGE_NAMES[s]: agg for s, agg in stages.items()}, ks=ks))
    c, f = report["checks"], report["failures"]
    log(f"\ndemonstrations ({report['demonstration_stage']}): {c['demonstrations']} written; "
        f"{c['format_valid']} format-valid, {c['in_catalog']} in catalog, {c['no_seen_title']} without a seen title")
    log("skipped: " + ", ".join(f"{s} {v['skipped']} of {v['selected']}" for s, v in report["counts"].items())
        + f"; teacher list failures {f['teacher_list']}, judge failures {f['judge']}, metadata failures "
          f"{f['metadata']}, judge lines unparsed {f['judge_lines_unparsed']}, ratings missing {f['ratings_missing']}")
    t = report["teacher_requests"]
    log(f"teacher requests: {t['sent']} sent, {t['from_cache']} from the cache")
    log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
