"""Completion tokens per second: `rankgrpo.sampling.sample` vs `model.generate`.

Both sample G completions for each prompt with the same model, temperature 1, no top-k or
top-p, and an end-of-sequence id that can never be produced, so every row generates exactly
`--new-tokens` tokens and both do the same decoding work. `generate(num_return_sequences=G)`
prefills every prompt G times; `sample` prefills it once and copies the KV cache.

    python benchmarks/bench_sampling.py                 # CPU, small Qwen2 (sandbox-sized)
    python benchmarks/bench_sampling.py --gpu           # CUDA, Qwen2.5-0.5B shapes, bf16,
                                                        # 48 prompts x G=8 x 256 new tokens
    python benchmarks/bench_sampling.py --gpu --compile # our sampler's compiled decode

Weights are random (nothing is downloaded). Prints both figures, the ratio, and on CUDA the
peak memory of each method.
"""
from __future__ import annotations

import argparse
import time

import torch

from rankgrpo.models import model_config, model_from_config, qwen25_05b_config
from rankgrpo.sampling import left_pad, sample


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true",
                   help="Qwen2.5-0.5B shapes, bf16, CUDA, 48 prompts x G=8 x 256 new tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu, or cuda with --gpu)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--prompts", type=int, default=None, help="number of prompts (default 16; 48 with --gpu)")
    p.add_argument("--prompt-len", type=int, default=300, help="mean prompt length; lengths vary by +-20%%")
    p.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default 160; 256 with --gpu)")
    p.add_argument("--prompt-batch", type=int, default=None, help="prompt_batch_size for sample (default all)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per method, interleaved (the fastest is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-generate", action="store_true", help="time only our sampler")
    p.add_argument("--compile", action="store_true",
                   help="our sampler with the static-cache compiled decode (sample(compile=True))")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.prompts = args.prompts or (48 if args.gpu else 16)
    args.new_tokens = args.new_tokens or (256 if args.gpu else 160)
    return args


def build_model(args):
    if args.gpu:
        config = qwen25_05b_config()
    else:
        config = model_config(
            "qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
        )
    return model_from_config(config, seed=args.seed, dtype=args.dtype, device=args.device)


def make_prompts(args, vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed)
    low, high = int(args.prompt_len * 0.8), int(args.prompt_len * 1.2) + 1
    lengths = torch.randint(low, high, (args.prompts,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(model, prompts, args, never_id: int):
    rollout = sample(
        model, prompts, group_size=args.group, max_new_tokens=args.new_tokens, temperature=1.0,
        eos_token_ids=never_id, pad_token_id=0, prompt_batch_size=args.prompt_batch,
        generator=torch.Generator(args.device).manual_seed(args.seed), compile=args.compile,
    )
    return int(rollout.lengths.sum())


@torch.inference_mode()
def run_generate(model, prompts, args, never_id: int):
    ids, mask = left_pad(prompts, 0, device=args.device)
    out = model.generate(
        input_ids=ids, attention_mask=mask.long(), do_sample=True, num_return_sequences=args.group,
        max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        eos_token_id=never_id, pad_token_id=0,
    )
    return out[:, ids.shape[1]:].numel()


def timed(fn, device: str) -> tuple[float, int, float]:
    """(seconds, completion tokens, peak GPU memory in GiB or nan) of one call."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    tokens = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return seconds, tokens, peak


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)
    vocab = model.config.vocab_size
    never_id = vocab  # an id outside the vocabulary: no row ever stops early
    prompts = make_prompts(args, vocab)
    lengths = [len(p) for p in prompts]
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M vocab={vocab} "
          f"layers={model.config.num_hidden_layers} hidden={model.config.hidden_size}")
    print(f"prompts={len(prompts)} (lengths {min(lengths)}-{max(lengths)}) G={args.group} "
          f"new_tokens={args.new_tokens} -> {len(prompts) * args.group * args.new_tokens} completion tokens")

    warm = argparse.Namespace(**{**vars(args), "new_tokens": 4})  # first-call overheads
    if args.compile:  # one untimed full run compiles (and captures) the very shapes that are timed
        run_ours(model, prompts, args, never_id)
    else:
        run_ours(model, prompts[:2], warm, never_id)
    if not args.skip_generate:
        run_generate(model, prompts[:2], warm, never_id)

    methods = {"sample": lambda: run_ours(model, prompts, args, never_id)}
    if not args.skip_generate:
        methods["generate"] = lambda: run_generate(model, prompts, args, never_id)
    results = {}
    for _ in range(args.repeats):  # interleaved, best of `repeats`, so background load hits both
        for name, fn in methods.items():
            result = timed(fn, args.device)
            if name not in results or result[0] < results[name][0]:
                results[name] = result
    for name, (seconds, tokens, peak) in results.items():
        memory = f"  peak {peak:.2f} GiB" if peak == peak else ""
        print(f"{name:>9}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s{memory}")
    if "generate" in results:
        ours, theirs = results["sample"], results["generate"]
        ratio = (ours[1] / ours[0]) / (theirs[1] / theirs[0])
        print(f"ratio (sample / generate tokens per second): {ratio:.2f}x")


if __name__ == "__main__":
    main()
