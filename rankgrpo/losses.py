"""Losses of the RL stage (Rank-GRPO, and the GRPO / GSPO baselines) and of SFT.

Pure functions: tensors in, ``(loss, metrics)`` out; every coefficient is an argument.
Shapes: B completions (prompts x G), T completion tokens, N ranks (list length, 20 in the
paper), V vocabulary. Symbols follow the paper's §2.3: w is an importance ratio, A (Â)
an advantage, eps_low / eps_high the clip range, beta the KL coefficient.

Masking is exact: values at positions outside the mask are replaced (``torch.where``) before
any arithmetic, so padding may hold any garbage, NaN and inf included, without changing the
loss or its gradient.

| Paper | Function |
|---|---|
| Eq. 2, SFT NLL on the completion | ``sft_loss`` |
| Eq. 3 / 4, GRPO: token ratio, one advantage per list | ``grpo_loss`` |
| GSPO (App. B Eq. 15): list-level geometric-mean ratio | ``gspo_loss`` |
| Eq. 6, Rank-GRPO objective (gradient Eq. 7) | ``rank_grpo_loss`` |
| Eq. 6, rank-level advantage over the G samples | ``group_advantages`` |
| Eq. 6, rank-level geometric-mean ratio (log) | ``rank_log_ratio`` (+ ``rank_token_counts``) |
| App. C, k3 KL estimator (beta = 1e-3) | ``k3_kl`` |
| §2.3.3, length shaping eps_o / eps_u | ``rank_grpo_loss`` keywords; ``eos_positions`` |
| Eq. 6 (authors' code: per token), aggregation | ``rank_grpo_loss(aggregation=, denom=)``, ``loss_denominator`` |

**The authors' objective.** The paper's tables come from the authors' released trainer
(``libs/trl/rank_grpo_trainer.py``, ``RankGRPOTrainer._compute_loss`` and
``_generate_and_score_completions``, run by ``train_rank_grpo.py`` on TRL 0.21), which departs
from the equations in a few places. Each departure is a named keyword here whose default is the
paper's rule: ``eos_advantage``, ``exact_length_bonus``, ``early_stop_unit``,
``overflow_ratio`` and ``aggregation="micro_token_mean"`` of ``rank_grpo_loss``, and
``aggregation=`` of ``grpo_loss`` / ``gspo_loss``. The reward's departure is
``rankgrpo.rewards.rank_relevance(matching=)``; ``rankgrpo.rl.OBJECTIVES`` sets them all at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AGGREGATIONS = ("rank_mean", "token_mean", "micro_token_mean")
BASELINE_AGGREGATIONS = ("sequence_mean", "token_mean", "micro_token_mean")
EOS_ADVANTAGES = ("line", "zero")
EARLY_STOP_UNITS = ("eos", "last_line")
OVERFLOW_RATIOS = ("per_line", "shared")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Rank-level advantage (Eq. 6): z-score over the G samples of each prompt.

        Â[p, i, k] = (r[p, i, k] - mean_i r[p, :, k]) / (std_i r[p, :, k] + eps)

    with the unbiased std (``torch.std``) and eps = 1e-4, as in the authors' code. A group
    whose rewards are all equal (at that rank) gets exactly 0, never NaN; G = 1 gives 0.

    rewards: [P, G, ...] (e.g. [P, G, N] per-rank returns, or [P, G] list rewards for GRPO).
    Returns the same shape.

    >>> r = torch.tensor([[[1., 0.], [0., 0.], [1., 0.]]])     # P=1, G=3, N=2; rank 1 all equal
    >>> group_advantages(r)
    tensor([[[ 0.5773,  0.0000],
             [-1.1545,  0.0000],
             [ 0.5773,  0.0000]]])
    """
    if rewards.dim() < 2:
        raise ValueError(f"rewards must be [P, G, ...], got shape {tuple(rewards.shape)}")
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    if rewards.shape[1] == 1:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    scaled = centred / (rewards.std(dim=1, keepdim=True, correction=1) + eps)
    return torch.where(constant, torch.zeros_like(scaled), scaled)


# ---------------------------------------------------------------------------------------
# Rank-level pieces
# ---------------------------------------------------------------------------------------

def _in_ranks(rank_ids: torch.Tensor, mask: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """[B, T] bool: masked tokens whose rank lies in [0, n_ranks)."""
    return mask.bool() & (rank_ids >= 0) & (rank_ids < n_ranks)


def _rank_sums(values: torch.Tensor, rank_ids: torch.Tensor, keep: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """[B, n_ranks]: sum of ``values`` [B, T] over the kept tokens of each rank.

    Tokens that are not kept go to an extra column that is dropped, and their values are
    replaced by 0 first, so garbage there never reaches the result or its gradient.
    """
    index = torch.where(keep, rank_ids.long(), n_ranks)
    values = torch.where(keep, values, torch.zeros_like(values))
    sums = values.new_zeros(values.shape[0], n_ranks + 1).scatter_add(1, index, values)
    return sums[:, :n_ranks]


def rank_token_counts(rank_ids: torch.Tensor, mask: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """|y^(k)|: number of masked tokens of each rank. rank_ids, mask: [B, T] -> LongTensor [B, n_ranks].

    A rank with count 0 is empty (the line has no token of its own, e.g. a blank line
    written by a "\\n\\n" token, or a list cut before it).

    >>> rank_token_counts(torch.tensor([[0, 0, 1, 3, -1]]), torch.tensor([[1, 1, 1, 1, 0]]), 3)
    tensor([[2, 1, 0]])
    """
    keep = _in_ranks(rank_ids, mask, n_ranks)
    return _rank_sums(keep.long(), rank_ids, keep, n_ranks)


def rank_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, rank_ids: torch.Tensor,
                   mask: torch.Tensor, n_ranks: int) -> torch.Tensor:
    """log w_{i,k}: per-rank mean of the token log-ratios (Eq. 6, Eq. 7).

        log w_k = (1/|y^(k)|) Σ_{t in rank k} (log π_θ(y_t) - log π_old(y_t))

    i.e. the log of the ratio of geometric-mean token probabilities. A rank with no tokens
    gets 0 (w = 1); ``rank_token_counts`` tells which ranks are empty. Tokens outside the
    mask or with a rank outside [0, n_ranks) are ignored.

    logp, old_logp: [B, T] float; rank_ids: [B, T] long; mask: [B, T]. Returns [B, n_ranks].

    Gradient: ∂ log w_k / ∂ log π_θ(y_t) = 1/|y^(k)| for each token of rank k, which is the
    per-item mean token gradient of Eq. 7. The GSPO-token stop-gradient form
    (log π - sg(log π) + sg(log w)) has the same value and, since every token of a rank shares
    one advantage, the same gradient, so the plain mean is used.

    >>> logp = torch.tensor([[-1.0, -2.0, -0.5, -0.5, -9.0]])
    >>> old = torch.tensor([[-1.1, -2.3, -0.5, -0.4, 0.0]])
    >>> rank_log_ratio(logp, old, torch.tensor([[0, 0, 1, 1, -1]]), torch.tensor([[1, 1, 1, 1, 0]]), 3)
    tensor([[ 0.2000, -0.0500,  0.0000]])
    """
    keep = _in_ranks(rank_ids, mask, n_ranks)
    sums = _rank_sums(logp - old_logp, rank_ids, keep, n_ranks)
    counts = _rank_sums(keep.to(logp.dtype), rank_ids, keep, n_ranks)
    return sums / counts.clamp(min=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref) (App. C): exp(r) - r - 1, r = log π_ref - log π_θ.

    logp, ref_logp, mask: [B, T]. Returns [B, T], exactly 0 outside the mask. Non-negative;
    its value is unbiased for the KL under samples from π_θ.
    """
    r = torch.where(mask.bool(), ref_logp - logp, torch.zeros_like(logp))
    return torch.exp(r) - r - 1  # exactly 0 where r = 0


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """min(w A, clip(w, 1 - eps_low, 1 + eps_high) A), elementwise (the PPO / GRPO surrogate)."""
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


def loss_denominator(aggregation: str, mask: torch.Tensor, n_ranks: int, n_micro_batches: int = 1):
    """The normaliser of one batch under each aggregation, for gradient accumulation.

    "rank_mean": B * n_ranks (ranks, Eq. 6); "token_mean": number of masked tokens;
    "sequence_mean": B (lists, Eq. 3 and GSPO; pass n_ranks=1).
    Sum it over the micro-batches of one optimiser step and pass the total as ``denom=`` to
    every micro-batch's loss: the summed micro-batch losses then equal the loss of the whole
    batch (a mean of per-micro-batch means would not when token counts differ).

    "micro_token_mean" is that mean of per-micro-batch means, on purpose: the authors' trainer
    (TRL 0.21's default ``loss_type="bnpo"``, ``GRPOTrainer._compute_loss``) divides each
    micro-batch's token sum by the micro-batch's own token count, and gradient accumulation
    (and DDP's gradient average) then averages the micro-batches. Call it with ``mask`` = ONE
    micro-batch's mask and ``n_micro_batches`` = the number of micro-batches of the optimiser
    step over all processes: it returns n_tokens(micro-batch) * n_micro_batches, so summing
    the micro-batch losses gives (1/M) Σ_j (token sum_j / n_tokens_j). For the other
    aggregations ``n_micro_batches`` is ignored.

    mask: [B, T]. Returns an int, or a 0-dim tensor for the token aggregations.

    >>> m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    >>> loss_denominator("token_mean", m, 2), loss_denominator("micro_token_mean", m, 2, n_micro_batches=3)
    (tensor(4), tensor(12))
    """
    if aggregation == "rank_mean":
        return mask.shape[0] * n_ranks
    if aggregation == "token_mean":
        return mask.bool().sum()
    if aggregation == "micro_token_mean":
        return mask.bool().sum() * n_micro_batches
    if aggregation == "sequence_mean":
        return mask.shape[0]
    raise ValueError(f"aggregation must be 'rank_mean', 'token_mean', 'micro_token_mean' or 'sequence_mean', "
                     f"got {aggregation!r}")


def _positive(denom):
    """The normaliser, at least 1 (a batch with nothing to average gives loss 0, not NaN)."""
    return denom.clamp(min=1) if torch.is_tensor(denom) else max(denom, 1)


def eos_positions(lengths: torch.Tensor, ended_with_eos: torch.Tensor) -> torch.Tensor:
    """``eos_index`` for ``rank_grpo_loss`` from a rollout: LongTensor [B], the column of the
    <eos> token (lengths - 1) where the row ended with <eos>, -1 where it was cut before.

    >>> eos_positions(torch.tensor([3, 5, 2]), torch.tensor([True, False, True]))
    tensor([ 2, -1,  1])
    """
    return torch.where(ended_with_eos.bool(), lengths.long() - 1, -1)


# ---------------------------------------------------------------------------------------
# Rank-GRPO
# ---------------------------------------------------------------------------------------

def _check_token_inputs(logp, old_logp, ref_logp, mask, beta):
    for name, x in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, logp has {tuple(logp.shape)}; "
                             "both must be [B, T]")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the frozen reference policy's log-probs)")


def _eos_lines(rank_ids, mask, eos_index):
    """(ended [B] bool, eos_line [B] long): whether the row ended with <eos>, and the line its <eos> is in."""
    ended = eos_index >= 0
    at = eos_index.long().clamp(min=0).unsqueeze(1)
    if not bool(torch.all(~ended | mask.bool().gather(1, at).squeeze(1))):
        raise ValueError("eos_index must point at a masked completion token (or be -1 for a cut completion)")
    return ended, rank_ids.long().gather(1, at).squeeze(1)


def rank_grpo_loss(logp, old_logp, ref_logp, rank_ids, mask, advantages, *,
                   eps_low=0.06, eps_high=0.08, beta=1e-3, aggregation="rank_mean",
                   overflow_penalty=-0.1, early_stop_penalty=-0.1, eos_index=None, denom=None,
                   eos_advantage="line", exact_length_bonus=0.0, early_stop_unit="eos", overflow_ratio="per_line"):
    """Rank-GRPO loss = -J (Eq. 6) + beta * KL, with optional length shaping (§2.3.3).

    Inputs (B = prompts x G, T completion tokens, N = advantages.shape[-1]):
      logp, old_logp, ref_logp: [B, T] log π_θ / π_old / π_ref of the sampled tokens
        (ref_logp may be None when beta == 0); mask: [B, T], 1 on completion tokens;
      rank_ids: [B, T] from ``rankgrpo.segment.token_ranks`` (line index, >= N overflow);
      advantages: [B, N] Â_{i,k} (``group_advantages`` of the causal returns);
      eos_index: LongTensor [B], column of the <eos> token in each row, -1 where the
        completion was cut before <eos> (``eos_positions(lengths, ended_with_eos)``);
        needed when early_stop_penalty != 0, exact_length_bonus != 0 or eos_advantage="zero";
      denom: global normaliser for gradient accumulation (``loss_denominator``); None means
        this batch's own.

    **Units.** The loss is a sum over units, each with a geometric-mean ratio w (over its
    tokens), an advantage and a clipped term min(w A, clip(w, 1-eps_low, 1+eps_high) A):
      * rank k < N: the tokens of line k (its closing "\\n" included, <eos> in the last line),
        advantage Â_k. A rank with no tokens contributes 0 but still counts in N.
      * overflow line k >= N that holds at least one token: its own ratio, advantage
        ``overflow_penalty`` (eps_o, paper: -0.1 per overflow item).
      * premature stop (the row ended with <eos> on a line k < N-1, i.e. fewer than N lines):
        the <eos> token alone, ratio π_θ(eos)/π_old(eos), advantage ``early_stop_penalty``
        (eps_u, paper: -0.1). The <eos> token also stays in its line's unit.
    The shaping values are advantage terms added after normalisation (as the authors' code
    does), not rewards; 0 switches each off. A trailing "\\n" after line N-1 makes an overflow
    line holding <eos>.

    **The authors' rules** (``libs/trl/rank_grpo_trainer.py``: ``_segment_items_from_tokens``
    builds the segments, ``_generate_and_score_completions`` the per-token advantages,
    ``_compute_loss`` the per-token loss). Each keyword's default is the paper's rule above:
      * ``eos_advantage="zero"``: the <eos> token's advantage in its line is 0 instead of Â_k
        (the authors zero the advantage at the EOS position before shaping). Only an <eos> on
        a rank line k < N is affected; an <eos> in overflow keeps eps_o, which the authors add
        to every overflow token after the zeroing.
      * ``exact_length_bonus=b``: a row that ended with <eos> on line N-1 (exactly N lines, no
        overflow) gets +b on its <eos> (the authors' ``end_of_list_reward``, +0.1, not in the
        paper). It is an <eos> shaping term like eps_u and sits in the unit
        ``early_stop_unit`` chooses.
      * ``early_stop_unit="last_line"``: eps_u (and b) are added to the <eos> token's
        advantage inside its line's unit, whose ratio is the whole line's geometric mean, so
        the term's gradient spreads over the line's tokens; ``"eos"`` (default) makes <eos>
        alone a unit with its own ratio.
      * ``overflow_ratio="shared"``: all tokens past line N-1 form ONE unit with one
        geometric-mean ratio and advantage eps_o (the authors' 21st ratio bin); ``"per_line"``
        (default) gives each overflow line its own unit and ratio.
      * ``aggregation="micro_token_mean"``: below.
    With every one of them, the authors' per-token loss is reproduced: -min(w_u(t) a_t,
    clip(w_u(t)) a_t) + beta KL_t for every masked token t, where u(t) is the token's line
    (or the shared overflow bin) and a_t its advantage (Â_k; 0 + eps_u or b on <eos>; eps_o on
    overflow tokens).
    Inside a unit whose tokens do not all share one advantage (the <eos> under
    ``eos_advantage="zero"`` or ``early_stop_unit="last_line"``), the unit's term is the
    mean (rank_mean) or the sum (token aggregations) over its tokens t of
    min(w a_t, clip(w) a_t), which is the authors' per-token term summed; when every token
    shares the unit's advantage this is the plain unit term.

    **Aggregation.**
      * "rank_mean" (paper, Eq. 6), D = B*N by default:
            loss = -(1/D) [Σ_units min(w A, clip(w) A)] + beta (1/D) Σ_{line units} mean_{t in unit} KL_t
        Each unit (rank, overflow line, premature stop) weighs the same whatever its length,
        and its tokens share 1/|y^(k)| of its gradient (Eq. 7).
        KL choice: the per-token k3 KL is averaged within each line unit and summed over
        units with the same 1/D, so it enters like a per-rank term: every rank weighs the
        same in the KL as in the policy term, the KL gradient of a token carries the same
        1/|y^(k)| as its policy gradient, and accumulation with ``denom`` stays exact.
      * "token_mean" (the authors' per-token weighting with one global token count), D =
        number of masked tokens:
            loss = -(1/D) [Σ_units |unit| min(w A, clip(w) A)] + beta (1/D) Σ_t KL_t
        The unit's ratio and advantage are copied onto each of its tokens, so each rank is
        weighted by its token count (the <eos> unit has one token).
      * "micro_token_mean" (the authors' code: TRL 0.21's default ``loss_type="bnpo"``): the
        same sum as token_mean, but over ONE micro-batch, divided by its own token count and
        averaged over the step's micro-batches. Pass ``denom = loss_denominator(
        "micro_token_mean", micro_batch_mask, N, n_micro_batches=M)``; with ``denom=None`` it
        equals token_mean on this batch.

    Returns ``(loss, metrics)``; metrics (floats, per-rank lists) are computed without grad:
    "loss", "loss/policy", "loss/kl" (beta times the KL term), "kl" (mean token k3),
    "ratio/mean|min|max" over units, "clip/low_frac" (A < 0 and w < 1 - eps_low) and
    "clip/high_frac" (A > 0 and w > 1 + eps_high): fractions of units whose gradient the clip
    zeroes; "adv/mean", "adv/std", "adv/zero_frac", "adv/rank_mean", "adv/rank_abs_mean"
    ([N] lists), "units/empty_rank_frac", "units/overflow", "units/early_stop",
    "units/exact_length" (rows given the exact-length bonus), "n_tokens".

    Worked example (B=1, N=2; tokens 0-1 are rank 0, tokens 2-4 rank 1, the last is padding):

    >>> old = torch.zeros(1, 6)
    >>> logp = torch.tensor([[0.02, 0.04, -0.10, 0.00, -0.05, 123.0]])
    >>> ranks = torch.tensor([[0, 0, 1, 1, 1, -1]]); mask = ranks >= 0
    >>> adv = torch.tensor([[1.0, -1.0]])
    >>> loss, m = rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=0.0,
    ...                          overflow_penalty=0.0, early_stop_penalty=0.0)
    >>> # w_0 = exp(0.03) = 1.0305 (A=+1), w_1 = exp(-0.05) = 0.9512 (A=-1): -(1.0305 - 0.9512)/2
    >>> round(loss.item(), 4), round(m["ratio/max"], 4), round(m["ratio/min"], 4)
    (-0.0396, 1.0305, 0.9512)
    >>> # the same rows with token 4 as <eos> (exactly N lines) under the authors' <eos> rules:
    >>> # its advantage is 0 + 0.1 inside rank 1, so rank 1's mean term is
    >>> # (2 * (-0.9512) + min(0.9512 * 0.1, 0.9512 * 0.1)) / 3 = -0.6024: -(1.0305 - 0.6024)/2
    >>> loss, m = rank_grpo_loss(logp, old, None, ranks, mask, adv, beta=0.0, overflow_penalty=0.0,
    ...                          early_stop_penalty=0.0, eos_index=torch.tensor([4]), eos_advantage="zero",
    ...                          exact_length_bonus=0.1, early_stop_unit="last_line")
    >>> round(loss.item(), 3)
    -0.214
    """
    _check_token_inputs(logp, old_logp, ref_logp, mask, beta)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    _check_choice("eos_advantage", eos_advantage, EOS_ADVANTAGES)
    _check_choice("early_stop_unit", early_stop_unit, EARLY_STOP_UNITS)
    _check_choice("overflow_ratio", overflow_ratio, OVERFLOW_RATIOS)
    if advantages.dim() != 2 or advantages.shape[0] != logp.shape[0]:
        raise ValueError(f"advantages must be [B, N] with B = {logp.shape[0]}, got {tuple(advantages.shape)}")
    eos_shaping = early_stop_penalty != 0 or exact_length_bonus != 0
    if (eos_shaping or eos_advantage == "zero") and eos_index is None:
        raise ValueError("early_stop_penalty != 0, exact_length_bonus != 0 and eos_advantage='zero' need "
                         "eos_index ([B], -1 for completions cut before <eos>)")
    if logp.shape[1] == 0 and eos_index is not None:  # no token: every row was cut, no <eos> rule acts
        if bool(torch.any(eos_index >= 0)):
            raise ValueError("eos_index must point at a masked completion token (or be -1 for a cut completion)")
        eos_shaping, eos_advantage = False, "line"
    mask = mask.bool()
    rank_ids = rank_ids.long()
    if bool(torch.any(mask & (rank_ids < 0))):
        raise ValueError("every masked token needs a rank id >= 0 (see rankgrpo.segment.token_ranks)")
    n_rows, n_ranks = advantages.shape
    zero = logp.new_zeros(())
    if overflow_ratio == "shared":  # the authors' one overflow bin: every line >= N is unit N
        rank_ids = rank_ids.clamp(max=n_ranks)

    # Stage 1: line units 0 .. n_lines-1; lines >= N are overflow.
    last_line = int(torch.where(mask, rank_ids, -1).max()) if mask.numel() else -1
    n_lines = max(n_ranks, last_line + 1)
    counts = rank_token_counts(rank_ids, mask, n_lines)                       # [B, L]
    present = counts > 0
    log_w = rank_log_ratio(logp, old_logp, rank_ids, mask, n_lines)           # [B, L]
    overflow_adv = advantages.new_full((n_rows, n_lines - n_ranks), overflow_penalty)
    unit_adv = torch.where(present, torch.cat([advantages, overflow_adv], dim=1), 0.0)
    ratio = torch.exp(log_w)
    surrogate = _clipped_surrogate(ratio, unit_adv, eps_low, eps_high)     # 0 on empty units (A = 0)

    # Stage 2: where the row's <eos> is: premature stop (line < N-1), exactly N lines (line N-1).
    no_row = torch.zeros(n_rows, dtype=torch.bool, device=logp.device)
    stops, exact = no_row, no_row
    if eos_shaping or eos_advantage == "zero":
        ended, eos_line = _eos_lines(rank_ids, mask, eos_index)
        if early_stop_penalty != 0:
            stops = ended & (eos_line < n_ranks - 1)
        if exact_length_bonus != 0:
            exact = ended & (eos_line == n_ranks - 1)

    # Stage 3a: the <eos> unit, the <eos> token alone (early_stop_unit="eos").
    eos_unit = no_row
    stop_ratio = stop_adv = stop_surrogate = logp.new_zeros(n_rows)
    if early_stop_unit == "eos" and eos_shaping:
        eos_unit = stops | exact
        at = eos_index.clamp(min=0).long().unsqueeze(1)
        eos_log_w = torch.where(eos_unit, (logp.gather(1, at) - old_logp.gather(1, at)).squeeze(1), zero)
        stop_ratio = torch.exp(eos_log_w)
        stop_adv = torch.where(stops, torch.full_like(stop_ratio, early_stop_penalty),
                               torch.where(exact, torch.full_like(stop_ratio, exact_length_bonus), zero))
        stop_surrogate = torch.where(eos_unit, _clipped_surrogate(stop_ratio, stop_adv, eps_low, eps_high), zero)

    # Stage 3b: an <eos> whose advantage differs from its line's: replace its token's term
    # min(w Â_k, clip(w) Â_k) by min(w a_eos, clip(w) a_eos), w = its line's ratio.
    eos_correction = None
    in_line_shaping = early_stop_unit == "last_line" and eos_shaping
    if eos_advantage == "zero" or in_line_shaping:
        line = eos_line.clamp(0, n_ranks - 1).unsqueeze(1)
        in_rank = ended & (eos_line < n_ranks)                                 # <eos> on a rank line
        a_line = advantages.gather(1, line).squeeze(1)
        a_eos = a_line if eos_advantage == "line" else torch.zeros_like(a_line)
        if in_line_shaping:
            a_eos = torch.where(stops, a_eos + early_stop_penalty, a_eos)   # python floats keep the dtype
            a_eos = torch.where(exact, a_eos + exact_length_bonus, a_eos)
        w_line = ratio.gather(1, line).squeeze(1)
        change = (_clipped_surrogate(w_line, a_eos, eps_low, eps_high)
                  - _clipped_surrogate(w_line, a_line, eps_low, eps_high))
        if aggregation == "rank_mean":                                         # the unit's mean over its tokens
            change = change / counts.gather(1, line).squeeze(1).clamp(min=1).to(change.dtype)
        eos_correction = torch.where(in_rank, change, zero)

    # Stage 4: aggregate (per-unit weight 1 for rank_mean, |unit| tokens for the token means).
    denom = loss_denominator(aggregation, mask, n_ranks) if denom is None else denom
    weight = present.to(logp.dtype) if aggregation == "rank_mean" else counts.to(logp.dtype)
    policy_sum = (surrogate * weight).sum() + stop_surrogate.sum()
    if eos_correction is not None:
        policy_sum = policy_sum + eos_correction.sum()
    policy_loss = -policy_sum / _positive(denom)
    kl_token = k3_kl(logp, ref_logp, mask) if ref_logp is not None else None
    if beta != 0:
        if aggregation == "rank_mean":
            kl_sum = (_rank_sums(kl_token, rank_ids, mask, n_lines) / counts.clamp(min=1)).sum()
        else:
            kl_sum = kl_token.sum()
        kl_loss = beta * kl_sum / _positive(denom)
    else:
        kl_loss = zero
    loss = policy_loss + kl_loss

    with torch.no_grad():
        metrics = _rank_metrics(loss, policy_loss, kl_loss, kl_token, mask, advantages, counts, present,
                                ratio, unit_adv, stops, exact, eos_unit, stop_ratio, stop_adv, eps_low, eps_high)
    return loss, metrics


def _rank_metrics(loss, policy_loss, kl_loss, kl_token, mask, advantages, counts, present,
                  ratio, unit_adv, stops, exact, eos_unit, stop_ratio, stop_adv, eps_low, eps_high):
    n_ranks = advantages.shape[1]
    unit_ratio = torch.cat([ratio[present], stop_ratio[eos_unit]])
    adv = torch.cat([unit_adv[present], stop_adv[eos_unit]])
    n_units = max(unit_ratio.numel(), 1)
    clipped_low = ((adv < 0) & (unit_ratio < 1 - eps_low)).sum() / n_units
    clipped_high = ((adv > 0) & (unit_ratio > 1 + eps_high)).sum() / n_units
    n_tokens = mask.sum()
    scalars = {
        "loss": loss, "loss/policy": policy_loss, "loss/kl": kl_loss,
        "ratio/mean": unit_ratio.mean() if unit_ratio.numel() else loss.new_ones(()),
        "ratio/min": unit_ratio.min() if unit_ratio.numel() else loss.new_ones(()),
        "ratio/max": unit_ratio.max() if unit_ratio.numel() else loss.new_ones(()),
        "clip/low_frac": clipped_low, "clip/high_frac": clipped_high,
        "adv/mean": advantages.mean(), "adv/std": advantages.std(correction=0),
        "adv/zero_frac": (advantages == 0).float().mean(),
        "units/empty_rank_frac": (~present[:, :n_ranks]).float().mean(),
        "units/overflow": present[:, n_ranks:].sum(), "units/early_stop": stops.sum(),
        "units/exact_length": exact.sum(),
        "n_tokens": n_tokens,
    }
    if kl_token is not None:
        scalars["kl"] = kl_token.sum() / n_tokens.clamp(min=1)
    names = list(scalars)
    values = torch.stack([torch.as_tensor(scalars[k], dtype=torch.float64, device=loss.device) for k in names])
    metrics = dict(zip(names, values.tolist()))
    metrics["adv/rank_mean"] = advantages.mean(dim=0).tolist()
    metrics["adv/rank_abs_mean"] = advantages.abs().mean(dim=0).tolist()
    return metrics


# ---------------------------------------------------------------------------------------
# Baselines: GRPO (token ratio) and GSPO (list ratio), one advantage per list
# ---------------------------------------------------------------------------------------

def grpo_loss(logp, old_logp, ref_logp, mask, advantages, *, eps_low=0.2, eps_high=0.26, beta=1e-3, denom=None,
              aggregation="sequence_mean"):
    """Vanilla GRPO loss = -J (Eq. 3) + beta * KL: token ratio, one advantage per list.

        loss = -(1/D) Σ_i (1/|y_i|) Σ_t min(w_it Â_i, clip(w_it, 1-eps_low, 1+eps_high) Â_i)
               + beta (1/D) Σ_i (1/|y_i|) Σ_t KL_t,        w_it = π_θ(y_it) / π_old(y_it)

    D = B by default (``loss_denominator("sequence_mean", ...)``); a row with no tokens
    contributes 0 but counts in B. Gradient (Eq. 4): Σ_i (1/|y_i|) Σ_t w_it Â_i ∇log π(y_it)
    inside the clip range. This per-list mean is TRL's ``loss_type="grpo"``.

    ``aggregation="token_mean"`` / ``"micro_token_mean"``: TRL 0.21's default ``"bnpo"``, which a
    stock TRL trainer (as the authors presumably ran their baselines with) applies:
        loss = -(1/D) Σ_i Σ_t min(...) + beta (1/D) Σ_i Σ_t KL_t,   D = number of masked tokens
    so each list weighs by its length. "micro_token_mean" takes D per micro-batch and averages
    the micro-batches (``loss_denominator("micro_token_mean", ...)``); with ``denom=None`` the two
    are the same.

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B] (``group_advantages`` of DCG@N).
    Returns ``(loss, metrics)`` with "loss", "loss/policy", "loss/kl", "kl", "ratio/mean|min|max"
    and "clip/low_frac" / "clip/high_frac" over tokens.

    >>> logp = torch.tensor([[0.1, -0.1, 0.0], [0.0, 0.0, 0.5]]); old = torch.zeros(2, 3)
    >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    >>> loss, m = grpo_loss(logp, old, None, mask, torch.tensor([1.0, -1.0]), beta=0.0)
    >>> # row 0: (e^0.1 + e^-0.1 + 1)/3 = 1.0033; row 1: -(1 + 1)/2 = -1; loss = -(1.0033 - 1)/2
    >>> round(loss.item(), 5)
    -0.00167
    """
    _check_token_inputs(logp, old_logp, ref_logp, mask, beta)
    _check_choice("aggregation", aggregation, BASELINE_AGGREGATIONS)
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    mask = mask.bool()
    zero = logp.new_zeros(())
    lengths = mask.sum(dim=1).clamp(min=1).to(logp.dtype)                    # |y_i|
    log_w = torch.where(mask, logp - old_logp, zero)
    ratio = torch.exp(log_w)
    adv = advantages.unsqueeze(1).expand_as(ratio)
    surrogate = torch.where(mask, _clipped_surrogate(ratio, adv, eps_low, eps_high), zero)
    denom = loss_denominator(aggregation, mask, 1) if denom is None else denom
    per_list = aggregation == "sequence_mean"
    policy_loss = -((surrogate.sum(dim=1) / lengths).sum() if per_list else surrogate.sum()) / _positive(denom)
    kl_token = k3_kl(logp, ref_logp, mask) if ref_logp is not None else None
    if beta != 0:
        kl_sum = (kl_token.sum(dim=1) / lengths).sum() if per_list else kl_token.sum()
        kl_loss = beta * kl_sum / _positive(denom)
    else:
        kl_loss = zero
    loss = policy_loss + kl_loss
    with torch.no_grad():
        token_ratio = ratio[mask]
        token_adv = adv[mask]
        n = max(token_ratio.numel(), 1)
        scalars = {
            "loss": loss, "loss/policy": policy_loss, "loss/kl": kl_loss,
            "ratio/mean": token_ratio.sum() / n,
            "ratio/min": token_ratio.min() if token_ratio.numel() else logp.new_ones(()),
            "ratio/max": token_ratio.max() if token_ratio.numel() else logp.new_ones(()),
            "clip/low_frac": ((token_adv < 0) & (token_ratio < 1 - eps_low)).sum() / n,
            "clip/high_frac": ((token_adv > 0) & (token_ratio > 1 + eps_high)).sum() / n,
            "adv/mean": advantages.mean(), "n_tokens": mask.sum(),
        }
        if kl_token is not None:
            scalars["kl"] = kl_token.sum() / n
        names = list(scalars)
        values = torch.stack([torch.as_tensor(scalars[k], dtype=torch.float64, device=logp.device) for k in names])
        metrics = dict(zip(names, values.tolist()))
    return loss, metrics


def gspo_loss(logp, old_logp, ref_logp, mask, advantages, *, eps_low=3e-4, eps_high=4e-4, beta=1e-3, denom=None,
              aggregation="sequence_mean"):
    """GSPO loss (App. B Eq. 15, App. C): one geometric-mean ratio and one advantage per list.

        s_i = exp((1/|y_i|) Σ_t (log π_θ(y_it) - log π_old(y_it)))
        loss = -(1/D) Σ_i min(s_i Â_i, clip(s_i, 1-eps_low, 1+eps_high) Â_i)
               + beta (1/D) Σ_i (1/|y_i|) Σ_t KL_t

    This is Rank-GRPO with the whole list as a single rank (N = 1, no length shaping), and is
    computed that way. D = B by default. Gradient (App. B Eq. 15): Σ_i s_i Â_i (1/|y_i|) Σ_t ∇log π.
    ``aggregation="token_mean"`` / ``"micro_token_mean"`` is TRL 0.21's default "bnpo" (see
    ``grpo_loss``): s_i and Â_i copied onto each of the list's tokens, D = masked tokens, so each
    list weighs by its length (``rank_grpo_loss``'s token aggregations with N = 1).

    logp, old_logp, ref_logp, mask: [B, T]; advantages: [B]. Returns ``(loss, metrics)`` with the
    metrics of ``rank_grpo_loss`` (units are lists).

    >>> logp = torch.tensor([[0.1, -0.1, 0.3], [0.0, 0.0, 0.5]]); old = torch.zeros(2, 3)
    >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    >>> loss, m = gspo_loss(logp, old, None, mask, torch.tensor([1.0, -1.0]), beta=0.0, eps_low=0.2, eps_high=0.2)
    >>> # s_0 = exp(0.1) = 1.1052, s_1 = exp(0) = 1: -(1.1052 - 1)/2
    >>> round(loss.item(), 4)
    -0.0526
    """
    _check_choice("aggregation", aggregation, BASELINE_AGGREGATIONS)
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    one_rank = torch.zeros_like(mask, dtype=torch.long)
    return rank_grpo_loss(logp, old_logp, ref_logp, one_rank, mask, advantages.unsqueeze(1),
                          eps_low=eps_low, eps_high=eps_high, beta=beta,
                          aggregation="rank_mean" if aggregation == "sequence_mean" else aggregation,
                          overflow_penalty=0.0, early_stop_penalty=0.0, eos_index=None, denom=denom)


# ---------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------

def sft_loss(logits, labels_mask, input_ids, *, denom=None):
    """Behaviour cloning on the completion only (Eq. 2): mean NLL of the target tokens.

        loss = -(1/D) Σ_{b,t: labels_mask[b,t]} log softmax(logits[b, t-1])[input_ids[b, t]]

    logits: [B, T, V], position t predicts input_ids[:, t+1]; labels_mask: [B, T], 1 on the
    target (completion) tokens, 0 on prompt and padding (position 0 cannot be a target);
    input_ids: [B, T]. D = number of target tokens by default (``denom`` for accumulation).
    Only the rows of logits that predict a target are gathered (a copy of [n_targets, V]),
    and ``cross_entropy`` does the log-softmax and the gather in one fused call.

    Returns ``(loss, metrics)``: "loss", "nll" (mean per target token), "accuracy" (argmax
    equals target), "n_tokens".

    >>> logits = torch.zeros(1, 3, 4)                        # uniform over 4 tokens
    >>> loss, m = sft_loss(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[2, 1, 3]]))
    >>> round(loss.item(), 4), m["n_tokens"]                   # log 4 = 1.3863
    (1.3863, 2.0)
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or labels_mask.shape != input_ids.shape:
        raise ValueError(f"logits [B, T, V], labels_mask [B, T], input_ids [B, T] expected; got "
                         f"{tuple(logits.shape)}, {tuple(labels_mask.shape)}, {tuple(input_ids.shape)}")
    target = labels_mask.bool()
    if bool(target[:, 0].any()):
        raise ValueError("labels_mask[:, 0] must be 0: no logit predicts the first token")
    rows, cols = torch.nonzero(target[:, 1:], as_tuple=True)                  # targets at cols + 1
    picked = logits[rows, cols]                                              # [n, V]
    if picked.dtype in (torch.float16, torch.bfloat16):
        picked = picked.float()
    targets = input_ids[rows, cols + 1]
    nll_sum = F.cross_entropy(picked, targets, reduction="sum")
    n_targets = targets.numel()
    loss = nll_sum / _positive(n_targets if denom is None else denom)
    with torch.no_grad():
        accuracy = (picked.argmax(dim=-1) == targets).sum() / max(n_targets, 1)
        metrics = {"loss": loss.item(), "nll": nll_sum.item() / max(n_targets, 1),
                   "accuracy": accuracy.item(), "n_tokens": float(n_targets)}
    return loss, metrics
