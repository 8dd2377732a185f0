"""One RL step's glue (``rankgrpo.rl``) on a hand-built rollout, without a subprocess.

The loss functions have their own tests (test_losses.py); these check what connects them:
which prompt's ground truth scores which row, over which rows advantages are normalised, where
the <eos> index comes from, which temperature the log-probs use, which log-probs the second
pass of mu = 2 compares against, and that the resulting update goes the right way.

The world: a six-word tokenizer whose tokens are whole lines ("Heat (1995)") or "\\n", and a
tiny random Qwen2 over the same ids. Every expected number below is derived by hand from the
rollout as written, not from the code under test.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rankgrpo.catalog import Catalog, CatalogItem
from rankgrpo.data import Example
from rankgrpo.losses import rank_grpo_loss
from rankgrpo.models import tiny_model
from rankgrpo.rl import advantages_for, prepare_batch, update_pass
from rankgrpo.sampling import Rollout, sample
from rankgrpo.scripts import load_script


def _script_config():
    """The script's own config dataclass (loaded from its file, whatever sys.path holds)."""
    return load_script(Path(__file__).resolve().parents[2] / "train_rankgrpo.py").TrainRankGRPOConfig


TrainRankGRPOConfig = _script_config()

WORDS = ["<eos>", "hi", "yo", "Heat (1995)", "Alien (1979)", "Fargo (1996)", "Brazil (1985)", "\n"]
EOS, HI, YO, HEAT, ALIEN, FARGO, BRAZIL, NL = range(len(WORDS))
N, G = 2, 3            # list length, samples per prompt
TEMPERATURE = 0.7

# Prompt 0 wants Heat, prompt 1 wants Fargo. Rows are prompt-major: rows 0-2 are prompt 0's.
PROMPTS = [[HI, YO], [YO, HI, YO]]
COMPLETIONS = [
    [HEAT, NL, ALIEN, EOS],      # row 0: Heat hit at rank 0                 rel [1, 0]
    [ALIEN, NL, HEAT, EOS],      # row 1: Heat hit at rank 1                 rel [0, 1]
    [BRAZIL],                    # row 2: cut after one token (no <eos>)      rel [0, 0]
    [FARGO, NL, BRAZIL, EOS],    # row 3: Fargo hit at rank 0                rel [1, 0]
    [BRAZIL, EOS],               # row 4: <eos> on line 0 < N-1: premature    rel [0, 0]
    [HEAT, NL, FARGO, EOS],      # row 5: Fargo hit at rank 1 (Heat is not prompt 1's)  rel [0, 1]
]
REL = [[1, 0], [0, 1], [0, 0], [1, 0], [0, 0], [0, 1]]
# Token -> rank, by hand: a line's closing "\n" is its own rank's, <eos> sits in the last line.
RANKS = [[0, 0, 1, 1], [0, 0, 1, 1], [0], [0, 0, 1, 1], [0, 0], [0, 0, 1, 1]]
EOS_INDEX = [3, 3, -1, 3, 1, 3]
PREMATURE_ROW, PREMATURE_COL = 4, 1

# Advantages by hand (exp_inf: returns = rel). Both prompts have, at each rank, one 1 and two 0s
# among their G = 3 samples: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3),
# so a 1 gets (2/3) / (sqrt(1/3) + 1e-4) and a 0 gets -(1/3) / (sqrt(1/3) + 1e-4).
# (Normalising over all six rows instead would give mean 1/3, std sqrt(4/15), other values.)
UP, DOWN = (2 / 3) / (math.sqrt(1 / 3) + 1e-4), -(1 / 3) / (math.sqrt(1 / 3) + 1e-4)
ADV = [[UP, DOWN], [DOWN, UP], [DOWN, DOWN], [UP, DOWN], [DOWN, DOWN], [DOWN, UP]]
D = len(COMPLETIONS) * N   # the rank_mean denominator: B * N units


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    backend = Tokenizer(tok_models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.Fuse()  # tokens are joined as they are: "Heat (1995)" "\n" -> "Heat (1995)\n"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def world():
    catalog = Catalog([CatalogItem(t, y) for t, y in
                       [("Heat", 1995), ("Alien", 1979), ("Fargo", 1996), ("Brazil", 1985)]])
    examples = [Example(id="p0", messages=[{"role": "user", "content": "hi yo"}], seen_titles=[],
                        groundtruth=[("Heat", 1995)]),
                Example(id="p1", messages=[{"role": "user", "content": "yo hi yo"}], seen_titles=[],
                        groundtruth=[("Fargo", 1996)])]
    return catalog, examples


def make_model(dtype=torch.float32):
    return tiny_model("qwen2", vocab_size=len(WORDS), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, initializer_range=0.2, seed=0, dtype=dtype)


def config(**overrides) -> TrainRankGRPOConfig:
    values = dict(algo="rank_grpo", reward="exp_inf", group_size=G, n_items=N, year_tolerance=0, device="cpu",
                  micro_batch_size=4, temperature=TEMPERATURE, eps_low=0.06, eps_high=0.08, beta=0.0,
                  aggregation="rank_mean", overflow_penalty=-0.1, early_stop_penalty=-0.1,
                  max_grad_norm=1e9)
    values.update(overrides)
    return TrainRankGRPOConfig(**values)


def hand_rollout() -> Rollout:
    """The six completions above as a Rollout (log-probs are not used by the step)."""
    lengths = torch.tensor([len(c) for c in COMPLETIONS])
    width = int(lengths.max())
    ids = torch.tensor([c + [EOS] * (width - len(c)) for c in COMPLETIONS])
    mask = torch.arange(width) < lengths[:, None]
    ended = torch.tensor([c[-1] == EOS for c in COMPLETIONS])
    return Rollout(prompts=PROMPTS, prompt_index=torch.arange(2).repeat_interleave(G), completion_ids=ids,
                   completion_mask=mask, logprobs=torch.zeros(ids.shape), lengths=lengths, ended_with_eos=ended,
                   stopped_at_items=torch.zeros(len(ids), dtype=torch.bool), truncated=~ended, group_size=G,
                   temperature=TEMPERATURE, top_p=1.0, greedy=False, pad_token_id=EOS)


def reference_logp(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token] of every completion token, one row at a time and without padding
    (an independent path: no left padding, no position ids, no custom autograd function). [B, T]."""
    rows = []
    for b in range(rollout.num_rows):
        prompt = rollout.prompts[int(rollout.prompt_index[b])]
        n = int(rollout.lengths[b])
        completion = rollout.completion_ids[b, :n]
        ids = torch.tensor(prompt + completion.tolist())[None]
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        logp = (logits / temperature).log_softmax(-1).gather(-1, completion[:, None]).squeeze(-1)
        rows.append(torch.cat([logp, logp.new_zeros(rollout.completion_ids.shape[1] - n)]))
    return torch.stack(rows)


def advantage_weighted_loglik(model, rollout, temperature) -> torch.Tensor:
    """S = sum over rows and ranks of ADV[row][k] * mean log-prob of rank k's tokens (RANKS by hand).

    At the first pass every ratio is 1, inside the clip range, so (beta = 0, no length shaping) the
    loss's gradient is -grad(S) / D (Eq. 7 with w = 1)."""
    logp = reference_logp(model, rollout, temperature)
    total = logp.new_zeros(())
    for b, ranks in enumerate(RANKS):
        for k in range(N):
            cols = [t for t, r in enumerate(ranks) if r == k]
            if cols:
                total = total + ADV[b][k] * logp[b, cols].mean()
    return total


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- scoring and advantages


def test_rows_score_their_own_prompt_and_advantages_are_per_prompt(tokenizer, world):
    catalog, examples = world
    batch = prepare_batch(hand_rollout(), examples, tokenizer, catalog, config())
    assert batch.scored["rel"].tolist() == REL
    assert torch.allclose(batch.rewards, torch.tensor(REL, dtype=torch.float32))
    assert torch.allclose(batch.adv, torch.tensor(ADV), atol=1e-6), batch.adv
    assert batch.eos_index.tolist() == EOS_INDEX
    assert batch.denom == D
    mask = batch.mask.bool()
    assert [batch.rank_ids[b][mask[b]].tolist() for b in range(len(RANKS))] == RANKS


def test_advantages_for_normalises_within_each_prompt():
    rel = torch.tensor(REL, dtype=torch.float32)
    _, adv = advantages_for(rel, config(), G)
    assert torch.allclose(adv, torch.tensor(ADV), atol=1e-6)
    # GRPO: one DCG@N per list, normalised over the G lists of its prompt.
    # DCG@2 of the rows: (1, 1/log2(3), 0) for prompt 0 and (1, 0, 1/log2(3)) for prompt 1.
    _, adv = advantages_for(rel, config(algo="grpo"), G)
    dcg = [1.0, 1 / math.log2(3), 0.0]
    mean = sum(dcg) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in dcg) / 2)
    expected = [(x - mean) / (std + 1e-4) for x in dcg]
    expected += [expected[0], expected[2], expected[1]]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)


# ----------------------------------------------------------------------------- the early-stop penalty


def test_premature_eos_penalty_reaches_the_loss_and_its_gradient(tokenizer, world):
    """Row 4 ends with <eos> on line 0 of N = 2: a stop unit, ratio 1, advantage eps_u = -0.1.
    Its loss term is -(1 * -0.1) / D, and its gradient is +0.1 / D times grad log pi(<eos>) at T.
    Row 2 (cut, no <eos>) must not get one."""
    catalog, examples = world
    model = make_model()
    runs = {}
    for penalty in (0.0, -0.1):
        cfg = config(early_stop_penalty=penalty)
        batch = prepare_batch(hand_rollout(), examples, tokenizer, catalog, cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        metrics = update_pass(model, optimizer, batch, cfg)
        runs[penalty] = metrics, grads(model)
    (plain, g_plain), (shaped, g_shaped) = runs[0.0], runs[-0.1]
    assert shaped["units/early_stop"] * 2 == 1  # averaged over the 2 micro-batches: 1 stop unit in all
    assert shaped["loss"] - plain["loss"] == pytest.approx(0.1 / D, abs=1e-7)

    model.zero_grad()
    reference_logp(model, hand_rollout(), TEMPERATURE)[PREMATURE_ROW, PREMATURE_COL].backward()
    for gs, gp, ge in zip(g_shaped, g_plain, grads(model)):
        assert torch.allclose(gs - gp, (0.1 / D) * ge, atol=1e-7, rtol=1e-4)


# ----------------------------------------------------------------------------- temperature


def test_first_pass_at_temperature_has_ratios_of_one_and_zero_kl(tokenizer, world):
    """A rollout sampled at T = 0.7: the sampler's recorded log-probs, the reference's and the
    behaviour log-probs the update stores are all log softmax(logits / 0.7) -- so the first pass's
    ratios are 1 and the KL to an identical reference is 0. Any of them at T = 1 breaks this."""
    catalog, examples = world
    model = make_model()
    cfg = config(beta=1e-3)
    rollout = sample(model, PROMPTS, group_size=G, max_new_tokens=6, temperature=TEMPERATURE,
                     eos_token_ids=EOS, pad_token_id=EOS, generator=torch.Generator().manual_seed(0))
    mask = rollout.completion_mask
    with torch.no_grad():
        at_t = reference_logp(model, rollout, TEMPERATURE)
        at_one = reference_logp(model, rollout, 1.0)
    assert torch.allclose(rollout.logprobs[mask], at_t[mask], atol=1e-5)
    assert (rollout.logprobs[mask] - at_one[mask]).abs().max() > 1e-2  # the check can tell T from 1

    batch = prepare_batch(rollout, examples, tokenizer, catalog, cfg, reference=copy.deepcopy(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = update_pass(model, optimizer, batch, cfg)
    for j, rows in enumerate(batch.micro):
        m = mask[rows]
        assert torch.allclose(batch.ref_logp[j][m], at_t[rows][m], atol=1e-5)
        assert torch.allclose(batch.old_logp[j][m], at_t[rows][m], atol=1e-5)
    assert metrics["ratio/min"] == metrics["ratio/max"] == 1.0
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- mu = 2


def test_second_pass_compares_against_the_first_pass_logprobs(tokenizer, world):
    """mu = 2: pass 1 stores the behaviour log-probs and steps; pass 2 reuses them, so its ratios
    differ from 1 and its loss is rank_grpo_loss(log-probs after step 1, log-probs before it)."""
    catalog, examples = world
    model = make_model()
    cfg = config()
    batch = prepare_batch(hand_rollout(), examples, tokenizer, catalog, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        before = reference_logp(model, hand_rollout(), TEMPERATURE)
    first = update_pass(model, optimizer, batch, cfg)
    assert first["ratio/min"] == first["ratio/max"] == 1.0
    stored = [x.clone() for x in batch.old_logp]
    mask = batch.mask.bool()
    for j, rows in enumerate(batch.micro):
        assert torch.allclose(stored[j][mask[rows]], before[rows][mask[rows]], atol=1e-5)
    with torch.no_grad():
        between = reference_logp(model, hand_rollout(), TEMPERATURE)  # the weights pass 2 sees

    second = update_pass(model, optimizer, batch, cfg)
    assert all(torch.equal(a, b) for a, b in zip(stored, batch.old_logp))  # kept, not recomputed
    assert second["ratio/max"] > 1.0 + 1e-4 and second["ratio/min"] < 1.0 - 1e-4
    rank_ids = torch.full_like(batch.rank_ids, -1)
    for b, ranks in enumerate(RANKS):
        rank_ids[b, :len(ranks)] = torch.tensor(ranks)
    expected, _ = rank_grpo_loss(between, before, None, rank_ids, mask, torch.tensor(ADV), beta=0.0,
                                 eps_low=0.06, eps_high=0.08, overflow_penalty=-0.1, early_stop_penalty=-0.1,
                                 eos_index=torch.tensor(EOS_INDEX))
    assert second["loss"] == pytest.approx(expected.item(), abs=1e-6)


# ----------------------------------------------------------------------------- direction


def test_update_is_gradient_ascent_on_the_advantage_weighted_loglik(tokenizer, world):
    """Prompts with different ground truths, one exact SGD step, threshold derived.

    With ratios 1 (first pass), beta = 0 and no length shaping, Eq. 7 says the loss gradient is
    g_L = -grad(S) / D, S = sum_{rows, ranks} A_k * mean_{t in rank k} log pi(y_t) (computed here
    from the model's logits and the ranks by hand). An SGD step theta' = theta - eta g_L then changes S by

        S(theta') - S(theta) = eta/D |grad S|^2 + (1/2) (eta/D)^2 grad(S)^T H grad(S) + O(eta^3),

    so rewarded ranks' log-probs go up and penalised ones down, on balance, at first order. The
    second-order term is computed exactly (Hessian-vector product); the test requires the measured
    change to match first + second order to within the size of the second-order term itself, and to
    be positive. The weights are float64; update_pass's float32 log-probs perturb the step by ~1e-7
    relative, far below the second-order term (eta = 1e-4: ~0.2 % of the first-order one)."""
    catalog, examples = world
    model = make_model(torch.float64)
    cfg = config(overflow_penalty=0.0, early_stop_penalty=0.0)
    batch = prepare_batch(hand_rollout(), examples, tokenizer, catalog, cfg)
    params = list(model.parameters())

    # S and its derivatives by eager attention (the fused CPU kernel has no second derivative; eager
    # attention in float64 gives NaN on left padding, which S, one unpadded row at a time, never has).
    model.set_attn_implementation("eager")
    s0 = advantage_weighted_loglik(model, hand_rollout(), TEMPERATURE)
    grad_s = torch.autograd.grad(s0, params, create_graph=True)
    eta = 1e-4
    v = [gs.detach() / D for gs in grad_s]              # the step direction if the loss gradient is -grad(S)/D
    first = eta * sum((gs.detach() * vi).sum() for gs, vi in zip(grad_s, v)).item()
    hv = torch.autograd.grad(sum((gs * vi).sum() for gs, vi in zip(grad_s, v)), params)
    second = 0.5 * eta ** 2 * sum((h * vi).sum() for h, vi in zip(hv, v)).item()

    model.set_attn_implementation("sdpa")

    # The gradient update_pass applies, read through a step of size 0.
    update_pass(model, torch.optim.SGD(params, lr=0.0), batch, cfg)
    for gl, vi in zip(grads(model), v):
        assert torch.allclose(gl, -vi, atol=1e-6, rtol=1e-5)  # float32 log-probs inside update_pass

    batch = prepare_batch(hand_rollout(), examples, tokenizer, catalog, cfg)
    update_pass(model, torch.optim.SGD(params, lr=eta), batch, cfg)
    with torch.no_grad():
        s1 = advantage_weighted_loglik(model, hand_rollout(), TEMPERATURE).item()
    change = s1 - s0.item()
    assert first > 0 and change > 0
    assert abs(change - (first + second)) <= abs(second), (change, first, second)
