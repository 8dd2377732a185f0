"""Learning-rate schedules of the two trainers: SFT's linear warm-up and cosine decay, and
Rank-GRPO's piecewise-constant ``STEP:LR`` schedule."""
from __future__ import annotations

import math
from typing import Sequence


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
