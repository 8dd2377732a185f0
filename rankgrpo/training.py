"""Pieces both trainers share: tokenising SFT pairs, learning-rate schedules, greedy validation,
the non-finite-loss guard, and the checks that run before any work starts."""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from rankgrpo.catalog import Catalog
from rankgrpo.config import arg
from rankgrpo.data import Example, chat_prompt_ids
from rankgrpo.evaluation import score_examples
from rankgrpo.sampling import sample
from rankgrpo.segment import decode_completion


# ----------------------------------------------------------------------------- config and data order


@dataclass
class TrainerConfig:
    """Fields both trainers share (each script's config inherits them)."""

    preset: str = arg("sandbox", "Defaults of the fields left at 0: 'paper' (hub models) or 'sandbox' (the tiny "
                                 "sandbox model).", choices=["paper", "sandbox"])
    max_grad_norm: float = arg(1.0, "Gradient clipping norm.")
    bf16: bool = arg(False, "bfloat16 autocast (GPU).")
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass to save memory.")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "Device.")
    seed: int = arg(3407, "Seed of every RNG (the paper's).")
    keep_checkpoints: int = arg(2, "Checkpoints kept on disk.")
    resume: bool = arg(False, "Continue from the newest checkpoint in --out.")
    max_nonfinite: int = arg(5, "Abort after this many non-finite losses in a row.")

    def apply_preset(self, presets: dict[str, dict]) -> None:
        """Fill every field still at 0 from ``presets[self.preset]`` (the resolved values are what
        ``save_config`` writes)."""
        names = {f.name for f in fields(self)}
        for name, value in presets[self.preset].items():
            if name not in names:
                raise KeyError(f"preset {self.preset!r} sets unknown field {name!r}")
            if not getattr(self, name):
                setattr(self, name, value)


def indices_for_step(step: int, n: int, per_step: int, seed: int) -> list[int]:
    """Example indices used at step ``step``: a fresh permutation per epoch drawn from (seed, epoch)
    alone, so the data position is a function of the step and a resumed run sees the same data.

    >>> sorted(indices_for_step(0, 6, 3, seed=1) + indices_for_step(1, 6, 3, seed=1))   # one epoch
    [0, 1, 2, 3, 4, 5]
    """
    per_epoch = max(1, n // per_step)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[i * per_step:(i + 1) * per_step].tolist()


# ----------------------------------------------------------------------------- SFT tokenisation


@dataclass
class SFTSample:
    """input_ids: [L] prompt + completion tokens; labels_mask: [L] True where the token is a target."""

    input_ids: list[int]
    labels_mask: list[bool]


def tokenize_sft(tokenizer, example: Example, max_length: int) -> SFTSample:
    """Render prompt + assistant completion with the chat template; the loss covers the assistant turn.

    The mask comes from the template's ``{% generation %}`` markers
    (``return_assistant_tokens_mask``). A template without them (many hub models) falls back
    to the prefix rule: everything after the rendered prompt with the generation header
    is a target (the completion and the turn's end token). Right truncation to ``max_length``.
    """
    if example.completion is None:
        raise ValueError(f"example {example.id}: no completion to learn from")
    messages = example.messages + [{"role": "assistant", "content": example.completion}]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    mask = [bool(m) for m in out.get("assistant_masks", [])]
    if not any(mask):
        prompt = chat_prompt_ids(tokenizer, example.messages)
        if ids[: len(prompt)] != prompt:
            raise ValueError(f"example {example.id}: the chat template renders the prompt differently with "
                             "and without the answer; cannot locate the completion tokens")
        mask = [i >= len(prompt) for i in range(len(ids))]
    return SFTSample(ids[:max_length], mask[:max_length])


def collate_right_padded(samples: Sequence[SFTSample], pad_token_id: int):
    """-> input_ids [B, L], attention_mask [B, L] (from lengths), labels_mask [B, L]."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        labels[i, :n] = torch.tensor(s.labels_mask)
    return ids, attn, labels


# ----------------------------------------------------------------------------- schedules


def cosine_with_warmup(step: int, total_steps: int, warmup_ratio: float) -> float:
    """Multiplier of the base lr: linear warm-up over ceil(warmup_ratio * total) steps, then cosine to 0.

    >>> [round(cosine_with_warmup(s, 10, 0.2), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_schedule(step: int, base_lr: float, schedule: Sequence[tuple[int, float]]) -> float:
    """The paper's piecewise-constant lr: ``base_lr`` until the first boundary, then each (step, lr).

    >>> step_schedule(8500, 1e-6, [(8000, 1e-7)])
    1e-07
    """
    lr = base_lr
    for boundary, value in sorted(schedule):
        if step >= boundary:
            lr = value
    return lr


def parse_lr_schedule(spec: Sequence[str]) -> list[tuple[int, float]]:
    """["8000:1e-7", "12000:5e-8"] -> [(8000, 1e-7), (12000, 5e-8)]."""
    out = []
    for item in spec:
        try:
            step, lr = item.split(":")
            out.append((int(step), float(lr)))
        except ValueError:
            raise ValueError(f"lr schedule entry {item!r} is not STEP:LR") from None
    return sorted(out)


# ----------------------------------------------------------------------------- guards


class NonFiniteGuard:
    """Skip a step whose loss is not finite; abort after ``max_in_a_row`` consecutive skips."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def ok(self, loss: torch.Tensor, step: int) -> bool:
        if torch.isfinite(loss).all():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        warnings.warn(f"step {step}: non-finite loss ({loss.item()}); step skipped "
                      f"({self.in_a_row} in a row, {self.total} in total)")
        if self.in_a_row >= self.max_in_a_row:
            raise RuntimeError(f"step {step}: {self.in_a_row} non-finite losses in a row; aborting "
                               "(lower the learning rate or check the data)")
        return False


def check_paths(**paths: str) -> None:
    """Fail before any work if an input path is missing."""
    for name, p in paths.items():
        if p and not Path(p).exists():
            raise SystemExit(f"error: --{name.replace('_', '-')} {p}: no such file or directory")


def check_tokenizer_matches(model, tokenizer, where: str) -> None:
    """A checkpoint saved with another tokenizer has a different embedding size or special ids."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise SystemExit(f"error: {where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"{n_emb} rows; the checkpoint was trained with a different tokenizer")


# ----------------------------------------------------------------------------- run start


def run_script(config_cls, run, argv=None) -> int:
    """Parse the script's config and run it; bad data or catalog files end with one clear line, exit 2."""
    from rankgrpo.catalog import CatalogError
    from rankgrpo.config import parse_config
    from rankgrpo.data import DataError

    try:
        return run(parse_config(config_cls, argv))
    except (DataError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def start_from(cfg):
    """Seed everything and load the policy to train: the newest checkpoint of ``cfg.out`` with
    ``--resume``, else ``cfg.model``. Returns (resume_from or None, sampler generator, tokenizer, model)."""
    from rankgrpo.checkpoint import latest_checkpoint, seed_everything
    from rankgrpo.models import load_model, load_tokenizer

    resume_from = latest_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no checkpoint in {cfg.out}; starting from {cfg.model}", file=sys.stderr)
    source = str(resume_from or cfg.model)
    generator = seed_everything(cfg.seed)
    tokenizer = load_tokenizer(source)
    model = load_model(source, device=cfg.device)
    check_tokenizer_matches(model, tokenizer, source)
    return resume_from, generator, tokenizer, model


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def greedy_completions(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int,
                       batch_size: int = 32, n_items: int | None = None, progress: bool = False,
                       constraint=None) -> list[str]:
    """Greedy lists, generated once per unique prompt and shared by examples with that prompt.

    A row stops at its eos, after ``n_items`` complete lines, or at ``max_new_tokens``.
    ``constraint``: a ``rankgrpo.constraint.CatalogConstraint`` whose exclusion sets (if any)
    are one per example (``constraint_for_examples``): decoding is then catalog-constrained."""
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    unique: dict[str, list[int]] = {}
    first_example: dict[str, int] = {}  # an example of each prompt (same prompt, same seen titles)
    for i, ex in enumerate(examples):
        unique.setdefault(ex.prompt_text, chat_prompt_ids(tokenizer, ex))
        first_example.setdefault(ex.prompt_text, i)
    keys = list(unique)
    texts: dict[str, str] = {}
    for i in tqdm(range(0, len(keys), batch_size), desc="generate", disable=not progress, dynamic_ncols=True):
        chunk = keys[i:i + batch_size]
        ro = sample(model, [unique[k] for k in chunk], group_size=1, max_new_tokens=max_new_tokens, greedy=True,
                    eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                    stop_after_items=n_items,
                    constraint=None if constraint is None else constraint.for_rows([first_example[k] for k in chunk]))
        for k, row, n in zip(chunk, ro.completion_ids, ro.lengths.tolist()):
            texts[k] = decode_completion(row[:n].tolist(), tokenizer)
    if was_training:
        model.train()
    return [texts[ex.prompt_text] for ex in examples]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the model's generation-config eos ids."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = model.generation_config.eos_token_id
    ids.update(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


def validate_generation(model, tokenizer, examples: Sequence[Example], catalog: Catalog, *, max_new_tokens: int,
                        n_items: int = 20, batch_size: int = 32, constraint=None) -> dict:
    """Greedy Recall/NDCG@{5,10,20}, in-catalog and format-valid ratios on ``examples`` (means only);
    catalog-constrained with ``constraint`` (see ``greedy_completions``)."""
    completions = greedy_completions(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, n_items=n_items, constraint=constraint)
    agg, _ = score_examples(examples, completions, catalog, ks=(5, 10, 20), n_items=n_items)
    return {f"val_{k}": v["mean"] for k, v in agg.items() if isinstance(v, dict)}
