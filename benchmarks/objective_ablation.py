"""Ablation of the objective: the paper's equations against the authors' released trainer, rule by rule.

The paper's tables come from the authors' trainer (libs/trl/rank_grpo_trainer.py on TRL 0.21),
which departs from the equations in seven places (docs/algorithm.md, "The paper's objective and
the authors' code"). This script runs Rank-GRPO from one SFT checkpoint

  * under ``--objective paper`` and ``--objective authors``,
  * under ``paper`` with each of the authors' rules switched on alone (the seventh, the baselines'
    aggregation, only acts on GRPO / GSPO, so it is a GRPO run against GRPO under ``paper``),

at the first seed, then both objectives at every seed of ``--seeds``; scores each final
checkpoint with evaluate.py on the test split; and prints NDCG@20 differences against the
arm's base (``paper``, or GRPO under ``paper``), paired over the test conversations
(``evaluate.py --compare`` prints each pair; the summary uses the same
``rankgrpo.stats.paired_difference``, standard errors clustered by prompt), then the
authors-minus-paper difference at every seed and its seed-level t test (``rankgrpo.stats.seed_level_t``).

    python benchmarks/objective_ablation.py --sft runs/sft/final              # the sandbox, preset sizes
    python benchmarks/objective_ablation.py --sft runs/sft/final --quick      # tiny sizes: a smoke run
    python benchmarks/objective_ablation.py --sft CKPT --data train.jsonl --val-data validation.jsonl \\
        --catalog catalog.jsonl --test-data test.jsonl --train-args "--preset paper --bf16" \\
        --eval-args "--dtype bfloat16" --launcher "torchrun --nproc-per-node 4"
    python benchmarks/objective_ablation.py --sft runs/sft/final --jobs 2     # two 1-thread runs at once

Every arm differs from its base by its flags only: the same SFT start, seed, prompts and sizes.
Finished runs (RUN/final) and evaluations (results.json) are skipped on a rerun, so an
interrupted ablation continues where it stopped. OUT/summary.json holds every difference.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rankgrpo.config import arg, flag_name, run_cli, save_config
from rankgrpo.io import atomic_write_json, atomic_write_text, read_jsonl_tolerant
from rankgrpo.evaluation import prompt_clusters
from rankgrpo.rl import OBJECTIVES
from rankgrpo.scripts import load_script
from rankgrpo.stats import paired_difference, seed_level_t
from rankgrpo.task_runner import Task, run_tasks

ROOT = Path(__file__).resolve().parents[1]

METRIC = "ndcg@20"
# tiny sizes of --quick: one RL step on a couple of prompts, a few test conversations
QUICK_TRAIN = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "4",
               "--max-new-tokens", "24", "--eval-every", "0", "--val-examples", "2", "--save-every", "0"]
QUICK_EVAL = ["--limit", "6", "--max-new-tokens", "24"]


@dataclass
class ObjectiveAblationConfig:
    """RL from one SFT checkpoint under the paper's and the authors' objectives, and each rule alone."""

    sft: str = arg("runs/sft/final", "The SFT checkpoint every run starts from (also the KL reference).")
    data: str = arg("sandbox_world/train.jsonl", "RL prompts with ground truths.")
    val_data: str = arg("sandbox_world/validation.jsonl", "Validation examples (train_rankgrpo.py --val-data).")
    catalog: str = arg("sandbox_world/catalog.jsonl", "Catalog.")
    test_data: str = arg("sandbox_world/test.jsonl", "Examples every final checkpoint is scored on.")
    out: str = arg("runs/objective_ablation", "Directory of the runs, the evaluations and summary.json.")
    seeds: list[int] = arg([3407, 3408, 3409], "Seeds: every arm at the first, paper and authors at all.")
    train_args: str = arg("", "Extra flags for every train_rankgrpo.py run (e.g. '--preset paper --bf16').")
    eval_args: str = arg("", "Extra flags for every evaluate.py run (e.g. '--dtype bfloat16').")
    launcher: str = arg("", "Start each run with this command (e.g. 'torchrun --nproc-per-node 4'); empty: "
                            "this Python.")
    jobs: int = arg(1, "Runs at once, each a subprocess with cpu_count // jobs torch threads "
                       "(rankgrpo.task_runner); 1 without --launcher: one after another inside this process.")
    quick: bool = arg(False, "Tiny sizes (one RL step, a few test conversations): checks the plumbing only.")
    dry_run: bool = arg(False, "Print the commands and stop.")

    def validate(self) -> None:
        if not self.seeds:
            raise SystemExit("error: --seeds needs at least one seed")
        if self.jobs < 1:
            raise SystemExit("error: --jobs must be at least 1")


@dataclass(frozen=True)
class Arm:
    """One training configuration: its flags, and the arm its NDCG@20 is compared with (None: a base)."""

    name: str
    flags: tuple[str, ...]
    base: str | None = None
    all_seeds: bool = False


def authors_value(name: str) -> str:
    return str(OBJECTIVES["authors"][name])


def arms() -> list[Arm]:
    """paper, authors, each rule alone on top of paper; the baselines' rule as GRPO against GRPO."""
    out = [Arm("paper", ("--objective", "paper"), all_seeds=True),
           Arm("authors", ("--objective", "authors"), base="paper", all_seeds=True)]
    for name in OBJECTIVES["paper"]:
        if name == "baseline_aggregation":
            continue
        out.append(Arm(f"paper+{name}", ("--objective", "paper", flag_name(name), authors_value(name)), base="paper"))
    out.append(Arm("grpo-paper", ("--algo", "grpo", "--objective", "paper")))
    out.append(Arm("grpo-paper+baseline_aggregation", ("--algo", "grpo", "--objective", "paper",
                                                       "--baseline-aggregation", authors_value("baseline_aggregation")),
                   base="grpo-paper"))
    return out


@dataclass
class Plan:
    """The runs (name -> train_rankgrpo.py argv) and evaluations (name -> evaluate.py argv), in order."""

    train: dict[str, list[str]] = field(default_factory=dict)
    evaluate: dict[str, list[str]] = field(default_factory=dict)


def run_name(arm: str, seed: int) -> str:
    return f"{arm}@{seed}"


def plan(cfg: ObjectiveAblationConfig) -> Plan:
    out = Path(cfg.out)
    p = Plan()
    for seed_i, seed in enumerate(cfg.seeds):
        for a in arms():
            if seed_i and not a.all_seeds:
                continue
            name = run_name(a.name, seed)
            run_dir = out / "runs" / a.name / f"seed{seed}"
            p.train[name] = ["--model", cfg.sft, "--data", cfg.data, "--val-data", cfg.val_data, "--catalog",
                             cfg.catalog, "--out", str(run_dir), "--seed", str(seed), *a.flags,
                             *shlex.split(cfg.train_args), *(QUICK_TRAIN if cfg.quick else [])]
            p.evaluate[name] = ["--model", str(run_dir / "final"), "--data", cfg.test_data, "--catalog", cfg.catalog,
                                "--name", name, "--out", str(eval_dir(cfg, name)), *shlex.split(cfg.eval_args),
                                *(QUICK_EVAL if cfg.quick else [])]
    return p


def eval_dir(cfg: ObjectiveAblationConfig, name: str) -> Path:
    return Path(cfg.out) / "eval" / name.replace("@", "-seed")


def script_main(script: str):
    """``main(argv)`` of one of the project's scripts, loaded from its file."""
    return load_script(ROOT / script, f"_ablation_{Path(script).stem}").main


def launch(cfg: ObjectiveAblationConfig, script: str, argv: list[str]) -> None:
    if cfg.launcher:
        cmd = [*shlex.split(cfg.launcher), str(ROOT / script), *argv]
        if subprocess.run(cmd, cwd=Path.cwd()).returncode:
            raise SystemExit(f"error: failed: {shlex.join(cmd)}")
    elif script_main(script)(argv) != 0:
        raise SystemExit(f"error: failed: {script} {shlex.join(argv)}")


def per_example(cfg: ObjectiveAblationConfig, name: str) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl_tolerant(eval_dir(cfg, name) / "examples.jsonl")}


def paired(cfg: ObjectiveAblationConfig, name: str, base: str) -> dict:
    """NDCG@20 of ``name`` − ``base`` over the test conversations, SE clustered by prompt."""
    a, b = per_example(cfg, name), per_example(cfg, base)
    return paired_difference(a, b, METRIC, clusters=prompt_clusters(a, b))


def summarise(cfg: ObjectiveAblationConfig) -> dict:
    """NDCG@20 of every run and its paired difference against its base; authors − paper over seeds."""
    seed0 = cfg.seeds[0]
    rows = {}
    print(f"\n== each arm at seed {seed0} against its base (evaluate.py --compare) ==")
    for a in arms():
        if a.base is None:
            continue
        name, base = run_name(a.name, seed0), run_name(a.base, seed0)
        script_main("evaluate.py")(["--compare", str(eval_dir(cfg, base)), str(eval_dir(cfg, name))])
        rows[a.name] = {"base": a.base, "flags": list(a.flags), **paired(cfg, name, base)}
    per_seed = {seed: paired(cfg, run_name("authors", seed), run_name("paper", seed)) for seed in cfg.seeds}
    levels = {a.name: json_results(cfg, run_name(a.name, seed0))[METRIC]["mean"] for a in arms()}
    across = seed_level_t([d["mean"] for d in per_seed.values()])
    summary = {"metric": METRIC, "seed": seed0, "levels": levels, "arms": rows,
               "authors_minus_paper": {"per_seed": per_seed, "seed_level": across}}

    print(f"\n== {METRIC.upper()} differences against the base, paired over the test conversations "
          f"(SE clustered by prompt) ==")
    width = max(len(n) for n in rows)
    for n, d in rows.items():
        print(f"  {n.ljust(width)}  − {d['base']:<10}  {d['mean']:+.4f} ±{d['stderr']:.4f}  "
              f"({d['z']:+.1f} SE, n={d['n']}, {d['n_clusters']} prompts)")
    print(f"\n== authors − paper over {len(cfg.seeds)} seed(s) ==")
    for seed, d in per_seed.items():
        print(f"  seed {seed}: {d['mean']:+.4f} ±{d['stderr']:.4f} ({d['z']:+.1f} SE, paired, clustered)")
    if across["t"] is not None:
        print(f"  seed level: mean {across['mean']:+.4f} ±{across['stderr']:.4f} over seeds, "
              f"t = {across['t']:+.2f} on {across['df']} df, p = {across['p']:.3f} (two-sided)")
    atomic_write_json(Path(cfg.out) / "summary.json", summary)
    atomic_write_text(Path(cfg.out) / "objective_ablation.md", markdown(summary))
    print(f"\nwrote {Path(cfg.out) / 'summary.json'} and objective_ablation.md")
    return summary


# the row of docs/algorithm.md's table of differences each rule is
RULE_NUMBER = {"eos_advantage": 1, "exact_length_bonus": 2, "early_stop_unit": 3, "overflow_ratio": 4,
               "aggregation": 5, "reward_matching": 6, "baseline_aggregation": 7}


def markdown(summary: dict) -> str:
    """The report's table: N@20 of every arm at the first seed, its paired difference against its
    base, then authors − paper at every seed with the seed-level test."""
    seed = summary["seed"]
    lines = [f"| # | arm (seed {seed}) | N@20 | − its base, paired (±SE clustered by prompt) |", "|---|---|---|---|"]
    levels = summary["levels"]
    for name in ["paper", "grpo-paper"]:
        lines.append(f"| | {name} | {levels[name]:.4f} | (base) |")
    for name, d in summary["arms"].items():
        rule = name.split("+")[1] if "+" in name else None
        number = RULE_NUMBER.get(rule, "1–7") if rule else "1–7"
        lines.append(f"| {number} | {name} | {levels[name]:.4f} | {d['mean']:+.4f} ±{d['stderr']:.4f} "
                     f"({d['z']:+.1f} SE) |")
    amp = summary["authors_minus_paper"]
    lines += ["", "| authors − paper | N@20 difference (±SE clustered by prompt) |", "|---|---|"]
    for s, d in amp["per_seed"].items():
        lines.append(f"| seed {s} | {d['mean']:+.4f} ±{d['stderr']:.4f} ({d['z']:+.1f} SE) |")
    t = amp["seed_level"]
    if t["t"] is not None:
        lines.append(f"| over {t['n']} seeds | {t['mean']:+.4f} ±{t['stderr']:.4f}; t = {t['t']:+.2f} on {t['df']} df, "
                     f"p = {t['p']:.3f} |")
    return "\n".join(lines) + "\n"


def json_results(cfg: ObjectiveAblationConfig, name: str) -> dict:
    return json.loads((eval_dir(cfg, name) / "results.json").read_text())["results"]


def run(cfg: ObjectiveAblationConfig) -> int:
    p = plan(cfg)
    if cfg.dry_run:
        for name in p.train:
            print(f"# {name}\npython train_rankgrpo.py {shlex.join(p.train[name])}\n"
                  f"python evaluate.py {shlex.join(p.evaluate[name])}")
        return 0
    save_config(cfg, cfg.out, "objective_ablation_config.json")
    if cfg.jobs > 1 or cfg.launcher:
        run_tasks(tasks(cfg, p), Path(cfg.out), cfg.jobs, cwd=Path.cwd())
    else:
        for name in p.train:
            if not trained(p, name).is_file():
                print(f"== train {name}")
                launch(cfg, "train_rankgrpo.py", p.train[name])
            if not (eval_dir(cfg, name) / "results.json").is_file():
                print(f"== evaluate {name}")
                launch(cfg, "evaluate.py", p.evaluate[name])
    summarise(cfg)
    return 0


def trained(p: Plan, name: str) -> Path:
    """The file that marks run ``name`` finished."""
    return Path(p.train[name][p.train[name].index("--out") + 1]) / "final" / "model.safetensors"


def tasks(cfg: ObjectiveAblationConfig, p: Plan) -> list[Task]:
    """Every run and its evaluation as subprocesses for ``rankgrpo.task_runner.run_tasks``."""
    start = shlex.split(cfg.launcher) if cfg.launcher else [sys.executable]
    out = []
    for name in p.train:
        out.append(Task(f"train/{name}", [*start, str(ROOT / "train_rankgrpo.py"), *p.train[name]], trained(p, name)))
        out.append(Task(f"eval/{name}", [sys.executable, str(ROOT / "evaluate.py"), *p.evaluate[name]],
                        eval_dir(cfg, name) / "results.json", deps=[f"train/{name}"]))
    return out


def main(argv=None) -> int:
    return run_cli(ObjectiveAblationConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
