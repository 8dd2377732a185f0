"""What LoRA costs in quality on the sandbox: SFT and Rank-GRPO with LoRA at two ranks against full
fine-tuning, NDCG@20 on the test split with paired standard errors clustered by prompt.

Each stage is compared on a common start, so a difference is the method's alone:

  * SFT arms start from the base model: full fine-tuning, and LoRA at each of ``--ranks``;
  * RL arms (Rank-GRPO exp∞, the sandbox preset) all start from the *full* SFT checkpoint:
    full fine-tuning, and LoRA at each rank (new adapters, B = 0, on the full-SFT weights).

Every arm uses the sandbox preset of its script at the same seed, with alpha = 2r. LoRA's learning
rate is the full arm's times a multiplier **chosen on validation** for each stage, before any test
score exists: LoRA r = ``--probe-rank`` is trained at every multiplier of ``--lr-scales``,

  * SFT for ``--sft-probe-steps`` steps, scored by its validation loss (Eq. 2) at the end;
  * Rank-GRPO for the preset's rounds, scored by greedy NDCG@20 on ``--val-examples`` validation
    conversations at the end;

and the best multiplier of each stage is used at every rank. (The usual rule for adapters, 10x
the full lr, diverged in SFT here: the loss rose from 1.6 to 3.5 within 60 steps.) Then every
final checkpoint is scored once with evaluate.py (sandbox preset) on the test split.

    python benchmarks/lora_quality.py --world runs/demo/world --demos runs/demo/demos \\
        --full-sft runs/demo/seed3407/sft --full-rl runs/demo/seed3407/rankgrpo --jobs 2
    python benchmarks/lora_quality.py --world W --demos D --quick     # tiny sizes: the plumbing only

--full-sft / --full-rl reuse finished full-fine-tuning runs of the same settings (make demo's);
without them the full arms are trained here. Finished runs and evaluations are skipped on a rerun.
Writes OUT/summary.json and OUT/lora_quality.md (the table docs/scaling.md and the report quote).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rankgrpo.config import arg, run_cli, save_config
from rankgrpo.evaluation import prompt_clusters
from rankgrpo.io import atomic_write_json, atomic_write_text, read_jsonl_tolerant
from rankgrpo.sandbox import settings
from rankgrpo.stats import paired_difference
from rankgrpo.task_runner import Task, run_tasks

ROOT = Path(__file__).resolve().parents[1]
METRIC = "ndcg@20"
QUICK_SFT = ["--max-steps", "4", "--micro-batch-size", "4", "--save-every", "0", "--val-gen-examples", "2"]
QUICK_RL = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "4",
            "--max-new-tokens", "24", "--val-examples", "2", "--save-every", "0"]
QUICK_EVAL = ["--limit", "6", "--max-new-tokens", "24"]


@dataclass
class LoraQualityConfig:
    """SFT and Rank-GRPO with LoRA at two ranks against full fine-tuning (see the module docstring)."""

    world: str = arg("sandbox_world", "Sandbox world: base_model/, train/validation/test.jsonl, catalog.jsonl.")
    demos: str = arg("runs/demos", "Demonstrations (build_demos.py --out): train.jsonl, validation.jsonl.")
    out: str = arg("runs/lora_quality", "Directory of the runs, evaluations, summary.json and lora_quality.md.")
    ranks: list[int] = arg([8, 32], "LoRA ranks r (alpha = 2r).")
    lr_scales: list[float] = arg([1.0, 3.0, 10.0], "LoRA learning rate = the full arm's (the sandbox preset's) "
                                                   "times one of these, chosen per stage on validation.")
    probe_rank: int = arg(8, "LoRA rank of the learning-rate probes.")
    sft_probe_steps: int = arg(300, "SFT steps of each learning-rate probe (its cosine schedule is that long).")
    val_examples: int = arg(100, "Validation conversations that score each Rank-GRPO probe (greedy NDCG@20).")
    full_sft: str = arg("", "A finished full-fine-tuning SFT run directory to reuse (its final/); empty: train it.")
    full_rl: str = arg("", "A finished full-fine-tuning Rank-GRPO run from --full-sft's final/ to reuse; "
                           "empty: train it.")
    seed: int = arg(settings.SEED, "Training seed of every arm.")
    jobs: int = arg(2, "Runs at once (rankgrpo.task_runner), each with cpu_count // jobs torch threads.")
    quick: bool = arg(False, "Tiny sizes: checks the plumbing only.")

    def validate(self) -> None:
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise SystemExit("error: --ranks needs positive ranks")
        if not self.lr_scales or any(x <= 0 for x in self.lr_scales):
            raise SystemExit("error: --lr-scales needs positive multipliers")
        if self.quick:
            self.sft_probe_steps, self.val_examples = 4, 2
        if self.jobs < 1:
            raise SystemExit("error: --jobs must be at least 1")


def arms(cfg: LoraQualityConfig) -> list[tuple[str, str]]:
    """(stage, arm) pairs in table order: sft/full, sft/lora8, ..., rl/full, rl/lora8, ..."""
    names = ["full"] + [f"lora{r}" for r in cfg.ranks]
    return [(stage, n) for stage in ("sft", "rl") for n in names]


def run_dir(cfg: LoraQualityConfig, stage: str, arm: str) -> Path:
    if arm == "full" and stage == "sft" and cfg.full_sft:
        return Path(cfg.full_sft)
    if arm == "full" and stage == "rl" and cfg.full_rl:
        return Path(cfg.full_rl)
    return Path(cfg.out) / stage / arm


def lora_flags(arm: str, full_lr: float, scale: float) -> list[str]:
    """The flags that make ``arm`` a LoRA arm (none for 'full').

    >>> lora_flags("lora8", 1e-4, 10.0)
    ['--lora-rank', '8', '--lora-alpha', '16', '--lr', '0.001']
    """
    if arm == "full":
        return []
    r = int(arm.removeprefix("lora"))
    return ["--lora-rank", str(r), "--lora-alpha", str(2 * r), "--lr", f"{full_lr * scale:g}"]


def train_cmd(cfg: LoraQualityConfig, stage: str, run: Path, extra: list[str]) -> list[str]:
    """The train_sft.py (from the base model) or train_rankgrpo.py (from the full SFT run) command."""
    world, demos, py = Path(cfg.world), Path(cfg.demos), sys.executable
    common = ["--catalog", str(world / "catalog.jsonl"), "--seed", str(cfg.seed), "--resume"]
    if stage == "sft":
        return [py, str(ROOT / "train_sft.py"), "--model", str(world / "base_model"),
                "--train-data", str(demos / "train.jsonl"), "--val-data", str(demos / "validation.jsonl"),
                "--out", str(run), *common, *extra, *(QUICK_SFT if cfg.quick else [])]
    return [py, str(ROOT / "train_rankgrpo.py"), "--model", str(run_dir(cfg, "sft", "full") / "final"),
            "--data", str(world / "train.jsonl"), "--val-data", str(world / "validation.jsonl"),
            "--out", str(run), *common, *extra, *(QUICK_RL if cfg.quick else [])]


FULL_LR = {"sft": settings.SFT["lr"], "rl": settings.RL["lr"]}


def probe_dir(cfg: LoraQualityConfig, stage: str, scale: float) -> Path:
    return Path(cfg.out) / "probe" / stage / f"x{scale:g}"


def probe_tasks(cfg: LoraQualityConfig) -> list[Task]:
    """LoRA r = probe_rank at every learning-rate multiplier, each stage scored on validation only."""
    rl_steps = 1 if cfg.quick else settings.RL["steps"]
    out = []
    for scale in cfg.lr_scales:
        for stage in ("sft", "rl"):
            run = probe_dir(cfg, stage, scale)
            if stage == "sft":
                extra = ["--max-steps", str(cfg.sft_probe_steps), "--eval-every", str(cfg.sft_probe_steps),
                         "--val-gen-examples", "0"]
            else:
                extra = ["--eval-every", str(rl_steps), "--val-examples", str(cfg.val_examples)]
            cmd = train_cmd(cfg, stage, run, lora_flags(f"lora{cfg.probe_rank}", FULL_LR[stage], scale)) + extra
            out.append(Task(f"probe/{stage}/x{scale:g}", cmd, run / "final" / "config.json",
                            ["train/sft/full"] if stage == "rl" else []))
    return out


def last_logged(run: Path, key: str) -> float:
    """The last value of ``key`` in a run's JSONL log."""
    values = [r[key] for r in read_jsonl_tolerant(run / "log.jsonl") if key in r]
    if not values:
        raise SystemExit(f"error: {run / 'log.jsonl'}: no {key!r} logged (was validation on?)")
    return float(values[-1])


def select_scales(cfg: LoraQualityConfig) -> dict[str, dict]:
    """Per stage: the validation score of every multiplier and the chosen one (SFT: lowest
    validation loss; Rank-GRPO: highest validation NDCG@20)."""
    out = {}
    for stage, key, best in (("sft", "val_loss", min), ("rl", "val_ndcg@20", max)):
        scores = {scale: last_logged(probe_dir(cfg, stage, scale), key) for scale in cfg.lr_scales}
        out[stage] = {"criterion": key, "scores": {f"{k:g}": v for k, v in scores.items()},
                      "chosen": best(scores, key=scores.get)}
    return out


def tasks(cfg: LoraQualityConfig, chosen: dict[str, float]) -> list[Task]:
    """Every arm and its test evaluation; LoRA arms at the chosen multiplier of their stage."""
    world = Path(cfg.world)
    out: list[Task] = []
    for stage, arm in arms(cfg):
        run = run_dir(cfg, stage, arm)
        cmd = train_cmd(cfg, stage, run, lora_flags(arm, FULL_LR[stage], chosen[stage]))
        out.append(Task(f"train/{stage}/{arm}", cmd, run / "final" / "config.json",
                        ["train/sft/full"] if stage == "rl" else []))
        out.append(Task(f"eval/{stage}/{arm}", [
            sys.executable, str(ROOT / "evaluate.py"), "--model", str(run / "final"), "--data", str(world / "test.jsonl"),
            "--catalog", str(world / "catalog.jsonl"), "--name", f"{stage}/{arm}",
            "--out", str(eval_dir(cfg, stage, arm)), *(QUICK_EVAL if cfg.quick else [])],
            eval_dir(cfg, stage, arm) / "results.json", [f"train/{stage}/{arm}"]))
    return out


def eval_dir(cfg: LoraQualityConfig, stage: str, arm: str) -> Path:
    return Path(cfg.out) / "eval" / stage / arm


def summarise(cfg: LoraQualityConfig, selection: dict[str, dict]) -> dict:
    rows = {}
    for stage, arm in arms(cfg):
        d = eval_dir(cfg, stage, arm)
        res = json.loads((d / "results.json").read_text())["results"]
        per = {r["id"]: r for r in read_jsonl_tolerant(d / "examples.jsonl")}
        rows[f"{stage}/{arm}"] = {"stage": stage, "arm": arm, "run": str(run_dir(cfg, stage, arm)),
                                  METRIC: res[METRIC], "per_example": per}
    out_rows = {}
    for name, row in rows.items():
        full = rows[f"{row['stage']}/full"]
        diff = None
        if row["arm"] != "full":
            a, b = row["per_example"], full["per_example"]
            diff = paired_difference(a, b, METRIC, clusters=prompt_clusters(a, b))
        out_rows[name] = {k: v for k, v in row.items() if k != "per_example"} | {"minus_full": diff}
    summary = {"metric": METRIC, "seed": cfg.seed, "selection": selection, "rows": out_rows}
    atomic_write_json(Path(cfg.out) / "summary.json", summary)
    md = markdown(summary)
    atomic_write_text(Path(cfg.out) / "lora_quality.md", md)
    print(md)
    return summary


def markdown(summary: dict) -> str:
    lines = ["Learning-rate multiplier of LoRA (x the full arm's lr), chosen on validation:", ""]
    for stage, sel in summary["selection"].items():
        tried = ", ".join(f"x{k}: {v:.4f}" for k, v in sel["scores"].items())
        lines.append(f"- {'SFT' if stage == 'sft' else 'Rank-GRPO'} ({sel['criterion']}): {tried}; "
                     f"chosen x{sel['chosen']:g}")
    lines += ["", "| stage | arm | N@20 (±SE) | − full, paired (±SE, clustered by prompt) |", "|---|---|---|---|"]
    for name, row in summary["rows"].items():
        m = row[METRIC]
        d = row["minus_full"]
        delta = "—" if d is None else f"{d['mean']:+.4f} ±{d['stderr']:.4f} ({d['z']:+.1f} SE)"
        stage = "SFT (from the base model)" if row["stage"] == "sft" else "Rank-GRPO (from full SFT)"
        arm = "full fine-tuning" if row["arm"] == "full" else f"LoRA r = {row['arm'].removeprefix('lora')}"
        lines.append(f"| {stage} | {arm} | {m['mean']:.4f} ±{m['stderr']:.4f} | {delta} |")
    return "\n".join(lines) + "\n"


def run(cfg: LoraQualityConfig) -> int:
    save_config(cfg, cfg.out, "lora_quality_config.json")
    full_sft = [t for t in tasks(cfg, {"sft": 1.0, "rl": 1.0}) if t.name == "train/sft/full"]
    run_tasks(full_sft + probe_tasks(cfg), Path(cfg.out), cfg.jobs, cwd=Path.cwd())
    selection = select_scales(cfg)
    run_tasks(tasks(cfg, {k: v["chosen"] for k, v in selection.items()}), Path(cfg.out), cfg.jobs, cwd=Path.cwd())
    summarise(cfg, selection)
    return 0


def main(argv=None) -> int:
    return run_cli(LoraQualityConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
