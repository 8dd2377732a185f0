"""One Rank-GRPO / GRPO / GSPO step after sampling, as functions a test can call without a subprocess.

``train_rankgrpo.py`` is the loop around these; in order (§2.3):

  2. ``score_rollout``   one decode and one parse per completion -> rel [B, N] (the reward's rule, §2.3.1)
  3. ``advantages_for``  per-rank causal returns normalised over each prompt's G samples (Rank-GRPO),
                         or DCG@N normalised over G (GRPO / GSPO)
  4. ``prepare_batch``   token -> rank ids from the same parse, the <eos> index, the loss denominator,
                         micro-batches and the frozen reference's log-probs
  5. ``update_pass``     one optimiser step on the batch; mu = 2 calls it twice, and the second pass
                         reuses the behaviour log-probs stored by the first

Rows of a rollout are prompt-major: row b belongs to prompt b // G (``Rollout.prompt_index``).

``OBJECTIVES`` names the two objectives: "paper" (the equations, the default) and "authors" (what
the authors' released trainer computes; the paper's tables come from it). Each of its seven
settings is a config field of its own; a field left None takes the objective's value
(``objective_setting``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from rankgrpo.catalog import Catalog
from rankgrpo.distributed import World, clip_grad_norm, grad_sync
from rankgrpo.losses import (eos_positions, grpo_loss, group_advantages, gspo_loss, loss_denominator,
                             rank_grpo_loss)
from rankgrpo.metrics import in_catalog_ratio
from rankgrpo.parsing import parse_recommendations
from rankgrpo.rewards import causal_returns, rank_relevance, sequence_dcg
from rankgrpo.logprobs import token_logprobs
from rankgrpo.lora import adapters_off
from rankgrpo.sampling import Rollout
from rankgrpo.segment import decode_completion, token_ranks
from rankgrpo.trainer import share_prompt_prefix

LOGGED_RANKS = (1, 2, 5, 10, 15, 20)

# Where the authors' released trainer (libs/trl/rank_grpo_trainer.py on TRL 0.21, run by
# train_rank_grpo.py) departs from the paper's equations, one setting per departure:
#   eos_advantage         the <eos> token's advantage is zeroed (RankGRPOTrainer._generate_and_score_completions)
#   exact_length_bonus    +0.1 on the <eos> of a list of exactly N lines (end_of_list_reward, same place)
#   early_stop_unit       the -0.1 early-stop penalty rides on <eos> inside its line's ratio (same place)
#   overflow_ratio        one ratio bin for all tokens past line N (RankGRPOTrainer._compute_loss)
#   aggregation           TRL 0.21's "bnpo": per-micro-batch token means, averaged (GRPOTrainer._compute_loss)
#   reward_matching       libs/metrics_align.py::evaluate_direct_match_aligned on process_rec_raw's list
#   baseline_aggregation  GRPO / GSPO under the same TRL default ("bnpo") instead of per-list means
OBJECTIVES = {
    "paper": dict(eos_advantage="line", exact_length_bonus=0.0, early_stop_unit="eos", overflow_ratio="per_line",
                  aggregation="rank_mean", reward_matching="in_place", baseline_aggregation="sequence_mean"),
    "authors": dict(eos_advantage="zero", exact_length_bonus=0.1, early_stop_unit="last_line",
                    overflow_ratio="shared", aggregation="micro_token_mean", reward_matching="parsed_list",
                    baseline_aggregation="micro_token_mean"),
}


def objective_setting(cfg, name: str):
    """``cfg.<name>``, or the value ``cfg.objective`` ("paper" when absent) gives it when the field is
    None or missing: a setting given explicitly wins over the objective's.

    >>> from types import SimpleNamespace
    >>> objective_setting(SimpleNamespace(objective="authors", aggregation="rank_mean"), "aggregation")
    'rank_mean'
    >>> objective_setting(SimpleNamespace(objective="authors"), "overflow_ratio")
    'shared'
    """
    value = getattr(cfg, name, None)
    if value is not None:
        return value
    return OBJECTIVES[getattr(cfg, "objective", None) or "paper"][name]


def resolve_objective(cfg) -> dict:
    """Fill every objective setting of ``cfg`` left None from ``cfg.objective`` (in place, so the
    saved config holds the values the run used). Returns {setting: value}."""
    resolved = {name: objective_setting(cfg, name) for name in OBJECTIVES["paper"]}
    for name, value in resolved.items():
        setattr(cfg, name, value)
    return resolved


def score_rollout(rollout: Rollout, examples: Sequence, tokenizer, catalog: Catalog, *, n_items: int,
                  year_tolerance: int, matching: str = "in_place") -> dict:
    """Stage 2: decode once, parse once, relevance per rank.

    ``examples[rollout.prompt_index[b]]`` is row b's example. Returns ``texts`` (B strings),
    ``rel`` [B, N] float32 (rel_k of §2.3.1: 1 for a hit at rank k, else 0; ``matching`` as in
    ``rank_relevance``), and per-row list stats ``n_lines``, ``parse_rate``, ``in_catalog``."""
    texts, rel, n_lines, parse_rate, in_cat = [], [], [], [], []
    for row in range(rollout.num_rows):
        n = int(rollout.lengths[row])
        text = decode_completion(rollout.completion_ids[row, :n].tolist(), tokenizer)
        items = parse_recommendations(text)
        ex = examples[int(rollout.prompt_index[row])]
        rel.append(rank_relevance(items, ex.groundtruth, ex.seen_titles, catalog, n_items=n_items,
                                  year_tolerance=year_tolerance, matching=matching))
        texts.append(text)
        n_lines.append(len(items))
        parse_rate.append(sum(it.valid for it in items) / len(items))
        in_cat.append(in_catalog_ratio(items, catalog, year_tolerance=year_tolerance, n_items=n_items))
    return {"texts": texts, "rel": torch.tensor(np.stack(rel), dtype=torch.float32),
            "n_lines": n_lines, "parse_rate": parse_rate, "in_catalog": in_cat}


def advantages_for(rel: torch.Tensor, cfg, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: (rewards, advantages) from rel [B, N], B = prompts x G, prompt-major.

    Rank-GRPO (``cfg.algo == "rank_grpo"``): rewards = causal returns [B, N] (Eq. 8 / 9, ``cfg.reward``),
    advantages normalised per rank over each prompt's G samples (Eq. 6) -> [B, N].
    GRPO / GSPO: rewards = DCG@N [B] (Eq. 3), normalised over G -> [B].

    Example (exp_inf, G = 2, N = 2): rel [[1, 0], [0, 0]] -> returns equal rel; rank 1 has mean 0.5 and
    std 0.707 over the group, so advantages [[+0.707, 0], [-0.707, 0]] (a rank with zero spread gets 0)."""
    if cfg.algo == "rank_grpo":
        rewards = causal_returns(rel, cfg.reward, cfg.gamma or None)
        adv = group_advantages(rewards.view(-1, group_size, rel.shape[-1])).view_as(rewards)
    else:
        rewards = sequence_dcg(rel)
        adv = group_advantages(rewards.view(-1, group_size)).view(-1)
    return rewards, adv


def policy_loss(cfg, logp, old_logp, ref_logp, rank_ids, mask, adv, eos_index, denom):
    """Stage 5's loss for the chosen algorithm (all pure functions of ``rankgrpo.losses``), with the
    settings of ``cfg.objective`` (``objective_setting``).
    logp / old_logp / ref_logp / rank_ids / mask: [b, T]; adv: [b, N] (rank_grpo) or [b]; eos_index: [b]."""
    setting = lambda name: objective_setting(cfg, name)  # noqa: E731
    if cfg.algo == "rank_grpo":
        return rank_grpo_loss(logp, old_logp, ref_logp, rank_ids, mask, adv, eps_low=cfg.eps_low,
                              eps_high=cfg.eps_high, beta=cfg.beta, aggregation=setting("aggregation"),
                              overflow_penalty=cfg.overflow_penalty, early_stop_penalty=cfg.early_stop_penalty,
                              eos_index=eos_index, denom=denom, eos_advantage=setting("eos_advantage"),
                              exact_length_bonus=setting("exact_length_bonus"),
                              early_stop_unit=setting("early_stop_unit"), overflow_ratio=setting("overflow_ratio"))
    fn = grpo_loss if cfg.algo == "grpo" else gspo_loss
    return fn(logp, old_logp, ref_logp, mask, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta,
              denom=denom, aggregation=setting("baseline_aggregation"))


def micro_batch_denominators(aggregation: str, mask: torch.Tensor, micro: Sequence[torch.Tensor], n_ranks: int,
                             world: World = World()) -> list:
    """The ``denom`` of each micro-batch's loss (``rankgrpo.losses.loss_denominator``), one per entry of
    ``micro`` (row-index tensors into ``mask`` [B, T]).

    rank_mean / token_mean / sequence_mean: the whole step's normaliser, summed over processes, the
    same for every micro-batch, so the summed micro-batch losses equal the loss of the whole batch.
    micro_token_mean (the authors' TRL "bnpo"): micro-batch j's own token count times the number of
    micro-batches of the step over all processes, so the summed losses are the mean of the
    micro-batch token means; it depends on how rows are split into micro-batches."""
    if aggregation == "micro_token_mean":
        n_micro = world.all_reduce_sum(len(micro))
        return [loss_denominator(aggregation, mask[rows], n_ranks, n_micro_batches=n_micro) for rows in micro]
    denom = world.all_reduce_sum(loss_denominator(aggregation, mask, n_ranks))
    return [denom] * len(micro)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock stage timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RLBatch:
    """Everything the update needs from one rollout, on the training device.

    rank_ids / mask: [B, T]; eos_index: [B] (-1 where the row did not end with eos); adv: [B, N] or [B];
    rewards: the un-normalised returns; denom: the loss denominator of the aggregation (global over B), or
    under micro_token_mean one per micro-batch (a list; ``denom_of``);
    micro: row-index tensors of the micro-batches; ref_logp / old_logp: one [b, T] tensor per
    micro-batch (old_logp is filled by the first ``update_pass``; None until then); constraints:
    one row-aligned ``CatalogConstraint`` per micro-batch under catalog-constrained decoding
    (``constraint.for_rows(rollout.prompt_index[rows])``), else empty: every log-prob is then that
    of the constrained distribution the rollout was sampled from."""

    rollout: Rollout
    scored: dict
    rewards: torch.Tensor
    adv: torch.Tensor
    rank_ids: torch.Tensor
    mask: torch.Tensor
    eos_index: torch.Tensor
    denom: torch.Tensor | float
    micro: list[torch.Tensor]
    ref_logp: list[torch.Tensor | None]
    old_logp: list[torch.Tensor | None] = field(default_factory=list)
    times: dict = field(default_factory=dict)
    constraints: list = field(default_factory=list)

    def constraint(self, j: int):
        """The constraint of micro-batch j (None: unconstrained)."""
        return self.constraints[j] if self.constraints else None

    def denom_of(self, j: int):
        """The loss denominator of micro-batch j."""
        return self.denom[j] if isinstance(self.denom, list) else self.denom


def prepare_batch(rollout: Rollout, examples: Sequence, tokenizer, catalog: Catalog, cfg, *,
                  reference=None, autocast: Callable = contextlib.nullcontext, world: World = World(),
                  constraint=None) -> RLBatch:
    """Stages 2-4 and the reference log-probs (once per batch, before any update).

    ``constraint``: the ``CatalogConstraint`` ``rollout`` was sampled under (one exclusion set per
    prompt of ``rollout``, i.e. of this rank's prompts under data parallelism), or None.

    ``reference``: the frozen starting model of the KL term, or None (beta = 0). Under LoRA it is the
    policy itself: its passes here run with the adapters off (``rankgrpo.lora.adapters_off``), which
    is the starting model exactly.

    Under data parallelism ``rollout`` holds this rank's whole groups and the loss denominator is
    summed over ranks, so every rank divides by the global B * N (rank_mean) or token count
    (``micro_batch_denominators``; micro_token_mean divides each micro-batch by its own count)."""
    dev = torch.device(cfg.device)
    t0 = time.perf_counter()
    scored = score_rollout(rollout, examples, tokenizer, catalog, n_items=cfg.n_items,
                           year_tolerance=cfg.year_tolerance, matching=objective_setting(cfg, "reward_matching"))
    rewards, adv = advantages_for(scored["rel"], cfg, cfg.group_size)
    rank_ids = token_ranks(rollout.completion_ids, rollout.completion_mask, tokenizer).to(dev)
    mask = rollout.completion_mask.to(dev)
    eos_index = eos_positions(rollout.lengths, rollout.ended_with_eos).to(dev)
    micro = [torch.arange(i, min(i + cfg.micro_batch_size, rollout.num_rows))
             for i in range(0, rollout.num_rows, cfg.micro_batch_size)]
    rank_level = cfg.algo == "rank_grpo"
    agg = objective_setting(cfg, "aggregation" if rank_level else "baseline_aggregation")
    denoms = micro_batch_denominators(agg, mask, micro, cfg.n_items if rank_level else 1, world)
    denom = denoms if agg == "micro_token_mean" else denoms[0]
    t1 = time.perf_counter()
    # the same constraint, one exclusion set per row: log-probs of the distributions sampled from
    constraints = [] if constraint is None else [constraint.for_rows(rollout.prompt_index[rows]) for rows in micro]
    ref_logp: list[torch.Tensor | None] = [None] * len(micro)
    if reference is not None:
        with torch.no_grad(), autocast(), adapters_off(reference):
            for j, rows in enumerate(micro):
                ids, attn, start = rollout.model_inputs(rows)
                ref_logp[j] = token_logprobs(reference, ids.to(dev), attn.to(dev), start, cfg.temperature,
                                             constraint=constraints[j] if constraints else None,
                                             share_prefix=share_prompt_prefix(cfg, world)).float()
    sync(dev)
    t2 = time.perf_counter()
    return RLBatch(rollout=rollout, scored=scored, rewards=rewards, adv=adv.to(dev), rank_ids=rank_ids, mask=mask,
                   eos_index=eos_index, denom=denom, micro=micro, ref_logp=ref_logp, old_logp=[None] * len(micro),
                   times={"time/score": t1 - t0, "time/ref": t2 - t1}, constraints=constraints)


def update_pass(model, optimizer, batch: RLBatch, cfg, *, guard=None, step: int = 0,
                autocast: Callable = contextlib.nullcontext, world: World = World()) -> dict:
    """Stage 5, one optimiser step over all micro-batches of ``batch``.

    The first call stores the behaviour log-probs (the current policy's, detached) in
    ``batch.old_logp``, so its ratios are exactly 1; a second call (mu = 2) reuses them.
    The loss of each micro-batch is already divided by the global denominator, so the summed
    gradients equal the gradient of the whole batch's loss. Returns the pass's metrics
    (loss, grad_norm, entropy, the loss function's metrics averaged over micro-batches).
    Under data parallelism gradients are synchronised once, at the last micro-batch, and the
    returned loss is the global one (summed over ranks), which is also what the guard sees."""
    dev = torch.device(cfg.device)
    optimizer.zero_grad(set_to_none=True)
    step_metrics, entropy_sum = [], 0.0
    total = torch.zeros((), device=dev)
    t_forward = 0.0  # policy forward passes, split out of the update time for the speed breakdown
    for j, rows in enumerate(batch.micro):
        ids, attn, start = batch.rollout.model_inputs(rows)
        t0 = time.perf_counter()
        with grad_sync(model, j == len(batch.micro) - 1):
            with autocast():
                logp, ent = token_logprobs(model, ids.to(dev), attn.to(dev), start, cfg.temperature,
                                           return_entropy=True, constraint=batch.constraint(j),
                                           share_prefix=share_prompt_prefix(cfg, world))
            logp = logp.float()
            sync(dev)
            t_forward += time.perf_counter() - t0
            if batch.old_logp[j] is None:  # first pass: the behaviour policy is the current one
                batch.old_logp[j] = logp.detach()
            loss, m = policy_loss(cfg, logp, batch.old_logp[j], batch.ref_logp[j], batch.rank_ids[rows],
                                  batch.mask[rows], batch.adv[rows], batch.eos_index[rows], batch.denom_of(j))
            loss.backward()
        total += loss.detach()
        step_metrics.append(m)
        entropy_sum += (ent.float() * batch.mask[rows]).sum().item()
    total = world.all_reduce_sum(total)
    if guard is None or guard.ok(total, step):
        grad_norm = clip_grad_norm(model, cfg.max_grad_norm)  # 0: no clipping
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
        grad_norm = float("nan")
    sync(dev)
    # a token mean over every rank's completions, not a mean of the ranks' means
    entropy_sum, n_tokens = world.all_reduce_sum(entropy_sum), world.all_reduce_sum(float(batch.mask.sum().item()))
    return {"loss": total.item(), "grad_norm": grad_norm,
            "entropy": entropy_sum / max(n_tokens, 1.0),
            **{k: v for k, v in _mean_metrics(step_metrics).items() if k != "loss"},
            "time/policy_forward": t_forward}


def rollout_metrics(batch: RLBatch, group_size: int, n_items: int, world: World = World()) -> dict:
    """Rewards per rank and list statistics of one rollout, for the log.

    Under torchrun every rank holds the same number of rows, so the means here are averaged over
    ranks by ``World.mean_metrics``; ``reward/dcg_std`` is computed here over every rank's lists,
    since a mean of the ranks' standard deviations is not the standard deviation of the whole."""
    rel, rewards, ro = batch.scored["rel"], batch.rewards, batch.rollout
    zero_std = (rewards.view(-1, group_size, *rewards.shape[1:]).std(dim=1) == 0).float().mean()
    dcg = sequence_dcg(rel)
    all_dcg = torch.tensor([x for part in world.gather_objects(dcg.tolist()) for x in part], dtype=torch.float64)
    return {**{f"reward/rank_{k}": rel[:, k - 1].mean().item() for k in LOGGED_RANKS if k <= n_items},
            "reward/rank_mean": rel.mean(0).tolist(),
            "reward/dcg": dcg.mean().item(), "reward/dcg_std": all_dcg.std().item(),
            "reward/zero_std_frac": zero_std.item(),
            "items_emitted": float(np.mean(batch.scored["n_lines"])),
            "parse_rate": float(np.mean(batch.scored["parse_rate"])),
            "in_catalog": float(np.mean(batch.scored["in_catalog"])),
            "ended_with_eos": ro.ended_with_eos.float().mean().item(),
            "completion_tokens": ro.lengths.float().mean().item()}


def _mean_metrics(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        if isinstance(rows[0][k], (int, float)):
            out[k] = float(np.mean([r[k] for r in rows]))
    return out
