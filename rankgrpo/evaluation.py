"""Score completions against examples: alignment of a predictions file, per-example rows, the table.

The scoring half of ``evaluate.py``; generation from a checkpoint lives in the script.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Sequence

from rankgrpo.catalog import Catalog
from rankgrpo.data import DataError, Example
from rankgrpo.io import read_jsonl
from rankgrpo.metrics import KS, aggregate, score_completion
from rankgrpo.parsing import parse_recommendations


def load_predictions(path: str | Path, examples: Sequence[Example]) -> list[str]:
    """Completions aligned with ``examples``.

    The file is JSONL; each line has ``completion`` (a string or a list of chat messages)
    and, optionally, ``id``. If every line has an id, predictions are matched by id (every
    example must have one); otherwise by line order (the counts must agree).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    rows = []
    for line in read_jsonl(path, error=DataError):
        obj, where = line.value, line.where
        if not isinstance(obj, dict) or "completion" not in obj:
            raise DataError(f"{where}: missing field 'completion'")
        comp = obj["completion"]
        if isinstance(comp, list):
            comp = "".join(m.get("content", "") for m in comp if isinstance(m, dict))
        if not isinstance(comp, str):
            raise DataError(f"{where}: field 'completion' must be a string or chat messages")
        rows.append((obj.get("id"), comp, where))
    if not rows:
        raise DataError(f"{path}: the predictions file is empty")
    if rows and all(r[0] is not None for r in rows):
        by_id = {}
        for pid, comp, where in rows:
            if str(pid) in by_id:
                raise DataError(f"{where}: duplicate id {pid!r}")
            by_id[str(pid)] = comp
        missing = [e.id for e in examples if e.id not in by_id]
        if missing:
            raise DataError(f"{path}: no prediction for {len(missing)} example id(s), e.g. {missing[:3]}")
        return [by_id[e.id] for e in examples]
    if len(rows) != len(examples):
        raise DataError(f"{path}: {len(rows)} predictions for {len(examples)} examples (align by 'id' or by line)")
    return [comp for _, comp, _ in rows]


def score_examples(examples: Sequence[Example], completions: Sequence[str], catalog: Catalog, *,
                   ks: Sequence[int] = KS, positions: str = "shift", protocol: str = "paper",
                   year_tolerance: int = 2, n_items: int = 20) -> tuple[dict, list[dict]]:
    """Parse and score every completion once. Returns (aggregate, per-example rows); the aggregate's
    standard errors are clustered by prompt (``prompt_key``): repeated prompts are not independent.

    protocol="paper" (default): the authors' ``evaluate_direct_match`` and in-catalog ratio
    (``libs/metrics.py``, ``evaluate/``); "lenient": the reward's matching with the textbook IDCG
    (``rankgrpo.metrics``). Every parsed line counts, also those past ``n_items``: filtered
    items make room for later ones, as in the authors' evaluation.
    """
    rows = []
    for ex, comp in zip(examples, completions, strict=True):
        items = parse_recommendations(comp)
        row = score_completion(items, ex.groundtruth, ex.seen_titles, catalog, ks=ks, positions=positions,
                               protocol=protocol, year_tolerance=year_tolerance, n_items=n_items)
        rows.append({"id": ex.id, "prompt": prompt_key(ex), "completion": comp, **row})
    metrics = [{k: v for k, v in r.items() if k not in ROW_KEYS} for r in rows]
    return aggregate(metrics, clusters=[r["prompt"] for r in rows]), rows


# the per-example row's fields that are not metrics
ROW_KEYS = ("id", "prompt", "completion")


def prompt_key(example: Example) -> str:
    """A short key of the example's prompt (16 hex digits of its SHA-1): rows with the same key ask
    the same question, so their scores are one cluster (``rankgrpo.stats.clustered_mean_and_stderr``)."""
    return hashlib.sha1(example.prompt_text.encode("utf-8")).hexdigest()[:16]


def prompt_clusters(*per_example: Mapping[str, Mapping]) -> dict[str, str]:
    """{example id: prompt key} from the rows of one or more evaluations ({id: row}); a row written
    before rows carried the key is its own cluster (its id)."""
    out: dict[str, str] = {}
    for rows in per_example:
        for i, row in rows.items():
            out.setdefault(i, row.get("prompt", f"id:{i}"))
    return out
