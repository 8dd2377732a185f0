"""TRL's GRPOTrainer on the work of one bench_rl_speed.py run; run by that script inside the
separate TRL virtualenv (TRL is never a dependency of this project).

Trains ``--model`` for one warm-up optimiser step plus ``--steps`` timed ones. Each step is
``--prompts-per-step`` prompts x G completions (``per_device_train_batch_size`` counts
completions in TRL, and with ``gradient_accumulation_steps = 1`` one generation batch is one
optimiser step), sampled with ``model.generate`` at temperature 1 up to ``--max-new-tokens``,
scored by the list DCG@20 of this package's parse and relevance. The prompts are the chat
messages of the examples in train_rankgrpo.py's order (``indices_for_step``, dataset shuffle
off); TRL renders them with the same chat template call, so the prompt tokens are the same
(checked below). A callback times each optimiser step from ``on_step_begin`` to
``on_step_end`` (generation, rewards, reference and policy forward, backward, optimiser).

Prints one line ``TRL_RESULT {json}`` with completions per second, the mean completion
length, the seconds per step and the versions.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rankgrpo.catalog import load_catalog
from rankgrpo.config import arg, parse_config
from rankgrpo.data import chat_prompt_ids, load_examples
from rankgrpo.models import load_model, load_tokenizer
from rankgrpo.parsing import parse_recommendations
from rankgrpo.rewards import rank_relevance, sequence_dcg
from rankgrpo.segment import decode_completion
from rankgrpo.trainer import indices_for_step

RESULT_PREFIX = "TRL_RESULT "


@dataclass
class TRLChildConfig:
    """TRL GRPOTrainer on the same prompts, G, completion budget and reward as train_rankgrpo.py."""

    model: str = arg("runs/sft/final", "Starting policy (an SFT checkpoint directory); also the reference.")
    world: str = arg("sandbox_world", "World directory with train.jsonl and catalog.jsonl.")
    out: str = arg("runs/trl_speed", "TRL output directory (nothing is saved there but its logs).")
    steps: int = arg(6, "Timed optimiser steps (one more runs first as a warm-up).")
    prompts_per_step: int = arg(8, "Prompts per optimiser step.")
    group_size: int = arg(8, "G = num_generations.")
    max_new_tokens: int = arg(220, "max_completion_length.")
    beta: float = arg(1e-3, "KL coefficient (non-zero: TRL keeps a reference model).")
    lr: float = arg(3e-5, "Learning rate.")
    threads: int = arg(1, "torch CPU threads.")
    seed: int = arg(3407, "Seed (also of the prompt order).")
    n_items: int = arg(20, "List length N of the DCG reward.")
    year_tolerance: int = arg(2, "Year tolerance of the relevance match.")


class StepTimer(TrainerCallback):
    """Wall-clock seconds, completions, completion tokens and example indices of each optimiser step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.completions = 0
        self.tokens = 0
        self.examples: set[int] = set()
        self._start = 0.0

    def count(self, completion_ids, example_indices) -> None:
        self.completions += len(completion_ids)
        self.tokens += sum(len(ids) for ids in completion_ids)
        self.examples.update(example_indices)

    def on_step_begin(self, args, state, control, **kwargs):
        self.completions = self.tokens = 0
        self.examples = set()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append({"seconds": time.perf_counter() - self._start, "completions": self.completions,
                           "tokens": self.tokens, "examples": sorted(self.examples)})


def ordered_dataset(cfg: TRLChildConfig, examples) -> Dataset:
    """One row per prompt, in train_rankgrpo.py's order for steps 0 .. steps (warm-up included)."""
    rows = []
    for step in range(cfg.steps + 1):
        for i in indices_for_step(step, len(examples), cfg.prompts_per_step, cfg.seed):
            rows.append({"prompt": examples[i].messages, "example": i})
    return Dataset.from_list(rows)


def same_prompt_tokens(tokenizer, examples, dataset: Dataset) -> bool:
    """TRL's rendering of conversational prompts (one batched apply_chat_template) vs ours."""
    rows = dataset.select(range(min(len(dataset), 8)))
    theirs = tokenizer.apply_chat_template(conversation=list(rows["prompt"]), add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    ours = [chat_prompt_ids(tokenizer, examples[i]) for i in rows["example"]]
    return [list(t) for t in theirs] == ours


def same_prompt_order(cfg: TRLChildConfig, n_examples: int, steps: list[dict]) -> bool:
    """Whether each TRL step trained on the prompts of the same train_rankgrpo.py step."""
    return all(s["examples"] == sorted(indices_for_step(step, n_examples, cfg.prompts_per_step, cfg.seed))
               for step, s in enumerate(steps))


def dcg_reward(cfg: TRLChildConfig, examples, catalog, tokenizer, timer: StepTimer):
    """The list DCG@N reward, from the completion tokens decoded and parsed as train_rankgrpo.py does."""

    def dcg_at_n(prompts, completions, completion_ids, example, **kwargs) -> list[float]:
        timer.count(completion_ids, example)
        rewards = []
        for ids, i in zip(completion_ids, example):
            items = parse_recommendations(decode_completion(ids, tokenizer))
            ex = examples[i]
            rel = rank_relevance(items, ex.groundtruth, ex.seen_titles, catalog, n_items=cfg.n_items,
                                 year_tolerance=cfg.year_tolerance)
            rewards.append(float(sequence_dcg(rel)))
        return rewards

    return dcg_at_n


def grpo_config(cfg: TRLChildConfig) -> GRPOConfig:
    completions = cfg.prompts_per_step * cfg.group_size
    return GRPOConfig(
        output_dir=cfg.out, max_steps=cfg.steps + 1, seed=cfg.seed, report_to="none",
        per_device_train_batch_size=completions,  # counts completions: one step = P prompts x G
        gradient_accumulation_steps=1, num_generations=cfg.group_size, shuffle_dataset=False,
        max_completion_length=cfg.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=cfg.beta, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,  # train_rankgrpo.py's optimiser
        use_vllm=False, use_cpu=True, bf16=False, fp16=False,
        logging_steps=1, save_strategy="no", log_completions=False, dataloader_num_workers=0, disable_tqdm=True,
    )


def main(argv=None) -> int:
    cfg = parse_config(TRLChildConfig, argv)
    torch.set_num_threads(cfg.threads)
    world = Path(cfg.world)
    examples = load_examples(world / "train.jsonl")
    catalog = load_catalog(world / "catalog.jsonl")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    dataset = ordered_dataset(cfg, examples)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=dcg_reward(cfg, examples, catalog, tokenizer, timer),
                          args=grpo_config(cfg), train_dataset=dataset, processing_class=tokenizer,
                          callbacks=[timer])
    trainer.train()

    timed = timer.steps[1:]
    seconds = sum(s["seconds"] for s in timed)
    completions = sum(s["completions"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    result = {
        "steps_timed": len(timed), "seconds_per_step": seconds / len(timed),
        "completions_per_step": completions / len(timed),
        "samples_per_s": completions / seconds, "tokens_per_s": tokens / seconds,
        "mean_completion_tokens": tokens / completions, "per_step": timer.steps,
        "same_prompt_tokens": same_prompt_tokens(tokenizer, examples, dataset),
        "same_prompt_order": same_prompt_order(cfg, len(examples), timer.steps),
        "threads": torch.get_num_threads(), "torch": metadata.version("torch"),
        "transformers": metadata.version("transformers"), "trl": metadata.version("trl"),
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
