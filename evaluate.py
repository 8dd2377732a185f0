"""Evaluate recommendation lists: Recall@k / NDCG@k with standard errors, in-catalog and format ratios.

Three ways in (§3):

    # greedy lists from a checkpoint (our sampler, once per unique prompt), scored on a split
    python evaluate.py --model runs/rankgrpo/final --data sandbox_world/test.jsonl --name rank-grpo --out runs/eval/rl
    # an existing predictions file (JSONL, one completion per example, aligned by id or by line)
    python evaluate.py --preset paper --data test.jsonl --catalog catalog.jsonl --predictions preds.jsonl
    python evaluate.py --preset paper --data train_sample.jsonl --catalog gt_catalog.pkl \\
        --predictions-from-field completion
    # the same on several GPUs: each process generates for its share of the unique prompts
    torchrun --nproc-per-node 4 evaluate.py --preset paper --model runs/rankgrpo/final --data test.jsonl \\
        --out runs/eval/rl
    # several finished evaluations in one table (with --out also DIR/comparison.json: the table's rows and the
    # paired differences; with --plot one per-rank hit plot)
    python evaluate.py --compare runs/eval/sft runs/eval/rl --plot --out runs/eval

Scoring (--protocol): "paper" (default) is the authors' libs/metrics.py::evaluate_direct_match exactly:
seen titles removed by exact string, the catalog filter on the exact (title, year) pair, hits by exact,
case-sensitive titles within 2 years, the authors' IDCG, and their in-catalog ratio.
"lenient" matches the way the training reward does (case-folded titles, year-tolerant catalog, one-to-one
matching) with the textbook IDCG. Generation (--model) is greedy until <eos> or --max-new-tokens (the
paper: 1,024); --stop-after-items N also stops a list after N lines with text (give N > --n-items).

--preset sandbox (the default) is make demo's evaluation: the first --limit test conversations, a
token budget and a line stop for the sandbox's short lists (rankgrpo/sandbox/settings.py). On other
data pass --preset paper: every example, lists until <eos> or 1,024 tokens, no line stop.

With --out DIR: DIR/results.json (config, aggregate with standard errors, per-rank hit curve) and
DIR/examples.jsonl (id, completion, per-example metrics). --plot also writes PNGs: the per-rank hit
curve, and the training curves of every --train-log (per-rank reward and validation NDCG@20).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from rankgrpo.catalog import CatalogError, load_catalog
from rankgrpo.config import ConfigError, arg, run_cli
from rankgrpo.data import DataError, load_examples
from rankgrpo.evaluation import load_predictions, prompt_clusters, score_examples
from rankgrpo.io import atomic_write_json, atomic_write_jsonl, read_jsonl_tolerant
from rankgrpo.metrics import format_table, paired_difference
from rankgrpo.sandbox import settings


# --preset: the paper's defaults below, or the sandbox's (what make demo runs; rankgrpo/sandbox/settings.py)
PRESETS = {"paper": {}, "sandbox": settings.EVALUATE}


@dataclass
class EvaluateConfig:
    """Score recommendation lists against ground truth (§3)."""

    PRESETS: ClassVar[dict] = PRESETS

    preset: str = arg("sandbox", "Defaults of --limit, --max-new-tokens and --stop-after-items: 'paper' (every "
                                 "example, lists to <eos> or 1,024 tokens, as the paper) or 'sandbox' (what make "
                                 "demo runs on the sandbox world: rankgrpo/sandbox/settings.py). A flag given on "
                                 "the command line wins.", choices=list(PRESETS))
    data: str = arg("sandbox_world/test.jsonl", "Examples (JSONL / JSON) with prompts, seen titles and ground truths.")
    catalog: str = arg("sandbox_world/catalog.jsonl", "Catalog file (.jsonl, .tsv, or the authors' .pkl).")
    model: str = arg("", "Generate greedy lists from this checkpoint (HF format directory or hub name).")
    predictions: str = arg("", "Or: a predictions JSONL ({'id'?, 'completion'}) to score.")
    predictions_from_field: str = arg("", "Or: score the examples' own field (e.g. 'completion').",
                                      choices=["", "completion"])
    compare: list[str] = arg([], "Or: evaluation directories (or results.json files) to show in one table.")
    name: str = arg("run", "Row name in the printed table.")
    out: str = arg("", "Write results.json and examples.jsonl (and PNGs with --plot) into this directory.")
    json: str = arg("", "Also write the aggregate numbers to this JSON file.")
    limit: int = arg(0, "Score only the first LIMIT examples (0: all). Set by the sandbox preset.", min=0)
    protocol: str = arg("paper", "'paper': the authors' evaluate_direct_match exactly (exact titles, exact "
                                 "(title, year) catalog filter, their IDCG and in-catalog ratio); 'lenient': "
                                 "the reward's matching (case-folded titles, year-tolerant catalog) and the "
                                 "textbook IDCG.", choices=["paper", "lenient"])
    positions: str = arg("shift", "'shift': drop seen/out-of-catalog items then cut at k (the authors' "
                                  "evaluation); 'fixed': items keep their generated rank.",
                         choices=["shift", "fixed"])
    year_tolerance: int = arg(2, "A recommendation's year may differ from the ground truth's by this much.", min=0)
    n_items: int = arg(20, "List length N (the per-rank curve and format ratio use the first N lines).", min=1)
    max_new_tokens: int = arg(1024, "Greedy generation budget per list; a list ends at <eos> or here "
                                    "(the paper: 1024). Set by the sandbox preset.")
    stop_after_items: int = arg(0, "Also stop a list once it has this many lines with text (blank lines do "
                                   "not count). 0: off, as in the paper. Must exceed --n-items: filtered "
                                   "items (seen, out-of-catalog, repeated, a preamble) leave room for later "
                                   "ones; e.g. 30 for N = 20. Set by the sandbox preset.", min=0)
    batch_size: int = arg(64, "Unique prompts per generation batch.", min=1)
    chat_template: str = arg("", "With --model: chat template for a tokenizer that has none, a built-in name "
                                 "('chatml') or a Jinja file.")
    device: str = arg("", "Device for generation (default: cuda if available, else cpu).")
    dtype: str = arg("float32", "Model dtype for generation (bfloat16 on GPUs).")
    compile: bool = arg(False, "Generate with a static KV cache and a compiled one-token step (CUDA graphs "
                               "on a GPU); compiles once per shape bucket.")
    constrained: bool = arg(False, "Catalog-constrained decoding (with --model): every line is a catalog line, "
                                   "none twice (rankgrpo/constraint.py). Default off, as in the paper.")
    exclude_seen: bool = arg(True, "With --constrained: also forbid the catalog items whose title the user "
                                   "mentioned (the evaluation scores them 0).")
    trie_cache: str = arg("", "With --constrained: keep the catalog's token trie in this directory "
                              "(built once per catalog and tokenizer; default: memory only).")
    plot: bool = arg(False, "Write PNGs (needs matplotlib): per-rank hit curve, and training curves of --train-log.")
    train_log: list[str] = arg([], "Training logs (RUN/log.jsonl) to plot with --plot.")

    def validate(self) -> None:
        sources = bool(self.model) + bool(self.predictions) + bool(self.predictions_from_field) + bool(self.compare)
        if sources != 1:
            raise ConfigError("give exactly one of --model, --predictions, --predictions-from-field, --compare")
        if self.max_new_tokens < 1:
            raise SystemExit(f"evaluate.py: --max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_after_items and self.stop_after_items <= self.n_items:
            raise SystemExit(f"evaluate.py: --stop-after-items must be 0 (off) or more than --n-items "
                             f"({self.n_items}) to leave room for filtered items, got {self.stop_after_items}")
        if self.model:
            from rankgrpo.models import resolve_dtype

            try:
                resolve_dtype(self.dtype)
            except ValueError as e:
                raise ConfigError(f"--dtype: {e}") from None
        if self.constrained and not self.model:
            raise ConfigError("--constrained needs --model (it changes how lists are generated)")
        if self.constrained and self.compile:
            raise ConfigError("--constrained does not work with --compile yet (the compiled decode applies no "
                              "constraint); drop one of them")


def _results_path(p: str) -> Path:
    path = Path(p)
    return path / "results.json" if path.is_dir() else path


def compare(cfg: EvaluateConfig) -> int:
    rows, curves, per_example = {}, {}, {}
    for p in cfg.compare:
        path = _results_path(p)
        if not path.is_file():
            print(f"error: {path}: no results.json (run evaluate.py with --out first)", file=sys.stderr)
            return 2
        res = json.loads(path.read_text())
        name = res.get("name", path.parent.name)
        rows[name] = res["results"]
        curves[name] = res["results"].get("rank_hit_rate", [])
        if (path.parent / "examples.jsonl").is_file():
            per_example[name] = {r["id"]: r for r in read_jsonl_tolerant(path.parent / "examples.jsonl")}
    print(format_table(rows))
    names = list(rows)
    pairs = [(a, b) for b, a in zip(names, names[1:]) if a in per_example and b in per_example]
    paired = []
    if pairs:
        print("paired differences on the same examples (each row minus the row above; mean ±standard error "
              "clustered by prompt, in standard errors):")
        for a, b in pairs:
            cells, row = [], {"a": a, "b": b}
            clusters = prompt_clusters(per_example[a], per_example[b])
            for k in (5, 20):
                d = row[f"ndcg@{k}"] = paired_difference(per_example[a], per_example[b], f"ndcg@{k}", clusters=clusters)
                cells.append(f"N@{k} {d['mean']:+.4f} ±{d['stderr']:.4f} ({d['z']:+.1f} SE)")
            print(f"  {a} − {b}: " + ", ".join(cells))
            paired.append(row)
    if cfg.out:
        atomic_write_json(Path(cfg.out) / "comparison.json", {"rows": rows, "paired": paired})
        print(f"wrote {Path(cfg.out) / 'comparison.json'}")
    if cfg.plot:
        _plots(cfg, curves)
    return 0


def _plots(cfg: EvaluateConfig, curves: dict) -> None:
    from rankgrpo.plots import plot_rank_hits, plot_training

    out = Path(cfg.out or ".")
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {plot_rank_hits(curves, out / 'rank_hits.png')}")
    for i, log in enumerate(cfg.train_log):
        name = Path(log).parent.name or f"run{i}"
        print(f"wrote {plot_training(log, out / f'training_{name}.png')}")


def generate(cfg: EvaluateConfig, examples, catalog) -> list[str] | None:
    """Greedy completions, one per example; under torchrun rank r generates for every W-th unique
    prompt, rank 0 gathers them all and the other ranks get None (and write nothing).
    With --constrained, decoding is catalog-constrained (``rankgrpo.constraint``)."""
    import torch

    from rankgrpo.distributed import close_world, init_world
    from rankgrpo.trainer import load_for_cli
    from rankgrpo.validation import shared_greedy_completions

    world = init_world(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tokenizer, model = load_for_cli("--model", cfg.model, cfg.chat_template, dtype=cfg.dtype,
                                        device=world.device)
        constraint_for = None
        if cfg.constrained:
            from rankgrpo.constraint import catalog_trie, constraint_for_examples
            from rankgrpo.models import eos_token_ids

            trie = catalog_trie(catalog, tokenizer, cache_dir=cfg.trie_cache or None)
            if trie.dropped and world.is_main:
                print(f"constraint: catalog items left out of the trie: {dict(trie.dropped)}", file=sys.stderr)
            eos = eos_token_ids(model, tokenizer)

            def constraint_for(own):  # one exclusion set per example of this rank
                return constraint_for_examples(trie, catalog, own, n_items=cfg.n_items, eos_token_ids=eos,
                                               exclude_seen=cfg.exclude_seen)

        texts = shared_greedy_completions(model, tokenizer, examples, world, constraint_for=constraint_for,
                                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                          stop_after_items=cfg.stop_after_items or None, progress=world.is_main,
                                          compile=cfg.compile)
    except BaseException:
        close_world(world, finished=False)
        raise
    close_world(world)
    return texts if world.is_main else None


def check_inputs(cfg: EvaluateConfig) -> None:
    """Fail before any work on an input that is missing, naming the flag."""
    from rankgrpo.trainer import check_model_source, check_paths

    if cfg.compare:
        return
    check_paths(data=cfg.data, catalog=cfg.catalog, predictions=cfg.predictions)
    if cfg.model:
        check_model_source("--model", cfg.model)


def main(argv=None) -> int:
    return run_cli(EvaluateConfig, run, argv)


def run(cfg: EvaluateConfig) -> int:
    check_inputs(cfg)
    if cfg.compare:
        return compare(cfg)
    try:
        catalog = load_catalog(cfg.catalog)
        examples = load_examples(cfg.data)
        if examples.report.counts:
            print(f"data: {examples.report.summary()}", file=sys.stderr)
        n_all = len(examples)
        if cfg.limit:
            examples = examples[: cfg.limit]
        if cfg.predictions_from_field:
            missing = [e.id for e in examples if e.completion is None]
            if missing:
                raise DataError(f"{cfg.data}: {len(missing)} example(s) have no 'completion', e.g. id {missing[0]}")
            completions = [e.completion for e in examples]
        elif cfg.predictions:
            completions = load_predictions(cfg.predictions, examples)
        else:
            completions = generate(cfg, examples, catalog)
            if completions is None:  # a torchrun rank other than 0: its lists went to rank 0
                return 0
    except (DataError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if catalog.report.dropped:
        print(f"catalog: {catalog.report.summary()}", file=sys.stderr)
    agg, rows = score_examples(examples, completions, catalog, positions=cfg.positions, protocol=cfg.protocol,
                               year_tolerance=cfg.year_tolerance, n_items=cfg.n_items)
    cut = f" (the first {len(examples)} of {n_all}: --limit {cfg.limit})" if len(examples) < n_all else ""
    print(f"{len(examples)} examples{cut}, {len(catalog)} catalog items, protocol={cfg.protocol}, "
          f"positions={cfg.positions}")
    print(format_table({cfg.name: agg}))
    curve = agg.get("rank_hit_rate", [])
    print("hit rate by rank: " + " ".join(f"{h:.3f}" for h in curve))
    result = {"name": cfg.name, "config": vars(cfg), "results": agg}
    if cfg.out:
        atomic_write_json(Path(cfg.out) / "results.json", result)
        atomic_write_jsonl(Path(cfg.out) / "examples.jsonl", rows)
        if cfg.plot:
            _plots(cfg, {cfg.name: curve})
    if cfg.json:
        atomic_write_json(cfg.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
