"""The paper's Tables 1, 2 and 4 and Figures 2-5 in miniature, on the sandbox, side by side.

Every arm is one of the four scripts with explicit flags, so this benchmark exercises exactly
the code a user runs:

    world ─ build_demos (full RRA) ─ train_sft ─┬─ train_rankgrpo on-policy  (mu 1): GRPO, Rank-GRPO log, Rank-GRPO exp_inf
            │                                   ├─ train_rankgrpo off-policy (mu 2): GRPO, GSPO, Rank-GRPO log, Rank-GRPO exp_inf
            │                                   ├─ train_rankgrpo --constrained (mu 1): GRPO, Rank-GRPO exp_inf, trained
            │                                   │      where the no-repeat decoding scores them
            │                                   └─ (every checkpoint) ─ evaluate.py on the test split
            ├─ build_demos --no-reflect        ─ train_sft      (Table 2: "remove reflect")
            ├─ build_demos --no-remap-reflect  ─ train_sft      (Table 2: "remove remap-reflect")
            └─ base model ─ train_rankgrpo exp_inf              (Table 2: "remove SFT", R1-zero)

Fairness: at a training seed, every RL arm starts from that seed's full-RRA SFT checkpoint (R1-zero
from the base model) with the same seed, so all arms see the same prompts in the same order and draw
the same first rollout; all arms run the same number of sampling rounds (hence the same
completions); an off-policy arm (mu = 2) takes two optimiser steps per round. Every SFT arm has the
same steps, lr and seed. Every run is trained at seeds seed .. seed+replicates (--replicate core:
the extra seeds for the full SFT run, the on-policy arms and R1-zero only), and a claim is shown
only where it holds at every seed.

With --constrained-eval (the default) every SFT run and every RL run started from SFT (all but
R1-zero) is also scored on greedy lists that cannot name a film twice (evaluate.py --constrained
--no-exclude-seen). That is not the paper's protocol; it has its own section and "no repeats"
claims, and shows what the repeats of a small model's greedy lists hide.

Afterwards it writes, into --results: ``paper_tables.md`` (Table-1/2/4-style rows with standard
errors, paired differences, every run at every seed, a verdict per claim of the paper at each seed
and over seeds, the list shapes, the RL step-time breakdown), ``summary.json`` (every number), and
PNGs (per-rank training reward per arm, validation NDCG@20 against step) when matplotlib is there.
Runs are resumable: rerunning skips finished stages and resumes training runs.

    python benchmarks/paper_tables.py                   # the committed report (its time: REPORT.md, "Time budgets")
    python benchmarks/paper_tables.py --replicate all   # every arm at three seeds
    python benchmarks/paper_tables.py --quick           # smoke size, every stage once
    python benchmarks/paper_tables.py --report-only     # rebuild tables, figures and REPORT.md's blocks from finished runs

The protocol, in three phases, so that no setting is chosen on a test score:
1. selection (--select-rl-lrs x --select-group-shapes, on by default): each arm judged at every
   seed is trained at the main seed with every candidate (OUT/select/) and scored on every
   validation conversation; the best is used at every seed (OUT/selection.json), and its run is
   the main seed's run (OUT/rl/<arm> links to it);
2. every other training run, and the decoding choice: the full-RRA SFT run and every RL arm
   started from it, scored on validation in both decodings; the decoding with the higher mean
   NDCG@20 carries the report's two primary hypotheses (PRIMARY);
3. the test evaluations, once per final checkpoint.
Afterwards the report: paper_tables.md, summary.json, the PNGs, and the generated blocks of
REPORT.md where the results folder has one (rankgrpo.report_blocks).

Independent runs go in parallel (--jobs, default 2), each with cpu_count // jobs torch threads:
on 2 cores two 1-thread runs finish about 1.3x sooner than one 2-thread run after another. So the
per-arm step timings logged here are measured under that sharing; the speed breakdown of one
unshared step is benchmarks/bench_rl_speed.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rankgrpo import report_blocks
from rankgrpo.config import arg, parse_config, save_config, to_flags
from rankgrpo.io import atomic_write_json, atomic_write_text, read_jsonl_tolerant
from rankgrpo.evaluation import prompt_clusters
from rankgrpo.stats import holm, paired_difference, per_rank_hit_difference, seed_level_t
from rankgrpo.task_runner import Task, run_tasks as run_task_graph
from rankgrpo.sandbox.settings import EVALUATE, MAX_NEW_TOKENS, REPORT, RL, SEED, SFT, WORLD

ROOT = Path(__file__).resolve().parents[1]

KS = (5, 10, 15, 20)
RESULTS_DEFAULT = "benchmarks/results"
PLOT_RANKS = (1, 2, 5, 10, 15, 20)


@dataclass
class PaperTablesConfig:
    """The paper's tables in miniature on the sandbox (see the module docstring)."""

    out: str = arg("runs/paper_tables", "Working directory (world, demonstrations, checkpoints, evaluations, "
                                         "logs); rerunning resumes.")
    results: str = arg(RESULTS_DEFAULT, "Where paper_tables.md, summary.json and the PNGs are written "
                                        "(default with --quick: OUT/results).")
    quick: bool = arg(False, "Smoke size: 40 SFT steps, 3 RL rounds, 100 test conversations, every stage of "
                             "the full run once (its time: REPORT.md, \"Time budgets\"). Shows that every "
                             "stage runs, not the paper's findings.")
    report_only: bool = arg(False, "Only rebuild the tables and figures from finished runs.")
    figures: bool = arg(True, "Also draw the PNG figures. They need matplotlib (the 'plot' extra); that is "
                              "checked before any work starts, and without it the run writes the tables only, "
                              "with a warning.")
    jobs: int = arg(2, "Runs at once; each gets max(1, cpu_count // jobs) torch threads.")
    python: str = arg("", "Python interpreter that runs the four scripts (empty: the one running this).")
    # Defaults: the sandbox's settings (rankgrpo/sandbox/settings.py), the ones make demo runs. The
    # scripts take them from their sandbox preset; the stages pass on only values that differ.
    # the world (small enough that a 2.7M-parameter model learns its catalog in minutes)
    n_films: int = arg(WORLD["n_films"], "Films in the sandbox catalog.")
    n_train: int = arg(WORLD["n_train"], "Training conversations (SFT demonstrations and RL prompts).")
    n_validation: int = arg(WORLD["n_validation"], "Validation conversations.")
    n_test: int = arg(WORLD["n_test"], "Test conversations (the tables).")
    world_seed: int = arg(WORLD["seed"], "Seed of the sandbox world.")
    title_tokens: bool = arg(WORLD["title_tokens"], "Sandbox tokenizer with one token per title and per year (a "
                                                    "list line is 3 tokens; see SandboxConfig.title_tokens).")
    tie_embeddings: bool = arg(WORLD["tie_embeddings"], "Tie the base model's output head to its input embeddings "
                                                        "(untied: 2.7M instead of 2.2M parameters at the same "
                                                        "compute; see SandboxConfig.tie_embeddings).")
    pretrain_steps: int = arg(WORLD["pretrain_steps"], "Knowledge-pretraining steps of the base model (0: a random "
                                                       "base model).")
    pretrain_chat_questions: int = arg(WORLD["pretrain_chat_questions"], "Chat turns of catalog questions in the "
                                                                         "pretraining corpus.")
    # SFT (every SFT arm)
    sft_steps: int = arg(SFT["max_steps"], "SFT optimiser steps.")
    sft_lr: float = arg(SFT["lr"], "SFT peak learning rate.")
    sft_eval_every: int = arg(REPORT["sft"]["eval_every"], "SFT validation (loss and greedy NDCG) every this many "
                                                           "steps.")
    # RL (every RL arm)
    rl_steps: int = arg(RL["steps"], "Sampling rounds per RL arm (mu = 2 arms take 2 optimiser steps per round).")
    rl_lr: float = arg(RL["lr"], "RL learning rate (constant, as the paper's 0.5B schedule).")
    prompts_per_step: int = arg(RL["prompts_per_step"], "Prompts per round (x G completions).")
    group_size: int = arg(RL["group_size"], "G, completions per prompt (paper 8).")
    beta: float = arg(RL["beta"], "KL coefficient (the paper's; the reference model is present).")
    max_new_tokens: int = arg(MAX_NEW_TOKENS, "Completion budget of RL and evaluation (a 20-line list is 60 "
                                              "tokens with title tokens, 3 a line; the rest leaves room for "
                                              "overflow lines).")
    stop_after_lines: int = arg(RL["stop_after_lines"], "Stop a completion after this many lines (N + 1 still "
                                                        "shows overflow).")
    eval_every: int = arg(REPORT["rl"]["eval_every"], "Validation NDCG@20 (greedy) every this many rounds.")
    val_examples: int = arg(REPORT["rl"]["val_examples"], "Validation conversations for the curves.")
    seed: int = arg(SEED, "Seed of every training run (the paper's).")
    arms: list[str] = arg([], "Only these RL arms (names as in the tables, e.g. on/rank_grpo_exp_inf); "
                              "empty: all.")
    sft_arms: list[str] = arg([], "Only these SFT arms of Table 2 (full, no_reflect, no_remap_reflect); full "
                                  "is always run, it is every RL arm's start. Empty: all.")
    replicates: int = arg(2, "Extra training seeds (seed+1 .. seed+R): the replicated runs (--replicate) are "
                             "trained again at each, the RL arms of seed S from the SFT run of seed S. A claim is "
                             "shown only if it holds at every seed. --quick sets 0.")
    replicate: str = arg("core", "Which runs the extra seeds cover: 'core' (the full-RRA SFT run, the on-policy "
                                 "arms and R1-zero), or 'all' (every SFT and RL run; about 40% more compute). Claims "
                                 "on runs without replicates are reported at one seed and not judged.",
                         choices=("all", "core"))
    select_rl_lrs: list[float] = arg([RL["lr"], 3 * RL["lr"]],
                                     "Choose learning rates on validation before any test score: each arm judged "
                                     "at every seed (and the on-policy counterparts of the others, LR_SOURCE) is "
                                     "trained at the main seed at each of these and each --select-group-shapes "
                                     "(OUT/select/) and scored on every validation conversation; the highest "
                                     "NDCG@20 wins, at every seed, and the run it chose is the main seed's run. "
                                     "Empty: no selection, every arm at --rl-lr and --group-size x "
                                     "--prompts-per-step.")
    select_group_shapes: list[str] = arg([f"{RL['group_size']}x{RL['prompts_per_step']}",
                                          f"{2 * RL['group_size']}x{RL['prompts_per_step'] // 2}"],
                                         "Group shapes 'GxP' (G completions for each of P prompts a round) tried "
                                         "with every --select-rl-lrs: the same completions a round, and a larger "
                                         "G leaves fewer (prompt, rank) groups whose G rewards are all equal.")
    constrained_eval: bool = arg(True, "Also score every SFT run and every RL run started from SFT, at every "
                                       "seed, with greedy lists that cannot repeat a film (evaluate.py --constrained "
                                       "--no-exclude-seen; these students are already in catalog, so the ban "
                                       "on repeats is the only change). Not the paper's protocol: its own "
                                       "section and claims show what the repeats hide.")

    def validate(self) -> None:
        if self.quick:
            self.n_train, self.n_validation, self.n_test = 1000, 40, 100
            self.sft_steps, self.sft_eval_every, self.rl_steps, self.eval_every, self.val_examples = 40, 40, 3, 3, 20
            self.pretrain_steps, self.pretrain_chat_questions = min(self.pretrain_steps, 60), 1000
            self.replicates = 0
            self.out = self.out.rstrip("/") + "_quick"
            if self.results == RESULTS_DEFAULT:  # a smoke run never overwrites the committed report
                self.results = str(Path(self.out) / "results")
        if self.jobs < 1:
            raise SystemExit("error: --jobs must be at least 1")
        if self.replicates < 0:
            raise SystemExit("error: --replicates must be at least 0")


# ----------------------------------------------------------------------------- the arms


@dataclass(frozen=True)
class Arm:
    """One RL run: algorithm, return, mu, and where it starts."""

    name: str
    label: str
    algo: str
    reward: str
    mu: int
    start: str = "sft/full"  # a run directory under OUT (its final/), or "world" for the base model
    seed_offset: int = 0  # trained with seed + seed_offset (replicates only)
    constrained: bool = False  # rollouts, ratios, KL and rewards under the no-repeat constraint (--constrained)


RL_ARMS = (
    Arm("on/grpo", "+ SFT + Vanilla GRPO", "grpo", "exp_inf", 1),
    Arm("on/rank_grpo_log", "+ SFT + Rank-GRPO (log)", "rank_grpo", "dcg", 1),
    Arm("on/rank_grpo_exp_inf", "+ SFT + Rank-GRPO (exp∞)", "rank_grpo", "exp_inf", 1),
    Arm("off/grpo", "+ SFT + Vanilla GRPO (μ=2)", "grpo", "exp_inf", 2),
    Arm("off/gspo", "+ SFT + GSPO (μ=2)", "gspo", "exp_inf", 2),
    Arm("off/rank_grpo_log", "+ SFT + Rank-GRPO (log, μ=2)", "rank_grpo", "dcg", 2),
    Arm("off/rank_grpo_exp_inf", "+ SFT + Rank-GRPO (exp∞, μ=2)", "rank_grpo", "exp_inf", 2),
    Arm("r1zero/rank_grpo_exp_inf", "– remove SFT (R1-zero, exp∞)", "rank_grpo", "exp_inf", 1, start="world"),
    # trained where they are scored in the no-repeat decoding: every rollout a list with no film twice
    Arm("con/grpo", "+ SFT + Vanilla GRPO, trained without repeats", "grpo", "exp_inf", 1, constrained=True),
    Arm("con/rank_grpo_exp_inf", "+ SFT + Rank-GRPO (exp∞), trained without repeats", "rank_grpo", "exp_inf", 1,
        constrained=True),
)
# (name, build_demos flags, label)
SFT_ARMS = (
    ("full", [], "+ SFT (full RRA)"),
    ("no_reflect", ["--no-reflect"], "– remove reflect"),
    ("no_remap_reflect", ["--no-remap-reflect"], "– remove remap-reflect"),
)
REPLICATED_RL = ("on/grpo", "on/rank_grpo_log", "on/rank_grpo_exp_inf", "con/grpo", "con/rank_grpo_exp_inf")
# The runs also scored with greedy lists that cannot repeat a film (--constrained-eval), at every seed
# they are trained at: every SFT arm and every RL arm started from SFT.
CONSTRAINED = "constrained/"  # their evaluation names: constrained/sft/full, constrained/rl/seed3408/on/grpo
CONSTRAINED_RUNS = tuple(f"sft/{n}" for n, _, _ in SFT_ARMS) + tuple(f"rl/{a.name}" for a in RL_ARMS
                                                                      if a.start != "world")


def selected_sft(cfg: PaperTablesConfig) -> list[tuple[str, list[str], str]]:
    unknown = set(cfg.sft_arms) - {n for n, _, _ in SFT_ARMS}
    if unknown:
        raise SystemExit(f"error: unknown SFT arm(s) {sorted(unknown)}; known: {[n for n, _, _ in SFT_ARMS]}")
    return [a for a in SFT_ARMS if not cfg.sft_arms or a[0] in cfg.sft_arms or a[0] == "full"]


def seeds(cfg: PaperTablesConfig) -> list[int]:
    """The training seeds of every run: seed, seed+1, .., seed+replicates."""
    return [cfg.seed + i for i in range(cfg.replicates + 1)]


def replicate_arms(cfg: PaperTablesConfig) -> list[Arm]:
    """Every selected RL arm again with seeds seed+1 .. seed+R, named ``seed{S}/<arm>``. A replicate
    starts from the full-RRA SFT run of its own seed (R1-zero from the base model), so seed S is a
    whole second pipeline after the demonstrations: SFT and RL both drawn anew."""
    return [replace(a, name=f"seed{cfg.seed + i}/{a.name}", seed_offset=i,
                    start=a.start if a.start == "world" else f"sft/seed{cfg.seed + i}/full")
            for i in range(1, cfg.replicates + 1) for a in selected_arms(cfg)
            if cfg.replicate == "all" or a.mu == 1]


def replicate_sft(cfg: PaperTablesConfig) -> list[tuple[str, str, int]]:
    """(SFT run name under OUT/sft, demonstrations it learns from, seed offset) of the SFT
    replicates: every selected SFT arm at seeds seed+1 .. seed+R (full-RRA whatever --sft-arms
    says: it is every RL replicate's start)."""
    return [(f"seed{cfg.seed + i}/{name}", name, i) for i in range(1, cfg.replicates + 1)
            for name, _, _ in selected_sft(cfg) if cfg.replicate == "all" or name == "full"]


def differing(defaults: Mapping[str, Any], values: dict[str, Any]) -> list[str]:
    """Flags for the entries of ``values`` that ``defaults`` (a script's sandbox preset, which the
    script applies by itself) does not hold or holds with another value.

    >>> differing({"lr": 0.5, "steps": 9}, {"lr": 0.5, "steps": 2, "eval_every": 4})
    ['--steps', '2', '--eval-every', '4']
    """
    return to_flags({k: v for k, v in values.items() if k not in defaults or defaults[k] != v})


def plan(cfg: PaperTablesConfig, chosen: Mapping[str, Mapping[str, Any]] | None = None) -> list[Task]:
    """Every stage as a task, in priority order (the critical path and the long RL arms first).

    Every script runs at its sandbox preset (rankgrpo/sandbox/settings.py): a command names its
    paths, what makes its arm (algorithm, return, mu, seed, ablation), the report's validation
    curves and whole test split (``REPORT``), and any setting this run changes (--quick, a flag)."""
    out, py = Path(cfg.out), cfg.python or sys.executable
    world = out / "world"
    data = dict(catalog=str(world / "catalog.jsonl"), train=str(world / "train.jsonl"),
                val=str(world / "validation.jsonl"), test=str(world / "test.jsonl"))
    world_values = dict(seed=cfg.world_seed, n_films=cfg.n_films, n_train=cfg.n_train, n_validation=cfg.n_validation,
                        n_test=cfg.n_test, title_tokens=cfg.title_tokens, tie_embeddings=cfg.tie_embeddings,
                        pretrain_steps=cfg.pretrain_steps, pretrain_chat_questions=cfg.pretrain_chat_questions)
    sft_values = dict(max_steps=cfg.sft_steps, lr=cfg.sft_lr, eval_every=cfg.sft_eval_every,
                      save_every=cfg.sft_eval_every,
                      val_gen_examples=min(cfg.val_examples, REPORT["sft"]["val_gen_examples"]))
    rl_values = dict(steps=cfg.rl_steps, lr=cfg.rl_lr, prompts_per_step=cfg.prompts_per_step,
                     group_size=cfg.group_size, beta=cfg.beta, max_new_tokens=cfg.max_new_tokens,
                     stop_after_lines=cfg.stop_after_lines, eval_every=cfg.eval_every, val_examples=cfg.val_examples,
                     save_every=cfg.eval_every)
    tasks = [Task("world", [py, "-m", "rankgrpo.sandbox", "--out", str(world), "--preset", "demo",
                            *differing(WORLD, world_values)],
                  world / "base_model" / "config.json", alone=True)]
    for name, flags, _ in selected_sft(cfg):
        demos = out / "demos" / name
        tasks.append(Task(f"demos/{name}", [py, "build_demos.py", "--world", str(world), "--out", str(demos), *flags],
                          demos / "train.jsonl", ["world"]))
    sft_runs = [(name, name, 0) for name, _, _ in selected_sft(cfg)] + replicate_sft(cfg)
    for name, demos_name, offset in sft_runs:
        demos, run = out / "demos" / demos_name, out / "sft" / name
        tasks.append(Task(f"sft/{name}", [py, "train_sft.py", "--model", str(world / "base_model"),
                                          "--train-data", str(demos / "train.jsonl"),
                                          "--val-data", str(demos / "validation.jsonl"), "--catalog", data["catalog"],
                                          "--out", str(run), "--seed", str(cfg.seed + offset),
                                          *differing(SFT, sft_values), "--resume"],
                          run / "final" / "config.json", [f"demos/{demos_name}"]))
    for arm in selected_arms(cfg) + replicate_arms(cfg):
        run = out / "rl" / arm.name
        start = world / "base_model" if arm.start == "world" else out / arm.start / "final"
        tasks.append(Task(f"rl/{arm.name}", [
            py, "train_rankgrpo.py", "--model", str(start), "--data", data["train"], "--val-data", data["val"],
            "--catalog", data["catalog"], "--out", str(run), "--algo", arm.algo, "--reward", arm.reward,
            "--mu", str(arm.mu), "--seed", str(cfg.seed + arm.seed_offset),
            *differing(RL, rl_values | {k: v for k, v in (chosen or {}).get(base_arm(arm.name), {}).items()
                                        if k in SELECTED_FIELDS}),
            # trained in the decoding the no-repeat evaluation scores: no film twice (seen films allowed)
            *(["--constrained", "--no-exclude-seen"] if arm.constrained else []), "--resume"],
            run / "final" / "config.json", ["world" if arm.start == "world" else arm.start]))
    for name, model, dep in eval_targets(cfg):
        tasks.append(eval_task(cfg, f"eval/{name}", model, "test", out / "eval" / name, name.startswith(CONSTRAINED),
                               dep, label=name))
    return tasks


def eval_task(cfg: PaperTablesConfig, task: str, model: Path, split: str, dest: Path, no_repeats: bool, dep: str,
              label: str = "") -> Task:
    """evaluate.py on every conversation of the world's ``split`` ('test' or 'validation'), greedy,
    at the report's evaluation settings; ``no_repeats``: lists that cannot name a film twice."""
    world = Path(cfg.out) / "world"
    eval_values = dict(max_new_tokens=cfg.max_new_tokens, **REPORT["evaluate"])
    return Task(task, [cfg.python or sys.executable, "evaluate.py", "--model", str(model),
                       "--data", str(world / f"{split}.jsonl"), "--catalog", str(world / "catalog.jsonl"),
                       "--name", label or task, "--out", str(dest), *differing(EVALUATE, eval_values),
                       *(["--constrained", "--no-exclude-seen"] if no_repeats else [])],
                dest / "results.json", [dep])


def base_arm(name: str) -> str:
    """The arm a replicate repeats: 'seed3408/on/grpo' -> 'on/grpo'.

    >>> base_arm("seed3408/on/grpo"), base_arm("off/gspo")
    ('on/grpo', 'off/gspo')
    """
    return re.sub(r"^seed\d+/", "", name)


# The selection (--select-rl-lrs x --select-group-shapes) trains the arms judged at every seed.
# Each other arm takes the learning rate and group shape chosen for its counterpart, named here (an
# off-policy arm: its on-policy arm; GSPO: GRPO's; R1-zero: Rank-GRPO exp∞'s), so no setting is
# ever picked on test.
LR_SOURCE = {"off/grpo": "on/grpo", "off/gspo": "on/grpo", "off/rank_grpo_log": "on/rank_grpo_log",
             "off/rank_grpo_exp_inf": "on/rank_grpo_exp_inf", "r1zero/rank_grpo_exp_inf": "on/rank_grpo_exp_inf"}


def lr_source(arm: str) -> str:
    """The arm whose validation choice sets ``arm``'s learning rate and group shape.

    >>> lr_source("off/gspo"), lr_source("con/grpo")
    ('on/grpo', 'con/grpo')
    """
    return LR_SOURCE.get(arm, arm)


def selection_arms(cfg: PaperTablesConfig) -> list[Arm]:
    """The arms trained at every candidate rate: the lr sources of the selected arms."""
    wanted = {lr_source(a.name) for a in selected_arms(cfg)}
    return [a for a in RL_ARMS if a.name in wanted]


# What the selection chooses per arm: train_rankgrpo.py fields
SELECTED_FIELDS = ("lr", "group_size", "prompts_per_step")


def group_shape(text: str) -> tuple[int, int]:
    """'16x4' -> (G, prompts) = (16, 4).

    >>> group_shape("16x4")
    (16, 4)
    """
    try:
        g, p = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: group shape {text!r} is not GxP (e.g. 16x4)") from None
    return g, p


def candidates(cfg: PaperTablesConfig) -> list[dict[str, Any]]:
    """Every setting the selection tries: {lr, group_size, prompts_per_step} for each rate x shape."""
    shapes = cfg.select_group_shapes or [f"{cfg.group_size}x{cfg.prompts_per_step}"]
    return [{"lr": lr, "group_size": group_shape(sh)[0], "prompts_per_step": group_shape(sh)[1]}
            for lr in sorted(cfg.select_rl_lrs) for sh in shapes]


def candidate_name(c: Mapping[str, Any]) -> str:
    """The run directory name of a candidate: 'lr0.0001_g16x4'."""
    return f"lr{c['lr']:g}_g{c['group_size']}x{c['prompts_per_step']}"


def selection_tasks(cfg: PaperTablesConfig) -> list[Task]:
    """Every selection arm at the main seed at each candidate of ``candidates`` (OUT/select/), then
    its final checkpoint scored on every validation conversation in the decoding it was trained in;
    never on test. What they need (world, full-RRA SFT) comes first."""
    everything = plan(replace(cfg, arms=[a.name for a in selection_arms(cfg)]))
    tasks = {t.name: t for t in everything}
    out = [tasks[n] for n in ("world", "demos/full", "sft/full")]
    for arm in selection_arms(cfg):
        t = tasks[f"rl/{arm.name}"]
        for c in candidates(cfg):
            run = selection_dir(cfg, arm.name, c)
            cmd = list(t.cmd)
            cmd[cmd.index("--out") + 1] = str(run)
            for field, value in c.items():
                flag = "--" + field.replace("_", "-")
                if flag in cmd:
                    cmd[cmd.index(flag) + 1] = f"{value:g}"
                else:
                    cmd += [flag, f"{value:g}"]
            name = f"select/{arm.name}/{candidate_name(c)}"
            out.append(Task(name, cmd, run / "final" / "config.json", t.deps))
            out.append(eval_task(cfg, f"{name}/val", run / "final", "validation", run / "val_eval", arm.constrained,
                                 name))
    return out


def selection_dir(cfg: PaperTablesConfig, arm: str, candidate: Mapping[str, Any]) -> Path:
    return Path(cfg.out) / "select" / arm / candidate_name(candidate)


def validation_ndcg(path: Path) -> float:
    """Mean NDCG@20 of a validation evaluation's results.json."""
    return json.loads(path.read_text(encoding="utf-8"))["results"]["ndcg@20"]["mean"]


def choose_rl_settings(cfg: PaperTablesConfig) -> dict[str, dict]:
    """{arm: {"scores": {candidate name: validation NDCG@20}, "chosen": {lr, group_size,
    prompts_per_step}}} for every selection arm, the highest score winning (ties: the earlier
    candidate, i.e. the smaller lr, then the first shape), and {arm: {"from": source, "chosen": ...}}
    for the selected arms that take their source's settings."""
    out: dict[str, dict] = {}
    for arm in selection_arms(cfg):
        cands = candidates(cfg)
        scores = [validation_ndcg(selection_dir(cfg, arm.name, c) / "val_eval" / "results.json") for c in cands]
        best = max(range(len(cands)), key=lambda i: (scores[i], -i))
        out[arm.name] = {"scores": {candidate_name(c): v for c, v in zip(cands, scores)}, "chosen": cands[best]}
    for arm in selected_arms(cfg):
        if arm.name not in out:
            out[arm.name] = {"from": lr_source(arm.name), "chosen": out[lr_source(arm.name)]["chosen"]}
    return out


def reuse_selection_runs(cfg: PaperTablesConfig, selection: Mapping[str, dict]) -> None:
    """The main seed's run of a selection arm is its selection run of the chosen settings (the same
    command but for --out): OUT/rl/<arm> becomes a link to it instead of a second, identical training."""
    for arm in selected_arms(cfg):
        sel = selection[arm.name]
        if "scores" not in sel:
            continue
        link = Path(cfg.out) / "rl" / arm.name
        target = selection_dir(cfg, arm.name, sel["chosen"]).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.exists() or link.is_symlink():
            raise SystemExit(f"error: {link} exists but is not the selection run {target}; delete it to go on")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("..", *([".."] * (len(Path(arm.name).parts) - 1)), "select", arm.name,
                             candidate_name(sel["chosen"])))


def decoding_tasks(cfg: PaperTablesConfig) -> list[Task]:
    """The full-RRA SFT run and every selected RL arm started from SFT, at the main seed, scored on
    validation in both decodings (OUT/val_eval/): what chooses the report's decoding."""
    out = Path(cfg.out)
    runs = [("sft/full", out / "sft" / "full" / "final")]
    runs += [(f"rl/{a.name}", out / "rl" / a.name / "final") for a in selected_arms(cfg) if a.start != "world"]
    return [eval_task(cfg, f"val/{mode}{name}", model, "validation", out / "val_eval" / f"{mode}{name}", bool(mode),
                      name) for name, model in runs for mode in ("", CONSTRAINED)]


def choose_decoding(cfg: PaperTablesConfig) -> dict:
    """{"scores": {"paper": mean validation NDCG@20, "no_repeats": ...}, "runs": [...], "chosen": ...}:
    the decoding with the higher mean validation NDCG@20 over the runs of ``decoding_tasks`` (ties:
    the paper's). It does not favour an arm: every run started from SFT counts once, SFT too."""
    out = Path(cfg.out)
    names = sorted({t.name.removeprefix("val/").removeprefix(CONSTRAINED) for t in decoding_tasks(cfg)})
    scores = {mode: float(np.mean([validation_ndcg(out / "val_eval" / f"{prefix}{n}" / "results.json")
                                   for n in names]))
              for mode, prefix in (("paper", ""), ("no_repeats", CONSTRAINED))}
    chosen = "no_repeats" if scores["no_repeats"] > scores["paper"] else "paper"
    return {"scores": scores, "runs": names, "chosen": chosen}


def selected_arms(cfg: PaperTablesConfig) -> list[Arm]:
    unknown = set(cfg.arms) - {a.name for a in RL_ARMS}
    if unknown:
        raise SystemExit(f"error: unknown arm(s) {sorted(unknown)}; known: {[a.name for a in RL_ARMS]}")
    return [a for a in RL_ARMS if not cfg.arms or a.name in cfg.arms]


def eval_targets(cfg: PaperTablesConfig) -> list[tuple[str, Path, str]]:
    """(evaluation name, checkpoint, task it needs): RL arms first (they finish last); with
    ``constrained_eval`` the ``CONSTRAINED_RUNS`` at every seed again, decoded without repeats."""
    out = Path(cfg.out)
    targets = [(f"rl/{a.name}", out / "rl" / a.name / "final", f"rl/{a.name}") for a in selected_arms(cfg)]
    targets += [(f"sft/{n}", out / "sft" / n / "final", f"sft/{n}") for n, _, _ in selected_sft(cfg)]
    targets.append(("base", out / "world" / "base_model", "world"))
    targets += [(f"rl/{a.name}", out / "rl" / a.name / "final", f"rl/{a.name}") for a in replicate_arms(cfg)]
    targets += [(f"sft/{n}", out / "sft" / n / "final", f"sft/{n}") for n, _, _ in replicate_sft(cfg)]
    if cfg.constrained_eval:
        targets += [(f"{CONSTRAINED}{name}", model, dep) for name, model, dep in targets
                    if main_seed_name(name) in CONSTRAINED_RUNS]
    return targets


def main_seed_name(name: str) -> str:
    """The run name at the main seed: 'rl/seed3408/on/grpo' -> 'rl/on/grpo' (at_seed's inverse).

    >>> main_seed_name("sft/seed3409/full"), main_seed_name("constrained/rl/on/grpo")
    ('sft/full', 'constrained/rl/on/grpo')
    """
    return re.sub(r"^((?:constrained/)?(?:sft|rl))/seed\d+/", r"\1/", name)


# ----------------------------------------------------------------------------- the scheduler


def run_tasks(tasks: list[Task], cfg: PaperTablesConfig) -> dict[str, float]:
    """The stages, at most ``cfg.jobs`` at once (``rankgrpo.task_runner.run_tasks``)."""
    return run_task_graph(tasks, Path(cfg.out), cfg.jobs, cwd=ROOT)


# ----------------------------------------------------------------------------- numbers


def load_eval(out: Path, name: str) -> tuple[dict, dict[str, dict]] | None:
    """(aggregate results, per-example rows by id) of one evaluation, or None if it is missing."""
    path = out / "eval" / name / "results.json"
    if not path.exists():
        return None
    agg = json.loads(path.read_text())["results"]
    rows = {r["id"]: r for r in read_jsonl_tolerant(out / "eval" / name / "examples.jsonl")}
    return agg, rows


def paired(a: dict[str, dict], b: dict[str, dict], metric: str) -> dict:
    """``rankgrpo.stats.paired_difference`` (mean, standard error clustered by prompt, z, n of a - b
    over the shared examples) plus how many examples got better / worse."""
    d = [a[i][metric] - b[i][metric] for i in set(a) & set(b)]
    return (paired_difference(a, b, metric, clusters=prompt_clusters(a, b))
            | {"better": sum(x > 0 for x in d), "worse": sum(x < 0 for x in d)})


def z_score(diff: dict) -> float:
    """A paired difference's mean in standard errors (0 when the standard error is 0)."""
    return diff["mean"] / diff["stderr"] if diff["stderr"] > 0 else 0.0


def verdict(diff: dict) -> str:
    """'holds' if the paired difference is above 2 standard errors, 'reversed' if below -2, else
    'not resolved' (same sign or not, it is within noise)."""
    z = z_score(diff)
    if z > 2:
        return f"holds (+{diff['mean']:.4f}, {z:.1f} SE)"
    if z < -2:
        return f"reversed ({diff['mean']:+.4f}, {z:.1f} SE)"
    return f"not resolved ({diff['mean']:+.4f}, {z:+.1f} SE)"


def grows_with_k(gains: list[float], z_at_20: float) -> str:
    """Verdict on "gains grow with k" from the NDCG gains at k = 5, 10, 15, 20 and the z-score
    (gain / standard error) of the paired gain at k = 20: 'not resolved' if that gain is within
    2 SE of zero (there is nothing to grow); else 'holds' if the gains never fall as k grows and
    end larger than they start, 'does not hold' otherwise."""
    if not z_at_20 > 2:
        return f"not resolved (the gain at k = 20 is {z_at_20:+.1f} SE)"
    rising = all(x <= y for x, y in zip(gains, gains[1:])) and gains[-1] > gains[0]
    return "holds" if rising else "does not hold"


def cell(agg: dict, key: str) -> str:
    v = agg.get(key)
    return f"{v['mean']:.4f} ±{v['stderr']:.4f}" if v else "–"


def table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: R@5-20 and N@5-20 with standard errors, in-catalog and format-valid ratios."""
    head = ["Method"] + [f"R@{k}" for k in KS] + [f"N@{k}" for k in KS] + ["in-catalog"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, agg in rows:
        cells = [cell(agg, f"recall@{k}") for k in KS] + [cell(agg, f"ndcg@{k}") for k in KS]
        cells.append(f"{agg['in_catalog']['mean']:.3f}" if "in_catalog" in agg else "–")
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def delta_table(pairs: list[tuple[str, dict, dict]]) -> str:
    """Markdown: paired differences at every k (NDCG), mean ±SE, and better/worse counts at k = 20."""
    head = ["Comparison"] + [f"ΔN@{k}" for k in KS] + ["ΔR@20", "better / worse (N@20)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, a, b in pairs:
        ds = [paired(a, b, f"ndcg@{k}") for k in KS]
        r = paired(a, b, "recall@20")
        lines.append("| " + " | ".join([label] + [f"{d['mean']:+.4f} ±{d['stderr']:.4f}" for d in ds]
                                       + [f"{r['mean']:+.4f} ±{r['stderr']:.4f}",
                                          f"{ds[-1]['better']} / {ds[-1]['worse']}"]) + " |")
    return "\n".join(lines)


BASELINES = (("popularity", "popularity", "Popularity (traditional floor)"),
             ("teacher", "teacher (raw)", "Simulated teacher, raw (GPT-4o stand-in)"),
             ("oracle", "oracle", "Oracle (latent relevance, ceiling)"))


def baselines(out: Path, n_items: int = 20) -> tuple[dict[str, dict], dict[str, dict[str, dict]]]:
    """Popularity, the raw simulated teacher (the GPT-4o stand-in) and the oracle on the test split:
    ({name: aggregate}, {name: {example id: score row}}), names as in ``BASELINES``."""
    from rankgrpo.sandbox import calibrate, load_world

    res, rows = calibrate(load_world(out / "world"), split="test", n_items=n_items, per_example=True)
    return ({name: res[key] for name, key, _ in BASELINES}, {name: rows[key] for name, key, _ in BASELINES})


def list_shape(rows: dict[str, dict], n_items: int = 20) -> dict:
    """How the greedy lists look, from the completions themselves. Within a list: mean valid lines,
    mean distinct (normalised title, year) items among the first ``n_items`` lines, the share of
    lists that repeat an item. Across conversations: how many different lists (as ordered sets of
    distinct items) and different items the model produced at all, and the share of conversations
    that got the single most common list. A model that repeats titles cannot gain at large k; one
    that gives most conversations the same list has not learned to read the conversation.

    Example: lists "A, B, A" / "A, B" / "C" give valid lines (3 + 2 + 1) / 3 = 2.0, distinct items
    (2 + 2 + 1) / 3, repeats 1/3; across them 2 different lists ((A, B) twice), 3 items, and the
    most common list's share 2/3."""
    from rankgrpo.catalog import normalize_title
    from rankgrpo.parsing import parse_recommendations

    lines, distinct, repeats, lists, used = [], [], [], {}, set()
    for row in rows.values():
        items = [it for it in parse_recommendations(row["completion"])[:n_items] if it.valid]
        keys = list(dict.fromkeys((normalize_title(it.title), it.year) for it in items))
        lines.append(len(items))
        distinct.append(len(keys))
        repeats.append(len(keys) < len(items))
        if keys:
            lists[tuple(keys)] = lists.get(tuple(keys), 0) + 1
            used.update(keys)
    return {"valid_lines": float(np.mean(lines)), "distinct_items": float(np.mean(distinct)),
            "lists_with_repeats": float(np.mean(repeats)), "different_lists": len(lists),
            "different_items": len(used),
            "top_list_share": max(lists.values()) / len(rows) if lists else 0.0}


def rl_log(out: Path, arm: str) -> tuple[list[dict], list[dict]]:
    """(training rows of the first pass of each round, validation rows) of one RL arm."""
    rows = read_jsonl_tolerant(out / "rl" / arm / "log.jsonl") if (out / "rl" / arm / "log.jsonl").exists() else []
    return ([r for r in rows if "loss" in r and r.get("iteration", 0) == 0],
            [r for r in rows if "val_ndcg@20" in r])


def step_breakdown(out: Path, arm: str) -> dict:
    """Mean seconds per stage of an RL round (the first round skipped as warm-up). A round of an
    off-policy arm has mu log rows: time/update there is cumulative over the round, and the policy
    forward time of each optimiser step is summed."""
    path = out / "rl" / arm / "log.jsonl"
    rounds: dict[int, list[dict]] = {}
    for r in read_jsonl_tolerant(path) if path.exists() else []:
        if "loss" in r:
            rounds.setdefault(r["step"], []).append(r)
    per_round = []
    for step in sorted(rounds)[1:]:
        rows, last = rounds[step], rounds[step][-1]
        forward = sum(r.get("time/policy_forward", float("nan")) for r in rows)
        per_round.append({"sample": last["time/sample"], "score": last["time/score"], "ref": last["time/ref"],
                          "policy_forward": forward, "backward_optimizer": last["time/update"] - forward,
                          "total": last["time/sample"] + last["time/score"] + last["time/ref"] + last["time/update"],
                          "completion_tokens": last["completion_tokens"],
                          "samples_per_s": last["samples_per_s"]})  # the round's completions / its seconds
    if not per_round:
        return {}
    out_row = {k: float(np.mean([r[k] for r in per_round])) for k in per_round[0]}
    out_row["rounds"] = len(per_round)
    return out_row


# ----------------------------------------------------------------------------- figures


def smooth(y: list[float], w: int) -> np.ndarray:
    """Trailing moving average over ``w`` rounds (the paper's curves are smoothed too)."""
    y = np.asarray(y, dtype=float)
    if w <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), w)
    return (c[np.arange(1, len(y) + 1)] - c[np.arange(1, len(y) + 1) - n]) / n


def plot_rewards(out: Path, arms: list[Arm], path: Path, window: int) -> Path:
    """One panel per arm: training reward rel_k at ranks 1, 2, 5, 10, 15, 20 against round."""
    from rankgrpo.plots import _pyplot

    plt = _pyplot()
    cols = 4
    nrows = math.ceil(len(arms) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False, sharey=True)
    for ax, arm in zip(axes.flat, arms):
        train, _ = rl_log(out, arm.name)
        for k in PLOT_RANKS:
            if train and f"reward/rank_{k}" in train[0]:
                ax.plot([r["step"] for r in train], smooth([r[f"reward/rank_{k}"] for r in train], window),
                        label=f"rank {k}")
        ax.set_title(arm.name, fontsize=9)
        ax.set_xlabel("round")
    for ax in axes.flat[len(arms):]:
        ax.axis("off")
    axes[0, 0].set_ylabel(f"hit rate rel_k (moving avg {window})")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Per-rank training reward (rollouts at temperature 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_validation(out: Path, arms: list[Arm], path: Path, replicates: tuple[Arm, ...] = ()) -> Path:
    """Validation NDCG@20 (greedy) against round, on-policy and off-policy panels; seed replicates
    dashed in their arm's colour."""
    from rankgrpo.plots import _pyplot

    plt = _pyplot()
    groups = [("on-policy (μ = 1) and R1-zero", [a for a in arms if a.mu == 1]),
              ("off-policy (μ = 2)", [a for a in arms if a.mu == 2])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, (title, group) in zip(axes, groups):
        for arm in group:
            _, val = rl_log(out, arm.name)
            line, = ax.plot([r["step"] for r in val], [r["val_ndcg@20"] for r in val], marker="o", ms=3,
                            label=arm.name)
            for rep in (r for r in replicates if r.name.endswith("/" + arm.name)):
                _, val = rl_log(out, rep.name)
                ax.plot([r["step"] for r in val], [r["val_ndcg@20"] for r in val], ls="--", marker="o", ms=2,
                        color=line.get_color(), label=rep.name)
        ax.set_title(title)
        ax.set_xlabel("round (sampled batch)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation NDCG@20 (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_catalog(out: Path, arms: list[Arm], path: Path) -> Path:
    """Validation in-catalog ratio against round (the paper's Fig. 6 catalog drift)."""
    from rankgrpo.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm in arms:
        if arm.start == "world":
            continue
        _, val = rl_log(out, arm.name)
        ax.plot([r["step"] for r in val], [r["val_in_catalog"] for r in val], marker="o", ms=3, label=arm.name)
    ax.set_xlabel("round")
    ax.set_ylabel("validation in-catalog ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the report


def at_seed(name: str, seed: int, cfg: PaperTablesConfig) -> str:
    """The evaluation name of run ``name`` (e.g. 'rl/on/grpo') trained with ``seed``:
    'rl/seed3408/on/grpo'; the main seed keeps the plain name."""
    if name.startswith(CONSTRAINED):
        return CONSTRAINED + at_seed(name[len(CONSTRAINED):], seed, cfg)
    if seed == cfg.seed or not name.startswith(("sft/", "rl/")):
        return name
    kind, rest = name.split("/", 1)
    return f"{kind}/seed{seed}/{rest}"


def noise_section(cfg: PaperTablesConfig, agg: dict, per: dict, label: dict) -> list[str]:
    """Markdown: N@5 and N@20 of every trained run at every seed, their mean and spread, and the
    ratio Rank-GRPO (exp∞) / GRPO at each seed. Empty without replicates."""
    if not cfg.replicates:
        return []
    ss = seeds(cfg)
    md = ["## Every run at every training seed", "",
          "The standard errors above are over test conversations for one trained model each; they leave out "
          "how much a training run varies with its seed. "
          + ("Every SFT and RL run" if cfg.replicate == "all" else
             "The full-RRA SFT run, the on-policy arms and R1-zero (--replicate core)")
          + f" are trained at {len(ss)} seeds (world and demonstrations fixed; at seed S the RL arms start from "
          "the SFT run of seed S).", "",
          "| run | " + " | ".join(f"N@20 seed {s}" for s in ss) + " | mean | spread (max − min) | "
          + " | ".join(f"N@5 seed {s}" for s in ss) + " |",
          "|---|" + "---|" * (2 * len(ss) + 2)]
    names = [n for n in agg if n.startswith(("sft/", "rl/", CONSTRAINED)) and "/seed" not in n
             and all(at_seed(n, s, cfg) in agg for s in ss)]
    for name in names:
        v20 = [agg[at_seed(name, s, cfg)]["ndcg@20"]["mean"] for s in ss]
        v5 = [agg[at_seed(name, s, cfg)]["ndcg@5"]["mean"] for s in ss]
        md.append(f"| {label[name]} | " + " | ".join(f"{v:.4f}" for v in v20)
                  + f" | {np.mean(v20):.4f} | {max(v20) - min(v20):.4f} | " + " | ".join(f"{v:.4f}" for v in v5) + " |")
    for prefix, how in (("", ""), (CONSTRAINED, ", decoded without repeats")):
        pair = (prefix + "rl/on/rank_grpo_exp_inf", prefix + "rl/on/grpo")
        if all(at_seed(n, s, cfg) in agg for n in pair for s in ss):
            ratios = [agg[at_seed(pair[0], s, cfg)]["ndcg@20"]["mean"]
                      / max(agg[at_seed(pair[1], s, cfg)]["ndcg@20"]["mean"], 1e-12) for s in ss]
            md += ["", f"On-policy N@20 ratio Rank-GRPO (exp∞) / GRPO at equal rounds{how} (the paper's 0.5B model: "
                   "0.1079 / 0.0945 = 1.14): " + ", ".join(f"seed {s}: {r:.3f}" for s, r in zip(ss, ratios)) + "."]
    return md + [""]


CLAIMS = (
    # (claim, kind, a, b, k): kind "diff" is a - b > 0 on N@k; "grows" is "the N@k gain of a over
    # b grows with k". Names are the main seed's; at seed S they map through at_seed.
    ("SFT beats the popularity floor", "diff", "sft/full", "popularity", 20),
    ("on-policy: SFT + Rank-GRPO (exp∞) > SFT", "diff", "rl/on/rank_grpo_exp_inf", "sft/full", 20),
    ("on-policy: Rank-GRPO (exp∞) > Rank-GRPO (log)", "diff", "rl/on/rank_grpo_exp_inf", "rl/on/rank_grpo_log", 20),
    ("on-policy: Rank-GRPO (log) > GRPO", "diff", "rl/on/rank_grpo_log", "rl/on/grpo", 20),
    ("on-policy: Rank-GRPO (exp∞) > GRPO", "diff", "rl/on/rank_grpo_exp_inf", "rl/on/grpo", 20),
    ("on-policy: GRPO > SFT", "diff", "rl/on/grpo", "sft/full", 20),
    ("off-policy: Rank-GRPO (exp∞) > GRPO (μ=2)", "diff", "rl/off/rank_grpo_exp_inf", "rl/off/grpo", 20),
    ("off-policy: Rank-GRPO (exp∞) > GSPO (μ=2)", "diff", "rl/off/rank_grpo_exp_inf", "rl/off/gspo", 20),
    ("off-policy: Rank-GRPO (exp∞) > Rank-GRPO (log) (μ=2)", "diff", "rl/off/rank_grpo_exp_inf",
     "rl/off/rank_grpo_log", 20),
    ("gains over SFT grow with k (Rank-GRPO exp∞)", "grows", "rl/on/rank_grpo_exp_inf", "sft/full", 20),
    ("gains over SFT grow with k (GRPO)", "grows", "rl/on/grpo", "sft/full", 20),
    ("gains over GRPO grow with k (Rank-GRPO exp∞)", "grows", "rl/on/rank_grpo_exp_inf", "rl/on/grpo", 20),
    ("the student passes its teacher at the head of the list (Rank-GRPO exp∞ > raw teacher, N@5)", "diff",
     "rl/on/rank_grpo_exp_inf", "teacher", 5),
    ("removing SFT hurts (SFT + Rank-GRPO > R1-zero)", "diff", "rl/on/rank_grpo_exp_inf",
     "rl/r1zero/rank_grpo_exp_inf", 20),
    ("R1-zero learns (R1-zero Rank-GRPO > base model zero-shot)", "diff", "rl/r1zero/rank_grpo_exp_inf", "base", 20),
    ("full RRA SFT > remove remap-reflect", "diff", "sft/full", "sft/no_remap_reflect", 20),
    ("full RRA SFT > remove reflect", "diff", "sft/full", "sft/no_reflect", 20),
    ("off-policy lags on-policy at equal rounds (Rank-GRPO exp∞)", "diff", "rl/on/rank_grpo_exp_inf",
     "rl/off/rank_grpo_exp_inf", 20),
    # trained under the no-repeat constraint (scored in both decodings; the "no repeats:" versions below
    # are the decoding they were trained in)
    ("trained without repeats: SFT + Rank-GRPO (exp∞) > SFT", "diff", "rl/con/rank_grpo_exp_inf", "sft/full", 20),
    ("trained without repeats: Rank-GRPO (exp∞) > GRPO", "diff", "rl/con/rank_grpo_exp_inf", "rl/con/grpo", 20),
    ("trained without repeats: GRPO > SFT", "diff", "rl/con/grpo", "sft/full", 20),
    ("trained without repeats: gains over GRPO grow with k (Rank-GRPO exp∞)", "grows", "rl/con/rank_grpo_exp_inf",
     "rl/con/grpo", 20),
)


def without_repeats(name: str) -> str:
    """The evaluation name of run ``name`` decoded without repeats; a baseline ('teacher') stays.

    >>> without_repeats("rl/on/grpo"), without_repeats("teacher")
    ('constrained/rl/on/grpo', 'teacher')
    """
    return CONSTRAINED + name if name in CONSTRAINED_RUNS else name


# Every paper claim again on the lists decoded without repeats (--constrained-eval; not the paper's
# protocol) where all its runs are scored that way, and what the ban itself does to the SFT student.
_SCORED_WITHOUT_REPEATS = set(CONSTRAINED_RUNS) | {name for name, _, _ in BASELINES}
CLAIMS += (("no repeats: decoding without repeats helps the SFT student", "diff", without_repeats("sft/full"),
            "sft/full", 20),
           ("no repeats: Rank-GRPO (exp∞) > raw teacher, N@20", "diff", without_repeats("rl/on/rank_grpo_exp_inf"),
            "teacher", 20),
           *((f"no repeats: {claim}", kind, without_repeats(a), without_repeats(b), k) for claim, kind, a, b, k in CLAIMS
             if {a, b} <= _SCORED_WITHOUT_REPEATS and {a, b} & set(CONSTRAINED_RUNS)))


def combine_verdicts(words: list[str]) -> str:
    """One verdict over seeds from each seed's 'holds' / 'reversed' / 'not resolved' (or 'does
    not hold'): shown only if it holds at every seed, refuted only if reversed (does not hold) at
    every seed, else not shown with the count."""
    n = len(words)
    held = sum(w == "holds" for w in words)
    if held == n:
        return f"**shown** ({n}/{n} seeds)"
    if all(w in ("reversed", "does not hold") for w in words):
        return f"**refuted** ({n}/{n} seeds against)"
    against = sum(w in ("reversed", "does not hold") for w in words)
    return f"not shown (holds at {held}/{n}, against at {against}/{n})"


def judge_claims(cfg: PaperTablesConfig, agg: dict, per: dict, label: dict) -> list[dict]:
    """Every claim of ``CLAIMS`` whose runs exist at every seed: its verdict at each seed (paired
    differences on the test conversations, SE clustered by prompt), over seeds
    (``combine_verdicts``), and the seed-level test: the per-seed mean differences on N@k against
    zero (``rankgrpo.stats.seed_level_t``), with Holm's adjustment over every claim that has one."""
    out = []
    for claim, kind, a, b, k in CLAIMS:
        names = [(at_seed(a, s, cfg), at_seed(b, s, cfg)) for s in seeds(cfg)]
        if a not in per or b not in per:
            continue
        cells, words, means = [], [], []
        for x, y in names:
            if x not in per or y not in per:
                cells.append("–")
                continue
            diff = paired(per[x], per[y], f"ndcg@{k}")
            means.append(diff["mean"])
            if kind == "diff":
                text = verdict(diff)
            else:
                gains = [paired(per[x], per[y], f"ndcg@{j}")["mean"] for j in KS]
                text = grows_with_k(gains, z_score(diff)) + ": " + " / ".join(f"{g:+.4f}" for g in gains)
            cells.append(text)
            words.append(next(w for w in ("holds", "reversed", "not resolved", "does not hold") if text.startswith(w)))
        judged = combine_verdicts(words) if len(words) == len(names) else (
            f"not judged: {len(words)} of {len(names)} seeds run ({words[0]} at seed {cfg.seed})")
        # the seed-level test is of a difference; "grows with k" is judged from the per-rank section
        seed_test = seed_level_t(means) if kind == "diff" and len(words) == len(names) and len(means) > 1 else None
        out.append({"claim": claim, "verdict": judged, "per_seed": cells, "seed_level": seed_test})
    primary = PRIMARY[chosen_decoding(cfg)]
    adjusted: dict[str, dict] = {}
    for is_primary in (True, False):  # Holm within each family
        adjusted |= holm({c["claim"]: c["seed_level"]["p"] for c in out
                          if c["seed_level"] is not None and (c["claim"] in primary) == is_primary})
    for c in out:
        c["family"] = "primary" if c["claim"] in primary else "secondary"
        c["holm"] = adjusted.get(c["claim"])
    return out


# The report's primary hypotheses, fixed before any test score: Rank-GRPO (exp∞) above SFT and above
# GRPO in the decoding chosen on validation, by the arms trained in that decoding (no repeats: the
# arms trained without repeats). Holm's procedure runs over these two; every other claim is
# secondary, with Holm over all of them.
PRIMARY = {"paper": ("on-policy: SFT + Rank-GRPO (exp∞) > SFT", "on-policy: Rank-GRPO (exp∞) > GRPO"),
           "no_repeats": ("no repeats: trained without repeats: SFT + Rank-GRPO (exp∞) > SFT",
                          "no repeats: trained without repeats: Rank-GRPO (exp∞) > GRPO")}


def chosen_decoding(cfg: PaperTablesConfig) -> str:
    """The decoding chosen on validation (OUT/selection.json), 'paper' where none was chosen."""
    path = Path(cfg.out) / "selection.json"
    selection = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return selection.get("decoding", {}).get("chosen", "paper")


PER_RANK_PAIRS = (("rl/on/rank_grpo_exp_inf", "rl/on/grpo"), ("rl/on/rank_grpo_exp_inf", "sft/full"),
                  ("rl/on/grpo", "sft/full"), ("rl/con/rank_grpo_exp_inf", "rl/con/grpo"),
                  ("rl/con/rank_grpo_exp_inf", "sft/full"))


def per_rank_section(cfg: PaperTablesConfig, per: dict, label: dict) -> list[str]:
    """Markdown: the hit-rate difference at each rank 1..N for the main RL pairs, in both decodings,
    at every seed (``rankgrpo.stats.per_rank_hit_difference``, SE clustered by prompt). NDCG@k is
    cumulative, so a gain at rank 3 shows in every N@k with k >= 3; the per-rank rows are the direct
    test of "gains grow toward the tail"."""
    md = []
    for prefix, how in (("", "the paper's protocol"), (CONSTRAINED, "decoded without repeats")):
        for a, b in PER_RANK_PAIRS:
            a, b = (without_repeats(a), without_repeats(b)) if prefix else (a, b)
            rows = []
            for s in seeds(cfg):
                x, y = at_seed(a, s, cfg), at_seed(b, s, cfg)
                if x in per and y in per and "rank_hits" in next(iter(per[x].values())):
                    rows.append((s, per_rank_hit_difference(per[x], per[y],
                                                            clusters=prompt_clusters(per[x], per[y]))))
            if not rows:
                continue
            n = len(rows[0][1])
            if not md:
                md = ["## Per-rank hit-rate differences", "",
                      "Hit rate at rank r of arm A minus arm B, paired on the test conversations (mean; in brackets "
                      "the difference in SEs, clustered by prompt), ranks 1–5, 6–10, 11–15 and 16–20 averaged. "
                      "A gain that grows toward the tail shows as rising rows.", ""]
            md += [f"**{label.get(a, a)} − {label.get(b, b)}** ({how})", "",
                   "| seed | " + " | ".join(f"ranks {i + 1}–{min(i + 5, n)}" for i in range(0, n, 5)) + " |",
                   "|---|" + "---|" * len(range(0, n, 5))]
            for seed, diffs in rows:
                cells = []
                for i in range(0, n, 5):
                    block = diffs[i:i + 5]
                    m = float(np.mean([d["mean"] for d in block]))
                    zs = [d["z"] for d in block]
                    cells.append(f"{m:+.4f} ({min(zs):+.1f} to {max(zs):+.1f} SE)")
                md.append(f"| {seed} | " + " | ".join(cells) + " |")
            md.append("")
    return md


def primary_section(cfg: PaperTablesConfig, claims: list[dict]) -> list[str]:
    """The two primary hypotheses (``PRIMARY``) in the decoding chosen on validation, with their
    per-seed verdicts and the seed-level test, Holm's adjustment over the two."""
    decoding = chosen_decoding(cfg)
    rows = [c for c in claims if c["family"] == "primary"]
    how = {"paper": "the paper's protocol", "no_repeats": "decoded without repeats, by the arms trained so"}[decoding]
    md = ["## The primary hypotheses", "",
          f"Fixed before any test score: Rank-GRPO (exp∞) above SFT and above GRPO, in the decoding chosen on "
          f"validation ({how}). The seed-level test is the primary test: the mean over the {len(seeds(cfg))} seeds "
          "of the per-seed N@20 differences, t on n − 1 degrees of freedom, two-sided p, Holm's adjustment over "
          "these two. Every other claim below is secondary (Holm over all of them).", ""]
    if not rows:
        return md + ["Not run: the arms of the primary hypotheses are missing.", ""]
    md += ["| hypothesis | seed-level difference, t, p; Holm over the two | per-seed verdicts | over seeds |",
           "|---|---|---|---|"]
    md += [f"| {c['claim']} | {seed_level_cell(c)} | {' / '.join(c['per_seed'])} | {c['verdict']} |" for c in rows]
    return md + [""]


def seed_level_cell(c: dict) -> str:
    """'+0.0167, t = 4.72, p = 0.042; Holm p = 0.50' (or '–' without replicates)."""
    t = c["seed_level"]
    if t is None:
        return "–"
    return (f"{t['mean']:+.4f}, t = {t['t']:+.2f}, p = {t['p']:.3f}; Holm p = {c['holm']['p_holm']:.3f}"
            + (" **(shown)**" if c["holm"]["rejected"] and t["mean"] > 0 else ""))


def selection_section(cfg: PaperTablesConfig, label: Mapping[str, str]) -> list[str]:
    """The report's "Settings chosen on validation": OUT/selection.json as tables."""
    path = Path(cfg.out) / "selection.json"
    if not path.is_file():
        return ["## Settings chosen on validation", "",
                "None: this run chose no setting (--select-rl-lrs empty, --no-constrained-eval).", ""]
    selection = json.loads(path.read_text(encoding="utf-8"))
    n_val = json.loads(next((Path(cfg.out) / "val_eval").rglob("results.json")).read_text())["results"]["n_examples"] \
        if (Path(cfg.out) / "val_eval").is_dir() else cfg.n_validation
    md = ["## Settings chosen on validation", "",
          f"Chosen before any test conversation was scored, on the {n_val} validation conversations (greedy "
          "NDCG@20); the test set is scored once per final checkpoint, after every choice below is written to "
          "OUT/selection.json.", ""]
    rl = selection.get("rl", {})
    if rl:
        names = [n for n in next(sel["scores"] for sel in rl.values() if "scores" in sel)]
        md += [f"**RL learning rate and group shape per arm.** Each arm judged at every seed was trained at seed "
               f"{cfg.seed} with every rate × shape below (OUT/select/; `g16x4` is G = 16 completions for each of "
               "4 prompts a round, the same completions as 8 × 8) and its final checkpoint scored on validation "
               "in the decoding it was trained in; the highest wins, is used at every seed, and its run is the "
               "main seed's run. An arm not judged at every seed takes the settings chosen for the arm named "
               "in its row. Validation NDCG@20:", "",
               "| arm | " + " | ".join(names) + " | chosen |", "|---|" + "---|" * (len(names) + 1)]
        for arm, sel in rl.items():
            cells = ([f"{sel['scores'][n]:.4f}" for n in names] if "scores" in sel
                     else [f"as {sel['from']}"] + [""] * (len(names) - 1))
            md.append(f"| {label.get('rl/' + arm, arm)} | " + " | ".join(cells)
                      + f" | {candidate_name(sel['chosen'])} |")
        md.append("")
    dec = selection.get("decoding")
    if dec:
        names = {"paper": "the paper's protocol", "no_repeats": "no repeats"}
        md += [f"**Decoding.** Mean validation NDCG@20 over {len(dec['runs'])} runs at seed {cfg.seed} (the "
               "full-RRA SFT run and every RL arm started from it, each counted once): "
               + ", ".join(f"{names[m]} {v:.4f}" for m, v in dec["scores"].items())
               + f". Chosen: **{names[dec['chosen']]}**; the claims in that decoding are the report's headline.",
               ""]
    return md


def build_report(cfg: PaperTablesConfig) -> str:
    out, res_dir = Path(cfg.out), Path(cfg.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    arms = selected_arms(cfg)
    ev = {name: load_eval(out, name) for name, _, _ in eval_targets(cfg)}
    missing = [n for n, v in ev.items() if v is None]
    if missing:
        raise SystemExit(f"error: evaluations missing: {missing} (run without --report-only first)")
    agg = {n: v[0] for n, v in ev.items()}
    per = {n: v[1] for n, v in ev.items()}
    label = {f"rl/{a.name}": a.label for a in arms} | {f"sft/{n}": lab for n, _, lab in SFT_ARMS}
    label["base"] = "Sandbox base model (zero-shot)"
    base_agg, base_rows = baselines(out)
    agg |= base_agg
    per |= base_rows
    label |= {name: lab for name, _, lab in BASELINES}
    label |= {f"rl/{a.name}": f"{a.label} [seed {cfg.seed + a.seed_offset}]" for a in replicate_arms(cfg)}
    sft_labels = {name: lab for name, _, lab in SFT_ARMS}
    label |= {f"sft/{n}": f"{sft_labels[d]} [seed {cfg.seed + i}]" for n, d, i in replicate_sft(cfg)}
    label |= {n: f"{label[n[len(CONSTRAINED):]]}, no repeats" for n in ev if n.startswith(CONSTRAINED)}
    sft = "sft/full"

    def rows(names):
        return [(label[n], agg[n]) for n in names if n in agg]

    md = [f"# Paper tables in miniature ({'quick' if cfg.quick else 'full'} run)", "",
          "Generated by `benchmarks/paper_tables.py`; every number is on the sandbox test split "
          f"({agg[sft]['n_examples']} conversations, greedy lists, the evaluation's shift view), mean ±standard "
          "error clustered by prompt.", "",
          f"Settings: sandbox world of {cfg.n_films} films, {cfg.n_train} training conversations (seed "
          f"{cfg.world_seed}); SFT {cfg.sft_steps} steps at lr {cfg.sft_lr:g}; RL {cfg.rl_steps} rounds × "
          f"{cfg.prompts_per_step} prompts × G = {cfg.group_size} at lr {cfg.rl_lr:g}"
          + (" unless chosen otherwise on validation (below)" if cfg.select_rl_lrs else "")
          + f", β = {cfg.beta:g}, up to "
          f"{cfg.max_new_tokens} tokens; training seed {cfg.seed}"
          + (f" (+{cfg.replicates} replicate seed(s))" if cfg.replicates else "") + ".", ""]
    md += selection_section(cfg, label)
    md += ["## Table 1 analogue: on-policy RL (μ = 1)", "",
           table(rows(["popularity", "teacher", "oracle", "base", sft, "rl/on/grpo", "rl/on/rank_grpo_log",
                       "rl/on/rank_grpo_exp_inf", "rl/con/grpo", "rl/con/rank_grpo_exp_inf"])),
           ""]
    off = ["rl/off/grpo", "rl/off/gspo", "rl/off/rank_grpo_log", "rl/off/rank_grpo_exp_inf"]
    md += ["## Table 4 analogue: off-policy RL (μ = 2)", "",
           table(rows([sft] + off)) if any(n in agg for n in off) else "Not run (--arms left them out).", ""]
    ablations = ["sft/no_remap_reflect", "sft/no_reflect"]
    md += ["## Table 2 analogue: ablations", "",
           table(rows([sft] + ablations + ["rl/on/rank_grpo_exp_inf", "rl/r1zero/rank_grpo_exp_inf"])), ""]
    if not any(n in agg for n in ablations):
        md += ["(The RRA ablation SFT arms were not run: --sft-arms left them out.)", ""]

    md += ["Demonstrations each SFT arm learned from (validation split, `build_demos.py` report: the "
           "demonstration stage's lists scored directly):", "",
           "| SFT arm | stages | demonstrations N@20 | R@20 | in-catalog |", "|---|---|---|---|---|"]
    for name, _, lab in selected_sft(cfg):
        rep = json.loads((out / "demos" / name / "report.json").read_text())
        m = rep["metrics"]["validation"][rep["demonstration_stage"]]
        md.append(f"| {lab} | {' → '.join(rep['stages'])} | {m['ndcg@20']['mean']:.4f} | "
                  f"{m['recall@20']['mean']:.4f} | {m['in_catalog']['mean']:.3f} |")
    md.append("")

    con = [without_repeats(n) for n in [sft, "rl/on/grpo", "rl/on/rank_grpo_log", "rl/on/rank_grpo_exp_inf",
                                        "rl/con/grpo", "rl/con/rank_grpo_exp_inf"] + off + ablations]
    if any(n in agg for n in con):
        md += ["## The same students decoded without repeats (not the paper's protocol)", "",
               "Greedy lists from the same checkpoints, except that no line may name a film the list has "
               "already named (`evaluate.py --constrained --no-exclude-seen`: each line a catalog title, none "
               "twice). These students already stay in the catalog, so the ban on repeats is the only change. "
               "Almost every greedy list above repeats a film (see the list shapes below), and a repeat scores "
               "nothing; this table shows what the repeats hide. The paper's protocol stays the tables above.", "",
               table(rows(["popularity", "teacher", sft] + con)), ""]

    paper_pairs = [
        ("rl/on/grpo", sft), ("rl/on/rank_grpo_log", sft), ("rl/on/rank_grpo_exp_inf", sft),
        ("rl/on/rank_grpo_log", "rl/on/grpo"), ("rl/on/rank_grpo_exp_inf", "rl/on/grpo"),
        ("rl/on/rank_grpo_exp_inf", "rl/on/rank_grpo_log"),
        ("rl/off/grpo", sft), ("rl/off/gspo", sft), ("rl/off/rank_grpo_log", sft), ("rl/off/rank_grpo_exp_inf", sft),
        ("rl/off/rank_grpo_exp_inf", "rl/off/grpo"), ("rl/off/rank_grpo_exp_inf", "rl/off/gspo"),
        ("rl/off/rank_grpo_exp_inf", "rl/off/rank_grpo_log"),
        ("rl/off/rank_grpo_exp_inf", "rl/on/rank_grpo_exp_inf"),
        (sft, "sft/no_remap_reflect"), (sft, "sft/no_reflect"),
        ("rl/on/rank_grpo_exp_inf", "rl/r1zero/rank_grpo_exp_inf")]
    # the same pairs decoded without repeats, where both runs are scored that way, and the ban itself
    pairs = paper_pairs + [(without_repeats(sft), sft)] + [
        (without_repeats(a), without_repeats(b)) for a, b in paper_pairs if {a, b} <= set(CONSTRAINED_RUNS)]
    comparisons = [(f"{label[a]} − {label[b]}", a, b) for a, b in pairs if a in per and b in per]
    n_films = len((out / "world" / "catalog.jsonl").read_text().splitlines())
    md += ["## What the greedy lists look like", "",
           "Within a list: valid lines, distinct items, share of lists with a repeated item. Across the "
           f"{agg[sft]['n_examples']} test conversations: different lists produced, different items used (of "
           f"{n_films} films), and the share of conversations given the single most common list.", "",
           "| run | valid lines (of 20) | distinct items per list | lists with a repeat | different lists | "
           "different items | most common list's share |", "|---|---|---|---|---|---|---|"]
    shapes = {n: list_shape(per[n]) for n in ev}
    md += [f"| {label[n]} | {s['valid_lines']:.1f} | {s['distinct_items']:.1f} | {s['lists_with_repeats']:.2f} | "
           f"{s['different_lists']} | {s['different_items']} | {s['top_list_share']:.2f} |"
           for n, s in shapes.items()] + [""]
    md += ["## Paired differences (same test conversations)", "",
           delta_table([(lab, per[a], per[b]) for lab, a, b in comparisons]), ""]

    md += noise_section(cfg, agg, per, label)

    claims = judge_claims(cfg, agg, per, label)
    n_seeds = len(seeds(cfg))
    claims_at = len(md)
    md += ["## The paper's claims, mechanically", "",
           f"Each claim is a paired difference on the test conversations, judged at each of the {n_seeds} training "
           "seed(s): above +2 SE it holds at that seed, below −2 SE it is reversed, otherwise it is not resolved "
           "(standard errors clustered by prompt: repeated prompts are one cluster). "
           f"A claim is **shown** only where it holds at every seed, **refuted** only where it is reversed at every "
           "seed; anything else is reported as not shown, with the seeds spelled out. At seed S every RL arm "
           "starts from the SFT run of seed S.", "",
           "Per-seed SEs leave out training noise, so beside them is the seed-level test: the mean over seeds of "
           "the per-seed differences, its t statistic on n − 1 degrees of freedom and two-sided p, and Holm's "
           f"adjustment of that p within its family: the two primary hypotheses (above), or all "
           f"{sum(c['seed_level'] is not None and c['family'] == 'secondary' for c in claims)} secondary claims "
           "tested this way (the family-wise error of each stays at 0.05). With three seeds t needs 4.30 for p = 0.05 before the "
           "adjustment.", "",
           "| claim | verdict over seeds | seed-level difference, t, p; Holm | "
           + " | ".join(f"seed {s}" for s in seeds(cfg)) + " |",
           "|---|---|---|" + "---|" * n_seeds]
    md += [f"| {c['claim']} | {c['verdict']} | {seed_level_cell(c)} | " + " | ".join(c["per_seed"]) + " |"
           for c in claims] + [""]
    md = md[:claims_at] + primary_section(cfg, claims) + md[claims_at:]
    md += per_rank_section(cfg, per, label)

    # training dynamics in numbers: validation start/end; the sampled lists' reward early vs late
    md += ["## Training dynamics per arm", "",
           "Sampled lists are the rollouts (temperature 1); a third of the rounds is averaged at each end, "
           "± the standard error over rounds. Zero-variance groups: the share of advantage groups (Rank-GRPO: "
           "one per prompt and rank; GRPO/GSPO: one per prompt) whose G rewards are all equal, so their "
           "advantage is 0 and they teach nothing.", "",
           "| arm | val N@20 (greedy) start → end | val in-catalog start → end | sampled DCG@20 early → late | "
           "sampled rel_1 early → late | sampled rel_20 early → late | zero-variance groups | final KL |",
           "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        train, val = rl_log(out, arm.name)
        if not train or not val:
            continue
        third = max(len(train) // 3, 1)

        def ends(key):
            a, b = [r[key] for r in train[:third]], [r[key] for r in train[-third:]]
            se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
            return f"{np.mean(a):.3f} ±{se(a):.3f} → {np.mean(b):.3f} ±{se(b):.3f}"

        md.append(f"| {arm.name} | {val[0]['val_ndcg@20']:.4f} → {val[-1]['val_ndcg@20']:.4f} | "
                  f"{val[0]['val_in_catalog']:.3f} → {val[-1]['val_in_catalog']:.3f} | {ends('reward/dcg')} | "
                  f"{ends('reward/rank_1')} | {ends('reward/rank_20')} | "
                  f"{np.mean([r['reward/zero_std_frac'] for r in train]):.2f} | {train[-1].get('kl', float('nan')):.5f} |")
    md.append("")

    md += ["## RL round time per arm (seconds; runs shared the cores, see bench_rl_speed.py for one unshared "
           "step)", "", "| arm | sampling | parse + rewards + segmentation | reference forward | policy forward | "
           "backward + optimiser | total | samples/s | completion tokens |", "|---|---|---|---|---|---|---|---|---|"]
    breakdown = {a.name: step_breakdown(out, a.name) for a in arms}
    for name, b in breakdown.items():
        if b:
            md.append(f"| {name} | {b['sample']:.2f} | {b['score']:.2f} | {b['ref']:.2f} | {b['policy_forward']:.2f} "
                      f"| {b['backward_optimizer']:.2f} | {b['total']:.2f} | {b['samples_per_s']:.1f} | "
                      f"{b['completion_tokens']:.0f} |")
    md.append("")

    window = 1 if cfg.quick else 5
    if not cfg.figures:
        md += ["(Figures not drawn: --no-figures, or matplotlib is not installed.)", ""]
    figs = [] if not cfg.figures else [plot_rewards(out, arms, res_dir / "per_rank_reward.png", window),
            plot_validation(out, arms, res_dir / "val_ndcg20.png", tuple(replicate_arms(cfg))),
            plot_catalog(out, arms, res_dir / "val_in_catalog.png")]
    from rankgrpo.plots import plot_rank_hits
    if cfg.figures:
        figs.append(plot_rank_hits({label[n]: agg[n]["rank_hit_rate"] for n in
                                    [sft, "rl/on/grpo", "rl/on/rank_grpo_exp_inf"] if n in agg},
                                   res_dir / "test_rank_hits.png"))
        md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs] + [""]
    times_path = out / "stage_seconds.json"
    stage_times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if stage_times:
        md += ["## Stage wall-clock (seconds; each stage's latest run, two stages at a time on the cores)", "",
               "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.0f} |" for k, v in stage_times.items()]
        md += [f"| sum over stages (divide by --jobs for the wall-clock if the slots stay full) | "
               f"{sum(stage_times.values()):.0f} |", ""]
    text = "\n".join(md)
    atomic_write_text(res_dir / "paper_tables.md", text)
    if (res_dir / "REPORT.md").is_file():  # the hand-written report's tables, regenerated from these outputs
        report_blocks.main([str(res_dir / "REPORT.md")])
    atomic_write_json(res_dir / "summary.json", {
        "config": vars(cfg), "results": {n: {k: v for k, v in a.items() if k != "rank_hit_rate"} | {
            "rank_hit_rate": a.get("rank_hit_rate")} for n, a in agg.items()},
        "claims": claims, "list_shape": shapes, "step_breakdown": breakdown, "stage_seconds": stage_times})
    return text


# Fields that choose which runs are made or where things go, not what a finished run contains.
NOT_RESULT_FIELDS = frozenset({"out", "results", "report_only", "figures", "jobs", "python", "arms", "sft_arms",
                               "replicates", "replicate", "constrained_eval"})


def check_same_settings(cfg: PaperTablesConfig) -> None:
    """Refuse to resume into (or report on) an OUT whose finished stages were made with other
    settings: a stage counts as done when its output exists, so a rerun with, say, another
    --sft-steps would otherwise mix old and new runs in one report, and --report-only would print
    settings the runs were not made with."""
    path = Path(cfg.out) / "paper_tables_config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    new = vars(cfg)
    changed = sorted(k for k in new if k not in NOT_RESULT_FIELDS and (k not in old or old[k] != new[k]))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k, '(absent)')!r} -> {new[k]!r}" for k in changed)
        raise SystemExit(f"error: {cfg.out} holds runs made with other settings ({diff}); pass another --out, "
                         "or delete it to start over")


def main(argv=None) -> int:
    cfg = parse_config(PaperTablesConfig, argv)
    t0 = time.time()
    if cfg.figures and importlib.util.find_spec("matplotlib") is None:  # checked before hours of work
        print("warning: matplotlib is not installed, so this run writes the tables without figures "
              "(pip install 'rankgrpo[plot]' for them)", file=sys.stderr)
        cfg.figures = False
    check_same_settings(cfg)
    if not cfg.report_only:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.out, "paper_tables_config.json")
        chosen = None
        if cfg.select_rl_lrs:  # chosen on validation before any test evaluation runs
            run_tasks(selection_tasks(cfg), cfg)
            selection = choose_rl_settings(cfg)
            reuse_selection_runs(cfg, selection)
            chosen = {arm: sel["chosen"] for arm, sel in selection.items()}
            atomic_write_json(Path(cfg.out) / "selection.json", {"rl": selection})
        tasks = plan(cfg, chosen)
        if cfg.constrained_eval:  # the report's decoding, chosen on validation before any test evaluation
            run_tasks([t for t in tasks if not t.name.startswith("eval/")] + decoding_tasks(cfg), cfg)
            path = Path(cfg.out) / "selection.json"
            chosen = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            atomic_write_json(path, chosen | {"decoding": choose_decoding(cfg)})
        run_tasks(tasks, cfg)
    text = build_report(cfg)
    print(text)
    print(f"\nwrote {cfg.results}/paper_tables.md, summary.json and PNGs; {time.time() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
