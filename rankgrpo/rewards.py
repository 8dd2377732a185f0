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

from typing import Sequence

import numpy as np
import torch

from rankgrpo.catalog import Catalog
from rankgrpo.metrics import hits
from rankgrpo.parsing import Item

REWARD_KINDS = ("exp_inf", "exp", "dcg")


def rank_relevance(items: Sequence[Item], groundtruth, seen_titles, catalog: Catalog, *, n_items: int = 20,
                   year_tolerance: int = 2) -> np.ndarray:
    """rel_k for k < n_items from the one parse (§2.3.1): ``float64 [n_items]``.

    The reward's matching rule is ``hits(..., positions="fixed", protocol="lenient")``:
    normalised titles, year-tolerant catalog, ground truths consumed on match, exact year
    first. It is not the evaluation's default (the authors' ``evaluate_direct_match``).

    Ranks past the last line are 0; lines past ``n_items`` (overflow) are ignored here and
    handled by length shaping in the loss.
    """
    h = hits(list(items[:n_items]), groundtruth, seen_titles, catalog, year_tolerance=year_tolerance,
             positions="fixed", protocol="lenient")
    rel = np.zeros(n_items, dtype=np.float64)
    rel[: len(h)] = h
    return rel


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
