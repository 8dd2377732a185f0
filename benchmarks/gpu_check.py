"""One command that shows whether this project runs, and how fast, on a GPU. Offline; about
8 minutes on one H100/H200-class GPU.

    python benchmarks/gpu_check.py                      # a CUDA machine: every part below
    python benchmarks/gpu_check.py --tiny               # the same code path on the CPU, tiny shapes
    python benchmarks/gpu_check.py --peak-bandwidth-gbs 3350 --peak-tflops 989   # a GPU not in the table

Parts (each runs even if an earlier one failed; a failure is recorded with its error):

1. sampler   completion tokens/s of `sample` eager, `sample(compile=True)` and `model.generate`,
             G = 8 completions of 48 random prompts of 512 tokens, 256 new tokens each (the
             end-of-sequence id never occurs, so every row decodes all of them), random weights
             with the published Qwen2.5-0.5B shapes in bfloat16. Ratios within this one run, and
             each figure as a share of the decode bound below.
2. rl_step   one Rank-GRPO step at the paper's shapes (`bench_gpu_step.py`: 48 prompts x G = 8,
             N = 20, 512-token prompts, up to 256-token completions, reference model, float32
             weights with bf16 autocast as `train_rankgrpo.py --bf16`): peak memory, samples/s and
             the time of each stage.
3. tests     the test subset marked `cuda` (pytest -m cuda): the sampler eager and compiled
             (CUDA graphs), the losses, one step of each trainer, bf16 autocast, gradient
             checkpointing. Without CUDA they are all skipped.
4. torchrun  with two or more GPUs (the trainers set up torch.distributed themselves): the same
             two Rank-GRPO steps in one process and under `torchrun --nproc-per-node 2`, with DDP
             and with --fsdp (FSDP2), and the largest weight difference from the one-process result.

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
device-to-device copy is reported next to them.

The sampler and the Rank-GRPO step use random prompt token ids, so they need no tokenizer (the
trainers in the tests use the sandbox world's own).

Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (the tables). `--tiny` runs
every part on the CPU with tiny shapes (2-layer model, 1 prompt x G = 8, 24 new tokens) in
about a minute; tests/test_gpu_check.py runs it.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import bench_gpu_step  # noqa: E402
import bench_sampling  # noqa: E402
from rankgrpo.compiled_decode import release_static_cache  # noqa: E402
from rankgrpo.config import arg, parse_config  # noqa: E402
from rankgrpo.io import atomic_write_json, atomic_write_text  # noqa: E402
from rankgrpo.models import model_config, model_from_config, qwen25_05b_config, resolve_dtype  # noqa: E402
from rankgrpo.sampling import sample  # noqa: E402

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
PARTS = ("sampler", "rl_step", "tests", "torchrun")  # the figures first; the tests get the time left
TINY_SAMPLER = dict(prompts=1, prompt_len=32, new_tokens=24)
FULL_SAMPLER = dict(prompts=48, prompt_len=512, new_tokens=256)


@dataclass
class GPUCheckConfig:
    """Tests, sampler throughput against its decode bound, and one Rank-GRPO step, on a GPU."""

    tiny: bool = arg(False, "Every part on the CPU with tiny shapes, in about a minute (a smoke test).")
    device: str = arg("", "Device (default: cuda if available, else cpu; --tiny: cpu).")
    out: str = arg("runs/gpu_check", "Directory for gpu_check.json and gpu_check.md.")
    skip: list[str] = arg([], f"Parts to leave out, of {', '.join(PARTS)}.")
    budget_s: float = arg(480.0, "A part that would start after this many seconds is skipped (and says so).")
    tests_timeout_s: float = arg(300.0, "Time limit of the test part (at most the budget left, at least 60 s).")
    group_size: int = arg(8, "G, completions per prompt.")
    prompts: int = arg(0, "Sampler prompts (0: 48, or 1 with --tiny).")
    prompt_len: int = arg(0, "Sampler prompt tokens (0: 512, or 32 with --tiny).")
    new_tokens: int = arg(0, "Sampler new tokens per completion (0: 256, or 24 with --tiny).")
    dtype: str = arg("", "Sampler model dtype (default: bfloat16 on CUDA, float32 on the CPU).")
    repeats: int = arg(2, "Timed runs of each sampler method, interleaved; the fastest counts.")
    rl_prompts: int = arg(48, "Prompts of the Rank-GRPO step (x G completions; --tiny: bench_gpu_step's tiny preset).")
    rl_steps: int = arg(1, "Timed Rank-GRPO steps (after one untimed warm-up step).")
    rl_compile: bool = arg(False, "Sample the Rank-GRPO step with the compiled decode too (one more compile, "
                                  "float32 weights: about a minute or two more).")
    peak_bandwidth_gbs: float = arg(0.0, "Memory bandwidth of the device in GB/s (0: look the device name up).")
    peak_tflops: float = arg(0.0, "Dense bf16 peak of the device in TFLOP/s (0: look the device name up).")
    seed: int = arg(0, "Seed of the weights, prompts and sampling.")

    def validate(self) -> None:
        self.device = self.device or ("cuda" if torch.cuda.is_available() and not self.tiny else "cpu")
        self.dtype = self.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        preset = TINY_SAMPLER if self.tiny else FULL_SAMPLER
        for name, value in preset.items():
            if not getattr(self, name):
                setattr(self, name, value)
        unknown = set(self.skip) - set(PARTS)
        if unknown:
            raise SystemExit(f"error: --skip {sorted(unknown)}: parts are {', '.join(PARTS)}")


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


def decode_bound(config, n_params: int, bytes_per_elem: int, *, prompts: int, group_size: int, prompt_len: int,
                 new_tokens: int, bandwidth_gbs: float | None, tflops: float | None) -> dict:
    """The best possible sampler time for this work on a device (the formula of the module
    docstring). Returns seconds, tokens/s and the memory- and compute-bound parts; None without peaks.

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
    d = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    bw, flops_rate = bandwidth_gbs * GB, tflops * 1e12
    prefill_s = 2 * n_params * prompts * prompt_len / flops_rate
    memory_s = compute_s = total = 0.0
    for t in range(new_tokens):
        c = prompt_len + t
        mem = (n_params * bytes_per_elem + R * layers * 2 * n_kv * d * bytes_per_elem * c) / bw
        comp = (2 * n_params * R + 4 * R * layers * n_heads * d * c) / flops_rate
        memory_s += mem
        compute_s += comp
        total += max(mem, comp)
    seconds = prefill_s + total
    return {"seconds": seconds, "tokens_per_s": R * new_tokens / seconds, "memory_s": memory_s,
            "compute_s": compute_s, "prefill_s": prefill_s}


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


# ----------------------------------------------------------------------------- the parts


def files_with_cuda_tests() -> list[str]:
    """Test files that use the `cuda` marker (collecting only those keeps the part quick)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text())


def run_tests(cfg: GPUCheckConfig, out: Path, timeout_s: float) -> dict:
    """pytest -m cuda in a subprocess; counts from its JUnit XML, and the failing tests' names."""
    files = files_with_cuda_tests()
    if not files:
        return {"status": "skipped", "reason": "no test file uses the cuda marker"}
    xml = out / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cfg.tiny:  # the CPU smoke test: the tests see no GPU either (they are collected, then skipped)
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout_s:.0f} s", "command": " ".join(cmd)}
    if not xml.exists():
        return {"status": "failed", "reason": f"pytest exited {res.returncode}: {res.stdout[-2000:]}{res.stderr[-2000:]}"}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    skip_reasons = sorted({(case.find("skipped").get("message") or "") for case in suite.iter("testcase")
                           if case.find("skipped") is not None})
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = res.returncode in (0, 5) and not failed  # 5: nothing selected
    return {"status": "passed" if ok else "failed", "files": files, "passed": passed, **counts,
            "failed_tests": failed, "skip_reasons": skip_reasons, "output_tail": res.stdout[-1500:]}


def sampler_model(cfg: GPUCheckConfig):
    config = model_config("qwen2", vocab_size=128) if cfg.tiny else qwen25_05b_config()
    return model_from_config(config, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)


def run_sampler(cfg: GPUCheckConfig, peaks: dict) -> dict:
    """Tokens/s of sample (eager, compiled) and generate on the same prompts; ratios; bound shares."""
    torch.manual_seed(cfg.seed)
    model = sampler_model(cfg)
    vocab = model.config.vocab_size
    never_id = vocab  # outside the vocabulary: no row ends early
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, vocab, (cfg.prompts, cfg.prompt_len), generator=g).tolist()
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
    best = {}
    for _ in range(cfg.repeats):
        for name, fn in methods.items():
            seconds, tokens, peak = bench_sampling.timed(fn, cfg.device)
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                              "peak_allocated_gib": None if math.isnan(peak) else peak}
    n_params = sum(p.numel() for p in model.parameters())
    bytes_per_elem = torch.empty((), dtype=resolve_dtype(cfg.dtype)).element_size()
    bound = decode_bound(model.config, n_params, bytes_per_elem, prompts=cfg.prompts, group_size=cfg.group_size,
                         prompt_len=cfg.prompt_len, new_tokens=cfg.new_tokens,
                         bandwidth_gbs=peaks["bandwidth_gbs"], tflops=peaks["tflops"])
    for row in best.values():
        row["vs_generate"] = row["tokens_per_s"] / best["generate"]["tokens_per_s"]
        row["share_of_bound"] = row["tokens_per_s"] / bound["tokens_per_s"] if bound["tokens_per_s"] else None
    # the compile counter of one more call: 0 means the timed runs replayed the warm-up's graph
    stats = sample(model, prompts, group_size=cfg.group_size, max_new_tokens=cfg.new_tokens, eos_token_ids=never_id,
                   pad_token_id=0, compile=True, generator=torch.Generator(cfg.device).manual_seed(0)).decode_stats
    release_static_cache(model)
    if cfg.device.startswith("cuda"):  # free the compiled graphs' memory before the RL step measures its peaks
        del model
        gc.collect()
        torch._dynamo.reset()
    return {"status": "passed", "n_params": n_params, "dtype": cfg.dtype, "rows": cfg.prompts * cfg.group_size,
            "prompts": cfg.prompts, "group_size": cfg.group_size, "prompt_len": cfg.prompt_len,
            "new_tokens": cfg.new_tokens, "methods": best,
            "compiled_vs_eager": best["sample_compiled"]["tokens_per_s"] / best["sample"]["tokens_per_s"],
            "first_compiled_call_s": compile_s, "compiled_decode_stats": stats, "bound": bound}


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
    cuda:LOCAL_RANK; every prompt samples from a generator of (seed, step, prompt), so all runs draw
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


# ----------------------------------------------------------------------------- report


def _nan_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def _fmt(x, spec=",.0f", unit=""):
    return "n/a" if x is None else format(x, spec) + unit


def markdown(r: dict) -> str:
    env = r["environment"]
    lines = [f"## GPU check: {env['device_name']}", "",
             f"torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}, "
             f"{env['gpus']} GPU(s) visible; total {r['seconds']:.0f} s" + (" (--tiny, CPU)" if r["config"]["tiny"] else ""),
             "", "| part | status | detail |", "|---|---|---|"]
    for part in PARTS:
        p = r["parts"].get(part, {})
        detail = p.get("reason", "")
        if part == "tests" and "tests" in p:
            detail = (f"{p['passed']} passed, {p['failures'] + p['errors']} failed, {p['skipped']} skipped"
                      + (f": {', '.join(p['failed_tests'])}" if p["failed_tests"] else "")
                      + (f" ({'; '.join(p['skip_reasons'])})" if p["skipped"] and p["skip_reasons"] else ""))
        lines.append(f"| {part} | {p.get('status', 'not run')} | {detail} |")
    s = r["parts"].get("sampler", {})
    if s.get("status") == "passed":
        peaks, bound = r["peaks"], s["bound"]
        lines += ["", f"### Sampler: {s['prompts']} prompts x G = {s['group_size']} = {s['rows']} rows, "
                      f"{s['prompt_len']}-token prompts, {s['new_tokens']} new tokens, {s['dtype']}, "
                      f"{s['n_params'] / 1e6:.3g}M weights", "",
                  "| method | tokens/s | vs generate | share of the decode bound | peak memory |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in s["methods"].items():
            lines.append(f"| {name} | {m['tokens_per_s']:,.0f} | {m['vs_generate']:.2f}x | "
                         f"{_fmt(m['share_of_bound'], '.1%')} | {_fmt(m['peak_allocated_gib'], '.2f', ' GiB')} |")
        st = s["compiled_decode_stats"]
        lines += ["", f"compiled / eager: {s['compiled_vs_eager']:.2f}x; first compiled call (compiles) "
                      f"{s['first_compiled_call_s']:.1f} s; later call: graphs compiled {st['graphs_compiled']}, "
                      f"bucket {st['buckets'][0]}, idle row share {st['idle_row_frac']:.1%}.",
                  f"Decode bound {_fmt(bound['tokens_per_s'])} tokens/s ({_fmt(bound['seconds'], '.3f', ' s')}; "
                  f"memory-bound part {_fmt(bound['memory_s'], '.3f', ' s')}, compute-bound part "
                  f"{_fmt(bound['compute_s'], '.3f', ' s')}) at {_fmt(peaks['bandwidth_gbs'])} GB/s and "
                  f"{_fmt(peaks['tflops'], 'g')} TFLOP/s ({peaks['source']}); measured copy bandwidth "
                  f"{r['copy_bandwidth_gbs']:,.0f} GB/s. Formula: benchmarks/gpu_check.py."]
    q = r["parts"].get("rl_step", {})
    if q.get("status") == "passed":
        lines += ["", f"### One Rank-GRPO step: {q['completions']} completions "
                      f"({q['completion_tokens']:.0f} completion tokens), bench_gpu_step.py {' '.join(q['argv'])}", "",
                  "| stage | seconds | peak allocated |", "|---|---:|---:|"]
        for stage in bench_gpu_step.STAGES:
            lines.append(f"| {stage} | {q['stage_seconds'][stage]:.2f} | "
                         f"{_fmt(q['peak_allocated_by_stage_gib'][stage], '.2f', ' GiB')} |")
        lines += [f"| step | {q['stage_seconds']['step']:.2f} | {_fmt(q['peak_allocated_gib'], '.2f', ' GiB')} |", "",
                  f"{q['samples_per_s']:.2f} samples/s, {q['completion_tokens_per_s']:,.0f} completion tokens/s; "
                  f"peak reserved {_fmt(q['peak_reserved_gib'], '.2f', ' GiB')}; weights, gradients, AdamW states and "
                  f"reference {q['analytic_static_gib']:.2f} GiB (analytic)."]
    for name, run in r["parts"].get("torchrun", {}).get("runs", {}).items():
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


def run(cfg: GPUCheckConfig) -> dict:
    start = time.perf_counter()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available (use --tiny)")
    out = Path(cfg.out).resolve()  # the test and torchrun parts run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    peaks = device_peaks(env["device_name"], cfg.peak_bandwidth_gbs, cfg.peak_tflops)
    result = {"config": asdict(cfg), "environment": env, "peaks": peaks,
              "copy_bandwidth_gbs": copy_bandwidth_gbs(device, 1024 if device.type == "cuda" else 64), "parts": {}}
    print(f"{env['device_name']}: torch {env['torch']}, peaks {peaks}")
    for part in PARTS:
        elapsed = time.perf_counter() - start
        if part in cfg.skip:
            result["parts"][part] = {"status": "skipped", "reason": "--skip"}
            continue
        if elapsed > cfg.budget_s:
            result["parts"][part] = {"status": "skipped", "reason": f"time budget of {cfg.budget_s:.0f} s spent"}
            continue
        print(f"\n== {part} ({elapsed:.0f} s so far)", flush=True)
        t0 = time.perf_counter()
        try:
            if part == "tests":
                res = run_tests(cfg, out, max(60.0, min(cfg.tests_timeout_s, cfg.budget_s - elapsed)))
            elif part == "sampler":
                res = run_sampler(cfg, peaks)
            elif part == "rl_step":
                res = run_rl_step(cfg, out)
            else:
                res = run_torchrun(cfg, out, max(60.0, cfg.budget_s - elapsed))
        except Exception as e:  # noqa: BLE001 - one part's failure must not hide the others' figures
            res = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        res["wall_s"] = time.perf_counter() - t0
        result["parts"][part] = res
        print(f"{part}: {res['status']} ({res['wall_s']:.0f} s){' - ' + res['reason'] if 'reason' in res else ''}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    atomic_write_json(out / "gpu_check.json", result)
    table = markdown(result)
    atomic_write_text(out / "gpu_check.md", table)
    print("\n" + table)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return result


def main(argv=None) -> dict:
    return run(parse_config(GPUCheckConfig, argv))


if __name__ == "__main__":
    main()
