"""The Remap-Reflect-Adjust pipeline (§2.2, App. A): teacher lists -> SFT demonstrations.

``run_rra`` takes a data set through the stages, applying the equations of
``rankgrpo.demos.rra`` to one score matrix [conversations, C], with the teacher's replies
parsed by ``rankgrpo.demos.replies``:

    teacher lists       the paper's recommendation prompt; one raw list per conversation
    Remap   (Eq. 10)    metadata texts (the catalog's own, else teacher-written), embeddings, s_remap
    Reflect (Eq. 11)    the teacher, as judge, rates the N_r best candidates: s_reflect
    Adjust  (Eq. 12-13) w, b fitted on the training conversations' ground truths: s_final
    demonstration       the top N of s_final, seen titles excluded, "Title (YYYY)" lines

Decisions the paper leaves open, made here:

* Reflect. The N_r = 100 best catalog items by s_remap, seen titles excluded, are rated
  (the ratings are parsed and matched back as ``rankgrpo.demos.replies`` says). Only
  candidates carry ratings: r is zero elsewhere.
* Adjust. w and b (``rankgrpo.demos.rra.fit_adjust``) are fitted on the conversations
  marked ``fit_adjust_on`` (the training split) and applied to every conversation. Ground
  truths outside the catalog are counted and left out.
* Faults. A conversation whose teacher list or judge reply still fails after the
  retries is skipped (its completion is None) and counted in ``stats``. Item metadata the
  teacher fails to write falls back to the bare "Title (Year)".

Ablations (the paper's Table 2), switched by ``RRAConfig``:

* ``remap_reflect=False`` ("remove remap-reflect"): no embeddings, no judge. The raw list
  enters the catalog only through I_ic: s = p . I_ic (``rankgrpo.demos.rra.identity_scores``),
  so an in-catalog teacher item scores 1/sqrt(k) and everything else, out-of-catalog items
  included, 0. Adjust then ranks w * s + b (Eq. 12, fitted on these scores): the identified
  items carry the teacher's 1/sqrt(k), the free places go to the largest b (the items Adjust
  learned to be likely ground truths), and a large b may also outrank an identified item. Its
  "identity" stage list holds only the identified items (often fewer than N). Needs
  ``adjust=True``, else the lists are short.
* ``reflect=False`` ("remove reflect"): no judge; s_reflect = s_remap.
* ``adjust=False``: w = 1, b = 0; the demonstration is the top N after Reflect.

Memory and speed: the similarity S is never materialised (``remap_scores_batched``); Remap
runs in blocks of ``block_size`` conversations. The score matrix [conversations, |C|]
float32 is held in memory once (5,000 x 3,000 = 60 MB; 95,753 x 7,404 = 2.8 GB).
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rankgrpo.catalog import Catalog, CatalogItem, normalize_title
from rankgrpo.config import arg
from rankgrpo.data import Example
from rankgrpo.demos.embed import Embedder, cached_embed
from rankgrpo.demos.prompts import build_judge_prompt, build_metadata_prompt
from rankgrpo.demos.replies import (
    TeacherItem, parse_judge_reply, parse_metadata_reply, parse_teacher_list, validate_judge_reply,
    validate_list_reply, validate_metadata_reply,
)
from rankgrpo.demos.rra import (
    adjust_scores, fit_adjust, identity_scores, positional_weights, ratings_vector, reflect_scores,
    remap_scores_batched, top_n,
)
from rankgrpo.demos.teacher import Teacher, TeacherFailure
from rankgrpo.parsing import format_recommendations


@dataclass
class RRAConfig:
    """Remap-Reflect-Adjust settings (App. A.1-A.3 for the paper's values)."""

    n_items: int = arg(20, "N: items per demonstration, and the most raw teacher items read.", min=1)
    remap_lambda: float = arg(1.0, "lambda of Eq. 10: weight of the conversation-item similarity.", min=0)
    identity_year_tolerance: int = arg(2, "I_ic: a teacher item equals a catalog item with the same "
                                          "normalised title and a year within this many years.", min=0)
    n_reflect: int = arg(100, "N_r: candidates (top by s_remap) the teacher rates in Reflect.", min=1)
    reflect_gamma: float = arg(0.5, "gamma of Eq. 11: weight of the judge's rating.", min=0)
    rating_scale: int = arg(2, "L: ratings are clipped to [-L, L].", min=1)
    adjust_lambda_w: float = arg(0.01, "lambda_w of Eq. 13 (pulls w to 1).", min=0)
    adjust_lambda_b: float = arg(0.01, "lambda_b of Eq. 13 (pulls b to 0).", min=0)
    adjust_steps: int = arg(300, "Adam steps fitting w, b (Eq. 13); 30 epochs of 5,000 conversations.", min=0)
    adjust_lr: float = arg(0.05, "Adam learning rate (Eq. 13).", above=0)
    adjust_batch_size: int = arg(512, "Conversations per Adam step (Eq. 13).", min=1)
    block_size: int = arg(512, "Conversations per similarity block (memory: block_size x |C| floats).", min=1)
    teacher_metadata: bool = arg(True, "Ask the teacher for metadata of catalog items that have none "
                                       "(else they are embedded as bare 'Title (Year)').")
    seed: int = arg(0, "Seed of the Adjust mini-batch order.", min=0)
    remap_reflect: bool = arg(True, "Remap and Reflect. --no-remap-reflect is the 'remove remap-reflect' "
                                    "ablation: the raw list's in-catalog items (identity I_ic only, out-of-"
                                    "catalog items dropped) at 1/sqrt(k), then Adjust.")
    reflect: bool = arg(True, "Reflect (Eq. 11). --no-reflect is the 'remove reflect' ablation: no judge, "
                              "Adjust is fitted on s_remap.")
    adjust: bool = arg(True, "Adjust (Eq. 12-13). --no-adjust: the demonstration is the top N after Reflect.")

    def validate(self) -> None:
        if self.n_items < 1 or self.n_reflect < 1:
            raise ValueError("n_items and n_reflect must be at least 1")
        if not self.remap_reflect and not self.adjust:
            raise ValueError("--no-remap-reflect needs Adjust: without it the identity-mapped raw lists are "
                             "shorter than N (out-of-catalog items are dropped) and nothing fills them")

    def stages(self) -> list[str]:
        """The score stages that run, in order ("identity" replaces Remap in the ablation)."""
        if not self.remap_reflect:
            return ["identity", "adjust"]
        return ["remap"] + (["reflect"] if self.reflect else []) + (["adjust"] if self.adjust else [])


# ============================================================================= which examples; the demonstration text


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on (n, seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def train_subset(n: int, fraction: float, max_train: int, seed: int) -> list[int]:
    """Indices (in file order) of the training examples that get a demonstration: the first
    round(fraction * n), at most ``max_train`` (0: no cap), of a seeded permutation.

    >>> train_subset(8, 0.25, 0, seed=0) == sorted(seeded_order(8, 0)[:2])
    True
    """
    k = int(fraction * n + 0.5)
    if max_train:
        k = min(k, max_train)
    return sorted(seeded_order(n, seed)[:k])


def seen_indices(seen_titles: Sequence[str], catalog: Catalog) -> list[int]:
    """Catalog indices of every item (any year) whose normalised title the user already mentioned."""
    return sorted({j for t in seen_titles for j in catalog.indices_of_title(t)})


def format_demo(indices: Sequence[int], catalog: Catalog) -> str:
    """Catalog indices -> the completion text (Eq. 1: "Title (YYYY)" lines, no trailing newline)."""
    return format_recommendations([(catalog[j].title, catalog[j].year) for j in indices])


# ============================================================================= item metadata texts (Remap's input)


def metadata_text(title: str, year: int, keywords: str = "", plot: str = "") -> str:
    """The paper's metadata template (App. A.1).

    >>> print(metadata_text("Heat", 1995, "heist, crime", "A thief and a detective."))
    Heat (1995)
    Keywords: heist, crime
    Plots: A thief and a detective.
    """
    return f"{title} ({year})\nKeywords: {keywords}\nPlots: {plot}"


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in re.split(r"[,|;]", str(value)) if v.strip()]


def catalog_metadata_text(item: CatalogItem) -> str | None:
    """Metadata from the catalog's own fields (genres and keywords as keywords, plot and
    director as plot), or None when the item has none of them."""
    keywords = _as_list(item.meta.get("genres")) + _as_list(item.meta.get("keywords"))
    plot = str(item.meta.get("plot") or "").strip()
    directors = _as_list(item.meta.get("director"))
    if directors:
        plot = (plot + " " if plot else "") + f"Directed by {', '.join(directors)}."
    if not keywords and not plot:
        return None
    return metadata_text(item.title, item.year, ", ".join(keywords), plot)


def teacher_metadata_texts(items: Sequence[tuple[str, int]], teacher: Teacher, stats: Counter,
                           reasons: Counter) -> list[str]:
    """Metadata texts written by the teacher (Remap's metadata prompt), one per (title, year).

    A failed request falls back to the bare "Title (Year)" and is counted in ``stats``
    (and its reason in ``reasons``).
    """
    if not items:
        return []
    replies = teacher.chat_many([[{"role": "user", "content": build_metadata_prompt(t, y)}] for t, y in items],
                                validate=validate_metadata_reply)
    texts = []
    for (title, year), reply in zip(items, replies):
        if isinstance(reply, TeacherFailure):
            stats["metadata_failures"] += 1
            reasons[f"metadata: {reply.reason}"] += 1
            texts.append(f"{title} ({year})")
        else:
            texts.append(metadata_text(title, year, *parse_metadata_reply(reply)))
    return texts


def catalog_texts(catalog: Catalog, teacher: Teacher | None, stats: Counter, reasons: Counter) -> list[str]:
    """Metadata text of every catalog item: its own fields, else teacher-written, else "Title (Year)"."""
    texts = [catalog_metadata_text(item) for item in catalog]
    missing = [j for j, t in enumerate(texts) if t is None]
    stats["catalog_items_without_metadata"] += len(missing)
    if missing and teacher is not None:
        written = teacher_metadata_texts([(catalog[j].title, catalog[j].year) for j in missing], teacher, stats,
                                         reasons)
        for j, text in zip(missing, written):
            texts[j] = text
    return [t if t is not None else f"{catalog[j].title} ({catalog[j].year})" for j, t in enumerate(texts)]


# ============================================================================= the pipeline


@dataclass
class RRAResult:
    """Everything ``run_rra`` produced, aligned with the input examples.

    completions:   the demonstration text per example; None = skipped (a teacher failure).
    teacher_lists: the parsed raw teacher list per example (None = the request failed).
    remap_top, reflect_top, final_top: top-N catalog indices after each stage. With
                   ``remap_reflect=False`` remap_top is the identity-mapped raw list (its
                   in-catalog items only); a stage that is switched off repeats the one before.
    w, b:          the fitted Adjust parameters [C] (1 and 0 without Adjust).
    stats:         counts (failures by kind, items in / out of catalog, ratings missing, ...),
                   ``failure_reasons`` (reason -> count), ``seconds`` per stage and ``stages``
                   (the score stages that ran, ``RRAConfig.stages``).
    teacher_replies: the teacher's raw reply text per example (None = the request failed).
    """

    completions: list[str | None]
    teacher_lists: list[list[TeacherItem] | None]
    remap_top: list[list[int] | None]
    reflect_top: list[list[int] | None]
    final_top: list[list[int] | None]
    w: torch.Tensor
    b: torch.Tensor
    stats: dict = field(default_factory=dict)
    teacher_replies: list[str | None] = field(default_factory=list)


def _progress(log: Callable[[str], None] | None, what: str, total: int):
    """An ``on_reply`` callback that logs every tenth of ``total`` settled requests."""
    done, step = 0, max(1, total // 10)

    def on_reply(i: int, result) -> None:
        nonlocal done
        done += 1
        if log is not None and (done % step == 0 or done == total):
            log(f"rra: {what}: {done}/{total} replies")

    return on_reply


def request_teacher_lists(examples: Sequence[Example], catalog: Catalog, teacher: Teacher, cfg: RRAConfig,
                          stats: Counter, reasons: Counter,
                          log: Callable[[str], None] | None = None
                          ) -> tuple[list[list[TeacherItem] | None], list[str | None]]:
    """Send each example's prompt (the paper's recommendation prompt) to the teacher; parse the lists.

    Returns (parsed lists, raw reply texts), None for a request that failed.
    """
    replies = teacher.chat_many([ex.messages for ex in examples], validate=validate_list_reply,
                                on_reply=_progress(log, "teacher lists", len(examples)))
    lists: list[list[TeacherItem] | None] = []
    for reply in replies:
        if isinstance(reply, TeacherFailure):
            stats["list_failures"] += 1
            reasons[f"list: {reply.reason}"] += 1
            lists.append(None)
            continue
        items = parse_teacher_list(reply, catalog, cfg.n_items, cfg.identity_year_tolerance)
        stats["teacher_items"] += len(items)
        stats["teacher_items_in_catalog"] += sum(it.catalog_index is not None for it in items)
        lists.append(items)
    return lists, [r if isinstance(r, str) else None for r in replies]


def out_of_catalog_items(lists: Sequence[list[TeacherItem]]) -> dict[tuple[str, int], tuple[str, int]]:
    """Unique out-of-catalog teacher items: (normalised title, year) -> (title, year) as first written."""
    unique: dict[tuple[str, int], tuple[str, int]] = {}
    for items in lists:
        for it in items:
            if it.catalog_index is None:
                unique.setdefault((normalize_title(it.title), it.year), (it.title, it.year))
    return unique


def teacher_edges(lists: Sequence[list[TeacherItem]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv, p, catalog_index) [E], one edge per teacher item of each list (the "edges" of
    ``remap_scores_batched`` and ``identity_scores``); catalog_index is -1 out of catalog."""
    conv, rank, cat = [], [], []
    for i, items in enumerate(lists):
        for it in items:
            conv.append(i)
            rank.append(it.rank)
            cat.append(it.catalog_index if it.catalog_index is not None else -1)
    return _as_long(conv), positional_weights(_as_long(rank)), _as_long(cat)


def remap_edges(lists: Sequence[list[TeacherItem]], ooc_row: dict[tuple[str, int], int],
                n_catalog: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv, item_row, p, catalog_index) [E] for ``remap_scores_batched``; item rows index
    cat([catalog embeddings, out-of-catalog item embeddings])."""
    conv, p, cat = teacher_edges(lists)
    row = [it.catalog_index if it.catalog_index is not None
           else n_catalog + ooc_row[(normalize_title(it.title), it.year)] for items in lists for it in items]
    return conv, _as_long(row), p, cat


def _as_long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def groundtruth_matrix(examples: Sequence[Example], catalog: Catalog, year_tolerance: int,
                       stats: Counter) -> torch.Tensor:
    """[n, G] catalog indices of each example's ground truths (-1 padded); unknown ones are counted."""
    rows = []
    for ex in examples:
        idx = [catalog.lookup(t, y, year_tolerance) for t, y in ex.groundtruth]
        stats["groundtruth_not_in_catalog"] += sum(j is None for j in idx)
        rows.append([j for j in idx if j is not None])
    gt = torch.full((len(rows), max([len(r) for r in rows], default=0)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        gt[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return gt


def remap_all(lists: Sequence[list[TeacherItem]], conversations: Sequence[str], catalog: Catalog,
              teacher: Teacher, embedder: Embedder, cfg: RRAConfig, stats: Counter, reasons: Counter,
              cache_dir=None) -> torch.Tensor:
    """Eq. 10 for every conversation: metadata texts, embeddings, then s_remap [n, C] in blocks."""
    cat_texts = catalog_texts(catalog, teacher if cfg.teacher_metadata else None, stats, reasons)
    ooc = out_of_catalog_items(lists)
    stats["out_of_catalog_items_unique"] = len(ooc)
    ooc_texts = teacher_metadata_texts(list(ooc.values()), teacher, stats, reasons)
    embedder.fit(cat_texts)
    catalog_emb = torch.from_numpy(cached_embed(embedder, cat_texts, cache_dir))
    ooc_emb = torch.from_numpy(cached_embed(embedder, ooc_texts, cache_dir))
    context_emb = torch.from_numpy(cached_embed(embedder, list(conversations), cache_dir))
    item_emb = torch.cat([catalog_emb, ooc_emb.to(catalog_emb.dtype)])
    ooc_row = {key: r for r, key in enumerate(ooc)}
    scores = torch.empty(len(lists), len(catalog))
    for start in range(0, len(lists), cfg.block_size):
        stop = start + cfg.block_size
        conv, item_row, p, cat_idx = remap_edges(lists[start:stop], ooc_row, len(catalog))
        scores[start:stop] = remap_scores_batched(context_emb[start:stop], item_emb, catalog_emb, conv, item_row,
                                                  p, cat_idx, cfg.remap_lambda)
    return scores


def judge_candidates(conversations: Sequence[str], candidates: Sequence[list[int]], catalog: Catalog,
                     teacher: Teacher, cfg: RRAConfig, stats: Counter, reasons: Counter,
                     log: Callable[[str], None] | None = None) -> list[list[float] | None]:
    """Reflect's judge: the ratings of each conversation's candidates (None where the judge failed)."""
    names = [[(catalog[j].title, catalog[j].year) for j in cands] for cands in candidates]
    prompts = [[{"role": "user", "content": build_judge_prompt(conv, cands)}]
               for conv, cands in zip(conversations, names)]
    replies = teacher.chat_many(prompts, validate=validate_judge_reply,
                                on_reply=_progress(log, "judge", len(prompts)))
    out: list[list[float] | None] = []
    for reply, cands in zip(replies, names):
        if isinstance(reply, TeacherFailure):
            stats["judge_failures"] += 1
            reasons[f"judge: {reply.reason}"] += 1
            out.append(None)
            continue
        parsed = parse_judge_reply(reply, cands, cfg.rating_scale)
        stats["ratings"] += parsed.n_rated
        stats["ratings_missing"] += parsed.n_missing
        stats["judge_lines_unparsed"] += parsed.n_unparsed
        out.append(parsed.ratings)
    return out


def run_rra(examples: Sequence[Example], catalog: Catalog, teacher: Teacher, embedder: Embedder,
            cfg: RRAConfig | None = None, *, fit_adjust_on: Sequence[bool] | None = None,
            cache_dir=None, log: Callable[[str], None] | None = None) -> RRAResult:
    """Remap-Reflect-Adjust over ``examples``; returns one demonstration per example (or None).

    fit_adjust_on: which examples' ground truths fit Adjust's w, b (default: all). Pass
                   True for the training split and False for validation.
    cache_dir:     where embeddings are cached. With the teacher wrapped in ``CachedTeacher``
                   as well, a rerun after a crash repeats no teacher request and no embedding.
    log:           called with progress lines (e.g. ``print``).

    ``scores`` below is one [conversations, C] float32 matrix, updated in place from
    s_remap to s_reflect to s_final; ``alive`` lists the examples still in the run.
    The ablation switches of ``cfg`` (module docstring) skip stages.
    """
    cfg = cfg or RRAConfig()
    RRAConfig.validate(cfg)  # the RRA checks only (a subclass may check more)
    stats: Counter = Counter(conversations=len(examples))
    reasons: Counter = Counter()  # failure reasons, e.g. "list: HTTP 500 from ..."
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()
        if log is not None:
            log(f"rra: {stage} done in {seconds[stage]:.1f}s")

    # The teacher's raw lists; a conversation whose request failed is skipped.
    lists, replies = request_teacher_lists(examples, catalog, teacher, cfg, stats, reasons, log)
    alive = [i for i, items in enumerate(lists) if items is not None]
    seen = [seen_indices(examples[i].seen_titles, catalog) for i in alive]
    lap("teacher lists")

    if cfg.remap_reflect:  # Remap (Eq. 10)
        scores = remap_all([lists[i] for i in alive], [examples[i].conversation for i in alive], catalog, teacher,
                           embedder, cfg, stats, reasons, cache_dir)
        remap_top = top_n(scores, seen, cfg.n_items)
        lap("remap")
    else:  # the ablation: identity only, out-of-catalog items dropped
        scores = identity_scores(*teacher_edges([lists[i] for i in alive]), len(alive), len(catalog))
        remap_top = top_n(scores, seen, cfg.n_items, positive_only=True)
        lap("identity")

    reflect_top = remap_top
    if cfg.remap_reflect and cfg.reflect:
        # Reflect (Eq. 11): the teacher rates the top N_r candidates; a failed judge skips the conversation.
        candidates = top_n(scores, seen, cfg.n_reflect)
        ratings = judge_candidates([examples[i].conversation for i in alive], candidates, catalog, teacher, cfg,
                                   stats, reasons, log)
        judged = [row for row, r in enumerate(ratings) if r is not None]
        if len(judged) < len(alive):
            scores = scores[torch.tensor(judged, dtype=torch.long)]
        alive, seen, remap_top, candidates, ratings = (
            [x[row] for row in judged] for x in (alive, seen, remap_top, candidates, ratings))
        for start in range(0, len(alive), cfg.block_size):
            stop = start + cfg.block_size
            r = ratings_vector(candidates[start:stop], ratings[start:stop], len(catalog))
            scores[start:stop] = reflect_scores(scores[start:stop], r, cfg.reflect_gamma)
        reflect_top = top_n(scores, seen, cfg.n_items)
        lap("reflect")

    final_top = reflect_top
    w, b = torch.ones(len(catalog)), torch.zeros(len(catalog))
    if cfg.adjust:
        # Adjust (Eq. 12-13): w, b fitted on the ground truths of the fit conversations only.
        gt = groundtruth_matrix([examples[i] for i in alive], catalog, cfg.identity_year_tolerance, stats)
        gt[torch.tensor([fit_adjust_on is not None and not fit_adjust_on[i] for i in alive], dtype=torch.bool)] = -1
        w, b, info = fit_adjust(scores, gt, lambda_w=cfg.adjust_lambda_w, lambda_b=cfg.adjust_lambda_b,
                                steps=cfg.adjust_steps, lr=cfg.adjust_lr, batch_size=cfg.adjust_batch_size,
                                seed=cfg.seed)
        stats.update({f"adjust_{k}": v for k, v in info.items()})
        for start in range(0, len(alive), cfg.block_size):
            scores[start:start + cfg.block_size] = adjust_scores(scores[start:start + cfg.block_size], w, b)
        final_top = top_n(scores, seen, cfg.n_items)
        lap("adjust")

    def per_example(rows: list[list[int]]) -> list[list[int] | None]:
        out: list = [None] * len(examples)
        for i, value in zip(alive, rows):
            out[i] = value
        return out

    stats["demonstrations"] = len(alive)
    stats["skipped"] = len(examples) - len(alive)
    final = per_example(final_top)
    return RRAResult(
        completions=[format_demo(top, catalog) if top is not None else None for top in final],
        teacher_lists=lists,
        remap_top=per_example(remap_top),
        reflect_top=per_example(reflect_top),
        final_top=final,
        w=w,
        b=b,
        stats={**dict(stats), "failure_reasons": dict(reasons), "seconds": seconds, "stages": cfg.stages()},
        teacher_replies=replies,
    )
