"""Sampled tokens follow softmax(logits / T), or its renormalised nucleus when top_p < 1.

The parity tests of test_sampling.py check the log-prob recorded for whichever token was drawn;
these check which tokens are drawn. Each case draws n tokens from fixed logits, either with a
seeded shared generator (the exponential race) or with per-prompt keys (`PromptKeys`: one
counter-based draw per row and step, inverted through the row's distribution), and compares
every token's frequency with its target probability.

The bound (Hoeffding, exact for any n, no normal approximation): for one token,
P(|freq - p| >= eps) <= 2 exp(-2 n eps^2). Asking this of every token of every case at once
(a union bound over CELLS cells) with total false-alarm probability ALPHA = 1e-6 gives

    eps = sqrt(log(2 * CELLS / ALPHA) / (2 n))   (n = 40,000, CELLS = 80: eps = 0.0154).

The generator and the keys are seeded, so the outcome is fixed: the bound says that a correct
sampler fails this seed with probability below 1e-6, not that the test is random. The bugs it is meant for
move some probability by far more than eps: tokens drawn at T = 1 while T = 0.7 is asked
(0.14 on token 0 here), a nucleus not applied (0.08 on token 3), a wrong distribution.
"""
from __future__ import annotations

import math

import pytest
import torch

from rankgrpo.counter_rng import PromptKeys
from rankgrpo.models import tiny_model
from rankgrpo.next_token import choose_row_tokens, choose_tokens, inverse_cdf_tokens, top_p_logprobs
from rankgrpo.sampling import sample

N_DRAWS = 40_000
ALPHA = 1e-6
CELLS = 80        # an upper bound on the token frequencies compared in this file, all cases together
EPS = math.sqrt(math.log(2 * CELLS / ALPHA) / (2 * N_DRAWS))
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a token must come from, written out independently of the sampler:
    softmax(logits / T); for top_p < 1, keep the most likely tokens in order until their
    cumulative mass reaches top_p, zero the rest, renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1:
        keep = torch.zeros_like(p, dtype=torch.bool)
        mass = 0.0
        for i in p.argsort(descending=True).tolist():
            keep[i] = True
            mass += p[i].item()
            if mass >= top_p:
                break
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    return p


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def test_bound_separates_the_bugs_it_is_for():
    """The effects named in the module docstring exceed the bound several times over."""
    at_07, at_1 = target_probs(LOGITS, 0.7, 1.0), target_probs(LOGITS, 1.0, 1.0)
    assert (at_07 - at_1).abs().max() > 5 * EPS
    assert (target_probs(LOGITS, 1.0, 0.8) - at_1).abs().max() > 3 * EPS
    assert (target_probs(LOGITS, 0.7, 0.8) - at_07).abs().max() > 3 * EPS
    assert target_probs(LOGITS, 1.0, 0.8).tolist()[3:] == [0.0, 0.0, 0.0]  # token 3 is outside the nucleus


def draw_tokens(source: str, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """N_DRAWS tokens (and log-probs) from LOGITS: from one shared generator, or as 100 prompts x
    G = 8 rows over 50 decode steps with per-prompt keys, through `choose_row_tokens`."""
    if source == "shared generator":
        logits = LOGITS.expand(N_DRAWS, -1).contiguous()
        return choose_tokens(logits, temperature=temperature, top_p=top_p, greedy=False,
                             generator=torch.Generator().manual_seed(1234))
    P, G, T = 100, 8, 50
    draws = PromptKeys.from_ints(range(1234, 1234 + P)).draws(G, T)
    logits, rows = LOGITS.expand(P * G, -1).contiguous(), torch.arange(P * G)
    steps = [choose_row_tokens(logits, rows, G, temperature=temperature, top_p=top_p, greedy=False,
                               generator=draws, decode_step=t) for t in range(T)]
    return torch.cat([tokens for tokens, _ in steps]), torch.cat([logprobs for _, logprobs in steps])


@pytest.mark.parametrize("source", ["shared generator", "prompt keys"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_choose_tokens_follows_the_target_distribution(source, temperature, top_p):
    tokens, logprobs = draw_tokens(source, temperature, top_p)
    assert tokens.numel() == N_DRAWS
    target = target_probs(LOGITS, temperature, top_p)
    freq = frequencies(tokens, len(LOGITS))
    assert (freq - target).abs().max() <= EPS, (freq.tolist(), target.tolist(), EPS)
    assert bool((target[tokens] > 0).all())  # never a token outside the nucleus
    # The recorded log-prob is that of the same distribution.
    assert torch.allclose(logprobs.double(), target[tokens].log(), atol=1e-5)


def test_top_p_logprobs_is_the_renormalised_nucleus():
    logprobs = (LOGITS / 0.7).log_softmax(-1)[None]
    expected = target_probs(LOGITS, 0.7, 0.8)
    assert torch.allclose(top_p_logprobs(logprobs, 0.8).exp()[0].double(), expected, atol=1e-6)


@pytest.mark.parametrize("source", ["shared generator", "prompt keys"])
@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.8)])
def test_sample_draws_first_tokens_from_the_model_distribution(source, temperature, top_p):
    """End to end: G one-token completions of one prompt from a tiny model. The first token of each
    is drawn from the model's next-token distribution after the prompt (computed here with one plain
    forward pass), at T and within the nucleus."""
    torch.manual_seed(0)
    vocab = 8
    model = tiny_model("qwen2", vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=64, initializer_range=0.1, seed=4)
    prompt = [1, 5, 2]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    target = target_probs(logits, temperature, top_p)
    # A distribution worth testing: T and the nucleus each move some token by more than 3 eps.
    assert (target - target_probs(logits, 1.0 if temperature != 1.0 else 0.7, top_p)).abs().max() > 3 * EPS
    if top_p < 1:
        assert (target - target_probs(logits, temperature, 1.0)).abs().max() > 3 * EPS
    generator = torch.Generator().manual_seed(99) if source == "shared generator" else PromptKeys.from_ints([99])
    rollout = sample(model, [prompt], group_size=N_DRAWS, max_new_tokens=1, temperature=temperature, top_p=top_p,
                     eos_token_ids=0, generator=generator)
    tokens = rollout.completion_ids[:, 0]
    freq = frequencies(tokens, vocab)
    assert (freq - target).abs().max() <= EPS, (freq.tolist(), target.tolist(), EPS)
    assert torch.allclose(rollout.logprobs[:, 0].double(), target[tokens].log(), atol=1e-4)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_an_exact_zero_uniform_draw_never_picks_a_forbidden_token(top_p):
    """torch.rand returns exactly 0.0 about once in 2^24 draws. Inside a catalog line most steps
    allow one token (the rest at -inf); a zero draw on that token used to score every token 0, so
    argmax returned token 0, which is forbidden, with log-prob -inf."""
    logits = torch.full((3, 10), float("-inf"))
    logits[0, 7] = 1.5                               # one allowed token
    logits[1, 7], logits[1, 2] = 30.0, 0.0           # a one-token nucleus under top-p (p(2) ~ 1e-13)
    logits[2] = torch.linspace(0.0, 1.0, 10)         # everything allowed: a zero draw still samples
    uniform = torch.full((3, 10), 0.5)
    uniform[0, 7] = uniform[1, 7] = 0.0
    uniform[2, 0] = 0.0
    tokens, logprobs = choose_tokens(logits, temperature=1.0, top_p=top_p, greedy=False, generator=None,
                                     uniform=uniform)
    assert tokens[:2].tolist() == [7, 7]
    assert bool(torch.isfinite(logprobs).all())
    # with U = 0 on token 0, E_0 = -log(tiny) = 87.3, far above every other E_v = log 2: token 0 loses
    assert tokens[2].item() != 0


def test_inverse_cdf_tokens_worked_example_and_extremes():
    """Token v is drawn for u in [P(< v), P(<= v)) of the row's distribution; a token of probability 0
    is never drawn, not even at the extreme draws 2^-53 and 1 - 2^-53, and a row need not sum to 1."""
    probs = torch.tensor([0.5, 0.0, 0.25, 0.25]).expand(6, -1)
    u = torch.tensor([2**-53, 0.5 - 2**-40, 0.5, 0.75 - 2**-40, 0.75, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf_tokens(probs, u).tolist() == [0, 0, 2, 2, 3, 3]
    edges = torch.tensor([2**-53, 1 - 2**-53], dtype=torch.float64)
    for row, allowed in [([0.0, 0.0, 1.0, 0.0], {2}), ([0.3, 0.7, 0.0, 0.0], {0, 1}), ([0.0, 0.2, 0.0, 0.1], {1, 3}),
                         ([0.0, 3.0, 1.0, 0.0], {1, 2})]:
        tokens = inverse_cdf_tokens(torch.tensor([row, row]), edges)
        assert set(tokens.tolist()) <= allowed and tokens.tolist() == [min(allowed), max(allowed)]
    assert inverse_cdf_tokens(torch.tensor([[0.0, 3.0, 1.0, 0.0]]), torch.tensor([0.74], dtype=torch.float64)).item() == 1
    assert inverse_cdf_tokens(torch.tensor([[0.0, 3.0, 1.0, 0.0]]), torch.tensor([0.76], dtype=torch.float64)).item() == 2


def test_prompt_keys_never_draw_a_forbidden_token():
    """Inside a catalog line most steps allow one token (the rest at -inf): with keys, as with the
    shared generator (above), every draw lands on an allowed token, also inside a top-p nucleus."""
    logits = torch.full((64, 10), float("-inf"))
    logits[:, 7] = 1.5
    logits[32:, 2] = 1.0  # two allowed tokens in the second half
    draws = PromptKeys.from_ints(range(8)).draws(8, 20)
    for top_p in (1.0, 0.9):
        for t in range(20):
            tokens, logprobs = choose_row_tokens(logits, torch.arange(64), 8, temperature=1.0, top_p=top_p,
                                                 greedy=False, generator=draws, decode_step=t)
            assert set(tokens[:32].tolist()) == {7} and set(tokens[32:].tolist()) <= {2, 7}
            assert bool(torch.isfinite(logprobs).all())
