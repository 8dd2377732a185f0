"""Statistics of run comparisons (rankgrpo.stats): clustered standard errors, the seed-level t test,
Holm's procedure, per-rank hit differences. Expected values are worked by hand in the comments."""
import math
import random

import pytest

from rankgrpo.stats import (clustered_mean_and_stderr, holm, mean_and_stderr, paired_difference,
                            per_rank_hit_difference, regularized_incomplete_beta, seed_level_t,
                            student_t_two_sided_p)


def test_clustered_stderr_by_hand():
    # values 1, 3, 2, 6; mean 3; residuals -2, 0, -1, 3; cluster sums a: -2, b: -1, c: 3
    # stderr^2 = G/(G-1) * sum S_g^2 / n^2 = 3/2 * 14 / 16 = 1.3125
    m, se, g = clustered_mean_and_stderr([1.0, 3.0, 2.0, 6.0], ["a", "a", "b", "c"])
    assert (m, g) == (3.0, 3)
    assert se == pytest.approx(math.sqrt(1.3125), abs=1e-15)
    # the ordinary standard error of the same values is smaller: the two rows of a pull together
    assert mean_and_stderr([1.0, 3.0, 2.0, 6.0])[1] == pytest.approx(math.sqrt(14 / 3 / 4), abs=1e-15)


def test_singleton_clusters_give_the_ordinary_stderr():
    rng = random.Random(0)
    values = [rng.random() for _ in range(37)]
    m, se, g = clustered_mean_and_stderr(values, list(range(37)))
    m0, se0 = mean_and_stderr(values)
    assert g == 37 and m == pytest.approx(m0, abs=1e-15) and se == pytest.approx(se0, rel=1e-12)


def test_clustered_stderr_loop_reference_and_order_invariance():
    rng = random.Random(1)
    values = [rng.gauss(0, 1) for _ in range(50)]
    keys = [rng.randrange(12) for _ in range(50)]
    mean = sum(values) / 50
    sums = {}
    for k, v in zip(keys, values):
        sums[k] = sums.get(k, 0.0) + (v - mean)
    g = len(sums)
    expected = math.sqrt(g / (g - 1) * sum(s * s for s in sums.values()) / 50 ** 2)
    assert clustered_mean_and_stderr(values, keys)[1] == pytest.approx(expected, rel=1e-12)
    perm = list(range(50))
    rng.shuffle(perm)
    shuffled = clustered_mean_and_stderr([values[i] for i in perm], [keys[i] for i in perm])
    assert shuffled[1] == pytest.approx(expected, rel=1e-12)


def test_clustered_stderr_edge_cases():
    assert clustered_mean_and_stderr([], []) == (0.0, 0.0, 0)
    assert clustered_mean_and_stderr([1.0, 5.0], ["p", "p"]) == (3.0, 0.0, 1)  # one cluster: no SE
    with pytest.raises(ValueError, match="3 values but 2 cluster keys"):
        clustered_mean_and_stderr([1.0, 2.0, 3.0], ["a", "b"])


def test_paired_difference_clustered_by_hand():
    a = {"x": {"m": 0.5}, "y": {"m": 0.2}, "z": {"m": 0.3}}
    b = {"x": {"m": 0.1}, "y": {"m": 0.2}, "z": {"m": 0.0}}
    # differences 0.4, 0.0, 0.3; mean 0.7/3; x and z share a prompt: cluster sums +0.7/3 and -0.7/3
    d = paired_difference(a, b, "m", clusters={"x": "p1", "y": "p2", "z": "p1"})
    assert d["n"] == 3 and d["n_clusters"] == 2
    assert d["stderr"] == pytest.approx(math.sqrt(2 * 2 * (0.7 / 3) ** 2 / 9), abs=1e-15)
    assert d["z"] == pytest.approx(d["mean"] / d["stderr"], abs=1e-12)
    # without clusters: the ordinary paired SE
    assert paired_difference(a, b, "m")["stderr"] == pytest.approx(mean_and_stderr([0.4, 0.0, 0.3])[1], abs=1e-15)


def test_per_rank_hit_difference_by_hand():
    a = {"u": {"rank_hits": [1, 1, 0]}, "v": {"rank_hits": [0, 1, 1]}}
    b = {"u": {"rank_hits": [1, 0, 0]}, "v": {"rank_hits": [0, 0, 0]}, "w": {"rank_hits": [1, 1, 1]}}
    rows = per_rank_hit_difference(a, b)
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["mean"] for r in rows] == [0.0, 1.0, 0.5]  # over u and v only
    assert rows[2]["stderr"] == pytest.approx(0.5, abs=1e-15)  # differences 0, 1: sd 0.7071 / sqrt 2
    assert all(r["n"] == 2 for r in rows)
    assert per_rank_hit_difference({}, b) == []


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 4.303, 12.0, -3.0])
def test_t_tail_closed_forms(t):
    assert student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-13)
    assert student_t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), abs=1e-13)
    # many degrees of freedom: the normal tail
    assert student_t_two_sided_p(t, 1e7) == pytest.approx(math.erfc(abs(t) / math.sqrt(2)), abs=1e-6)


def test_t_tail_known_quantiles():
    # two-sided 5% critical values of Student's t (standard tables)
    for df, q in [(2, 4.302653), (3, 3.182446), (5, 2.570582), (10, 2.228139), (30, 2.042272)]:
        assert student_t_two_sided_p(q, df) == pytest.approx(0.05, abs=2e-7)
    assert student_t_two_sided_p(math.inf, 3) == 0.0
    with pytest.raises(ValueError):
        student_t_two_sided_p(1.0, 0)


def test_incomplete_beta_by_hand():
    # I_x(1, 1) = x; I_x(2, 1) = x^2; I_x(1, 2) = 1 - (1 - x)^2; I_x(a, b) = 1 - I_{1-x}(b, a)
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert regularized_incomplete_beta(x, 1, 1) == pytest.approx(x, abs=1e-14)
        assert regularized_incomplete_beta(x, 2, 1) == pytest.approx(x * x, abs=1e-14)
        assert regularized_incomplete_beta(x, 1, 2) == pytest.approx(1 - (1 - x) ** 2, abs=1e-14)
        assert regularized_incomplete_beta(x, 3.5, 0.5) == pytest.approx(
            1 - regularized_incomplete_beta(1 - x, 0.5, 3.5), abs=1e-14)
    with pytest.raises(ValueError):
        regularized_incomplete_beta(1.5, 1, 1)


def test_seed_level_t_by_hand():
    # +0.018, +0.022, +0.010: mean 0.016667, sd 0.006110, se 0.003528, t 4.724 on 2 df
    d = seed_level_t([0.018, 0.022, 0.010])
    assert d["n"] == 3 and d["df"] == 2
    assert d["mean"] == pytest.approx(0.05 / 3, abs=1e-15)
    assert d["t"] == pytest.approx(4.7246, abs=1e-4)
    assert d["p"] == pytest.approx(1 - d["t"] / math.sqrt(d["t"] ** 2 + 2), abs=1e-13)
    assert 0.04 < d["p"] < 0.045
    assert seed_level_t([0.01])["t"] is None and seed_level_t([0.01])["p"] is None
    same = seed_level_t([0.02, 0.02, 0.02])
    assert same["t"] == math.inf and same["p"] == 0.0
    assert seed_level_t([0.0, 0.0])["t"] == 0.0 and seed_level_t([0.0, 0.0])["p"] == 1.0


def test_holm_by_hand():
    out = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # sorted a 0.01, c 0.03, b 0.04 -> 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06
    assert [out[k]["p_holm"] for k in "abc"] == pytest.approx([0.03, 0.06, 0.06], abs=1e-15)
    assert [out[k]["rejected"] for k in "abc"] == [True, False, False]
    assert list(out) == ["a", "b", "c"] and out["b"]["p"] == 0.04
    # adjusted values are capped at 1 and never below the raw p
    capped = holm({"x": 0.6, "y": 0.7})
    assert capped["x"]["p_holm"] == 1.0 and capped["y"]["p_holm"] == 1.0
    assert holm({}) == {}
    assert holm({"only": 0.05})["only"]["rejected"] is True


def test_holm_is_at_least_as_strict_as_unadjusted_and_at_most_bonferroni():
    rng = random.Random(2)
    p = {str(i): rng.random() * 0.2 for i in range(9)}
    out = holm(p)
    for k, v in p.items():
        assert v <= out[k]["p_holm"] <= min(1.0, 9 * v) + 1e-15
