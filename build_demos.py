"""Stage 1, demonstrations: Remap-Reflect-Adjust (§2.2, App. A) -> SFT data in the data format.

    python build_demos.py                                   # the sandbox preset (builds sandbox_world/ if missing)
    python build_demos.py --preset paper --teacher openai --base-url https://api.openai.com/v1 --model gpt-4o \\
        --api-key-env OPENAI_API_KEY --embedder hf:models/stella_en_400M_v5 \\
        --train-data data/train.jsonl --val-data data/validation.jsonl --catalog data/gt_catalog.pkl
    python build_demos.py --preset paper --teacher hf --teacher-model models/Qwen2.5-7B-Instruct ...
    python build_demos.py --no-reflect --out runs/demos-no-reflect    # a Table 2 ablation

A seeded ``--train-fraction`` of the training split (``--preset paper``: 25%, as the paper;
the sandbox preset, the default: all of it) and all of validation go through RRA in one run;
Adjust's w, b are fitted on the training ground truths only and applied to both. The run
directory OUT gets

    OUT/train.jsonl, OUT/validation.jsonl   the examples with the demonstration as ``completion``
                                            (conversations the teacher failed on are left out)
    OUT/report.json                         the stage report (below), also printed as a table
    OUT/config.json                         the resolved config
    OUT/cache/teacher.jsonl                 every usable teacher reply, appended as it arrives
    OUT/cache/emb-*.npy                     embeddings of the metadata and the conversations

Every file is written atomically and the outputs only at the end, so a killed run leaves
no half file; started again, it takes every reply and embedding it already has from
OUT/cache and asks the teacher only for the rest.

The stage report scores the list each stage would give as a demonstration, on validation
and on a seeded sample of the training subset (where Adjust is fitted, so its train
numbers are in-sample): Recall@k, NDCG@k, the in-catalog ratio and the format-valid ratio of
the teacher's raw reply, then of the top N after Remap, after Reflect and after Adjust. It
also counts teacher and judge failures, unparsed judge lines and missing ratings, checks
every demonstration (N lines "Title (YYYY)", in the catalog, no title the user mentioned),
and keeps the time of every stage.

Ablations (the paper's Table 2; ``rankgrpo.demos.rra`` has the details):
``--no-remap-reflect`` keeps the raw list's in-catalog items (exact identity, year within
``--identity-year-tolerance``; out-of-catalog items dropped) at 1/sqrt(k) and lets Adjust rank
them and fill the free places; ``--no-reflect`` skips the judge; ``--no-adjust`` writes the
top N after Reflect.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from rankgrpo.catalog import Catalog, CatalogError, load_catalog, normalize_title
from rankgrpo.config import arg, run_cli, save_config
from rankgrpo.data import DataError, Example, load_examples, write_examples
from rankgrpo.demos.embed import make_embedder
from rankgrpo.demos.rra import RRAConfig, RRAResult, format_demo, run_rra
from rankgrpo.demos.teacher import CachedTeacher, Teacher, make_teacher
from rankgrpo.evaluation import score_examples
from rankgrpo.io import atomic_write_json
from rankgrpo.metrics import format_table
from rankgrpo.parsing import parse_recommendations
from rankgrpo.sandbox import settings

TEACHERS = ("sandbox", "openai", "hf")
STAGE_NAMES = {"raw": "teacher (raw)", "identity": "identity map", "remap": "remap", "reflect": "reflect",
               "adjust": "adjust"}


# --preset: the paper's defaults below, or the sandbox's (what make demo runs; rankgrpo/sandbox/settings.py)
PRESETS = {"paper": {}, "sandbox": settings.DEMOS}


@dataclass
class BuildDemosConfig(RRAConfig):
    """Build SFT demonstrations with Remap-Reflect-Adjust (§2.2, App. A)."""

    PRESETS: ClassVar[dict] = PRESETS

    preset: str = arg("sandbox", "Defaults of --train-fraction and --report-train: 'paper' (25% of train, as §3.1; "
                                 "the stage report on train too) or 'sandbox' (what make demo runs on the "
                                 "sandbox world: rankgrpo/sandbox/settings.py). A flag given on the command line "
                                 "wins.", choices=list(PRESETS))

    # ---- data
    world: str = arg("sandbox_world", "Sandbox world directory, built there when missing and needed (the "
                                      "sandbox teacher, or a data path left empty).")
    train_data: str = arg("", "Training examples (JSONL); empty: WORLD/train.jsonl.")
    val_data: str = arg("", "Validation examples (JSONL); empty: WORLD/validation.jsonl.")
    catalog: str = arg("", "Catalog (.jsonl, .tsv or the authors' .pkl); empty: WORLD/catalog.jsonl.")
    train_fraction: float = arg(0.25, "Share of the training examples that get a demonstration (the paper: "
                                      "0.25), drawn with --seed. Set by the sandbox preset.", min=0, max=1)
    max_train: int = arg(0, "At most this many training examples (0: no cap); taken in the same seeded order, "
                            "so a smaller subset is part of a larger one.", min=0)
    seed: int = arg(0, "Seed of the training subset, the train report sample and Adjust's mini-batch order.", min=0)
    out: str = arg("runs/demos", "Output directory.")
    cache_dir: str = arg("", "Teacher replies and embeddings; empty: OUT/cache. Runs with the same teacher "
                             "may share one.")

    # ---- teacher
    teacher: str = arg("sandbox", "The black-box teacher: 'sandbox' (the simulated one of WORLD), 'openai' "
                                  "(any OpenAI-compatible endpoint) or 'hf' (a local transformers model).",
                       choices=list(TEACHERS))
    model: str = arg("", "openai: the model name sent with each request (e.g. gpt-4o).")
    base_url: str = arg("https://api.openai.com/v1", "openai: the API root ({base_url}/chat/completions).")
    api_key_env: str = arg("OPENAI_API_KEY", "openai: NAME of the environment variable holding the API key "
                                             "(unset or empty: no key is sent, for local servers).")
    temperature: float = arg(0.0, "openai: sampling temperature.", min=0)
    max_tokens: int = arg(2048, "openai: reply budget (a judge reply rates --n-reflect candidates).", min=1)
    concurrency: int = arg(8, "openai: requests in flight at once.", min=1)
    timeout: float = arg(120.0, "openai: seconds per HTTP request.", above=0)
    teacher_model: str = arg("", "hf: the teacher model (a local directory or a hub name).")
    teacher_device: str = arg("cuda" if torch.cuda.is_available() else "cpu", "hf: device of the teacher.")
    teacher_batch_size: int = arg(8, "hf: prompts generated together.", min=1)
    teacher_max_new_tokens: int = arg(2048, "hf: reply budget in tokens.", min=1)
    max_attempts: int = arg(0, "Tries per teacher request, the first included (0: the backend's default, 3 for "
                               "sandbox, 5 for openai; a greedy hf teacher is not retried, its reply would not "
                               "change); then the conversation is skipped and counted.", min=0)

    # ---- embeddings, report, machine
    embedder: str = arg("hashing", "'hashing' / 'hashing:DIM' (character n-gram TF-IDF, no model) or 'hf:PATH' "
                                   "(a local sentence encoder, read with its sentence-transformers layout when it "
                                   "has one; the paper's is stella_en_400M_v5).")
    trust_remote_code: bool = arg(False, "hf embedder: run the model's own code from its directory (needed by "
                                         "encoders such as stella_en_400M_v5). Only for models you trust.")
    report_train: int = arg(1000, "Score the stages on up to this many training demonstrations too (a seeded "
                                  "sample; 0: validation only). Set by the sandbox preset.", min=0)
    threads: int = arg(1, "torch CPU threads (more threads on a busy machine can make Adjust much slower).", min=1)

    def validate(self) -> None:
        try:
            RRAConfig.validate(self)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if self.teacher not in TEACHERS:
            raise SystemExit(f"error: --teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.teacher == "openai" and not self.model:
            raise SystemExit("error: --teacher openai needs --model (and usually --base-url and --api-key-env)")
        if self.teacher == "hf" and not self.teacher_model:
            raise SystemExit("error: --teacher hf needs --teacher-model PATH")
        if not 0.0 <= self.train_fraction <= 1.0:
            raise SystemExit(f"error: --train-fraction must be in [0, 1], got {self.train_fraction}")
        if self.max_train < 0 or self.report_train < 0 or self.threads < 1 or self.max_attempts < 0:
            raise SystemExit("error: --max-train, --report-train and --max-attempts must be >= 0, --threads >= 1")


# ----------------------------------------------------------------------------- inputs


def check_inputs(cfg: BuildDemosConfig) -> None:
    """Fail before any work on a path that was given but does not exist, or an output that is a file."""
    for flag, value in (("train-data", cfg.train_data), ("val-data", cfg.val_data), ("catalog", cfg.catalog)):
        if value and not Path(value).exists():
            raise SystemExit(f"error: --{flag} {value}: no such file or directory")
    if cfg.embedder.startswith("hf:") and not Path(cfg.embedder[3:]).exists():
        raise SystemExit(f"error: --embedder {cfg.embedder}: no such directory {cfg.embedder[3:]}")
    for flag, value in (("out", cfg.out), ("cache-dir", cfg.cache_dir)):
        if value and Path(value).exists() and not Path(value).is_dir():
            raise SystemExit(f"error: --{flag} {value}: exists and is not a directory")


def needs_world(cfg: BuildDemosConfig, teacher_given: bool) -> bool:
    return (cfg.teacher == "sandbox" and not teacher_given) or not (cfg.train_data and cfg.val_data and cfg.catalog)


def prepare_world(root: str, log: Callable[[str], None]):
    """The sandbox world in ``root``: loaded if it is one (whatever its size), else built with the defaults."""
    from rankgrpo.sandbox import ensure_world, load_world

    try:
        return load_world(root)
    except FileNotFoundError:
        log(f"build_demos: no sandbox world in {root}; building the default one there (once)")
        return ensure_world(root)
    except ValueError as e:
        raise SystemExit(f"error: --world {root}: {e}") from None


def resolve_paths(cfg: BuildDemosConfig) -> BuildDemosConfig:
    """Empty data paths -> the world's files; empty cache dir -> OUT/cache."""
    world = Path(cfg.world)
    return dataclasses.replace(
        cfg,
        train_data=cfg.train_data or str(world / "train.jsonl"),
        val_data=cfg.val_data or str(world / "validation.jsonl"),
        catalog=cfg.catalog or str(world / "catalog.jsonl"),
        cache_dir=cfg.cache_dir or str(Path(cfg.out) / "cache"),
    )


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on (n, seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def train_subset(n: int, fraction: float, max_train: int, seed: int) -> list[int]:
    """Indices (in file order) of the training examples that get a demonstration: the first
    round(fraction * n), at most ``max_train`` (0: no cap), of a seeded permutation.

    >>> train_subset(8, 0.25, 0, seed=0) == sorted(seeded_order(8, 0)[:2])
    True
    """
    k = int(fraction * n + 0.5)
    if max_train:
        k = min(k, max_train)
    return sorted(seeded_order(n, seed)[:k])


def build_teacher(cfg: BuildDemosConfig, world) -> Teacher:
    """The configured backend (without its cache)."""
    if cfg.teacher == "sandbox":
        teacher = make_teacher("sandbox", world=world)
    elif cfg.teacher == "openai":
        teacher = make_teacher("openai", model=cfg.model, base_url=cfg.base_url, api_key_env=cfg.api_key_env or None,
                               temperature=cfg.temperature, max_tokens=cfg.max_tokens, timeout=cfg.timeout,
                               concurrency=cfg.concurrency)
    else:
        teacher = make_teacher("hf", path=cfg.teacher_model, device=cfg.teacher_device,
                               batch_size=cfg.teacher_batch_size, max_new_tokens=cfg.teacher_max_new_tokens)
    if cfg.max_attempts:
        teacher.retry = dataclasses.replace(teacher.retry, max_attempts=cfg.max_attempts)
    return teacher


# ----------------------------------------------------------------------------- the stage report


def stage_completions(result: RRAResult, catalog: Catalog, stage: str) -> list[str | None]:
    """The list each example would get as its demonstration at ``stage`` (None where skipped)."""
    if stage == "raw":
        return result.teacher_replies
    tops = {"identity": result.remap_top, "remap": result.remap_top, "reflect": result.reflect_top,
            "adjust": result.final_top}[stage]
    return [format_demo(top, catalog) if top is not None else None for top in tops]


def score_stages(examples: Sequence[Example], rows: Sequence[int], result: RRAResult, catalog: Catalog,
                 cfg: BuildDemosConfig) -> dict[str, dict]:
    """Stage -> aggregate metrics (``rankgrpo.metrics.aggregate``) over ``rows``, for every stage that ran.

    Every stage is scored on the same examples: those that got a demonstration.
    """
    out = {}
    for stage in ["raw"] + result.stats["stages"]:
        completions = stage_completions(result, catalog, stage)
        agg, _ = score_examples([examples[i] for i in rows], [completions[i] for i in rows], catalog,
                                year_tolerance=cfg.identity_year_tolerance, n_items=cfg.n_items)
        out[stage] = agg
    return out


def check_demonstrations(examples: Sequence[Example], completions: Sequence[str | None], catalog: Catalog,
                         n_items: int) -> dict:
    """Count the demonstrations that are exactly ``n_items`` "Title (YYYY)" lines, name catalog items
    (exact title and year) and mention no seen title."""
    counts = Counter()
    for ex, text in zip(examples, completions):
        if text is None:
            continue
        items = parse_recommendations(text)
        seen = {normalize_title(t) for t in ex.seen_titles}
        counts["demonstrations"] += 1
        counts["format_valid"] += len(items) == n_items and all(it.exact for it in items)
        counts["in_catalog"] += all(catalog.lookup(it.title, it.year, 0) is not None for it in items)
        counts["no_seen_title"] += not any(normalize_title(it.title) in seen for it in items)
        counts["no_repeat"] += len({it.key for it in items}) == len(items)
    return {k: counts[k] for k in ("demonstrations", "format_valid", "in_catalog", "no_seen_title", "no_repeat")}


def print_report(report: dict, ks: Sequence[int] = (5, 10, 20), log: Callable[[str], None] = print) -> None:
    for split, stages in report["metrics"].items():
        n = next(iter(stages.values())).get("n_examples", 0) if stages else 0
        log(f"\n{split} ({n} conversations with a demonstration; each stage's top {report['n_items']} scored):")
        log(format_table({STAGE_NAMES[s]: agg for s, agg in stages.items()}, ks=ks))
    c, f = report["checks"], report["failures"]
    log(f"\ndemonstrations ({report['demonstration_stage']}): {c['demonstrations']} written; "
        f"{c['format_valid']} format-valid, {c['in_catalog']} in catalog, {c['no_seen_title']} without a seen title")
    log("skipped: " + ", ".join(f"{s} {v['skipped']} of {v['selected']}" for s, v in report["counts"].items())
        + f"; teacher list failures {f['teacher_list']}, judge failures {f['judge']}, metadata failures "
          f"{f['metadata']}, judge lines unparsed {f['judge_lines_unparsed']}, ratings missing {f['ratings_missing']}")
    t = report["teacher_requests"]
    log(f"teacher requests: {t['sent']} sent, {t['from_cache']} from the cache")
    log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))


# ----------------------------------------------------------------------------- the run


def build_demos(cfg: BuildDemosConfig, *, teacher: Teacher | None = None, embedder=None,
                log: Callable[[str], None] = print) -> dict:
    """Run the stage: demonstrations for the training subset and validation, the report. Returns the report.

    teacher:  a ``Teacher`` to use instead of the configured backend (it still gets the
              reply cache in the cache directory, unless it is a ``CachedTeacher`` already).
    embedder: an embedder to use instead of ``cfg.embedder``.
    """
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    clock = start

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    cfg.validate()
    check_inputs(cfg)
    torch.set_num_threads(cfg.threads)
    world = prepare_world(cfg.world, log) if needs_world(cfg, teacher is not None) else None
    cfg = resolve_paths(cfg)
    check_inputs(cfg)
    lap("world")

    try:
        catalog = load_catalog(cfg.catalog)
        train_all = load_examples(cfg.train_data, require_groundtruth=False)
        val = load_examples(cfg.val_data, require_groundtruth=False)
    except (CatalogError, DataError) as e:
        raise SystemExit(f"error: {e}") from None
    if catalog.report.dropped:
        log(f"build_demos: catalog: {catalog.report.summary()}")
    for name, rows in (("train", train_all), ("validation", val)):
        if rows.report.counts:
            log(f"build_demos: {name} data: {rows.report.summary()}")
    train = [train_all[i] for i in train_subset(len(train_all), cfg.train_fraction, cfg.max_train, cfg.seed)]
    if not train and not val:
        raise SystemExit("error: no examples to build demonstrations for (check --train-fraction and the data)")
    log(f"build_demos: {len(train)} of {len(train_all)} training examples + {len(val)} validation examples, "
        f"{len(catalog)} catalog items, stages {' -> '.join(['raw'] + cfg.stages())}")
    lap("load")

    try:
        backend = teacher if teacher is not None else build_teacher(cfg, world)
        cached = backend if isinstance(backend, CachedTeacher) else CachedTeacher(
            backend, Path(cfg.cache_dir) / "teacher.jsonl")
        embedder = embedder if embedder is not None else make_embedder(cfg.embedder,
                                                                       trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: could not set up the teacher or the embedder: {e}") from None
    save_config(cfg, cfg.out)
    hits0, misses0 = cached.hits, cached.misses
    lap("setup")

    examples = train + val
    try:
        result = run_rra(examples, catalog, cached, embedder, cfg,
                         fit_adjust_on=[True] * len(train) + [False] * len(val), cache_dir=cfg.cache_dir, log=log)
    finally:
        cached.close()
    seconds.update(result.stats["seconds"])
    clock = time.perf_counter()

    # Outputs: the examples with their demonstration; skipped ones are left out.
    done = [dataclasses.replace(ex, completion=text) for ex, text in zip(examples, result.completions)]
    splits = {"train": range(len(train)), "validation": range(len(train), len(examples))}
    kept = {s: [i for i in rows if result.completions[i] is not None] for s, rows in splits.items()}

    # The report.
    metrics = {"validation": score_stages(examples, kept["validation"], result, catalog, cfg)}
    if cfg.report_train and kept["train"]:
        sample = sorted(kept["train"][j] for j in seeded_order(len(kept["train"]), cfg.seed + 1)[:cfg.report_train])
        metrics["train"] = score_stages(examples, sample, result, catalog, cfg)
    s = result.stats
    report = {
        "stages": ["raw"] + s["stages"],
        "demonstration_stage": s["stages"][-1],
        "ablations": {"remap_reflect": cfg.remap_reflect, "reflect": cfg.reflect, "adjust": cfg.adjust},
        "n_items": cfg.n_items,
        "counts": {
            "train": {"examples": len(train_all), "selected": len(train), "demonstrations": len(kept["train"]),
                      "skipped": len(train) - len(kept["train"]),
                      "scored": metrics["train"]["raw"]["n_examples"] if "train" in metrics else 0},
            "validation": {"examples": len(val), "selected": len(val), "demonstrations": len(kept["validation"]),
                           "skipped": len(val) - len(kept["validation"]), "scored": len(kept["validation"])},
        },
        "checks": check_demonstrations(examples, result.completions, catalog, cfg.n_items),
        "data": {"train": train_all.report.to_json(), "validation": val.report.to_json(),
                 "catalog": catalog.report.summary()},
        "metrics": metrics,
        "failures": {
            "teacher_list": s.get("list_failures", 0), "judge": s.get("judge_failures", 0),
            "metadata": s.get("metadata_failures", 0), "judge_lines_unparsed": s.get("judge_lines_unparsed", 0),
            "ratings_missing": s.get("ratings_missing", 0),
            "groundtruth_not_in_catalog": s.get("groundtruth_not_in_catalog", 0),
            "reasons": s["failure_reasons"],
        },
        "skipped_ids": {split: [examples[i].id for i in rows if result.completions[i] is None][:100]
                        for split, rows in splits.items()},
        "teacher_requests": {"sent": cached.misses - misses0, "from_cache": cached.hits - hits0},
        "rra": {k: v for k, v in s.items() if k not in ("failure_reasons", "seconds", "stages")},
        "seconds": seconds,
    }
    lap("report")

    write_examples(Path(cfg.out) / "train.jsonl", [done[i] for i in kept["train"]])
    write_examples(Path(cfg.out) / "validation.jsonl", [done[i] for i in kept["validation"]])
    lap("write")
    seconds["total"] = round(time.perf_counter() - start, 3)
    atomic_write_json(Path(cfg.out) / "report.json", report)
    print_report(report, log=log)
    log(f"build_demos: wrote {cfg.out}/train.jsonl ({len(kept['train'])}), {cfg.out}/validation.jsonl "
        f"({len(kept['validation'])}), {cfg.out}/report.json")
    return report


def main(argv=None) -> int:
    def run(cfg: BuildDemosConfig) -> int:
        build_demos(cfg, log=lambda line: print(line, flush=True))
        return 0

    return run_cli(BuildDemosConfig, run, argv)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
