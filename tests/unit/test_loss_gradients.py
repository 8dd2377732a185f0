"""Gradients of every term of rank_grpo_loss / grpo_loss / gspo_loss against hand-derived formulas.

test_losses.py checks Eq. 7 (the policy term, beta = 0, no length shaping) against autograd on a
tiny LM. This file adds the other terms, each derived by hand with respect to the token
log-probs logp[b, t] (the chain rule to the parameters is the same as for Eq. 7):

* a clipped unit u (a rank, an overflow line, or a premature <eos>), ratio w = exp(mean_{t in u}
  (logp - old)), advantage A, weight c_u in the sum:  term = -(c_u / D) min(w A, clip(w) A), so

      d term / d logp[t] = -(c_u / D) A w / |u|   when the unclipped branch is active
                                                 (A > 0 and w < 1 + eps_high, or A < 0 and w > 1 - eps_low)
                         = 0                      otherwise (the clip has taken over);

* the k3 KL of a token, k3 = exp(r) - r - 1 with r = ref - logp:  d k3 / d logp = 1 - exp(ref - logp);
  it enters with beta / D, times 1/|line| under rank_mean (one mean per line unit) and 1 under
  token_mean; GRPO and GSPO average it per list: beta / B / |y_b|.

rank_mean: D = B N, c_u = 1 for every unit. token_mean: D = number of tokens, c_u = |u| for line units
and 1 for the <eos> stop unit (so a line's tokens each get -(1/D) A w).
"""
from __future__ import annotations

import math

import pytest
import torch

from rankgrpo.losses import grpo_loss, gspo_loss, rank_grpo_loss

F64 = torch.float64
EPS_LOW, EPS_HIGH = 0.06, 0.08
EPS_O, EPS_U = -0.1, -0.3
N = 3

# Row 0: lines 0, 1, 2, then overflow line 3 (two tokens) and line 4 (one token, the <eos>): no stop.
# Row 1: <eos> at column 3 on line 1 < N - 1: a premature stop.
# Row 2: cut before <eos> (no stop unit, eos_index -1).
# Row 3: <eos> on line 2 = N - 1: a complete list, no stop.
RANKS = [[0, 0, 1, 2, 2, 3, 3, 4],
         [0, 0, 1, 1],
         [0, 1, 1],
         [0, 1, 2, 2]]
EOS_INDEX = [7, 3, -1, 3]
# The shaping units, written out by hand: overflow lines (advantage eps_o), the stop unit (eps_u).
OVERFLOW_UNITS = [[(0, 5), (0, 6)], [(0, 7)]]
STOP_UNITS = [[(1, 3)]]
# Log-ratio offsets (logp - old) chosen per unit so that each clip branch is exercised:
# overflow line 3 ratio e^0.2 > 1 + eps_high with A < 0 (unclipped side: gradient flows),
# overflow line 4 ratio e^-0.2 < 1 - eps_low with A < 0 (clipped: no gradient),
# row 3 rank 0 ratio e^0.2 with A > 0 (clipped).
OFFSETS = {(0, 3): 0.2, (0, 4): -0.2, (3, 0): 0.2}


def case(seed: int, stop_offset: float = 0.0):
    """stop_offset: extra log-ratio of the premature <eos> token alone; -0.2 puts the stop unit's
    ratio below 1 - eps_low with A = eps_u < 0, where the clip takes its gradient away."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(RANKS), max(map(len, RANKS))
    rank_ids = torch.full((B, T), -1)
    for b, r in enumerate(RANKS):
        rank_ids[b, :len(r)] = torch.tensor(r)
    mask = rank_ids >= 0
    logp = -torch.rand(B, T, generator=gen, dtype=F64) * 3 - 0.1
    old = logp + 0.02 * (2 * torch.rand(B, T, generator=gen, dtype=F64) - 1)  # ratios within e^±0.02
    for (b, line), offset in OFFSETS.items():
        cols = [t for t, r in enumerate(RANKS[b]) if r == line]
        old[b, cols] = logp[b, cols] - offset
    old[STOP_UNITS[0][0]] -= stop_offset
    ref = logp + 0.5 * torch.randn(B, T, generator=gen, dtype=F64)
    adv = torch.randn(B, N, generator=gen, dtype=F64)
    adv[3, 0] = abs(float(adv[3, 0])) + 0.5  # positive, so its e^0.2 ratio is clipped
    # garbage outside the mask must not matter
    logp = torch.where(mask, logp, torch.tensor(float("nan"), dtype=F64))
    return logp, old, ref, rank_ids, mask, adv


def unit_grad(grad, cells, adv, logp, old, weight, denom):
    """Add d(-(weight/D) min(w A, clip(w) A)) / d logp to grad, cells = the unit's (row, column)s."""
    w = math.exp(sum(float(logp[c] - old[c]) for c in cells) / len(cells))
    active = (adv > 0 and w < 1 + EPS_HIGH) or (adv < 0 and w > 1 - EPS_LOW)
    if active:
        for c in cells:
            grad[c] += -(weight / denom) * adv * w / len(cells)


def line_cells(b):
    lines = {}
    for t, r in enumerate(RANKS[b]):
        lines.setdefault(r, []).append((b, t))
    return lines


def kl_token_grad(logp, ref, c):
    return 1.0 - math.exp(float(ref[c] - logp[c]))


def expected_grad(logp, old, ref, adv, mask, aggregation, beta):
    grad = torch.zeros_like(old)
    n_tokens = int(mask.sum())
    denom = len(RANKS) * N if aggregation == "rank_mean" else n_tokens
    for b in range(len(RANKS)):
        for line, cells in line_cells(b).items():
            weight = 1 if aggregation == "rank_mean" else len(cells)
            if line < N:
                unit_grad(grad, cells, float(adv[b, line]), logp, old, weight, denom)
            # KL: per line unit (mean over its tokens) or per token
            for c in cells:
                scale = 1 / len(cells) if aggregation == "rank_mean" else 1.0
                grad[c] += beta / denom * scale * kl_token_grad(logp, ref, c)
    for cells in OVERFLOW_UNITS:
        unit_grad(grad, cells, EPS_O, logp, old, 1 if aggregation == "rank_mean" else len(cells), denom)
    for cells in STOP_UNITS:
        unit_grad(grad, cells, EPS_U, logp, old, 1, denom)
    return grad


@pytest.mark.parametrize("seed,stop_offset", [(0, 0.0), (1, 0.0), (2, -0.2)])
@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_rank_grpo_gradient_with_kl_and_length_shaping(seed, stop_offset, aggregation, beta):
    logp, old, ref, rank_ids, mask, adv = case(seed, stop_offset)
    x = logp.clone().requires_grad_(True)
    loss, m = rank_grpo_loss(x, old, ref, rank_ids, mask, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=beta,
                             aggregation=aggregation, overflow_penalty=EPS_O, early_stop_penalty=EPS_U,
                             eos_index=torch.tensor(EOS_INDEX))
    (grad,) = torch.autograd.grad(loss, x)
    expected = expected_grad(logp, old, ref, adv, mask, aggregation, beta)
    assert m["units/overflow"] == 2 and m["units/early_stop"] == 1
    assert torch.allclose(grad[mask], expected[mask], rtol=0, atol=1e-12)
    assert bool((grad[~mask] == 0).all())
    # The case has teeth: the unclipped overflow line and the stop unit get gradient; the clipped
    # overflow line and the clipped rank get none from the policy term.
    if beta == 0 and stop_offset == 0:
        assert abs(float(expected[0, 5])) > 1e-3 and abs(float(expected[1, 3])) > 1e-3
        assert float(expected[0, 7]) == 0.0 and float(expected[3, 0]) == 0.0


def test_kl_gradient_alone_is_one_minus_the_ratio_to_the_reference():
    """Zero advantages, shaping off: only the KL term is left, and its gradient is
    beta / D / |line| * (1 - exp(ref - logp)) token by token (rank_mean)."""
    logp, old, ref, rank_ids, mask, adv = case(3)
    x = logp.clone().requires_grad_(True)
    beta = 0.7
    loss, _ = rank_grpo_loss(x, old, ref, rank_ids, mask, torch.zeros_like(adv), beta=beta,
                             overflow_penalty=0.0, early_stop_penalty=0.0)
    (grad,) = torch.autograd.grad(loss, x)
    D = len(RANKS) * N
    for b in range(len(RANKS)):
        for cells in line_cells(b).values():
            for c in cells:
                expected = beta / D / len(cells) * (1 - math.exp(float(ref[c] - logp[c])))
                assert float(grad[c]) == pytest.approx(expected, abs=1e-13)
    # and its value: beta / D * sum over line units of the mean token k3
    k3 = lambda c: math.exp(float(ref[c] - logp[c])) - float(ref[c] - logp[c]) - 1
    value = sum(sum(k3(c) for c in cells) / len(cells) for b in range(len(RANKS))
                for cells in line_cells(b).values())
    assert loss.item() == pytest.approx(beta / D * value, abs=1e-13)


@pytest.mark.parametrize("loss_fn", [grpo_loss, gspo_loss])
def test_grpo_and_gspo_kl_gradient(loss_fn):
    """beta / B / |y_b| * (1 - exp(ref - logp)) for each token, with zero advantages."""
    logp, old, ref, rank_ids, mask, _ = case(4)
    x = logp.clone().requires_grad_(True)
    beta = 0.3
    loss, _ = loss_fn(x, old, ref, mask, torch.zeros(len(RANKS), dtype=F64), beta=beta)
    (grad,) = torch.autograd.grad(loss, x)
    for b in range(len(RANKS)):
        n = len(RANKS[b])
        for t in range(n):
            expected = beta / len(RANKS) / n * (1 - math.exp(float(ref[b, t] - logp[b, t])))
            assert float(grad[b, t]) == pytest.approx(expected, abs=1e-13)
