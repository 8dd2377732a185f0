"""Remap-Reflect-Adjust as equations (§2.2, App. A, Eq. 10-13): score vectors over the catalog.

For each conversation the black-box teacher writes a raw list of N items in its own item
space. RRA turns it into a score vector over the whole catalog C and keeps the top N:

    Remap   (Eq. 10)  s_remap   = p . (S_item-item + I_ic) + lambda . s_context
    Reflect (Eq. 11)  s_reflect = s_remap + gamma . r             (the teacher as judge)
    Adjust  (Eq. 12)  s_final   = w * s_reflect + b               (w, b fitted by Eq. 13)
    demo              top-N of s_final, seen titles excluded, "Title (YYYY)" lines

One pure tensor function per equation below (``remap_scores``, ``reflect_scores``,
``adjust_scores``, ``adjust_loss``), each with its shapes and a worked example, then the
fit of Eq. 13 (``fit_adjust``) and the top N (``top_n``). The teacher's replies are parsed
in ``rankgrpo.demos.replies``; ``rankgrpo.demos.pipeline.run_rra`` chains these functions
over a whole data set (teacher requests, embeddings, counted failures, the ablations).

Adjust, a decision the paper leaves open: Eq. 13 is the paper's *sum* over ground-truth
events plus lambda_w ||w - 1||^2 + lambda_b ||b||^2. ``fit_adjust`` minimises the same
objective divided by M, the number of ground-truth events (same minimiser, O(1) gradients),
with Adam (lr 0.05, 300 steps, mini-batches of 512 conversations, w = 1 and b = 0 at the
start). Each step uses the batch's mean NLL plus regulariser / M. With thousands of
conversations the regularisers are nearly negligible, as in the paper; the fixed budget
keeps w and b finite for items that are never a ground truth.

Memory: similarity is never materialised per (conversation, item, catalog item). By
linearity p . S = (sum_u p_u e_u) . E_C^T, so each conversation needs one matrix product
with the catalog embeddings E_C [|C|, d] (``remap_scores_batched``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


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


def identity_scores(conv: torch.Tensor, p: torch.Tensor, catalog_index: torch.Tensor, n_conversations: int,
                    n_catalog: int) -> torch.Tensor:
    """The 'remove remap-reflect' ablation: s = p . I_ic, Eq. 10 without S and s_context.

    The teacher items of all conversations are E edges, as in ``remap_scores_batched``:
        conv          [E]  conversation of the edge, in 0..n_conversations-1
        p             [E]  positional weight 1/sqrt(k)
        catalog_index [E]  the catalog item it equals (I_ic), or -1 if out of catalog
    Each in-catalog teacher item scores 1/sqrt(k) at its catalog item; out-of-catalog
    items and every other catalog item score 0. Returns [n_conversations, n_catalog].

    Worked example (one conversation; ranks 1, 2, 4 are catalog 2, out of catalog, catalog 0):

    >>> identity_scores(torch.tensor([0, 0, 0]), positional_weights(torch.tensor([1, 2, 4])),
    ...                 torch.tensor([2, -1, 0]), 1, 3).tolist()
    [[0.5, 0.0, 1.0]]
    """
    scores = torch.zeros(n_conversations, n_catalog)
    hit = catalog_index >= 0
    scores.index_put_((conv[hit], catalog_index[hit]), p[hit], accumulate=True)
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
