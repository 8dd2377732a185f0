"""Choosing the next token: temperature, the nucleus (top-p), and exact sampling, either by the
exponential race from one shared torch.Generator, or by inverting each row's cumulative
distribution with one counter-based draw per row and step from its prompt's key
(`rankgrpo.counter_rng.PromptKeys`).

The eager decode (`rankgrpo.sampling`) and the compiled one (`rankgrpo.compiled_decode`) both
draw through `choose_row_tokens`, so their token streams agree.
"""
from __future__ import annotations

import torch

FIXED_POINT_BITS = 52  # `inverse_cdf_tokens` rounds probabilities down to multiples of 2^-52


def top_p_logprobs(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Renormalised log-probs of the nucleus: the smallest set of most likely tokens whose
    mass reaches `top_p` (the most likely token is always kept); -inf elsewhere.

    logprobs: [N, V] normalised log-probs -> [N, V].
    Example: probs [0.5, 0.3, 0.2], top_p 0.7 -> nucleus {0, 1} -> probs [0.625, 0.375, 0].
    """
    sorted_lp, order = logprobs.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs.masked_fill(drop, float("-inf")).log_softmax(-1)


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: torch.Generator | None,
    uniform: torch.Tensor | None = None,
    row_uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens [N], logprobs [N]).

    logits: float32 [N, V]. The log-prob is that of the distribution the token came from:
    log softmax(logits / T), restricted to and renormalised over the nucleus when top_p < 1.
    Greedy rows take the argmax and report log softmax(logits / T) (T = 1 when T = 0).
    uniform: optional U(0, 1) draws [N, V] for the exponential race instead of drawing from `generator`.
    row_uniform: optional U(0, 1) draws, float64 [N], one per row: the token is then drawn by
    inversion (`inverse_cdf_tokens`) instead of the race, and `generator` is not used.
    """
    logprobs = (logits / (temperature if temperature > 0 else 1.0)).log_softmax(-1)
    if greedy:
        tokens = logits.argmax(-1)
    else:
        if top_p < 1.0:
            logprobs = top_p_logprobs(logprobs, top_p)
        if row_uniform is not None:
            tokens = inverse_cdf_tokens(logprobs.exp(), row_uniform)
        else:
            # Exponential race, exact sampling from probs: argmax_v p_v / E_v with E_v ~ Exp(1)
            # (what torch.multinomial does for one draw, with a faster Exp(1) = -log U).
            if uniform is None:
                uniform = torch.rand(logprobs.shape, generator=generator, device=logprobs.device)
            # torch.rand can return exactly 0 (about once in 2^24 float32 draws): E = inf would score
            # every token 0 and argmax would pick token 0, allowed or not. The smallest normal float
            # keeps E finite (<= 87.3 in float32), so a token of probability 0 never beats one of
            # probability > 0; every draw U > 0 is left exactly as it was.
            race = uniform.clamp_(min=torch.finfo(uniform.dtype).tiny).log_().neg_()
            tokens = (logprobs.exp() / race).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def inverse_cdf_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact sampling by inversion, one uniform per row: tokens [N], token v of row n with
    probability probs[n, v] / sum_v probs[n, v].

    probs: float32 [N, V] >= 0 (a row need not sum to exactly 1); u: float64 [N] in (0, 1).
    Fixed point, so that the token is a function of (probs, u) alone, on any device and in any
    batch: each probability is rounded down to a multiple of 2^-52 (w = floor(p * 2^52), exact
    for p >= 2^-28; at most V * 2^-52 ~ 3e-11 of the mass moves for V = 151,936), the cumulative
    sums of the integers w are exact in int64, and the row's token is the first v whose
    cumulative sum exceeds j = floor(u * sum w), a target in [0, sum w). A token of probability 0
    (outside the nucleus, masked by a constraint) has w = 0 and is never drawn.

    Example: probs [0.5, 0, 0.25, 0.25] -> tokens 0, 2, 3 for u in (0, 0.5), [0.5, 0.75), [0.75, 1).
    """
    weights = (probs * 2.0 ** FIXED_POINT_BITS).long()  # float32 * 2^52 is exact; .long() rounds down
    cumulative = weights.cumsum(-1)
    total = cumulative[:, -1:]
    target = torch.minimum((u[:, None] * total.double()).long(), total - 1)
    return torch.searchsorted(cumulative, target, right=True).squeeze(-1)


def choose_row_tokens(
    logits: torch.Tensor,
    rows: torch.Tensor,
    G: int,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: torch.Generator | torch.Tensor | None,
    decode_step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`choose_tokens` for step `decode_step` (0 for the first new token) of `sample`:
    (tokens [N], logprobs [N]).

    logits: float32 [N, V] of the rows `rows` [N] (global row r = sample r % G of prompt r // G).
    With one torch.Generator (or none) the N rows draw together from it (the exponential race).
    With per-row draws, float64 [P * G, T] (`PromptKeys.draws`, what `sample` makes of
    `PromptKeys`), row r takes draws[r, decode_step], a function of its prompt's key, the step and
    r % G alone, and inverts its distribution with it (`inverse_cdf_tokens`): no host
    synchronisation, and a row's token does not depend on the other rows. The eager and the
    compiled decode paths both draw through here, so their token streams agree.
    """
    if isinstance(generator, torch.Tensor) and not greedy:
        return choose_tokens(logits, temperature=temperature, top_p=top_p, greedy=False, generator=None,
                             row_uniform=generator[:, decode_step][rows])
    return choose_tokens(logits, temperature=temperature, top_p=top_p, greedy=greedy,
                         generator=None if isinstance(generator, torch.Tensor) else generator)
