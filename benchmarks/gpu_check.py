"""One command that shows whether this project runs, and how fast, on a GPU. Offline; sized to
finish within 6 minutes on one H100-class GPU, compiles included.

    python benchmarks/gpu_check.py                      # a CUDA machine: every part below
    python benchmarks/gpu_check.py --tiny               # the same code path on the CPU, tiny shapes
    python benchmarks/gpu_check.py --peak-bandwidth-gbs 3350 --peak-tflops 989   # a GPU not in the table

Parts, in this order (each runs even if an earlier one failed; a failure is recorded with its error):

1. attention   which attention kernel runs: the model config's `_attn_implementation`, the SDPA
               backends torch has enabled, and for each call the sampler makes (prefill, eager
               decode, compiled decode; prompts of equal length and left-padded ones) how the
               grouped-query heads reach SDPA and which SDPA kernel torch picks for those inputs.
               Also the bytes read per decoded token (analytic, below).
2. sampler     completion tokens/s of `sample` eager, `sample(compile=True)` and `model.generate`,
               G = 8 completions of 48 random prompts of 512 tokens, 256 new tokens each (the
               end-of-sequence id never occurs, so every row decodes all of them), random weights
               with the published Qwen2.5-0.5B shapes in bfloat16. Ratios within this one run, and
               each figure as a share of the decode bound below. Then greedy tokens of the eager
               and the compiled decode, compared with a near-tie tolerance (`compare_decodes`).
3. generators  rollout cost of per-prompt keys (`PromptKeys`, counter-based draws: what the
               trainer uses, so that a prompt's group does not depend on the batch) against one
               shared torch.Generator: the same sampler run timed both ways in interleaved pairs,
               eager, and compiled when the sampler part compiled it; the ratio is the median
               over the pairs.
4. rl_step     one Rank-GRPO step at the paper's shapes (`bench_gpu_step.py`: 48 prompts x G = 8,
               N = 20, 512-token prompts, up to 256-token completions, reference model, float32
               weights with bf16 autocast as `train_rankgrpo.py --bf16`): peak memory, samples/s and
               the time of each stage.
5. tests       the test subset marked `cuda` (pytest -m cuda): the sampler eager and compiled
               (CUDA graphs), the losses, one step of each trainer, bf16 autocast, gradient
               checkpointing. A run in which no test ran (all skipped without CUDA, or none
               selected) is reported as "not run", never "passed".
6. torchrun    with two or more GPUs (the trainers set up torch.distributed themselves): the same
               two Rank-GRPO steps in one process and under `torchrun --nproc-per-node 2`, with DDP
               and with --fsdp (FSDP2), and the largest weight difference from the one-process result.

Time budget. Every part has a budget (PART_BUDGETS_S, sized for one H100; the tests part gets
whatever is left at its start, at least its budget); a part starts only if the time spent so
far plus its budget fits in the total (--budget-s, 360 s), otherwise it is reported as
"skipped: budget". Each part's budget and measured time are printed and written.

Results. OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the tables) are rewritten
atomically after every part, so a run that is killed or runs out of memory keeps what finished
("finished": false until the last part). The environment variable GPU_CHECK_KILL_AFTER=<part>
makes the process SIGKILL itself right after writing that part (used by the tests only).

The decode bound (what the sampler could reach at best on this GPU). With R = P·G rows, a
prompt of L tokens, T new tokens, N weights, b bytes per element, n_layers, n_kv key/value
heads, n_heads query heads of d dimensions, memory bandwidth BW and peak FLOP rate F:

    decode step at context c:   bytes(c) = N·b + R · n_layers · 2 · n_kv · d · b · c   (weights + KV cache read)
                                flops(c) = 2·N·R + 4 · R · n_layers · n_heads · d · c
                                time(c)  = max(bytes(c) / BW, flops(c) / F)
    prefill (each prompt once): time     = 2·N·P·L / F
    bound                       seconds  = prefill + sum over t = 0 .. T-1 of time(L + t)
                                tokens/s = R·T / seconds

Reading the logits and sampling are left out, so the bound is optimistic. BW and F are the
datasheet figures of the GPU (dense bf16 tensor-core FLOPs, no sparsity), looked up by device
name in PEAKS, or given with --peak-bandwidth-gbs / --peak-tflops. The measured speed of a
device-to-device copy is reported next to them. Bytes per decoded token, the same figure per
row: N·b / R + n_layers · 2 · n_kv · d · b · c. Where SDPA gets its keys and values repeated
for every query head (transformers' `repeat_kv`, see the attention part), attention reads
n_heads / n_kv times the KV bytes, and the bound is also given with that factor.

The sampler and the Rank-GRPO step use random prompt token ids, so they need no tokenizer (the
trainers in the tests use the sandbox world's own). `--tiny` runs every part on the CPU with
tiny shapes (2-layer model, 1 prompt x G = 8, 24 new tokens) in about a minute;
tests/integration/test_gpu_check.py runs it.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # the budget counts the imports too when run as a script

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from rankgrpo import compiled_decode  # noqa: E402
from rankgrpo.compiled_decode import release_static_cache  # noqa: E402
from rankgrpo.config import arg, parse_config  # noqa: E402
from rankgrpo.distributed import prompt_keys  # noqa: E402
from rankgrpo.io import atomic_write_json, atomic_write_text  # noqa: E402
from rankgrpo.models import model_config, model_from_config, qwen25_05b_config, resolve_dtype  # noqa: E402
from rankgrpo.kv_cache import last_logits, left_pad, positions_from_mask  # noqa: E402
from rankgrpo.sampling import sample  # noqa: E402
from rankgrpo.scripts import load_script  # noqa: E402

bench_gpu_step = load_script(Path(__file__).with_name("bench_gpu_step.py"))
bench_sampling = load_script(Path(__file__).with_name("bench_sampling.py"))

GB = 1e9
# name fragment (lower case, most specific first) -> (memory bandwidth GB/s, dense bf16 TFLOP/s),
# from the vendors' datasheets
PEAKS = [
    ("h200", 4800, 989),
    ("h100 nvl", 3900, 835),
    ("h100 pcie", 2000, 756),
    ("h100", 3350, 989),  # SXM
    ("a100-sxm4-80gb", 2039, 312),
    ("a100 80gb pcie", 1935, 312),
    ("a100", 1555, 312),  # 40 GB
    ("l40s", 864, 362),
    ("b200", 8000, 2250),
]
PARTS = ("attention", "sampler", "generators", "rl_step", "tests", "torchrun")  # figures first
# Seconds each part may take on one H100 (estimates: not measured on a GPU yet). The single-GPU
# parts sum to 330 s of the 360 s total, leaving about 10 s for the imports and the copy-bandwidth
# measurement and the rest to the tests; the sampler's includes compiling the decode step (about
# 60 to 90 s for 24 layers), the attention part's building the model and two dynamo traces.
PART_BUDGETS_S = {"attention": 30, "sampler": 130, "generators": 20, "rl_step": 60, "tests": 90, "torchrun": 120}
TOTAL_BUDGET_S = 360.0
TINY_PART_BUDGETS_S = {"attention": 60, "sampler": 300, "generators": 60, "rl_step": 60, "tests": 120,
                       "torchrun": 60}  # a busy 2-core CPU, compile from a cold cache
TINY_TOTAL_BUDGET_S = 1200.0
RL_COMPILE_EXTRA_S = 90  # --rl-compile compiles the float32 decode step once more
TINY_SAMPLER = dict(prompts=1, prompt_len=32, new_tokens=24)
FULL_SAMPLER = dict(prompts=48, prompt_len=512, new_tokens=256)
TINY_GENERATOR_REPEATS = 15  # a tiny rollout takes well under a second on the CPU
KILL_AFTER_ENV = "GPU_CHECK_KILL_AFTER"


def default_tie_rtol(dtype: torch.dtype) -> float:
    """Relative near-tie tolerance of `compare_decodes` for logits computed in `dtype`: 4 machine
    epsilons, at least 1e-5. bfloat16: 2^-5 = 0.031 (its logits are spaced 2^-8 to 2^-7 of their
    size apart, so 1e-3 would accept only exact ties), float16: 2^-8, float32: 1e-5.

    >>> [default_tie_rtol(d) for d in (torch.bfloat16, torch.float16, torch.float32)]
    [0.03125, 0.00390625, 1e-05]
    """
    return max(4 * torch.finfo(dtype).eps, 1e-5)


@dataclass
class GPUCheckConfig:
    """Attention path, sampler throughput against its decode bound, generator cost, one Rank-GRPO
    step and the cuda tests, on a GPU, within a time budget."""

    tiny: bool = arg(False, "Every part on the CPU with tiny shapes, in about a minute (a smoke test).")
    device: str = arg("", "Device (default: cuda if available, else cpu; --tiny: cpu).")
    out: str = arg("runs/gpu_check", "Directory for gpu_check.json and gpu_check.md.")
    skip: list[str] = arg([], f"Parts to leave out, of {', '.join(PARTS)}.")
    budget_s: float = arg(0.0, f"Total time budget in seconds (0: {TOTAL_BUDGET_S:.0f}, or {TINY_TOTAL_BUDGET_S:.0f} "
                               "with --tiny). A part starts only if its own budget fits in the time left; "
                               "otherwise it is reported as 'skipped: budget'.")
    group_size: int = arg(8, "G, completions per prompt.")
    prompts: int = arg(0, "Sampler prompts (0: 48, or 1 with --tiny).")
    prompt_len: int = arg(0, "Sampler prompt tokens (0: 512, or 32 with --tiny).")
    new_tokens: int = arg(0, "Sampler new tokens per completion (0: 256, or 24 with --tiny).")
    dtype: str = arg("", "Sampler model dtype (default: bfloat16 on CUDA, float32 on the CPU).")
    repeats: int = arg(1, "Timed runs of each sampler method, interleaved, after an untimed warm-up; the "
                          "fastest counts. Each repeat adds about 20 s on an H100.")
    generator_repeats: int = arg(0, "Interleaved timed pairs (shared generator, per-prompt keys) of the generators "
                                    f"part; the ratio is their median (0: --repeats, or {TINY_GENERATOR_REPEATS} "
                                    "with --tiny).")
    tie_rtol: float = arg(0.0, "Eager and compiled greedy tokens may first differ where the eager logits of the two "
                               "tokens are within this fraction of the larger one (0: 4 machine epsilons of the "
                               "dtype, at least 1e-5: 0.031 in bfloat16).")
    rl_prompts: int = arg(48, "Prompts of the Rank-GRPO step (x G completions; --tiny: bench_gpu_step's tiny preset).")
    rl_steps: int = arg(1, "Timed Rank-GRPO steps (after one untimed warm-up step).")
    rl_compile: bool = arg(False, "Sample the Rank-GRPO step with the compiled decode too (one more compile, "
                                  f"float32 weights: its budget grows by {RL_COMPILE_EXTRA_S} s).")
    peak_bandwidth_gbs: float = arg(0.0, "Memory bandwidth of the device in GB/s (0: look the device name up).")
    peak_tflops: float = arg(0.0, "Dense bf16 peak of the device in TFLOP/s (0: look the device name up).")
    seed: int = arg(0, "Seed of the weights, prompts and sampling.")

    def validate(self) -> None:
        self.device = self.device or ("cuda" if torch.cuda.is_available() and not self.tiny else "cpu")
        self.dtype = self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.budget_s = self.budget_s or (TINY_TOTAL_BUDGET_S if self.tiny else TOTAL_BUDGET_S)
        self.tie_rtol = self.tie_rtol or default_tie_rtol(resolve_dtype(self.dtype))
        self.generator_repeats = self.generator_repeats or (TINY_GENERATOR_REPEATS if self.tiny else self.repeats)
        preset = TINY_SAMPLER if self.tiny else FULL_SAMPLER
        for name, value in preset.items():
            if not getattr(self, name):
                setattr(self, name, value)
        unknown = set(self.skip) - set(PARTS)
        if unknown:
            raise SystemExit(f"error: --skip {sorted(unknown)}: parts are {', '.join(PARTS)}")


def part_budgets(cfg: GPUCheckConfig) -> dict[str, float]:
    """Seconds each part may take under `cfg` (the tests part may use more if time is left)."""
    budgets = dict(TINY_PART_BUDGETS_S if cfg.tiny else PART_BUDGETS_S)
    if cfg.rl_compile:
        budgets["rl_step"] += RL_COMPILE_EXTRA_S
    return budgets


# ----------------------------------------------------------------------------- the decode bound


def device_peaks(name: str, bandwidth_gbs: float = 0.0, tflops: float = 0.0) -> dict:
    """Peak memory bandwidth (GB/s) and dense bf16 FLOP rate (TFLOP/s) for a device name; overrides
    win; None where unknown.

    >>> device_peaks("NVIDIA H100 80GB HBM3")
    {'bandwidth_gbs': 3350, 'tflops': 989, 'source': 'datasheet (h100)'}
    """
    found = next(((key, bw, fl) for key, bw, fl in PEAKS if key in name.lower()), None)
    bw = bandwidth_gbs or (found[1] if found else None)
    fl = tflops or (found[2] if found else None)
    if bandwidth_gbs or tflops:
        source = "given on the command line" + (f", rest from datasheet ({found[0]})" if found else "")
    else:
        source = f"datasheet ({found[0]})" if found else "unknown device: pass --peak-bandwidth-gbs and --peak-tflops"
    return {"bandwidth_gbs": bw, "tflops": fl, "source": source}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decode_bound(config, n_params: int, bytes_per_elem: int, *, prompts: int, group_size: int, prompt_len: int,
                 new_tokens: int, bandwidth_gbs: float | None, tflops: float | None, kv_factor: float = 1.0) -> dict:
    """The best possible sampler time for this work on a device (the formula of the module
    docstring). Returns seconds, tokens/s and the memory- and compute-bound parts; None without peaks.
    kv_factor multiplies the KV bytes read (n_heads / n_kv where SDPA gets repeated keys and values).

    Example (1 layer, N = 1000 weights, b = 2, R = 2 rows of 1 prompt, L = 3, T = 2, n_kv = 1,
    n_heads = 2, d = 4, BW = 1 GB/s, F = 1 TFLOP/s):
        bytes(c) = 2000 + 2·1·2·1·4·2·c = 2000 + 32c -> 2096 B at c = 3, 2128 B at c = 4
        time(c) = bytes(c) / 1e9 (the FLOPs, 4000 + 64c, take 1000x less time)
        seconds = 2·1000·1·3/1e12 + (2096 + 2128)/1e9 = 4.230e-6 -> tokens/s = 4 / 4.230e-6
    """
    if not bandwidth_gbs or not tflops:
        return {"seconds": None, "tokens_per_s": None, "memory_s": None, "compute_s": None}
    R = prompts * group_size
    layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    n_heads = config.num_attention_heads
    d = _head_dim(config)
    bw, flops_rate = bandwidth_gbs * GB, tflops * 1e12
    prefill_s = 2 * n_params * prompts * prompt_len / flops_rate
    memory_s = compute_s = total = 0.0
    for t in range(new_tokens):
        c = prompt_len + t
        mem = (n_params * bytes_per_elem + kv_factor * R * layers * 2 * n_kv * d * bytes_per_elem * c) / bw
        comp = (2 * n_params * R + 4 * R * layers * n_heads * d * c) / flops_rate
        memory_s += mem
        compute_s += comp
        total += max(mem, comp)
    seconds = prefill_s + total
    return {"seconds": seconds, "tokens_per_s": R * new_tokens / seconds, "memory_s": memory_s,
            "compute_s": compute_s, "prefill_s": prefill_s}


def decode_bytes_per_token(config, n_params: int, bytes_per_elem: int, *, rows: int, context: float) -> dict:
    """Bytes read per decoded token (analytic, from the config and dtype; not measured): one decode
    step reads the weights once for all R rows and each row's KV cache at context c.

        weights  = N·b / R
        kv       = n_layers · 2 · n_kv · d · b · c          (kv_per_position · c)
        repeated = kv · n_heads / n_kv                       (SDPA given K/V copied for every query head)

    >>> from types import SimpleNamespace as C
    >>> b = decode_bytes_per_token(C(num_hidden_layers=2, num_key_value_heads=1, num_attention_heads=4,
    ...                              hidden_size=16), 1000, 2, rows=4, context=10)
    >>> b["kv_per_position"], b["weights"], b["kv"], b["kv_repeated"], b["total"], b["total_repeated"]
    (32, 500.0, 320.0, 1280.0, 820.0, 1780.0)
    """
    n_rep = config.num_attention_heads // config.num_key_value_heads
    kv_per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * _head_dim(config) * bytes_per_elem
    weights = n_params * bytes_per_elem / rows
    kv = kv_per_position * float(context)
    return {"rows": rows, "context": context, "bytes_per_elem": bytes_per_elem, "n_rep": n_rep,
            "kv_per_position": kv_per_position, "weights": weights, "kv": kv, "kv_repeated": kv * n_rep,
            "total": weights + kv, "total_repeated": weights + kv * n_rep}


def copy_bandwidth_gbs(device: torch.device, megabytes: int) -> float:
    """Measured device memory bandwidth in GB/s: a buffer copied 10 times, read + write counted."""
    x = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    bench_sampling.sync(str(device))
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    bench_sampling.sync(str(device))
    return 2 * x.numel() * 10 / (time.perf_counter() - start) / GB


# ----------------------------------------------------------------------------- attention


def gqa_path(q_shape, k_shape, enable_gqa: bool, n_heads: int, n_kv: int) -> str:
    """How one SDPA call received grouped-query heads, from the shapes it was given:

        "enable_gqa"  K/V with n_kv heads, SDPA told to share them (no copy)
        "pack_gqa"    a one-token query regrouped to [B, n_kv, n_heads / n_kv, d] (no copy)
        "repeat_kv"   K/V copied to n_heads heads (n_heads / n_kv times the KV bytes)
        "mha"         n_heads == n_kv, nothing to share

    >>> gqa_path((4, 14, 1, 64), (4, 14, 768, 64), False, 14, 2)
    'repeat_kv'
    >>> gqa_path((4, 2, 7, 64), (4, 2, 768, 64), False, 14, 2)
    'pack_gqa'
    """
    if n_heads == n_kv:
        return "mha"
    if enable_gqa:
        return "enable_gqa"
    if k_shape[1] == n_heads:
        return "repeat_kv"
    if q_shape[1] == n_kv and q_shape[2] == n_heads // n_kv:
        return "pack_gqa"
    return "unknown"


def sdpa_kernel_choice(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False) -> str:
    """The SDPA kernel torch picks for these inputs (torch._fused_sdp_choice: FLASH_ATTENTION,
    EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH, ...), or why it could not be asked."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal,
                                                  scale=scale, enable_gqa=enable_gqa)).name
    except Exception as e:  # noqa: BLE001 - a private torch function: report, do not fail the part
        return f"unknown ({type(e).__name__})"


def _sdpa_record(q, k, mask, enable_gqa, is_causal, kernel) -> dict:
    return {"q": list(q.shape), "k": list(k.shape), "mask": None if mask is None else list(mask.shape),
            "enable_gqa": bool(enable_gqa), "is_causal": bool(is_causal), "kernel": kernel}


@contextlib.contextmanager
def recording_sdpa(calls: list):
    """Record every eager torch.nn.functional.scaled_dot_product_attention call (shapes, mask,
    enable_gqa, the kernel torch picks) while the block runs."""
    F = torch.nn.functional
    original = F.scaled_dot_product_attention

    def record(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        kernel = sdpa_kernel_choice(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        calls.append(_sdpa_record(query, key, attn_mask, enable_gqa, is_causal, kernel))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = record
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def traced_sdpa_backend(calls: list):
    """A torch.compile backend that records the SDPA calls of the graph dynamo traced (as the
    compiled decode step sees them: the kernel is asked with real tensors of those shapes, batch 1),
    then runs the graph as it is."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op != "call_function" or "scaled_dot_product_attention" not in str(node.target):
                continue
            a = {**dict(zip(names, node.args)), **node.kwargs}
            fake = {k: v.meta.get("example_value") for k, v in a.items() if isinstance(v, torch.fx.Node)}
            real = {k: (torch.ones if v.dtype == torch.bool else torch.zeros)((1, *v.shape[1:]), dtype=v.dtype,
                                                                              device=v.device)
                    for k, v in fake.items()}
            flags = {k: a.get(k, d) for k, d in (("dropout_p", 0.0), ("is_causal", False), ("scale", None),
                                                  ("enable_gqa", False))}
            kernel = sdpa_kernel_choice(real["query"], real["key"], real["value"], real.get("attn_mask"), **flags)
            calls.append(_sdpa_record(fake["query"], fake["key"], fake.get("attn_mask"), flags["enable_gqa"],
                                      flags["is_causal"], kernel))
        return gm.forward

    return backend


def probe_attention(model, prompts: list[list[int]], *, compile: bool) -> dict:
    """The first SDPA call of the prefill and of the decode step of sample(model, prompts, G = 2,
    2 new tokens), eager or compiled, each with its GQA path and kernel. The compiled decode step is
    traced by dynamo with a recording backend (`traced_sdpa_backend`) instead of being compiled."""
    calls = []
    kwargs = dict(group_size=2, max_new_tokens=2, eos_token_ids=model.config.vocab_size, pad_token_id=0)
    if compile:
        step = compiled_decode.compiled_step
        compiled_decode.compiled_step = lambda mode: torch.compile(
            compiled_decode.one_token_step, backend=traced_sdpa_backend(calls), fullgraph=True, dynamic=False)
        try:
            sample(model, prompts, **kwargs, compile=True)
        finally:
            compiled_decode.compiled_step = step
            release_static_cache(model)
        found = {"decode": calls}
    else:
        with recording_sdpa(calls):
            sample(model, prompts, **kwargs)
        layers = model.config.num_hidden_layers  # one call per layer: the prefill, then one decode step
        found = {"prefill": calls[:layers], "decode": calls[layers:]}
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    return {phase: {**c[0], "gqa_path": gqa_path(c[0]["q"], c[0]["k"], c[0]["enable_gqa"], n_heads, n_kv)}
            for phase, c in found.items() if c}


def enabled_sdpa_backends(device: torch.device) -> dict | None:
    """torch's switches for the CUDA SDPA kernels (None off CUDA)."""
    if device.type != "cuda":
        return None
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
            "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}


def run_attention(cfg: GPUCheckConfig, model, prompts: list[list[int]]) -> dict:
    """Which attention kernel runs in the sampler, and the bytes read per decoded token."""
    import transformers

    config = model.config
    vocab = config.vocab_size
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n = min(8, cfg.prompt_len)
    equal = [prompts[0][:n], torch.randint(0, vocab, (n,), generator=g).tolist()]
    padded = [equal[0], equal[1][: max(1, n // 2)]]
    paths = {}
    for name, batch in (("equal_length_prompts", equal), ("padded_prompts", padded)):
        eager = probe_attention(model, batch, compile=False)
        compiled = probe_attention(model, batch, compile=True)
        paths[name] = {"prefill": eager.get("prefill"), "eager_decode": eager.get("decode"),
                       "compiled_decode": compiled.get("decode")}
    n_params = sum(p.numel() for p in model.parameters())
    b = torch.empty((), dtype=resolve_dtype(cfg.dtype)).element_size()
    per_token = decode_bytes_per_token(config, n_params, b, rows=cfg.prompts * cfg.group_size,
                                       context=cfg.prompt_len + (cfg.new_tokens - 1) / 2)
    return {"status": "passed", "attn_implementation": config._attn_implementation,
            "transformers": transformers.__version__, "sdpa_backends_enabled": enabled_sdpa_backends(
                torch.device(cfg.device)),
            "num_heads": config.num_attention_heads, "num_kv_heads": config.num_key_value_heads,
            "paths": paths, "bytes_per_decoded_token": per_token}


# ----------------------------------------------------------------------------- eager against compiled


def first_differences(a: torch.Tensor, b: torch.Tensor, len_a: torch.Tensor, len_b: torch.Tensor) -> torch.Tensor:
    """Per row, the first step at which two decodes differ (a token, or one ending where the other
    goes on), or -1 where they are the same. a, b: token ids [B, Ta], [B, Tb]; len_a, len_b: [B].

    >>> first_differences(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 3], [4, 9, 6]]),
    ...                   torch.tensor([3, 3]), torch.tensor([3, 3])).tolist()
    [-1, 1]
    """
    T = max(a.shape[1], b.shape[1])
    pos = torch.arange(T, device=a.device)

    def masked(x, n):
        x = torch.nn.functional.pad(x, (0, T - x.shape[1]), value=-1)
        return x.masked_fill(pos >= n[:, None], -1)

    diff = masked(a, len_a) != masked(b, len_b)
    return torch.where(diff.any(1), diff.float().argmax(1), torch.full_like(len_a, -1))


def compare_decodes(eager_ids, compiled_ids, eager_lengths, compiled_lengths, eager_logits_at, rtol: float,
                    eager_logprobs=None, compiled_logprobs=None) -> dict:
    """Greedy tokens of the eager and the compiled decode, compared with a near-tie tolerance.

    Two numerically different kernels may break a near-tie of the top logits differently, after
    which the rows go separate ways. So only each row's first difference counts: at its step t,
    with a the eager token and c the compiled one, and l the eager logits at t (from
    `eager_logits_at(rows [D], steps [D]) -> [D, V]`), it is a near tie when

        l[a] - l[c] <= rtol · max(|l[a]|, |l[c]|)

    (for greedy decoding c is the runner-up, so this is the eager top-2 gap; a negative gap,
    where the recomputed logits prefer c, is a tie as well). Any other first difference,
    or one where a row ends and the other does not, is a mismatch. With the log-probs of both
    decodes, the largest |difference| on the tokens before each row's first difference is
    reported too.

    Returns rows, identical, near_tie, mismatch, tolerance_rel, max_abs_logprob_diff and one
    entry per differing row (row, step, tokens, gap, relative gap, near_tie).
    """
    first = first_differences(eager_ids, compiled_ids, eager_lengths, compiled_lengths)
    rows = (first >= 0).nonzero().squeeze(-1)
    steps = first[rows]
    divergences = []
    if len(rows):
        has_tokens = (steps < eager_lengths[rows]) & (steps < compiled_lengths[rows])
        logits = eager_logits_at(rows[has_tokens], steps[has_tokens]).float()
        k = 0
        for r, t, both in zip(rows.tolist(), steps.tolist(), has_tokens.tolist()):
            entry = {"row": r, "step": t, "eager_token": None, "compiled_token": None, "gap": None,
                     "gap_rel": None, "near_tie": False}
            if both:
                a, c = int(eager_ids[r, t]), int(compiled_ids[r, t])
                la, lc = float(logits[k, a]), float(logits[k, c])
                scale = max(abs(la), abs(lc))
                entry.update(eager_token=a, compiled_token=c, gap=la - lc,
                             gap_rel=(la - lc) / scale if scale else 0.0, near_tie=la - lc <= rtol * scale)
                k += 1
            divergences.append(entry)
    max_dlogp = None
    if eager_logprobs is not None and compiled_logprobs is not None:
        T = min(eager_logprobs.shape[1], compiled_logprobs.shape[1])
        shared = torch.where(first >= 0, first, torch.minimum(eager_lengths, compiled_lengths))
        before = torch.arange(T, device=shared.device) < shared[:, None]
        d = (eager_logprobs[:, :T] - compiled_logprobs[:, :T]).abs()[before]
        max_dlogp = float(d.max()) if d.numel() else 0.0
    near = sum(e["near_tie"] for e in divergences)
    return {"rows": len(first), "identical": int((first < 0).sum()), "near_tie": near,
            "mismatch": len(divergences) - near, "tolerance_rel": rtol, "max_abs_logprob_diff": max_dlogp,
            "divergences": divergences}


def eager_logits_fn(model, prompts: list[list[int]], G: int, eager_ids: torch.Tensor, chunk: int = 16):
    """eager_logits_at for `compare_decodes`: the model's float32 logits [D, V] after prompt r // G
    and the eager tokens of row r before step t, one forward pass over each distinct sequence."""
    device = next(model.parameters()).device

    def logits_at(rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        seqs = [tuple(prompts[r // G] + eager_ids[r, :t].tolist()) for r, t in zip(rows.tolist(), steps.tolist())]
        distinct = list(dict.fromkeys(seqs))
        out = []
        with torch.inference_mode():
            for i in range(0, len(distinct), chunk):
                ids, mask = left_pad(distinct[i:i + chunk], 0, device=device)
                out.append(last_logits(model, input_ids=ids, attention_mask=mask,
                                       position_ids=positions_from_mask(mask)))
        if not out:
            return torch.zeros(0, model.config.vocab_size)
        logits = torch.cat(out)
        return logits[[distinct.index(s) for s in seqs]].cpu()

    return logits_at


def greedy_agreement(cfg: GPUCheckConfig, model, prompts: list[list[int]]) -> dict:
    """Greedy decode of the sampler's prompts (the same rows, so the same compiled bucket), eager
    and compiled, compared by `compare_decodes`."""
    kwargs = dict(group_size=cfg.group_size, max_new_tokens=cfg.new_tokens, greedy=True,
                  eos_token_ids=model.config.vocab_size, pad_token_id=0)
    eager = sample(model, prompts, **kwargs)
    compiled = sample(model, prompts, **kwargs, compile=True)
    return compare_decodes(eager.completion_ids.cpu(), compiled.completion_ids.cpu(), eager.lengths.cpu(),
                           compiled.lengths.cpu(), eager_logits_fn(model, prompts, cfg.group_size,
                                                                   eager.completion_ids.cpu()),
                           cfg.tie_rtol, eager.logprobs.cpu(), compiled.logprobs.cpu())


# ----------------------------------------------------------------------------- the sampler


class SamplerWorkspace:
    """The sampler model and prompts, built on first use and shared by the attention, sampler and
    generators parts; `release` frees them (and torch.compile's graphs) before the RL step."""

    def __init__(self, cfg: GPUCheckConfig):
        self.cfg = cfg
        self._model = None
        self._prompts = None
        self.compiled = False  # the sampler part compiled the decode step for these shapes

    @property
    def model(self):
        if self._model is None:
            cfg = self.cfg
            config = model_config("qwen2", vocab_size=128) if cfg.tiny else qwen25_05b_config()
            self._model = model_from_config(config, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
        return self._model

    @property
    def prompts(self) -> list[list[int]]:
        if self._prompts is None:
            g = torch.Generator().manual_seed(self.cfg.seed)
            vocab = self.model.config.vocab_size
            self._prompts = torch.randint(0, vocab, (self.cfg.prompts, self.cfg.prompt_len), generator=g).tolist()
        return self._prompts

    def release(self) -> None:
        if self._model is not None:
            release_static_cache(self._model)
        self._model = None
        self.compiled = False
        if self.cfg.device.startswith("cuda"):  # free the compiled graphs' memory before the RL step
            gc.collect()
            torch._dynamo.reset()
            torch.cuda.empty_cache()


def run_sampler(cfg: GPUCheckConfig, ws: SamplerWorkspace, peaks: dict) -> dict:
    """Tokens/s of sample (eager, compiled) and generate on the same prompts; ratios; bound shares;
    then greedy eager against compiled tokens."""
    torch.manual_seed(cfg.seed)
    model, prompts = ws.model, ws.prompts
    never_id = model.config.vocab_size  # outside the vocabulary: no row ends early
    args = argparse.Namespace(device=cfg.device, group=cfg.group_size, new_tokens=cfg.new_tokens, prompt_batch=None,
                              seed=cfg.seed, compile=False)
    compiled_args = argparse.Namespace(**{**vars(args), "compile": True})
    warm = argparse.Namespace(**{**vars(args), "new_tokens": 4})
    methods = {
        "sample": lambda: bench_sampling.run_ours(model, prompts, args, never_id),
        "sample_compiled": lambda: bench_sampling.run_ours(model, prompts, compiled_args, never_id),
        "generate": lambda: bench_sampling.run_generate(model, prompts, args, never_id),
    }
    # Warm-up: kernels and allocator for the eager methods; for the compiled one a full run on the
    # timed shapes, which compiles the step (timed here) and captures its CUDA graph.
    bench_sampling.run_ours(model, prompts[:1], warm, never_id)
    bench_sampling.run_generate(model, prompts[:1], warm, never_id)
    compile_s, _, _ = bench_sampling.timed(methods["sample_compiled"], cfg.device)
    ws.compiled = True
    best = {}
    for _ in range(cfg.repeats):
        for name, fn in methods.items():
            seconds, tokens, peak = bench_sampling.timed(fn, cfg.device)
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                              "peak_allocated_gib": None if math.isnan(peak) else peak}
    n_params = sum(p.numel() for p in model.parameters())
    bytes_per_elem = torch.empty((), dtype=resolve_dtype(cfg.dtype)).element_size()
    shapes = dict(prompts=cfg.prompts, group_size=cfg.group_size, prompt_len=cfg.prompt_len,
                  new_tokens=cfg.new_tokens, bandwidth_gbs=peaks["bandwidth_gbs"], tflops=peaks["tflops"])
    bound = decode_bound(model.config, n_params, bytes_per_elem, **shapes)
    n_rep = model.config.num_attention_heads // model.config.num_key_value_heads
    bound_repeated = decode_bound(model.config, n_params, bytes_per_elem, **shapes, kv_factor=n_rep)
    for row in best.values():
        row["vs_generate"] = row["tokens_per_s"] / best["generate"]["tokens_per_s"]
        row["share_of_bound"] = row["tokens_per_s"] / bound["tokens_per_s"] if bound["tokens_per_s"] else None
    # the compile counter of one more call: 0 means the timed runs replayed the warm-up's graph
    stats = sample(model, prompts, group_size=cfg.group_size, max_new_tokens=cfg.new_tokens, eos_token_ids=never_id,
                   pad_token_id=0, compile=True, generator=torch.Generator(cfg.device).manual_seed(0)).decode_stats
    try:  # the figures above are kept whatever happens here
        agreement = greedy_agreement(cfg, model, prompts)
        why = (f"{agreement['mismatch']} greedy rows differ between eager and compiled beyond the near-tie "
               f"tolerance {cfg.tie_rtol:g}") if agreement["mismatch"] else ""
    except Exception as e:  # noqa: BLE001
        agreement, why = {"error": f"{type(e).__name__}: {e}"}, f"greedy comparison: {type(e).__name__}: {e}"
    ok = not why
    return {"status": "passed" if ok else "failed", "n_params": n_params, "dtype": cfg.dtype,
            "rows": cfg.prompts * cfg.group_size, "prompts": cfg.prompts, "group_size": cfg.group_size,
            "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens, "methods": best,
            "compiled_vs_eager": best["sample_compiled"]["tokens_per_s"] / best["sample"]["tokens_per_s"],
            "first_compiled_call_s": compile_s, "compiled_decode_stats": stats, "bound": bound,
            "bound_kv_repeated": bound_repeated, "greedy_eager_vs_compiled": agreement,
            **({} if ok else {"reason": why})}


def run_generators(cfg: GPUCheckConfig, ws: SamplerWorkspace) -> dict:
    """Seconds of the sampler run with per-prompt keys (`PromptKeys`, as the trainer samples)
    against one shared torch.Generator, on the same model and prompts: eager, and compiled when
    the sampler part compiled these shapes (otherwise a compile would be timed). The two run in
    interleaved pairs (the order alternating); per_prompt_over_shared is the median over the
    pairs of the ratio of their seconds, runs the fastest run of each."""
    model, prompts = ws.model, ws.prompts
    never_id = model.config.vocab_size

    def run(per_prompt: bool, compile: bool, batch=prompts, new_tokens=cfg.new_tokens):
        generator = (prompt_keys(cfg.seed, 0, range(len(batch)), cfg.device) if per_prompt
                     else torch.Generator(cfg.device).manual_seed(cfg.seed))
        r = sample(model, batch, group_size=cfg.group_size, max_new_tokens=new_tokens, eos_token_ids=never_id,
                   pad_token_id=0, generator=generator, compile=compile)
        return int(r.lengths.sum())

    modes = ("eager", "compiled") if ws.compiled else ("eager",)
    for per_prompt in (False, True):  # warm-up of both draws, eager
        run(per_prompt, False, prompts[:1], 4)
    best, pair_ratios = {}, {mode: [] for mode in modes}
    for i in range(cfg.generator_repeats):
        for mode in modes:
            variants = (("shared", False), ("per_prompt", True))
            pair = {}
            for name, per_prompt in variants[::-1] if i % 2 else variants:  # neither always runs first
                seconds, tokens, _ = bench_sampling.timed(lambda: run(per_prompt, mode == "compiled"), cfg.device)
                pair[name] = seconds
                key = f"{mode}_{name}"
                if key not in best or seconds < best[key]["seconds"]:
                    best[key] = {"seconds": seconds, "tokens": tokens}
            pair_ratios[mode].append(pair["per_prompt"] / pair["shared"])
    ratios = {mode: statistics.median(r) for mode, r in pair_ratios.items()}
    extra_ms = {mode: 1e3 * (best[f"{mode}_per_prompt"]["seconds"] - best[f"{mode}_shared"]["seconds"])
                / cfg.new_tokens for mode in modes}
    return {"status": "passed", "prompts": len(prompts), "group_size": cfg.group_size,
            "new_tokens": cfg.new_tokens, "pairs": cfg.generator_repeats, "runs": best,
            "per_prompt_over_shared": ratios, "pair_ratios": pair_ratios, "extra_ms_per_decode_step": extra_ms,
            **({} if ws.compiled else {"note": "compiled not timed: the sampler part did not compile these shapes"})}


# ----------------------------------------------------------------------------- RL step, torchrun


def run_rl_step(cfg: GPUCheckConfig, out: Path) -> dict:
    """bench_gpu_step.py's Rank-GRPO step (its own figures, in its own JSON), the main ones kept here."""
    path = out / "rl_step.json"
    if cfg.tiny:
        argv = ["--tiny", "--device", cfg.device, "--steps", "1", "--warmup-steps", "0"]
    else:
        argv = ["--device", cfg.device, "--prompts", str(cfg.rl_prompts), "--steps", str(cfg.rl_steps),
                "--warmup-steps", "1"]
    if cfg.rl_compile:
        argv.append("--compile")
    r = bench_gpu_step.main([*argv, "--seed", str(cfg.seed), "--json", str(path)])
    mem = r["memory_gib"]
    return {"status": "passed", "argv": argv, "completions": r["completions_per_step"],
            "completion_tokens": r["completion_tokens_per_step"], "samples_per_s": r["samples_per_s"],
            "completion_tokens_per_s": r["completion_tokens_per_s"], "stage_seconds": r["seconds"],
            "peak_allocated_gib": _nan_none(mem["peak_allocated"]), "peak_reserved_gib": _nan_none(mem["peak_reserved"]),
            "peak_allocated_by_stage_gib": {k: _nan_none(v) for k, v in mem["peak_allocated_by_stage"].items()},
            "held_between_steps_gib": _nan_none(mem["held_between_steps"]),
            "analytic_static_gib": mem["analytic_static"]["total"], "full_json": str(path)}


def trainers_support_distributed() -> tuple[bool, str]:
    """(True, "") when train_rankgrpo.py (or the package) sets up torch.distributed, else (False, why)."""
    sources = [ROOT / "train_rankgrpo.py", *sorted((ROOT / "rankgrpo").rglob("*.py"))]
    if any("init_process_group" in p.read_text() for p in sources):
        return True, ""
    return False, "train_rankgrpo.py does not set up torch.distributed (no init_process_group call), so " \
                  "torchrun would only run independent copies"


def trainer_has_flag(name: str) -> bool:
    """Whether train_rankgrpo.py's config has a field `name` (e.g. "fsdp")."""
    import dataclasses

    import train_rankgrpo

    return name in {f.name for f in dataclasses.fields(train_rankgrpo.TrainRankGRPOConfig)}


def torchrun_runs(world: Path) -> dict[str, tuple[list[str], float | None]]:
    """name -> (command, tolerance against the one-process run) of the torchrun part: two Rank-GRPO
    steps on the sandbox world `world`, in float32, in one process and under torchrun on two GPUs
    (DDP, and FSDP2 when the trainer has --fsdp). Each process maps `--device cuda` to its own GPU,
    cuda:LOCAL_RANK; every prompt draws with a key of (seed, step, prompt), so all runs draw
    the same rollouts and differ only by the order of float reductions."""
    common = ["train_rankgrpo.py", "--model", str(world / "base_model"), "--data", str(world / "train.jsonl"),
              "--val-data", str(world / "validation.jsonl"), "--catalog", str(world / "catalog.jsonl"),
              "--steps", "2", "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "32",
              "--eval-every", "0", "--device", "cuda"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    runs = {"one_process": ([sys.executable, *common], None),
            "torchrun_2_ddp": ([*torchrun, *common], 1e-4)}
    if trainer_has_flag("fsdp"):
        runs["torchrun_2_fsdp"] = ([*torchrun, *common, "--fsdp"], 1e-4)  # float32: no mixed precision
    return runs


def run_torchrun(cfg: GPUCheckConfig, out: Path, timeout_s: float) -> dict:
    """Two Rank-GRPO steps on a tiny sandbox world: one process, then torchrun on two GPUs (DDP, and
    FSDP2 when the trainer has --fsdp); the largest absolute difference of each result's final weights
    from the one-process run."""
    n_gpus = torch.cuda.device_count() if cfg.device.startswith("cuda") else 0
    if n_gpus < 2:
        return {"status": "skipped", "reason": f"{n_gpus} GPU(s) visible; the data-parallel check needs 2"}
    supported, why = trainers_support_distributed()
    if not supported:
        return {"status": "skipped", "reason": why}
    from transformers import AutoModelForCausalLM

    from rankgrpo.sandbox import SandboxConfig, build_world

    world = out / "world"
    build_world(SandboxConfig(n_films=200, n_train=32, n_validation=4, n_test=4, hidden_size=64, num_layers=2,
                              num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=1024), world)
    runs = torchrun_runs(world)
    report = {}
    for name, (cmd, tol) in runs.items():
        cmd = [*cmd, "--out", str(out / name)]
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"{name} timed out", "command": " ".join(cmd), "runs": report}
        if res.returncode != 0:
            return {"status": "failed", "reason": f"{name} exited {res.returncode}", "command": " ".join(cmd),
                    "stderr_tail": res.stderr[-3000:], "runs": report}
        weights = AutoModelForCausalLM.from_pretrained(out / name / "final").state_dict()
        if tol is None:
            reference = weights
            continue
        diff = max(float((weights[k].float() - reference[k].float()).abs().max()) for k in reference)
        report[name] = {"max_abs_weight_diff": diff, "tolerance": tol, "command": " ".join(cmd)}
    ok = all(r["max_abs_weight_diff"] <= r["tolerance"] for r in report.values())
    return {"status": "passed" if ok else "failed", "runs": report}




# ----------------------------------------------------------------------------- the tests part


def files_with_cuda_tests() -> list[str]:
    """Test files that use the `cuda` marker (collecting only those keeps the part quick)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.cuda" in p.read_text())


PYTEST_OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")
PYTEST_EXIT = {0: "all selected tests passed", 1: "some tests failed", 2: "interrupted", 3: "internal error",
               4: "usage error", 5: "no tests collected"}


def parse_pytest_summary(text: str) -> dict | None:
    """Counts from pytest's last summary line ("== 3 passed, 2 skipped in 1.20s ==", or with -q
    "3 passed, 2 skipped in 1.20s"; "no tests ran in 0.01s" gives zeros); None if there is none.

    >>> parse_pytest_summary("...\\n=== 1 failed, 3 passed, 2 skipped, 1 error in 4.10s ===\\n")["errors"]
    1
    """
    for line in reversed(text.strip().splitlines()):
        if not re.search(r"\bin [\d.]+s\b", line):
            continue
        found = dict((word, int(n)) for n, word in re.findall(r"(\d+) ([a-z]+)", line))
        if "error" in found:
            found["errors"] = found.pop("error")
        if found or "no tests ran" in line:
            return {k: found.get(k, 0) for k in PYTEST_OUTCOMES}
    return None


def parse_pytest_verbose(text: str) -> dict[str, list[str]]:
    """Test ids by outcome from `pytest -v` progress lines ("tests/x.py::test_y PASSED [ 50%]"),
    for a run that was killed before its summary."""
    found = {k: [] for k in PYTEST_OUTCOMES}
    names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "xfailed",
             "XPASS": "xpassed"}
    for test_id, word in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", text, re.M):
        found[names[word]].append(test_id)
    return found


def pytest_status(returncode: int | None, counts: dict, timed_out: bool = False) -> tuple[str, str]:
    """(status, reason) of a pytest run from its exit code and outcome counts. A run in which no
    test ran (exit code 5: none collected or all deselected; or every test skipped) is "not run",
    never "passed"; a run cut off by the time limit is "timed out".

    >>> pytest_status(0, {"passed": 0, "skipped": 10})
    ('not run', '0 tests ran: 10 skipped')
    >>> pytest_status(0, {"passed": 10})[0]
    'passed'
    """
    c = {k: counts.get(k, 0) for k in PYTEST_OUTCOMES}
    tally = ", ".join(f"{c[k]} {k}" for k in PYTEST_OUTCOMES if c[k])
    if timed_out:
        return "timed out", f"cut off by the time limit; before it: {tally or 'nothing finished'}"
    if returncode not in (0, 5) or c["failed"] or c["errors"]:
        return "failed", f"pytest exited {returncode} ({PYTEST_EXIT.get(returncode, 'unknown')}): {tally}"
    if returncode == 5 or c["passed"] + c["xfailed"] + c["xpassed"] == 0:
        return "not run", f"0 tests ran: {tally or PYTEST_EXIT[5]}"
    return "passed", ""


def junit_results(xml: Path) -> tuple[dict, list[str], list[str]]:
    """(counts, failed test ids, skip reasons) from pytest's JUnit XML."""
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = list(suite.iter("testcase"))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in cases
              if case.find("failure") is not None or case.find("error") is not None]
    skipped = [case for case in cases if case.find("skipped") is not None]
    counts = {"failed": sum(case.find("failure") is not None for case in cases),
              "errors": sum(case.find("error") is not None for case in cases), "skipped": len(skipped)}
    counts["passed"] = len(cases) - len(failed) - len(skipped)
    reasons = sorted({case.find("skipped").get("message") or "" for case in skipped})
    return {k: counts.get(k, 0) for k in PYTEST_OUTCOMES}, failed, reasons


def run_tests(cfg: GPUCheckConfig, out: Path, timeout_s: float) -> dict:
    """pytest -m cuda in a subprocess with a time limit; counts from its JUnit XML, or, when it was
    killed at the limit, from its -v progress lines."""
    files = files_with_cuda_tests()
    if not files:
        return {"status": "not run", "reason": "no test file uses the cuda marker"}
    xml, log = out / "cuda_tests.xml", out / "cuda_tests.log"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cfg.tiny:  # the CPU smoke test: the tests see no GPU either (they are collected, then skipped)
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:  # the whole session: pytest and the trainers it started
            os.killpg(proc.pid, signal.SIGKILL)
            returncode, timed_out = proc.wait(), True
    text = log.read_text(errors="replace")
    failed, skip_reasons = [], []
    if xml.exists() and not timed_out:
        counts, failed, skip_reasons = junit_results(xml)
    elif timed_out:
        by_outcome = parse_pytest_verbose(text)
        counts = {k: len(v) for k, v in by_outcome.items()}
        failed = by_outcome["failed"] + by_outcome["errors"]
    else:
        counts = parse_pytest_summary(text) or {}
    status, reason = pytest_status(returncode, counts, timed_out)
    return {"status": status, **({"reason": reason} if reason else {}), "files": files, "returncode": returncode,
            "time_limit_s": timeout_s, **{k: counts.get(k, 0) for k in PYTEST_OUTCOMES}, "failed_tests": failed,
            "skip_reasons": skip_reasons, "command": " ".join(cmd), "output_tail": text[-1500:]}


# ----------------------------------------------------------------------------- report


def _nan_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def _fmt(x, spec=",.0f", unit=""):
    return "n/a" if x is None else format(x, spec) + unit


GQA_WORDS = {"enable_gqa": "enable_gqa=True (no copy)", "pack_gqa": "query regrouped, pack_gqa (no copy)",
             "repeat_kv": "K/V copied per query head, repeat_kv", "mha": "one K/V head per query head",
             "unknown": "unknown"}


def _part_detail(part: str, p: dict) -> str:
    if part == "tests" and "passed" in p:
        detail = f"{p['passed']} passed, {p['failed'] + p['errors']} failed, {p['skipped']} skipped"
        if p["failed_tests"]:
            detail += f": {', '.join(p['failed_tests'])}"
        if p["skipped"] and p["skip_reasons"]:
            detail += f" ({'; '.join(p['skip_reasons'])})"
        return detail + (f"; {p['reason']}" if p.get("reason") and p["status"] != "not run" else "")
    return p.get("reason", "")


def _attention_lines(a: dict) -> list[str]:
    backends = a["sdpa_backends_enabled"]
    enabled = (", ".join(k for k, on in backends.items() if on) or "none") if backends is not None else "n/a (CPU)"
    n_rep = a["num_heads"] // a["num_kv_heads"]
    lines = ["", f"### Attention: `_attn_implementation` = {a['attn_implementation']} (transformers "
                 f"{a['transformers']}), {a['num_heads']} query heads, {a['num_kv_heads']} K/V heads; "
                 f"CUDA SDPA kernels enabled: {enabled}", "",
             "| call | prompts | grouped-query heads | K/V heads SDPA reads | mask | kernel torch picks |",
             "|---|---|---|---:|---|---|"]
    for prompts, calls in a["paths"].items():
        for call, c in calls.items():
            if c:
                mask = "none" if c["mask"] is None else "x".join(map(str, c["mask"]))
                lines.append(f"| {call.replace('_', ' ')} | {prompts.replace('_', ' ')} | {GQA_WORDS[c['gqa_path']]} "
                             f"| {c['k'][1]} | {mask} | {c['kernel']} |")
    b = a["bytes_per_decoded_token"]
    mb = 1e6
    lines += ["", f"Bytes read per decoded token (analytic from the config and dtype, not measured), at the sampler's "
                  f"{b['rows']} rows and mean context {b['context']:.0f}: weights {b['weights'] / mb:.2f} MB + "
                  f"KV cache {b['kv'] / mb:.2f} MB ({b['kv_per_position']:,} B per cached position) = {b['total'] / mb:.2f} MB. "
                  f"Where K/V are copied for every query head, attention reads {n_rep}x the KV bytes: "
                  f"{b['kv_repeated'] / mb:.2f} MB, {b['total_repeated'] / mb:.2f} MB per token in all (making the "
                  f"copy also reads the cache once and writes that much).",
              "", "With a padding mask, transformers' SDPA path repeats K/V for every query head of a grouped-query "
                  f"model (repeat_kv, about {n_rep}x the KV bytes) unless it can pass enable_gqa=True (only without "
                  "a mask) or regroup a one-token query (pack_gqa, not under torch.compile); the table shows which "
                  "path each call of this run took."]
    return lines


def _sampler_lines(r: dict, s: dict) -> list[str]:
    peaks, bound = r["peaks"], s["bound"]
    lines = ["", f"### Sampler: {s['prompts']} prompts x G = {s['group_size']} = {s['rows']} rows, "
                 f"{s['prompt_len']}-token prompts, {s['new_tokens']} new tokens, {s['dtype']}, "
                 f"{s['n_params'] / 1e6:.3g}M weights", "",
             "| method | tokens/s | vs generate | share of the decode bound | peak memory |",
             "|---|---:|---:|---:|---:|"]
    for name, m in s["methods"].items():
        lines.append(f"| {name} | {m['tokens_per_s']:,.0f} | {m['vs_generate']:.2f}x | "
                     f"{_fmt(m['share_of_bound'], '.1%')} | {_fmt(m['peak_allocated_gib'], '.2f', ' GiB')} |")
    st, g = s["compiled_decode_stats"], s["greedy_eager_vs_compiled"]
    rep = s["bound_kv_repeated"]
    lines += ["", f"compiled / eager: {s['compiled_vs_eager']:.2f}x; first compiled call (compiles) "
                  f"{s['first_compiled_call_s']:.1f} s; later call: graphs compiled {st['graphs_compiled']}, "
                  f"bucket {st['buckets'][0]}, idle row share {st['idle_row_frac']:.1%}.",
              f"Decode bound {_fmt(bound['tokens_per_s'])} tokens/s ({_fmt(bound['seconds'], '.3f', ' s')}; "
              f"memory-bound part {_fmt(bound['memory_s'], '.3f', ' s')}, compute-bound part "
              f"{_fmt(bound['compute_s'], '.3f', ' s')}); {_fmt(rep['tokens_per_s'])} tokens/s where attention reads "
              f"K/V copied for every query head (repeat_kv); at {_fmt(peaks['bandwidth_gbs'])} GB/s and {_fmt(peaks['tflops'], 'g')} TFLOP/s "
              f"({peaks['source']}); measured copy bandwidth {r['copy_bandwidth_gbs']:,.0f} GB/s. "
              "Formula: benchmarks/gpu_check.py.",
              "", f"Greedy tokens, eager against compiled: {g['error']}." if "error" in g else
              f"Greedy tokens, eager against compiled, {g['rows']} rows: {g['identical']} identical, "
                  f"{g['near_tie']} first differ at a near tie (eager logits of the two tokens within "
                  f"{g['tolerance_rel']:g} of the larger, relative), {g['mismatch']} beyond that tolerance; largest "
                  f"|log-prob difference| before the first difference {_fmt(g['max_abs_logprob_diff'], '.2g')}."]
    return lines


def _generator_lines(q: dict) -> list[str]:
    lines = ["", f"### Per-prompt keys against one shared generator: {q['prompts']} prompts x "
                 f"G = {q['group_size']}, {q['new_tokens']} new tokens, {q.get('pairs', 1)} interleaved pairs", "",
             "| decode | shared (fastest) | per-prompt keys (fastest) | keys / shared (median of pairs) "
             "| extra per decode step (fastest) |",
             "|---|---:|---:|---:|---:|"]
    for mode, ratio in q["per_prompt_over_shared"].items():
        lines.append(f"| {mode} | {q['runs'][f'{mode}_shared']['seconds']:.3f} s | "
                     f"{q['runs'][f'{mode}_per_prompt']['seconds']:.3f} s | {ratio:.3f}x | "
                     f"{q['extra_ms_per_decode_step'][mode]:.2f} ms |")
    return lines + ([f"\n{q['note']}."] if "note" in q else [])


def _rl_lines(q: dict) -> list[str]:
    lines = ["", f"### One Rank-GRPO step: {q['completions']} completions "
                 f"({q['completion_tokens']:.0f} completion tokens), bench_gpu_step.py {' '.join(q['argv'])}", "",
             "| stage | seconds | peak allocated |", "|---|---:|---:|"]
    for stage in bench_gpu_step.STAGES:
        lines.append(f"| {stage} | {q['stage_seconds'][stage]:.2f} | "
                     f"{_fmt(q['peak_allocated_by_stage_gib'][stage], '.2f', ' GiB')} |")
    return lines + [f"| step | {q['stage_seconds']['step']:.2f} | {_fmt(q['peak_allocated_gib'], '.2f', ' GiB')} |",
                    "", f"{q['samples_per_s']:.2f} samples/s, {q['completion_tokens_per_s']:,.0f} completion tokens/s; "
                    f"peak reserved {_fmt(q['peak_reserved_gib'], '.2f', ' GiB')}; weights, gradients, AdamW states "
                    f"and reference {q['analytic_static_gib']:.2f} GiB (analytic)."]


def markdown(r: dict) -> str:
    env = r["environment"]
    state = "" if r["finished"] else "; UNFINISHED: the parts below without a status had not run when this was written"
    lines = [f"## GPU check: {env['device_name']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}, "
             f"{env['gpus']} GPU(s) visible; {r['seconds']:.0f} s of the {r['budget_s']:.0f} s budget"
             + (" (--tiny, CPU)" if r["config"]["tiny"] else "") + state,
             "", "| part | status | time | budget | detail |", "|---|---|---:|---:|---|"]
    for part in PARTS:
        p = r["parts"].get(part, {})
        wall = f"{p['wall_s']:.0f} s" if "wall_s" in p else ""
        lines.append(f"| {part} | {p.get('status', '')} | {wall} | {r['part_budgets_s'][part]:.0f} s | "
                     f"{_part_detail(part, p)} |")
    lines += ["", "A part starts only if the time spent so far plus its budget fits in the total budget "
                  "(otherwise: skipped: budget); the tests part may use all the time left."]
    parts = r["parts"]
    if "paths" in parts.get("attention", {}):
        lines += _attention_lines(parts["attention"])
    if "methods" in parts.get("sampler", {}):
        lines += _sampler_lines(r, parts["sampler"])
    if "runs" in parts.get("generators", {}):
        lines += _generator_lines(parts["generators"])
    if parts.get("rl_step", {}).get("status") == "passed":
        lines += _rl_lines(parts["rl_step"])
    for name, run in parts.get("torchrun", {}).get("runs", {}).items():
        lines += ["", f"{name} against one process, 2 Rank-GRPO steps: largest weight difference "
                      f"{run['max_abs_weight_diff']:.2e} (tolerance {run['tolerance']:g})."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def environment(device: torch.device) -> dict:
    import transformers

    cuda = device.type == "cuda"
    return {"device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None}


def write_results(out: Path, result: dict) -> None:
    """gpu_check.json and gpu_check.md, each written to a temporary file and renamed over the old one."""
    atomic_write_json(out / "gpu_check.json", result)
    atomic_write_text(out / "gpu_check.md", markdown(result))


def not_applicable(part: str, cfg: GPUCheckConfig) -> str | None:
    """Why a part cannot run on this machine at all (checked before its budget), or None."""
    if part == "torchrun":
        n_gpus = torch.cuda.device_count() if cfg.device.startswith("cuda") else 0
        if n_gpus < 2:
            return f"{n_gpus} GPU(s) visible; the data-parallel check needs 2"
    return None


def run_part(part: str, cfg: GPUCheckConfig, ws: SamplerWorkspace, out: Path, peaks: dict, time_left: float) -> dict:
    if part == "attention":
        return run_attention(cfg, ws.model, ws.prompts)
    if part == "sampler":
        return run_sampler(cfg, ws, peaks)
    if part == "generators":
        return run_generators(cfg, ws)
    if part == "rl_step":
        return run_rl_step(cfg, out)
    if part == "tests":
        return run_tests(cfg, out, time_left)
    return run_torchrun(cfg, out, time_left)


def run(cfg: GPUCheckConfig, start: float | None = None) -> dict:
    start = time.perf_counter() if start is None else start
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (use --tiny)")
    out = Path(cfg.out).resolve()  # the test and torchrun parts run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    peaks = device_peaks(env["device_name"], cfg.peak_bandwidth_gbs, cfg.peak_tflops)
    budgets = part_budgets(cfg)
    result = {"config": asdict(cfg), "environment": env, "peaks": peaks, "budget_s": cfg.budget_s,
              "part_budgets_s": budgets, "copy_bandwidth_gbs": copy_bandwidth_gbs(device, 1024 if device.type == "cuda"
                                                                                  else 64),
              "parts": {}, "finished": False, "seconds": time.perf_counter() - start}
    print(f"{env['device_name']}: torch {env['torch']}, peaks {peaks}")
    print(f"budget {cfg.budget_s:.0f} s: " + ", ".join(f"{p} {budgets[p]:.0f} s" for p in PARTS))
    write_results(out, result)
    ws = SamplerWorkspace(cfg)
    for part in PARTS:
        if part == "rl_step":
            ws.release()
        elapsed = time.perf_counter() - start
        if part in cfg.skip:
            res = {"status": "skipped", "reason": "--skip"}
        elif (why := not_applicable(part, cfg)) is not None:
            res = {"status": "skipped", "reason": why}
        elif elapsed + budgets[part] > cfg.budget_s:
            res = {"status": "skipped: budget", "reason": f"{elapsed:.0f} s spent + its {budgets[part]:.0f} s > "
                                                          f"{cfg.budget_s:.0f} s"}
        else:
            print(f"\n== {part}: budget {budgets[part]:.0f} s ({elapsed:.0f} s of {cfg.budget_s:.0f} s spent)",
                  flush=True)
            t0 = time.perf_counter()
            try:
                res = run_part(part, cfg, ws, out, peaks, cfg.budget_s - elapsed)
            except Exception as e:  # noqa: BLE001 - one part's failure must not hide the others' figures
                res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
            res["wall_s"] = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["parts"][part] = res
        result["seconds"] = time.perf_counter() - start
        wall = f" in {res['wall_s']:.0f} s (budget {budgets[part]:.0f} s)" if "wall_s" in res else ""
        print(f"{part}: {res['status']}{wall}{' - ' + res['reason'] if 'reason' in res else ''}", flush=True)
        write_results(out, result)
        if os.environ.get(KILL_AFTER_ENV) == part:  # tests only: a run killed here keeps what it wrote
            os.kill(os.getpid(), signal.SIGKILL)
    ws.release()
    result["finished"] = True
    result["seconds"] = time.perf_counter() - start
    write_results(out, result)
    print("\n" + markdown(result))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return result


def main(argv=None, start: float | None = None) -> dict:
    return run(parse_config(GPUCheckConfig, argv), start)


if __name__ == "__main__":
    main(start=STARTED)
