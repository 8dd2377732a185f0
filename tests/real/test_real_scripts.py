"""The scripts on a real pretrained chat model and the authors' Reddit-v2 sample, as a user runs
them: a zero-shot evaluation, 2 SFT steps and 2 Rank-GRPO steps with the README's
`--preset paper --bf16 --gradient-checkpointing` (bf16 autocast on the CPU), and the written
checkpoints reloaded with plain transformers.

To run in minutes on a CPU the batch and generation flags are lowered from the paper preset
(SFT: 2 sequences per step instead of 384; Rank-GRPO: 2 prompts x G = 2 instead of 48 x 8,
64 new tokens instead of 1,024; evaluation: 4 examples, 200 new tokens). The learning rates,
clipping, KL, rewards and everything else are the preset's.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
    return proc.stdout


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def work(tmp_path_factory, reddit_sample):
    """A run directory, with the first 4 rows of the sample as a small validation file."""
    work = tmp_path_factory.mktemp("real_runs")
    lines = Path(reddit_sample[0]).read_text(encoding="utf-8").splitlines()
    (work / "val.jsonl").write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    return work


@pytest.fixture(scope="module")
def sft_run(work, smollm2_dir, reddit_sample):
    sample, catalog = reddit_sample
    run_script("train_sft.py", "--preset", "paper", "--bf16", "--gradient-checkpointing",
               "--model", smollm2_dir, "--train-data", sample, "--val-data", work / "val.jsonl", "--catalog", catalog, "--out", work / "sft",
               "--max-steps", 2, "--micro-batch-size", 2, "--grad-accum", 1, "--log-every", 1,
               "--eval-every", 2, "--save-every", 2, "--val-gen-examples", 1, "--max-new-tokens", 64, cwd=work)
    return work / "sft"


@pytest.fixture(scope="module")
def rl_run(work, sft_run, reddit_sample):
    sample, catalog = reddit_sample
    run_script("train_rankgrpo.py", "--preset", "paper", "--bf16", "--gradient-checkpointing",
               "--model", sft_run / "final", "--data", sample,
               "--val-data", work / "val.jsonl", "--catalog", catalog, "--out", work / "rankgrpo",
               "--steps", 2, "--prompts-per-step", 2, "--group-size", 2, "--micro-batch-size", 4,
               "--max-new-tokens", 64, "--eval-every", 2, "--save-every", 2, "--val-examples", 1, cwd=work)
    return work / "rankgrpo"


def test_zero_shot_evaluation(work, smollm2_dir, reddit_sample):
    sample, catalog = reddit_sample
    out = work / "eval_zero_shot"
    run_script("evaluate.py", "--preset", "paper", "--model", smollm2_dir, "--data", sample, "--catalog", catalog,
               "--limit", 4, "--max-new-tokens", 200, "--batch-size", 4, "--name", "smollm2-135m-zero-shot",
               "--out", out, cwd=work)
    results = json.loads((out / "results.json").read_text())["results"]
    rows = read_jsonl(out / "examples.jsonl")
    assert results["n_examples"] == 4 and len(rows) == 4
    figures = {k: results[k]["mean"] for k in ("recall@20", "ndcg@20", "in_catalog", "format_valid")}
    assert all(0.0 <= v <= 1.0 for v in figures.values()), figures
    print("zero-shot SmolLM2-135M-Instruct, 4 Reddit-v2 rows: "
          + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    print("first list begins:", repr(str(rows[0].get("completion", ""))[:160]))


def test_sft_two_steps(sft_run):
    log = read_jsonl(sft_run / "log.jsonl")
    losses = [row["loss"] for row in log if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), log
    assert any("val_loss" in row and math.isfinite(row["val_loss"]) for row in log)
    config = json.loads((sft_run / "config.json").read_text())
    assert config["preset"] == "paper" and config["lr"] == 5e-5
    assert config["bf16"] and config["gradient_checkpointing"]
    print(f"SFT losses {losses}")


def test_rankgrpo_two_steps(rl_run):
    log = read_jsonl(rl_run / "log.jsonl")
    steps = [row for row in log if "loss" in row]
    assert len(steps) == 2 and all(math.isfinite(row["loss"]) for row in steps), log
    config = json.loads((rl_run / "config.json").read_text())
    assert config["preset"] == "paper" and config["lr"] == 1e-6 and config["algo"] == "rank_grpo"
    assert config["bf16"] and config["gradient_checkpointing"]
    print("Rank-GRPO steps: " + "; ".join(f"loss {row['loss']:.4f}, reward/dcg {row['reward/dcg']:.3f}, "
                                          f"in_catalog {row['in_catalog']:.2f}" for row in steps))


@pytest.mark.parametrize("stage", ["sft", "rankgrpo"])
def test_checkpoints_reload_with_plain_transformers(stage, smollm2_dir, sft_run, rl_run):
    """RUN/final loads with AutoModelForCausalLM / AutoTokenizer alone, has the base model's
    architecture and chat template, finite weights that training moved, and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = {"sft": sft_run, "rankgrpo": rl_run}[stage] / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    base_tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert type(model) is type(base)
    for field in ("model_type", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size",
                  "tie_word_embeddings", "eos_token_id"):
        assert getattr(model.config, field) == getattr(base.config, field), field
    assert tokenizer.get_vocab() == base_tokenizer.get_vocab()
    assert tokenizer.chat_template == base_tokenizer.chat_template
    weights, base_weights = model.state_dict(), base.state_dict()
    assert weights.keys() == base_weights.keys()
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(not torch.equal(weights[k], base_weights[k]) for k in weights)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Movies like Heat (1995)?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # The last periodic checkpoint (step 2) is a plain HF directory too, with the final weights.
    last = sorted((final.parent / "checkpoints").glob("step-*"))[-1]
    saved = AutoModelForCausalLM.from_pretrained(last, dtype=torch.float32).state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)
