"""Stage 1, behaviour cloning (Eq. 2): completion-only NLL on Remap-Reflect-Adjust demonstrations.

    python train_sft.py                                   # the sandbox preset (make demo's SFT)
    python train_sft.py --model Qwen/Qwen2.5-0.5B-Instruct --preset paper --bf16 \\
        --train-data demos/train.jsonl --val-data demos/validation.jsonl --catalog catalog.jsonl --out runs/sft
    python train_sft.py --out runs/sft --resume           # continue exactly where a run stopped
    python train_sft.py --lora-rank 16                    # LoRA: final/ merged weights, final/adapter/ (PEFT)
    torchrun --nproc-per-node 4 train_sft.py ... [--fsdp]   # data parallel: each GPU takes 1/4 of every batch

Writes RUN/config.json, RUN/log.jsonl, RUN/checkpoints/step-*/ (HF weights + optimizer,
scheduler, RNG and step), RUN/final/ (HF format, what the next stage loads) and
RUN/data_report.json (rows whose prompt was cut from the left to fit --max-length, rows
skipped because their completion alone does not fit, flagged values found while loading).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

from rankgrpo.catalog import load_catalog
from rankgrpo.checkpoint import truncate_log
from rankgrpo.config import arg, config_to_dict, save_config
from rankgrpo.data import load_examples
from rankgrpo.distributed import (World, clip_grad_norm, grad_sync, inference_model, resume_training, run_in_world,
                                  save_final_weights, save_training_checkpoint, wrap_model)
from rankgrpo.io import atomic_write_json
from rankgrpo.lora import trainable_parameters
from rankgrpo.losses import sft_loss
from rankgrpo.sandbox import settings
from rankgrpo.schedules import cosine_with_warmup
from rankgrpo.sft_data import collate_sft, sft_logits, tokenize_sft_split
from rankgrpo.tracking import MetricLog, open_tracker
from rankgrpo.trainer import (NonFiniteGuard, TrainerConfig, announce_prefix_sharing, check_paths,
                              enable_gradient_checkpointing, indices_for_step, run_script, share_prompt_prefix,
                              start_from)
from rankgrpo.validation import validate_generation

# The paper's App. C(iii), for hub models: lr 5e-5, cosine, 5% warm-up, effective batch 384 (12 x 32).
PAPER = dict(lr=5e-5, micro_batch_size=12, grad_accum=32, epochs=6)
# --preset: the paper's, or the sandbox's (what make demo runs; rankgrpo/sandbox/settings.py)
PRESETS = {"paper": PAPER, "sandbox": settings.SFT}


@dataclass
class TrainSFTConfig(TrainerConfig):
    """Behaviour cloning on demonstrations (completion-only NLL, Eq. 2)."""

    PRESETS: ClassVar[dict] = PRESETS

    model: str = arg("sandbox_world/base_model", "Base model: a local directory or a hub name.")
    train_data: str = arg("runs/demos/train.jsonl", "SFT demonstrations (examples with 'completion').")
    val_data: str = arg("runs/demos/validation.jsonl", "Validation demonstrations (loss and greedy metrics).")
    catalog: str = arg("sandbox_world/catalog.jsonl", "Catalog for the validation metrics.")
    out: str = arg("runs/sft", "Run directory.")
    lr: float = arg(PAPER["lr"], "Peak learning rate (set by both presets; the paper's 5e-5).", min=0)
    warmup_ratio: float = arg(0.05, "Linear warm-up share of the steps, then cosine decay to 0 (paper 5%).",
                              min=0, max=1)
    weight_decay: float = arg(0.0, "AdamW weight decay.", min=0)
    micro_batch_size: int = arg(PAPER["micro_batch_size"], "Sequences per forward pass (set by both presets).",
                                min=1)
    grad_accum: int = arg(PAPER["grad_accum"], "Micro-batches per optimiser step (set by both presets). The global "
                                               "batch is micro_batch_size x grad_accum sequences whatever the number "
                                               "of processes; under torchrun each process takes an equal share of "
                                               "it.", min=1)
    epochs: int = arg(PAPER["epochs"], "Passes over the training demonstrations (set by both presets), unless "
                                       "--max-steps is given.", min=1)
    max_steps: int = arg(0, "Stop after this many optimiser steps (0: epochs decide). Set by the sandbox preset.",
                         min=0)
    max_length: int = arg(1024, "Tokens per prompt + completion (0: no limit). A longer row loses prompt tokens "
                                "from the left, never completion tokens; a row whose completion alone does not "
                                "fit is skipped. Both are counted in RUN/data_report.json.", min=0)
    log_every: int = arg(10, "Log the training loss every this many steps (0: off).", min=0)
    eval_every: int = arg(100, "Validation loss and greedy metrics every this many steps and at the end "
                               "(0: off). Set by the sandbox preset.", min=0)
    val_gen_examples: int = arg(64, "Validation examples for the greedy Recall/NDCG@20 check (0: off).", min=0)
    max_new_tokens: int = arg(200, "Greedy generation budget for validation. Set by the sandbox preset.", min=1)
    n_items: int = arg(20, "List length N.", min=1)
    share_prompt_prefix: bool = arg(True, "Run the prompt prefix that every row of a micro-batch shares (the paper's "
                                          "fixed instruction) once per micro-batch instead of once per row, and the "
                                          "output head on the completion columns only. The same loss and gradients "
                                          "up to float rounding, for fewer tokens (sandbox: 1.34x faster per step, "
                                          "benchmarks/bench_sft_step.py). "
                                          "Not under --fsdp, where every row runs its whole prompt: FSDP2 gathers a "
                                          "layer's weights for the backward pass through the layer's outputs, and "
                                          "the gradient through the prefix's key/value cache bypasses them, nor "
                                          "under --gradient-checkpointing, which drops the key/value cache.")
    save_every: int = arg(100, "Checkpoint every this many steps and at the end (0: off; final/ is always "
                               "written). Set by the sandbox preset.", min=0)

    def validate(self) -> None:
        self.validate_shared()


@torch.no_grad()
def validation_loss(model, samples, pad_id, device, batch_size, autocast, share_prefix, world: World) -> float:
    """Token-mean SFT loss (Eq. 2) over ``samples``; under torchrun rank r scores samples r, r + W, ...
    and the sums are all-reduced, so every rank returns the global figure."""
    model.eval()
    mine = samples[world.rank::world.size]
    total = count = 0.0
    for i in range(0, len(mine), batch_size):
        batch = collate_sft(mine[i:i + batch_size], pad_id, share_prefix).to(device)
        with autocast():
            logits = sft_logits(model, batch)
        loss, m = sft_loss(logits, batch.window_labels(), batch.window_ids())
        total += loss.item() * m["n_tokens"]
        count += m["n_tokens"]
    model.train()
    total, count = world.all_reduce_sum(total), world.all_reduce_sum(count)
    return total / max(count, 1)


def main(argv=None) -> int:
    return run_script(TrainSFTConfig, run, argv)


def run(cfg) -> int:
    check_paths(train_data=cfg.train_data, val_data=cfg.val_data, catalog=cfg.catalog)
    return run_in_world(train, cfg)


def train(cfg, world) -> int:
    cfg.device = world.device
    catalog = load_catalog(cfg.catalog)  # data first: a bad file fails before any model loads
    train = load_examples(cfg.train_data)
    val = load_examples(cfg.val_data)
    missing = [e.id for e in train if e.completion is None]
    if missing:
        raise SystemExit(f"error: {cfg.train_data}: {len(missing)} example(s) without 'completion', e.g. {missing[0]}")
    resume_from, generator, tokenizer, model = start_from(cfg, world)
    train_samples, train_report = tokenize_sft_split(tokenizer, train, cfg.max_length)
    val_samples, val_report = tokenize_sft_split(tokenizer, [e for e in val if e.completion is not None],
                                                 cfg.max_length)
    report = {"max_length": cfg.max_length, "catalog": catalog.report.summary(),
              "train": {"file": cfg.train_data, "load": train.report.to_json(), "tokenize": train_report},
              "validation": {"file": cfg.val_data, "load": val.report.to_json(), "tokenize": val_report}}
    if world.is_main:  # every process tokenizes the same rows; rank 0 writes and reports
        save_config(cfg, cfg.out)
        atomic_write_json(f"{cfg.out}/data_report.json", report)
        for split, r in (("train", train_report), ("validation", val_report)):
            print(f"sft data ({split}): {r['kept']} of {r['rows']} rows kept; {r['prompt_truncated']} with the "
                  f"prompt cut from the left ({r['prompt_tokens_dropped']} tokens), "
                  f"{r['skipped_completion_too_long']} skipped (completion longer than --max-length {cfg.max_length})")
        for split, ex in (("train", train), ("validation", val)):
            if ex.report.counts:
                print(f"sft data ({split}): {ex.report.summary()}")
        print(f"sft data: details in {cfg.out}/data_report.json")

    window = cfg.micro_batch_size * cfg.grad_accum
    share_prefix = share_prompt_prefix(cfg, world)
    announce_prefix_sharing(cfg, world, "sft")
    if len(train_samples) < window:
        raise SystemExit(f"error: {len(train_samples)} demonstrations, fewer than one batch of {window}")
    if window % world.size:
        raise SystemExit(f"error: the global batch (--micro-batch-size x --grad-accum = {window}) does not split "
                         f"evenly over {world.size} processes")
    total_steps = cfg.max_steps or cfg.epochs * (len(train_samples) // window)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    model = wrap_model(model, world, bf16=cfg.bf16)
    # every parameter in full fine-tuning; under LoRA only the adapters (the rest is frozen)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, total_steps, cfg.warmup_ratio))
    step = 0
    log_path = f"{cfg.out}/log.jsonl"
    if resume_from:
        state = resume_training(world, resume_from, model, optimizer, generator)
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        print(f"resumed from {resume_from} at step {step}")
    if world.is_main:
        truncate_log(log_path, step)  # a fresh run starts a fresh log; a resumed one drops rows it will redo
    # rank 0's log.jsonl, and the same rows to --report-to's tracker
    log = MetricLog(log_path, open_tracker(cfg.report_to, cfg.out, config_to_dict(cfg), world))
    autocast = (lambda: torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)) \
        if cfg.bf16 else contextlib.nullcontext
    guard = NonFiniteGuard(cfg.max_nonfinite)
    pad_id = tokenizer.pad_token_id

    def checkpoint():
        save_training_checkpoint(world, cfg.out, step, model, tokenizer, optimizer, generator,
                                 {"scheduler": scheduler.state_dict()}, keep_last=cfg.keep_checkpoints)

    def evaluate_now():  # each rank scores its share of the validation set; the figures are global; rank 0 logs
        with inference_model(model) as m:
            row = {"step": step, "val_loss": validation_loss(m, val_samples, pad_id, cfg.device,
                                                             cfg.micro_batch_size, autocast, share_prefix, world)}
            if cfg.val_gen_examples > 0:
                row.update(validate_generation(m, tokenizer, val[:cfg.val_gen_examples], catalog,
                                               max_new_tokens=cfg.max_new_tokens, n_items=cfg.n_items, world=world))
        if not world.is_main:
            return
        log.append(row)
        tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    bar = tqdm(total=total_steps, initial=step, desc="sft", dynamic_ncols=True, disable=not world.is_main)
    while step < total_steps:
        t0 = time.perf_counter()
        idx = indices_for_step(step, len(train_samples), window, cfg.seed)
        # a token mean over the whole global batch (all ranks, all micro-batches), not a mean of means
        window_tokens = sum(sum(train_samples[i].labels_mask[1:]) for i in idx)
        mine = world.shard(idx, "sequences")  # this rank's contiguous share (all of it in one process)
        micro = [[train_samples[i] for i in mine[j:j + cfg.micro_batch_size]]
                 for j in range(0, len(mine), cfg.micro_batch_size)]
        optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros(())
        for j, mb in enumerate(micro):
            batch = collate_sft(mb, pad_id, share_prefix).to(cfg.device)
            with grad_sync(model, j == len(micro) - 1):  # gradients summed over ranks once, at the end
                with autocast():
                    logits = sft_logits(model, batch)
                loss, _ = sft_loss(logits, batch.window_labels(), batch.window_ids(), denom=window_tokens)
                loss.backward()
            total_loss += loss.detach().float().cpu()
        total_loss = world.all_reduce_sum(total_loss).cpu()
        if guard.ok(total_loss, step):
            grad_norm = clip_grad_norm(model, cfg.max_grad_norm)
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            grad_norm = torch.tensor(float("nan"))
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss.item():.3f}")
        if world.is_main and cfg.log_every and (step % cfg.log_every == 0 or step == total_steps):
            log.append({"step": step, "loss": total_loss.item(), "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm), "tokens": window_tokens,
                        "seconds": time.perf_counter() - t0})
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
            evaluate_now()
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            checkpoint()
    bar.close()
    if cfg.eval_every:
        evaluate_now()
    save_final_weights(world, cfg.out, model, tokenizer)
    log.close()
    if world.is_main:
        print(f"final weights: {cfg.out}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
