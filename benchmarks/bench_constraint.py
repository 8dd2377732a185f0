"""Catalog-constrained decoding: trie build time and memory, and its cost in the sampler.

Part 1, the trie (``--catalog`` and ``--tokenizer`` given): build time (best of --builds cold
builds), the arrays' memory and the peak Python allocation while building, the on-disk cache
(size, load time), the items left out, and a check that the trie's tokens of random
formatted lists equal the tokenizer's own encoding of those lists.

Part 2, the sampler (``--throughput``): `sample` with and without the constraint on the same
model and prompts, interleaved, best of --repeats, in one run; then `token_logprobs` with and
without it on the constrained rollout. With a random model (the default) every row writes
exactly --new-tokens tokens in both runs (N is set so high that no list may end, and the eos id
is outside the vocabulary), so the two runs do the same decoding work. With --model (a
checkpoint) and --data, the lists are real greedy lists, as `evaluate.py` writes them.

    python benchmarks/bench_constraint.py --catalog gt_catalog.pkl --tokenizer path/to/qwen2-tokenizer
    python benchmarks/bench_constraint.py --catalog gt_catalog.pkl --tokenizer path/to/qwen2-tokenizer --throughput
    python benchmarks/bench_constraint.py --catalog world/catalog.jsonl --model runs/sft/final \\
        --data world/test.jsonl --throughput --skip-trie

Prints figures and ratios only; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
import time
import tracemalloc

import torch

from rankgrpo import constraint as constraint_module
from rankgrpo.catalog import load_catalog
from rankgrpo.constraint import (CatalogConstraint, build_catalog_trie, catalog_lines, catalog_trie,
                                 constraint_for_examples)
from rankgrpo.parsing import format_recommendations
from rankgrpo.sampling import sample, token_logprobs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", required=True, help="catalog file (.jsonl, .tsv or the authors' .pkl)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the --model's)")
    p.add_argument("--model", default=None, help="checkpoint for --throughput (default: a random Qwen2 model)")
    p.add_argument("--data", default=None, help="examples JSONL: real prompts (and seen titles) for --throughput")
    p.add_argument("--builds", type=int, default=3, help="cold trie builds timed (the fastest is reported)")
    p.add_argument("--check-lists", type=int, default=2000, help="random 20-item lists checked against the tokenizer")
    p.add_argument("--skip-trie", action="store_true", help="skip part 1")
    p.add_argument("--throughput", action="store_true", help="run part 2")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="G (1 with --data: greedy lists)")
    p.add_argument("--prompt-len", type=int, default=120)
    p.add_argument("--new-tokens", type=int, default=160)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_tok(path):
    from rankgrpo.models import load_tokenizer

    return load_tokenizer(path)


def part_trie(args, catalog, tokenizer) -> None:
    print(f"catalog: {len(catalog)} items ({catalog.report.summary()}); tokenizer: {type(tokenizer).__name__}, "
          f"{len(tokenizer)} tokens")
    times = []
    for _ in range(args.builds):
        start = time.perf_counter()
        trie = build_catalog_trie(catalog, tokenizer)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    build_catalog_trie(catalog, tokenizer)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    fanout = trie.edge_start[1] - trie.edge_start[0]
    print(f"trie: {trie.num_nodes:,} nodes, {len(trie.edge_token):,} edges, {fanout:,} first tokens "
          f"(the allowed set at a line start); items left out: {dict(trie.dropped) or 0}; "
          f"lines tokenised differently at a completion's start: {trie.first_line_mismatch}")
    print(f"build: {min(times):.3f} s (best of {len(times)}; all: {', '.join(f'{t:.3f}' for t in times)})")
    print(f"memory: arrays {trie.nbytes / 2**20:.2f} MiB; peak Python allocation while building "
          f"{peak / 2**20:.1f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        constraint_module._MEMORY.clear()
        start = time.perf_counter()
        catalog_trie(catalog, tokenizer, cache_dir=tmp)
        first = time.perf_counter() - start
        constraint_module._MEMORY.clear()
        start = time.perf_counter()
        catalog_trie(catalog, tokenizer, cache_dir=tmp)
        cached = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
        start = time.perf_counter()
        catalog_trie(catalog, tokenizer, cache_dir=tmp)
        in_memory = time.perf_counter() - start
    print(f"cache: first call (hash + build + write) {first:.3f} s; from disk (hash + load) {cached:.3f} s; "
          f"in memory (hash only) {in_memory:.3f} s; file {size / 2**20:.2f} MiB")
    # the trie's tokens of whole formatted lists against the tokenizer's encoding of them
    rng = random.Random(args.seed)
    kept = [i for i in range(len(catalog)) if trie.item_line_end[i] >= 0]
    bad = 0
    for _ in range(args.check_lists):
        idx = rng.sample(kept, 20)
        text = format_recommendations([(catalog[i].title, catalog[i].year) for i in idx])
        ours = [t for i in idx[:-1] for t in trie.item_tokens(i)] + trie.item_tokens(idx[-1], final=True)
        bad += ours != tokenizer(text, add_special_tokens=False)["input_ids"]
    print(f"check: {args.check_lists - bad}/{args.check_lists} random 20-item lists tokenise exactly as the trie "
          f"says")
    year_inside = sum(bool(re.search(r"\(\d{4}\)", line[: line.rfind(" (")])) for line in catalog_lines(catalog))
    print(f"titles holding a '(YYYY)' of their own (the one parse reads an earlier year): {year_inside}")


def random_model(vocab_size: int, args):
    from rankgrpo.models import model_config, model_from_config

    config = model_config("qwen2", vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=4, num_kv_heads=2, intermediate_size=args.hidden * 2 + args.hidden // 2)
    return model_from_config(config, seed=args.seed)


def part_throughput(args, catalog, tokenizer) -> None:
    from rankgrpo.data import chat_prompt_ids, load_examples
    from rankgrpo.models import load_model
    from rankgrpo.models import eos_token_ids

    trie = catalog_trie(catalog, tokenizer)
    if args.model:
        model = load_model(args.model)
        eos = eos_token_ids(model, tokenizer)
    else:
        model = random_model(len(tokenizer), args)
        eos = [model.config.vocab_size]  # outside the vocabulary: no row stops early
    model.eval()
    if args.data:
        examples = load_examples(args.data)[: args.prompts]
        prompts = [chat_prompt_ids(tokenizer, ex) for ex in examples]
        constraint = constraint_for_examples(trie, catalog, examples, n_items=20, eos_token_ids=eos)
        settings = dict(group_size=1, greedy=True, stop_after_items=20, tokenizer=tokenizer)
    else:
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(0, len(tokenizer), (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.prompts)]
        constraint = CatalogConstraint(trie, 10**9, eos)  # no final line is ever allowed: equal work
        settings = dict(group_size=args.group, temperature=1.0)
    print(f"model: {'random Qwen2' if not args.model else args.model}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {model.config.vocab_size}; "
          f"{len(prompts)} prompts x G={settings['group_size']}, up to {args.new_tokens} new tokens, "
          f"threads={torch.get_num_threads()}")

    def run(with_constraint: bool):
        start = time.perf_counter()
        rollout = sample(model, prompts, max_new_tokens=args.new_tokens, eos_token_ids=eos,
                         pad_token_id=tokenizer.pad_token_id or 0, generator=torch.Generator().manual_seed(args.seed),
                         constraint=constraint if with_constraint else None, **settings)
        return time.perf_counter() - start, rollout

    run(True), run(False)  # warm-up
    best = {}
    for _ in range(args.repeats):
        for name, flag in (("unconstrained", False), ("constrained", True)):
            seconds, rollout = run(flag)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, rollout)
    for name, (seconds, rollout) in best.items():
        tokens = int(rollout.lengths.sum())
        print(f"sample {name:>13}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s")
    (s_u, r_u), (s_c, r_c) = best["unconstrained"], best["constrained"]
    tps_u, tps_c = r_u.lengths.sum().item() / s_u, r_c.lengths.sum().item() / s_c
    print(f"ratio (constrained / unconstrained tokens per second): {tps_c / tps_u:.3f} "
          f"(overhead {100 * (tps_u / tps_c - 1):.1f}% time per token)")

    rollout = r_c
    ids, attn, start = rollout.model_inputs()
    row_constraint = constraint.for_rows(rollout.prompt_index)
    times = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, c in (("unconstrained", None), ("constrained", row_constraint)):
                t0 = time.perf_counter()
                logp = token_logprobs(model, ids, attn, start, constraint=c)
                t = time.perf_counter() - t0
                times[name] = min(times.get(name, t), t)
                if c is not None:
                    diff = ((logp - rollout.logprobs) * rollout.completion_mask).abs().max().item()
    print(f"token_logprobs: unconstrained {times['unconstrained']:.2f} s, constrained {times['constrained']:.2f} s "
          f"(ratio {times['constrained'] / times['unconstrained']:.3f}); max |logp - sampler logp| = {diff:.2e}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    catalog = load_catalog(args.catalog)
    tokenizer = load_tok(args.tokenizer or args.model)
    if not args.skip_trie:
        part_trie(args, catalog, tokenizer)
    if args.throughput:
        part_throughput(args, catalog, tokenizer)


if __name__ == "__main__":
    main()
