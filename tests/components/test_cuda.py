"""Tests that need a CUDA GPU: marked `cuda`, skipped without one; benchmarks/gpu_check.py runs them.

The sampler eager and compiled (CUDA graphs), the losses against the CPU, bf16 autocast,
gradient checkpointing, and one step of each trainer (with --bf16 --gradient-checkpointing,
and --compile for Rank-GRPO). Everything uses tiny random models, so a GPU run takes a few
minutes at most, nearly all of it compiling.

RANKGRPO_CUDA_TEST_DEVICE=cpu runs this file's logic on the CPU (a dry run without a GPU;
the compiled step then uses torch.compile's default mode instead of CUDA graphs).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rankgrpo.distributed import prompt_keys
from rankgrpo.losses import eos_positions, grpo_loss, gspo_loss, rank_grpo_loss
from rankgrpo.models import tiny_model
from rankgrpo.next_token import choose_row_tokens
from rankgrpo.sampling import left_pad, sample, token_logprobs

DEVICE = os.environ.get("RANKGRPO_CUDA_TEST_DEVICE", "cuda")
ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def peaky():
    return tiny_model("qwen2", VOCAB, initializer_range=0.5, seed=1, device=DEVICE)


@pytest.fixture(scope="module")
def smooth():
    return tiny_model("qwen2", VOCAB, initializer_range=0.1, seed=2, device=DEVICE)


# ----------------------------------------------------------------------------- sampler


def test_sampler_greedy_eager_compiled_and_generate_agree(peaky):
    prompts, max_new = random_prompts([5, 11, 2, 8, 3]), 24
    ids, mask = left_pad(prompts, 0, device=DEVICE)
    free = peaky.generate(ids[:1, -5:], attention_mask=mask[:1, -5:].long(), do_sample=False,
                          max_new_tokens=max_new, eos_token_id=VOCAB + 5, pad_token_id=0)[0, 5:].tolist()
    eos = free[6]  # so that rows end at different steps
    generated = peaky.generate(ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new,
                               eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:].tolist()
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in generated]
    assert min(map(len, expected)) < max_new
    for compile in (False, True):
        r = sample(peaky, prompts, group_size=1, max_new_tokens=max_new, greedy=True, eos_token_ids=eos,
                   compile=compile)
        assert [r.completion_ids[i, : r.lengths[i]].tolist() for i in range(5)] == expected, f"compile={compile}"
    assert r.decode_stats["mode"] == ("reduce-overhead" if DEVICE == "cuda" else None)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_compiled_streams_and_logprobs_on_device(smooth, temperature):
    prompts = random_prompts([6, 13, 3], seed=3)
    kwargs = dict(group_size=2, max_new_tokens=16, temperature=temperature, eos_token_ids=1)
    eager = sample(smooth, prompts, **kwargs, compact_fraction=1.0,
                   generator=torch.Generator(DEVICE).manual_seed(0))
    compiled = sample(smooth, prompts, **kwargs, compile=True, generator=torch.Generator(DEVICE).manual_seed(0))
    again = sample(smooth, prompts, **kwargs, compile=True, generator=torch.Generator(DEVICE).manual_seed(0))
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert torch.equal(compiled.lengths, eager.lengths)
    assert (compiled.logprobs - eager.logprobs).abs().max() <= 1e-4
    assert again.decode_stats["graphs_compiled"] == 0 and torch.equal(again.completion_ids, compiled.completion_ids)
    input_ids, attention_mask, start = compiled.model_inputs()
    with torch.no_grad():
        recomputed = token_logprobs(smooth, input_ids, attention_mask, start, temperature)
    assert (recomputed - compiled.logprobs)[compiled.completion_mask].abs().max() <= 1e-4


def test_prompt_key_draws_never_synchronise_with_the_host(smooth):
    """Per-prompt keys: computing the draws and choosing each step's tokens queue kernels only
    (torch's sync debug mode raises on any synchronising call); eager and compiled decoding then
    draw the same tokens on the device."""
    keys = prompt_keys(3, 1, range(6), DEVICE)  # the one host-to-device copy, before the check
    logits = torch.randn(24, VOCAB, device=DEVICE)
    rows = torch.arange(24, device=DEVICE)
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        draws = keys.draws(4, 16)
        for t in range(16):
            choose_row_tokens(logits, rows, 4, temperature=1.0, top_p=0.9, greedy=False, generator=draws,
                              decode_step=t)
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    prompts = random_prompts([6, 13, 3], seed=3)
    kwargs = dict(group_size=2, max_new_tokens=16, eos_token_ids=1, generator=prompt_keys(3, 1, range(3), DEVICE))
    eager, compiled = sample(smooth, prompts, **kwargs), sample(smooth, prompts, **kwargs, compile=True)
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert (compiled.logprobs - eager.logprobs).abs().max() <= 1e-4


def test_sampler_bf16_compiled_logprobs_close_to_teacher_forced():
    """In bfloat16 the kernels of decoding and of the teacher-forced pass round differently, so
    the recorded log-probs agree with the recomputed ones only to bf16 precision."""
    model = tiny_model("qwen2", VOCAB, initializer_range=0.1, seed=2, dtype="bfloat16", device=DEVICE)
    r = sample(model, random_prompts([6, 13, 3], seed=3), group_size=2, max_new_tokens=16, eos_token_ids=1,
               compile=True, generator=torch.Generator(DEVICE).manual_seed(0))
    input_ids, attention_mask, start = r.model_inputs()
    with torch.no_grad():
        recomputed = token_logprobs(model, input_ids, attention_mask, start)
    diff = (recomputed - r.logprobs)[r.completion_mask].abs()
    assert torch.isfinite(r.logprobs).all() and diff.mean() < 0.05 and diff.max() < 0.3


# ----------------------------------------------------------------------------- losses


def loss_inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, N = 6, 12, 4
    lengths = torch.tensor([12, 9, 12, 5, 10, 12])
    mask = torch.arange(T) < lengths[:, None]
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.05 * torch.randn(B, T, generator=g)
    ref = logp + 0.1 * torch.randn(B, T, generator=g)
    rank_ids = torch.where(mask, torch.arange(T)[None, :] * N // lengths[:, None], -1)
    adv_rank = torch.randn(B, N, generator=g)
    adv_seq = torch.randn(B, generator=g)
    ended = torch.tensor([True, True, False, True, False, True])
    out = dict(logp=logp, old=old, ref=ref, mask=mask, rank_ids=rank_ids, adv_rank=adv_rank, adv_seq=adv_seq,
               eos_index=eos_positions(lengths, ended))
    return {k: v.to(device) for k, v in out.items()}


@pytest.mark.parametrize("which", ["rank_grpo_mean", "rank_grpo_token", "grpo", "gspo"])
def test_losses_and_gradients_on_device_equal_cpu(which):
    results = []
    for device in ("cpu", DEVICE):
        x = loss_inputs(device)
        logp = x["logp"].clone().requires_grad_()
        if which.startswith("rank_grpo"):
            loss, metrics = rank_grpo_loss(logp, x["old"], x["ref"], x["rank_ids"], x["mask"], x["adv_rank"],
                                           aggregation="rank_mean" if which.endswith("mean") else "token_mean",
                                           eos_index=x["eos_index"])
        else:
            fn = grpo_loss if which == "grpo" else gspo_loss
            loss, metrics = fn(logp, x["old"], x["ref"], x["mask"], x["adv_seq"])
        loss.backward()
        results.append((loss.detach().cpu(), logp.grad.cpu()))
    (loss_cpu, grad_cpu), (loss_dev, grad_dev) = results
    assert torch.isfinite(loss_dev) and grad_dev.abs().sum() > 0
    torch.testing.assert_close(loss_dev, loss_cpu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_dev, grad_cpu, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bf16, checkpointing


def policy_grads(model, inputs, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
        logp = token_logprobs(model, *inputs)
    (-(logp.float() * torch.arange(logp.shape[1], device=logp.device)).sum()).backward()
    return logp.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_bf16_autocast_and_gradient_checkpointing(smooth):
    rollout = sample(smooth, random_prompts([6, 9], seed=4), group_size=2, max_new_tokens=10, eos_token_ids=1,
                     generator=torch.Generator(DEVICE).manual_seed(0))
    inputs = rollout.model_inputs()
    model = copy.deepcopy(smooth).train()
    logp32, grads32 = policy_grads(model, inputs, autocast=False)
    logp16, grads16 = policy_grads(model, inputs, autocast=True)
    # bf16 autocast: same log-probs to bf16 precision, finite gradients pointing the same way
    assert (logp16 - logp32)[rollout.completion_mask].abs().max() < 0.1
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([g.float().flatten() for g in grads16.values()])
    assert torch.isfinite(flat16).all() and torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.99
    # gradient checkpointing recomputes the same activations: the same gradients in float32
    model.gradient_checkpointing_enable()
    logp_ckpt, grads_ckpt = policy_grads(model, inputs, autocast=False)
    torch.testing.assert_close(logp_ckpt, logp32)
    for name, g in grads_ckpt.items():
        torch.testing.assert_close(g, grads32[name], rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- the trainers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny sandbox world, and SFT data whose completions are the ground-truth lists."""
    from rankgrpo.sandbox import SandboxConfig, build_world

    root = tmp_path_factory.mktemp("cuda_world")
    build_world(SandboxConfig(n_films=200, n_train=24, n_validation=4, n_test=4, hidden_size=64, num_layers=2,
                              num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=1024), root / "world")
    with open(root / "world" / "train.jsonl") as f, open(root / "sft.jsonl", "w") as out:
        for line in f:
            row = json.loads(line)
            lines = [f'"{t}" ({y})' for t, y in row["groundtruth_with_release_year"]]
            row["completion"] = [{"role": "assistant", "content": "\n".join(lines)}]
            out.write(json.dumps(row) + "\n")
    return root


def script(name, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{name} failed:\n{res.stderr[-3000:]}"
    return res.stdout


def final_weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_each_trainer_one_step_bf16_checkpointing(world, tmp_path):
    w = world / "world"
    common = ["--device", DEVICE, "--bf16", "--gradient-checkpointing", "--catalog", w / "catalog.jsonl"]
    script("train_sft.py", "--model", w / "base_model", "--train-data", world / "sft.jsonl",
           "--val-data", w / "validation.jsonl", "--out", tmp_path / "sft", "--max-steps", 1,
           "--micro-batch-size", 4, "--eval-every", 100, "--val-gen-examples", 2, "--max-new-tokens", 16, *common)
    script("train_rankgrpo.py", "--model", tmp_path / "sft" / "final", "--data", w / "train.jsonl",
           "--val-data", w / "validation.jsonl", "--out", tmp_path / "rl", "--steps", 1, "--prompts-per-step", 2,
           "--group-size", 4, "--max-new-tokens", 24, "--eval-every", 0, "--lr", 1e-3, "--compile", *common)
    rows = [json.loads(line) for line in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[0]["decode/graphs_compiled"] >= 1, "--compile reached the sampler and compiled its step"
    base, sft, rl = (final_weights(p) for p in (w / "base_model", tmp_path / "sft" / "final", tmp_path / "rl" / "final"))
    assert any(not torch.equal(base[k], sft[k]) for k in base), "the SFT step moved no weight"
    assert sft.keys() == rl.keys() and all(torch.isfinite(v).all() for v in rl.values())
