"""The training scripts on a tiny sandbox world: learning happens, parameters move, and a run
killed with SIGKILL and resumed reaches exactly the weights of an uninterrupted run."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankgrpo.data import load_examples, write_examples
from rankgrpo.losses import sft_loss
from rankgrpo.models import load_model, load_tokenizer
from rankgrpo.parsing import format_recommendations
from rankgrpo.sandbox import build_world
from rankgrpo.sft_data import tokenize_sft
from helpers import TINY, collate_right_padded

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world with a planted, easy task (N = 5): every demonstration lists the same five
    catalog films in a random order, and the ground truth of every conversation is the first of
    them. SFT learns the five titles; RL has to move that film to rank 1."""
    root = tmp_path_factory.mktemp("world")
    w = build_world(TINY, root)
    films = [(it.title, it.year) for it in list(w.catalog)[:5]]
    rng = random.Random(0)
    for split in ("train", "validation"):
        examples = load_examples(root / f"{split}.jsonl")
        for e in examples:
            e.completion = format_recommendations(rng.sample(films, len(films)))
            e.groundtruth = [films[0]]
        write_examples(root / f"easy_{split}.jsonl", examples)
    return root


def run(script, *args, timeout=240):
    res = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def sft_args(world, out, steps):
    return ["--model", world / "base_model", "--train-data", world / "easy_train.jsonl",
            "--val-data", world / "easy_validation.jsonl", "--catalog", world / "catalog.jsonl", "--out", out,
            "--max-steps", steps, "--micro-batch-size", 4, "--grad-accum", 2, "--lr", 1e-2, "--n-items", 5,
            "--eval-every", 1000, "--val-gen-examples", 2, "--max-new-tokens", 64, "--log-every", 1,
            "--save-every", 2]


def rl_args(world, model, out, steps, **extra):
    args = ["--model", model, "--data", world / "easy_train.jsonl", "--val-data", world / "easy_validation.jsonl",
            "--catalog", world / "catalog.jsonl", "--out", out, "--steps", steps, "--prompts-per-step", 2,
            "--group-size", 4, "--n-items", 5, "--max-new-tokens", 64,
            "--eval-every", 0, "--save-every", 2, "--lr", 3e-4, "--micro-batch-size", 32]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def test_sft_loss_falls_on_a_fixed_batch(world):
    tok = load_tokenizer(world / "base_model")
    model = load_model(world / "base_model").train()
    batch = [tokenize_sft(tok, e, 512) for e in load_examples(world / "easy_train.jsonl")[:4]]
    ids, attn, labels = collate_right_padded(batch, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, _ = sft_loss(model(input_ids=ids, attention_mask=attn).logits, labels, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def _kill_after_checkpoint(cmd, ckpt: Path):
    """Start a run, SIGKILL it once checkpoint `ckpt` is complete (mid-training), return its exit code."""
    proc = subprocess.Popen([sys.executable, *map(str, cmd)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (ckpt / "COMPLETE").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def test_sft_resume_after_sigkill_is_exact(world, tmp_path):
    run("train_sft.py", *sft_args(world, tmp_path / "straight", 6))
    killed = tmp_path / "killed"
    code = _kill_after_checkpoint([ROOT / "train_sft.py", *sft_args(world, killed, 6)],
                                  killed / "checkpoints" / "step-000002")
    assert code == -signal.SIGKILL and not (killed / "final").exists()
    run("train_sft.py", *sft_args(world, killed, 6), "--resume")
    a, b = weights(tmp_path / "straight"), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in map(json.loads, (killed / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log has no duplicated or missing steps after the resume


@pytest.fixture(scope="module")
def sft_model(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run("train_sft.py", *sft_args(world, out, 60))
    return out / "final"


def test_rl_step_changes_parameters_and_logs(world, sft_model, tmp_path):
    for algo in ("rank_grpo", "grpo", "gspo"):
        out = tmp_path / algo
        run("train_rankgrpo.py", *rl_args(world, sft_model, out, 1, algo=algo))
        before, after = load_file(str(sft_model / "model.safetensors")), weights(out)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(changed) == len(before), f"{algo}: unchanged {set(before) - set(changed)}"
        row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
        for key in ("reward/rank_1", "reward/rank_5", "reward/zero_std_frac", "kl", "entropy", "clip/low_frac",
                    "items_emitted", "parse_rate", "in_catalog", "samples_per_s"):
            assert key in row, f"{algo}: {key} missing from the log"


def test_rl_raises_the_reward_on_a_planted_easy_task(world, sft_model, tmp_path):
    out = tmp_path / "easy"
    run("train_rankgrpo.py", *rl_args(world, sft_model, out, 16, prompts_per_step=4, group_size=8, lr=5e-4,
                                      save_every=100))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    first = [r["reward/rank_1"] for r in rows]
    # measured: about 0.07 over the first four steps, 0.29 over the last four
    assert sum(first[-4:]) / 4 > sum(first[:4]) / 4 + 0.10, first


def test_rl_resume_after_sigkill_is_exact(world, sft_model, tmp_path):
    args = dict(mu=2)
    run("train_rankgrpo.py", *rl_args(world, sft_model, tmp_path / "straight", 4, **args))
    killed = tmp_path / "killed"
    code = _kill_after_checkpoint([ROOT / "train_rankgrpo.py", *rl_args(world, sft_model, killed, 4, **args)],
                                  killed / "checkpoints" / "step-000002")
    assert code == -signal.SIGKILL
    run("train_rankgrpo.py", *rl_args(world, sft_model, killed, 4, **args), "--resume")
    a, b = weights(tmp_path / "straight"), weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_fail_before_any_work(world, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "train_rankgrpo.py"),
                          *map(str, rl_args(world, world / "base_model", tmp_path / "x", 1)),
                          "--data", str(tmp_path / "missing.jsonl")], env=ENV, capture_output=True, text=True)
    assert res.returncode != 0 and "missing.jsonl: no such file" in res.stderr
    assert not (tmp_path / "x").exists()
    no_gt = tmp_path / "no_gt.jsonl"
    no_gt.write_text(json.dumps({"prompt": "hi", "completion": "A (2000)"}) + "\n")
    res = subprocess.run([sys.executable, str(ROOT / "train_sft.py"), *map(str, sft_args(world, tmp_path / "y", 1)),
                          "--train-data", str(no_gt)], env=ENV, capture_output=True, text=True)
    assert res.returncode != 0 and "no_gt.jsonl:1: missing field 'groundtruth_with_release_year'" in res.stderr
