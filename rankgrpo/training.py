"""Pieces both trainers share: tokenising SFT pairs, learning-rate schedules, greedy validation,
the non-finite-loss guard, and the checks that run before any work starts."""
from __future__ import annotations

import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from rankgrpo.catalog import Catalog
from rankgrpo.config import ConfigError, arg, flag_name, run_cli
from rankgrpo.data import Example, chat_prompt_ids
from rankgrpo.evaluation import score_examples
from rankgrpo.sampling import cache_argument, sample, shared_prefix_cache, supports_logits_to_keep
from rankgrpo.segment import decode_completion
from rankgrpo.stopping import ItemLineCounter


# ----------------------------------------------------------------------------- config and data order


@dataclass
class TrainerConfig:
    """Fields both trainers share (each script's config inherits them)."""

    preset: str = arg("sandbox", "Defaults of the fields left at 0: 'paper' (hub models) or 'sandbox' (the tiny "
                                 "sandbox model).", choices=["paper", "sandbox"])
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0: no clipping).", min=0)
    bf16: bool = arg(False, "bfloat16 autocast (GPU).")
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass to save memory.")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "Device.")
    seed: int = arg(3407, "Seed of every RNG (the paper's).", min=0)
    keep_checkpoints: int = arg(2, "Checkpoints kept on disk (0: all).", min=0)
    resume: bool = arg(False, "Continue from the newest checkpoint in --out.")
    max_nonfinite: int = arg(5, "Abort after this many non-finite losses in a row.", min=1)
    chat_template: str = arg("", "Chat template for a tokenizer that has none (or to replace its own): a built-in "
                                 "name ('chatml') or a Jinja file. Saved with the checkpoints.")
    fsdp: bool = arg(False, "Under torchrun: shard parameters, gradients and optimizer state over the processes "
                            "(FSDP2) instead of replicating the model on each (DDP).")

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
    """input_ids: [L] prompt + completion tokens; labels_mask: [L] True where the token is a target;
    prompt_tokens_dropped: prompt tokens cut from the left to fit ``max_length``."""

    input_ids: list[int]
    labels_mask: list[bool]
    prompt_tokens_dropped: int = 0


class CompletionTooLong(ValueError):
    """The completion alone (targets and end-of-turn) does not fit the length budget."""


def tokenize_sft(tokenizer, example: Example, max_length: int = 0) -> SFTSample:
    """Render prompt + assistant completion with the chat template; the loss covers the assistant turn.

    The mask comes from the template's ``{% generation %}`` markers
    (``return_assistant_tokens_mask``). A template without them (many hub models) falls back
    to the prefix rule: everything after the rendered prompt with the generation header
    is a target (the completion and the turn's end token).

    Length: with ``max_length`` > 0 the *prompt* is cut from the left (``truncate_sft_left``),
    never the completion, so every row keeps all its targets and its end-of-turn token. A row
    whose completion part alone needs more than ``max_length - 1`` tokens raises
    ``CompletionTooLong`` (the caller counts and skips it).
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
    sample = SFTSample(ids, mask)
    return truncate_sft_left(sample, max_length, example.id) if max_length else sample


def truncate_sft_left(sample: SFTSample, max_length: int, name: str = "") -> SFTSample:
    """Cut prompt tokens from the left until ``sample`` has ``max_length`` tokens.

    The completion part starts at the first target token and runs to the end (targets, the
    end-of-turn token and whatever the template writes after it). At least one prompt token
    is kept, since the first target is predicted from the token before it.

    >>> s = SFTSample([1, 2, 3, 4, 5, 6], [False, False, False, False, True, True])
    >>> truncate_sft_left(s, 4)
    SFTSample(input_ids=[3, 4, 5, 6], labels_mask=[False, False, True, True], prompt_tokens_dropped=2)
    >>> truncate_sft_left(s, 2, "x7")
    Traceback (most recent call last):
    ...
    rankgrpo.training.CompletionTooLong: example x7: the completion needs 2 tokens + 1 of prompt, more than --max-length 2
    """
    n = len(sample.input_ids)
    if n <= max_length:
        return sample
    first_target = sample.labels_mask.index(True) if any(sample.labels_mask) else n
    completion = n - first_target
    if completion + 1 > max_length:
        raise CompletionTooLong(f"example {name}: the completion needs {completion} tokens + 1 of prompt, "
                                f"more than --max-length {max_length}")
    cut = n - max_length
    return SFTSample(sample.input_ids[cut:], sample.labels_mask[cut:], sample.prompt_tokens_dropped + cut)


def tokenize_sft_split(tokenizer, examples: Sequence[Example], max_length: int) -> tuple[list[SFTSample], dict]:
    """``tokenize_sft`` over a split: (kept samples, report). The report counts what was shortened
    and skipped, so nothing is lost silently::

        {"rows": 100, "kept": 99, "prompt_truncated": 21, "prompt_tokens_dropped": 8410,
         "skipped_completion_too_long": 1, "skipped_ids": ["17"]}
    """
    samples, skipped = [], []
    shortened = dropped = 0
    for ex in examples:
        try:
            s = tokenize_sft(tokenizer, ex, max_length)
        except CompletionTooLong:
            skipped.append(ex.id)
            continue
        shortened += s.prompt_tokens_dropped > 0
        dropped += s.prompt_tokens_dropped
        samples.append(s)
    return samples, {"rows": len(examples), "kept": len(samples), "prompt_truncated": shortened,
                     "prompt_tokens_dropped": dropped, "skipped_completion_too_long": len(skipped),
                     "skipped_ids": skipped[:100]}


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


def share_prompt_prefix(cfg, world) -> bool:
    """Whether a trainer's forward passes run the rows' shared prompt prefix once
    (``--share-prompt-prefix``). Never under FSDP2, whose backward gathers a layer's weights only
    through the layer's outputs, which the gradient through the prefix's cache bypasses."""
    return cfg.share_prompt_prefix and world.mode != "fsdp"


def shared_prefix_length(samples: Sequence[SFTSample]) -> int:
    """P: how many leading tokens every sample has in common, kept clear of the targets.

    Every sample's tokens [0, P) are equal, and every sample's first target lies at index P + 1 or
    later, so each target and the position whose logit predicts it are outside the prefix. With
    the paper's prompt the P ~ 80 tokens of the fixed instruction are shared by every row.

    >>> a = SFTSample([5, 6, 7, 8, 9], [False, False, False, True, True])
    >>> b = SFTSample([5, 6, 1, 8, 9, 9], [False, False, False, False, True, True])
    >>> shared_prefix_length([a, b])                 # [5, 6] in common
    2
    >>> shared_prefix_length([a, SFTSample([5, 6, 7, 1], [False, False, True, True])])  # target at 2
    1
    """
    if not samples:
        return 0
    limit = min((s.labels_mask.index(True) if any(s.labels_mask) else len(s.input_ids)) for s in samples) - 1
    first = samples[0].input_ids
    n = 0
    while n < limit and all(s.input_ids[n] == first[n] for s in samples):
        n += 1
    return n


@dataclass
class SFTBatch:
    """A micro-batch for ``sft_logits``: the shared prompt prefix once, then each row's own tokens.

    The rows after the prefix are **left**-padded, so every completion ends in the last column
    and the logits that predict targets all lie in the last ``window`` columns. Masks and
    positions come from lengths, never from token values:

    prefix_ids: [P] (P = 0: nothing shared); input_ids: [B, L] the rows after the prefix;
    attention_mask: [B, P + L], 1 on the prefix and on each row's own tokens; position_ids:
    [B, L], P, P+1, ... over each row's tokens (pads get P; they are masked as keys and their
    outputs are never read); labels_mask: [B, L]; window: W, the last W columns hold every
    position whose logit predicts a target (column L - W is a prompt token in every row).

    Example, prefix [5, 6] and rows [5, 6, 7, 8, 9] / [5, 6, 1, 8, 9, 9] (targets 8 9 / 9 9)::

        input_ids      [[pad, 7, 8, 9],  [1, 8, 9, 9]]
        position_ids   [[2,   2, 3, 4],  [2, 3, 4, 5]]
        attention_mask [[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
        labels_mask    [[0, 0, 1, 1],    [0, 0, 1, 1]]        window 3
    """

    prefix_ids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels_mask: torch.Tensor
    window: int

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.prefix_ids.to(device), self.input_ids.to(device), self.attention_mask.to(device),
                        self.position_ids.to(device), self.labels_mask.to(device), self.window)

    def window_ids(self) -> torch.Tensor:
        """input_ids of the last W columns: [B, W], aligned with ``sft_logits``'s output."""
        return self.input_ids[:, self.input_ids.shape[1] - self.window:]

    def window_labels(self) -> torch.Tensor:
        """labels_mask of the last W columns: [B, W] (its first column is all 0)."""
        return self.labels_mask[:, self.labels_mask.shape[1] - self.window:]


def collate_sft(samples: Sequence[SFTSample], pad_token_id: int, share_prefix: bool = True) -> SFTBatch:
    """Lay out ``samples`` as an ``SFTBatch``: the common prefix (``shared_prefix_length``) once
    when ``share_prefix`` and there are two rows or more, the rest left-padded."""
    if not samples:
        raise ValueError("collate_sft: no samples")
    p = shared_prefix_length(samples) if share_prefix and len(samples) > 1 else 0
    rest = [s.input_ids[p:] for s in samples]
    width = max(len(r) for r in rest)
    b = len(samples)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((b, p + width), dtype=torch.long)
    attn[:, :p] = 1
    pos = torch.full((b, width), p, dtype=torch.long)
    labels = torch.zeros((b, width), dtype=torch.bool)
    first_target = width
    for i, (s, r) in enumerate(zip(samples, rest)):
        q = width - len(r)  # left pads of row i
        ids[i, q:] = torch.tensor(r, dtype=torch.long)
        attn[i, p + q:] = 1
        pos[i, q:] = torch.arange(p, p + len(r))
        labels[i, q:] = torch.tensor(s.labels_mask[p:], dtype=torch.bool)
        if any(s.labels_mask[p:]):
            first_target = min(first_target, q + s.labels_mask[p:].index(True))
    window = width - max(first_target - 1, 0)
    return SFTBatch(torch.tensor(samples[0].input_ids[:p], dtype=torch.long), ids, attn, pos, labels, window)


def sft_logits(model, batch: SFTBatch) -> torch.Tensor:
    """Logits of the last ``batch.window`` columns: [B, W, V], position j predicts window_ids()[:, j + 1].

    With a shared prefix (P > 0) the prefix runs once, as a batch of one; its key/value cache
    is broadcast to the B rows and the rows run after it. Gradients flow through the cache into
    the prefix's computation, so loss and gradients equal those of B full rows up to float
    rounding (tests/test_shared_prefix.py), at the cost of P + B * L tokens instead of B * (P + L).
    The head runs on the W columns only. ``model`` may be wrapped for data parallelism; the
    prefix pass calls the module inside a DDP wrapper, whose gradient hooks see one backward.
    """
    kwargs = {}
    p = batch.prefix_ids.numel()
    if p:
        cache = shared_prefix_cache(model, batch.prefix_ids, batch.input_ids.shape[0])
        kwargs = dict(use_cache=True, **cache_argument(model, cache))
    return _call_model(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, width=batch.window, **kwargs)


def _call_model(model, *, width: int, **kwargs) -> torch.Tensor:
    """model(**kwargs).logits of the last ``width`` positions (the head runs on those alone where
    the model's forward takes ``logits_to_keep``)."""
    if supports_logits_to_keep(model):
        return model(logits_to_keep=width, **kwargs).logits
    return model(**kwargs).logits[:, -width:]


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
            raise ConfigError(f"{flag_name(name)} {p}: no such file or directory")


def check_model_source(flag: str, value: str) -> None:
    """Fail before any work on a model that cannot load: a local path that is missing or is not a
    model directory. A string shaped like a hub name ("org/name") that is not a local path is
    left to ``from_pretrained``, unless HF_HUB_OFFLINE forbids fetching it."""
    path = Path(os.path.expanduser(value))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{flag} {value}: not a model directory (no config.json)")
        return
    hub_name = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) is not None
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if not hub_name or offline:
        why = " (HF_HUB_OFFLINE is set, so it is not fetched as a hub name)" if hub_name else ""
        raise ConfigError(f"{flag} {value}: no such directory{why}")


def load_for_cli(flag: str, source: str, chat_template: str = "", *, dtype="float32", device="cpu"):
    """(tokenizer, model) for a script: any failure to load is a ``ConfigError`` naming the flag
    and the path; the tokenizer gets ``--chat-template`` or must have a template of its own."""
    from rankgrpo.models import ChatTemplateError, load_model, load_tokenizer, set_chat_template

    try:
        tokenizer = load_tokenizer(source)
        set_chat_template(tokenizer, chat_template, source)
        model = load_model(source, dtype=dtype, device=device)
    except ChatTemplateError as e:
        raise ConfigError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {source}: cannot load the model or its tokenizer: {e}") from None
    check_tokenizer_matches(model, tokenizer, source)
    return tokenizer, model


def check_tokenizer_matches(model, tokenizer, where: str) -> None:
    """A checkpoint saved with another tokenizer has a different embedding size or special ids."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise SystemExit(f"error: {where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"{n_emb} rows; the checkpoint was trained with a different tokenizer")


# ----------------------------------------------------------------------------- run start


def run_script(config_cls, run, argv=None) -> int:
    """Parse the script's config and run it; bad flags, files, rows or catalogs end with one clear
    line and exit 2 (``rankgrpo.config.run_cli``)."""
    return run_cli(config_cls, run, argv)


def start_from(cfg):
    """Seed everything and load the policy to train: the newest checkpoint of ``cfg.out`` with
    ``--resume``, else ``cfg.model``. Returns (resume_from or None, sampler generator, tokenizer, model)."""
    from rankgrpo.checkpoint import latest_checkpoint, seed_everything

    resume_from = latest_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no checkpoint in {cfg.out}; starting from {cfg.model}", file=sys.stderr)
    source = str(resume_from or cfg.model)
    flag = "--resume" if resume_from else "--model"
    check_model_source(flag, source)
    generator = seed_everything(cfg.seed)
    tokenizer, model = load_for_cli(flag, source, cfg.chat_template, device=cfg.device)
    return resume_from, generator, tokenizer, model


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def greedy_completions(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int,
                       batch_size: int = 32, stop_after_items: int | None = None,
                       progress: bool = False, compile: bool = False, constraint=None) -> list[str]:
    """Greedy lists, generated once per unique prompt and shared by examples with that prompt.

    A row stops at its eos or at ``max_new_tokens`` (the authors' eval scripts: 1,024), or, with
    ``stop_after_items``, once it has closed that many lines holding text
    (``rankgrpo.stopping.ItemLineCounter``: blank lines never count; a preamble line does).
    Give N plus a margin for the lines the scoring drops (preamble, seen, out-of-catalog and
    repeated items), since filtered lists shift up and later items reach the top N. ``compile``:
    the sampler's static-cache compiled decode (``sample(..., compile=True)``).
    ``constraint``: a ``rankgrpo.constraint.CatalogConstraint`` whose exclusion sets (if any)
    are one per example (``constraint_for_examples``): decoding is then catalog-constrained,
    and a list ends at <eos> after its N-th catalog line (N: the constraint's ``n_items``)."""
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    counter = None
    if stop_after_items is not None:
        counter = ItemLineCounter.from_tokenizer(tokenizer, model.get_input_embeddings().num_embeddings)
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
                    stop_after_items=stop_after_items, line_counter=counter, compile=compile,
                    constraint=None if constraint is None else constraint.for_rows([first_example[k] for k in chunk]))
        for k, row, n in zip(chunk, ro.completion_ids, ro.lengths.tolist()):
            texts[k] = decode_completion(row[:n].tolist(), tokenizer)
    if was_training:
        model.train()
    return [texts[ex.prompt_text] for ex in examples]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos, the model's generation-config eos ids,
    and the chat template's end-of-turn token (``rankgrpo.models.end_of_turn_ids``; SFT targets
    end with it, so a base model's tokenizer whose eos differs still stops after SFT)."""
    from rankgrpo.models import end_of_turn_ids

    ids = {tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)}
    cfg_eos = model.generation_config.eos_token_id
    ids.update(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


def validate_generation(model, tokenizer, examples: Sequence[Example], catalog: Catalog, *, max_new_tokens: int,
                        n_items: int = 20, batch_size: int = 32, stop_margin: int = 10,
                        compile: bool = False, constraint=None) -> dict:
    """Greedy Recall/NDCG@{5,10,20}, in-catalog and format-valid ratios on ``examples`` (means only),
    under the paper's evaluation protocol; catalog-constrained with ``constraint`` (see
    ``greedy_completions``).

    Generation stops at eos, ``max_new_tokens``, or once ``n_items + stop_margin`` lines with
    text are closed (room for lines the scoring filters out; see ``greedy_completions``)."""
    completions = greedy_completions(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, stop_after_items=n_items + stop_margin,
                                     compile=compile, constraint=constraint)
    agg, _ = score_examples(examples, completions, catalog, ks=(5, 10, 20), n_items=n_items)
    return {f"val_{k}": v["mean"] for k, v in agg.items() if isinstance(v, dict)}
