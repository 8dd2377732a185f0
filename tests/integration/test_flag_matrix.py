"""Every flag combination the README and docs show, one step of each trainer on a tiny sandbox
world: it runs (exit 0, a finite loss, weights written) or it is refused with exit 2 and one line
that says why. It never crashes.

Single-process combinations run in this interpreter (each script's main(argv)); the torchrun ones
(DDP and FSDP2, two processes on CPU with gloo) are marked slow. Only sizes change from the
documented commands: steps, prompts, group size, tokens.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import ENV, ROOT, rl_args, sft_args, world  # noqa: F401  (world is a fixture)
from rankgrpo.scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def main_of(script: str):
    return load_script(ROOT / script, f"_matrix_{Path(script).stem}").main


def sft_one_step(world, out, *flags):  # noqa: F811
    return [*sft_args(world, out, 1), "--micro-batch-size", 2, "--grad-accum", 1, "--eval-every", 0, *flags]


def rl_one_step(world, model, out, *flags):  # noqa: F811
    return [*rl_args(world, model, out, 1, prompts_per_step=2, group_size=2, max_new_tokens=24,
                     micro_batch_size=2, save_every=1), *flags]


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_trained(run_dir, steps: int = 1) -> None:
    values = losses(run_dir)
    assert len(values) >= steps and all(math.isfinite(v) for v in values), values
    assert (Path(run_dir) / "final" / "model.safetensors").is_file()
    lora = json.loads((Path(run_dir) / "config.json").read_text())["lora_rank"] > 0
    assert (Path(run_dir) / "final" / "adapter" / "adapter_model.safetensors").is_file() == lora


# (id, flags) of the documented combinations that must run, for both trainers
SHARED = [
    ("default", []),
    ("checkpointing", ["--gradient-checkpointing"]),             # prefix sharing is switched off, and said so
    ("checkpointing-no-share", ["--gradient-checkpointing", "--no-share-prompt-prefix"]),
    ("bf16-cpu-autocast", ["--bf16"]),
    ("paper-bf16-checkpointing", ["--preset", "paper", "--bf16", "--gradient-checkpointing"]),
    ("lora", ["--lora-rank", "8"]),
    ("lora-checkpointing", ["--lora-rank", "8", "--gradient-checkpointing"]),
    ("lora-bf16-targets-dropout", ["--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1", "--bf16",
                                   "--lora-targets", "q_proj", "v_proj"]),
]
RL_ONLY = [
    ("constrained-mu2", ["--constrained", "--mu", "2"]),
    ("constrained-checkpointing", ["--constrained", "--gradient-checkpointing"]),
    ("compile", ["--compile"]),
    ("grpo", ["--algo", "grpo"]),
    ("gspo-mu2", ["--algo", "gspo", "--mu", "2"]),
    ("token-mean-log-reward", ["--aggregation", "token_mean", "--reward", "dcg"]),
    ("objective-authors", ["--objective", "authors"]),                  # all seven of the authors' rules
    ("objective-authors-gspo-mu2", ["--objective", "authors", "--algo", "gspo", "--mu", "2"]),
    ("objective-authors-one-rule-off", ["--objective", "authors", "--overflow-ratio", "per_line"]),
    ("lora-constrained-mu2", ["--lora-rank", "8", "--constrained", "--mu", "2"]),
    ("lora-compile", ["--lora-rank", "8", "--compile"]),
    ("lora-grpo-no-kl", ["--lora-rank", "8", "--algo", "grpo", "--beta", "0"]),
]
# (id, script, flags, the one line's pattern): combinations that cannot work are refused, not crashed
REFUSED = [
    ("rl-constrained-compile", "train_rankgrpo.py", ["--constrained", "--compile"], r"--constrained does not work "
                                                                                      r"with --compile"),
    ("rl-fsdp-compile", "train_rankgrpo.py", ["--fsdp", "--compile"], r"--compile with --fsdp"),
    ("rl-fsdp-single-process", "train_rankgrpo.py", ["--fsdp"], r"start the script with torchrun"),
    ("sft-fsdp-single-process", "train_sft.py", ["--fsdp"], r"start the script with torchrun"),
    ("sft-lora-fsdp", "train_sft.py", ["--lora-rank", "8", "--fsdp"], r"--lora-rank with --fsdp"),
    ("rl-lora-fsdp", "train_rankgrpo.py", ["--lora-rank", "8", "--fsdp"], r"--lora-rank with --fsdp"),
    ("sft-lora-unknown-target", "train_sft.py", ["--lora-rank", "8", "--lora-targets", "qkv"],
     r"--lora-targets qkv: no module of Qwen2ForCausalLM is named so"),
    ("rl-lora-dropout-one", "train_rankgrpo.py", ["--lora-rank", "8", "--lora-dropout", "1"],
     r"--lora-dropout must be < 1"),
]


@pytest.fixture(scope="module")
def base(world):  # noqa: F811
    return world / "base_model"


@pytest.mark.parametrize("flags", [f for _, f in SHARED], ids=[i for i, _ in SHARED])
def test_sft_one_step(world, tmp_path, capsys, flags):  # noqa: F811
    assert main_of("train_sft.py")([str(a) for a in sft_one_step(world, tmp_path / "sft", *flags)]) == 0
    assert_trained(tmp_path / "sft")
    out = capsys.readouterr().out
    if "--gradient-checkpointing" in flags and "--no-share-prompt-prefix" not in flags:
        assert "--share-prompt-prefix is off under --gradient-checkpointing" in out


@pytest.mark.parametrize("flags", [f for _, f in SHARED + RL_ONLY], ids=[i for i, _ in SHARED + RL_ONLY])
def test_rl_one_step(world, base, tmp_path, capsys, flags):  # noqa: F811
    assert main_of("train_rankgrpo.py")([str(a) for a in rl_one_step(world, base, tmp_path / "rl", *flags)]) == 0
    assert_trained(tmp_path / "rl")
    out = capsys.readouterr().out
    if "--gradient-checkpointing" in flags and "--no-share-prompt-prefix" not in flags:
        assert "--share-prompt-prefix is off under --gradient-checkpointing" in out


def test_both_trainers_resume(world, base, tmp_path):  # noqa: F811
    """--resume continues from the newest checkpoint: one more step, the earlier rows kept."""
    sft = [str(a) for a in sft_one_step(world, tmp_path / "sft", "--save-every", 1)]
    assert main_of("train_sft.py")(sft) == 0
    sft[sft.index("--max-steps") + 1] = "2"
    assert main_of("train_sft.py")([*sft, "--resume"]) == 0
    assert len(losses(tmp_path / "sft")) == 2
    rl = [str(a) for a in rl_one_step(world, base, tmp_path / "rl")]
    assert main_of("train_rankgrpo.py")(rl) == 0
    rl[rl.index("--steps") + 1] = "2"
    assert main_of("train_rankgrpo.py")([*rl, "--resume", "--mu", "1"]) == 0
    assert [json.loads(x)["step"] for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()
            if '"loss"' in x] == [1, 2]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_combinations_that_cannot_work_are_refused(world, base, tmp_path, capsys, case):  # noqa: F811
    _, script, flags, pattern = case
    argv = (sft_one_step(world, tmp_path / "o", *flags) if script == "train_sft.py"
            else rl_one_step(world, base, tmp_path / "o", *flags))
    assert main_of(script)([str(a) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(pattern, err[0]), err


# ----------------------------------------------------------------------------- torchrun


def torchrun(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, str(ROOT / script), *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--fsdp"], ["--lora-rank", "8"]], ids=["ddp", "fsdp", "ddp-lora"])
def test_torchrun_both_trainers_bf16_checkpointing(world, base, tmp_path, mode):  # noqa: F811
    """The README's multi-GPU command on two CPU processes: --bf16 --gradient-checkpointing, DDP or FSDP2,
    and DDP with LoRA."""
    flags = ["--bf16", "--gradient-checkpointing", *mode]
    res = torchrun("train_sft.py", *sft_one_step(world, tmp_path / "sft", *flags))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_trained(tmp_path / "sft")
    res = torchrun("train_rankgrpo.py", *rl_one_step(world, tmp_path / "sft" / "final", tmp_path / "rl", *flags))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_trained(tmp_path / "rl")
