"""Opt-in experiment tracking (``--report-to``): the rows each trainer appends to RUN/log.jsonl,
sent as they are to TensorBoard or Weights & Biases.

RUN/log.jsonl stays the record; a tracker gets the same rows, under the same names: every
number of a row (rewards per rank, KL, clip fractions, lr, samples/s, losses, validation
figures, ...) is a scalar named by its JSONL key, at the row's ``step``. Lists (e.g.
``reward/rank_mean``) and text stay in the JSONL only. The resolved config (what
RUN/config.json holds) is the tracker's run config. Only rank 0 reports under torchrun.

    tensorboard  event files in RUN/tensorboard/ (``pip install 'rankgrpo[tensorboard]'``;
                 ``tensorboard --logdir RUN/tensorboard``). The config is a text summary "config".
    wandb        one run in project $WANDB_PROJECT (default "rankgrpo"), named after RUN, its files
                 under $WANDB_DIR (default RUN/) (``pip install 'rankgrpo[wandb]'``); WANDB_MODE=offline
                 writes the run without an account, for ``wandb sync`` later. Rows share the x axis
                 ``step`` (μ = 2 logs two rows per step, told apart by ``iteration``).

After ``--resume`` the JSONL drops the rows past the checkpoint; a tracker cannot, so it starts a new
event file (TensorBoard) or run (wandb) and the rows from the checkpoint on appear again.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from rankgrpo.io import append_jsonl

TRACKERS = ("none", "tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the module it needs (= the extra)


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def check_tracker_installed(report_to: str) -> None:
    """Before any work: the package of the chosen tracker must be importable, else one line that
    names the extra to install (a ``ConfigError``, exit 2)."""
    from rankgrpo.config import ConfigError

    module = _PACKAGE.get(report_to)
    if module and not _installed(module):
        raise ConfigError(f"--report-to {report_to} needs the {module} package, which is not installed: "
                          f"pip install 'rankgrpo[{report_to}]'")


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a log row by their JSONL names (ints and floats; bools, lists and text dropped).

    >>> scalars({"step": 3, "loss": 0.5, "reward/rank_mean": [1, 0], "decode": "x"})
    {'step': 3.0, 'loss': 0.5}
    """
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class NoTracker:
    """--report-to none (and every rank but 0)."""

    def log(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Scalars into RUN/tensorboard/ with torch's SummaryWriter (needs the tensorboard package)."""

    def __init__(self, run_dir: str | Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for name, value in scalars(row).items():
            if name != "step" and math.isfinite(value):
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # rows come once a step: a killed run loses none

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run; each row is one ``wandb.log`` call with ``step`` as the x axis."""

    def __init__(self, run_dir: str | Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rankgrpo"), name=Path(run_dir).name,
                              dir=os.environ.get("WANDB_DIR", str(run_dir)), config=config)
        self.run.define_metric("*", step_metric="step")

    def log(self, row: dict) -> None:
        self.run.log(scalars(row))

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, run_dir: str | Path, config: dict, world=None):
    """The tracker of ``--report-to`` (``NoTracker`` for 'none' and on every rank but 0)."""
    if report_to == "none" or (world is not None and not world.is_main):
        return NoTracker()
    check_tracker_installed(report_to)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}[report_to](run_dir, config)


class MetricLog:
    """RUN/log.jsonl (the record) and the tracker, fed the same rows. Use on rank 0."""

    def __init__(self, path: str | Path, tracker=None):
        self.path = path
        self.tracker = tracker or NoTracker()

    def append(self, row: dict) -> None:
        append_jsonl(self.path, row)
        self.tracker.log(row)

    def close(self) -> None:
        self.tracker.close()
