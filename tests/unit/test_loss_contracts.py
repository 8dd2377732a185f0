"""The documented edges of rankgrpo.losses that the main tests leave open: the default coefficients,
every logged metric by hand, the clip fractions at their bounds, empty batches, half-precision
logits in the SFT loss, and error messages that name the argument at fault. Found by mutation
testing (docs/testing.md, "Mutation score"); expected values are worked out by hand in the comments."""
import math

import pytest
import torch

from rankgrpo.losses import group_advantages, grpo_loss, gspo_loss, loss_denominator, rank_grpo_loss, sft_loss

F64 = torch.float64
NO_SHAPING = dict(overflow_penalty=0.0, early_stop_penalty=0.0)
LN2 = math.log(2.0)
K3_LN2 = 2.0 - LN2 - 1.0  # the k3 KL of a token with log π_ref - log π_θ = ln 2: e^r - r - 1 = 0.306853


def t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


def log(x):
    return math.log(x) if x > 0 else 0.0


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------

def test_a_constant_group_beside_a_varying_one_gets_exactly_zero():
    # mean([0.1] * 7) is not exactly 0.1 in float64; without the guard the group would get 1.4e-13
    rewards = t([[0.1] * 7, [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]]).unsqueeze(-1)   # P=2, G=7, N=1
    adv = group_advantages(rewards)
    assert torch.equal(adv[0], torch.zeros(7, 1, dtype=F64))
    assert (adv[1] != 0).all()


def test_group_advantages_message_names_the_shape():
    with pytest.raises(ValueError, match=r"rewards must be \[P, G, \.\.\.\], got shape \(3,\)"):
        group_advantages(torch.ones(3))


# ---------------------------------------------------------------------------------------
# Rank-GRPO: the defaults and every metric, by hand
# ---------------------------------------------------------------------------------------

def test_rank_grpo_defaults_and_metrics_by_hand():
    # N = 2. Row 0: rank 0 (w = 0.5, A = -1), rank 1 (w = 1.5, A = +1), overflow line 2 (w = 1) holding <eos>.
    # Row 1: rank 0 is one token (w = 1.02, A = 0.5) that is also <eos>: a premature stop; rank 1 empty.
    ratios = t([[0.5, 1.5, 1.0], [1.02, 1.0, 1.0]])
    logp = ratios.log()
    old = torch.zeros_like(logp)
    ref = logp.clone()
    ref[0, 0] += LN2                     # one token with KL: k3 = 0.306853
    ranks = torch.tensor([[0, 1, 2], [0, -1, -1]])
    mask = ranks >= 0
    adv = t([[-1.0, 1.0], [0.5, 2.0]])
    loss, m = rank_grpo_loss(logp, old, ref, ranks, mask, adv, eos_index=torch.tensor([2, 0]))
    # defaults eps_low = 0.06, eps_high = 0.08, beta = 1e-3, eps_o = eps_u = -0.1:
    #   rank (0,0): min(-0.5, 0.94 * -1) = -0.94      rank (0,1): min(1.5, 1.08 * 1) = 1.08
    #   overflow (0,2): 1 * -0.1 = -0.1               rank (1,0): 1.02 * 0.5 = 0.51
    #   <eos> unit of row 1: 1.02 * -0.1 = -0.102     D = B * N = 4
    policy = -(-0.94 + 1.08 - 0.1 + 0.51 - 0.102) / 4
    kl = 1e-3 * K3_LN2 / 4               # rank (0,0) has one token: its KL mean is K3_LN2
    assert loss.item() == pytest.approx(policy + kl, abs=1e-12)
    expected = {
        "loss": policy + kl, "loss/policy": policy, "loss/kl": kl,
        "ratio/mean": (0.5 + 1.5 + 1.0 + 1.02 + 1.02) / 5, "ratio/min": 0.5, "ratio/max": 1.5,
        "clip/low_frac": 1 / 5, "clip/high_frac": 1 / 5,          # units (0,0) and (0,1) of the 5
        "adv/mean": 2.5 / 4, "adv/std": math.sqrt((1 + 1 + 0.25 + 4) / 4 - (2.5 / 4) ** 2),  # population std
        "adv/zero_frac": 0.0, "units/empty_rank_frac": 1 / 4, "units/overflow": 1.0, "units/early_stop": 1.0,
        "units/exact_length": 0.0, "n_tokens": 4.0, "kl": K3_LN2 / 4,
    }
    per_rank = {"adv/rank_mean": [-0.25, 1.5], "adv/rank_abs_mean": [0.75, 1.5]}
    assert set(m) == set(expected) | set(per_rank)
    # the clip fractions are float32 counts (rel 1e-6); the rest is float64
    assert {k: m[k] for k in expected} == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert {k: m[k] for k in per_rank} == per_rank


def units_batch(ratios, advantages):
    """One row, one token per rank, ranks 0..len(ratios)-1, N = len(advantages); no shaping, no KL."""
    logp = t([[log(w) for w in ratios]])
    ranks = torch.arange(len(ratios)).unsqueeze(0)
    return logp, torch.zeros_like(logp), None, ranks, torch.ones_like(ranks, dtype=torch.bool), t([advantages])


def test_clip_fractions_count_only_the_units_the_clip_stops():
    # eps = 0.2. Only (A < 0, w < 0.8) and (A > 0, w > 1.2) are clipped; a positive advantage with a low
    # ratio, or a zero advantage, is not. Rank 5 is empty: no unit.
    batch = units_batch([0.5, 0.5, 0.5, 1.5, 1.5], [0.5, 0.0, -0.5, 0.0, 1.0, 1.0])
    loss, m = rank_grpo_loss(*batch, eps_low=0.2, eps_high=0.2, beta=0.0, **NO_SHAPING)
    # terms: min(0.25, 0.4) = 0.25, 0, min(-0.25, -0.4) = -0.4, 0, min(1.5, 1.2) = 1.2; D = 6
    assert loss.item() == pytest.approx(-(0.25 - 0.4 + 1.2) / 6, abs=1e-12)
    assert m["clip/low_frac"] == pytest.approx(1 / 5) and m["clip/high_frac"] == pytest.approx(1 / 5)
    assert m["adv/zero_frac"] == pytest.approx(2 / 6) and m["units/empty_rank_frac"] == pytest.approx(1 / 6)
    assert "kl" not in m and m["loss/kl"] == 0.0


@pytest.mark.parametrize("advantage", [-1.0, 1.0])
def test_a_ratio_on_the_clip_bound_is_not_clipped(advantage):
    # eps = 0 and w = 1 exactly: the ratio sits on both bounds, and neither clip fraction counts it
    loss, m = rank_grpo_loss(*units_batch([1.0, 1.0], [advantage, advantage]), eps_low=0.0, eps_high=0.0,
                             beta=0.0, **NO_SHAPING)
    assert m["clip/low_frac"] == 0.0 and m["clip/high_frac"] == 0.0
    assert loss.item() == -advantage


def test_one_clipped_unit_is_a_fraction_of_one():
    logp, old, _, ranks, mask, adv = units_batch([0.5], [-1.0])
    ref = logp + LN2
    loss, m = rank_grpo_loss(logp, old, ref, ranks, mask, adv, beta=0.5, **NO_SHAPING)
    # defaults eps: min(-0.5, -0.94) = -0.94; one token, so its KL is K3_LN2 in the loss and the metric
    assert loss.item() == pytest.approx(0.94 + 0.5 * K3_LN2, abs=1e-12)
    assert m["clip/low_frac"] == 1.0 and m["kl"] == pytest.approx(K3_LN2, abs=1e-12)


@pytest.mark.filterwarnings("ignore:std\\(\\)")   # adv/std of no advantage is nan
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_an_empty_batch_gives_zero_loss(shape):
    b, n_tokens = shape
    logp = torch.zeros(b, n_tokens, dtype=F64)
    ranks = torch.zeros(b, n_tokens, dtype=torch.long)
    adv = torch.ones(b, 2, dtype=F64)
    loss, m = rank_grpo_loss(logp, logp, logp, ranks, ranks > 0, adv, **NO_SHAPING)
    assert loss.item() == 0.0 and m["n_tokens"] == 0.0 and m["kl"] == 0.0
    assert m["ratio/mean"] == m["ratio/min"] == m["ratio/max"] == 1.0   # no unit: the neutral ratio
    assert m["clip/low_frac"] == m["clip/high_frac"] == 0.0
    loss, m = grpo_loss(logp, logp, logp, ranks > 0, adv[:, 0])
    assert loss.item() == 0.0 and m["ratio/min"] == m["ratio/max"] == 1.0 and m["n_tokens"] == 0.0
    # the <eos> rules need eos_index; with no token every row is cut (-1), and the loss is still 0
    cut = -torch.ones(b, dtype=torch.long)
    for rules in (dict(eos_advantage="zero"), dict(early_stop_penalty=-0.1), dict(exact_length_bonus=0.1),
                  dict(early_stop_unit="last_line", early_stop_penalty=-0.1)):
        loss, _ = rank_grpo_loss(logp, logp, logp, ranks, ranks > 0, adv, eos_index=cut,
                                 **{**NO_SHAPING, **rules})
        assert loss.item() == 0.0, rules
    if b:  # an <eos> column in a row without tokens is refused
        with pytest.raises(ValueError, match="eos_index must point"):
            rank_grpo_loss(logp, logp, logp, ranks, ranks > 0, adv, eos_index=torch.zeros(b, dtype=torch.long),
                           **{**NO_SHAPING, "eos_advantage": "zero"})


# ---------------------------------------------------------------------------------------
# Rank-GRPO: the authors' <eos> rules at their edges
# ---------------------------------------------------------------------------------------

def test_exact_length_bonus_of_one():
    # N = 1: the only line holds <eos> (exactly N lines). w = 1, A = 0, so only the bonus unit counts.
    logp, old, _, ranks, mask, _ = units_batch([1.0], [0.0])
    loss, m = rank_grpo_loss(logp, old, None, ranks, mask, t([[0.0]]), beta=0.0, **NO_SHAPING,
                             eos_index=torch.tensor([0]), exact_length_bonus=1.0)
    assert loss.item() == -1.0 and m["units/exact_length"] == 1.0


def test_eos_alone_on_its_line_under_eos_advantage_zero():
    # N = 3: line 0 is one token, line 1 is <eos> alone (a premature stop, shaping off). w = 1 everywhere.
    # Its advantage becomes 0: rank 1's mean term over its one token goes from 0.4 to 0. D = 3.
    logp, old, _, ranks, mask, _ = units_batch([1.0, 1.0], [0.0, 0.0, 0.0])
    loss, _ = rank_grpo_loss(logp, old, None, ranks, mask, t([[0.6, 0.4, 0.9]]), beta=0.0, **NO_SHAPING,
                             eos_index=torch.tensor([1]), eos_advantage="zero")
    assert loss.item() == pytest.approx(-0.6 / 3, abs=1e-15)


def test_last_line_unit_keeps_the_line_advantage_under_eos_advantage_line():
    # N = 2, one row: two tokens on line 0, the second is <eos> (a premature stop); w = 1.
    # early_stop_unit="last_line": the <eos> token's advantage is A_0 + eps_u = 0.5 - 0.1 inside line 0,
    # whose mean term is (0.5 + 0.4) / 2; rank 1 is empty. D = 2.
    logp = torch.zeros(1, 2, dtype=F64)
    ranks = torch.zeros(1, 2, dtype=torch.long)
    loss, m = rank_grpo_loss(logp, logp, None, ranks, ranks >= 0, t([[0.5, 0.3]]), beta=0.0, overflow_penalty=0.0,
                             early_stop_penalty=-0.1, eos_index=torch.tensor([1]), early_stop_unit="last_line")
    assert loss.item() == pytest.approx(-(0.5 + 0.4) / 2 / 2, abs=1e-15)
    assert m["units/early_stop"] == 1.0


# ---------------------------------------------------------------------------------------
# GRPO and GSPO: the defaults and the metrics
# ---------------------------------------------------------------------------------------

def grpo_batch():
    """Rows of 2, 2 and 3 tokens with A = -1, +1, 0; one token with KL K3_LN2 (row 0, token 0)."""
    ratios = t([[0.5, 1.5, 1.0], [1.5, 0.5, 1.0], [0.5, 1.5, 1.0]])
    logp = ratios.log()
    ref = logp.clone()
    ref[0, 0] += LN2
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return logp, torch.zeros_like(logp), ref, mask, t([-1.0, 1.0, 0.0])


def test_grpo_defaults_and_metrics_by_hand():
    # defaults eps_low = 0.2, eps_high = 0.26, beta = 1e-3. Token terms:
    #   row 0 (A = -1): min(-0.5, -0.8) = -0.8, min(-1.5, -1.26) = -1.5    mean -1.15
    #   row 1 (A = +1): min(1.5, 1.26) = 1.26, min(0.5, 0.8) = 0.5         mean  0.88
    #   row 2 (A = 0): 0
    loss, m = grpo_loss(*grpo_batch())
    policy, kl = -(-1.15 + 0.88) / 3, 1e-3 * (K3_LN2 / 2) / 3             # per-list means, D = B = 3
    assert loss.item() == pytest.approx(policy + kl, abs=1e-12)
    assert m == pytest.approx({
        "loss": policy + kl, "loss/policy": policy, "loss/kl": kl, "kl": K3_LN2 / 7,
        "ratio/mean": 7.0 / 7, "ratio/min": 0.5, "ratio/max": 1.5,
        "clip/low_frac": 1 / 7, "clip/high_frac": 1 / 7,       # row 0's w = 0.5 and row 1's w = 1.5 only
        "adv/mean": 0.0, "n_tokens": 7.0}, rel=1e-6, abs=1e-12)    # clip fractions: float32 counts
    # token_mean (TRL's bnpo): sums over the 7 tokens, the KL too
    loss, _ = grpo_loss(*grpo_batch(), aggregation="token_mean")
    assert loss.item() == pytest.approx(-(-0.8 - 1.5 + 1.26 + 0.5) / 7 + 1e-3 * K3_LN2 / 7, abs=1e-12)


def test_grpo_metrics_of_one_token():
    logp = t([[log(1.5)]])
    loss, m = grpo_loss(logp, torch.zeros_like(logp), logp + LN2, torch.ones(1, 1, dtype=torch.bool), t([1.0]))
    assert m["ratio/mean"] == pytest.approx(1.5) and m["clip/high_frac"] == 1.0
    assert m["kl"] == pytest.approx(K3_LN2, abs=1e-12)
    assert loss.item() == pytest.approx(-1.26 + 1e-3 * K3_LN2, abs=1e-12)


@pytest.mark.parametrize("advantage", [-1.0, 1.0])
def test_grpo_ratio_on_the_clip_bound_is_not_clipped(advantage):
    logp = torch.zeros(1, 2, dtype=F64)
    _, m = grpo_loss(logp, logp, None, torch.ones(1, 2, dtype=torch.bool), t([advantage]), eps_low=0.0,
                     eps_high=0.0, beta=0.0)
    assert m["clip/low_frac"] == 0.0 and m["clip/high_frac"] == 0.0


def test_gspo_defaults_by_hand():
    # s_0 = exp(mean(0.002, 0)) = exp(0.001) > 1 + 4e-4 with A = +1: clipped to 1.0004;
    # s_1 = exp(-0.001) < 1 - 3e-4 with A = -1: min(-0.9990005, -0.9997) = -0.9997. D = 2.
    logp = t([[0.002, 0.0], [-0.002, 0.0]])
    ref = logp.clone()
    ref[0, 0] += LN2
    loss, m = gspo_loss(logp, torch.zeros_like(logp), ref, torch.ones(2, 2, dtype=torch.bool), t([1.0, -1.0]))
    policy, kl = -(1.0004 - 0.9997) / 2, 1e-3 * (K3_LN2 / 2) / 2       # the KL averaged over row 0's 2 tokens
    assert loss.item() == pytest.approx(policy + kl, abs=1e-12)
    assert m["clip/low_frac"] == 0.5 and m["clip/high_frac"] == 0.5


# ---------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------

def sft_case():
    """Three targets (positions 1, 2, 3) over V = 3; logits at t predict the token at t + 1."""
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = LN2          # predicts token 2 with p = 2/4 (target 2: right)
    logits[0, 1, 0] = LN2          # predicts token 0 with p = 2/4 (target 1: wrong, p = 1/4)
    logits[0, 2, 1] = 3 * LN2      # predicts token 1 with p = 8/10 (target 1: right)
    return logits, torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 2, 1, 1]])


def test_sft_metrics_by_hand():
    logits, labels, ids = sft_case()
    loss, m = sft_loss(logits, labels, ids)
    nll = -(math.log(0.5) + math.log(0.25) + math.log(0.8)) / 3
    assert m == pytest.approx({"loss": nll, "nll": nll, "accuracy": 2 / 3, "n_tokens": 3.0}, rel=1e-6)
    # one target each: its own NLL and accuracy
    loss, m = sft_loss(logits, torch.tensor([[0, 1, 0, 0]]), ids)
    assert m == pytest.approx({"loss": -math.log(0.5), "nll": -math.log(0.5), "accuracy": 1.0, "n_tokens": 1.0},
                              rel=1e-6)
    loss, m = sft_loss(logits, torch.tensor([[0, 0, 1, 0]]), ids)
    assert m == pytest.approx({"loss": -math.log(0.25), "nll": -math.log(0.25), "accuracy": 0.0, "n_tokens": 1.0},
                              rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sft_loss_of_half_precision_logits_is_computed_in_float32(dtype):
    logits, labels, ids = sft_case()
    loss, m = sft_loss(logits.to(dtype), labels, ids)
    expected, _ = sft_loss(logits.to(dtype).float(), labels, ids)      # the same rounded logits, in float32
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_sft_shape_errors_name_the_shapes():
    logits, labels, ids = sft_case()
    with pytest.raises(ValueError, match=r"expected; got \(1, 4, 3\), \(1, 3\), \(1, 4\)"):
        sft_loss(logits, labels[:, :3], ids)
    with pytest.raises(ValueError, match=r"expected; got \(4, 3\), \(1, 4\), \(1, 4\)"):
        sft_loss(logits[0], labels, ids)
    with pytest.raises(ValueError, match=r"expected; got \(1, 4, 3, 1\), \(1, 4\), \(1, 4\)"):   # [B, T] first, yet 4-D
        sft_loss(logits.unsqueeze(-1), labels, ids)
    with pytest.raises(ValueError, match=r"^labels_mask\[:, 0\] must be 0: no logit predicts the first token$"):
        sft_loss(logits, torch.ones(1, 4), ids)


# ---------------------------------------------------------------------------------------
# Error messages that name the argument at fault
# ---------------------------------------------------------------------------------------

def token_inputs():
    logp = torch.zeros(2, 3, dtype=F64)
    ranks = torch.zeros(2, 3, dtype=torch.long)
    return logp, ranks, ranks >= 0


@pytest.mark.parametrize("fn", ["rank_grpo", "grpo"])
def test_shape_errors_name_the_tensor(fn):
    logp, ranks, mask = token_inputs()

    def call(old=logp, ref=logp, mask=mask, beta=0.1, lp=logp):
        if fn == "grpo":
            return grpo_loss(lp, old, ref, mask, torch.zeros(lp.shape[0], dtype=F64), beta=beta)
        return rank_grpo_loss(lp, old, ref, torch.zeros_like(lp, dtype=torch.long), mask,
                              torch.zeros(lp.shape[0], 2, dtype=F64), beta=beta, **NO_SHAPING)

    for name, kwargs in (("old_logp", dict(old=logp[:, :2])), ("mask", dict(mask=mask[:, :2])),
                         ("ref_logp", dict(ref=logp[:, :2]))):
        with pytest.raises(ValueError, match=rf"^{name} has shape \(2, 2\), logp has \(2, 3\); both must be \[B, T\]$"):
            call(**kwargs)
    flat = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match=r"^logp must be \[B, T\], got shape \(3,\)$"):
        call(old=flat, ref=flat, mask=flat > 0, lp=flat)
    with pytest.raises(ValueError, match=r"^beta != 0 needs ref_logp \(the frozen reference policy's log-probs\)$"):
        call(ref=None)


def test_advantages_of_the_wrong_batch_size_are_refused():
    logp, ranks, mask = token_inputs()
    # [1, N] with B = 2 would broadcast silently
    with pytest.raises(ValueError, match=r"^advantages must be \[B, N\] with B = 2, got \(1, 2\)$"):
        rank_grpo_loss(logp, logp, None, ranks, mask, torch.zeros(1, 2, dtype=F64), beta=0.0, **NO_SHAPING)
    for fn in (grpo_loss, gspo_loss):
        with pytest.raises(ValueError, match=r"^advantages must be \[B\] = \[2\], got \(2, 1\)$"):
            fn(logp, logp, None, mask, torch.zeros(2, 1, dtype=F64), beta=0.0)


def test_choice_errors_name_the_keyword():
    logp, ranks, mask = token_inputs()
    adv = torch.zeros(2, 2, dtype=F64)
    for keyword in ("eos_advantage", "early_stop_unit", "overflow_ratio"):
        with pytest.raises(ValueError, match=rf"^{keyword} must be one of \(.*\), got 'bogus'$"):
            rank_grpo_loss(logp, logp, None, ranks, mask, adv, beta=0.0, **NO_SHAPING, **{keyword: "bogus"})
    for fn in (grpo_loss, gspo_loss):
        with pytest.raises(ValueError, match=r"^aggregation must be one of \(.*\), got 'rank_mean'$"):
            fn(logp, logp, None, mask, torch.zeros(2, dtype=F64), beta=0.0, aggregation="rank_mean")
    with pytest.raises(ValueError, match=r"^aggregation must be 'rank_mean', 'token_mean', 'micro_token_mean' or "
                                         r"'sequence_mean', got 'bogus'$"):
        loss_denominator("bogus", mask, 2)


def test_eos_and_rank_errors_say_what_is_needed():
    logp, ranks, mask = token_inputs()
    adv = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"^early_stop_penalty != 0, exact_length_bonus != 0 and "
                                         r"eos_advantage='zero' need eos_index \(\[B\], -1 for completions cut "
                                         r"before <eos>\)$"):
        rank_grpo_loss(logp, logp, None, ranks, mask, adv, beta=0.0)
    with pytest.raises(ValueError, match=r"^eos_index must point at a masked completion token \(or be -1 for a "
                                         r"cut completion\)$"):
        rank_grpo_loss(logp, logp, None, ranks, mask & False, adv, beta=0.0, eos_index=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"^every masked token needs a rank id >= 0 \(see "
                                         r"rankgrpo\.segment\.token_ranks\)$"):
        rank_grpo_loss(logp, logp, None, ranks - 1, mask, adv, beta=0.0, **NO_SHAPING)
