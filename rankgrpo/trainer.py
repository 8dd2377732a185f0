"""What both trainers share before and around the training loop: the common config fields, the
data order of each step, whether the prompt prefix is shared, the non-finite-loss guard, and the
checks and model loading that run before any work starts."""
from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rankgrpo.config import ConfigError, arg, flag_name, run_cli
from rankgrpo.lora import DEFAULT_TARGETS, LoRAError, LoRASettings
from rankgrpo.tracking import TRACKERS, check_tracker_installed


@dataclass
class TrainerConfig:
    """Fields both trainers share (each script's config inherits them)."""

    preset: str = arg("sandbox", "Defaults of the fields the script's PRESETS name: 'paper' (App. C, for hub "
                                 "models) or 'sandbox' (what make demo runs on the sandbox world: "
                                 "rankgrpo/sandbox/settings.py). A flag given on the command line wins.",
                      choices=["paper", "sandbox"])
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
    lora_rank: int = arg(0, "LoRA rank r (rankgrpo/lora.py): train h = W x + (alpha / r) B A x on the "
                            "--lora-targets layers with every base weight frozen; the KL reference is the policy "
                            "with its adapters off. final/ holds the merged weights and final/adapter/ the "
                            "adapter alone (PEFT's layout). 0: full fine-tuning.", min=0)
    lora_alpha: float = arg(16.0, "LoRA alpha: the update B A x is scaled by alpha / r.", above=0)
    lora_dropout: float = arg(0.0, "LoRA: dropout on the adapter's input x while training (0: none; in RL it "
                                   "makes the training forward pass differ from the policy that sampled).",
                              min=0)
    lora_targets: list[str] = arg(list(DEFAULT_TARGETS), "LoRA: the layers to adapt, as module names or dotted "
                                                          "path suffixes (PEFT's target_modules rule).")
    report_to: str = arg("none", "Also send every row of RUN/log.jsonl to an experiment tracker (rank 0 only; "
                                 "the JSONL stays the record): tensorboard (RUN/tensorboard/, pip install "
                                 "'rankgrpo[tensorboard]') or wandb (pip install 'rankgrpo[wandb]'; "
                                 "WANDB_MODE=offline works without an account).",
                         choices=list(TRACKERS))

    def validate_shared(self) -> None:
        """Checks of the shared fields (each script's ``validate`` calls it after its preset)."""
        if self.lora_rank:
            if self.fsdp:
                raise ConfigError("--lora-rank with --fsdp: LoRA trains a few adapter weights beside a frozen "
                                  "model that DDP replicates cheaply; sharding it is not supported, drop --fsdp")
            if not self.lora_dropout < 1:
                raise ConfigError(f"--lora-dropout must be < 1, got {self.lora_dropout}")
            if not self.lora_targets:
                raise ConfigError("--lora-targets names no module")
        check_tracker_installed(self.report_to)

    def lora_settings(self) -> LoRASettings | None:
        """The LoRA settings of this run (None: full fine-tuning)."""
        if not self.lora_rank:
            return None
        return LoRASettings(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets),
                            str(self.model))


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


def share_prompt_prefix(cfg, world) -> bool:
    """Whether a trainer's forward passes run the rows' shared prompt prefix once
    (``--share-prompt-prefix``); `prefix_sharing_off_reason` says why not when it is asked for."""
    return cfg.share_prompt_prefix and prefix_sharing_off_reason(cfg, world) is None


def prefix_sharing_off_reason(cfg, world) -> str | None:
    """Why ``--share-prompt-prefix`` cannot apply to this run, or None when it can.

    - Under FSDP2 the backward pass gathers a layer's weights only through the layer's outputs,
      which the gradient through the prefix's key/value cache bypasses.
    - Under ``--gradient-checkpointing`` transformers drops the key/value cache of every layer it
      checkpoints (the recomputation in the backward pass would write it a second time), so the
      rows could not attend to the prefix.
    """
    if world.mode == "fsdp":
        return "--fsdp"
    if cfg.gradient_checkpointing:
        return "--gradient-checkpointing"
    return None


def announce_prefix_sharing(cfg, world, trainer: str) -> None:
    """Say once, on the main process, that a requested ``--share-prompt-prefix`` is off and why."""
    reason = prefix_sharing_off_reason(cfg, world) if cfg.share_prompt_prefix else None
    if reason and world.is_main:
        print(f"{trainer}: --share-prompt-prefix is off under {reason} (see --help); every row runs its whole prompt")


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


def run_script(config_cls, run, argv=None) -> int:
    """Parse the script's config and run it; bad flags, files, rows or catalogs end with one clear
    line and exit 2 (``rankgrpo.config.run_cli``)."""
    return run_cli(config_cls, run, argv)


def start_from(cfg, world=None):
    """Seed everything and load the policy to train: the newest checkpoint of ``cfg.out`` with
    ``--resume``, else ``cfg.model``. Under LoRA the frozen base is always ``cfg.model``, adapters
    are added (``rankgrpo.lora.add_lora``) and a resume reloads them from the checkpoint's
    ``adapter/``. Returns (resume_from or None, sampler generator, tokenizer, model)."""
    from rankgrpo.checkpoint import latest_checkpoint, seed_everything
    from rankgrpo.lora import ADAPTER_DIR, add_lora, describe, load_adapter

    resume_from = latest_checkpoint(cfg.out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no checkpoint in {cfg.out}; starting from {cfg.model}", file=sys.stderr)
    lora = cfg.lora_settings()
    if resume_from is not None and (resume_from / ADAPTER_DIR).is_dir() != (lora is not None):
        written = "with" if lora is None else "without"
        raise ConfigError(f"--resume: {resume_from} was written {written} --lora-rank; resume it the same way "
                          f"(or start a new run from its merged weights with --model {resume_from})")
    source = str(resume_from if resume_from and lora is None else cfg.model)
    flag = "--resume" if resume_from and lora is None else "--model"
    check_model_source(flag, source)
    generator = seed_everything(cfg.seed)
    tokenizer, model = load_for_cli(flag, source, cfg.chat_template, device=cfg.device)
    if lora is not None:
        try:
            add_lora(model, lora, seed=cfg.seed)
            if resume_from:
                load_adapter(model, resume_from / ADAPTER_DIR)
        except LoRAError as e:
            raise ConfigError(str(e)) from None
        if world is None or world.is_main:
            print(describe(model))
    return resume_from, generator, tokenizer, model


def enable_gradient_checkpointing(model) -> None:
    """--gradient-checkpointing. Under LoRA the embeddings are frozen, so the checkpointed blocks'
    inputs would not require grad and (with reentrant checkpointing, transformers' default before
    v5) no gradient would reach the adapters inside them: the embedding output is marked to
    require grad, as PEFT does."""
    from rankgrpo.lora import lora_layers

    model.gradient_checkpointing_enable()
    if lora_layers(model):
        model.enable_input_require_grads()
