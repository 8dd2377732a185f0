"""The authors' released objective as options (``--objective authors``), each checked by hand.

The paper's tables were produced by the authors' trainer (``libs/trl/rank_grpo_trainer.py`` on
TRL 0.21, ``libs/utils.py::process_rec_raw``, ``libs/metrics_align.py``), whose rules differ from
the paper's equations in seven places. Each is a keyword of a pure function here; every expected
number below is derived in the comments from the rule as stated (docs/algorithm.md), on rollouts
of a few tokens, never by running the code under test a second way:

  1 eos_advantage="zero"          the <eos> token's advantage is 0
  2 exact_length_bonus=0.1        +0.1 on the <eos> of a list of exactly N lines
  3 early_stop_unit="last_line"   the early-stop penalty rides on <eos> inside its line's ratio
  4 overflow_ratio="shared"       one ratio for all tokens past line N-1
  5 aggregation="micro_token_mean" per-micro-batch token means, averaged (TRL 0.21 "bnpo")
  6 matching="parsed_list"        the authors' reward on the list of parsed items
  7 grpo/gspo aggregation="micro_token_mean" the baselines under the same TRL default

Conventions: "w" is a unit's ratio exp(mean token log-ratio); with A < 0 the clipped term is
A * max(w, clip(w)), with A > 0 it is A * min(w, clip(w)); clip range [0.94, 1.08] (eps 0.06/0.08).
Gradients are d loss / d logp. On-policy (logp == old) every ratio is 1 and d w / d logp_t = 1/|unit|.
"""
from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from test_losses import random_batch
from test_rl_step import EOS, HEAT, NL, TrainRankGRPOConfig, tokenizer, world  # noqa: F401  (fixtures)

from rankgrpo.catalog import Catalog, CatalogItem
from rankgrpo.config import parse_config, save_config
from rankgrpo.losses import grpo_loss, gspo_loss, loss_denominator, rank_grpo_loss
from rankgrpo.parsing import parse_recommendations
from rankgrpo.rewards import authors_parsed_items, rank_relevance
from rankgrpo.rl import OBJECTIVES, micro_batch_denominators, policy_loss, prepare_batch
from rankgrpo.sampling import Rollout

F64 = torch.float64
NO_SHAPING = dict(overflow_penalty=0.0, early_stop_penalty=0.0)
AUTHORS_LOSS = dict(eos_advantage="zero", exact_length_bonus=0.1, early_stop_unit="last_line",
                    overflow_ratio="shared")


def run(logp, old, ranks, adv, eos_index=None, *, ref=None, **kw):
    """rank_grpo_loss on python lists (rows padded with rank -1); returns (loss, grad [B, T], metrics)."""
    ranks = torch.tensor(ranks)
    lp = torch.tensor(logp, dtype=F64, requires_grad=True)
    kw.setdefault("beta", 0.0)
    loss, m = rank_grpo_loss(lp, torch.tensor(old, dtype=F64), None if ref is None else torch.tensor(ref, dtype=F64),
                             ranks, ranks >= 0, torch.tensor(adv, dtype=F64),
                             eos_index=None if eos_index is None else torch.tensor(eos_index), **kw)
    loss.backward()
    return loss.item(), lp.grad.tolist(), m


def approx(x):
    return pytest.approx(x, abs=1e-12)


# ----------------------------------------------------------------------------- 1: eos_advantage

# One row, N = 2: tokens [a, "\n", b, <eos>], lines [0, 0, 1, 1]; <eos> at column 3. On-policy.
ROW = dict(logp=[[-1.0, -0.2, -2.0, -0.7]], old=[[-1.0, -0.2, -2.0, -0.7]], ranks=[[0, 0, 1, 1]], eos_index=[3])


@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
def test_eos_advantage_zero(aggregation):
    adv = [[1.0, -2.0]]
    # paper ("line"): every token of line 1, <eos> included, has A = -2.
    #   rank_mean, D = B*N = 2: loss = -(1*1 + 1*(-2))/2 = 0.5;
    #     grad line 0: -(1/2) * 1 * (1/2) = -0.25; line 1: -(1/2) * (-2) * (1/2) = +0.5
    #   token_mean, D = 4 tokens: loss = -(2*1 + 2*(-2))/4 = 0.5;
    #     grad line 0: -(1/4) * 2 * 1 * (1/2) = -0.25; line 1: -(1/4) * 2 * (-2) * (1/2) = +0.5
    # authors ("zero"): <eos> has A = 0, so line 1's tokens carry [-2, 0].
    #   rank_mean: line 1's term is the mean over its tokens, (w*(-2) + w*0)/2 = -w:
    #     loss = -(1 - 1)/2 = 0; grad line 1: -(1/2) * (-1) * (1/2) = +0.25 (both tokens, through w)
    #   token_mean: line 1's term is the sum, -2w: loss = -(2 - 2)/4 = 0;
    #     grad line 1: -(1/4) * (-2) * (1/2) = +0.25
    paper = run(ROW["logp"], ROW["old"], ROW["ranks"], adv, ROW["eos_index"], aggregation=aggregation, **NO_SHAPING)
    zero = run(ROW["logp"], ROW["old"], ROW["ranks"], adv, ROW["eos_index"], aggregation=aggregation,
               eos_advantage="zero", **NO_SHAPING)
    assert paper[0] == approx(0.5) and paper[1] == [[approx(g) for g in [-0.25, -0.25, 0.5, 0.5]]]
    assert zero[0] == approx(0.0) and zero[1] == [[approx(g) for g in [-0.25, -0.25, 0.25, 0.25]]]


def test_eos_advantage_zero_needs_eos_index_and_leaves_cut_rows_alone():
    adv = [[1.0, -2.0]]
    with pytest.raises(ValueError, match="eos_index"):
        run(ROW["logp"], ROW["old"], ROW["ranks"], adv, None, eos_advantage="zero", **NO_SHAPING)
    # the same row cut before <eos> (eos_index -1): nothing to zero, the paper's numbers
    cut = run(ROW["logp"], ROW["old"], ROW["ranks"], adv, [-1], eos_advantage="zero", **NO_SHAPING)
    assert cut[0] == approx(0.5)


def test_eos_in_overflow_keeps_the_overflow_penalty_under_eos_advantage_zero():
    # N = 1: [a, "\n", b, <eos>] lines [0, 0, 1, 1]: line 1 is overflow, <eos> sits in it. The
    # authors zero the EOS advantage BEFORE adding -0.1 to every overflow token, so <eos> ends
    # with -0.1 like its line. rank_mean, D = 1: loss = -(1*1 + 1*(-0.1)) = -0.9 either way.
    for eos_advantage in ("line", "zero"):
        loss, grad, _ = run(ROW["logp"], ROW["old"], ROW["ranks"], [[1.0]], ROW["eos_index"], overflow_penalty=-0.1,
                            early_stop_penalty=0.0, eos_advantage=eos_advantage)
        # grad line 0: -1 * (1/2) = -0.5; overflow line: -(-0.1) * (1/2) = +0.05
        assert loss == approx(-0.9) and grad == [[approx(g) for g in [-0.5, -0.5, 0.05, 0.05]]]


# ----------------------------------------------------------------------------- 2: exact_length_bonus

# N = 2, on-policy, all advantages 0 so that only the <eos> terms act:
#   row 0 [a, "\n", b, <eos>]     <eos> on line 1 = N-1: exactly N lines -> bonus
#   row 1 [a, <eos>]              <eos> on line 0 < N-1: premature        -> early-stop penalty
#   row 2 [a, "\n", b, c]         cut before <eos>                        -> nothing
#   row 3 [a, "\n", b, "\n", <eos>]  a trailing "\n": <eos> on line 2, overflow -> no bonus
LISTS = dict(ranks=[[0, 0, 1, 1, -1], [0, 0, -1, -1, -1], [0, 0, 1, 1, -1], [0, 0, 1, 1, 2]],
             eos_index=[3, 1, -1, 4])
LOGP = [[-0.5, -0.1, -1.5, -0.3, 0.0], [-0.9, -0.4, 0.0, 0.0, 0.0], [-0.5, -0.1, -1.2, -2.0, 0.0],
        [-0.5, -0.1, -1.5, -0.2, -0.6]]
ZERO_ADV = [[0.0, 0.0]] * 4
N_TOKENS = 4 + 2 + 4 + 5


def test_exact_length_bonus_on_its_own_eos_unit():
    # early_stop_unit="eos": <eos> alone is a unit, ratio 1, advantage +0.1 for row 0 only.
    #   rank_mean, D = B*N = 8: loss = -0.1/8 = -0.0125; grad at row 0's <eos>: -0.1/8
    #   token_mean, D = 15 tokens: loss = -0.1/15; grad -0.1/15 at the same place
    for aggregation, denom in (("rank_mean", 8), ("token_mean", N_TOKENS)):
        loss, grad, m = run(LOGP, LOGP, LISTS["ranks"], ZERO_ADV, LISTS["eos_index"], aggregation=aggregation,
                            exact_length_bonus=0.1, **NO_SHAPING)
        expected = [[0.0] * 5 for _ in range(4)]
        expected[0][3] = -0.1 / denom
        assert loss == approx(-0.1 / denom) and grad == [[approx(g) for g in row] for row in expected]
        assert m["units/exact_length"] == 1 and m["units/early_stop"] == 0
    # with the early-stop penalty too: row 1's <eos> unit gets -0.1, disjoint from row 0's +0.1:
    # loss = -(0.1 - 0.1)/8 = 0; grads -0.0125 (row 0 <eos>) and +0.0125 (row 1 <eos>)
    loss, grad, m = run(LOGP, LOGP, LISTS["ranks"], ZERO_ADV, LISTS["eos_index"], exact_length_bonus=0.1,
                        overflow_penalty=0.0, early_stop_penalty=-0.1)
    assert loss == approx(0.0) and grad[0][3] == approx(-0.0125) and grad[1][1] == approx(0.0125)
    assert m["units/exact_length"] == 1 and m["units/early_stop"] == 1


def test_exact_length_bonus_inside_the_last_line():
    # early_stop_unit="last_line": +0.1 joins <eos>'s advantage in line 1 of row 0 (tokens b, <eos>),
    # advantages [0, 0.1], one ratio w for both (dw/dlogp_t = 1/2).
    #   rank_mean: line term = mean = (0 + 0.1 w)/2 = 0.05 w: loss = -0.05/8 = -0.00625;
    #     grad b and <eos>: -(1/8) * 0.05 * (1/2)... as d(0.05 w) = 0.05 * (1/2) -> -0.003125 each
    #   token_mean: line term = sum = 0.1 w: loss = -0.1/15; grad b and <eos>: -(0.1 * 1/2)/15 each
    for aggregation, loss_expected, g in (("rank_mean", -0.00625, -0.003125),
                                          ("token_mean", -0.1 / N_TOKENS, -0.05 / N_TOKENS)):
        loss, grad, _ = run(LOGP, LOGP, LISTS["ranks"], ZERO_ADV, LISTS["eos_index"], aggregation=aggregation,
                            exact_length_bonus=0.1, early_stop_unit="last_line", **NO_SHAPING)
        expected = [[0.0] * 5 for _ in range(4)]
        expected[0][2] = expected[0][3] = g
        assert loss == approx(loss_expected) and grad == [[approx(x) for x in row] for row in expected]


# ----------------------------------------------------------------------------- 3: early_stop_unit

# One row, N = 2: [a, b, <eos>] all on line 0, <eos> at column 2: a premature stop (line 0 < 1).
# Off-policy log-ratios [0.02, 0.04, -0.03]; advantages 0, so only eps_u = -0.1 acts.
OLD3 = [[-1.0, -2.0, -0.5]]
LOGP3 = [[-1.0 + 0.02, -2.0 + 0.04, -0.5 - 0.03]]


@pytest.mark.parametrize("aggregation,denom", [("rank_mean", 2), ("token_mean", 3)])
def test_early_stop_unit(aggregation, denom):
    # "eos": the unit is <eos> alone, w = exp(-0.03) = 0.970446 (inside the clip range), A = -0.1:
    #   term = -0.1 w; loss = 0.1 w / D; only <eos> gets a gradient: 0.1 w / D
    w_eos = math.exp(-0.03)
    loss, grad, _ = run(LOGP3, OLD3, [[0, 0, 0]], [[0.0, 0.0]], [2], aggregation=aggregation,
                        overflow_penalty=0.0, early_stop_penalty=-0.1)
    assert loss == approx(0.1 * w_eos / denom)
    assert grad == [[approx(0.0), approx(0.0), approx(0.1 * w_eos / denom)]]
    # "last_line": -0.1 is added to <eos>'s advantage in line 0, whose ratio is the line's geometric
    # mean w = exp((0.02 + 0.04 - 0.03)/3) = exp(0.01); advantages [0, 0, -0.1].
    #   rank_mean: term = mean over the 3 tokens = -0.1 w / 3; loss = 0.1 w / (3 * 2);
    #     every token of the line: d/dlogp_t = (0.1 w / 3) * (1/3) / 2
    #   token_mean: term = sum = -0.1 w; loss = 0.1 w / 3; every token: 0.1 w * (1/3) / 3
    # The penalty's gradient spreads over the whole line instead of sitting on <eos>.
    w_line = math.exp(0.01)
    per_unit = 1 / 3 if aggregation == "rank_mean" else 1.0
    loss, grad, _ = run(LOGP3, OLD3, [[0, 0, 0]], [[0.0, 0.0]], [2], aggregation=aggregation,
                        overflow_penalty=0.0, early_stop_penalty=-0.1, early_stop_unit="last_line")
    assert loss == approx(0.1 * w_line * per_unit / denom)
    assert grad == [[approx(0.1 * w_line * per_unit / 3 / denom)] * 3]


# ----------------------------------------------------------------------------- 4: overflow_ratio

# One row, N = 1: [a, "\n", b, "\n", c, <eos>], lines [0, 0, 1, 1, 2, 2]: lines 1 and 2 overflow.
# Log-ratios: line 0 [0, 0]; line 1 [0.1, 0.1] (w = e^0.1 = 1.10517 > 1.08); line 2 [-0.1, -0.1]
# (w = e^-0.1 = 0.90484 < 0.94). eps_o = -0.1, advantage of rank 0 is 0.
OLD4 = [[-1.0, -0.1, -2.0, -0.2, -1.5, -0.4]]
LOGP4 = [[-1.0, -0.1, -2.0 + 0.1, -0.2 + 0.1, -1.5 - 0.1, -0.4 - 0.1]]


def test_overflow_ratio_shared():
    ranks = [[0, 0, 1, 1, 2, 2]]
    # "per_line", rank_mean, D = 1: A = -0.1 < 0, term = -0.1 * max(w, clip(w)):
    #   line 1: w = 1.10517 above the range, max = w (unclipped): -0.110517, grad 0.1 w / 2 per token
    #   line 2: w = 0.90484 below the range, max = 0.94 (clipped): -0.094, gradient exactly 0
    #   loss = 0.110517 + 0.094 = 0.204517
    w1 = math.exp(0.1)
    loss, grad, m = run(LOGP4, OLD4, ranks, [[0.0]], [5], overflow_penalty=-0.1, early_stop_penalty=0.0)
    assert loss == approx(0.1 * w1 + 0.1 * 0.94) and m["units/overflow"] == 2
    assert grad == [[approx(0.0), approx(0.0), approx(0.05 * w1), approx(0.05 * w1), 0.0, 0.0]]
    # "shared": the 4 overflow tokens are one unit, w = exp((0.1 + 0.1 - 0.1 - 0.1)/4) = 1 (in range):
    #   term = -0.1; loss = 0.1; each of the 4 tokens: 0.1 * (1/4) = 0.025 (line 2 is no longer clipped)
    loss, grad, m = run(LOGP4, OLD4, ranks, [[0.0]], [5], overflow_penalty=-0.1, early_stop_penalty=0.0,
                        overflow_ratio="shared")
    assert loss == approx(0.1) and m["units/overflow"] == 1
    assert grad == [[approx(0.0), approx(0.0)] + [approx(0.025)] * 4]
    # token_mean, D = 6 tokens: per_line = (2 * 0.1 w1 + 2 * 0.1 * 0.94)/6; shared = 4 * 0.1 / 6
    loss, _, _ = run(LOGP4, OLD4, ranks, [[0.0]], [5], overflow_penalty=-0.1, early_stop_penalty=0.0,
                     aggregation="token_mean")
    assert loss == approx((0.2 * w1 + 0.2 * 0.94) / 6)
    loss, grad, _ = run(LOGP4, OLD4, ranks, [[0.0]], [5], overflow_penalty=-0.1, early_stop_penalty=0.0,
                        aggregation="token_mean", overflow_ratio="shared")
    assert loss == approx(0.4 / 6) and grad == [[approx(0.0), approx(0.0)] + [approx(0.1 / 6)] * 4]


# ----------------------------------------------------------------------------- 5: micro_token_mean

# Two rows, N = 1, on-policy, one line each: row 0 has 2 tokens and A = +1, row 1 has 4 tokens
# and A = -1. One micro-batch per row.
RANKS5 = torch.tensor([[0, 0, -1, -1], [0, 0, 0, 0]])
LOGP5 = [[-0.3, -0.8, 0.0, 0.0], [-1.1, -0.2, -0.5, -0.9]]
ADV5 = [[1.0], [-1.0]]


def micro_losses(aggregation):
    """Summed losses and gradients of the two one-row micro-batches, each with its denominator."""
    mask = RANKS5 >= 0
    micro = [torch.tensor([0]), torch.tensor([1])]
    denoms = micro_batch_denominators(aggregation, mask, micro, 1)
    lp = torch.tensor(LOGP5, dtype=F64, requires_grad=True)
    total = 0.0
    for rows, denom in zip(micro, denoms):
        loss, _ = rank_grpo_loss(lp[rows], lp[rows].detach(), None, RANKS5[rows], mask[rows],
                                 torch.tensor(ADV5, dtype=F64)[rows], beta=0.0, aggregation=aggregation,
                                 denom=denom, **NO_SHAPING)
        loss.backward()
        total += loss.item()
    return denoms, total, lp.grad.tolist()


def test_micro_token_mean_averages_micro_batch_means():
    # token_mean (one global count, D = 6 for both micro-batches):
    #   loss = -(2*1 + 4*(-1))/6 = 1/3; grads row 0: -(1/6) * 2 * (1/2) = -1/6, row 1: +1/6
    denoms, loss, grad = micro_losses("token_mean")
    assert [int(d) for d in denoms] == [6, 6]
    assert loss == approx(1 / 3) and grad == [[approx(-1 / 6)] * 2 + [0.0] * 2, [approx(1 / 6)] * 4]
    # micro_token_mean (M = 2): micro-batch j is divided by n_tokens_j * M = 2*2 and 4*2:
    #   loss = -(2*1)/4 - (4*(-1))/8 = -0.5 + 0.5 = 0, the mean of the two micro means (-1 and +1);
    #   grads row 0: -(1/4) * 2 * (1/2) = -0.25; row 1: -(1/8) * 4 * (-1) * (1/4) = +0.125
    denoms, loss, grad = micro_losses("micro_token_mean")
    assert [int(d) for d in denoms] == [4, 8]
    assert loss == approx(0.0) and grad == [[approx(-0.25)] * 2 + [0.0] * 2, [approx(0.125)] * 4]


def test_micro_token_mean_of_one_batch_is_token_mean():
    # denom=None: this batch is the only micro-batch (M = 1), so micro_token_mean = token_mean
    args = (LOGP5, LOGP5, RANKS5.tolist(), ADV5)
    assert run(*args, aggregation="micro_token_mean", **NO_SHAPING)[:2] == run(*args, aggregation="token_mean",
                                                                             **NO_SHAPING)[:2]
    assert loss_denominator("micro_token_mean", RANKS5 >= 0, 1, n_micro_batches=3) == 3 * 6


# ----------------------------------------------------------------------------- 7: the baselines' aggregation

@pytest.mark.parametrize("fn", [grpo_loss, gspo_loss])
def test_baseline_aggregation(fn):
    # Two lists, on-policy: row 0 has 2 tokens and A = 1, row 1 has 4 tokens and A = 0.5.
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    adv = torch.tensor([1.0, 0.5], dtype=F64)

    def loss_and_grad(rows_of_micro, aggregation):
        lp = torch.tensor(LOGP5, dtype=F64, requires_grad=True)
        micro = [torch.tensor(r) for r in rows_of_micro]
        denoms = micro_batch_denominators(aggregation, mask, micro, 1)
        total = 0.0
        for rows, denom in zip(micro, denoms):
            loss, _ = fn(lp[rows], lp[rows].detach(), None, mask[rows], adv[rows], beta=0.0, denom=denom,
                         aggregation=aggregation)
            loss.backward()
            total += loss.item()
        return total, lp.grad.tolist()

    # sequence_mean (the paper's per-list mean, TRL "grpo"): loss = -(1 + 0.5)/2 = -0.75;
    #   grads row 0: -(1/2) * 1 * (1/2) = -0.25, row 1: -(1/2) * 0.5 * (1/4) = -0.0625
    loss, grad = loss_and_grad([[0, 1]], "sequence_mean")
    assert loss == approx(-0.75) and grad == [[approx(-0.25)] * 2 + [0.0] * 2, [approx(-0.0625)] * 4]
    # token_mean (TRL 0.21 "bnpo" on one micro-batch): loss = -(2*1 + 4*0.5)/6 = -2/3;
    #   grads row 0: -1/6 each, row 1: -0.5/6 each (each list weighs by its length)
    loss, grad = loss_and_grad([[0, 1]], "micro_token_mean")
    assert loss == approx(-2 / 3) and grad == [[approx(-1 / 6)] * 2 + [0.0] * 2, [approx(-0.5 / 6)] * 4]
    # micro_token_mean with one list per micro-batch: -(2*1)/(2*2) - (4*0.5)/(4*2) = -0.75, the per-list
    # mean again: bnpo's length weighting acts only inside a micro-batch
    loss, grad = loss_and_grad([[0], [1]], "micro_token_mean")
    assert loss == approx(-0.75) and grad == [[approx(-0.25)] * 2 + [0.0] * 2, [approx(-0.0625)] * 4]
    with pytest.raises(ValueError, match="aggregation"):
        fn(torch.zeros(1, 2), torch.zeros(1, 2), None, torch.ones(1, 2), torch.zeros(1), beta=0.0,
           aggregation="rank_mean")


# ----------------------------------------------------------------------------- 6: the reward's matching

CATALOG = Catalog([CatalogItem(t, y) for t, y in
                   [("Heat", 1995), ("Alien", 1979), ("Fargo", 1996), ("The Thing", 1982)]])
GT = [("Heat", 1995), ("Alien", 1980), ("Fargo", 1996), ("The Thing", 1982)]
SEEN = ["the thing"]
COMPLETION = "\n".join([
    "Heat (1995)",       # line 0: a hit under both rules
    "",                  # line 1: blank: its own rank in place, dropped from the authors' parsed list
    "alien (1979)",      # line 2: in place a hit (case-folded, year within 2 of 1980); authors: not the
                         #         exact catalog row ("Alien", 1979), so 0
    "Fargo",             # line 3: no year: 0 in place; dropped from the parsed list
    "Alien (1979)",      # line 4: in place 0 (Alien consumed by line 2); authors: exact row, 1979 within 2
                         #         of the ground truth's 1980: a hit
    "Fargo (1996)",      # line 5: a hit under both
    "The Thing (1982)",  # line 6: in place the seen filter case-folds ("the thing"): 0; authors compare
                         #         the raw string, "The Thing" is not "the thing": a hit
])


def test_reward_matching_in_place_and_parsed_list():
    items = parse_recommendations(COMPLETION)
    # in place: line k is rank k
    assert rank_relevance(items, GT, SEEN, CATALOG, n_items=7).tolist() == [1, 0, 1, 0, 0, 1, 0]
    # the authors: position k is the k-th parsed item: Heat, alien, Alien, Fargo, The Thing
    assert authors_parsed_items(items) == [("Heat", 1995), ("alien", 1979), ("Alien", 1979), ("Fargo", 1996),
                                           ("The Thing", 1982)]
    rel = rank_relevance(items, GT, SEEN, CATALOG, n_items=7, matching="parsed_list")
    assert rel.tolist() == [1, 0, 1, 1, 1, 0, 0]
    # The rank shift: the loss hands advantage k to LINE k, so the Fargo hit (parsed item 3, line 5)
    # rewards line 3 ("Fargo", no year), and the Alien hit (item 2, line 4) rewards line 2.
    assert rank_relevance(items, GT, SEEN, CATALOG, n_items=3, matching="parsed_list").tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="matching"):
        rank_relevance(items, GT, SEEN, CATALOG, matching="exact")


def test_parsed_list_folds_case_and_spaces_against_the_ground_truth():
    # The catalog gate is exact, the ground-truth comparison is not: "Heat (1995)" is the catalog row,
    # and matches the ground truth written "HEAT" (casefold) 1996 (within 2 years); "The Thing (1982)"
    # matches "the  thing" (spaces collapsed, casefold). Both rules give [1, 1] here.
    items = parse_recommendations("Heat (1995)\nThe Thing (1982)")
    gt = [("HEAT", 1996), ("the  thing", 1982)]
    assert rank_relevance(items, gt, [], CATALOG, n_items=2, matching="parsed_list").tolist() == [1, 1]
    assert rank_relevance(items, gt, [], CATALOG, n_items=2).tolist() == [1, 1]


def test_parsed_list_keeps_an_implausible_four_digit_year_in_its_place():
    # "(0999)" parses in process_rec_raw (a four-digit year), so the line takes a slot and scores 0 at
    # the catalog filter; Heat after it is parsed item 1. "(99)" does not parse and is dropped.
    items = parse_recommendations("Old (0999)\nNew (99)\nHeat (1995)")
    assert rank_relevance(items, GT, [], CATALOG, n_items=3, matching="parsed_list").tolist() == [0, 1, 0]
    assert rank_relevance(items, GT, [], CATALOG, n_items=3).tolist() == [0, 0, 1]


def rollout_of(completions, prompts, group_size):
    lengths = torch.tensor([len(c) for c in completions])
    width = int(lengths.max())
    ids = torch.tensor([c + [EOS] * (width - len(c)) for c in completions])
    ended = torch.tensor([c[-1] == EOS for c in completions])
    return Rollout(prompts=prompts, prompt_index=torch.arange(len(prompts)).repeat_interleave(group_size),
                   completion_ids=ids, completion_mask=torch.arange(width) < lengths[:, None],
                   logprobs=torch.zeros(ids.shape), lengths=lengths, ended_with_eos=ended,
                   stopped_at_items=torch.zeros(len(ids), dtype=torch.bool), truncated=~ended,
                   group_size=group_size, temperature=1.0, top_p=1.0, greedy=False, pad_token_id=EOS)


def test_the_objective_reaches_the_reward(tokenizer, world):  # noqa: F811
    # Prompt 0 wants Heat. Row 0 writes a blank line, then Heat: "\nHeat (1995)". In place Heat is
    # line 1 (rel [0, 1]); in the authors' parsed list it is item 0 (rel [1, 0]), and with it its
    # advantage moves onto line 0, the blank line's "\n" token.
    catalog, examples = world
    rollout = rollout_of([[NL, HEAT, EOS], [HEAT, EOS], [EOS]], [[1, 2]], 3)
    for objective, rel0 in (("paper", [0, 1]), ("authors", [1, 0])):
        cfg = TrainRankGRPOConfig(algo="rank_grpo", group_size=3, n_items=2, year_tolerance=0, device="cpu",
                                  micro_batch_size=4, objective=objective)
        batch = prepare_batch(rollout, examples, tokenizer, catalog, cfg)
        assert batch.scored["rel"][0].tolist() == rel0
        assert batch.scored["rel"][1].tolist() == [1, 0]   # "Heat (1995)" alone: the same either way


# ----------------------------------------------------------------------------- all seven at once

def test_authors_loss_by_hand():
    # N = 2, on-policy (every w = 1), one micro-batch; eps_o = eps_u = -0.1, bonus 0.1.
    #   row 0 [a, "\n", b, <eos>]            lines [0, 0, 1, 1]: exactly N lines; A = [0.5, -1]
    #   row 1 [c, "\n", d, "\n", e, <eos>]   lines [0, 0, 1, 1, 2, 2]: line 2 overflow; A = [-0.5, 1]
    # The authors' per-token advantages:
    #   row 0: 0.5, 0.5, -1, (0 + 0.1) on <eos>
    #   row 1: -0.5, -0.5, 1, 1, and -0.1 on both overflow tokens (<eos> zeroed, then -0.1)
    # token loss = -(sum of a_t)/D, D = 10 tokens: sum = (0.5 + 0.5 - 1 + 0.1) + (-0.5 - 0.5 + 1 + 1 - 0.2)
    #   = 0.1 + 0.8 = 0.9 -> loss = -0.09.
    # grad of token t = -(1/D) * (sum of its unit's a) / |unit|:
    #   row 0 line 0: -(0.5 + 0.5)/2/10 = -0.05; line 1: -(-1 + 0.1)/2/10 = +0.045
    #   row 1 line 0: +0.05; line 1: -0.1; overflow bin: -(-0.2)/2/10 = +0.01
    # The paper's objective on the same rows (rank_mean, D = 4): <eos> keeps its line's A, no bonus,
    # overflow line 2 is a unit with -0.1: loss = -((0.5 - 1) + (-0.5 + 1 - 0.1))/4 = 0.025.
    ranks = [[0, 0, 1, 1, -1, -1], [0, 0, 1, 1, 2, 2]]
    logp = [[-0.1, -0.2, -0.3, -0.4, 0.0, 0.0], [-0.5, -0.6, -0.7, -0.8, -0.9, -1.0]]
    adv = [[0.5, -1.0], [-0.5, 1.0]]
    shaping = dict(overflow_penalty=-0.1, early_stop_penalty=-0.1)
    loss, grad, _ = run(logp, logp, ranks, adv, [3, 5], aggregation="micro_token_mean", **AUTHORS_LOSS, **shaping)
    assert loss == approx(-0.09)
    assert grad == [[approx(g) for g in row] for row in
                    [[-0.05, -0.05, 0.045, 0.045, 0.0, 0.0], [0.05, 0.05, -0.1, -0.1, 0.01, 0.01]]]
    assert run(logp, logp, ranks, adv, [3, 5], **shaping)[0] == approx(0.025)


def authors_rule_loss(b, n_ranks, *, eps_low=0.06, eps_high=0.08, beta, eps_o=-0.1, eps_u=-0.1, bonus=0.1):
    """The authors' per-token rule written out token by token (docs/algorithm.md): a token's unit is
    its line, or one bin for every line >= N; the unit's ratio is the geometric mean over its
    tokens; the token's advantage is its line's A (0 past N-1), 0 on <eos>, then +eps_o on every
    overflow token, +eps_u on a premature <eos>, +bonus on an <eos> on line N-1; the loss is
    (sum over tokens of -min(w a, clip(w) a) + beta * k3) / number of tokens."""
    logp, old, ref = b["logp"], b["old_logp"], b["ref_logp"]
    terms, n_tokens = [], 0
    for row in range(logp.shape[0]):
        toks = [t for t in range(logp.shape[1]) if b["mask"][row, t]]
        unit = {t: min(int(b["rank_ids"][row, t]), n_ranks) for t in toks}
        log_w = {u: torch.stack([logp[row, t] - old[row, t] for t in toks if unit[t] == u]).mean()
                 for u in set(unit.values())}
        eos = int(b["eos_index"][row])
        for t in toks:
            u = unit[t]
            a = float(b["advantages"][row, u]) if u < n_ranks else 0.0
            if t == eos:
                a = 0.0
                a += eps_u if u < n_ranks - 1 else bonus if u == n_ranks - 1 else 0.0
            if u >= n_ranks:
                a += eps_o
            w = torch.exp(log_w[u])
            surrogate = torch.minimum(w * a, w.clamp(1 - eps_low, 1 + eps_high) * a)
            r = ref[row, t] - logp[row, t]
            terms.append(-surrogate + beta * (torch.exp(r) - r - 1))
            n_tokens += 1
    return torch.stack(terms).sum() / max(n_tokens, 1)


@pytest.mark.parametrize("seed", range(12))
def test_authors_options_equal_the_per_token_rule(seed):
    """Random rows (blank lines, overflow, cut rows, off-policy ratios that clip, KL): with all the
    authors' options the loss and its gradient equal the rule written out token by token."""
    b = random_batch(seed, 5, 10, 3, log_ratio_scale=0.15)
    beta = random.Random(seed).choice([0.0, 0.05])
    lp = b["logp"].clone().requires_grad_(True)
    loss, _ = rank_grpo_loss(lp, b["old_logp"], b["ref_logp"], b["rank_ids"], b["mask"], b["advantages"],
                             beta=beta, aggregation="micro_token_mean", eos_index=b["eos_index"], **AUTHORS_LOSS)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = b["logp"].clone().requires_grad_(True)
    expected = authors_rule_loss({**b, "logp": lp2}, 3, beta=beta)
    (expected_grad,) = torch.autograd.grad(expected, lp2)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    assert torch.allclose(grad, expected_grad, atol=1e-12)


# ----------------------------------------------------------------------------- --objective paper changes nothing

# random_batch(11, 6, 14, 3, log_ratio_scale=0.2) holds overflow lines, premature stops, cut rows and
# clipped ratios. Loss and sum(grad * (1, 2, ..., 84)) of each loss, computed with the code as it
# was before the options existed (defaults, beta = 1e-3):
BEFORE = {"rank_mean": (0.13635777477297792, 5.652527578965174),
          "token_mean": (0.12053629006852185, 4.371374411688214),
          "grpo_loss": (0.026909424179080377, -0.283755685610249),
          "gspo_loss": (0.03790665175014307, -0.5998284886661591)}
PAPER_LOSS = dict(eos_advantage="line", exact_length_bonus=0.0, early_stop_unit="eos", overflow_ratio="per_line")


def loss_and_checksum(fn, b, *args, **kw):
    lp = b["logp"].clone().requires_grad_(True)
    loss, metrics = fn(lp, b["old_logp"], b["ref_logp"], *args, **kw)
    loss.backward()
    weights = torch.arange(1, lp.numel() + 1, dtype=F64).view_as(lp)
    return loss.detach(), lp.grad, (lp.grad * weights).sum().item(), metrics


@pytest.mark.parametrize("aggregation", ["rank_mean", "token_mean"])
def test_paper_objective_is_the_code_before_the_options(aggregation):
    b = random_batch(11, 6, 14, 3, log_ratio_scale=0.2)
    args = (b["rank_ids"], b["mask"], b["advantages"])
    default = loss_and_checksum(rank_grpo_loss, b, *args, beta=1e-3, aggregation=aggregation,
                                eos_index=b["eos_index"])
    explicit = loss_and_checksum(rank_grpo_loss, b, *args, beta=1e-3, aggregation=aggregation,
                                 eos_index=b["eos_index"], **PAPER_LOSS)
    cfg = SimpleNamespace(algo="rank_grpo", eps_low=0.06, eps_high=0.08, beta=1e-3, overflow_penalty=-0.1,
                          early_stop_penalty=-0.1, objective="paper", aggregation=aggregation)
    through_rl = loss_and_checksum(lambda lp, old, ref: policy_loss(cfg, lp, old, ref, *args, b["eos_index"], None),
                                   b)
    for other in (explicit, through_rl):
        assert torch.equal(other[0], default[0]) and torch.equal(other[1], default[1]) and other[3] == default[3]
    loss, checksum = BEFORE[aggregation]
    assert default[0].item() == pytest.approx(loss, rel=1e-13) and default[2] == pytest.approx(checksum, rel=1e-12)
    assert default[3]["units/overflow"] == 12 and default[3]["units/early_stop"] == 3


@pytest.mark.parametrize("fn", [grpo_loss, gspo_loss])
def test_paper_baselines_are_the_code_before_the_options(fn):
    b = random_batch(11, 6, 14, 3, log_ratio_scale=0.2)
    args = (b["mask"], b["advantages"][:, 0])
    default = loss_and_checksum(fn, b, *args, beta=1e-3)
    explicit = loss_and_checksum(fn, b, *args, beta=1e-3, aggregation="sequence_mean")
    assert torch.equal(explicit[0], default[0]) and torch.equal(explicit[1], default[1])
    loss, checksum = BEFORE[fn.__name__]
    assert default[0].item() == pytest.approx(loss, rel=1e-13) and default[2] == pytest.approx(checksum, rel=1e-12)


def test_authors_objective_through_rl_is_the_authors_options():
    b = random_batch(5, 4, 10, 3, log_ratio_scale=0.2)
    args = (b["rank_ids"], b["mask"], b["advantages"])
    cfg = SimpleNamespace(algo="rank_grpo", eps_low=0.06, eps_high=0.08, beta=1e-3, overflow_penalty=-0.1,
                          early_stop_penalty=-0.1, objective="authors")
    through_rl = loss_and_checksum(lambda lp, old, ref: policy_loss(cfg, lp, old, ref, *args, b["eos_index"], None),
                                   b)
    direct = loss_and_checksum(rank_grpo_loss, b, *args, beta=1e-3, eos_index=b["eos_index"],
                               aggregation="micro_token_mean", **AUTHORS_LOSS)
    paper = loss_and_checksum(rank_grpo_loss, b, *args, beta=1e-3, eos_index=b["eos_index"])
    assert torch.equal(through_rl[0], direct[0]) and torch.equal(through_rl[1], direct[1])
    assert not torch.equal(through_rl[1], paper[1])


# ----------------------------------------------------------------------------- the flags

def parse(*argv):
    return parse_config(TrainRankGRPOConfig, list(argv))


SETTINGS = list(OBJECTIVES["paper"])


def test_objective_paper_is_the_default_and_authors_sets_all_seven():
    assert len(SETTINGS) == 7
    paper, authors = parse(), parse("--objective", "authors")
    assert {k: getattr(paper, k) for k in SETTINGS} == OBJECTIVES["paper"]
    assert {k: getattr(authors, k) for k in SETTINGS} == OBJECTIVES["authors"]
    assert all(OBJECTIVES["paper"][k] != OBJECTIVES["authors"][k] for k in SETTINGS)  # each one differs
    assert OBJECTIVES["authors"]["exact_length_bonus"] == 0.1 and OBJECTIVES["paper"]["exact_length_bonus"] == 0.0


@pytest.mark.parametrize("flag,value,field,expected", [
    ("--aggregation", "rank_mean", "aggregation", "rank_mean"),
    ("--baseline-aggregation", "sequence_mean", "baseline_aggregation", "sequence_mean"),
    ("--eos-advantage", "line", "eos_advantage", "line"),
    ("--exact-length-bonus", "0", "exact_length_bonus", 0.0),
    ("--early-stop-unit", "eos", "early_stop_unit", "eos"),
    ("--overflow-ratio", "per_line", "overflow_ratio", "per_line"),
    ("--reward-matching", "in_place", "reward_matching", "in_place"),
])
def test_an_explicit_flag_wins_over_the_objective(flag, value, field, expected):
    cfg = parse("--objective", "authors", flag, value)
    assert getattr(cfg, field) == expected
    assert all(getattr(cfg, k) == OBJECTIVES["authors"][k] for k in SETTINGS if k != field)
    # and one authors' rule switched alone on top of the paper's
    alone = parse(flag, str(OBJECTIVES["authors"][field]))
    assert getattr(alone, field) == OBJECTIVES["authors"][field]
    assert all(getattr(alone, k) == OBJECTIVES["paper"][k] for k in SETTINGS if k != field)


def test_the_resolved_settings_are_written_to_config_json(tmp_path):
    cfg = parse("--objective", "authors", "--exact-length-bonus", "0.2")
    data = json.loads(save_config(cfg, tmp_path).read_text())
    assert data["objective"] == "authors" and data["exact_length_bonus"] == 0.2
    assert all(data[k] == OBJECTIVES["authors"][k] for k in SETTINGS if k != "exact_length_bonus")


def test_bad_settings_are_refused():
    with pytest.raises(SystemExit, match="--exact-length-bonus must be >= 0"):
        parse("--exact-length-bonus", "-0.1")
    with pytest.raises(SystemExit, match="--overflow-ratio"):
        parse("--overflow-ratio", "pooled")
    ranks = [[0, 0, 1, 1]]
    for name, value in (("eos_advantage", "none"), ("early_stop_unit", "line"), ("overflow_ratio", "one")):
        with pytest.raises(ValueError, match=name):
            run(ROW["logp"], ROW["old"], ranks, [[1.0, -2.0]], ROW["eos_index"], **{name: value})
