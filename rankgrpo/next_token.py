"""Choosing the next token: temperature, the nucleus (top-p), and exact sampling by the
exponential race, from one shared generator or from one generator per prompt.

The eager decode (`rankgrpo.sampling`) and the compiled one (`rankgrpo.compiled_decode`) both
draw through `choose_row_tokens`, so their token streams agree.
"""
from __future__ import annotations

from typing import Sequence

import torch


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens [N], logprobs [N]).

    logits: float32 [N, V]. The log-prob is that of the distribution the token came from:
    log softmax(logits / T), restricted to and renormalised over the nucleus when top_p < 1.
    Greedy rows take the argmax and report log softmax(logits / T) (T = 1 when T = 0).
    uniform: optional U(0, 1) draws [N, V] to sample with instead of drawing from `generator`.
    """
    logprobs = (logits / (temperature if temperature > 0 else 1.0)).log_softmax(-1)
    if greedy:
        tokens = logits.argmax(-1)
    else:
        if top_p < 1.0:
            logprobs = top_p_logprobs(logprobs, top_p)
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


def choose_row_tokens(
    logits: torch.Tensor,
    rows: torch.Tensor,
    G: int,
    *,
    temperature: float,
    top_p: float,
    greedy: bool,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`choose_tokens` for one decoding step of `sample`: (tokens [N], logprobs [N]).

    logits: float32 [N, V] of the rows `rows` [N] (global row r = sample r % G of prompt r // G).
    With one generator (or none) the N rows draw together from it; with a list of generators,
    one per prompt, each row draws from its prompt's generator (`_group_uniforms`). The eager
    and the compiled decode paths both draw through here, so their token streams agree.
    """
    per_prompt = isinstance(generator, Sequence) and not greedy
    return choose_tokens(
        logits, temperature=temperature, top_p=top_p, greedy=greedy,
        generator=None if per_prompt else generator,
        uniform=_group_uniforms(generator, rows, G, logits.shape[-1]) if per_prompt else None,
    )


def _group_uniforms(generators: Sequence[torch.Generator], rows: torch.Tensor, G: int, V: int) -> torch.Tensor:
    """U(0, 1) draws [len(rows), V] for one decoding step, row r's from generators[r // G].

    Every prompt with a row still in the batch draws a full [G, V] block from its own generator,
    whichever of its rows are left, so sample s of prompt p at step t always uses row s of the
    t-th block of generator p. Example: G = 2, rows [0, 1, 5] -> prompt 0 draws u0 [2, V],
    prompt 2 draws u2 [2, V]; the result is [u0[0], u0[1], u2[1]]."""
    prompt = rows // G
    present = torch.unique(prompt)  # sorted
    blocks = torch.cat([torch.rand(G, V, generator=generators[p], device=rows.device)
                        for p in present.tolist()])
    return blocks[torch.searchsorted(present, prompt) * G + rows % G]
