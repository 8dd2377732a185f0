"""Tests of rankgrpo.losses: hand-computed values, the paper's gradient (Eq. 7), clipping,
exact masking, loop-vs-vectorised references and gradient-accumulation equivalence."""
import doctest
import math
import random

import pytest
import torch

import rankgrpo.losses
from rankgrpo.losses import (
    eos_positions, group_advantages, grpo_loss, gspo_loss, k3_kl, loss_denominator, rank_grpo_loss,
    rank_log_ratio, rank_token_counts, sft_loss,
)

F64 = torch.float64
NO_SHAPING = dict(overflow_penalty=0.0, early_stop_penalty=0.0)


def test_docstring_examples():
    assert doctest.testmod(rankgrpo.losses).failed == 0


# ---------------------------------------------------------------------------------------
# Random batches and slow references
# ---------------------------------------------------------------------------------------

def random_batch(seed, n_rows, n_tokens, n_ranks, *, log_ratio_scale=0.1):
    """Token-level inputs with random line structure: blank lines (skipped ranks), overflow,
    rows cut before <eos>, padding, an occasional empty row."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rank_ids = torch.full((n_rows, n_tokens), -1, dtype=torch.long)
    mask = torch.zeros(n_rows, n_tokens, dtype=torch.bool)
    eos_index = torch.full((n_rows,), -1, dtype=torch.long)
    for b in range(n_rows):
        length = 0 if rng.random() < 0.05 else rng.randint(1, n_tokens)
        rank = 0
        for t in range(length):
            rank_ids[b, t], mask[b, t] = rank, True
            u = rng.random()
            rank += 1 if u < 0.25 else 2 if u < 0.3 else 0
        if length and rng.random() < 0.7:
            eos_index[b] = length - 1
    logp = -3 * torch.rand(n_rows, n_tokens, generator=gen, dtype=F64)
    old_logp = logp + log_ratio_scale * torch.randn(n_rows, n_tokens, generator=gen, dtype=F64)
    ref_logp = logp + 0.3 * torch.randn(n_rows, n_tokens, generator=gen, dtype=F64)
    advantages = torch.randn(n_rows, n_ranks, generator=gen, dtype=F64)
    return dict(logp=logp, old_logp=old_logp, ref_logp=ref_logp, rank_ids=rank_ids, mask=mask,
                advantages=advantages, eos_index=eos_index)


def clip(w, eps_low, eps_high):
    return min(max(w, 1 - eps_low), 1 + eps_high)


def loop_rank_grpo(logp, old_logp, ref_logp, rank_ids, mask, advantages, eos_index, *, eps_low, eps_high,
                   beta, aggregation, overflow_penalty, early_stop_penalty):
    """Obvious per-row, per-line Python loop of Eq. 6 with length shaping and the KL term."""
    n_rows, n_ranks = advantages.shape
    policy, kl, n_tokens = 0.0, 0.0, 0
    for b in range(n_rows):
        lines = {}
        for t in range(logp.shape[1]):
            if mask[b, t]:
                lines.setdefault(int(rank_ids[b, t]), []).append(t)
                n_tokens += 1
        for k, tokens in lines.items():
            w = torch.exp(sum(logp[b, t] - old_logp[b, t] for t in tokens) / len(tokens))
            a = advantages[b, k] if k < n_ranks else overflow_penalty
            term = torch.minimum(w * a, w.clamp(1 - eps_low, 1 + eps_high) * a)
            kls = [torch.exp(ref_logp[b, t] - logp[b, t]) - (ref_logp[b, t] - logp[b, t]) - 1 for t in tokens]
            if aggregation == "rank_mean":
                policy, kl = policy + term, kl + sum(kls) / len(tokens)
            else:
                policy, kl = policy + len(tokens) * term, kl + sum(kls)
        e = int(eos_index[b])
        if early_stop_penalty != 0 and e >= 0 and rank_ids[b, e] < n_ranks - 1:
            w = torch.exp(logp[b, e] - old_logp[b, e])
            eps_u = early_stop_penalty
            policy = policy + torch.minimum(w * eps_u, w.clamp(1 - eps_low, 1 + eps_high) * eps_u)
    denom = n_rows * n_ranks if aggregation == "rank_mean" else max(n_tokens, 1)
    return -policy / denom + beta * kl / denom


def loop_sequence_loss(logp, old_logp, ref_logp, mask, advantages, *, eps_low, eps_high, beta, level):
    """Eq. 3 (level="token", GRPO) or GSPO (level="sequence") as a plain loop over rows and tokens."""
    total = 0.0
    for b in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if mask[b, t]]
        if not tokens:
            continue
        a = advantages[b]
        if level == "token":
            terms = []
            for t in tokens:
                w = torch.exp(logp[b, t] - old_logp[b, t])
                terms.append(torch.minimum(w * a, w.clamp(1 - eps_low, 1 + eps_high) * a))
            total = total - sum(terms) / len(tokens)
        else:
            s = torch.exp(sum(logp[b, t] - old_logp[b, t] for t in tokens) / len(tokens))
            total = total - torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a)
        r = [ref_logp[b, t] - logp[b, t] for t in tokens]
        total = total + beta * sum(torch.exp(x) - x - 1 for x in r) / len(tokens)
    return total / logp.shape[0]


def loss_and_grad(fn, logp, *args, **kwargs):
    logp = logp.detach().clone().requires_grad_(True)
    loss, metrics = fn(logp, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


# ---------------------------------------------------------------------------------------
# Advantages and the rank ratio: hand-computed values
# ---------------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    # P=1, G=3, N=2. Rank 0: rewards 1, 0, 1 -> mean 2/3, unbiased std sqrt(1/3). Rank 1: all 0.5.
    rewards = torch.tensor([[[1.0, 0.5], [0.0, 0.5], [1.0, 0.5]]], dtype=F64)
    std = math.sqrt(((1 / 3) ** 2 + (2 / 3) ** 2 + (1 / 3) ** 2) / 2)
    assert std == pytest.approx(math.sqrt(1 / 3))
    expected = torch.tensor([[[(1 / 3) / (std + 1e-4), 0.0],
                              [(-2 / 3) / (std + 1e-4), 0.0],
                              [(1 / 3) / (std + 1e-4), 0.0]]], dtype=F64)
    assert torch.allclose(group_advantages(rewards), expected, rtol=0, atol=1e-15)
    assert torch.equal(group_advantages(rewards)[..., 1], torch.zeros(1, 3, dtype=F64))


def test_group_advantages_are_per_prompt_and_per_rank():
    rewards = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[10.0, 2.0], [10.0, 4.0]]], dtype=F64)  # P=2, G=2, N=2
    std = math.sqrt(2.0)  # unbiased std of two values 2 apart
    expected = torch.tensor([[[-1 / (std + 1e-4), 0.0], [1 / (std + 1e-4), 0.0]],
                             [[0.0, -1 / (std + 1e-4)], [0.0, 1 / (std + 1e-4)]]], dtype=F64)
    assert torch.allclose(group_advantages(rewards), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("value", [0.1, 0.7, 1 / 3, 0.0])
def test_constant_groups_get_exactly_zero(value):
    rewards = torch.full((2, 3, 3), value, dtype=F64)  # the mean of three 0.1 is 0.1 + 1.4e-17
    assert torch.equal(group_advantages(rewards), torch.zeros_like(rewards))
    single = torch.rand(4, 1, 3)  # G = 1: unbiased std undefined
    assert torch.equal(group_advantages(single), torch.zeros_like(single))
    assert group_advantages(torch.rand(3, 4)).shape == (3, 4)  # [P, G] list rewards


def test_rank_log_ratio_and_counts_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -0.7, -0.1, 5.0],
                         [-0.3, -0.3, -0.3, -0.3, 0.0, 0.0]], dtype=F64)
    old = torch.tensor([[-1.5, -2.1, -0.5, -0.4, -0.2, 0.0],
                        [-0.2, -0.1, -0.6, -0.3, 0.0, 0.0]], dtype=F64)
    ranks = torch.tensor([[0, 0, 2, 2, 5, -1],     # rank 1 empty (blank line), 5 is overflow for N=3
                          [0, 1, 1, 1, -1, -1]])
    mask = ranks >= 0
    out = rank_log_ratio(logp, old, ranks, mask, 3)
    expected = torch.tensor([[(0.5 + 0.1) / 2, 0.0, (0.0 - 0.3) / 2],
                             [-0.1, (-0.2 + 0.3 + 0.0) / 3, 0.0]], dtype=F64)
    assert torch.allclose(out, expected, rtol=0, atol=1e-15)
    assert torch.equal(rank_token_counts(ranks, mask, 3), torch.tensor([[2, 0, 2], [1, 3, 0]]))
    assert torch.equal(rank_token_counts(ranks, mask, 6)[0], torch.tensor([2, 0, 2, 0, 0, 1]))


def test_k3_kl_hand_computed():
    logp = torch.tensor([[-1.0, -1.0, -1.0]], dtype=F64)
    ref = torch.tensor([[-0.5, -1.0, float("nan")]], dtype=F64)
    kl = k3_kl(logp, ref, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(kl, torch.tensor([[math.exp(0.5) - 1.5, 0.0, 0.0]], dtype=F64), rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------
# Eq. 7: the gradient on a tiny "LM"
# ---------------------------------------------------------------------------------------

def tiny_lm(seed, n_rows, n_tokens, n_contexts=5, vocab=7):
    """logits[b, t] = theta[context[b, t]]: shared parameters, so token gradients overlap."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_contexts, vocab, generator=gen, dtype=F64, requires_grad=True)
    context = torch.randint(0, n_contexts, (n_rows, n_tokens), generator=gen)
    tokens = torch.randint(0, vocab, (n_rows, n_tokens), generator=gen)

    def logp_fn():
        return torch.log_softmax(theta[context], dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def token_grad(b, t):
        """∇_theta log π(y_bt) in closed form: e_context ⊗ (onehot(y) - softmax(theta[context]))."""
        g = torch.zeros_like(theta)
        c = context[b, t]
        one_hot = torch.nn.functional.one_hot(tokens[b, t], theta.shape[1]).to(F64)
        g[c] = one_hot - torch.softmax(theta[c].detach(), -1)
        return g

    return theta, logp_fn, token_grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
def test_eq7_gradient_closed_form(seed, aggregation):
    group, n_tokens, n_ranks = 5, 14, 3  # one prompt: B = G
    theta, logp_fn, token_grad = tiny_lm(seed, group, n_tokens)
    batch = random_batch(seed, group, n_tokens, n_ranks)
    logp = logp_fn()
    gen = torch.Generator().manual_seed(seed + 100)
    noise = 2 * torch.rand(logp.shape, generator=gen, dtype=F64) - 1
    old_logp = logp.detach() + 0.05 * noise  # w in [0.95, 1.05]
    rank_ids, mask, adv = batch["rank_ids"], batch["mask"], batch["advantages"]
    loss, m = rank_grpo_loss(logp, old_logp, None, rank_ids, mask, adv, beta=0.0, aggregation=aggregation,
                             **NO_SHAPING)
    assert 1 - 0.06 < m["ratio/min"] and m["ratio/max"] < 1 + 0.08  # inside the clip range
    (grad,) = torch.autograd.grad(loss, theta)

    # Closed form: ∇J = (1/(G·N)) Σ_i Σ_k w_ik Â_ik (1/|y_k|) Σ_t ∇log π(y_ikt); loss = -J.
    # token_mean (the authors' code) instead: (1/#tokens) Σ_i Σ_k w_ik Â_ik Σ_t ∇log π(y_ikt).
    expected = torch.zeros_like(theta)
    n_masked = int(mask.sum())
    for i in range(group):
        for k in range(n_ranks):
            tokens = [t for t in range(n_tokens) if mask[i, t] and rank_ids[i, t] == k]
            if not tokens:
                continue
            w = math.exp(sum(float(logp[i, t].detach() - old_logp[i, t]) for t in tokens) / len(tokens))
            token_sum = sum(token_grad(i, t) for t in tokens)
            if aggregation == "rank_mean":
                expected += w * float(adv[i, k]) * token_sum / len(tokens) / (group * n_ranks)
            else:
                expected += w * float(adv[i, k]) * token_sum / n_masked
    assert torch.allclose(grad, -expected, rtol=0, atol=1e-8)
    assert expected.abs().max() > 1e-3  # the check has teeth


def test_eq4_and_eq15_gradients_closed_form():
    """GRPO: (1/B) Σ_i (1/|y_i|) Σ_t w_it Â_i ∇log π; GSPO: (1/B) Σ_i s_i Â_i (1/|y_i|) Σ_t ∇log π."""
    n_rows, n_tokens = 4, 9
    theta, logp_fn, token_grad = tiny_lm(3, n_rows, n_tokens)
    lp = logp_fn().detach()
    old_logp = lp + 1e-4 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    mask = torch.arange(n_tokens)[None, :] < torch.tensor([9, 5, 1, 7])[:, None]
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=F64)
    for loss_fn, level in ((grpo_loss, "token"), (gspo_loss, "sequence")):
        loss, _ = loss_fn(logp_fn(), old_logp, None, mask, adv, beta=0.0, eps_low=0.2, eps_high=0.2)
        (grad,) = torch.autograd.grad(loss, theta)
        expected = torch.zeros_like(theta)
        for i in range(n_rows):
            tokens = [t for t in range(n_tokens) if mask[i, t]]
            log_w = [float(lp[i, t] - old_logp[i, t]) for t in tokens]
            if level == "token":
                weighted = sum(math.exp(lw) * token_grad(i, t) for lw, t in zip(log_w, tokens))
                expected += weighted * float(adv[i]) / len(tokens)
            else:
                s = math.exp(sum(log_w) / len(tokens))
                expected += s * float(adv[i]) * sum(token_grad(i, t) for t in tokens) / len(tokens)
        assert torch.allclose(grad, -expected / n_rows, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Clipping and on-policy ratios
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
def test_clipped_ranks_get_exactly_zero_gradient(aggregation):
    # Row 0, one rank per case; token log-ratios differ within a rank, their mean is +-0.2.
    ranks = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]])
    delta = torch.tensor([[0.1, 0.3, -0.1, -0.3, -0.1, -0.3, 0.1, 0.3, 0.01, 0.03]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]], dtype=F64)
    # rank 0: A>0, w=e^0.2 > 1.08  -> clipped branch, zero gradient
    # rank 1: A<0, w=e^-0.2 < 0.94 -> clipped branch, zero gradient
    # rank 2: A>0, w < 0.94  -> the min keeps w·A (no clip on this side), gradient flows
    # rank 3: A<0, w > 1.08  -> the min keeps w·A, gradient flows
    # rank 4: inside the range, gradient flows
    logp = torch.full((1, 10), -1.0, dtype=F64)
    loss, grad, m = loss_and_grad(rank_grpo_loss, logp, logp - delta, None, ranks, ranks >= 0, adv,
                                  beta=0.0, aggregation=aggregation, **NO_SHAPING)
    per_rank = [grad[0, ranks[0] == k] for k in range(5)]
    assert torch.equal(per_rank[0], torch.zeros(2, dtype=F64))
    assert torch.equal(per_rank[1], torch.zeros(2, dtype=F64))
    for k in (2, 3, 4):
        assert (per_rank[k].abs() > 1e-3).all()
    assert m["clip/high_frac"] == pytest.approx(1 / 5) and m["clip/low_frac"] == pytest.approx(1 / 5)


def test_grpo_clipped_tokens_get_exactly_zero_gradient():
    delta = torch.tensor([[0.3, -0.3, 0.0], [0.3, -0.3, 0.0]], dtype=F64)  # w = 1.35, 0.74, 1
    logp = torch.full((2, 3), -1.0, dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    _, grad, m = loss_and_grad(grpo_loss, logp, logp - delta, None, torch.ones(2, 3), adv, beta=0.0)
    assert grad[0, 0] == 0 and grad[0, 1] != 0 and grad[0, 2] != 0   # A>0: only w > 1.26 is clipped
    assert grad[1, 1] == 0 and grad[1, 0] != 0 and grad[1, 2] != 0   # A<0: only w < 0.8 is clipped
    assert m["clip/high_frac"] == pytest.approx(1 / 6) and m["clip/low_frac"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
def test_on_policy_ratios_are_exactly_one(aggregation):
    batch = random_batch(4, 6, 20, 4)
    logp = batch["logp"].clone().requires_grad_(True)
    old = logp.detach()
    log_w = rank_log_ratio(logp, old, batch["rank_ids"], batch["mask"], 30)
    assert torch.equal(log_w, torch.zeros(6, 30, dtype=F64))
    _, m = rank_grpo_loss(logp, old, batch["ref_logp"], batch["rank_ids"], batch["mask"], batch["advantages"],
                          aggregation=aggregation, eos_index=batch["eos_index"])
    assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0
    assert m["clip/low_frac"] == 0.0 and m["clip/high_frac"] == 0.0
    for fn in (grpo_loss, gspo_loss):
        _, m = fn(logp, old, batch["ref_logp"], batch["mask"], batch["advantages"][:, 0])
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0


# ---------------------------------------------------------------------------------------
# Causality of the returns -> advantages
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["exp_inf", "dcg"])
def test_earlier_ranks_never_change_later_advantages(kind):
    from rankgrpo.rewards import causal_returns

    gen = torch.Generator().manual_seed(7)
    n_prompts, group, n_ranks = 3, 6, 8
    rel = (torch.rand(n_prompts, group, n_ranks, generator=gen) < 0.3).to(F64)
    base = group_advantages(causal_returns(rel, kind=kind))
    for k in range(1, n_ranks):
        for _ in range(5):
            changed = rel.clone()
            changed[..., :k] = (torch.rand(n_prompts, group, k, generator=gen) < 0.5).to(F64)
            adv = group_advantages(causal_returns(changed, kind=kind))
            assert torch.equal(adv[..., k:], base[..., k:])
    # ... while changing rank k itself does move Â at rank k (the test can fail).
    changed = rel.clone()
    changed[0, 0, 3] = 1 - changed[0, 0, 3]
    assert not torch.equal(group_advantages(causal_returns(changed, kind=kind))[0, :, 3], base[0, :, 3])


# ---------------------------------------------------------------------------------------
# Exact masking: garbage outside the mask changes nothing
# ---------------------------------------------------------------------------------------

GARBAGE = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4, -1e4], dtype=F64)


def with_garbage(x, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    junk = GARBAGE[torch.randint(0, len(GARBAGE), x.shape, generator=gen)]
    return torch.where(mask, x, junk)


def loss_cases():
    def rank_mean(logp, b, **kw):
        return rank_grpo_loss(logp, b["old_logp"], b["ref_logp"], b["rank_ids"], b["mask"], b["advantages"],
                              eos_index=b["eos_index"], **kw)

    def token_mean(logp, b, **kw):
        return rank_grpo_loss(logp, b["old_logp"], b["ref_logp"], b["rank_ids"], b["mask"], b["advantages"],
                              eos_index=b["eos_index"], aggregation="token_mean", **kw)

    def grpo(logp, b, **kw):
        return grpo_loss(logp, b["old_logp"], b["ref_logp"], b["mask"], b["advantages"][:, 0], **kw)

    def gspo(logp, b, **kw):
        return gspo_loss(logp, b["old_logp"], b["ref_logp"], b["mask"], b["advantages"][:, 0], **kw)

    return {"rank_mean": rank_mean, "token_mean": token_mean, "grpo": grpo, "gspo": gspo}


@pytest.mark.parametrize("case", list(loss_cases()))
def test_garbage_outside_the_mask_changes_nothing(case):
    fn = loss_cases()[case]
    batch = random_batch(11, 6, 16, 4, log_ratio_scale=0.2)
    mask = batch["mask"]
    clean_loss, clean_grad, clean_m = loss_and_grad(fn, batch["logp"], batch)

    dirty = dict(batch)
    for i, key in enumerate(("old_logp", "ref_logp")):
        dirty[key] = with_garbage(batch[key], mask, seed=i)
    gen = torch.Generator().manual_seed(5)
    dirty["rank_ids"] = torch.where(mask, batch["rank_ids"], torch.randint(-5, 10**6, mask.shape, generator=gen))
    dirty_loss, dirty_grad, dirty_m = loss_and_grad(fn, with_garbage(batch["logp"], mask, seed=9), dirty)
    assert torch.equal(dirty_loss, clean_loss)
    assert torch.equal(dirty_grad, clean_grad)
    assert torch.equal(clean_grad[~mask], torch.zeros_like(clean_grad[~mask]))
    assert dirty_m == clean_m

    # Extra padding columns full of garbage: same loss and gradient on the real columns.
    def pad(x, value):
        return torch.cat([x, torch.full((x.shape[0], 5), value, dtype=x.dtype)], dim=1)

    padded = dict(dirty, mask=pad(mask, False), rank_ids=pad(dirty["rank_ids"], 77),
                  old_logp=pad(dirty["old_logp"], float("nan")), ref_logp=pad(dirty["ref_logp"], float("inf")))
    padded_loss, padded_grad, _ = loss_and_grad(fn, pad(batch["logp"], float("nan")), padded)
    assert torch.allclose(padded_loss, clean_loss, rtol=0, atol=1e-14)
    assert torch.allclose(padded_grad[:, :-5], clean_grad, rtol=0, atol=1e-14)
    assert torch.equal(padded_grad[:, -5:], torch.zeros(6, 5, dtype=F64))


# ---------------------------------------------------------------------------------------
# Loop vs vectorised
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
def test_rank_grpo_loss_equals_loop(seed, aggregation):
    rng = random.Random(seed)
    n_rows, n_tokens, n_ranks = rng.randint(1, 8), rng.randint(1, 30), rng.randint(1, 6)
    b = random_batch(seed, n_rows, n_tokens, n_ranks, log_ratio_scale=0.15)
    settings = dict(eps_low=0.06, eps_high=0.08, beta=rng.choice([0.0, 1e-3, 0.5]), aggregation=aggregation,
                    overflow_penalty=rng.choice([0.0, -0.1, -0.7]),
                    early_stop_penalty=rng.choice([0.0, -0.1, -0.4]))
    args = (b["old_logp"], b["ref_logp"], b["rank_ids"], b["mask"], b["advantages"])
    fast_loss, fast_grad, _ = loss_and_grad(rank_grpo_loss, b["logp"], *args, eos_index=b["eos_index"], **settings)
    slow_loss, slow_grad, _ = loss_and_grad(lambda lp, *a, **k: (loop_rank_grpo(lp, *a, **k), None), b["logp"],
                                            *args, b["eos_index"], **settings)
    assert torch.allclose(fast_loss, slow_loss, rtol=0, atol=1e-12)
    assert torch.allclose(fast_grad, slow_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_grpo_and_gspo_equal_loops(seed):
    rng = random.Random(seed)
    b = random_batch(seed, rng.randint(1, 8), rng.randint(1, 25), 1, log_ratio_scale=0.2)
    adv = b["advantages"][:, 0]
    beta = rng.choice([0.0, 1e-3, 0.3])
    for fn, level, eps in ((grpo_loss, "token", (0.2, 0.26)), (gspo_loss, "sequence", (0.05, 0.07))):
        settings = dict(eps_low=eps[0], eps_high=eps[1], beta=beta)
        fast_loss, fast_grad, _ = loss_and_grad(fn, b["logp"], b["old_logp"], b["ref_logp"], b["mask"], adv,
                                                **settings)
        slow_loss, slow_grad, _ = loss_and_grad(
            lambda lp, *a, **k: (loop_sequence_loss(lp, *a, level=level, **k), None),
            b["logp"], b["old_logp"], b["ref_logp"], b["mask"], adv, **settings)
        assert torch.allclose(fast_loss, slow_loss, rtol=0, atol=1e-12)
        assert torch.allclose(fast_grad, slow_grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Hand computations of each aggregation
# ---------------------------------------------------------------------------------------

def hand_batch():
    """B=2, N=2. Row 0: ranks 0 0 1 1; row 1: ranks 0 1 1 and one padding token."""
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]], dtype=F64)
    delta = torch.tensor([[0.1, 0.3, -0.2, 0.0], [0.0, 0.1, 0.1, 9.0]], dtype=F64)   # log π - log π_old
    ref_minus_logp = torch.tensor([[0.0, 0.5, 0.0, 0.0], [-0.5, 0.0, 0.0, 9.0]], dtype=F64)
    ranks = torch.tensor([[0, 0, 1, 1], [0, 1, 1, -1]])
    adv = torch.tensor([[1.0, -1.0], [-0.5, 2.0]], dtype=F64)
    return logp, logp - delta, logp + ref_minus_logp, ranks, ranks >= 0, adv


def test_rank_mean_and_token_mean_hand_computed():
    logp, old, ref, ranks, mask, adv = hand_batch()
    # ratios: r0k0 e^0.2 = 1.2214 (A=1, clipped to 1.08); r0k1 e^-0.1 = 0.9048 (A=-1, clipped to 0.94);
    # r1k0 e^0 = 1 (A=-0.5); r1k1 e^0.1 = 1.1052 (A=2, clipped to 1.08).
    terms = [1.08 * 1.0, 0.94 * -1.0, 1.0 * -0.5, 1.08 * 2.0]
    kl_a, kl_b = math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5
    beta = 0.1
    # Paper (Eq. 6): every rank weighs 1, D = B*N = 4; KL averaged within each rank.
    rank_mean = -sum(terms) / 4 + beta * (kl_a / 2 + kl_b / 1) / 4
    # Authors' code (TRL bnpo): ratio and advantage copied to every token, D = 7 tokens.
    token_mean = -(2 * terms[0] + 2 * terms[1] + 1 * terms[2] + 2 * terms[3]) / 7 + beta * (kl_a + kl_b) / 7
    for aggregation, expected in (("rank_mean", rank_mean), ("token_mean", token_mean)):
        loss, m = rank_grpo_loss(logp, old, ref, ranks, mask, adv, beta=beta, aggregation=aggregation,
                                 **NO_SHAPING)
        assert loss.item() == pytest.approx(expected, abs=1e-14)
        assert m["loss/policy"] + m["loss/kl"] == pytest.approx(m["loss"], abs=1e-14)
        assert m["kl"] == pytest.approx((kl_a + kl_b) / 7, abs=1e-14)
    assert rank_mean != pytest.approx(token_mean)


def test_grpo_and_gspo_hand_computed():
    logp, old, ref, _, mask, _ = hand_batch()
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    kl_a, kl_b = math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5
    beta = 0.1
    # GRPO (Eq. 3), token ratios of row 0 (A=1): e^0.1, e^0.3 = 1.3499 (clipped to 1.26), e^-0.2, 1
    row0 = (math.exp(0.1) + 1.26 + math.exp(-0.2) + 1.0) / 4
    # row 1 (A=-1): e^0 -> -1, e^0.1 -> -1.1052, e^0.1 -> -1.1052 (unclipped branch is the min)
    row1 = -(1.0 + 2 * math.exp(0.1)) / 3
    expected = -(row0 + row1) / 2 + beta * (kl_a / 4 + kl_b / 3) / 2
    loss, _ = grpo_loss(logp, old, ref, mask, adv, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-14)
    # GSPO: s_0 = exp(0.2/4) = 1.0513 (A=1, clipped at 1 + 4e-4), s_1 = exp(0.2/3) = 1.0690 (A=-1, unclipped)
    expected = -((1 + 4e-4) * 1.0 + math.exp(0.2 / 3) * -1.0) / 2 + beta * (kl_a / 4 + kl_b / 3) / 2
    loss, _ = gspo_loss(logp, old, ref, mask, adv, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-14)


def test_zero_std_groups_give_finite_losses():
    b = random_batch(2, 6, 12, 3)
    rewards = torch.ones(2, 3, 3, dtype=F64)  # P=2, G=3: every group constant
    adv = group_advantages(rewards).reshape(6, 3)
    assert torch.equal(adv, torch.zeros_like(adv))
    for aggregation in ("rank_mean", "token_mean"):
        loss, grad, _ = loss_and_grad(rank_grpo_loss, b["logp"], b["old_logp"], b["ref_logp"], b["rank_ids"],
                                      b["mask"], adv, aggregation=aggregation, eos_index=b["eos_index"])
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    seq_adv = group_advantages(torch.zeros(2, 3, dtype=F64)).reshape(6)
    for fn in (grpo_loss, gspo_loss):
        loss, grad, _ = loss_and_grad(fn, b["logp"], b["old_logp"], b["ref_logp"], b["mask"], seq_adv)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------
# Length shaping
# ---------------------------------------------------------------------------------------

def shaping_case():
    """N=3. Row 0: lines 0,1,2 then overflow lines 3 and 4 (eos on line 4).
    Row 1: stops early: eos on line 1. Row 2: cut before eos on line 0. Row 3: exactly N lines + eos."""
    ranks = torch.tensor([[0, 1, 2, 3, 3, 4],
                          [0, 0, 1, -1, -1, -1],
                          [0, 0, 0, 0, -1, -1],
                          [0, 1, 2, 2, -1, -1]])
    mask = ranks >= 0
    eos_index = torch.tensor([5, 2, -1, 3])
    logp = torch.full((4, 6), -1.0, dtype=F64)
    old = logp - 0.02 * torch.arange(24, dtype=F64).reshape(4, 6) / 24
    adv = torch.zeros(4, 3, dtype=F64)
    return logp, old, ranks, mask, adv, eos_index


def test_length_shaping_units_hand_computed():
    logp, old, ranks, mask, adv, eos_index = shaping_case()
    d = (logp - old)
    w = lambda *cells: math.exp(sum(float(d[b, t]) for b, t in cells) / len(cells))
    eps_o, eps_u = -0.1, -0.3
    overflow_terms = [w((0, 3), (0, 4)) * eps_o, w((0, 5)) * eps_o]   # ratios inside the clip range
    stop_term = w((1, 2)) * eps_u                                      # row 1's eos token alone
    for aggregation, weights, denom in (("rank_mean", (1, 1, 1), 12), ("token_mean", (2, 1, 1), int(mask.sum()))):
        loss, m = rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=0.0, aggregation=aggregation,
                                 overflow_penalty=eps_o, early_stop_penalty=eps_u, eos_index=eos_index)
        terms = weights[0] * overflow_terms[0] + weights[1] * overflow_terms[1] + weights[2] * stop_term
        expected = -terms / denom
        assert loss.item() == pytest.approx(expected, abs=1e-14)
        assert m["units/overflow"] == 2 and m["units/early_stop"] == 1
    loss, _ = rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=0.0, **NO_SHAPING)
    assert loss.item() == 0.0  # all advantages zero and shaping off


def test_length_shaping_gradient_goes_to_the_right_tokens():
    logp, old, ranks, mask, adv, eos_index = shaping_case()
    _, grad, _ = loss_and_grad(rank_grpo_loss, logp, old, None, ranks, mask, adv, beta=0.0,
                               overflow_penalty=-0.1, early_stop_penalty=-0.1, eos_index=eos_index)
    pushed = grad != 0
    expected = torch.zeros_like(mask)
    expected[0, 3:6] = True   # overflow lines
    expected[1, 2] = True     # the premature eos
    assert torch.equal(pushed, expected)   # no +bonus on row 3 (exactly N lines), nothing on the cut row 2
    assert (grad[expected] > 0).all()      # a penalty lowers those tokens' log-probs


def test_eos_positions_and_missing_eos_index():
    assert torch.equal(eos_positions(torch.tensor([4, 2]), torch.tensor([False, True])), torch.tensor([-1, 1]))
    logp, old, ranks, mask, adv, _ = shaping_case()
    with pytest.raises(ValueError, match="eos_index"):
        rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=0.0)
    with pytest.raises(ValueError, match="eos_index"):  # pointing at padding
        rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=0.0, eos_index=torch.tensor([5, 4, -1, 3]))


def test_input_errors_are_explicit():
    logp, old, ranks, mask, adv, eos_index = shaping_case()
    with pytest.raises(ValueError, match="ref_logp"):
        rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=1e-3, **NO_SHAPING)
    with pytest.raises(ValueError, match="aggregation"):
        rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=0.0, aggregation="seq_mean", **NO_SHAPING)
    with pytest.raises(ValueError, match="rank id"):
        rank_grpo_loss(logp, old, None, torch.where(mask, -1, ranks), torch.ones_like(mask), adv, beta=0.0,
                       **NO_SHAPING)


# ---------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------

def split_rows(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
def test_two_micro_batches_equal_one_batch(aggregation):
    b = random_batch(21, 7, 18, 4)
    kw = dict(aggregation=aggregation, beta=0.2, overflow_penalty=-0.1, early_stop_penalty=-0.1)
    full_loss, full_grad, _ = loss_and_grad(rank_grpo_loss, b["logp"], b["old_logp"], b["ref_logp"], b["rank_ids"],
                                            b["mask"], b["advantages"], eos_index=b["eos_index"], **kw)
    parts = [split_rows(b, slice(0, 2)), split_rows(b, slice(2, 7))]
    denom = sum(loss_denominator(aggregation, p["mask"], 4) for p in parts)
    losses, grads = [], []
    for p in parts:
        loss, grad, _ = loss_and_grad(rank_grpo_loss, p["logp"], p["old_logp"], p["ref_logp"], p["rank_ids"],
                                      p["mask"], p["advantages"], eos_index=p["eos_index"], denom=denom, **kw)
        losses.append(loss)
        grads.append(grad)
    assert torch.allclose(sum(losses), full_loss, rtol=0, atol=1e-14)
    assert torch.allclose(torch.cat(grads), full_grad, rtol=0, atol=1e-14)
    # The naive mean of per-micro-batch means is different (the pitfall this guards against).
    naive = sum(rank_grpo_loss(p["logp"], p["old_logp"], p["ref_logp"], p["rank_ids"], p["mask"], p["advantages"],
                               eos_index=p["eos_index"], **kw)[0] for p in parts) / 2
    if aggregation == "token_mean":
        assert not torch.allclose(naive, full_loss)


def test_sequence_losses_accumulate():
    b = random_batch(22, 5, 10, 1)
    adv = b["advantages"][:, 0]
    for fn in (grpo_loss, gspo_loss):
        full, _ = fn(b["logp"], b["old_logp"], b["ref_logp"], b["mask"], adv)
        denom = sum(loss_denominator("sequence_mean", b["mask"][s], 1) for s in (slice(0, 3), slice(3, 5)))
        parts = [fn(b["logp"][s], b["old_logp"][s], b["ref_logp"][s], b["mask"][s], adv[s], denom=denom)[0]
                 for s in (slice(0, 3), slice(3, 5))]
        assert torch.allclose(sum(parts), full, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------

def test_sft_loss_is_the_completion_nll():
    gen = torch.Generator().manual_seed(0)
    n_rows, n_tokens, vocab = 3, 8, 11
    logits = torch.randn(n_rows, n_tokens, vocab, generator=gen, dtype=F64)
    ids = torch.randint(0, vocab, (n_rows, n_tokens), generator=gen)
    prompt_len, length = torch.tensor([2, 4, 1]), torch.tensor([8, 6, 3])   # completion = [prompt_len, length)
    pos = torch.arange(n_tokens)[None, :]
    labels = (pos >= prompt_len[:, None]) & (pos < length[:, None])
    expected = -sum(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]] for b, t in labels.nonzero().tolist())
    expected = expected / labels.sum()
    loss, grad, m = loss_and_grad(sft_loss, logits, labels, ids)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-13)
    assert m["n_tokens"] == labels.sum().item()
    # Logit rows that predict no target may hold anything.
    used = torch.zeros(n_rows, n_tokens, dtype=torch.bool)
    used[:, :-1] = labels[:, 1:]
    dirty = torch.where(used[..., None], logits, torch.tensor(float("nan"), dtype=F64))
    dirty_loss, dirty_grad, _ = loss_and_grad(sft_loss, dirty, labels, ids)
    assert torch.equal(dirty_loss, loss) and torch.equal(dirty_grad, grad)
    half, _ = sft_loss(logits, labels, ids, denom=2 * labels.sum())
    assert half.item() == pytest.approx(loss.item() / 2, abs=1e-14)
    with pytest.raises(ValueError, match="first token"):
        sft_loss(logits, torch.ones(n_rows, n_tokens), ids)
