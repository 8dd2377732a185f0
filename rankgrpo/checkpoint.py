"""Run directories, atomic checkpoints and exact resume.

Layout of a run directory::

    RUN/config.json                 resolved config of the script
    RUN/log.jsonl                   one JSON line per logged step (append-only)
    RUN/checkpoints/step-000200/    model + tokenizer (save_pretrained, HF format)
                                    trainer_state.pt: optimizer, scheduler, RNG states, step,
                                    data position, anything else the trainer needs
                                    COMPLETE: written last
    RUN/checkpoints/latest          name of the newest complete checkpoint
    RUN/final/                      the last weights, HF format (what evaluate.py loads)
    .../adapter/                    under --lora-rank, beside the merged weights of a checkpoint or
                                    of final/: the adapter alone, in PEFT's layout (rankgrpo/lora.py)

A checkpoint is written into a temporary sibling directory and renamed into place once
every file is on disk, then ``latest`` is replaced atomically: a run killed during a save
leaves the previous checkpoint intact and never one that loads wrongly.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rankgrpo.io import atomic_write_jsonl, atomic_write_text, read_jsonl_tolerant

STATE_FILE = "trainer_state.pt"
COMPLETE = "COMPLETE"


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG a training step touches: python, numpy, torch CPU (and CUDA), the sampler's generator."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch in one place; returns a CPU generator for the sampler."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_dir_atomically(final: Path, write) -> Path:
    """Call ``write(tmp_dir)``, fsync its files, then rename the directory to ``final`` in one step."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):  # make sure everything is on disk before the rename (e.g. adapter/ too)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, state: dict[str, Any],
                    keep_last: int = 2, move_in: Sequence[Path] = ()) -> Path:
    """Write ``checkpoints/step-{step:06d}`` atomically and point ``latest`` at it.

    state: a picklable dict (optimizer/scheduler state dicts, RNG states, data position, ...).
    move_in: files already written elsewhere on the same file system (e.g. each process's
    optimizer shard) that become part of the checkpoint under their own names.
    """
    root = checkpoint_dir(run_dir)
    name = f"step-{step:06d}"

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"step": step, **state}, tmp / STATE_FILE)
        for f in move_in:
            os.replace(f, tmp / Path(f).name)
        (tmp / COMPLETE).write_text(name)

    final = _write_dir_atomically(root / name, write)
    atomic_write_text(root / "latest", name)
    _prune(root, keep_last)
    return final


def _complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).exists())


def _prune(root: Path, keep_last: int) -> None:
    for p in _complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step-*"):  # leftovers of a killed save
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        p = root / pointer.read_text().strip()
        if (p / COMPLETE).exists():
            return p
    found = _complete_checkpoints(root)
    return found[-1] if found else None


def load_trainer_state(ckpt: str | Path) -> dict:
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=False)


def truncate_log(log_path: str | Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint's step (they will be redone)."""
    rows = read_jsonl_tolerant(log_path)
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) != len(rows) or Path(log_path).exists():
        atomic_write_jsonl(log_path, keep)


def save_final(run_dir: str | Path, model, tokenizer) -> Path:
    """Write the final weights to ``RUN/final`` (atomic directory swap)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _write_dir_atomically(Path(run_dir) / "final", write)
