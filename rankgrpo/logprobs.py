"""Teacher-forced log-probs of completion tokens: what the policy loss differentiates and what the
frozen reference model scores, equal (up to float rounding) to the log-probs `rankgrpo.sampling.sample`
recorded while drawing the same tokens.

No [B, T, V] tensor besides the model's own logits is held (`selective_log_softmax`). With
``share_prefix`` the prompt prefix that every row shares runs once (`rankgrpo.kv_cache`).
"""
from __future__ import annotations

import torch

from rankgrpo.kv_cache import (cache_argument, move_shared_prefix_left, positions_from_mask, shared_prefix_cache,
                               supports_logits_to_keep)


class _SelectedLogProbs(torch.autograd.Function):
    """log softmax(logits / T)[token], computed and differentiated a chunk of rows at a time.

    Besides the logits themselves (saved as they are, e.g. bf16), neither pass holds a
    [B, T, V] tensor: forward keeps only the per-position log-sum-exp in float32, and
    backward rebuilds softmax a chunk at a time from the saved logits:
        d logp / d logits = (onehot(token) - softmax(logits / T)) / T.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, rows_per_chunk):
        out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        for i in range(0, logits.shape[0], rows_per_chunk):
            z = logits[i : i + rows_per_chunk].float() / temperature
            lse[i : i + rows_per_chunk] = z.logsumexp(-1)
            out[i : i + rows_per_chunk] = z.gather(-1, tokens[i : i + rows_per_chunk, :, None]).squeeze(-1)
        out -= lse
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.rows_per_chunk = temperature, rows_per_chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, tokens, lse = ctx.saved_tensors
        T, step = ctx.temperature, ctx.rows_per_chunk
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], step):
            g = grad_out[i : i + step, :, None]
            probs = (logits[i : i + step].float() / T - lse[i : i + step, :, None]).exp()
            chunk = (-probs * g).scatter_add_(-1, tokens[i : i + step, :, None], g)
            grad[i : i + step] = chunk / T
        return grad, None, None, None


def selective_log_softmax(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """log softmax(logits / temperature)[..., token] -> float32 [B, T], memory-lean, differentiable.

    logits [B, T, V] (any float dtype), tokens [B, T]. Work is done `chunk_tokens` positions
    (whole rows) at a time in float32.
    """
    rows_per_chunk = max(1, chunk_tokens // max(1, logits.shape[1]))
    return _SelectedLogProbs.apply(logits, tokens, float(temperature), rows_per_chunk)


@torch.no_grad()
def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position -> float32 [B, T] (no grad).

    H = logsumexp(z) - sum_v softmax(z)_v z_v, with z = logits / T, a chunk of rows at a time.
    """
    rows_per_chunk = max(1, chunk_tokens // max(1, logits.shape[1]))
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for i in range(0, logits.shape[0], rows_per_chunk):
        z = logits[i : i + rows_per_chunk].float() / temperature
        out[i : i + rows_per_chunk] = z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)
    return out


def completion_logits(model, input_ids, attention_mask, completion_start: int, *,
                      share_prefix: bool = False) -> torch.Tensor:
    """Logits that predict the completion tokens: [B, T, V] in the model's dtype, T = L - completion_start.

    Position completion_start - 1 + j predicts token completion_start + j. Only those T
    positions go through the LM head when the model accepts `logits_to_keep`.

    ``share_prefix``: the prompt tokens that every row starts with (the paper's instruction)
    run once, as a batch of one, and the rows run after them on a broadcast key/value cache
    (`move_shared_prefix_left`, `shared_prefix_cache`): the same logits up to float rounding,
    for fewer tokens. Gradients flow through the cache into the prefix's computation.
    """
    T = input_ids.shape[1] - completion_start
    if completion_start < 1 or T < 1:
        raise ValueError(f"completion_start={completion_start} must lie in [1, {input_ids.shape[1] - 1}]")
    p = 0
    if share_prefix and input_ids.shape[0] > 1:
        p, input_ids, attention_mask = move_shared_prefix_left(input_ids, attention_mask, completion_start)
    kwargs = dict(input_ids=input_ids[:, p:], attention_mask=attention_mask,
                  position_ids=positions_from_mask(attention_mask)[:, p:], use_cache=False)
    if p:
        kwargs.update(use_cache=True, **cache_argument(model, shared_prefix_cache(model, input_ids[0, :p],
                                                                                  input_ids.shape[0])))
    if supports_logits_to_keep(model):
        return model(**kwargs, logits_to_keep=T + 1).logits[:, :-1]
    return model(**kwargs).logits[:, completion_start - 1 - p: -1]


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: int,
    temperature: float = 1.0,
    *,
    chunk_tokens: int = 1024,
    return_entropy: bool = False,
    constraint=None,
    share_prefix: bool = False,
):
    """Teacher-forced log-probs of the completion tokens -> float32 [B, T], T = L - completion_start.

    Layout (what `Rollout.model_inputs()` builds): each row is its prompt, left-padded to a
    common width P = completion_start, followed by its completion, right-padded to T:

        prompts [5, 6, 7] and [8]; completions [1, 2, E] and [3, E] (E = eos, pad = 0)
        input_ids      = [[5, 6, 7, 1, 2, E],
                          [0, 0, 8, 3, E, 0]]
        attention_mask = [[1, 1, 1, 1, 1, 1],
                          [0, 0, 1, 1, 1, 0]]     prompt tokens + completion tokens in the mask
        completion_start = 3
        position ids   = cumsum(attention_mask) - 1, so each row's first real token is at 0,
                         exactly as in `sample`
        result[b, j]   = log softmax(logits / temperature)[input_ids[b, 3 + j]] at position 2 + j
                       -> [[lp(1), lp(2), lp(E)], [lp(3), lp(E), junk]]

    Values outside the completion mask are finite but meaningless: multiply by the mask.
    Works with autograd (the policy loss) and under no_grad (old / reference log-probs);
    beyond the model's own logits no [B, T, V] tensor is held (see `selective_log_softmax`). With
    `return_entropy=True` it also returns the true entropy [B, T] of the same
    temperature-scaled distributions (no grad), from the same forward pass.

    With `constraint` (a `rankgrpo.constraint.CatalogConstraint` with one exclusion set per
    row, see `CatalogConstraint.for_rows`) the log-probs are those of the catalog-constrained,
    renormalised distribution that `sample(..., constraint=)` drew from: only the normaliser
    over each position's allowed ids is computed (`rankgrpo.constraint.constrained_logprobs`);
    the entropy is then that of the constrained distribution too. Outside the mask it gives 0.

    ``share_prefix``: run the prompt prefix that every row shares once (`completion_logits`).
    """
    logits = completion_logits(model, input_ids, attention_mask, completion_start, share_prefix=share_prefix)
    if constraint is not None:
        from rankgrpo.constraint import constrained_logprobs

        return constrained_logprobs(logits, input_ids[:, completion_start:], attention_mask[:, completion_start:],
                                    constraint, temperature, return_entropy=return_entropy)
    logp = selective_log_softmax(logits, input_ids[:, completion_start:], temperature, chunk_tokens)
    if return_entropy:
        return logp, entropy_from_logits(logits.detach(), temperature, chunk_tokens)
    return logp
