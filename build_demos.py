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

Ablations (the paper's Table 2; ``rankgrpo.demos.pipeline`` has the details):
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from rankgrpo.catalog import CatalogError, load_catalog
from rankgrpo.config import arg, run_cli, save_config
from rankgrpo.data import DataError, load_examples, write_examples
from rankgrpo.demos.embed import make_embedder
from rankgrpo.demos.pipeline import RRAConfig, run_rra, train_subset
from rankgrpo.demos.report import print_report, stage_report
from rankgrpo.demos.teacher import CachedTeacher, Teacher, make_teacher
from rankgrpo.io import atomic_write_json
from rankgrpo.sandbox import settings

TEACHERS = ("sandbox", "openai", "hf")


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


def load_inputs(cfg: BuildDemosConfig):
    """(catalog, training examples, validation examples) from the configured paths; bad input
    ends the run with one line naming the file, line and field."""
    try:
        return (load_catalog(cfg.catalog), load_examples(cfg.train_data, require_groundtruth=False),
                load_examples(cfg.val_data, require_groundtruth=False))
    except (CatalogError, DataError) as e:
        raise SystemExit(f"error: {e}") from None


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
    # data given by path is read first: a bad file fails before a missing world is built (minutes)
    inputs = load_inputs(cfg) if cfg.train_data and cfg.val_data and cfg.catalog else None
    world = prepare_world(cfg.world, log) if needs_world(cfg, teacher is not None) else None
    cfg = resolve_paths(cfg)
    check_inputs(cfg)
    lap("world")

    catalog, train_all, val = inputs or load_inputs(cfg)
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
    kept = {"train": [ex for ex in done[:len(train)] if ex.completion is not None],
            "validation": [ex for ex in done[len(train):] if ex.completion is not None]}

    # The report.
    report = stage_report(
        examples, {"train": range(len(train)), "validation": range(len(train), len(examples))}, result, catalog, cfg,
        n_in_file={"train": len(train_all), "validation": len(val)}, report_train=cfg.report_train, seed=cfg.seed,
        data={"train": train_all.report.to_json(), "validation": val.report.to_json(),
              "catalog": catalog.report.summary()},
        teacher_requests={"sent": cached.misses - misses0, "from_cache": cached.hits - hits0})
    report["seconds"] = seconds  # filled in to the end (write, total) before the report is written
    lap("report")

    write_examples(Path(cfg.out) / "train.jsonl", kept["train"])
    write_examples(Path(cfg.out) / "validation.jsonl", kept["validation"])
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
