"""Evaluate recommendation lists: Recall@k / NDCG@k with standard errors, in-catalog and format ratios.

Scores a predictions file (JSONL, one completion per example, aligned by ``id`` or by
line) against an examples file and a catalog, and prints the paper's table:

    python evaluate.py --data test.jsonl --catalog catalog.jsonl --predictions preds.jsonl
    python evaluate.py --data train_sample.jsonl --catalog gt_catalog.pkl --predictions-from-field completion
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from rankgrpo.catalog import load_catalog
from rankgrpo.config import arg, parse_config
from rankgrpo.data import DataError, load_examples
from rankgrpo.evaluation import load_predictions, score_examples
from rankgrpo.io import atomic_write_json
from rankgrpo.metrics import format_table


@dataclass
class EvaluateConfig:
    """Score recommendation lists against ground truth (PAPER.md section 8)."""

    data: str = arg("", "Examples file (JSONL / JSON) with prompts, seen titles and ground truths.")
    catalog: str = arg("", "Catalog file (.jsonl, .tsv, or the authors' .pkl).")
    predictions: str = arg("", "Predictions JSONL ({'id'?, 'completion'}) to score.")
    predictions_from_field: str = arg("", "Score the examples' own field instead of a predictions file "
                                          "(e.g. 'completion').", choices=["", "completion"])
    name: str = arg("run", "Row name in the printed table.")
    positions: str = arg("shift", "'shift': drop seen/out-of-catalog items then cut at k (the authors' "
                                  "evaluation); 'fixed': items keep their generated rank.",
                         choices=["shift", "fixed"])
    ideal: str = arg("standard", "IDCG: 'standard' = over min(|GT|, k); 'official' = the authors' quirk "
                                 "(capped by the filtered list's length).", choices=["standard", "official"])
    year_tolerance: int = arg(2, "A recommendation's year may differ from the ground truth's by this much.")
    n_items: int = arg(20, "List length N (the per-rank curve and format ratio use the first N lines).")
    json: str = arg("", "Write the aggregate numbers (and the per-rank hit curve) to this JSON file.")

    def validate(self) -> None:
        if not self.data or not self.catalog:
            raise SystemExit("evaluate.py: --data and --catalog are required")
        if bool(self.predictions) == bool(self.predictions_from_field):
            raise SystemExit("evaluate.py: give exactly one of --predictions or --predictions-from-field")


def main(argv=None) -> int:
    cfg = parse_config(EvaluateConfig, argv)
    try:
        catalog = load_catalog(cfg.catalog)
        examples = load_examples(cfg.data)
        if cfg.predictions_from_field:
            missing = [e.id for e in examples if e.completion is None]
            if missing:
                raise DataError(f"{cfg.data}: {len(missing)} example(s) have no 'completion', e.g. id {missing[0]}")
            completions = [e.completion for e in examples]
        else:
            completions = load_predictions(cfg.predictions, examples)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if catalog.report.dropped:
        print(f"catalog: {catalog.report.summary()}", file=sys.stderr)
    agg, _ = score_examples(examples, completions, catalog, positions=cfg.positions, ideal=cfg.ideal,
                            year_tolerance=cfg.year_tolerance, n_items=cfg.n_items)
    print(f"{len(examples)} examples, {len(catalog)} catalog items, positions={cfg.positions}, ideal={cfg.ideal}")
    print(format_table({cfg.name: agg}))
    if cfg.json:
        atomic_write_json(cfg.json, {"config": vars(cfg), "results": agg})
    return 0


if __name__ == "__main__":
    sys.exit(main())
