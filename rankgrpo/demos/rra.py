"""Remap-Reflect-Adjust (§2.2, App. A, Eq. 10-13): teacher lists -> SFT demonstrations.

For each conversation the black-box teacher writes a raw list of N items in its own item
space. RRA turns it into a score vector over the whole catalog C and keeps the top N:

    Remap   (Eq. 10)  s_remap   = p . (S_item-item + I_ic) + lambda . s_context
    Reflect (Eq. 11)  s_reflect = s_remap + gamma . r             (the teacher as judge)
    Adjust  (Eq. 12)  s_final   = w * s_reflect + b               (w, b fitted by Eq. 13)
    demo              top-N of s_final, seen titles excluded, "Title (YYYY)" lines

One function per equation below (``remap_scores``, ``reflect_scores``, ``adjust_scores``,
``adjust_loss``), each with its shapes and a worked example; ``run_rra`` chains them over
a whole data set. Decisions the paper leaves open, made here:

* Teacher list. Lines are parsed with the one parse (``parse_recommendations``); lines
  without a "(YYYY)" are dropped and the remaining items keep their order: the k-th
  parsed item has rank k (1-based) and weight p = 1/sqrt(k). At most ``n_items`` (N)
  items are read; a reply with none is invalid (retried, then a counted failure).
* I_ic, "teacher item u equals catalog item v": the same normalised title
  (``normalize_title``: NFKC, casefold, whitespace) and a year within
  ``identity_year_tolerance`` = 2, the exact year preferred (``Catalog.lookup``). This is
  the rule by which the reward and the metrics decide that a generated item *is* a
  catalog item, so Remap transfers exactly the items the evaluation would count.
* Duplicates. A teacher item is identified by its catalog item when it has one (so
  "Heat (1995)" and "heat (1996)" are one item), else by (normalised title, year). When
  the same item appears at several ranks, only the first (highest) rank counts.
* Reflect. The N_r = 100 best catalog items by s_remap, seen titles excluded, are
  rated; ratings are matched back to candidates by normalised title and year (then by
  title alone when unambiguous), clipped to [-2, 2]; missing or unparseable ratings are
  0 and counted. Only candidates carry ratings: r is zero elsewhere.
* Adjust. Eq. 13 is the paper's *sum* over ground-truth events plus
  lambda_w ||w - 1||^2 + lambda_b ||b||^2. We minimise the same objective divided by M,
  the number of ground-truth events (same minimiser, O(1) gradients), with Adam
  (lr 0.05, 300 steps, mini-batches of 512 conversations, w = 1 and b = 0 at the start).
  Each step uses the batch's mean NLL plus regulariser / M. With thousands of
  conversations the regularisers are nearly negligible, as in the paper; the fixed
  budget keeps w and b finite for items that are never a ground truth. w and b are
  fitted on the conversations marked ``fit_adjust_on`` (the training split) and
  applied to every conversation. Ground truths outside the catalog are counted and left out.
* Faults. A conversation whose teacher list or judge reply still fails after the
  retries is skipped (its completion is None) and counted in ``stats``. Item metadata the
  teacher fails to write falls back to the bare "Title (Year)".

Ablations (the paper's Table 2), switched by ``RRAConfig``:

* ``remap_reflect=False`` ("remove remap-reflect"): no embeddings, no judge. The raw list
  enters the catalog only through I_ic: s = p . I_ic (``identity_scores``), so an in-catalog
  teacher item scores 1/sqrt(k) and everything else, out-of-catalog items included, 0.
  Adjust then ranks w * s + b (Eq. 12, fitted on these scores): the identified items carry
  the teacher's 1/sqrt(k), the free places go to the largest b (the items Adjust learned to
  be likely ground truths), and a large b may also outrank an identified item. Its
  "identity" stage list holds only the identified items (often fewer than N). Needs
  ``adjust=True``, else the lists are short.
* ``reflect=False`` ("remove reflect"): no judge; s_reflect = s_remap.
* ``adjust=False``: w = 1, b = 0; the demonstration is the top N after Reflect.

Memory and speed: similarity is never materialised per (conversation, item, catalog
item). By linearity p . S = (sum_u p_u e_u) . E_C^T, so each conversation needs one
matrix product with the catalog embeddings E_C [|C|, d], done in blocks of
``block_size`` conversations. The score matrix [conversations, |C|] float32 is held in
memory once (5,000 x 3,000 = 60 MB; 95,753 x 7,404 = 2.8 GB).
"""
from __future__ import annotations

import math
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
from rankgrpo.demos.teacher import Teacher, TeacherFailure
from rankgrpo.parsing import format_recommendations, parse_line, parse_recommendations


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


# ============================================================================= Eq. 10: Remap


def positional_weights(ranks: torch.Tensor) -> torch.Tensor:
    """p_u = 1 / sqrt(k_u) for the teacher's 1-based ranks k_u (Eq. 10).

    >>> positional_weights(torch.tensor([1, 4, 16])).tolist()
    [1.0, 0.5, 0.25]
    """
    return ranks.to(torch.float32).rsqrt()


def remap_scores(p: torch.Tensor, S: torch.Tensor, I: torch.Tensor, s_context: torch.Tensor,
                 lam: float = 1.0) -> torch.Tensor:
    """Eq. 10 for one conversation: s_remap = p . (S_item-item + I_ic) + lambda . s_context.

    p:         [U]     positional weight 1/sqrt(k) of each of the U unique teacher items
    S:         [U, C]  cosine similarity of each teacher item's metadata to each catalog item's
    I:         [U, C]  I_ic: 1 where teacher item u *is* catalog item v, else 0
    s_context: [C]     cosine similarity of the conversation to each catalog item
    returns    [C]

    Worked example (3 teacher items at ranks 1, 4, 16; 4 catalog items; item 0 is catalog 0):

    >>> p = torch.tensor([1.0, 0.5, 0.25])
    >>> S = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.8, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0]])
    >>> I = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    >>> remap_scores(p, S, I, torch.tensor([0.0, 0.1, 0.2, 0.0])).tolist()
    [2.0, 1.0, 0.4000000059604645, 0.25]

    catalog 1: 1*0.5 + 0.5*0.8 + 0.1 = 1.0; catalog 2: 0.5*0.4 + 0.2 = 0.4.
    """
    return p @ (S + I) + lam * s_context


def remap_scores_batched(context_emb: torch.Tensor, item_emb: torch.Tensor, catalog_emb: torch.Tensor,
                         conv: torch.Tensor, item_row: torch.Tensor, p: torch.Tensor,
                         catalog_index: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Eq. 10 for B conversations at once, without forming S per conversation.

    The teacher items of all B conversations are given as E "edges" (one per unique
    teacher item of a conversation):
        conv          [E]  conversation of the edge, in 0..B-1
        item_row      [E]  row of the item's metadata embedding in ``item_emb``
        p             [E]  positional weight 1/sqrt(k)
        catalog_index [E]  the catalog item it equals (I_ic), or -1 if out of catalog
    context_emb [B, d], item_emb [R, d], catalog_emb [C, d]: unit-norm embeddings.
    returns [B, C], equal to ``remap_scores`` row by row.

    Because S[u] = e_u . E_C^T is linear in e_u,
        p . S + lambda . s_context = (sum_u p_u e_u + lambda x) . E_C^T,
    one [B, d] x [d, C] product per block; I_ic adds p_u at catalog_index[u].
    """
    query = lam * context_emb.clone()
    query.index_add_(0, conv, p[:, None] * item_emb[item_row])
    scores = query @ catalog_emb.T
    hit = catalog_index >= 0
    scores.index_put_((conv[hit], catalog_index[hit]), p[hit], accumulate=True)
    return scores


def identity_scores(lists: Sequence[list["TeacherItem"]], n_catalog: int) -> torch.Tensor:
    """The 'remove remap-reflect' ablation: s = p . I_ic, Eq. 10 without S and s_context.

    Each in-catalog teacher item scores 1/sqrt(k) at its catalog item; out-of-catalog
    items and every other catalog item score 0. Returns [len(lists), n_catalog].

    >>> lists = [[TeacherItem(1, "Heat", 1995, 2), TeacherItem(2, "Nope", 2099, None),
    ...           TeacherItem(4, "Alien", 1979, 0)]]
    >>> identity_scores(lists, 3).tolist()
    [[0.5, 0.0, 1.0]]
    """
    scores = torch.zeros(len(lists), n_catalog)
    rows, cols, ranks = [], [], []
    for i, items in enumerate(lists):
        for it in items:
            if it.catalog_index is not None:
                rows.append(i)
                cols.append(it.catalog_index)
                ranks.append(it.rank)
    if rows:
        as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        scores.index_put_((as_long(rows), as_long(cols)), positional_weights(as_long(ranks)), accumulate=True)
    return scores


# ============================================================================= Eq. 11: Reflect


def ratings_vector(candidates: Sequence[Sequence[int]], ratings: Sequence[Sequence[float]],
                   n_catalog: int) -> torch.Tensor:
    """The sparse r_reflect as a dense [B, C] tensor: ratings at the candidates, 0 elsewhere.

    >>> ratings_vector([[2, 0]], [[-1.0, 2.0]], 4).tolist()
    [[2.0, 0.0, -1.0, 0.0]]
    """
    r = torch.zeros(len(candidates), n_catalog)
    for row, (cands, vals) in enumerate(zip(candidates, ratings)):
        if len(cands):
            r[row, torch.as_tensor(list(cands), dtype=torch.long)] = torch.as_tensor(list(vals), dtype=torch.float32)
    return r


def reflect_scores(s_remap: torch.Tensor, r: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """Eq. 11: s_reflect = s_remap + gamma . r_reflect.

    s_remap [..., C]; r [..., C] the judge's ratings in [-2, 2] on the rated candidates,
    0 elsewhere; gamma = 0.5 maps ratings to [-1, 1]. Returns [..., C].

    >>> reflect_scores(torch.tensor([2.0, 1.0, 0.4, 0.25]), torch.tensor([2.0, -1.0, 0.0, 0.0])).tolist()
    [3.0, 0.5, 0.4000000059604645, 0.25]
    """
    return s_remap + gamma * r


# ============================================================================= Eq. 12-13: Adjust


def adjust_scores(s_reflect: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 12: s_final = w * s_reflect + b, with item-wise w, b [C] shared by all conversations.

    >>> adjust_scores(torch.tensor([3.0, 0.5, 0.4, 0.25]), torch.tensor([1.0, 2.0, 1.0, 1.0]),
    ...               torch.tensor([0.0, 0.0, 1.0, -0.25])).tolist()
    [3.0, 1.0, 1.399999976158142, 0.0]
    """
    return w * s_reflect + b


def adjust_nll(s_reflect: torch.Tensor, gt: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-sum_i sum_{j in gt_i} log softmax_j(w * s_reflect_i + b), summed (the data term of Eq. 13).

    s_reflect [B, C]; gt [B, G] catalog indices of each conversation's ground truths,
    padded with -1 (duplicates count twice, as in a multiset). Returns a scalar.
    """
    logits = adjust_scores(s_reflect, w, b)
    log_norm = torch.logsumexp(logits, dim=1, keepdim=True)  # [B, 1]
    valid = gt >= 0
    picked = logits.gather(1, gt.clamp(min=0))  # [B, G]
    return ((log_norm - picked) * valid).sum()


def adjust_regulariser(w: torch.Tensor, b: torch.Tensor, lambda_w: float = 0.01,
                       lambda_b: float = 0.01) -> torch.Tensor:
    """lambda_w ||w - 1||^2 + lambda_b ||b||^2 (Eq. 13)."""
    return lambda_w * (w - 1).pow(2).sum() + lambda_b * b.pow(2).sum()


def adjust_loss(s_reflect: torch.Tensor, gt: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                lambda_w: float = 0.01, lambda_b: float = 0.01) -> torch.Tensor:
    """Eq. 13: L(w, b) = -sum_i sum_{j in gt_i} log softmax_j(w * s_reflect_i + b)
    + lambda_w ||w - 1||^2 + lambda_b ||b||^2, the softmax over the whole catalog.

    s_reflect [B, C]; gt [B, G] (-1 = padding); w, b [C]. Returns a scalar.

    Worked example (one conversation, C = 4, ground truth = catalog 0):
    s = [1, 0, 0, 0], w = [2, 1, 1, 1], b = [0, 0, 0, ln 2] -> logits [2, 0, 0, ln 2],
    L = ln(e^2 + 1 + 1 + 2) - 2 + 0.01 * 1 + 0.01 * (ln 2)^2 = 0.43265 + 0.01 + 0.00480 = 0.44746

    >>> s, gt = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0]])
    >>> w, b = torch.tensor([2.0, 1, 1, 1]), torch.tensor([0, 0, 0, math.log(2)])
    >>> round(adjust_loss(s, gt, w, b).item(), 5)
    0.44746
    """
    return adjust_nll(s_reflect, gt, w, b) + adjust_regulariser(w, b, lambda_w, lambda_b)


def fit_adjust(s_reflect: torch.Tensor, gt: torch.Tensor, *, lambda_w: float = 0.01, lambda_b: float = 0.01,
               steps: int = 300, lr: float = 0.05, batch_size: int = 512,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit the item-wise w, b [C] of Eq. 12 by minimising Eq. 13 (see the module docstring).

    s_reflect [n, C] the fit conversations' scores; gt [n, G] their ground truths (-1 padded).
    Minimises adjust_loss / M (M = ground-truth events) with ``steps`` Adam steps; each
    step takes the next ``batch_size`` conversations of a shuffled pass over the data and
    minimises their mean NLL per event + regulariser / M.
    Returns (w, b, info) with the objective per event before and after.
    """
    n, C = s_reflect.shape
    w = torch.ones(C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    rows = (gt >= 0).any(dim=1).nonzero().squeeze(1)
    n_events = int((gt >= 0).sum())
    info = {"conversations": len(rows), "events": n_events}
    if n_events == 0:
        return w.detach(), b.detach(), {**info, "objective_start": 0.0, "objective_end": 0.0}

    def objective() -> float:  # Eq. 13 / M over all fit conversations, in blocks
        with torch.no_grad():
            nll = sum(adjust_nll(s_reflect[r], gt[r], w, b) for r in rows.split(batch_size))
            return float((nll + adjust_regulariser(w, b, lambda_w, lambda_b)) / n_events)

    info["objective_start"] = objective()
    optimizer = torch.optim.Adam([w, b], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    for _ in range(steps):
        if not batches:  # a new shuffled pass over the conversations
            batches = list(rows[torch.randperm(len(rows), generator=generator)].split(batch_size))
        batch = batches.pop()
        gt_batch = gt[batch]
        loss = (adjust_nll(s_reflect[batch], gt_batch, w, b) / (gt_batch >= 0).sum()
                + adjust_regulariser(w, b, lambda_w, lambda_b) / n_events)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    info["objective_end"] = objective()
    return w.detach(), b.detach(), info


# ============================================================================= top-N


def top_n(scores: torch.Tensor, exclude: Sequence[Sequence[int]], n: int, block_size: int = 1024, *,
          positive_only: bool = False) -> list[list[int]]:
    """The n best catalog indices per row of ``scores`` [B, C], skipping ``exclude[row]`` (seen titles).
    ``positive_only`` also skips scores <= 0 (the rows may then be shorter than n).

    >>> top_n(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), [[1]], 2)
    [[3, 2]]
    >>> top_n(torch.tensor([[0.0, 0.9, 0.0, 0.7]]), [[1]], 2, positive_only=True)
    [[3]]
    """
    out: list[list[int]] = []
    k = min(n, scores.shape[1])
    for start in range(0, scores.shape[0], block_size):
        block = scores[start:start + block_size].clone()
        if positive_only:
            block[block <= 0] = -math.inf
        for row, cols in enumerate(exclude[start:start + block_size]):
            if len(cols):
                block[row, torch.as_tensor(list(cols), dtype=torch.long)] = -math.inf
        values, indices = block.topk(k, dim=1)
        out += [[j for j, v in zip(ix, vs) if v > -math.inf] for ix, vs in zip(indices.tolist(), values.tolist())]
    return out


def seen_indices(seen_titles: Sequence[str], catalog: Catalog) -> list[int]:
    """Catalog indices of every item (any year) whose normalised title the user already mentioned."""
    return sorted({j for t in seen_titles for j in catalog.indices_of_title(t)})


def format_demo(indices: Sequence[int], catalog: Catalog) -> str:
    """Catalog indices -> the completion text (Eq. 1: "Title (YYYY)" lines, no trailing newline)."""
    return format_recommendations([(catalog[j].title, catalog[j].year) for j in indices])


# ============================================================================= teacher replies


@dataclass(frozen=True)
class TeacherItem:
    """One unique item of a teacher's raw list.

    rank:          1-based rank k in the raw list (p = 1/sqrt(k)).
    title, year:   as the teacher wrote them.
    catalog_index: the catalog item it equals (I_ic), or None when out of catalog.
    """

    rank: int
    title: str
    year: int
    catalog_index: int | None


def parse_teacher_list(reply: str, catalog: Catalog, max_items: int = 20,
                       year_tolerance: int = 2) -> list[TeacherItem]:
    """The teacher's raw list -> unique ``TeacherItem`` s (see the module docstring for the rules).

    >>> from rankgrpo.catalog import CatalogItem
    >>> cat = Catalog([CatalogItem("Heat", 1995), CatalogItem("Alien", 1979)])
    >>> [(t.rank, t.title, t.catalog_index) for t in parse_teacher_list(
    ...     "Here you go:\\n1. Heat (1995)\\nAlienn (1979)\\nheat (1996)\\nAlien (1979)", cat)]
    [(1, 'Heat', 0), (2, 'Alienn', None), (4, 'Alien', 1)]
    """
    items = [it for it in parse_recommendations(reply) if it.valid][:max_items]
    out, seen = [], set()
    for rank, it in enumerate(items, 1):
        idx = catalog.lookup(it.title, it.year, year_tolerance)
        key = ("catalog", idx) if idx is not None else ("teacher", normalize_title(it.title), it.year)
        if key not in seen:
            seen.add(key)
            out.append(TeacherItem(rank, it.title, it.year, idx))
    return out


def validate_list_reply(reply: str) -> str | None:
    """A usable raw list has at least one "Title (YYYY)" line."""
    return None if any(it.valid for it in parse_recommendations(reply)) else "no 'Title (YYYY)' line"


_RATING_WORDS = [("not good", -1.0), ("great", 2.0), ("good", 1.0), ("normal", 0.0), ("bad", -2.0)]
_NUMBER = re.compile(r"(?<![\w.])[+\-\u2212\u2013]?\d+(?:\.\d+)?(?![\w.])")
_YEAR_PAREN = re.compile(r"\(\s*\d{4}\s*\)")
_CANONICAL_JUDGE_LINE = re.compile(r"(.+ \(\d{4}\))\s*#{2,}\s*([+-]?\d+(?:\.\d+)?)\s*$")


def parse_judge_line(line: str) -> tuple[str, int | None, float] | None:
    """One judge line -> (title, year or None, rating), or None if it holds no rating.

    The item runs up to the first "(YYYY)" or, in a line without a year, up to the first
    "#"; the rating is the first number after it (or a rating word: great, good, normal,
    not good, bad), whatever separates them ("####" as asked, ":", "-", "|", ...).
    Bullets, numbering, markdown and quotes around the item are stripped.

    >>> parse_judge_line('3. **"Heat (1995)"** #### -1 (not good)')
    ('Heat', 1995, -1.0)
    >>> parse_judge_line("2001: A Space Odyssey (1968): great")
    ('2001: A Space Odyssey', 1968, 2.0)
    >>> parse_judge_line("Here are the ratings:") is None
    True
    """
    year = _YEAR_PAREN.search(line)
    if year is not None:
        item, rest = line[:year.end()], line[year.end():]
    elif "#" in line:
        item, rest = line.split("#", 1)
    else:
        return None
    number = _NUMBER.search(rest)
    if number is not None:
        rating = float(number.group().replace("\u2212", "-").replace("\u2013", "-"))
    else:
        words = rest.casefold()
        rating = next((v for word, v in _RATING_WORDS if word in words), None)
        if rating is None:
            return None
    title, year = parse_line(item.strip().rstrip("*_ :-").strip())
    title = title.strip().strip("*_\"'").strip()
    return (title, year, rating) if title else None


@dataclass
class JudgeRatings:
    """Ratings of the N_r candidates, in candidate order, and how the reply parsed.

    ratings:    [N_r] floats in [-L, L]; 0 for a candidate the reply did not rate.
    n_rated:    candidates with a rating.
    n_missing:  candidates without one (counted as 0).
    n_unparsed: non-empty reply lines that gave no rating for any candidate.
    """

    ratings: list[float]
    n_rated: int
    n_missing: int
    n_unparsed: int


def parse_judge_reply(reply: str, candidates: Sequence[tuple[str, int]], scale: int = 2) -> JudgeRatings:
    """The judge's "movie_name (release_year)####rating" reply -> ``JudgeRatings``.

    A line's item is matched to a candidate by normalised title and exact year, then the
    nearest year within 2, then by title alone if exactly one candidate has it. The first
    rating of a candidate wins; ratings are clipped to [-scale, scale].

    >>> r = parse_judge_reply("Heat (1995)####2\\n- alien (1979) #### 7\\nnonsense", [("Heat", 1995),
    ...                       ("Alien", 1979), ("Ran", 1985)])
    >>> r.ratings, r.n_rated, r.n_missing, r.n_unparsed
    ([2.0, 2.0, 0.0], 2, 1, 1)
    """
    exact = {f"{title} ({year})": i for i, (title, year) in enumerate(candidates)}
    by_title: dict[str, list[int]] = {}
    for i, (title, _) in enumerate(candidates):
        by_title.setdefault(normalize_title(title), []).append(i)
    ratings: list[float | None] = [None] * len(candidates)
    n_unparsed = 0
    for line in reply.splitlines():
        if not line.strip():
            continue
        fast = _CANONICAL_JUDGE_LINE.match(line)  # "Title (YYYY)####r" naming a candidate verbatim
        if fast and fast.group(1) in exact:
            i, parsed = exact[fast.group(1)], (None, None, float(fast.group(2)))
        else:
            parsed = parse_judge_line(line)
            i = _match_candidate(parsed, by_title, candidates) if parsed else None
        if i is None:
            n_unparsed += 1
        elif ratings[i] is None:
            ratings[i] = max(-float(scale), min(float(scale), parsed[2]))
    n_rated = sum(r is not None for r in ratings)
    return JudgeRatings([r if r is not None else 0.0 for r in ratings], n_rated, len(candidates) - n_rated, n_unparsed)


def _match_candidate(parsed, by_title: dict, candidates: Sequence[tuple[str, int]]) -> int | None:
    title, year, _ = parsed
    same_title = by_title.get(normalize_title(title), [])
    if year is not None:
        near = [(abs(candidates[i][1] - year), i) for i in same_title if abs(candidates[i][1] - year) <= 2]
        if near:
            return min(near)[1]
    return same_title[0] if len(same_title) == 1 else None


def validate_judge_reply(reply: str) -> str | None:
    """A usable judge reply has at least one line with an item and a rating."""
    return None if any(parse_judge_line(line) for line in reply.splitlines()) else "no rated line"


# ============================================================================= item metadata


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


_META_FIELD = re.compile(r"^\W*(keywords?|plots?)\W*?:\s*(.*)$", re.IGNORECASE)


def parse_metadata_reply(reply: str) -> tuple[str, str] | None:
    """The teacher's metadata reply -> (keywords, plot), or None if it has neither field.

    The plot runs from "Plots:" to the end of the reply (one paragraph asked; more is kept).

    >>> parse_metadata_reply("**Heat (1995)**\\n**Keywords:** heist, LA\\nPlots: A thief.\\nA cop.")
    ('heist, LA', 'A thief. A cop.')
    """
    keywords, plot, in_plot = None, None, False
    for line in reply.splitlines():
        m = _META_FIELD.match(line.strip())
        if m:
            in_plot = m.group(1).lower().startswith("plot")
            value = m.group(2).strip().strip("*").strip()
            if in_plot:
                plot = value
            else:
                keywords = value
        elif in_plot and line.strip():
            plot = f"{plot} {line.strip()}".strip()
    if keywords is None and plot is None:
        return None
    return keywords or "", plot or ""


def validate_metadata_reply(reply: str) -> str | None:
    return None if parse_metadata_reply(reply) else "no 'Keywords:' or 'Plots:' line"


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


def remap_edges(lists: Sequence[list[TeacherItem]], ooc_row: dict[tuple[str, int], int],
                n_catalog: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conv, item_row, p, catalog_index) [E] for ``remap_scores_batched``; item rows index
    cat([catalog embeddings, out-of-catalog item embeddings])."""
    conv, row, rank, cat = [], [], [], []
    for i, items in enumerate(lists):
        for it in items:
            conv.append(i)
            rank.append(it.rank)
            if it.catalog_index is not None:
                row.append(it.catalog_index)
                cat.append(it.catalog_index)
            else:
                row.append(n_catalog + ooc_row[(normalize_title(it.title), it.year)])
                cat.append(-1)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_long(conv), as_long(row), positional_weights(as_long(rank)), as_long(cat)


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
        scores = identity_scores([lists[i] for i in alive], len(catalog))
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
