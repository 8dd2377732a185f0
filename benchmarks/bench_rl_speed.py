"""Seconds per RL step: where train_rankgrpo.py spends them, and (with --trl) how many
completions per second it trains on compared with TRL's GRPOTrainer on the same work.

Part 1 runs ``train_rankgrpo.py`` for ``--steps`` steps from ``--model`` (an SFT checkpoint)
in a temporary directory and reads the stage timings of its ``log.jsonl``. The first step is
a warm-up and is left out; the others give the mean seconds and share of the step of

    sampling                       rollout generation (time/sample)
    parse + rewards + segmentation decode, parse, relevance, advantages, token -> rank (time/score)
    reference forward              reference-model log-probs (time/ref)
    policy forward                 policy log-probs inside the update (time/policy_forward)
    backward + optimizer           time/update - time/policy_forward

plus completions per second and the mean completion length. Our side runs on-policy (mu = 1)
with one forward/backward pass over all P x G completions of a step (--micro-batch-size P*G),
as TRL does with per_device_train_batch_size = P*G and no gradient accumulation.

Part 2 (``--trl``) trains the same model for the same number of optimiser steps with TRL's
GRPOTrainer: the same prompts in the same order, G completions each, the same completion
budget, temperature 1, beta (reference model present), learning rate, float32 on the CPU and
a list DCG@20 reward computed with this package's parse and relevance. TRL is never a
dependency of this project: it is installed into a separate virtualenv (``--trl-venv``,
created on first use: torch pinned to the main environment's version first, so pip takes the
CPU wheel, then trl with the main environment's transformers, then this project) and the
TRL side runs there (``benchmarks/_trl_grpo_child.py``). A callback times each optimiser
step after the warm-up one. Both sides run with ``--threads`` torch threads and with
``--stop-after-lines 0`` (TRL stops a completion only at eos or the token budget).

    python benchmarks/bench_rl_speed.py --model runs/sft/final --world sandbox_world
    python benchmarks/bench_rl_speed.py --model runs/sft/final --world sandbox_world --trl --json speed.json
    python benchmarks/bench_rl_speed.py --model runs/sft/final --world sandbox_world \\
        --steps 2 --prompts-per-step 2 --group-size 4 --max-new-tokens 40 --trl    # a quick check

Prints a table for part 1 and, with --trl, both rates side by side with their ratio, the
thread count and the torch / transformers / trl versions; --json writes the same figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from rankgrpo.config import arg, parse_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = ROOT / "benchmarks" / "_trl_grpo_child.py"
RESULT_PREFIX = "TRL_RESULT "  # the line of the child's output that carries its figures
STAGES = [  # (label, function of one log row -> seconds)
    ("sampling", lambda r: r["time/sample"]),
    ("parse + rewards + segmentation", lambda r: r["time/score"]),
    ("reference forward", lambda r: r["time/ref"]),
    ("policy forward", lambda r: r["time/policy_forward"]),
    ("backward + optimizer", lambda r: r["time/update"] - r["time/policy_forward"]),
]


@dataclass
class BenchRLSpeedConfig:
    """Seconds per RL step of train_rankgrpo.py by stage, and (--trl) completions/s against TRL's GRPOTrainer."""

    model: str = arg("runs/sft/final", "Starting policy (an SFT checkpoint directory); also the reference.")
    world: str = arg("sandbox_world", "World directory with train.jsonl, validation.jsonl and catalog.jsonl.")
    steps: int = arg(6, "Timed RL steps; one more runs first as a warm-up and is left out.")
    prompts_per_step: int = arg(8, "Prompts per step (both sides).")
    group_size: int = arg(8, "G, completions per prompt (both sides).")
    max_new_tokens: int = arg(220, "Completion token budget (both sides).")
    beta: float = arg(1e-3, "KL coefficient; non-zero keeps a reference model (both sides).")
    lr: float = arg(3e-5, "Learning rate (both sides).")
    stop_after_lines: int = arg(0, "Our early stop after this many list lines (0 = eos or budget only). "
                                   "Keep 0 for the TRL comparison, which has no such stop.")
    threads: int = arg(0, "torch CPU threads of both sides (0 = every core).")
    seed: int = arg(3407, "Seed of both sides (our prompt order comes from it; TRL gets the same order).")
    trl: bool = arg(False, "Also run TRL's GRPOTrainer on the same work (installs it into --trl-venv).")
    trl_venv: str = arg(".venv-trl", "Virtualenv for TRL, relative to the repository root; reused when it "
                                     "already has trl.")
    trl_version: str = arg("1.16.0", "trl release to install into a new --trl-venv.")
    json: str = arg("", "Also write the figures to this JSON file.")

    def validate(self) -> None:
        if self.steps < 1:
            raise SystemExit("error: --steps must be at least 1 (a warm-up step runs on top)")
        if self.group_size < 2:
            raise SystemExit("error: --group-size must be at least 2")
        self.threads = self.threads or os.cpu_count() or 1
        # both children run in the repository root
        self.model, self.world = str(Path(self.model).resolve()), str(Path(self.world).resolve())


def thread_env(threads: int) -> dict:
    """The environment of both children: offline, and torch limited to ``threads`` threads."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def world_file(cfg: BenchRLSpeedConfig, name: str) -> str:
    path = Path(cfg.world) / name
    if not path.is_file():
        raise SystemExit(f"error: --world {cfg.world}: no {name}")
    return str(path)


# ----------------------------------------------------------------------------- part 1: ours


def run_ours(cfg: BenchRLSpeedConfig, out_dir: Path) -> list[dict]:
    """Run train_rankgrpo.py for warm-up + timed steps; return its per-step log rows."""
    cmd = [sys.executable, str(ROOT / "train_rankgrpo.py"), "--model", cfg.model,
           "--data", world_file(cfg, "train.jsonl"), "--val-data", world_file(cfg, "validation.jsonl"),
           "--catalog", world_file(cfg, "catalog.jsonl"), "--out", str(out_dir), "--device", "cpu",
           "--steps", str(cfg.steps + 1), "--prompts-per-step", str(cfg.prompts_per_step),
           "--group-size", str(cfg.group_size), "--micro-batch-size", str(cfg.prompts_per_step * cfg.group_size),
           "--max-new-tokens", str(cfg.max_new_tokens), "--beta", str(cfg.beta), "--lr", str(cfg.lr),
           "--stop-after-lines", str(cfg.stop_after_lines), "--seed", str(cfg.seed),
           "--eval-every", "0", "--save-every", "1000"]
    done = subprocess.run(cmd, cwd=ROOT, env=thread_env(cfg.threads), capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"error: train_rankgrpo.py exited with {done.returncode}")
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "time/sample" in r]


def summarise_ours(rows: list[dict], completions_per_step: int) -> dict:
    """Mean seconds per stage over the steps after the first, their shares, and the rates."""
    timed = rows[1:]
    if not timed:
        raise SystemExit("error: no timed step after the warm-up")
    stages = {name: sum(get(r) for r in timed) / len(timed) for name, get in STAGES}
    total = sum(stages.values())
    tokens = sum(r["completion_tokens"] for r in timed) / len(timed)
    return {"steps_timed": len(timed), "seconds": stages, "total_s": total,
            "share": {name: s / total for name, s in stages.items()},
            "samples_per_s": completions_per_step / total,
            "tokens_per_s": completions_per_step * tokens / total,
            "mean_completion_tokens": tokens}


def print_ours(cfg: BenchRLSpeedConfig, ours: dict) -> None:
    print(f"\nour RL step (train_rankgrpo.py), mean of {ours['steps_timed']} step(s) after a warm-up; "
          f"{cfg.prompts_per_step} prompts x G={cfg.group_size}, max {cfg.max_new_tokens} new tokens, "
          f"stop-after-lines {cfg.stop_after_lines}, beta {cfg.beta:g}, {cfg.threads} thread(s)")
    width = max(len(name) for name, _ in STAGES)
    print(f"  {'stage'.ljust(width)}  {'seconds':>8}  {'share':>6}")
    for name, seconds in ours["seconds"].items():
        print(f"  {name.ljust(width)}  {seconds:8.3f}  {ours['share'][name]:6.1%}")
    print(f"  {'total'.ljust(width)}  {ours['total_s']:8.3f}  {1:6.1%}")
    print(f"  samples/s {ours['samples_per_s']:.2f}   mean completion tokens {ours['mean_completion_tokens']:.1f}"
          f"   tokens/s {ours['tokens_per_s']:.0f}")


# ----------------------------------------------------------------------------- part 2: TRL


def _pip(python: Path, *args: str, log) -> subprocess.CompletedProcess:
    done = subprocess.run([str(python), "-m", "pip", "install", "--progress-bar", "off", *args],
                          capture_output=True, text=True)
    log.write(f"$ pip install {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    return done


def _failure(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    reason = (errors or lines or [f"exit status {done.returncode}"])[0].strip()
    return reason.split(" (from versions:")[0][:300]  # pip's list of every release is long


def _has_trl(python: Path) -> bool:
    return python.exists() and subprocess.run([str(python), "-c", "import trl, rankgrpo"],
                                              capture_output=True).returncode == 0


def ensure_trl_venv(venv: Path, trl_version: str) -> tuple[Path | None, str]:
    """(python of a virtualenv with trl and this project, "") or (None, why it could not be made).

    torch goes in first, pinned to the main environment's release (an unpinned torch would
    resolve a CUDA build of several GB); then trl with the main environment's transformers
    (or whatever trl asks for, if that pin does not resolve); then this project, editable.
    """
    python = venv / "bin" / "python"
    if _has_trl(python):
        return python, ""
    print(f"installing trl {trl_version} into {venv.name} (log: {venv.name}/install.log) ...", flush=True)
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            return None, f"python -m venv failed: {_failure(made)}"
    torch_version = metadata.version("torch").split("+")[0]
    transformers_version = metadata.version("transformers")
    with open(venv / "install.log", "a") as log:
        done = _pip(python, f"torch=={torch_version}", log=log)
        if done.returncode != 0:
            return None, f"torch=={torch_version}: {_failure(done)}"
        done = _pip(python, f"trl=={trl_version}", f"transformers=={transformers_version}", log=log)
        if done.returncode != 0:
            print(f"  trl {trl_version} with transformers {transformers_version} did not resolve; "
                  "letting pip choose transformers", flush=True)
            done = _pip(python, f"trl=={trl_version}", log=log)
            if done.returncode != 0:
                return None, f"trl=={trl_version}: {_failure(done)}"
        done = _pip(python, "-e", str(ROOT), log=log)
        if done.returncode != 0:
            return None, f"pip install -e . failed: {_failure(done)}"
    if not _has_trl(python):
        return None, f"trl or rankgrpo does not import in {venv}"
    return python, ""


def run_trl(cfg: BenchRLSpeedConfig, python: Path, out_dir: Path) -> tuple[dict | None, str]:
    """Run the TRL child; (its figures, "") or (None, why not)."""
    cmd = [str(python), str(CHILD), "--model", cfg.model, "--world", cfg.world, "--out", str(out_dir),
           "--steps", str(cfg.steps), "--prompts-per-step", str(cfg.prompts_per_step),
           "--group-size", str(cfg.group_size), "--max-new-tokens", str(cfg.max_new_tokens),
           "--beta", str(cfg.beta), "--lr", str(cfg.lr), "--threads", str(cfg.threads), "--seed", str(cfg.seed)]
    done = subprocess.run(cmd, cwd=ROOT, env=thread_env(cfg.threads), capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):]), ""
    tail = (done.stdout[-3000:] + done.stderr[-3000:]).strip()
    return None, f"the TRL run exited with {done.returncode} and no result:\n{tail}"


def print_comparison(cfg: BenchRLSpeedConfig, ours: dict, trl: dict) -> dict:
    ratio = ours["samples_per_s"] / trl["samples_per_s"]
    token_ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    print(f"\nours vs TRL GRPOTrainer: {cfg.prompts_per_step} prompts x G={cfg.group_size} = "
          f"{cfg.prompts_per_step * cfg.group_size} completions per optimiser step, max {cfg.max_new_tokens} "
          f"new tokens, beta {cfg.beta:g}, {cfg.threads} thread(s) each")
    print(f"  {'':<6} {'samples/s':>10} {'mean tokens':>12} {'tokens/s':>9} {'s/step':>8} {'steps':>6}")
    for name, r in (("ours", ours), ("TRL", trl)):
        seconds = r["total_s"] if "total_s" in r else r["seconds_per_step"]
        print(f"  {name:<6} {r['samples_per_s']:10.2f} {r['mean_completion_tokens']:12.1f} "
              f"{r['tokens_per_s']:9.0f} {seconds:8.2f} {r['steps_timed']:6d}")
    print(f"  ratio ours/TRL (samples/s): {ratio:.2f}x")
    lengths = ours["mean_completion_tokens"], trl["mean_completion_tokens"]
    if abs(lengths[0] - lengths[1]) > 0.1 * max(lengths):
        print(f"  the mean completion lengths differ by more than 10%; tokens/s ratio: {token_ratio:.2f}x")
    if not (trl["same_prompt_tokens"] and trl["same_prompt_order"]):
        print(f"  warning: the TRL side saw other prompts (same tokens: {trl['same_prompt_tokens']}, "
              f"same order: {trl['same_prompt_order']})")
    print(f"  versions: ours torch {metadata.version('torch')} transformers {metadata.version('transformers')}; "
          f"TRL side torch {trl['torch']} transformers {trl['transformers']} trl {trl['trl']}")
    return {"samples_per_s_ratio": ratio, "tokens_per_s_ratio": token_ratio}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    cfg = parse_config(BenchRLSpeedConfig, argv)
    report = {"config": asdict(cfg), "versions": {"torch": metadata.version("torch"),
                                                  "transformers": metadata.version("transformers")}}
    with tempfile.TemporaryDirectory(prefix="bench_rl_speed_") as tmp:
        t0 = time.perf_counter()
        rows = run_ours(cfg, Path(tmp) / "ours")
        print(f"train_rankgrpo.py: {len(rows)} steps in {time.perf_counter() - t0:.0f} s (process included)")
        report["ours"] = summarise_ours(rows, cfg.prompts_per_step * cfg.group_size)
        print_ours(cfg, report["ours"])
        if cfg.trl:
            if cfg.stop_after_lines:
                print("\nnote: --stop-after-lines is not 0, so our side may stop completions that TRL continues")
            python, why = ensure_trl_venv(ROOT / cfg.trl_venv, cfg.trl_version)
            if python is None:
                print(f"\ntrl did not install: {why}")
            else:
                trl, why = run_trl(cfg, python, Path(tmp) / "trl")
                if trl is None:
                    print(f"\nTRL run failed: {why}")
                else:
                    report["trl"] = trl
                    report["comparison"] = print_comparison(cfg, report["ours"], trl)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
