"""Figures (optional; needs matplotlib): the per-rank hit curve and the paper's training curves.

* ``plot_rank_hits``: hit rate at each rank for one or more runs (a greedy-evaluation view of
  where in the list the relevant items land).
* ``plot_training``: per-rank training reward (ranks 1, 2, 5, 10, 15, 20) and validation NDCG@20
  against step, read from a ``train_rankgrpo.py`` log (the paper's Figures 2-5), or the
  training/validation loss and validation NDCG@20 of a ``train_sft.py`` log (Figure 1).
"""
from __future__ import annotations

from pathlib import Path

from rankgrpo.io import read_jsonl_tolerant


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'rankgrpo[plot]'") from None
    return plt


def plot_rank_hits(curves: dict[str, list[float]], path: str | Path) -> Path:
    """curves: run name -> hit rate per rank (rank 1 first)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("hit rate (fixed positions)")
    ax.set_title("Relevant items by rank")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_training(log_path: str | Path, path: str | Path, ranks=(1, 2, 5, 10, 15, 20)) -> Path:
    """Training curves from a run's log.jsonl (RL: per-rank reward + val NDCG@20; SFT: losses + val NDCG@20)."""
    plt = _pyplot()
    rows = read_jsonl_tolerant(log_path)
    train = [r for r in rows if "loss" in r and r.get("iteration", 0) == 0]
    val = [r for r in rows if "val_ndcg@20" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train and "reward/rank_1" in train[0]:
        for k in ranks:
            key = f"reward/rank_{k}"
            if key in train[0]:
                left.plot([r["step"] for r in train], [r[key] for r in train], label=f"rank {k}")
        left.set_ylabel("mean reward")
        left.set_title("Per-rank training reward")
    else:
        left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        vl = [r for r in rows if "val_loss" in r]
        left.plot([r["step"] for r in vl], [r["val_loss"] for r in vl], label="validation loss")
        left.set_title("Loss")
    left.set_xlabel("step")
    left.legend(fontsize=8)
    right.plot([r["step"] for r in val], [r["val_ndcg@20"] for r in val], marker="o", ms=3)
    right.set_xlabel("step")
    right.set_ylabel("validation NDCG@20")
    right.set_title("Validation NDCG@20 (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
