"""Measured peak memory of Rank-GRPO update steps on CPU: full fine-tuning against LoRA, with and
without gradient checkpointing, each in its own process (the peak resident set size,
``resource.getrusage(...).ru_maxrss``, less the resident size just before the model is built).

    python benchmarks/bench_lora_memory.py                 # a 16M-parameter Qwen2 with random weights
    python benchmarks/bench_lora_memory.py --hidden 896 --layers 8 --vocab 32768   # bigger, slower

Each process builds the same random model (float32), then runs ``--steps`` update steps as
``train_rankgrpo.py`` does them: the KL reference's log-probs without gradients (full fine-tuning:
a frozen copy of the model; LoRA: the policy with its adapters off), the policy's log-probs with
gradients (``rankgrpo.logprobs.token_logprobs``), a clipped-ratio loss with the k3 KL, backward,
clipping and AdamW over the parameters that train. Printed beside each measurement: what the
persistent state should take, 4 B x (weights + reference) + 16 B x (trained parameters), as
docs/scaling.md's table counts it (float32 here, no autocast). Timings are not the point.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

MB = 2 ** 20
# glibc: every block of 64 KiB or more gets its own mapping, returned to the system when freed, so the
# resident size follows the live tensors (by default freed heap memory stays resident and the peak
# depends on the order of allocations)
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def resident_bytes() -> int:
    """The process's resident set size now (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    import torch

    from rankgrpo.logprobs import token_logprobs
    from rankgrpo.losses import k3_kl
    from rankgrpo.lora import DEFAULT_TARGETS, LoRASettings, adapters_off, add_lora, trainable_parameters
    from rankgrpo.models import model_config, model_from_config

    torch.set_num_threads(args.threads)
    before = resident_bytes()
    config = model_config("qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate)
    model = model_from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    if args.method == "lora":
        add_lora(model, LoRASettings(args.rank, 2.0 * args.rank, 0.0, DEFAULT_TARGETS))
        reference, off = model, adapters_off
    else:
        reference, off = copy.deepcopy(model).requires_grad_(False), lambda m: torch.no_grad()
    if args.checkpointing:
        from rankgrpo.trainer import enable_gradient_checkpointing
        enable_gradient_checkpointing(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.rows, args.prompt + args.seq), generator=g)
    attn = torch.ones_like(ids)
    adv = torch.randn(args.rows, 1, generator=g)
    mask = torch.ones(args.rows, args.seq)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        model.eval()
        with torch.no_grad(), off(reference):
            ref = token_logprobs(reference, ids, attn, args.prompt)
        model.train()
        logp = token_logprobs(model, ids, attn, args.prompt)
        ratio = torch.exp(logp - logp.detach())
        surrogate = torch.minimum(ratio * adv, ratio.clamp(0.94, 1.08) * adv)
        loss = -(surrogate.mean() - 1e-3 * k3_kl(logp, ref, mask).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trained = sum(p.numel() for p in params)
    reference_bytes = 0 if args.method == "lora" else 4 * n_params
    return {"method": args.method, "checkpointing": args.checkpointing, "params": n_params, "trained": trained,
            "peak_above_start_mb": (peak - before) / MB,
            "persistent_mb": (4 * (n_params + (trained if args.method == "lora" else 0)) + reference_bytes
                              + 16 * trained) / MB,
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    ap.add_argument("--rows", type=int, default=4, help="completions per step (one micro-batch)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--seq", type=int, default=128, help="completion tokens per row")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", choices=["full", "lora"], help=argparse.SUPPRESS)   # set in the child processes
    ap.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args(argv)
    if args.method:
        print(json.dumps(child(args)))
        return 0
    # the child gets every setting but --json (the parent writes it), whichever form it was given in
    base = [x for k, v in vars(args).items() if k not in ("method", "checkpointing", "json")
            for x in (f"--{k.replace('_', '-')}", str(v))]
    rows = []
    for method in ("full", "lora"):
        for ckpt in (0, 1):
            out = subprocess.run([sys.executable, __file__, *base, "--method", method, "--checkpointing", str(ckpt)],
                                 capture_output=True, text=True, check=True, env=CHILD_ENV)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r0 = rows[0]
    print(f"peak resident memory above the process's start, MiB: Qwen2 with {r0['params'] / 1e6:.1f} M parameters "
          f"(hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), {args.rows} rows x ({args.prompt} + "
          f"{args.seq}) tokens, {args.steps} update steps, float32, {args.threads} thread(s), LoRA r = {args.rank}")
    print()
    print("| method | checkpointing | trained parameters | measured peak | persistent state (computed) | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        method = f"LoRA r={args.rank}" if r["method"] == "lora" else "full"
        print(f"| {method} | {'yes' if r['checkpointing'] else 'no'} | {r['trained'] / 1e6:.2f} M | "
              f"{r['peak_above_start_mb']:.0f} | {r['persistent_mb']:.0f} | {r['seconds']:.1f} |")
    full, lora = {r["checkpointing"]: r for r in rows if r["method"] == "full"}, \
        {r["checkpointing"]: r for r in rows if r["method"] == "lora"}
    print()
    print("full - LoRA, measured: " + ", ".join(
        f"{full[c]['peak_above_start_mb'] - lora[c]['peak_above_start_mb']:.0f} MiB "
        f"({'with' if c else 'without'} checkpointing)" for c in (0, 1))
        + f"; computed persistent state: {full[0]['persistent_mb'] - lora[0]['persistent_mb']:.0f} MiB "
        "(gradients included, which exist only from the backward pass to the optimizer step)")
    if args.json:
        from rankgrpo.io import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
