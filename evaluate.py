"""Evaluate recommendation lists: Recall@k / NDCG@k with standard errors, in-catalog and format ratios.

Three ways in (PAPER.md section 8):

    # greedy lists from a checkpoint (our sampler, once per unique prompt), scored on a split
    python evaluate.py --model runs/rankgrpo/final --data sandbox_world/test.jsonl --name rank-grpo --out runs/eval/rl
    # an existing predictions file (JSONL, one completion per example, aligned by id or by line)
    python evaluate.py --data test.jsonl --catalog catalog.jsonl --predictions preds.jsonl
    python evaluate.py --data train_sample.jsonl --catalog gt_catalog.pkl --predictions-from-field completion
    # several finished evaluations in one table (and one per-rank hit plot with --plot)
    python evaluate.py --compare runs/eval/sft runs/eval/rl --plot --out runs/eval

With --out DIR: DIR/results.json (config, aggregate with standard errors, per-rank hit curve) and
DIR/examples.jsonl (id, completion, per-example metrics). --plot also writes PNGs: the per-rank hit
curve, and the training curves of every --train-log (per-rank reward and validation NDCG@20).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rankgrpo.catalog import CatalogError, load_catalog
from rankgrpo.config import arg, parse_config
from rankgrpo.data import DataError, load_examples
from rankgrpo.evaluation import load_predictions, score_examples
from rankgrpo.io import atomic_write_json, atomic_write_jsonl
from rankgrpo.metrics import format_table


@dataclass
class EvaluateConfig:
    """Score recommendation lists against ground truth (PAPER.md section 8)."""

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
    limit: int = arg(0, "Score only the first LIMIT examples (0: all).")
    positions: str = arg("shift", "'shift': drop seen/out-of-catalog items then cut at k (the authors' "
                                  "evaluation); 'fixed': items keep their generated rank.",
                         choices=["shift", "fixed"])
    ideal: str = arg("standard", "IDCG: 'standard' = over min(|GT|, k); 'official' = the authors' quirk "
                                 "(capped by the filtered list's length).", choices=["standard", "official"])
    year_tolerance: int = arg(2, "A recommendation's year may differ from the ground truth's by this much.")
    n_items: int = arg(20, "List length N (the per-rank curve and format ratio use the first N lines).")
    max_new_tokens: int = arg(300, "Generation budget per list (the paper's eval allows 1024).")
    batch_size: int = arg(64, "Unique prompts per generation batch.")
    device: str = arg("", "Device for generation (default: cuda if available, else cpu).")
    dtype: str = arg("float32", "Model dtype for generation (bfloat16 on GPUs).")
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
            raise SystemExit("evaluate.py: give exactly one of --model, --predictions, --predictions-from-field, "
                             "--compare")
        if self.constrained and not self.model:
            raise SystemExit("evaluate.py: --constrained needs --model (it changes how lists are generated)")


def _results_path(p: str) -> Path:
    path = Path(p)
    return path / "results.json" if path.is_dir() else path


def compare(cfg: EvaluateConfig) -> int:
    rows, curves = {}, {}
    for p in cfg.compare:
        path = _results_path(p)
        if not path.is_file():
            print(f"error: {path}: no results.json (run evaluate.py with --out first)", file=sys.stderr)
            return 2
        res = json.loads(path.read_text())
        name = res.get("name", path.parent.name)
        rows[name] = res["results"]
        curves[name] = res["results"].get("rank_hit_rate", [])
    print(format_table(rows))
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


def generate(cfg: EvaluateConfig, examples, catalog) -> list[str]:
    import torch

    from rankgrpo.models import load_model, load_tokenizer
    from rankgrpo.training import check_tokenizer_matches, greedy_completions

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype=cfg.dtype, device=device)
    check_tokenizer_matches(model, tokenizer, cfg.model)
    constraint = None
    if cfg.constrained:
        from rankgrpo.constraint import catalog_trie, constraint_for_examples
        from rankgrpo.training import eos_token_ids

        trie = catalog_trie(catalog, tokenizer, cache_dir=cfg.trie_cache or None)
        if trie.dropped:
            print(f"constraint: catalog items left out of the trie: {dict(trie.dropped)}", file=sys.stderr)
        constraint = constraint_for_examples(trie, catalog, examples, n_items=cfg.n_items,
                                             eos_token_ids=eos_token_ids(model, tokenizer),
                                             exclude_seen=cfg.exclude_seen)
    return greedy_completions(model, tokenizer, examples, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size, n_items=cfg.n_items, progress=True, constraint=constraint)


def main(argv=None) -> int:
    cfg = parse_config(EvaluateConfig, argv)
    if cfg.compare:
        return compare(cfg)
    try:
        catalog = load_catalog(cfg.catalog)
        examples = load_examples(cfg.data)
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
    except (DataError, CatalogError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if catalog.report.dropped:
        print(f"catalog: {catalog.report.summary()}", file=sys.stderr)
    agg, rows = score_examples(examples, completions, catalog, positions=cfg.positions, ideal=cfg.ideal,
                               year_tolerance=cfg.year_tolerance, n_items=cfg.n_items)
    print(f"{len(examples)} examples, {len(catalog)} catalog items, positions={cfg.positions}, ideal={cfg.ideal}")
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
