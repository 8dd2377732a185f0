"""One full Rank-GRPO step at the Qwen2.5-0.5B configuration: peak memory and completions/s.

The step is the one of ``train_rankgrpo.py`` (mu = 1, on-policy), on random weights and random
prompts, so nothing is downloaded and no tokenizer, catalog or data set is needed:

  1. sampling     P prompts x G completions with ``rankgrpo.sampling.sample`` (temperature 1,
                  up to --max-new-tokens tokens). Random weights give a near-uniform next-token
                  distribution, so the end-of-sequence token (the last vocabulary id) is almost
                  never drawn and nearly every completion runs to the full budget: the worst
                  case for time and memory.
  2. scoring      synthetic: random 0/1 relevance [P*G, N] (seeded), per-rank causal returns
                  (``causal_returns(rel, "exp_inf")``), ``group_advantages`` over the G samples.
                  Token -> rank ids split each completion's tokens into N equal consecutive
                  segments (ranks 0 .. N-1). A real run gets them from
                  ``rankgrpo.segment.token_ranks`` on the decoded list, which random tokens
                  cannot provide; the loss costs the same either way.
  3. reference    frozen reference-model log-probs of every completion, under no_grad
                  (the reference is a copy of the starting weights, as in the trainer).
  4. update       policy log-probs with autograd, ``rank_grpo_loss`` (the paper's beta, rank_mean
                  aggregation, the paper's clip range and length shaping) in micro-batches of
                  --micro-batch-size completions with gradient accumulation, gradient
                  clipping, one AdamW step.

Precision. The default, --weights-dtype float32 with --autocast, is what
``train_rankgrpo.py --bf16`` does: float32 weights, gradients and AdamW states, bfloat16
autocast for the log-prob forward/backward passes; sampling runs outside autocast, in the
weights' dtype, as in the trainer. --weights-dtype bfloat16 keeps weights, gradients and AdamW
states in bfloat16 (half the memory; sampling in bfloat16 too). Pure bfloat16 weights have
about 3 significant digits, so an update of lr 1e-6 is mostly rounded away: the reported
``weights/changed_frac`` (the share of policy weights that differ from the reference after the
run) shows it. A mixed-precision setup with float32 master weights (as with DeepSpeed) sits
between the two in memory.

Timing. One or more warm-up steps run first (CUDA kernels, allocator, AdamW state), then
--steps timed steps; on CUDA every stage ends with ``torch.cuda.synchronize()``. Reported per
stage: mean seconds, peak allocated and reserved GPU memory (peaks are reset at the start of
each stage of the timed steps); overall: seconds per step, completions per second, completion
tokens per second, and the memory held between steps. The analytic memory of weights,
gradients, AdamW states and the reference model is printed too, so a reader sees what is
fixed and what is activations, logits and KV cache.

    python benchmarks/bench_gpu_step.py                    # GPU: 8 prompts x G=8 = 64 completions
    python benchmarks/bench_gpu_step.py --prompts 48       # GPU: the paper's 48 x 8 = 384 per step
    python benchmarks/bench_gpu_step.py --weights-dtype bfloat16 --json step.json
    python benchmarks/bench_gpu_step.py --gradient-checkpointing --micro-batch-size 64
    python benchmarks/bench_gpu_step.py --tiny --device cpu --steps 1    # CPU smoke test, seconds

Defaults: Qwen2.5-0.5B shapes (``rankgrpo.models.qwen25_05b_config``), prompts of exactly 512
tokens, completions of up to 256 tokens, and the RL hyperparameters of ``train_rankgrpo.py --preset
paper`` (read from the trainer: G, N, lr, beta, micro-batch, clipping norm, AdamW beta2).
``--layers``, ``--hidden-size`` and the other shape flags override single fields; ``--tiny``
shrinks everything (2 layers, hidden 64, vocabulary 512, 2 prompts of 32 tokens, 24-token
completions). --json writes every figure.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from rankgrpo.config import arg, parse_config  # noqa: E402
from rankgrpo.io import atomic_write_json  # noqa: E402
from rankgrpo.losses import eos_positions, group_advantages, loss_denominator, rank_grpo_loss  # noqa: E402
from rankgrpo.models import model_from_config, qwen25_05b_config, resolve_dtype  # noqa: E402
from rankgrpo.rewards import causal_returns  # noqa: E402
from rankgrpo.sampling import sample, token_logprobs  # noqa: E402
from rankgrpo.scripts import load_script  # noqa: E402


train_rankgrpo = load_script(Path(__file__).resolve().parents[1] / "train_rankgrpo.py")
RL_PRESETS, TrainRankGRPOConfig = train_rankgrpo.PRESETS, train_rankgrpo.TrainRankGRPOConfig

GiB = 2**30


def paper_rl(name: str):
    """train_rankgrpo.py's value of field ``name`` under --preset paper (App. C)."""
    if name in RL_PRESETS["paper"]:
        return RL_PRESETS["paper"][name]
    return next(f.default for f in fields(TrainRankGRPOConfig) if f.name == name)



# Fields left at 0 take these values: the Qwen2.5-0.5B run of the issue, or the CPU smoke test.
# Shapes left out of "full" come from qwen25_05b_config itself.
PRESETS = {
    "full": dict(prompts=8, prompt_len=512, max_new_tokens=256, micro_batch_size=paper_rl("micro_batch_size")),
    "tiny": dict(prompts=2, prompt_len=32, max_new_tokens=24, micro_batch_size=8, layers=2, hidden_size=64,
                 heads=4, kv_heads=2, intermediate_size=128, vocab_size=512),
}
SHAPES = {"layers": "num_layers", "hidden_size": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
          "intermediate_size": "intermediate_size", "vocab_size": "vocab_size"}
STAGES = ("sample", "score", "reference", "update")


@dataclass
class BenchGPUStepConfig:
    """Peak memory and completions/s of one full Rank-GRPO step at the Qwen2.5-0.5B shapes (random weights)."""

    device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "Device.")
    tiny: bool = arg(False, "Shrink everything (2 layers, hidden 64, vocab 512, 2 prompts of 32 tokens, "
                            "24 new tokens): a CPU smoke test. Explicit flags still win.")
    prompts: int = arg(0, "Prompts per step (0: 8, or 2 with --tiny; the paper's is 48, i.e. 384 completions).")
    group_size: int = arg(paper_rl("group_size"), "G, completions per prompt (the paper's).")
    n_items: int = arg(paper_rl("n_items"), "N, ranks per list (the paper's).")
    prompt_len: int = arg(0, "Tokens per prompt, all prompts the same length (0: 512, or 32 with --tiny).")
    max_new_tokens: int = arg(0, "Completion token budget (0: 256, or 24 with --tiny).")
    micro_batch_size: int = arg(0, "Completions per forward/backward pass, gradients accumulated over the "
                                   "step (0: the paper's, train_rankgrpo.py --preset paper; 8 with --tiny).")
    layers: int = arg(0, "Decoder layers (0: Qwen2.5-0.5B's 24, or 2 with --tiny).")
    hidden_size: int = arg(0, "Hidden size (0: 896, or 64 with --tiny).")
    heads: int = arg(0, "Query heads (0: 14, or 4 with --tiny).")
    kv_heads: int = arg(0, "Key/value heads (0: 2).")
    intermediate_size: int = arg(0, "MLP size (0: 4864, or 128 with --tiny).")
    vocab_size: int = arg(0, "Vocabulary (0: 151,936, or 512 with --tiny).")
    weights_dtype: str = arg("float32", "dtype of the weights, gradients and AdamW states (the reference "
                                        "model's too): float32 (as train_rankgrpo.py) or bfloat16.",
                             choices=["float32", "bfloat16"])
    autocast: bool = arg(True, "bfloat16 autocast for the reference and policy log-prob passes "
                               "(train_rankgrpo.py --bf16).")
    gradient_checkpointing: bool = arg(False, "Recompute activations in the backward pass.")
    compile: bool = arg(False, "Sample with the static-cache compiled decode (train_rankgrpo.py --compile); "
                               "the warm-up step compiles.")
    lr: float = arg(paper_rl("lr"), "AdamW learning rate (the paper's); weight decay 0, betas (0.9, "
                                    "--adam-beta2).")
    adam_beta2: float = arg(paper_rl("adam_beta2"), "AdamW beta2 (the authors').")
    beta: float = arg(paper_rl("beta"), "KL coefficient to the reference model (the paper's).")
    max_grad_norm: float = arg(paper_rl("max_grad_norm"), "Gradient clipping norm.")
    warmup_steps: int = arg(1, "Untimed steps first (kernels, allocator, AdamW state).")
    steps: int = arg(3, "Timed steps (figures are their mean; peaks their maximum).")
    threads: int = arg(0, "torch CPU threads (0: torch's default).")
    seed: int = arg(3407, "Seed of the weights, prompts, sampling and synthetic relevance.")
    json: str = arg("", "Also write every figure to this JSON file.")

    def validate(self) -> None:
        preset = PRESETS["tiny" if self.tiny else "full"]
        for name, value in preset.items():
            if not getattr(self, name):
                setattr(self, name, value)
        if self.group_size < 2:
            raise SystemExit("error: --group-size must be at least 2 (advantages are normalised over the group)")
        if self.steps < 1 or self.warmup_steps < 0:
            raise SystemExit("error: --steps must be >= 1 and --warmup-steps >= 0")
        for name in ("prompts", "prompt_len", "max_new_tokens", "micro_batch_size", "n_items"):
            if getattr(self, name) < 1:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")

    def model_config(self):
        overrides = {SHAPES[k]: getattr(self, k) for k in SHAPES if getattr(self, k)}
        return qwen25_05b_config(**overrides)


# ----------------------------------------------------------------------------- setup


def build_models(cfg: BenchGPUStepConfig):
    """(policy in train mode, frozen reference copy in eval mode), seeded random weights."""
    policy = model_from_config(cfg.model_config(), seed=cfg.seed, dtype=cfg.weights_dtype, device=cfg.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    return policy, reference


def make_prompts(cfg: BenchGPUStepConfig, vocab_size: int, eos_id: int) -> list[list[int]]:
    """cfg.prompts random prompts of exactly cfg.prompt_len token ids (never the eos id)."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, eos_id, (cfg.prompts, cfg.prompt_len), generator=g).tolist()


def equal_segments(lengths: torch.Tensor, width: int, n_ranks: int) -> torch.Tensor:
    """Synthetic token -> rank ids [B, width]: each row's first lengths[b] tokens split into n_ranks
    equal consecutive segments (rank of token t = t * n_ranks // length), -1 after the row's end.

    >>> equal_segments(torch.tensor([4, 2]), 5, 2).tolist()
    [[0, 0, 1, 1, -1], [0, 1, -1, -1, -1]]
    """
    t = torch.arange(width, device=lengths.device)
    ranks = t[None, :] * n_ranks // lengths.clamp(min=1)[:, None]
    return torch.where(t[None, :] < lengths[:, None], ranks, -1)


def static_memory(n_params: int, weights_dtype: str) -> dict:
    """Analytic GiB of the fixed part of a step: weights, gradients, AdamW's two states (in the
    weights' dtype, as torch's AdamW keeps them) and the reference copy. Activations, logits and
    the KV cache come on top (the measured peaks)."""
    size = torch.empty((), dtype=resolve_dtype(weights_dtype)).element_size()
    parts = {"weights": n_params * size, "gradients": n_params * size, "adamw_states": 2 * n_params * size,
             "reference": n_params * size}
    out = {k: v / GiB for k, v in parts.items()}
    out["total"] = sum(parts.values()) / GiB
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peaks(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) GiB since the last reset; nan off CUDA."""
    if device.type != "cuda":
        return math.nan, math.nan
    return torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB


# ----------------------------------------------------------------------------- one step


def rl_step(cfg, policy, reference, optimizer, prompts, eos_id, sample_gen, rel_gen, device) -> dict:
    """One on-policy Rank-GRPO step (train_rankgrpo.py's, with synthetic rewards and ranks).
    Returns seconds, peak memory per stage and a few figures of the batch."""
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if cfg.autocast \
        else contextlib.nullcontext
    seconds, peaks = {}, {}
    clock = time.perf_counter()

    def stage_done(name):
        nonlocal clock
        _sync(device)
        now = time.perf_counter()
        seconds[name], peaks[name] = now - clock, _peaks(device)
        _reset_peak(device)
        clock = time.perf_counter()

    _reset_peak(device)
    clock = time.perf_counter()
    # 1. rollout (the trainer samples outside autocast)
    policy.eval()
    rollout = sample(policy, prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                     temperature=1.0, eos_token_ids=eos_id, pad_token_id=0, generator=sample_gen,
                     compile=cfg.compile)
    stage_done("sample")

    # 2. synthetic scoring and segmentation
    B = rollout.num_rows
    rel = torch.randint(0, 2, (B, cfg.n_items), generator=rel_gen).float()
    returns = causal_returns(rel, "exp_inf")
    adv = group_advantages(returns.view(-1, cfg.group_size, cfg.n_items)).view_as(returns).to(device)
    mask = rollout.completion_mask
    rank_ids = equal_segments(rollout.lengths, mask.shape[1], cfg.n_items)
    eos_index = eos_positions(rollout.lengths, rollout.ended_with_eos)
    denom = loss_denominator("rank_mean", mask, cfg.n_items)
    micro = [torch.arange(i, min(i + cfg.micro_batch_size, B)) for i in range(0, B, cfg.micro_batch_size)]
    stage_done("score")

    # 3. reference log-probs
    ref_logp = []
    with torch.no_grad(), autocast():
        for rows in micro:
            ids, attn, start = rollout.model_inputs(rows)
            ref_logp.append(token_logprobs(reference, ids, attn, start, 1.0).float())
    stage_done("reference")

    # 4. policy log-probs, loss, backward (accumulated), clipping, AdamW
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for j, rows in enumerate(micro):
        ids, attn, start = rollout.model_inputs(rows)
        with autocast():
            logp = token_logprobs(policy, ids, attn, start, 1.0)
        logp = logp.float()
        loss, _ = rank_grpo_loss(logp, logp.detach(), ref_logp[j], rank_ids[rows], mask[rows], adv[rows],
                                 beta=cfg.beta, aggregation="rank_mean", eos_index=eos_index[rows], denom=denom)
        loss.backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stage_done("update")

    return {"seconds": seconds, "peaks": peaks, "completions": B,
            "completion_tokens": int(rollout.lengths.sum()), "truncated_frac": rollout.truncated.float().mean().item(),
            "loss": total.item(), "grad_norm": float(grad_norm)}


@torch.no_grad()
def weight_change(policy, reference) -> dict:
    """How far training moved the policy from its starting weights (the reference copy):
    the largest absolute change and the share of weights that changed at all."""
    biggest, changed, count = 0.0, 0, 0
    for p, r in zip(policy.parameters(), reference.parameters()):
        diff = (p.detach().float() - r.float()).abs()
        biggest = max(biggest, float(diff.max()))
        changed += int((diff > 0).sum())
        count += p.numel()
    return {"max_abs_change": biggest, "changed_frac": changed / max(count, 1)}


# ----------------------------------------------------------------------------- main


def run(cfg: BenchGPUStepConfig) -> dict:
    """Build, warm up, time; return every figure (what --json writes)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (use --tiny --device cpu)")
    torch.manual_seed(cfg.seed)
    policy, reference = build_models(cfg)
    vocab = policy.config.vocab_size
    eos_id = vocab - 1  # a real vocabulary id: a row may still end early, as a real one can
    n_params = sum(p.numel() for p in policy.parameters())  # tied embeddings counted once
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=0.0)
    prompts = make_prompts(cfg, vocab, eos_id)
    sample_gen = torch.Generator(device).manual_seed(cfg.seed)
    rel_gen = torch.Generator().manual_seed(cfg.seed + 1)
    analytic = static_memory(n_params, cfg.weights_dtype)

    c = policy.config
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {cfg.device} ({gpu}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {n_params / 1e6:.1f}M parameters, {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"heads {c.num_attention_heads}/{c.num_key_value_heads}, MLP {c.intermediate_size}, vocab {vocab}")
    print(f"precision: {cfg.weights_dtype} weights/gradients/AdamW states"
          f"{', bfloat16 autocast for the log-prob passes' if cfg.autocast else ', no autocast'}; "
          f"sampling in {cfg.weights_dtype}{' (compiled decode)' if cfg.compile else ''}; "
          f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}")
    print(f"step: {cfg.prompts} prompts x G={cfg.group_size} = {cfg.prompts * cfg.group_size} completions, "
          f"prompts {cfg.prompt_len} tokens, completions up to {cfg.max_new_tokens}, N={cfg.n_items}, "
          f"micro-batch {cfg.micro_batch_size}, lr {cfg.lr:g}, beta {cfg.beta:g}")
    print("analytic memory of the weights, gradients, AdamW states and reference: " + ", ".join(
        f"{k.replace('_', ' ')} {v:.2f} GiB" for k, v in analytic.items()))

    step_args = (cfg, policy, reference, optimizer, prompts, eos_id, sample_gen, rel_gen, device)
    for _ in range(cfg.warmup_steps):
        rl_step(*step_args)
    _sync(device)
    held = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else math.nan
    rows = [rl_step(*step_args) for _ in range(cfg.steps)]

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    stage_s = {s: mean([r["seconds"][s] for r in rows]) for s in STAGES}
    step_s = sum(stage_s.values())
    completions = rows[0]["completions"]
    tokens = mean([r["completion_tokens"] for r in rows])
    peak_alloc = {s: max(r["peaks"][s][0] for r in rows) for s in STAGES}
    peak_res = {s: max(r["peaks"][s][1] for r in rows) for s in STAGES}
    result = {
        "config": asdict(cfg), "device_name": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "n_params": n_params, "completions_per_step": completions,
        "completion_tokens_per_step": tokens, "truncated_frac": mean([r["truncated_frac"] for r in rows]),
        "seconds": {**stage_s, "step": step_s},
        "samples_per_s": completions / step_s, "completion_tokens_per_s": tokens / step_s,
        "memory_gib": {"analytic_static": analytic, "held_between_steps": held,
                       "peak_allocated": max(peak_alloc.values()), "peak_reserved": max(peak_res.values()),
                       "peak_allocated_by_stage": peak_alloc, "peak_reserved_by_stage": peak_res},
        "loss": rows[-1]["loss"], "grad_norm": rows[-1]["grad_norm"],
        "weights": weight_change(policy, reference),
    }
    report(result)
    if cfg.json:
        atomic_write_json(cfg.json, _nan_to_none(result))  # strict JSON: "n/a" figures become null
        print(f"wrote {cfg.json}")
    return result


def _nan_to_none(x):
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def _gib(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f} GiB"


def report(r: dict) -> None:
    mem = r["memory_gib"]
    print(f"\n{'stage':<11}{'seconds':>10}{'share':>8}{'peak alloc':>14}{'peak reserved':>15}")
    for s in STAGES:
        sec = r["seconds"][s]
        print(f"{s:<11}{sec:>10.3f}{sec / r['seconds']['step']:>8.1%}"
              f"{_gib(mem['peak_allocated_by_stage'][s]):>14}{_gib(mem['peak_reserved_by_stage'][s]):>15}")
    print(f"{'step':<11}{r['seconds']['step']:>10.3f}{'':>8}{_gib(mem['peak_allocated']):>14}"
          f"{_gib(mem['peak_reserved']):>15}")
    print(f"\n{r['completions_per_step']} completions, {r['completion_tokens_per_step']:.0f} completion tokens per "
          f"step ({r['truncated_frac']:.1%} ran to the token budget)")
    print(f"samples/s {r['samples_per_s']:.2f}  completion tokens/s {r['completion_tokens_per_s']:,.0f}")
    print(f"memory: held between steps {_gib(mem['held_between_steps'])} (weights, AdamW states, reference; "
          f"gradients are freed after the step; analytic with gradients {mem['analytic_static']['total']:.2f} GiB), "
          f"peak allocated {_gib(mem['peak_allocated'])}, "
          f"peak reserved {_gib(mem['peak_reserved'])}")
    w = r["weights"]
    print(f"loss {r['loss']:.4g}, grad norm {r['grad_norm']:.4g}; weights changed from the reference: "
          f"{w['changed_frac']:.1%} of them, by at most {w['max_abs_change']:.3g}")
    if r["config"]["weights_dtype"] == "bfloat16" and w["changed_frac"] < 0.5:
        print("note: most bfloat16 weights did not move: updates of this lr are below their rounding step")


def main(argv=None) -> dict:
    return run(parse_config(BenchGPUStepConfig, argv))


if __name__ == "__main__":
    main()
