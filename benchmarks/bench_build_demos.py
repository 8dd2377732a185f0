"""build_demos.py end to end on the default sandbox world: 5,000 training conversations plus
all 1,000 validation ones, first with an empty cache (every teacher request and embedding
computed), then again from the cache (what a resumed run costs).

    python benchmarks/bench_build_demos.py [--world sandbox_world] [--n-train 5000] [--threads 1]

Target: at most 2 minutes for the cold run on 2 CPU cores. Prints the seconds of every
stage, the peak memory and the validation stage table.
"""
import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rankgrpo.metrics import format_table  # noqa: E402
from rankgrpo.scripts import load_script  # noqa: E402

TARGET_S = 120.0


build_demos = load_script(Path(__file__).resolve().parents[1] / "build_demos.py")


def quiet(line: str) -> None:
    if not line.startswith("rra:"):  # the progress lines
        print(line, flush=True)


def run(world: str, out: Path, n_train: int, threads: int, log) -> tuple[dict, float]:
    cfg = build_demos.BuildDemosConfig(world=world, out=str(out), train_fraction=1.0, max_train=n_train,
                                       threads=threads)
    t0 = time.perf_counter()
    report = build_demos.build_demos(cfg, log=log)
    return report, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="sandbox_world", help="sandbox world (built there with the defaults if missing)")
    ap.add_argument("--n-train", type=int, default=5000, help="training conversations to process")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (build_demos' --threads)")
    ap.add_argument("--out", default="", help="keep the run here (default: a temporary directory)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    world = build_demos.prepare_world(args.world, print)
    print(f"world {args.world}: {len(world.catalog)} films ({time.perf_counter() - t0:.1f}s to load or build)")
    n_available = sum(1 for line in open(Path(args.world) / "train.jsonl", encoding="utf-8") if line.strip())
    if n_available < args.n_train:
        raise SystemExit(f"{args.world} has {n_available} training samples, fewer than --n-train {args.n_train}")
    del world

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "demos"
        cold, cold_s = run(args.world, out, args.n_train, args.threads, quiet)
        warm, warm_s = run(args.world, out, args.n_train, args.threads, lambda line: None)
    n = cold["counts"]["train"]["selected"] + cold["counts"]["validation"]["selected"]
    print(f"\nbuild_demos on {cold['counts']['train']['selected']} train + {cold['counts']['validation']['selected']} "
          f"validation conversations, {args.threads} thread(s):")
    stages = [k for k in cold["seconds"] if k != "total"]
    print(f"{'stage':<14} {'cold cache':>11} {'from cache':>11}")
    for k in stages:
        print(f"{k:<14} {cold['seconds'][k]:>10.1f}s {warm['seconds'].get(k, 0.0):>10.1f}s")
    print(f"{'total':<14} {cold_s:>10.1f}s {warm_s:>10.1f}s   (target: cold <= {TARGET_S:.0f}s: "
          f"{'met' if cold_s <= TARGET_S else 'MISSED'})")
    print(f"teacher requests: {cold['teacher_requests']['sent']} sent cold, {warm['teacher_requests']['sent']} "
          f"sent from cache; {n / cold_s:.0f} conversations/s cold")
    print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("\nvalidation NDCG@20 by stage: " + " -> ".join(
        f"{s} {agg['ndcg@20']['mean']:.4f}" for s, agg in cold["metrics"]["validation"].items()))
    print(format_table({s: agg for s, agg in cold["metrics"]["validation"].items()}, ks=(5, 10, 20), stderr=False))


if __name__ == "__main__":
    main()
