"""Stage 2: Rank-GRPO (and the vanilla GRPO / GSPO baselines) from an SFT checkpoint.

One RL step, in order (each numbered stage is a function below):
  1. rollout:   B prompts x G completions from our sampler (behaviour policy = current weights)
  2. score:     one parse per completion -> rel_k -> per-rank causal returns (Rank-GRPO, Eq. 8/9)
                or the list DCG@N (GRPO / GSPO, Eq. 3)
  3. advantage: normalised over the G samples of each prompt, per rank (§6.6)
  4. segment:   token -> rank ids from the same parse (the completion text is decoded once)
  5. update:    mu optimiser steps on this batch (mu = 1 on-policy; mu = 2 reuses it with the
                old log-probs stored at the first pass), loss = rank_grpo_loss / grpo_loss / gspo_loss

    python train_rankgrpo.py                                     # sandbox defaults, from runs/sft/final
    python train_rankgrpo.py --preset paper --model runs/sft/final --data train.jsonl --catalog catalog.jsonl
    python train_rankgrpo.py --algo grpo                         # the vanilla GRPO baseline
    python train_rankgrpo.py --out runs/rl --resume              # continue exactly
    python train_rankgrpo.py --constrained                       # rollouts and log-probs under the catalog constraint
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from rankgrpo.catalog import load_catalog
from rankgrpo.checkpoint import (load_trainer_state, rng_state, save_checkpoint, save_final, set_rng_state,
                                 truncate_log)
from rankgrpo.config import arg, save_config
from rankgrpo.constraint import catalog_trie, constraint_for_examples
from rankgrpo.data import chat_prompt_ids, load_examples
from rankgrpo.io import append_jsonl
from rankgrpo.losses import (eos_positions, grpo_loss, group_advantages, gspo_loss, loss_denominator,
                             rank_grpo_loss)
from rankgrpo.metrics import in_catalog_ratio
from rankgrpo.models import load_model
from rankgrpo.parsing import parse_recommendations
from rankgrpo.rewards import causal_returns, rank_relevance, sequence_dcg
from rankgrpo.sampling import sample, token_logprobs
from rankgrpo.segment import decode_completion, token_ranks
from rankgrpo.training import (NonFiniteGuard, TrainerConfig, check_paths, eos_token_ids, indices_for_step,
                               parse_lr_schedule, run_script, start_from, step_schedule, validate_generation)

PRESETS = {
    # the paper (App. C, §7): 48 prompts x G = 8 = 384 completions per step, lr 1e-6, 1024 new tokens
    "paper": dict(lr=1e-6, prompts_per_step=48, micro_batch_size=16, max_new_tokens=1024, steps=15800),
    # the sandbox's tiny model: fewer prompts, a larger lr, short lists
    "sandbox": dict(lr=2e-5, prompts_per_step=8, micro_batch_size=64, max_new_tokens=180, steps=60),
}
LOGGED_RANKS = (1, 2, 5, 10, 15, 20)


@dataclass
class TrainRankGRPOConfig(TrainerConfig):
    """Rank-GRPO / GRPO / GSPO training from an SFT checkpoint (PAPER.md section 6)."""

    model: str = arg("runs/sft/final", "Starting policy (the SFT checkpoint); also the frozen reference.")
    data: str = arg("sandbox_world/train.jsonl", "RL prompts with ground truths (examples JSONL).")
    val_data: str = arg("sandbox_world/validation.jsonl", "Validation examples for the periodic NDCG@20.")
    catalog: str = arg("sandbox_world/catalog.jsonl", "Catalog (relevance needs in-catalog items).")
    out: str = arg("runs/rankgrpo", "Run directory.")
    algo: str = arg("rank_grpo", "rank_grpo (rank-level ratio and advantage), grpo (token ratio, list "
                                 "advantage) or gspo (list geometric-mean ratio).",
                    choices=["rank_grpo", "grpo", "gspo"])
    reward: str = arg("exp_inf", "Rank-GRPO return: exp_inf (rel_k), exp (Eq. 9, needs --gamma), dcg "
                                 "(DCG@k:N, Eq. 8, 'log'). GRPO/GSPO always use DCG@N.",
                      choices=["exp_inf", "exp", "dcg"])
    gamma: float = arg(0.0, "Gamma of the exp return (> 1).")
    group_size: int = arg(8, "G, completions per prompt (paper 8).")
    n_items: int = arg(20, "N, list length (paper 20).")
    prompts_per_step: int = arg(0, "Prompts per RL step (0: preset; paper 48, so 384 completions).")
    micro_batch_size: int = arg(0, "Completions per forward/backward pass (0: preset).")
    mu: int = arg(1, "Optimiser steps per sampled batch: 1 on-policy, 2 off-policy (reuses the batch).")
    steps: int = arg(0, "Sampling rounds (0: preset). Optimiser steps = steps * mu.")
    lr: float = arg(0.0, "Learning rate (0: preset; paper 1e-6).")
    lr_schedule: list[str] = arg([], "Piecewise-constant lr as STEP:LR entries, e.g. 8000:1e-7 (paper 1B/3B).")
    adam_beta2: float = arg(0.99, "AdamW beta2 (the authors' 0.99).")
    weight_decay: float = arg(0.0, "AdamW weight decay.")
    eps_low: float = arg(-1.0, "Lower clip epsilon (-1: the algorithm's paper value: 0.06 rank_grpo, 0.2 grpo, "
                               "3e-4 gspo).")
    eps_high: float = arg(-1.0, "Upper clip epsilon (-1: paper value: 0.08 / 0.26 / 4e-4).")
    beta: float = arg(1e-3, "KL coefficient (k3 to the frozen reference); 0 skips the reference model.")
    aggregation: str = arg("rank_mean", "rank_mean (paper Eq. 6) or token_mean (the authors' code).",
                           choices=["rank_mean", "token_mean"])
    overflow_penalty: float = arg(-0.1, "eps_o: advantage of each line past N (0 = off).")
    early_stop_penalty: float = arg(-0.1, "eps_u: advantage of an <eos> before N lines (0 = off).")
    temperature: float = arg(1.0, "Sampling temperature (paper 1.0); log-probs use the same temperature.")
    max_new_tokens: int = arg(0, "Completion token budget (0: preset; paper 1024).")
    stop_after_lines: int = arg(0, "Stop a completion after this many complete lines (0 = only eos/budget); "
                                   "N+2 saves time on runaway lists while still showing overflow.")
    year_tolerance: int = arg(2, "Year tolerance of the relevance match.")
    constrained: bool = arg(False, "Catalog-constrained decoding (rankgrpo/constraint.py): rollouts write only "
                                   "catalog lines, none twice, and the policy, old and reference log-probs are "
                                   "those of the constrained, renormalised distributions. The periodic "
                                   "validation decodes under the constraint too. Default off, as in the paper.")
    exclude_seen: bool = arg(True, "With --constrained: also forbid the catalog items whose title the user "
                                   "mentioned (their reward is 0).")
    trie_cache: str = arg("", "With --constrained: keep the catalog's token trie in this directory (default: memory).")
    eval_every: int = arg(20, "Validation NDCG@20 (greedy) every this many steps (and at the end); 0 = off.")
    val_examples: int = arg(64, "Validation examples for the periodic check.")
    save_every: int = arg(20, "Checkpoint every this many steps.")

    def validate(self) -> None:
        self.apply_preset(PRESETS)
        paper_eps = {"rank_grpo": (0.06, 0.08), "grpo": (0.2, 0.26), "gspo": (3e-4, 4e-4)}[self.algo]
        if self.eps_low < 0:
            self.eps_low = paper_eps[0]
        if self.eps_high < 0:
            self.eps_high = paper_eps[1]
        if self.reward == "exp" and not self.gamma > 1:
            raise SystemExit("error: --reward exp needs --gamma > 1")
        if self.group_size < 2:
            raise SystemExit("error: --group-size must be at least 2 (advantages are normalised over the group)")
        parse_lr_schedule(self.lr_schedule)


# ----------------------------------------------------------------------------- stages


def score_rollout(rollout, examples, tokenizer, catalog, cfg) -> dict:
    """Stage 2: decode once, parse once, relevance per rank. Returns texts, rel [B, N] and list stats."""
    texts, rel, n_lines, parse_rate, in_cat = [], [], [], [], []
    for row in range(rollout.num_rows):
        n = int(rollout.lengths[row])
        text = decode_completion(rollout.completion_ids[row, :n].tolist(), tokenizer)
        items = parse_recommendations(text)
        ex = examples[int(rollout.prompt_index[row])]
        rel.append(rank_relevance(items, ex.groundtruth, ex.seen_titles, catalog, n_items=cfg.n_items,
                                  year_tolerance=cfg.year_tolerance))
        texts.append(text)
        n_lines.append(len(items))
        parse_rate.append(sum(it.valid for it in items) / len(items))
        in_cat.append(in_catalog_ratio(items, catalog, year_tolerance=cfg.year_tolerance, n_items=cfg.n_items))
    return {"texts": texts, "rel": torch.tensor(np.stack(rel), dtype=torch.float32),
            "n_lines": n_lines, "parse_rate": parse_rate, "in_catalog": in_cat}


def advantages_for(rel: torch.Tensor, cfg, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: (rewards, advantages). Rank-GRPO: per-rank returns [B, N] normalised per rank over G;
    GRPO / GSPO: DCG@N [B] normalised over G."""
    if cfg.algo == "rank_grpo":
        rewards = causal_returns(rel, cfg.reward, cfg.gamma or None)
        adv = group_advantages(rewards.view(-1, group_size, rel.shape[-1])).view_as(rewards)
    else:
        rewards = sequence_dcg(rel)
        adv = group_advantages(rewards.view(-1, group_size)).view(-1)
    return rewards, adv


def policy_loss(cfg, logp, old_logp, ref_logp, rank_ids, mask, adv, eos_index, denom):
    """Stage 5's loss for the chosen algorithm (all pure functions of rankgrpo.losses)."""
    beta = cfg.beta
    if cfg.algo == "rank_grpo":
        return rank_grpo_loss(logp, old_logp, ref_logp, rank_ids, mask, adv, eps_low=cfg.eps_low,
                              eps_high=cfg.eps_high, beta=beta, aggregation=cfg.aggregation,
                              overflow_penalty=cfg.overflow_penalty, early_stop_penalty=cfg.early_stop_penalty,
                              eos_index=eos_index, denom=denom)
    fn = grpo_loss if cfg.algo == "grpo" else gspo_loss
    return fn(logp, old_logp, ref_logp, mask, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=beta,
              denom=denom)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock stage timings are honest (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_metrics(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        if isinstance(rows[0][k], (int, float)):
            out[k] = float(np.mean([r[k] for r in rows]))
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    return run_script(TrainRankGRPOConfig, run, argv)


def run(cfg) -> int:
    check_paths(data=cfg.data, val_data=cfg.val_data, catalog=cfg.catalog)
    resume_from, generator, tokenizer, model = start_from(cfg)
    reference = None
    if cfg.beta != 0:  # frozen copy of the *starting* checkpoint, also after a resume
        reference = load_model(cfg.model, device=cfg.device) if resume_from else copy.deepcopy(model)
        reference.eval().requires_grad_(False)
    catalog = load_catalog(cfg.catalog)
    examples = load_examples(cfg.data)
    val = load_examples(cfg.val_data)[: cfg.val_examples]
    if any(not e.groundtruth for e in examples):
        print(f"warning: {sum(not e.groundtruth for e in examples)} example(s) without ground truth "
              "(their rewards are all 0)", file=sys.stderr)
    save_config(cfg, cfg.out)
    eos_ids = eos_token_ids(model, tokenizer)
    prompt_ids = {}
    trie = catalog_trie(catalog, tokenizer, cache_dir=cfg.trie_cache or None) if cfg.constrained else None

    def constraint_for(exs):
        if trie is None:
            return None
        return constraint_for_examples(trie, catalog, exs, n_items=cfg.n_items, eos_token_ids=eos_ids,
                                       exclude_seen=cfg.exclude_seen)

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    schedule = parse_lr_schedule(cfg.lr_schedule)
    step = 0
    log_path = f"{cfg.out}/log.jsonl"
    if resume_from:
        state = load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        step = state["step"]
        print(f"resumed from {resume_from} at step {step}")
    truncate_log(log_path, step)  # a fresh run starts a fresh log; a resumed one drops rows it will redo
    autocast = (lambda: torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)) \
        if cfg.bf16 else contextlib.nullcontext
    guard = NonFiniteGuard(cfg.max_nonfinite)

    def validate_now():
        row = {"step": step, **validate_generation(model, tokenizer, val, catalog, max_new_tokens=cfg.max_new_tokens,
                                                    n_items=cfg.n_items, constraint=val_constraint)}
        append_jsonl(log_path, row)
        tqdm.write(f"step {step}: val NDCG@20 {row['val_ndcg@20']:.4f} R@20 {row['val_recall@20']:.4f} "
                   f"in-catalog {row['val_in_catalog']:.3f}")

    val_constraint = constraint_for(val)
    if step == 0 and cfg.eval_every and not resume_from:
        validate_now()
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.algo, dynamic_ncols=True)
    while step < cfg.steps:
        t_start = time.perf_counter()
        batch = [examples[i] for i in indices_for_step(step, len(examples), cfg.prompts_per_step, cfg.seed)]
        prompts = [prompt_ids.setdefault(ex.id, chat_prompt_ids(tokenizer, ex)) for ex in batch]

        # 1. rollout (one exclusion set per prompt under --constrained)
        model.eval()
        constraint = constraint_for(batch)
        rollout = sample(model, prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, eos_token_ids=eos_ids, pad_token_id=tokenizer.pad_token_id,
                         tokenizer=tokenizer, generator=generator,
                         stop_after_items=cfg.stop_after_lines or None, constraint=constraint)
        _sync(torch.device(cfg.device))
        t_sample = time.perf_counter()
        # 2-4. score, advantages, segmentation
        scored = score_rollout(rollout, batch, tokenizer, catalog, cfg)
        rewards, adv = advantages_for(scored["rel"], cfg, cfg.group_size)
        dev = torch.device(cfg.device)
        rank_ids = token_ranks(rollout.completion_ids, rollout.completion_mask, tokenizer).to(dev)
        mask = rollout.completion_mask.to(dev)
        eos_index = eos_positions(rollout.lengths, rollout.ended_with_eos).to(dev)
        adv = adv.to(dev)
        agg = cfg.aggregation if cfg.algo == "rank_grpo" else "sequence_mean"
        denom = loss_denominator(agg, mask, cfg.n_items if cfg.algo == "rank_grpo" else 1)
        t_score = time.perf_counter()

        # reference log-probs once per batch
        micro = [torch.arange(i, min(i + cfg.micro_batch_size, rollout.num_rows))
                 for i in range(0, rollout.num_rows, cfg.micro_batch_size)]
        ref_logp = [None] * len(micro)
        old_logp = [None] * len(micro)
        # the same constraint, one exclusion set per row: log-probs of the distributions sampled from
        micro_constraint = [None if constraint is None else constraint.for_rows(rollout.prompt_index[rows])
                            for rows in micro]
        if reference is not None:
            with torch.no_grad(), autocast():
                for j, rows in enumerate(micro):
                    ids, attn, start = rollout.model_inputs(rows)
                    ref_logp[j] = token_logprobs(reference, ids.to(dev), attn.to(dev), start,
                                                 cfg.temperature, constraint=micro_constraint[j]).float()
        _sync(dev)
        t_ref = time.perf_counter()

        # 5. mu optimiser steps on this batch
        model.train()
        for it in range(cfg.mu):
            for g in optimizer.param_groups:
                g["lr"] = step_schedule(step * cfg.mu + it, cfg.lr, schedule)
            optimizer.zero_grad(set_to_none=True)
            step_metrics, entropies = [], []
            total = torch.zeros((), device=dev)
            t_forward = 0.0  # policy forward passes, split out of time/update for the speed breakdown
            for j, rows in enumerate(micro):
                ids, attn, start = rollout.model_inputs(rows)
                t0 = time.perf_counter()
                with autocast():
                    logp, ent = token_logprobs(model, ids.to(dev), attn.to(dev), start,
                                               cfg.temperature, return_entropy=True, constraint=micro_constraint[j])
                logp = logp.float()
                _sync(dev)
                t_forward += time.perf_counter() - t0
                if old_logp[j] is None:  # first pass: the behaviour policy is the current one
                    old_logp[j] = logp.detach()
                a = adv[rows]
                loss, m = policy_loss(cfg, logp, old_logp[j], ref_logp[j], rank_ids[rows], mask[rows], a,
                                      eos_index[rows], denom)
                loss.backward()
                total += loss.detach()
                step_metrics.append(m)
                entropies.append((ent.float() * mask[rows]).sum().item())
            if guard.ok(total, step):
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                grad_norm = float("nan")
            _sync(dev)
            t_end = time.perf_counter()
            rel = scored["rel"]
            zero_std = (rewards.view(-1, cfg.group_size, *rewards.shape[1:]).std(dim=1) == 0).float().mean()
            row = {"step": step + 1, "iteration": it, "loss": total.item(), "grad_norm": grad_norm,
                   "lr": optimizer.param_groups[0]["lr"],
                   **{f"reward/rank_{k}": rel[:, k - 1].mean().item() for k in LOGGED_RANKS if k <= cfg.n_items},
                   "reward/rank_mean": rel.mean(0).tolist(),
                   "reward/dcg": sequence_dcg(rel).mean().item(), "reward/dcg_std": sequence_dcg(rel).std().item(),
                   "reward/zero_std_frac": zero_std.item(),
                   "entropy": sum(entropies) / max(mask.sum().item(), 1),
                   "items_emitted": float(np.mean(scored["n_lines"])), "parse_rate": float(np.mean(scored["parse_rate"])),
                   "in_catalog": float(np.mean(scored["in_catalog"])),
                   "ended_with_eos": rollout.ended_with_eos.float().mean().item(),
                   "completion_tokens": rollout.lengths.float().mean().item(),
                   **{k: v for k, v in _mean_metrics(step_metrics).items() if k not in ("loss",)},
                   "time/sample": t_sample - t_start, "time/score": t_score - t_sample, "time/ref": t_ref - t_score,
                   "time/update": t_end - t_ref, "time/policy_forward": t_forward,
                   "samples_per_s": rollout.num_rows / (t_end - t_start)}
            append_jsonl(log_path, row)
        step += 1
        bar.update(1)
        bar.set_postfix(r1=f"{row['reward/rank_1']:.2f}", dcg=f"{row['reward/dcg']:.3f}",
                        kl=f"{row.get('kl', 0.0):.4f}")
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            validate_now()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(cfg.out, step, model, tokenizer, {"optimizer": optimizer.state_dict(),
                                                               "rng": rng_state(generator)},
                            keep_last=cfg.keep_checkpoints)
    bar.close()
    save_final(cfg.out, model, tokenizer)
    print(f"final weights: {cfg.out}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
