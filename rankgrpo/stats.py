"""Statistics for comparing runs the way the data is built: rows that share a prompt, seeds that
share a world, and many claims judged at once.

Three facts about a test split shape every standard error here:

* **Rows are not independent.** A test split may hold the same prompt more than once (a user who
  asks twice, or a conversation cut at two turns with the same context). Their scores move together,
  so the standard error of a mean is clustered by prompt (`clustered_mean_and_stderr`): residuals are
  summed within a cluster before they are squared. With every cluster a single row it is the
  ordinary standard error.
* **A paired SE at one seed ignores training noise.** Two arms trained at the same seed share their
  sampling stream, world and demonstrations; the paired SE over conversations says how sure we are
  of *this* pair of checkpoints, not of the arms. Across seeds the test is the seed-level paired
  difference: one mean difference per seed, a t statistic with n − 1 degrees of freedom
  (`seed_level_t`).
* **Many claims, one family.** When k claims are judged together, Holm's step-down procedure
  (`holm`) keeps the chance of any false "shown" at alpha.

Every function is pure: numbers in, numbers out. No scipy: the t distribution's tail is the
regularised incomplete beta function (`regularized_incomplete_beta`).
"""
from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); stderr 0 for fewer than 2 values.

    >>> mean_and_stderr([1.0, 2.0, 3.0])
    (2.0, 0.5773502691896258)
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return 0.0, 0.0
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return float(v.mean()), se


def clustered_mean_and_stderr(values: Sequence[float], clusters: Sequence[Hashable]) -> tuple[float, float, int]:
    """Mean and cluster-robust standard error of the mean; returns (mean, stderr, n_clusters).

    values: [n] floats; clusters: [n] keys (rows with equal keys form one cluster, e.g. the prompt).
    With G clusters, e_i = x_i − mean and S_g = Σ_{i in g} e_i,

        stderr² = G / (G − 1) · Σ_g S_g² / n²

    (the usual small-sample factor G/(G−1)). When every row is its own cluster (G = n) this is
    s² / n, the ordinary standard error. stderr is 0 with fewer than 2 clusters.

    Example: values 1, 3, 2, 6 with clusters a, a, b, c: mean 3, residuals −2, 0, −1, 3, cluster
    sums a: −2, b: −1, c: 3, stderr² = 3/2 · (4 + 1 + 9) / 16 = 1.3125, stderr 1.1456 (the
    ordinary one would be 1.0801: the two rows of a pull the same way).
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) != len(clusters):
        raise ValueError(f"{len(v)} values but {len(clusters)} cluster keys")
    if len(v) == 0:
        return 0.0, 0.0, 0
    mean = float(v.mean())
    sums: dict[Hashable, float] = {}
    for key, e in zip(clusters, v - mean):
        sums[key] = sums.get(key, 0.0) + float(e)
    g = len(sums)
    if g < 2:
        return mean, 0.0, g
    s = np.fromiter(sums.values(), dtype=np.float64)
    var = g / (g - 1) * float(np.sum(s * s)) / (len(v) ** 2)
    return mean, math.sqrt(var), g


def paired_difference(a: Mapping[str, Mapping], b: Mapping[str, Mapping], metric: str, *,
                      clusters: Mapping[str, Hashable] | None = None) -> dict:
    """Paired difference a − b of a per-example metric over the examples both score.

    a, b: {example id: score row}; clusters: {example id: cluster key} (e.g. the prompt text), or
    None for independent rows. Returns {"mean", "stderr" (of the mean difference), "z" (mean /
    stderr, 0 when stderr is 0), "n", "n_clusters"}. Pairing removes the conversations' own
    difficulty, so the standard error is far smaller than either run's.

    Example: a = {x: 0.5, y: 0.2, z: 0.3}, b = {x: 0.1, y: 0.2, z: 0.0} give differences 0.4, 0.0,
    0.3: mean 0.2333, stderr 0.1202, z 1.94. With x and z one cluster, residuals 0.1667, −0.2333,
    0.0667 sum to 0.2333 (x, z) and −0.2333 (y): stderr² = 2 · (0.0544 + 0.0544) / 9, stderr 0.1556.
    """
    ids = sorted(set(a) & set(b))
    diffs = [a[i][metric] - b[i][metric] for i in ids]
    keys = [clusters[i] for i in ids] if clusters is not None else ids
    m, se, g = clustered_mean_and_stderr(diffs, keys)
    return {"mean": m, "stderr": se, "z": m / se if se > 0 else 0.0, "n": len(ids), "n_clusters": g}


def per_rank_hit_difference(a: Mapping[str, Mapping], b: Mapping[str, Mapping], *,
                            clusters: Mapping[str, Hashable] | None = None) -> list[dict]:
    """Paired difference a − b of the hit rate at each rank (1..N), the direct test of "gains grow
    toward the tail": NDCG@k is cumulative, so a gain at rank 3 shows in every N@k with k >= 3.

    a, b: {example id: score row with "rank_hits": [N] 0/1 per rank}. Returns one dict per rank,
    {"rank" (1-based), "mean", "stderr", "z", "n", "n_clusters"}, from `paired_difference`.
    """
    ids = sorted(set(a) & set(b))
    if not ids:
        return []
    n_ranks = min(len(a[i]["rank_hits"]) for i in ids)
    out = []
    for r in range(n_ranks):
        ra = {i: {"hit": float(a[i]["rank_hits"][r])} for i in ids}
        rb = {i: {"hit": float(b[i]["rank_hits"][r])} for i in ids}
        out.append({"rank": r + 1, **paired_difference(ra, rb, "hit", clusters=clusters)})
    return out


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for 0 <= x <= 1, a, b > 0 (Lentz's continued fraction,
    evaluated on the side of x where it converges fast). Accurate to about 1e-14.

    >>> round(regularized_incomplete_beta(0.5, 2.0, 2.0), 12)   # symmetric: one half
    0.5
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2).

    Closed forms it meets: df = 1 (Cauchy) 1 − 2/π·atan|t|; df = 2: 1 − |t| / sqrt(t² + 2).
    Example: t = 4.303, df = 2 gives p = 0.0500 (the 97.5% quantile of t with 2 df is 4.303).
    """
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def seed_level_t(per_seed: Sequence[float]) -> dict:
    """The seed-level paired test of an arm difference: one mean difference per seed, tested
    against zero with Student's t on n − 1 degrees of freedom.

    per_seed: [n] mean differences (arm A − arm B at each seed, each over the same conversations).
    Returns {"mean", "stderr" (over seeds), "t", "df", "p" (two-sided), "n"}; t and p are None with
    fewer than 2 seeds, and t is ±inf (p 0) when every seed gives the same nonzero difference.

    Example: +0.018, +0.022, +0.010: mean 0.0167, stderr 0.00353, t = 4.72 on 2 df, p = 0.042.
    """
    n = len(per_seed)
    mean, se = mean_and_stderr(per_seed)
    if n < 2:
        return {"mean": mean, "stderr": se, "t": None, "df": max(n - 1, 0), "p": None, "n": n}
    if se == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    return {"mean": mean, "stderr": se, "t": t, "df": n - 1, "p": student_t_two_sided_p(t, n - 1), "n": n}


def holm(pvalues: Mapping[str, float], alpha: float = 0.05) -> dict[str, dict]:
    """Holm's step-down procedure over a family of claims; controls the family-wise error at alpha.

    pvalues: {claim: p}. Sort ascending, p_(1) <= ... <= p_(k); the adjusted p-value of the j-th is
    max over i <= j of min(1, (k − i + 1) · p_(i)), and a claim is rejected (shown) when its adjusted
    p-value is at most alpha. Returns {claim: {"p", "p_holm", "rejected"}} in the input's order.

    Example: p = 0.01, 0.04, 0.03 over three claims: sorted 0.01, 0.03, 0.04 give 0.03, 0.06, 0.06
    (the last raised to the running maximum), so at alpha 0.05 only the first is shown.
    """
    k = len(pvalues)
    order = sorted(pvalues, key=lambda name: pvalues[name])
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (k - i) * pvalues[name]))
        adjusted[name] = running
    return {name: {"p": pvalues[name], "p_holm": adjusted[name], "rejected": adjusted[name] <= alpha}
            for name in pvalues}
