"""Catalog scale: write a 1,000,000-item JSONL catalog, load it, answer 100,000 lookups.

    python benchmarks/bench_catalog.py [--items 1000000]
"""
import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from rankgrpo.catalog import load_catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100_000)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.jsonl"
        with open(path, "w") as f:
            for i in range(args.items):
                f.write(json.dumps({"title": f"Film Number {i} Returns", "year": 1940 + i % 85}) + "\n")
        t0 = time.perf_counter()
        cat = load_catalog(path)
        t_load = time.perf_counter() - t0
        queries = [(f"film number {j} returns", 1940 + j % 85 + rng.choice([0, 1, -2, 3]))
                   for j in (rng.randrange(args.items) for _ in range(args.queries))]
        t0 = time.perf_counter()
        found = sum(cat.lookup(t, y) is not None for t, y in queries)
        t_query = time.perf_counter() - t0
    print(f"items={len(cat):,} load={t_load:.2f}s  queries={args.queries:,} in {t_query:.2f}s "
          f"({args.queries / t_query:,.0f}/s), found {found:,}")


if __name__ == "__main__":
    main()
