"""Token -> rank segmentation: `rankgrpo.segment` fast path vs general path vs the authors' loop.

Segments a batch of random movie lists (default 384 completions x 400 tokens, one
optimiser step of the paper: 48 prompts x G=8) with

  * the fast path: `token_ranks(..., method="fast")`, a newline-count table lookup and a
    cumulative sum (the table is built and checked once per tokenizer; that one-off cost is
    printed separately);
  * the general path: `token_ranks(..., method="general")`, one decode per token prefix;
  * the authors' loop (`_segment_items_from_tokens`): `tok.decode([id])` for every token in Python, counting
    the "\\n" it holds.

    python benchmarks/bench_segment.py [--rows 384] [--tokens 400] [--vocab 8192] [--threads 1]

The tokenizer is the sandbox's byte-level BPE (Qwen2's pre-tokenizer split), trained here on
synthetic lists; nothing is downloaded. Prints the three timings, the fast-path speed-up over
the authors' loop, and whether all three agree.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from rankgrpo.sandbox import build_tokenizer
from rankgrpo.segment import fast_path_is_exact, newline_table, token_ranks

WORDS = ["The", "Love", "Night", "Amélie", "Léon", "Garçon", "Über", "Cœur", "Heat", "Alien", "of", "and",
         "Return", "Dark", "Star", "City", "Noël", "Café", "Lost", "in", "Time", "Blade", "Runner", "Seven",
         "Samurai", "東京物語"]
SYLLABLES = ["ka", "ri", "mo", "del", "sa", "ton", "vi", "ré", "lu", "ber", "gan", "tho", "mi", "zé", "quo", "ly"]


def random_word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))).capitalize()


def random_list(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        title = " ".join(random_word(rng) for _ in range(rng.randint(1, 4)))
        u = rng.random()
        lines.append("" if u < 0.03 else title if u < 0.08 else f"{title} ({rng.randint(1920, 2024)})")
    return "\n".join(lines)


def build_batch(tok, n_rows: int, n_tokens: int, seed: int):
    """[n_rows, n_tokens] ids: long lists cut to n_tokens - 1 tokens, then <eos>; full mask."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        ids: list[int] = []
        while len(ids) < n_tokens - 1:
            ids += tok.encode(random_list(rng, 20) + "\n", add_special_tokens=False)
        rows.append(ids[: n_tokens - 1] + [tok.eos_token_id])
    ids = torch.tensor(rows)
    return ids, torch.ones_like(ids, dtype=torch.bool)


def authors_loop(ids: torch.Tensor, mask: torch.Tensor, tok) -> torch.Tensor:
    """The released code's `_segment_items_from_tokens`: per-token `decode`, count the newlines."""
    newline_id = tok.encode("\n", add_special_tokens=False)[0]
    ranks = torch.full(ids.shape, -1, dtype=torch.long)
    for b in range(ids.shape[0]):
        item = 0
        for t in range(ids.shape[1]):
            if not mask[b, t]:
                break
            ranks[b, t] = item
            token_id = int(ids[b, t])
            text = tok.decode([token_id])
            if token_id == newline_id or "\n" in text:
                item += max(text.count("\n"), 1)
    return ranks


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=384)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the work is small, and on a busy machine OpenMP threads "
                        "wait for each other; 0 keeps torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = random.Random(args.seed + 1)
    tok = build_tokenizer([random_list(rng, 25) for _ in range(20000)], vocab_size=args.vocab)
    ids, mask = build_batch(tok, args.rows, args.tokens, args.seed)
    print(f"tokenizer: byte-level BPE, {len(tok)} ids; batch: {args.rows} completions x {args.tokens} tokens, "
          f"torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    newline_table(tok)
    exact = fast_path_is_exact(tok)
    print(f"one-off newline table + fast-path check:   {time.perf_counter() - start:9.4f} s   (exact: {exact})")

    fast, t_fast = timed(lambda: token_ranks(ids, mask, tok, method="fast"), repeats=50)
    general, t_general = timed(lambda: token_ranks(ids, mask, tok, method="general"), repeats=1)
    authors, t_authors = timed(lambda: authors_loop(ids, mask, tok), repeats=3)

    print(f"fast path (table + cumsum):                {t_fast:9.4f} s")
    print(f"general path (prefix decodes):             {t_general:9.4f} s")
    print(f"authors' loop (decode([id]) per token):    {t_authors:9.4f} s")
    print(f"fast path speed-up over the authors' loop: {t_authors / t_fast:9.0f} x")
    print(f"fast == general == authors' loop: {torch.equal(fast, general) and torch.equal(fast, authors)}")


if __name__ == "__main__":
    main()
