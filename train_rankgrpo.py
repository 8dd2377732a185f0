"""Stage 2: Rank-GRPO (and the vanilla GRPO / GSPO baselines) from an SFT checkpoint.

One RL step, in order (stages 2-5 are functions of rankgrpo/rl.py):
  1. rollout:   B prompts x G completions from our sampler (behaviour policy = current weights)
  2. score:     one parse per completion -> rel_k -> per-rank causal returns (Rank-GRPO, Eq. 8/9)
                or the list DCG@N (GRPO / GSPO, Eq. 3)
  3. advantage: normalised over the G samples of each prompt, per rank (Eq. 6)
  4. segment:   token -> rank ids from the same parse (the completion text is decoded once)
  5. update:    mu optimiser steps on this batch (mu = 1 on-policy; mu = 2 reuses it with the
                old log-probs stored at the first pass), loss = rank_grpo_loss / grpo_loss / gspo_loss

    python train_rankgrpo.py                                     # the sandbox preset (make demo's), from runs/sft/final
    python train_rankgrpo.py --preset paper --model runs/sft/final --data train.jsonl --catalog catalog.jsonl
    python train_rankgrpo.py --algo grpo                         # the vanilla GRPO baseline
    python train_rankgrpo.py --objective authors                 # the authors' released trainer's rules
    python train_rankgrpo.py --out runs/rl --resume              # continue exactly
    python train_rankgrpo.py --constrained                       # rollouts and log-probs under the catalog constraint
    python train_rankgrpo.py --lora-rank 16                      # one GPU: LoRA adapters; the reference is free
    python train_rankgrpo.py --report-to tensorboard             # also send the log's rows to a tracker
    torchrun --nproc-per-node 4 train_rankgrpo.py ... [--fsdp]   # data parallel: each GPU owns 1/4 of the prompts

Prompts longer than --max-prompt-length (2,048) keep their last tokens; RUN/data_report.json and
the log's prompts_truncated count them.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

from rankgrpo.catalog import load_catalog
from rankgrpo.checkpoint import truncate_log
from rankgrpo.config import ConfigError, arg, config_to_dict, save_config
from rankgrpo.constraint import catalog_trie, constraint_for_examples
from rankgrpo.data import chat_prompt_ids, load_examples, truncate_left
from rankgrpo.distributed import (inference_model, prompt_keys, resume_training, run_in_world,
                                  save_final_weights, save_training_checkpoint, unwrap, wrap_model)
from rankgrpo.io import atomic_write_json
from rankgrpo.lora import trainable_parameters
from rankgrpo.models import load_model
from rankgrpo.rl import prepare_batch, resolve_objective, rollout_metrics, sync, update_pass
from rankgrpo.sampling import sample
from rankgrpo.sandbox import settings
from rankgrpo.models import eos_token_ids
from rankgrpo.schedules import parse_lr_schedule, step_schedule
from rankgrpo.tracking import MetricLog, open_tracker
from rankgrpo.trainer import (NonFiniteGuard, TrainerConfig, announce_prefix_sharing, check_paths,
                              enable_gradient_checkpointing, indices_for_step, run_script, start_from)
from rankgrpo.validation import validate_generation

# The paper's App. C, for hub models: 48 prompts x G = 8 = 384 completions per step, lr 1e-6, 1,024 new tokens
PAPER = dict(lr=1e-6, prompts_per_step=48, micro_batch_size=16, max_new_tokens=1024, steps=15800)
# --preset: the paper's, or the sandbox's (what make demo runs; rankgrpo/sandbox/settings.py)
PRESETS = {"paper": PAPER, "sandbox": settings.RL}


@dataclass
class TrainRankGRPOConfig(TrainerConfig):
    """Rank-GRPO / GRPO / GSPO training from an SFT checkpoint (§2.3)."""

    PRESETS: ClassVar[dict] = PRESETS

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
    gamma: float = arg(0.0, "Gamma of the exp return (> 1).", min=0)
    group_size: int = arg(8, "G, completions per prompt (paper 8).", min=2)
    n_items: int = arg(20, "N, list length (paper 20).", min=1)
    prompts_per_step: int = arg(PAPER["prompts_per_step"], "Prompts per RL step (set by both presets; the paper's "
                                                           "48, so 384 completions); under torchrun the global "
                                                           "number, split evenly over the processes.", min=1)
    micro_batch_size: int = arg(PAPER["micro_batch_size"], "Completions per forward/backward pass (set by both "
                                                           "presets).", min=1)
    mu: int = arg(1, "Optimiser steps per sampled batch: 1 on-policy, 2 off-policy (reuses the batch).", min=1)
    steps: int = arg(PAPER["steps"], "Sampling rounds (set by both presets). Optimiser steps = steps * mu.", min=0)
    lr: float = arg(PAPER["lr"], "Learning rate (set by both presets; the paper's 1e-6).", min=0)
    lr_schedule: list[str] = arg([], "Piecewise-constant lr as STEP:LR entries, e.g. 8000:1e-7 (paper 1B/3B).")
    adam_beta2: float = arg(0.99, "AdamW beta2 (the authors' 0.99).", min=0, max=0.999999)
    weight_decay: float = arg(0.0, "AdamW weight decay.", min=0)
    eps_low: float = arg(-1.0, "Lower clip epsilon (-1: the algorithm's paper value: 0.06 rank_grpo, 0.2 grpo, "
                               "3e-4 gspo).")
    eps_high: float = arg(-1.0, "Upper clip epsilon (-1: paper value: 0.08 / 0.26 / 4e-4).")
    beta: float = arg(1e-3, "KL coefficient (k3 to the frozen reference); 0 skips the reference model.", min=0)
    objective: str = arg("paper", "Which rules the loss and the reward follow where the authors' released trainer "
                                  "departs from the paper's equations: 'paper' (the equations) or 'authors' (their "
                                  "libs/trl/rank_grpo_trainer.py on TRL 0.21, which produced the paper's tables). "
                                  "It sets the defaults of --aggregation, --baseline-aggregation, --eos-advantage, "
                                  "--exact-length-bonus, --early-stop-unit, --overflow-ratio and --reward-matching; "
                                  "each of those given explicitly wins. docs/algorithm.md has the table.",
                         choices=["paper", "authors"])
    aggregation: str | None = arg(None, "Rank-GRPO loss aggregation: rank_mean (paper Eq. 6: every rank weighs the "
                                        "same), token_mean (ranks weighted by their tokens, one global token count) "
                                        "or micro_token_mean (the authors': TRL 0.21 'bnpo', each micro-batch's token "
                                        "mean, averaged over micro-batches). Unset: paper rank_mean, authors "
                                        "micro_token_mean.", choices=["rank_mean", "token_mean", "micro_token_mean"])
    baseline_aggregation: str | None = arg(None, "GRPO / GSPO aggregation: sequence_mean (a mean per list, TRL "
                                                 "loss_type='grpo'), token_mean or micro_token_mean (TRL 0.21's "
                                                 "default 'bnpo'). Unset: paper sequence_mean, authors "
                                                 "micro_token_mean.",
                                           choices=["sequence_mean", "token_mean", "micro_token_mean"])
    eos_advantage: str | None = arg(None, "Advantage of the <eos> token inside its line: 'line' (the line's, as "
                                          "every other token) or 'zero' (the authors zero it). Unset: paper line, "
                                          "authors zero.", choices=["line", "zero"])
    exact_length_bonus: float | None = arg(None, "Advantage added on the <eos> of a list of exactly N lines (the "
                                                 "authors' undocumented end_of_list_reward; 0 = off). Unset: paper "
                                                 "0, authors 0.1.", min=0)
    early_stop_unit: str | None = arg(None, "Where the <eos> shaping terms (--early-stop-penalty, "
                                            "--exact-length-bonus) sit: 'eos' (a unit of the <eos> token alone, "
                                            "its own ratio) or 'last_line' (added to <eos>'s advantage inside its "
                                            "line, whose ratio is the whole line's, as the authors). Unset: paper "
                                            "eos, authors last_line.", choices=["eos", "last_line"])
    overflow_ratio: str | None = arg(None, "Ratio of the lines past N: 'per_line' (each overflow line its own "
                                           "unit) or 'shared' (one ratio bin for all overflow tokens, as the "
                                           "authors). Unset: paper per_line, authors shared.",
                                     choices=["per_line", "shared"])
    reward_matching: str | None = arg(None, "Relevance rule: 'in_place' (line k is rank k; normalised titles, "
                                            "year-tolerant catalog) or 'parsed_list' (the authors' reward: k-th "
                                            "parsed item, exact (title, year) catalog rows, blank and unparseable "
                                            "lines dropped, so later rewards shift against their tokens). Unset: "
                                            "paper in_place, authors parsed_list.",
                                      choices=["in_place", "parsed_list"])
    overflow_penalty: float = arg(-0.1, "eps_o: advantage of each line past N (0 = off).", max=0)
    early_stop_penalty: float = arg(-0.1, "eps_u: advantage of an <eos> before N lines (0 = off).", max=0)
    temperature: float = arg(1.0, "Sampling temperature (paper 1.0); log-probs use the same temperature.", above=0)
    max_new_tokens: int = arg(PAPER["max_new_tokens"], "Completion token budget (set by both presets; the "
                                                       "paper's 1,024).", min=1)
    max_prompt_length: int = arg(2048, "Prompt tokens kept, cut from the left (the authors' 2,048, App. C; 0: no "
                                       "limit). Truncated prompts are counted in the log and RUN/data_report.json.",
                                 min=0)
    stop_after_lines: int = arg(0, "Stop a completion after this many complete lines (0 = only eos/budget); "
                                   "N+2 saves time on runaway lists while still showing overflow. Set by the "
                                   "sandbox preset.", min=0)
    year_tolerance: int = arg(2, "Year tolerance of the relevance match.", min=0)
    eval_every: int = arg(20, "Validation NDCG@20 (greedy) every this many steps and at the end (0: off). Set by "
                              "the sandbox preset.", min=0)
    val_examples: int = arg(64, "Validation examples for the periodic check.", min=1)
    share_prompt_prefix: bool = arg(True, "In the log-prob passes (policy and reference), run the prompt prefix "
                                          "that every row of a micro-batch shares (the paper's fixed instruction) "
                                          "once instead of once per row. The same log-probs and gradients up to "
                                          "float rounding, for fewer tokens. Not under --fsdp or "
                                          "--gradient-checkpointing (see train_sft.py).")
    save_every: int = arg(20, "Checkpoint every this many steps and at the end (0: off; final/ is always "
                              "written). Set by the sandbox preset.", min=0)
    compile: bool = arg(False, "Sample (rollouts and validation) with a static KV cache and a compiled "
                               "one-token step (CUDA graphs on a GPU); compiles once per shape bucket.")
    constrained: bool = arg(False, "Catalog-constrained decoding (rankgrpo/constraint.py): rollouts write only "
                                   "catalog lines, none twice, and the policy, old and reference log-probs are "
                                   "those of the constrained, renormalised distributions. The periodic "
                                   "validation decodes under the constraint too. Default off, as in the paper.")
    exclude_seen: bool = arg(True, "With --constrained: also forbid the catalog items whose title the user "
                                   "mentioned (their reward is 0).")
    trie_cache: str = arg("", "With --constrained: keep the catalog's token trie in this directory (default: memory).")

    def validate(self) -> None:
        self.validate_shared()
        paper_eps = {"rank_grpo": (0.06, 0.08), "grpo": (0.2, 0.26), "gspo": (3e-4, 4e-4)}[self.algo]
        for name, paper in (("eps_low", paper_eps[0]), ("eps_high", paper_eps[1])):
            value = getattr(self, name)
            if value == -1:
                setattr(self, name, paper)
            elif not 0 <= value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1) or -1 (the paper's value), "
                                  f"got {value}")
        resolve_objective(self)  # the unset settings from --objective, written into config.json
        if self.reward == "exp" and not self.gamma > 1:
            raise SystemExit("error: --reward exp needs --gamma > 1")
        if self.group_size < 2:
            raise SystemExit("error: --group-size must be at least 2 (advantages are normalised over the group)")
        if self.fsdp and self.compile:
            raise ConfigError("--compile with --fsdp: the compiled decode step has not been tried on FSDP2-sharded "
                              "models yet; use DDP (drop --fsdp) or sample eagerly (drop --compile)")
        if self.constrained and self.compile:
            raise ConfigError("--constrained does not work with --compile yet (the compiled decode applies no "
                              "constraint); drop one of them")
        try:
            parse_lr_schedule(self.lr_schedule)
        except ValueError as e:
            raise ConfigError(f"--lr-schedule: {e}") from None


def decode_log(stats: dict | None) -> dict:
    """--compile: the compiled decode's figures of this rollout for the log (graphs compiled during
    it: 1 for each new shape bucket, 0 once warm; share of the static batch spent on finished or
    padding rows)."""
    if stats is None:
        return {}
    return {"decode/graphs_compiled": stats["graphs_compiled"], "decode/idle_row_frac": stats["idle_row_frac"]}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    return run_script(TrainRankGRPOConfig, run, argv)


def run(cfg) -> int:
    check_paths(data=cfg.data, val_data=cfg.val_data, catalog=cfg.catalog)
    return run_in_world(train, cfg)


def train(cfg, world) -> int:
    if cfg.prompts_per_step % world.size:
        raise SystemExit(f"error: --prompts-per-step {cfg.prompts_per_step} does not split evenly over "
                         f"{world.size} processes (each owns whole groups)")
    catalog = load_catalog(cfg.catalog)  # data first: a bad file fails before any model loads
    examples = load_examples(cfg.data)
    val_all = load_examples(cfg.val_data)
    val_report = val_all.report
    val = val_all[: cfg.val_examples]
    cfg.device = world.device
    resume_from, generator, tokenizer, model = start_from(cfg, world)
    reference = None
    if cfg.beta != 0 and not cfg.lora_rank:  # frozen copy of the *starting* checkpoint, also after a resume
        reference = load_model(cfg.model, device=cfg.device) if resume_from else copy.deepcopy(model)
        reference.eval().requires_grad_(False)
    if any(not e.groundtruth for e in examples):
        print(f"warning: {sum(not e.groundtruth for e in examples)} example(s) without ground truth "
              "(their rewards are all 0)", file=sys.stderr)
    if world.is_main:
        save_config(cfg, cfg.out)
    eos_ids = eos_token_ids(model, tokenizer)
    prompt_ids = {}  # example id -> prompt token ids, left-truncated to --max-prompt-length
    truncated: dict[str, int] = {}  # example id -> prompt tokens cut, for the prompts tokenised so far

    def prompt_for(ex) -> list[int]:
        if ex.id not in prompt_ids:
            full = chat_prompt_ids(tokenizer, ex)
            ids = truncate_left(full, cfg.max_prompt_length) if cfg.max_prompt_length else full
            if len(ids) < len(full):
                truncated[ex.id] = len(full) - len(ids)
                if len(truncated) == 1 and world.is_main:
                    tqdm.write(f"note: prompt of example {ex.id} has {len(full)} tokens; its first "
                               f"{len(full) - len(ids)} were cut (--max-prompt-length {cfg.max_prompt_length}). "
                               "Such prompts are counted in the log (prompts_truncated) and data_report.json.")
            prompt_ids[ex.id] = ids
        return prompt_ids[ex.id]

    def write_data_report() -> None:
        atomic_write_json(f"{cfg.out}/data_report.json", {
            "max_prompt_length": cfg.max_prompt_length, "catalog": catalog.report.summary(),
            "data": {"file": cfg.data, "load": examples.report.to_json()},
            "validation": {"file": cfg.val_data, "load": val_report.to_json()},
            "prompts": {"tokenised": len(prompt_ids), "truncated": len(truncated),
                        "tokens_dropped": sum(truncated.values()), "truncated_ids": sorted(truncated)[:100]}})

    if world.is_main:
        for name, ex in (("data", examples), ("validation", val_all)):
            if ex.report.counts:
                print(f"rl data ({name}): {ex.report.summary()}", file=sys.stderr)
        write_data_report()
    trie = catalog_trie(catalog, tokenizer, cache_dir=cfg.trie_cache or None) if cfg.constrained else None

    def constraint_for(exs):
        """One exclusion set per example of `exs` (this rank's prompts, in order), or None."""
        if trie is None:
            return None
        return constraint_for_examples(trie, catalog, exs, n_items=cfg.n_items, eos_token_ids=eos_ids,
                                       exclude_seen=cfg.exclude_seen)

    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    announce_prefix_sharing(cfg, world, "rl")
    model = wrap_model(model, world, bf16=cfg.bf16)
    if reference is not None:  # replicated (DDP) or sharded (FSDP2) like the policy
        reference = wrap_model(reference, world, trainable=False, bf16=cfg.bf16)
    elif cfg.beta != 0:  # LoRA: the policy itself, which prepare_batch runs with its adapters off
        reference = unwrap(model)
    # every parameter in full fine-tuning; under LoRA only the adapters (the rest is frozen)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, betas=(0.9, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    schedule = parse_lr_schedule(cfg.lr_schedule)
    step = 0
    log_path = f"{cfg.out}/log.jsonl"
    if resume_from:
        step = resume_training(world, resume_from, model, optimizer, generator)["step"]
        print(f"resumed from {resume_from} at step {step}")
    if world.is_main:
        truncate_log(log_path, step)  # a fresh run starts a fresh log; a resumed one drops rows it will redo
    # rank 0's log.jsonl, and the same rows to --report-to's tracker
    log = MetricLog(log_path, open_tracker(cfg.report_to, cfg.out, config_to_dict(cfg), world))
    autocast = (lambda: torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)) \
        if cfg.bf16 else contextlib.nullcontext
    guard = NonFiniteGuard(cfg.max_nonfinite)

    def validate_now():  # each rank generates for its share of the prompts; the figures are global; rank 0 logs
        with inference_model(model) as m:
            row = {"step": step, **validate_generation(m, tokenizer, val, catalog, max_new_tokens=cfg.max_new_tokens,
                                                        n_items=cfg.n_items, compile=cfg.compile,
                                                        constraint_for=constraint_for if cfg.constrained else None,
                                                        world=world)}
        if not world.is_main:
            return
        log.append(row)
        tqdm.write(f"step {step}: val NDCG@20 {row['val_ndcg@20']:.4f} R@20 {row['val_recall@20']:.4f} "
                   f"in-catalog {row['val_in_catalog']:.3f}")

    if step == 0 and cfg.eval_every and not resume_from:
        validate_now()
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.algo, dynamic_ncols=True, disable=not world.is_main)
    while step < cfg.steps:
        t_start = time.perf_counter()
        step_indices = indices_for_step(step, len(examples), cfg.prompts_per_step, cfg.seed)
        # every rank tokenises the whole step (cheap), so prompts_truncated counts the same on all
        global_prompts = [prompt_for(examples[i]) for i in step_indices]
        positions = world.shard(range(cfg.prompts_per_step), "prompts")  # this rank's whole groups
        step_examples = [examples[step_indices[j]] for j in positions]
        prompts = [global_prompts[j] for j in positions]

        # 1. rollout: prompt j of the step draws with a key of (seed, step, j) alone, so
        # its group is the same on any rank of any world size; under --constrained one exclusion
        # set per prompt of this rank (rollout.prompt_index is local, so are the sets)
        model.eval()
        constraint = constraint_for(step_examples)
        with inference_model(model) as policy:
            rollout = sample(policy, prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, eos_token_ids=eos_ids,
                             pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                             generator=prompt_keys(cfg.seed, step, positions, cfg.device),
                             stop_after_items=cfg.stop_after_lines or None, compile=cfg.compile,
                             constraint=constraint)
        sync(torch.device(cfg.device))
        t_sample = time.perf_counter()
        # 2-4. score, advantages, segmentation, reference log-probs (under the rollout's constraint)
        batch = prepare_batch(rollout, step_examples, tokenizer, catalog, cfg, reference=reference, autocast=autocast,
                              world=world, constraint=constraint)
        listing = rollout_metrics(batch, cfg.group_size, cfg.n_items, world)

        # 5. mu optimiser steps on this batch
        model.train()
        t_update = time.perf_counter()  # time/update is cumulative over the round's mu passes
        for it in range(cfg.mu):
            for g in optimizer.param_groups:
                g["lr"] = step_schedule(step * cfg.mu + it, cfg.lr, schedule)
            m = update_pass(model, optimizer, batch, cfg, guard=guard, step=step, autocast=autocast, world=world)
            t_end = time.perf_counter()
            row = {"step": step + 1, "iteration": it, "loss": m.pop("loss"), "grad_norm": m.pop("grad_norm"),
                   "lr": optimizer.param_groups[0]["lr"], **listing, **m,
                   "time/sample": t_sample - t_start, **batch.times, "time/update": t_end - t_update,
                   "samples_per_s": rollout.num_rows / (t_end - t_start), "prompts_truncated": len(truncated),
                   **decode_log(rollout.decode_stats)}
            row = world.mean_metrics(row, sums=("samples_per_s",))  # global means; samples/s summed
            if world.is_main:
                log.append(row)
        step += 1
        bar.update(1)
        bar.set_postfix(r1=f"{row['reward/rank_1']:.2f}", dcg=f"{row['reward/dcg']:.3f}",
                        kl=f"{row.get('kl', 0.0):.4f}")
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            validate_now()
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
            save_training_checkpoint(world, cfg.out, step, model, tokenizer, optimizer, generator, {},
                                     keep_last=cfg.keep_checkpoints)
    bar.close()
    if world.is_main:
        write_data_report()
        print(f"rl prompts: {len(truncated)} of {len(prompt_ids)} tokenised prompts cut from the left to "
              f"--max-prompt-length {cfg.max_prompt_length} ({sum(truncated.values())} tokens); "
              f"{cfg.out}/data_report.json")
    save_final_weights(world, cfg.out, model, tokenizer)
    log.close()
    if world.is_main:
        print(f"final weights: {cfg.out}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
